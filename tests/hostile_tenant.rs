//! Hostile tenants, over real sockets: one network trying to grow the relay without bound or
//! to exhaust what every network shares. Each test has the attacker push past a small bound
//! and then checks that the relay limited it (with its own code) and that the others, the
//! gatekeeper included, are still served.

mod common;

use base64::Engine as _;
use client::control::{ApiResponse, ControlClient, user_hex};
use client::{ErrorCode, UserAddress};
use common::control::{ControlRelay, Enlist, Who, assert_error, ok};
use common::{GATEKEEPER, PARTNER};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A device's keys with `one_time` one-time prekeys.
fn keys(one_time: u32) -> Value {
    json!({
        "identity_key": b64(&[1; 32]),
        "signed_prekey": {"id": 1, "key": b64(&[2; 32]), "signature": b64(&[3; 64])},
        "one_time_prekeys": (1..=one_time).map(|id| json!({"id": id, "key": b64(&[4; 32])})).collect::<Vec<_>>(),
    })
}

async fn upload(api: &ControlClient, user: &UserAddress, body: &Value) {
    let path = format!("/v1/keys/{}/{}/1", user.network.0, user_hex(user));
    ok(api.put(&path, body).await.expect("upload call"));
}

async fn claim(api: &ControlClient, target: &UserAddress, requester: &UserAddress) -> ApiResponse {
    let path = format!("/v1/keys/{}/{}/claim", target.network.0, user_hex(target));
    let body = json!({"requester": user_hex(requester), "protocol": "signal"});
    api.post(&path, &body).await.expect("claim call")
}

/// The value of `name{network="N"}` in a `/metrics` text (0 when absent).
fn network_metric(text: &str, name: &str, network: u32) -> u64 {
    let prefix = format!("{name}{{network=\"{network}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 11, item 6: the partner (network 2) fills the control plane's rate table, first with
/// claims that are refused (own-network and foreign strangers, which once took a bucket each
/// for a day), then with claims that pass. Its own table fills and it is refused with
/// `RATE_TABLE_FULL`; the gatekeeper and another partner (network 3) are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_filling_its_rate_table_leaves_every_other_network_served() {
    let relay = ControlRelay::start_configured("tenant-rate-table", |config| {
        config.interop.rate_buckets_per_network_max = 16;
    });
    let three = relay.new_network(3);
    ok(relay
        .api(Who::Operator)
        .post("/v1/partners", &relay.partner_body(&three, "active"))
        .await
        .unwrap());
    let owner = common::user(GATEKEEPER, 0x7101);
    let partner_user = common::user(PARTNER, 0x7201);
    let third_user = common::user(three.id, 0x7301);
    relay.enlist(&owner, &Enlist::default()).await;
    relay.enlist(&partner_user, &Enlist::default()).await;
    assert!(
        relay
            .enlist_as(&three, &third_user, false)
            .await
            .is_success()
    );
    upload(&relay.api(Who::Gatekeeper), &owner, &keys(64)).await;
    upload(&relay.api(Who::Partner), &partner_user, &keys(8)).await;

    // Refused claims: strangers of its own network (once not checked at all) and of the
    // gatekeeper's, as target or as requester. None may take a bucket.
    let partner = relay.api(Who::Partner);
    for n in 0..40u128 {
        let stranger = common::user(PARTNER, 0x7_0000 + n);
        let refused = claim(&partner, &common::user(PARTNER, 0x8_0000 + n), &stranger).await;
        assert_error(&refused, 403, ErrorCode::SenderNotEnlisted);
        let refused = claim(&partner, &stranger, &partner_user).await;
        assert_error(&refused, 404, ErrorCode::NotFound);
        let refused = claim(
            &partner,
            &common::user(GATEKEEPER, 0x9_0000 + n),
            &partner_user,
        )
        .await;
        assert_error(&refused, 404, ErrorCode::NotFound);
    }
    let metrics = relay.metrics().await;
    assert_eq!(
        network_metric(&metrics, "relay_control_rate_buckets", PARTNER.0),
        0,
        "refused claims took no bucket:\n{metrics}"
    );
    let served = claim(&relay.api(Who::Gatekeeper), &partner_user, &owner).await;
    ok(served);

    // Claims that pass, one pair each, until the partner's own table is full.
    let mut full = None;
    for n in 0..24u128 {
        let requester = common::user(PARTNER, 0x7400 + n);
        relay.enlist(&requester, &Enlist::default()).await;
        let answer = claim(&partner, &owner, &requester).await;
        if !answer.is_success() {
            full = Some((n, answer));
            break;
        }
    }
    let (n, refused) = full.expect("the partner's table fills");
    assert_eq!(
        n, 15,
        "one bucket for the partner's claims and fifteen pairs fit"
    );
    assert_error(&refused, 429, ErrorCode::RateTableFull);
    assert!(refused.retry_after_s.is_some_and(|s| s > 0));
    let metrics = relay.metrics().await;
    assert_eq!(
        network_metric(&metrics, "relay_control_rate_buckets", PARTNER.0),
        16
    );

    // Everyone else is served: the gatekeeper, and another partner.
    let mut partner_claims = 0;
    for _ in 0..4 {
        ok(claim(&relay.api(Who::Gatekeeper), &partner_user, &owner).await);
        partner_claims += 1;
    }
    ok(claim(&relay.api_as(&three), &owner, &third_user).await);
    assert_eq!(partner_claims, 4);
    let metrics = relay.metrics().await;
    assert!(network_metric(&metrics, "relay_control_rate_buckets", GATEKEEPER.0) >= 1);
    assert!(network_metric(&metrics, "relay_control_rate_buckets", three.id.0) >= 1);
}
