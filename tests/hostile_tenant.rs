//! Hostile tenants, over real sockets: one network trying to grow the relay without bound or
//! to exhaust what every network shares. Each test has the attacker push past a small bound
//! and then checks that the relay limited it (with its own code) and that the others, the
//! gatekeeper included, are still served.

mod common;

use base64::Engine as _;
use client::control::{ApiResponse, ControlClient, user_hex};
use client::{AckStatus, ErrorCode, Role, UserAddress};
use common::control::{ControlRelay, Enlist, Who, assert_error, ok};
use common::{GATEKEEPER, PARTNER, STEP_TIMEOUT, Session};
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

/// The rejected code of a device list's `Ack`, or `None` when it was accepted.
async fn declared(session: &mut Session, user: u128, devices: &[u32]) -> Option<u16> {
    match session
        .declare_status(common::user(PARTNER, user), devices)
        .await
    {
        AckStatus::Accepted => None,
        AckStatus::Rejected { code, .. } => Some(code),
    }
}

/// A device session of a partner user, with a fresh token signed by the partner's key.
async fn device_session(relay: &ControlRelay, user: u128, token_id: u128) -> Session {
    let key = std::fs::read(relay.pki("partner-token.pk8")).expect("the partner's token key");
    let device = common::device(PARTNER, user, 1);
    let token = client::mint_device_token(&key, device, common::now_ms() + 600_000, token_id)
        .expect("a token");
    let options = client::ConnectOptions::new(relay.addr, relay.tls(None), Role::Device)
        .token(token)
        .connect_timeout(STEP_TIMEOUT);
    let conn = client::connect(options).await.expect("the device connects");
    Session::new(format!("device of {user:x}"), conn)
}

/// Issue 11, item 5: the partner declares new users of its own network past its cap (the
/// configured default, then its record's), through `DeviceList` frames and a device session.
/// Past the cap each is refused with `NETWORK_USER_LIMIT`, over both shards together, while
/// the gatekeeper declares its own users; after a restart the count is the same (no user
/// admitted before is lost, none more is let in), and the operator's device-set rate holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_is_held_to_its_caps_across_shards_and_restarts() {
    let caps = |config: &mut relay::config::Config| {
        config.limits.network_users_max = 40;
        config.limits.network_devices_max = 1000;
    };
    let mut relay = ControlRelay::start_configured("tenant-caps", caps);
    let mut partner = relay.session(PARTNER).await;
    let mut refused = 0;
    for user in 0..100u128 {
        match declared(&mut partner, 0x5000 + user, &[1]).await {
            None => {}
            Some(code) => {
                assert_eq!(code, ErrorCode::NetworkUserLimit.as_u16());
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 60, "40 users fit, over both shards together");
    // An admitted user's devices change within the device cap.
    assert_eq!(declared(&mut partner, 0x5000, &[1, 2, 3]).await, None);
    // The gatekeeper's users are its own.
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    for user in 0..10u128 {
        gatekeeper
            .declare(common::user(GATEKEEPER, 0x6000 + user), &[1])
            .await;
    }
    // A device session of a new partner user is closed with the code.
    let mut device = device_session(&relay, 0x5999, 1).await;
    device.expect_error(ErrorCode::NetworkUserLimit).await;
    // So is an enlistment through the control API that would add a user.
    let enlisted = relay
        .try_enlist(&common::user(PARTNER, 0x5998), &Enlist::default())
        .await;
    assert_error(&enlisted, 403, ErrorCode::NetworkUserLimit);
    let metrics = relay.metrics().await;
    for (line, value) in [
        ("relay_network_users{network=\"2\"}", 40),
        ("relay_network_devices{network=\"2\"}", 42),
        ("relay_network_users{network=\"1\"}", 10),
        ("relay_network_users_max{network=\"2\"}", 40),
        (
            "relay_network_cap_refused_total{network=\"2\",cap=\"users\"}",
            62,
        ),
    ] {
        assert!(
            metrics.contains(&format!("{line} {value}\n")),
            "{line} {value} in:\n{metrics}"
        );
    }

    // The operator raises the partner's cap in its record: five more fit.
    let raised = ok(relay
        .api(Who::Operator)
        .put("/v1/partners/2/limits", &json!({"users_max": 45}))
        .await
        .unwrap());
    assert_eq!(raised["limits"]["users_max"], 45);
    let admitted = declare_new(&mut partner, 0x5100, 10).await;
    assert_eq!(admitted, 5);
    drop((partner, gatekeeper, device));

    // A restart rebuilds the count from the log: the 45 are there, no 46th gets in.
    relay.restart(caps);
    let mut partner = relay.session(PARTNER).await;
    assert_eq!(declare_new(&mut partner, 0x5200, 10).await, 0);
    assert_eq!(declared(&mut partner, 0x5000, &[1, 2]).await, None);
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("relay_network_users{network=\"2\"} 45\n"),
        "{metrics}"
    );

    // Device-set changes past the record's rate are refused with a hint, and pass again.
    ok(relay
        .api(Who::Operator)
        .put(
            "/v1/partners/2/limits",
            &json!({"users_max": 45, "device_set_changes_per_s": 5}),
        )
        .await
        .unwrap());
    let mut limited = None;
    for n in 0..20u32 {
        let list = client::DeviceList {
            request_id: common::new_id(),
            user: common::user(PARTNER, 0x5000),
            devices: vec![client::DeviceId(1 + n % 2)],
        };
        partner.send_device_list(&list).await;
        let ack = partner.expect_ack(list.request_id).await;
        if let AckStatus::Rejected {
            code,
            retry_after_ms,
            ..
        } = ack.status
        {
            assert_eq!(code, ErrorCode::DeviceSetRateLimited.as_u16());
            assert!(retry_after_ms > 0 && retry_after_ms <= 1000);
            limited = Some((n, retry_after_ms));
            break;
        }
    }
    let (n, wait_ms) = limited.expect("the rate holds");
    assert!(n >= 5, "a second's worth passes at once, {n} did");
    tokio::time::sleep(std::time::Duration::from_millis(u64::from(wait_ms) + 50)).await;
    assert_eq!(declared(&mut partner, 0x5000, &[1]).await, None);
}

