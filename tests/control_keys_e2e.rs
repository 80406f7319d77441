//! The key directory end to end, over real sockets (issue point 6): a device's network
//! uploads its Signal prekeys and MLS KeyPackages, the other network claims one bundle per
//! device under the same interop rules as an envelope, every one-time key is handed out once
//! even under concurrent claims, running out tells the owner's network, and each hostile
//! input is refused with its code.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use client::control::{ApiResponse, ControlClient, user_hex};
use client::{ErrorCode, UserAddress};
use common::control::{ControlRelay, Enlist, Who, assert_error, ok, user_path};
use common::{GATEKEEPER, PARTNER};
use serde_json::{Value, json};

/// How long an asynchronously stored record (a message request) may take to show.
const SETTLE: Duration = Duration::from_secs(5);

/// `len` bytes that depend only on `tag` (distinct tags give distinct bytes).
fn material(tag: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut block = 0u32;
    while out.len() < len {
        out.extend_from_slice(&devkit::hex::sha256(format!("{tag}/{block}").as_bytes()));
        block += 1;
    }
    out.truncate(len);
    out
}

fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

fn public_key(tag: &str) -> String {
    b64(&material(tag, 32))
}

fn signature(tag: &str) -> String {
    b64(&material(tag, 64))
}

fn signed(tag: &str, id: u32) -> Value {
    json!({"id": id, "key": public_key(&format!("{tag}-key")), "signature": signature(&format!("{tag}-sig"))})
}

/// Everything one device's network uploads, kept to check what claims hand out.
struct DeviceKeys {
    identity_key: String,
    signed_prekey: Value,
    last_resort_prekey: Value,
    /// One-time prekeys: id → base64 key.
    one_time: BTreeMap<u32, String>,
    key_packages: Vec<String>,
    last_resort_key_package: String,
}

impl DeviceKeys {
    fn new(tag: &str, one_time_ids: impl IntoIterator<Item = u32>, packages: usize) -> Self {
        DeviceKeys {
            identity_key: public_key(&format!("{tag}-identity")),
            signed_prekey: signed(&format!("{tag}-signed"), 1),
            last_resort_prekey: signed(&format!("{tag}-last-resort"), 2),
            one_time: one_time_ids
                .into_iter()
                .map(|id| (id, public_key(&format!("{tag}-otk-{id}"))))
                .collect(),
            key_packages: (0..packages)
                .map(|i| b64(&material(&format!("{tag}-kp-{i}"), 200)))
                .collect(),
            last_resort_key_package: b64(&material(&format!("{tag}-kp-last-resort"), 200)),
        }
    }

    /// The upload of everything.
    fn body(&self) -> Value {
        let mut body = self.more(
            &self.one_time.keys().copied().collect::<Vec<_>>(),
            0..self.key_packages.len(),
        );
        body["identity_key"] = json!(self.identity_key);
        body["signed_prekey"] = self.signed_prekey.clone();
        body["last_resort_prekey"] = self.last_resort_prekey.clone();
        body["last_resort_key_package"] = json!(self.last_resort_key_package);
        body
    }

    /// An upload of only some one-time prekeys and KeyPackages.
    fn more(&self, ids: &[u32], packages: std::ops::Range<usize>) -> Value {
        let one_time: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "key": self.one_time[id]}))
            .collect();
        json!({"one_time_prekeys": one_time, "key_packages": self.key_packages[packages]})
    }
}

fn keys_path(user: &UserAddress, device: u32) -> String {
    format!("/v1/keys/{}/{}/{device}", user.network.0, user_hex(user))
}

fn claim_path(user: &UserAddress) -> String {
    format!("/v1/keys/{}/{}/claim", user.network.0, user_hex(user))
}

fn claim_body(requester: &UserAddress, protocol: &str) -> Value {
    json!({"requester": user_hex(requester), "protocol": protocol})
}

async fn claim(
    api: &ControlClient,
    target: &UserAddress,
    requester: &UserAddress,
    protocol: &str,
) -> ApiResponse {
    api.post(&claim_path(target), &claim_body(requester, protocol))
        .await
        .expect("claim call")
}

/// Uploads `keys` for `device` as the owner's network and returns the stored record.
async fn upload(relay: &ControlRelay, user: &UserAddress, device: u32, body: &Value) -> Value {
    ok(relay
        .api_of(user)
        .put(&keys_path(user, device), body)
        .await
        .expect("upload call"))
}

/// The owner's view of a device's keys.
async fn stored(relay: &ControlRelay, user: &UserAddress, device: u32) -> ApiResponse {
    relay
        .api_of(user)
        .get(&keys_path(user, device))
        .await
        .expect("keys call")
}

fn counts(record: &Value) -> (u64, u64) {
    (
        record["one_time_prekeys"]
            .as_u64()
            .unwrap_or_else(|| panic!("one_time_prekeys count in {record}")),
        record["key_packages"]
            .as_u64()
            .unwrap_or_else(|| panic!("key_packages count in {record}")),
    )
}

fn bundles(body: &Value) -> Vec<Value> {
    body["bundles"]
        .as_array()
        .unwrap_or_else(|| panic!("bundles in {body}"))
        .clone()
}

fn device_of(bundle: &Value) -> u32 {
    bundle["device"]
        .as_u64()
        .and_then(|d| u32::try_from(d).ok())
        .unwrap_or_else(|| panic!("device in {bundle}"))
}

fn is_last_resort(bundle: &Value) -> bool {
    bundle["last_resort"]
        .as_bool()
        .unwrap_or_else(|| panic!("last_resort in {bundle}"))
}

/// The one-time prekey of a Signal bundle that is not last-resort: (id, key).
fn one_time_of(bundle: &Value) -> (u32, String) {
    let prekey = &bundle["prekey"];
    assert!(
        prekey.get("signature").is_none(),
        "a one-time prekey carries no signature: {bundle}"
    );
    let id = prekey["id"]
        .as_u64()
        .and_then(|d| u32::try_from(d).ok())
        .unwrap_or_else(|| panic!("prekey id in {bundle}"));
    let key = prekey["key"]
        .as_str()
        .unwrap_or_else(|| panic!("prekey key in {bundle}"))
        .to_string();
    (id, key)
}

fn key_package_of(bundle: &Value) -> String {
    bundle["key_package"]
        .as_str()
        .unwrap_or_else(|| panic!("key_package in {bundle}"))
        .to_string()
}

/// The `keys_low` events about `user` and `protocol` in the caller's feed.
async fn keys_low(api: &ControlClient, user: &UserAddress, protocol: Option<&str>) -> Vec<Value> {
    let body = ok(api.get("/v1/events?after=0").await.expect("events call"));
    body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("events in {body}"))
        .iter()
        .filter(|e| {
            e["kind"] == "keys_low"
                && e["data"]["user"]["network"] == user.network.0
                && e["data"]["user"]["user"] == user_hex(user)
                && protocol.is_none_or(|p| e["data"]["protocol"] == p)
        })
        .cloned()
        .collect()
}

fn left_of(event: &Value) -> u64 {
    event["data"]["left"]
        .as_u64()
        .unwrap_or_else(|| panic!("left in {event}"))
}

/// Claims `target`'s keys for `requester` through `claimer` and checks every bundle against
/// what the owner uploaded.
async fn claim_and_check(
    claimer: &ControlClient,
    target: &UserAddress,
    requester: &UserAddress,
    uploaded: &BTreeMap<u32, DeviceKeys>,
) {
    // Signal: identity key, signed prekey and a one-time prekey per device.
    let body = ok(claim(claimer, target, requester, "signal").await);
    let list = bundles(&body);
    let devices: BTreeSet<u32> = list.iter().map(device_of).collect();
    assert_eq!(
        devices,
        uploaded.keys().copied().collect::<BTreeSet<_>>(),
        "one Signal bundle per device: {body}"
    );
    assert_eq!(list.len(), uploaded.len(), "one bundle per device: {body}");
    for bundle in &list {
        let keys = &uploaded[&device_of(bundle)];
        assert!(!is_last_resort(bundle), "one-time keys are left: {bundle}");
        assert_eq!(bundle["identity_key"], json!(keys.identity_key), "{bundle}");
        assert_eq!(bundle["signed_prekey"], keys.signed_prekey, "{bundle}");
        let (id, key) = one_time_of(bundle);
        assert_eq!(
            keys.one_time.get(&id),
            Some(&key),
            "the one-time prekey handed out is one uploaded for this device: {bundle}"
        );
        assert!(
            bundle.get("key_package").is_none(),
            "no KeyPackage in a Signal bundle: {bundle}"
        );
    }
    // MLS: a KeyPackage per device, nothing of Signal.
    let body = ok(claim(claimer, target, requester, "mls").await);
    let list = bundles(&body);
    let devices: BTreeSet<u32> = list.iter().map(device_of).collect();
    assert_eq!(
        devices,
        uploaded.keys().copied().collect::<BTreeSet<_>>(),
        "one MLS bundle per device: {body}"
    );
    assert_eq!(list.len(), uploaded.len(), "one bundle per device: {body}");
    for bundle in &list {
        let keys = &uploaded[&device_of(bundle)];
        assert!(!is_last_resort(bundle), "KeyPackages are left: {bundle}");
        let package = key_package_of(bundle);
        assert!(
            keys.key_packages.contains(&package),
            "the KeyPackage handed out is one uploaded for this device: {bundle}"
        );
        for field in ["identity_key", "signed_prekey", "prekey"] {
            assert!(
                bundle.get(field).is_none(),
                "no {field} in an MLS bundle: {bundle}"
            );
        }
    }
}