/// Declares `count` new partner users from `first` on; how many were admitted.
async fn declare_new(session: &mut Session, first: u128, count: u128) -> usize {
    let mut admitted = 0;
    for user in first..first + count {
        match declared(session, user, &[1]).await {
            None => admitted += 1,
            Some(code) => assert_eq!(code, ErrorCode::NetworkUserLimit.as_u16()),
        }
    }
    admitted
}

/// Connects a device session of `device` with `token`.
async fn connect_device(
    relay: &ControlRelay,
    token: client::DeviceToken,
) -> Result<client::Connection, client::ClientError> {
    let options = client::ConnectOptions::new(relay.addr, relay.tls(None), Role::Device)
        .token(token)
        .connect_timeout(STEP_TIMEOUT);
    client::connect(options).await
}

#[track_caller]
fn assert_replayed(outcome: Result<client::Connection, client::ClientError>) {
    match outcome {
        Err(client::ClientError::Refused { code, .. })
            if code == ErrorCode::TokenReplayed.as_u16() => {}
        Err(other) => panic!("expected TOKEN_REPLAYED, got {other:?}"),
        Ok(conn) => panic!(
            "expected TOKEN_REPLAYED, the relay welcomed the session: {:?}",
            conn.welcome()
        ),
    }
}

/// Issue 11, item 7 (replay): a device token used once, and one refused as a replay, stay
/// refused as `TOKEN_REPLAYED` after the relay restarts on its data directory; a fresh
/// token is welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_device_token_stays_refused_after_a_restart() {
    let mut relay = ControlRelay::start("tenant-token-replay");
    let key = std::fs::read(relay.pki("partner-token.pk8")).expect("the partner's token key");
    let mint = |user: u128, id: u128| {
        let device = common::device(PARTNER, user, 1);
        client::mint_device_token(&key, device, common::now_ms() + 600_000, id).expect("a token")
    };
    let replayed = mint(0x7701, 0xA7_0001);
    let used_once = mint(0x7702, 0xA7_0002);
    let first = connect_device(&relay, replayed.clone())
        .await
        .expect("a fresh token is welcome");
    assert_replayed(connect_device(&relay, replayed.clone()).await);
    let second = connect_device(&relay, used_once.clone())
        .await
        .expect("a fresh token is welcome");
    drop((first, second));

    relay.restart(|_| {});
    assert_replayed(connect_device(&relay, replayed).await);
    assert_replayed(connect_device(&relay, used_once).await);
    let _fresh = connect_device(&relay, mint(0x7701, 0xA7_0003))
        .await
        .expect("a fresh token is still welcome");
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("relay_token_journal_restored 2\n"),
        "{metrics}"
    );
}