/// The owner uploads in two parts, reads back, and `claimer` claims Signal and MLS bundles.
async fn upload_and_claim(
    relay: &ControlRelay,
    owner: &UserAddress,
    claimer: Who,
    requester: &UserAddress,
) {
    let mut uploaded = BTreeMap::new();
    for device in [1, 2] {
        let keys = DeviceKeys::new(&format!("{owner}-{device}"), 1..=5, 3);
        // First everything fixed and part of the one-time keys, then more one-time keys.
        let mut first = keys.more(&[1, 2, 3], 0..2);
        for field in [
            "identity_key",
            "signed_prekey",
            "last_resort_prekey",
            "last_resort_key_package",
        ] {
            first[field] = keys.body()[field].clone();
        }
        let record = upload(relay, owner, device, &first).await;
        assert_eq!(counts(&record), (3, 2), "after the first upload: {record}");
        let record = upload(relay, owner, device, &keys.more(&[4, 5], 2..3)).await;
        assert_eq!(
            counts(&record),
            (5, 3),
            "one-time keys add up, fixed keys stay: {record}"
        );
        assert_eq!(record["identity_key"], json!(keys.identity_key));
        // Read back: the fixed keys and the counts, never the one-time keys themselves.
        let record = ok(stored(relay, owner, device).await);
        assert_eq!(counts(&record), (5, 3), "{record}");
        assert_eq!(record["identity_key"], json!(keys.identity_key), "{record}");
        assert_eq!(record["signed_prekey"], keys.signed_prekey, "{record}");
        assert_eq!(
            record["last_resort_prekey"], keys.last_resort_prekey,
            "{record}"
        );
        assert_eq!(
            record["last_resort_key_package"],
            json!(keys.last_resort_key_package),
            "{record}"
        );
        let text = record.to_string();
        for key in keys.one_time.values().chain(&keys.key_packages) {
            assert!(
                !text.contains(key.as_str()),
                "the record shows counts, not one-time keys: {record}"
            );
        }
        uploaded.insert(device, keys);
    }
    let api = relay.api(claimer);
    claim_and_check(&api, owner, requester, &uploaded).await;
    // A second claim hands out other one-time keys, and the counts went down.
    claim_and_check(&api, owner, requester, &uploaded).await;
    for device in [1, 2] {
        let record = ok(stored(relay, owner, device).await);
        assert_eq!(
            counts(&record),
            (3, 1),
            "two claims took two of each: {record}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_uploaded_by_their_network_are_claimed_across_networks_both_ways() {
    let relay = ControlRelay::start("keys-both-ways");
    let gatekeeper_user = common::user(GATEKEEPER, 0x6101);
    let partner_user = common::user(PARTNER, 0x6102);
    let how = Enlist {
        devices: vec![1, 2],
        ..Enlist::default()
    };
    relay.enlist(&gatekeeper_user, &how).await;
    relay.enlist(&partner_user, &how).await;
    upload_and_claim(&relay, &gatekeeper_user, Who::Partner, &partner_user).await;
    upload_and_claim(&relay, &partner_user, Who::Gatekeeper, &gatekeeper_user).await;
    // Each one-time key went out once: the same prekey id never came back per device.
    let api = relay.api(Who::Partner);
    let mut seen = HashSet::new();
    for _ in 0..3 {
        let body = ok(claim(&api, &gatekeeper_user, &partner_user, "signal").await);
        for bundle in bundles(&body) {
            assert!(!is_last_resort(&bundle), "three were left: {bundle}");
            let (id, _) = one_time_of(&bundle);
            assert!(
                seen.insert((device_of(&bundle), id)),
                "prekey {id} handed out twice: {bundle}"
            );
            assert!(
                (1..=5).contains(&id),
                "a prekey that was uploaded: {bundle}"
            );
        }
    }
    let body = ok(claim(&api, &gatekeeper_user, &partner_user, "signal").await);
    for bundle in bundles(&body) {
        assert!(is_last_resort(&bundle), "none left: {bundle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_hand_out_each_one_time_key_once() {
    const ONE_TIME: u32 = 20;
    const PACKAGES: usize = 12;
    const CLAIMS: usize = 64;
    // 128 claims by one requester for one user: above the default per-pair limit.
    let relay = ControlRelay::start_configured("keys-once", |config| {
        config.interop.key_claims_per_pair_per_day = 1000;
    });
    let owner = common::user(GATEKEEPER, 0x6201);
    let requester = common::user(PARTNER, 0x6202);
    relay.enlist(&owner, &Enlist::default()).await;
    relay.enlist(&requester, &Enlist::default()).await;
    let keys = DeviceKeys::new("once", 1..=ONE_TIME, PACKAGES);
    let record = upload(&relay, &owner, 1, &keys.body()).await;
    assert_eq!(counts(&record), (u64::from(ONE_TIME), 12), "{record}");

    // Signal and MLS claims at once, each over its own connection.
    let mut tasks = Vec::new();
    for i in 0..CLAIMS * 2 {
        let protocol = if i % 2 == 0 { "signal" } else { "mls" };
        let api = relay.api(Who::Partner);
        tasks.push(tokio::spawn(async move {
            let response = claim(&api, &owner, &requester, protocol).await;
            (protocol, response)
        }));
    }
    let mut prekeys = Vec::new();
    let mut prekey_last_resort = 0;
    let mut packages = Vec::new();
    let mut package_last_resort = 0;
    for task in tasks {
        let (protocol, response) = task.await.expect("claim task");
        let body = ok(response);
        let list = bundles(&body);
        assert_eq!(list.len(), 1, "one device, one bundle: {body}");
        let bundle = &list[0];
        assert_eq!(device_of(bundle), 1, "{bundle}");
        match (protocol, is_last_resort(bundle)) {
            ("signal", false) => prekeys.push(one_time_of(bundle)),
            ("signal", true) => {
                prekey_last_resort += 1;
                assert_eq!(
                    bundle["prekey"], keys.last_resort_prekey,
                    "the last-resort prekey once none is left: {bundle}"
                );
            }
            (_, false) => packages.push(key_package_of(bundle)),
            (_, true) => {
                package_last_resort += 1;
                assert_eq!(
                    bundle["key_package"],
                    json!(keys.last_resort_key_package),
                    "the last-resort KeyPackage once none is left: {bundle}"
                );
            }
        }
    }

    let ids: Vec<u32> = prekeys.iter().map(|(id, _)| *id).collect();
    let unique: BTreeSet<u32> = ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "a one-time prekey handed out twice: {ids:?}"
    );
    let values: HashSet<&String> = prekeys.iter().map(|(_, key)| key).collect();
    assert_eq!(
        values.len(),
        prekeys.len(),
        "a prekey value handed out twice"
    );
    assert_eq!(
        unique,
        keys.one_time.keys().copied().collect::<BTreeSet<_>>(),
        "exactly the uploaded one-time prekeys, each once"
    );
    for (id, key) in &prekeys {
        assert_eq!(&keys.one_time[id], key, "prekey {id} as uploaded");
    }
    assert_eq!(prekey_last_resort, CLAIMS - prekeys.len());

    let unique: BTreeSet<&String> = packages.iter().collect();
    assert_eq!(
        unique.len(),
        packages.len(),
        "a KeyPackage handed out twice"
    );
    assert_eq!(
        unique,
        keys.key_packages.iter().collect::<BTreeSet<_>>(),
        "exactly the uploaded KeyPackages, each once"
    );
    assert_eq!(package_last_resort, CLAIMS - PACKAGES);

    let record = ok(stored(&relay, &owner, 1).await);
    assert_eq!(counts(&record), (0, 0), "all handed out: {record}");
}

/// Claims `owner`'s keys until the last-resort key comes, checking the owner's feed (and
/// the other's) at each step; `stock` one-time keys were uploaded, the mark is `low`.
async fn drain(
    relay: &ControlRelay,
    owner: &UserAddress,
    claimer: Who,
    requester: &UserAddress,
    protocol: &str,
    stock: u64,
    low: u64,
) {
    let owners = relay.api_of(owner);
    let others = relay.api(claimer);
    let mut left = stock;
    while left > 0 {
        let body = ok(claim(&others, owner, requester, protocol).await);
        left -= 1;
        let list = bundles(&body);
        assert_eq!(list.len(), 1, "{body}");
        assert!(!is_last_resort(&list[0]), "{left} left: {body}");
        let events = keys_low(&owners, owner, Some(protocol)).await;
        if left >= low {
            assert!(
                events.is_empty(),
                "{protocol}: {left} left is not below the mark {low}, yet: {events:?}"
            );
        } else {
            assert!(
                !events.is_empty(),
                "{protocol}: {left} left, below the mark {low}: the owner's network is told"
            );
            for event in &events {
                assert!(left_of(event) < low, "{event}");
                assert_eq!(event["data"]["device"], 1, "{event}");
                assert_eq!(event["audience"], owner.network.0, "{event}");
            }
        }
    }
    // None left: the last-resort key, and the owner's network is told they ran out.
    let body = ok(claim(&others, owner, requester, protocol).await);
    let list = bundles(&body);
    assert!(
        list.len() == 1 && is_last_resort(&list[0]),
        "ran out: {body}"
    );
    let events = keys_low(&owners, owner, Some(protocol)).await;
    assert!(
        events.iter().any(|e| left_of(e) == 0),
        "{protocol}: the owner's network learns the keys ran out: {events:?}"
    );
    // The other network hears nothing of it.
    let foreign = keys_low(&others, owner, None).await;
    assert!(
        foreign.is_empty(),
        "another network's keys_low events leak: {foreign:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_low_on_keys_tells_the_owner_network_only() {
    const LOW: u32 = 3;
    let relay = ControlRelay::start_configured("keys-low", |config| {
        config.interop.prekeys_low = LOW;
    });
    let gatekeeper_user = common::user(GATEKEEPER, 0x6301);
    let partner_user = common::user(PARTNER, 0x6302);
    relay.enlist(&gatekeeper_user, &Enlist::default()).await;
    relay.enlist(&partner_user, &Enlist::default()).await;
    for (owner, claimer, requester) in [
        (gatekeeper_user, Who::Partner, partner_user),
        (partner_user, Who::Gatekeeper, gatekeeper_user),
    ] {
        let keys = DeviceKeys::new(&format!("low-{owner}"), 1..=6, 6);
        let record = upload(&relay, &owner, 1, &keys.body()).await;
        assert_eq!(counts(&record), (6, 6), "{record}");
        for protocol in ["signal", "mls"] {
            drain(
                &relay,
                &owner,
                claimer,
                &requester,
                protocol,
                6,
                u64::from(LOW),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_network_neither_uploads_nor_reads_a_device_record() {
    let relay = ControlRelay::start("keys-foreign");
    let owner = common::user(GATEKEEPER, 0x6401);
    let partner_user = common::user(PARTNER, 0x6402);
    relay.enlist(&owner, &Enlist::default()).await;
    relay.enlist(&partner_user, &Enlist::default()).await;
    let keys = DeviceKeys::new("foreign-owner", 1..=3, 2);
    upload(&relay, &owner, 1, &keys.body()).await;

    let intruder = DeviceKeys::new("foreign-intruder", 10..=12, 2);
    let path = keys_path(&owner, 1);
    for who in [Who::Partner, Who::Operator] {
        let refused = relay.api(who).put(&path, &intruder.body()).await.unwrap();
        assert_error(&refused, 403, ErrorCode::ForeignResource);
        let refused = relay.api(who).get(&path).await.unwrap();
        assert_error(&refused, 403, ErrorCode::ForeignResource);
    }
    // The operator acts for no user: no claims either.
    let refused = claim(&relay.api(Who::Operator), &owner, &partner_user, "signal").await;
    assert_error(&refused, 403, ErrorCode::ForeignResource);
    // Without a client certificate nothing at all.
    let anonymous = relay.api(Who::Anonymous);
    let refused = anonymous.put(&path, &intruder.body()).await.unwrap();
    assert_error(&refused, 401, ErrorCode::CertificateRequired);
    let refused = anonymous.get(&path).await.unwrap();
    assert_error(&refused, 401, ErrorCode::CertificateRequired);
    let refused = claim(&anonymous, &owner, &partner_user, "signal").await;
    assert_error(&refused, 401, ErrorCode::CertificateRequired);

    // Nothing of the intruder was stored, nothing was handed out.
    let record = ok(stored(&relay, &owner, 1).await);
    assert_eq!(counts(&record), (3, 2), "{record}");
    assert_eq!(record["identity_key"], json!(keys.identity_key), "{record}");
    assert_eq!(record["signed_prekey"], keys.signed_prekey, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_key_material_is_keys_invalid_and_stores_nothing() {
    let relay = ControlRelay::start("keys-invalid");
    let owner = common::user(PARTNER, 0x6501);
    relay
        .enlist(
            &owner,
            &Enlist {
                devices: vec![1, 2],
                ..Enlist::default()
            },
        )
        .await;
    let keys = DeviceKeys::new("invalid", 1..=3, 2);
    upload(&relay, &owner, 1, &keys.body()).await;

    let good = public_key("invalid-good");
    let prekeys = |ids: &[u32]| -> Value {
        json!(
            ids.iter()
                .map(|id| json!({"id": id, "key": good}))
                .collect::<Vec<_>>()
        )
    };
    let too_many: Vec<u32> = (100..1101).collect();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "identity key not base64",
            json!({"identity_key": "not base64!"}),
            "identity_key",
        ),
        (
            "identity key of 31 bytes",
            json!({"identity_key": b64(&[7; 31])}),
            "identity_key",
        ),
        (
            "identity key of 64 bytes",
            json!({"identity_key": b64(&[7; 64])}),
            "identity_key",
        ),
        (
            "signed prekey of 16 bytes",
            json!({"signed_prekey": {"id": 3, "key": b64(&[1; 16]), "signature": signature("s")}}),
            "signed_prekey",
        ),
        (
            "signature of 63 bytes",
            json!({"signed_prekey": {"id": 3, "key": good, "signature": b64(&[1; 63])}}),
            "signature",
        ),
        (
            "last-resort signature of 65 bytes",
            json!({"last_resort_prekey": {"id": 3, "key": good, "signature": b64(&[1; 65])}}),
            "signature",
        ),
        (
            "signature not base64",
            json!({"signed_prekey": {"id": 3, "key": good, "signature": "@@@@"}}),
            "signature",
        ),
        (
            "one-time prekey of 31 bytes",
            json!({"one_time_prekeys": [{"id": 20, "key": good}, {"id": 21, "key": b64(&[1; 31])}]}),
            "one_time_prekeys",
        ),
        (
            "one-time prekey not base64",
            json!({"one_time_prekeys": [{"id": 20, "key": "***"}]}),
            "one_time_prekeys",
        ),
        (
            "a one-time id twice in one upload",
            json!({"one_time_prekeys": prekeys(&[30, 31, 30])}),
            "30",
        ),
        (
            "a one-time id stored already",
            json!({"one_time_prekeys": prekeys(&[40, 2])}),
            "2",
        ),
        (
            "more one-time prekeys than an upload takes",
            json!({"one_time_prekeys": prekeys(&too_many)}),
            "1000",
        ),
        (
            "more KeyPackages than an upload takes",
            json!({"key_packages": vec![b64(&[5; 40]); 1001]}),
            "1000",
        ),
        (
            "an empty KeyPackage",
            json!({"key_packages": [b64(&[5; 40]), ""]}),
            "key_packages",
        ),
        (
            "a KeyPackage over 16 KiB",
            json!({"key_packages": [b64(&vec![5; 16 * 1024 + 1])]}),
            "key_packages",
        ),
        (
            "a KeyPackage not base64",
            json!({"key_packages": ["%%%"]}),
            "key_packages",
        ),
        (
            "a last-resort KeyPackage not base64",
            json!({"last_resort_key_package": "%%%"}),
            "last_resort_key_package",
        ),
    ];
    let api = relay.api_of(&owner);
    for (what, body, named) in &cases {
        let refused = api.put(&keys_path(&owner, 1), body).await.unwrap();
        assert_eq!(
            refused.status, 400,
            "{what}: expected 400 KEYS_INVALID, got {}",
            refused.body
        );
        assert_error(&refused, 400, ErrorCode::KeysInvalid);
        let message = refused.body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(named),
            "{what}: the message names {named:?}: {message:?}"
        );
    }
    // Nothing of a refused upload stayed, not even its valid part.
    let record = ok(stored(&relay, &owner, 1).await);
    assert_eq!(counts(&record), (3, 2), "{record}");
    assert_eq!(record["identity_key"], json!(keys.identity_key), "{record}");
    assert_eq!(record["signed_prekey"], keys.signed_prekey, "{record}");
    let record = upload(
        &relay,
        &owner,
        1,
        &json!({"one_time_prekeys": prekeys(&[40])}),
    )
    .await;
    assert_eq!(
        counts(&record),
        (4, 2),
        "prekey 40 of the refused upload was not stored: {record}"
    );

    // A device stores at most 10 000 one-time prekeys.
    for batch in 0..10u32 {
        let ids: Vec<u32> = (batch * 1000..(batch + 1) * 1000).collect();
        let record = upload(
            &relay,
            &owner,
            2,
            &json!({"one_time_prekeys": prekeys(&ids)}),
        )
        .await;
        assert_eq!(counts(&record).0, u64::from(batch + 1) * 1000, "{record}");
    }
    let refused = api
        .put(
            &keys_path(&owner, 2),
            &json!({"one_time_prekeys": prekeys(&[20_000])}),
        )
        .await
        .unwrap();
    assert_error(&refused, 400, ErrorCode::KeysInvalid);
    let record = ok(stored(&relay, &owner, 2).await);
    assert_eq!(counts(&record), (10_000, 0), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_request_malformed() {
    let relay = ControlRelay::start("keys-malformed");
    let owner = common::user(GATEKEEPER, 0x6601);
    let requester = common::user(PARTNER, 0x6602);
    relay.enlist(&owner, &Enlist::default()).await;
    relay.enlist(&requester, &Enlist::default()).await;
    let keys = DeviceKeys::new("malformed", 1..=2, 1);
    upload(&relay, &owner, 1, &keys.body()).await;
    let good = public_key("malformed-good");
    let user = user_hex(&owner);

    let owners = relay.api_of(&owner);
    let raw_uploads: Vec<(&str, String, &[u8])> = vec![
        ("not JSON", keys_path(&owner, 1), b"{\"identity_key\": "),
        ("an empty body", keys_path(&owner, 1), b""),
        ("a JSON array", keys_path(&owner, 1), b"[]"),
        (
            "device not a number",
            format!("/v1/keys/1/{user}/one"),
            b"{}",
        ),
        (
            "device out of range",
            format!("/v1/keys/1/{user}/4294967296"),
            b"{}",
        ),
        ("user not hex", "/v1/keys/1/xyz/1".to_string(), b"{}"),
        (
            "network not a number",
            format!("/v1/keys/gk/{user}/1"),
            b"{}",
        ),
    ];
    for (what, path, body) in raw_uploads {
        let refused = owners
            .call_raw("PUT", &path, Bytes::copy_from_slice(body))
            .await
            .unwrap();
        assert_eq!(refused.status, 400, "{what}: {}", refused.body);
        assert_error(&refused, 400, ErrorCode::RequestMalformed);
    }
    let uploads = [
        (
            "an unknown field",
            json!({"identity_key": good, "colour": "red"}),
        ),
        (
            "an unknown field in a prekey",
            json!({"one_time_prekeys": [{"id": 9, "key": good, "signature": signature("x")}]}),
        ),
        (
            "an unknown field in a signed prekey",
            json!({"signed_prekey": {"id": 1, "key": good, "signature": signature("x"), "extra": 1}}),
        ),
        ("a wrong type", json!({"one_time_prekeys": "many"})),
        (
            "a negative id",
            json!({"one_time_prekeys": [{"id": -1, "key": good}]}),
        ),
        (
            "an id over 32 bits",
            json!({"one_time_prekeys": [{"id": 4_294_967_296_u64, "key": good}]}),
        ),
        (
            "a signed prekey without signature",
            json!({"signed_prekey": {"id": 1, "key": good}}),
        ),
    ];
    for (what, body) in &uploads {
        let refused = owners.put(&keys_path(&owner, 1), body).await.unwrap();
        assert_eq!(refused.status, 400, "{what}: {}", refused.body);
        assert_error(&refused, 400, ErrorCode::RequestMalformed);
    }

    let claimer = relay.api(Who::Partner);
    let raw_claims: [(&str, &[u8]); 2] = [("not JSON", b"{\"requester"), ("an empty body", b"")];
    for (what, body) in raw_claims {
        let refused = claimer
            .call_raw("POST", &claim_path(&owner), Bytes::copy_from_slice(body))
            .await
            .unwrap();
        assert_eq!(refused.status, 400, "{what}: {}", refused.body);
        assert_error(&refused, 400, ErrorCode::RequestMalformed);
    }
    let requester_hex = user_hex(&requester);
    let claims = [
        (
            "an unknown field",
            json!({"requester": requester_hex, "protocol": "signal", "devices": [1]}),
        ),
        (
            "an unknown protocol",
            json!({"requester": requester_hex, "protocol": "otr"}),
        ),
        ("no protocol", json!({"requester": requester_hex})),
        ("no requester", json!({"protocol": "mls"})),
        (
            "a requester not hex",
            json!({"requester": "someone", "protocol": "signal"}),
        ),
        (
            "a requester of 33 digits",
            json!({"requester": "1".repeat(33), "protocol": "signal"}),
        ),
    ];
    for (what, body) in &claims {
        let refused = claimer.post(&claim_path(&owner), body).await.unwrap();
        assert_eq!(refused.status, 400, "{what}: {}", refused.body);
        assert_error(&refused, 400, ErrorCode::RequestMalformed);
    }
    // None of it changed or handed out anything.
    let record = ok(stored(&relay, &owner, 1).await);
    assert_eq!(counts(&record), (2, 1), "{record}");
    assert_eq!(record["identity_key"], json!(keys.identity_key), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_devices_users_and_requesters_are_refused() {
    let relay = ControlRelay::start("keys-unknown");
    let owner = common::user(GATEKEEPER, 0x6701);
    let never_enlisted = common::user(GATEKEEPER, 0x6702);
    let opted_out = common::user(GATEKEEPER, 0x6703);
    let requester = common::user(PARTNER, 0x6704);
    let stranger = common::user(PARTNER, 0x6705);
    let how = Enlist {
        devices: vec![1, 2],
        ..Enlist::default()
    };
    relay.enlist(&owner, &how).await;
    relay.enlist(&opted_out, &how).await;
    relay.enlist(&requester, &Enlist::default()).await;
    let keys = DeviceKeys::new("unknown", 1..=3, 2);
    upload(&relay, &owner, 1, &keys.body()).await;
    upload(&relay, &opted_out, 1, &keys.body()).await;
    ok(relay
        .api(Who::Gatekeeper)
        .delete(&user_path(&opted_out))
        .await
        .unwrap());

    let gatekeeper = relay.api(Who::Gatekeeper);
    // A device not in the user's list, a user not enlisted: nothing to upload to.
    let refused = gatekeeper
        .put(&keys_path(&owner, 3), &keys.body())
        .await
        .unwrap();
    assert_error(&refused, 404, ErrorCode::NotFound);
    let refused = gatekeeper
        .put(&keys_path(&never_enlisted, 1), &keys.body())
        .await
        .unwrap();
    assert_error(&refused, 404, ErrorCode::NotFound);
    let refused = gatekeeper
        .put(&keys_path(&opted_out, 1), &keys.body())
        .await
        .unwrap();
    assert_error(&refused, 404, ErrorCode::NotFound);
    // A listed device without keys yet, and the refused device: no record.
    for device in [2, 3] {
        let missing = stored(&relay, &owner, device).await;
        assert_error(&missing, 404, ErrorCode::NotFound);
    }

    // A claim for a user who is not enlisted: 404, the same whether it ever existed.
    let partner = relay.api(Who::Partner);
    let unknown = claim(&partner, &never_enlisted, &requester, "signal").await;
    assert_error(&unknown, 404, ErrorCode::NotFound);
    let gone = claim(&partner, &opted_out, &requester, "signal").await;
    assert_error(&gone, 404, ErrorCode::NotFound);
    assert_eq!(
        unknown.body, gone.body,
        "a never-enlisted and an opted-out user look the same"
    );
    let gone = claim(&partner, &opted_out, &requester, "mls").await;
    assert_error(&gone, 404, ErrorCode::NotFound);

    // A requester who is not enlisted, or a user of another network posing as one.
    for impostor in [stranger, common::user(PARTNER, owner.user.0)] {
        for protocol in ["signal", "mls"] {
            let refused = claim(&partner, &owner, &impostor, protocol).await;
            assert_error(&refused, 403, ErrorCode::SenderNotEnlisted);
        }
    }
    // The refused claims took nothing.
    let record = ok(stored(&relay, &owner, 1).await);
    assert_eq!(counts(&record), (3, 2), "{record}");
}

/// Polls the pending requests of `api`'s network for one from `sender` to `recipient`, for
/// up to `wait`.
async fn pending_request(
    api: &ControlClient,
    sender: &UserAddress,
    recipient: &UserAddress,
    wait: Duration,
) -> Option<Value> {
    let deadline = Instant::now() + wait;
    loop {
        let body = ok(api.get("/v1/requests?state=pending").await.unwrap());
        let found = body["requests"]
            .as_array()
            .unwrap_or_else(|| panic!("requests in {body}"))
            .iter()
            .find(|r| {
                r["recipient"]["network"] == recipient.network.0
                    && r["recipient"]["user"] == user_hex(recipient)
                    && r["sender"]["network"] == sender.network.0
                    && r["sender"]["user"] == user_hex(sender)
            })
            .cloned();
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_a_first_contact_under_the_consent_model() {
    let relay = ControlRelay::start("keys-request");
    let recipient = common::user(GATEKEEPER, 0x6801);
    let stranger = common::user(PARTNER, 0x6802);
    relay
        .enlist(
            &recipient,
            &Enlist {
                model: "request_always",
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&stranger, &Enlist::default()).await;
    let keys = DeviceKeys::new("request", 1..=2, 2);
    upload(&relay, &recipient, 1, &keys.body()).await;

    let partner = relay.api(Who::Partner);
    for protocol in ["signal", "mls", "signal"] {
        let refused = claim(&partner, &recipient, &stranger, protocol).await;
        assert_error(&refused, 403, ErrorCode::MessageRequestPending);
    }
    let record = ok(stored(&relay, &recipient, 1).await);
    assert_eq!(
        counts(&record),
        (2, 2),
        "a claim held back hands out nothing: {record}"
    );

    // The recipient's network sees the request (stored asynchronously), the other does not.
    let gatekeeper = relay.api(Who::Gatekeeper);
    let request = pending_request(&gatekeeper, &stranger, &recipient, SETTLE)
        .await
        .expect("the recipient's network sees a pending request for the claim");
    let all = ok(gatekeeper.get("/v1/requests?state=pending").await.unwrap());
    let same: Vec<&Value> = all["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["recipient"]["user"] == user_hex(&recipient)
                && r["sender"]["user"] == user_hex(&stranger)
        })
        .collect();
    assert_eq!(same.len(), 1, "three claims, one request: {all}");
    assert!(
        pending_request(&partner, &stranger, &recipient, Duration::ZERO)
            .await
            .is_none(),
        "the sender's network does not see the recipient's requests"
    );

    let id = request["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("id in {request}"));
    ok(gatekeeper
        .post(&format!("/v1/requests/{id}/accept"), &json!({}))
        .await
        .unwrap());
    let body = ok(claim(&partner, &recipient, &stranger, "signal").await);
    let list = bundles(&body);
    assert_eq!(list.len(), 1, "{body}");
    assert!(!is_last_resort(&list[0]), "{body}");
    let (id, key) = one_time_of(&list[0]);
    assert_eq!(keys.one_time.get(&id), Some(&key), "{body}");
    let body = ok(claim(&partner, &recipient, &stranger, "mls").await);
    let list = bundles(&body);
    assert_eq!(list.len(), 1, "{body}");
    assert!(
        keys.key_packages.contains(&key_package_of(&list[0])),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoever_claims_first_consents_to_be_claimed_back() {
    let relay = ControlRelay::start("keys-contact");
    let careful = common::user(PARTNER, 0x6901);
    let open = common::user(GATEKEEPER, 0x6902);
    let other = common::user(GATEKEEPER, 0x6903);
    let guarded = Enlist {
        model: "request_always",
        ..Enlist::default()
    };
    relay.enlist(&careful, &guarded).await;
    relay.enlist(&open, &Enlist::default()).await;
    relay.enlist(&other, &Enlist::default()).await;
    upload(
        &relay,
        &careful,
        1,
        &DeviceKeys::new("contact-careful", 1..=3, 1).body(),
    )
    .await;
    upload(
        &relay,
        &open,
        1,
        &DeviceKeys::new("contact-open", 1..=3, 1).body(),
    )
    .await;

    let gatekeeper = relay.api(Who::Gatekeeper);
    let refused = claim(&gatekeeper, &careful, &open, "signal").await;
    assert_error(&refused, 403, ErrorCode::MessageRequestPending);
    // The careful user claims the open user's keys: a first contact it makes itself.
    let body = ok(claim(&relay.api(Who::Partner), &open, &careful, "signal").await);
    assert_eq!(bundles(&body).len(), 1, "{body}");
    // Now the open user may claim back; another user of the same network still may not.
    let body = ok(claim(&gatekeeper, &careful, &open, "signal").await);
    let list = bundles(&body);
    assert_eq!(list.len(), 1, "{body}");
    assert!(!is_last_resort(&list[0]), "{body}");
    let refused = claim(&gatekeeper, &careful, &other, "signal").await;
    assert_error(&refused, 403, ErrorCode::MessageRequestPending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_out_deletes_the_users_keys() {
    let relay = ControlRelay::start("keys-opt-out");
    let owner = common::user(GATEKEEPER, 0x6a01);
    let requester = common::user(PARTNER, 0x6a02);
    let how = Enlist {
        devices: vec![1, 2],
        ..Enlist::default()
    };
    relay.enlist(&owner, &how).await;
    relay.enlist(&requester, &Enlist::default()).await;
    for device in [1, 2] {
        let keys = DeviceKeys::new(&format!("opt-out-{device}"), 1..=3, 2);
        upload(&relay, &owner, device, &keys.body()).await;
    }
    let partner = relay.api(Who::Partner);
    let body = ok(claim(&partner, &owner, &requester, "signal").await);
    assert_eq!(bundles(&body).len(), 2, "{body}");

    ok(relay
        .api(Who::Gatekeeper)
        .delete(&user_path(&owner))
        .await
        .unwrap());
    for protocol in ["signal", "mls"] {
        let gone = claim(&partner, &owner, &requester, protocol).await;
        assert_error(&gone, 404, ErrorCode::NotFound);
    }
    for device in [1, 2] {
        let gone = stored(&relay, &owner, device).await;
        assert_error(&gone, 404, ErrorCode::NotFound);
    }

    // Enlisted again, the user starts without keys: none of the old ones comes back.
    relay.enlist(&owner, &how).await;
    for protocol in ["signal", "mls"] {
        let body = ok(claim(&partner, &owner, &requester, protocol).await);
        assert_eq!(bundles(&body), Vec::<Value>::new(), "no keys left: {body}");
    }
    for device in [1, 2] {
        let gone = stored(&relay, &owner, device).await;
        assert_error(&gone, 404, ErrorCode::NotFound);
        // The old one-time ids are free again, and the stock is only the new upload.
        let keys = DeviceKeys::new(&format!("opt-out-again-{device}"), 1..=3, 1);
        let record = upload(&relay, &owner, device, &keys.body()).await;
        assert_eq!(counts(&record), (3, 1), "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_device_forgets_its_keys() {
    let relay = ControlRelay::start("keys-device-removed");
    let owner = common::user(PARTNER, 0x6b01);
    let requester = common::user(GATEKEEPER, 0x6b02);
    relay
        .enlist(
            &owner,
            &Enlist {
                devices: vec![1, 2],
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&requester, &Enlist::default()).await;
    for device in [1, 2] {
        let keys = DeviceKeys::new(&format!("removed-{device}"), 1..=3, 2);
        upload(&relay, &owner, device, &keys.body()).await;
    }
    let partners = relay.api(Who::Partner);
    let devices = format!("{}/devices", user_path(&owner));
    ok(partners
        .put(&devices, &json!({"devices": [1]}))
        .await
        .unwrap());

    let gone = stored(&relay, &owner, 2).await;
    assert_error(&gone, 404, ErrorCode::NotFound);
    let refused = partners
        .put(
            &keys_path(&owner, 2),
            &DeviceKeys::new("late", 7..=8, 1).body(),
        )
        .await
        .unwrap();
    assert_error(&refused, 404, ErrorCode::NotFound);
    let gatekeeper = relay.api(Who::Gatekeeper);
    for protocol in ["signal", "mls"] {
        let body = ok(claim(&gatekeeper, &owner, &requester, protocol).await);
        let list = bundles(&body);
        assert_eq!(
            list.iter().map(device_of).collect::<Vec<_>>(),
            [1],
            "only the remaining device: {body}"
        );
    }

    // The id comes back (a new device): it starts with its own keys only.
    ok(partners
        .put(&devices, &json!({"devices": [1, 2]}))
        .await
        .unwrap());
    let gone = stored(&relay, &owner, 2).await;
    assert_error(&gone, 404, ErrorCode::NotFound);
    let fresh = DeviceKeys::new("removed-new-2", 11..=13, 1);
    let record = upload(&relay, &owner, 2, &fresh.body()).await;
    assert_eq!(
        counts(&record),
        (3, 1),
        "the removed device's one-time keys were forgotten: {record}"
    );
    let body = ok(claim(&gatekeeper, &owner, &requester, "signal").await);
    for bundle in bundles(&body).iter().filter(|b| device_of(b) == 2) {
        let (id, key) = one_time_of(bundle);
        assert_eq!(
            fresh.one_time.get(&id),
            Some(&key),
            "the new device's prekey, not the removed one's: {bundle}"
        );
    }
}

/// Claims are limited per (requester, target): draining someone's one-time keys is refused
/// with RATE_LIMITED and a hint, and the keys left stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_one_users_keys_is_rate_limited() {
    let relay = ControlRelay::start_configured("keys-drain", |config| {
        config.interop.key_claims_per_pair_per_day = 3;
    });
    let owner = common::user(GATEKEEPER, 0x6301);
    let requester = common::user(PARTNER, 0x6302);
    relay.enlist(&owner, &Enlist::default()).await;
    relay.enlist(&requester, &Enlist::default()).await;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let upload = serde_json::json!({
        "identity_key": b64(&[1; 32]),
        "signed_prekey": {"id": 1, "key": b64(&[2; 32]), "signature": b64(&[3; 64])},
        "one_time_prekeys": (1..=10).map(|id| serde_json::json!({"id": id, "key": b64(&[4; 32])})).collect::<Vec<_>>(),
    });
    ok(relay
        .api(Who::Gatekeeper)
        .put(
            &format!("/v1/keys/1/{}/1", client::control::user_hex(&owner)),
            &upload,
        )
        .await
        .unwrap());
    let claim = serde_json::json!({"requester": client::control::user_hex(&requester), "protocol": "signal"});
    let path = format!("/v1/keys/1/{}/claim", client::control::user_hex(&owner));
    for _ in 0..3 {
        ok(relay.api(Who::Partner).post(&path, &claim).await.unwrap());
    }
    let refused = relay.api(Who::Partner).post(&path, &claim).await.unwrap();
    assert_error(&refused, 429, client::ErrorCode::RateLimited);
    assert!(refused.retry_after_s.is_some_and(|s| s > 0));
    let left = ok(relay
        .api(Who::Gatekeeper)
        .get(&format!(
            "/v1/keys/1/{}/1",
            client::control::user_hex(&owner)
        ))
        .await
        .unwrap());
    assert_eq!(left["one_time_prekeys"], 7);
}
