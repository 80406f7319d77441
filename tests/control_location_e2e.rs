//! The location rule end to end, over real sockets (issue point 5): users of either network
//! meet it with an EEA attestation inside the window and are refused on the data plane
//! without one (as recipient and as sender alike); a user who falls outside is told (a
//! `Notice` on its network's server session, an event in its network's feed) before it is
//! refused, and is reachable again, without re-enlisting, once attested in the EEA; the rule
//! can be off; attestations are validated and only the user's own network may post them.

mod common;

use std::time::Duration;

use client::codec::NoticeKind;
use client::control::{ApiResponse, user_hex};
use client::{AckStatus, DeviceAddress, DeviceId, ErrorCode, Event, Notice, UserAddress};
use common::control::{ControlRelay, Enlist, Who, assert_error, ok, user_path};
use common::{GATEKEEPER, PARTNER, STEP_TIMEOUT, Session, envelope, now_ms, probe, user};
use relay::control::location::LocationRule;
use serde_json::{Value, json};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Enlisted (model "everyone"), seen in `country` `ago_ms` ago, or never seen.
fn seen(location: Option<(&'static str, u64)>) -> Enlist {
    Enlist {
        location,
        ..Enlist::default()
    }
}

fn user_json(user: &UserAddress) -> Value {
    json!({"network": user.network.0, "user": user_hex(user)})
}

async fn attest(
    relay: &ControlRelay,
    who: Who,
    user: &UserAddress,
    country: &str,
    observed_at_ms: u64,
) -> ApiResponse {
    relay
        .api(who)
        .post(
            &format!("{}/locations", user_path(user)),
            &json!({"country": country, "observed_at_ms": observed_at_ms}),
        )
        .await
        .expect("location call")
}

/// The user as its own network reads it.
async fn record(relay: &ControlRelay, user: &UserAddress) -> Value {
    ok(relay.api_of(user).get(&user_path(user)).await.unwrap())
}

/// Sends an envelope from `from` (device 1) to `to` on `session` and expects it accepted.
async fn send_ok(session: &mut Session, from: UserAddress, to: UserAddress) {
    let env = envelope(from.device(DeviceId(1)), to);
    session.send_accepted(&env, b"within the rule").await;
}

/// Sends an envelope from `from` to `to` on `session` and expects it refused with `code`.
async fn send_refused(session: &mut Session, from: UserAddress, to: UserAddress, code: ErrorCode) {
    let env = envelope(from.device(DeviceId(1)), to);
    session.send_envelope(&env, b"outside the rule").await;
    session.expect_rejected(env.message_id, code).await;
}

/// Sends `from` → `to` on `sender`, expects it accepted and delivered to `to` on `receiver`.
async fn round(sender: &mut Session, receiver: &mut Session, from: UserAddress, to: UserAddress) {
    let env = envelope(from.device(DeviceId(1)), to);
    sender.send_accepted(&env, b"delivered").await;
    let delivered = receiver.expect_delivery().await;
    assert_eq!(delivered.device, to.device(DeviceId(1)));
    assert_eq!(delivered.envelope().0, &env);
    receiver.ack_delivery(&delivered).await;
}

/// The next event on `session` must be a location notice about `user`.
async fn expect_location_notice(session: &mut Session, user: UserAddress) -> Notice {
    match session.event().await {
        Event::Notice(notice) => {
            assert_eq!(notice.kind, NoticeKind::LocationChange, "{notice:?}");
            assert_eq!(notice.audience, Some(user), "{notice:?}");
            assert!(!notice.text.is_empty(), "a notice says why: {notice:?}");
            notice
        }
        other => panic!(
            "{}: expected the location notice for {user}, got {other:?}",
            session.name
        ),
    }
}

/// The `location_changed` events about `user` in the feed of `who`'s network, oldest first
/// (their `in_region`).
async fn location_events(relay: &ControlRelay, who: Who, user: &UserAddress) -> Vec<bool> {
    let feed = ok(relay.api(who).get("/v1/events?after=0").await.unwrap());
    feed["events"]
        .as_array()
        .unwrap_or_else(|| panic!("an event feed: {feed}"))
        .iter()
        .filter(|e| e["kind"] == "location_changed" && e["data"]["user"] == user_json(user))
        .map(|e| {
            e["data"]["in_region"]
                .as_bool()
                .unwrap_or_else(|| panic!("in_region: {e}"))
        })
        .collect()
}

/// Acks the deliveries of envelopes accepted for `recipient` (their Acks already read) that
/// are still arriving on `session`, up to a probe sent to it now as `sender`, of its own
/// network: queued behind them, the probe's delivery ends the drain, and anything else on the
/// way (a notice, another frame) fails it.
async fn drain_deliveries(session: &mut Session, sender: DeviceAddress, recipient: UserAddress) {
    let probe = envelope(sender, recipient);
    session.send_envelope(&probe, b"probe").await;
    let (mut acked, mut probed) = (false, false);
    while !(acked && probed) {
        match session.event().await {
            Event::Ack(ack) if ack.message_id == probe.message_id => {
                assert_eq!(ack.status, AckStatus::Accepted, "the probe");
                acked = true;
            }
            Event::Delivery { device, inner, .. } if !probed => {
                assert_eq!(device, recipient.device(DeviceId(1)));
                let id = inner.ack_id().expect("an envelope");
                session.ack(id, device).await;
                probed = id == probe.message_id;
            }
            other => panic!("{}: expected nothing more, got {other:?}", session.name),
        }
    }
}

// --- who meets the rule ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_binds_users_of_both_networks_as_recipient_and_as_sender() {
    // The default rule: an EEA attestation within the last 120 days.
    let relay = ControlRelay::start("location-both-ways");
    let gk_in = user(GATEKEEPER, 0x1A01_0001);
    let p_in = user(PARTNER, 0x1A01_0002);
    let p_edge = user(PARTNER, 0x1A01_0003);
    let gk_stale = user(GATEKEEPER, 0x1A01_0004);
    let p_stale = user(PARTNER, 0x1A01_0005);
    let gk_never = user(GATEKEEPER, 0x1A01_0006);
    let p_never = user(PARTNER, 0x1A01_0007);
    let gk_abroad = user(GATEKEEPER, 0x1A01_0008);
    let p_abroad = user(PARTNER, 0x1A01_0009);
    relay.enlist(&gk_in, &seen(Some(("DE", 0)))).await;
    relay.enlist(&p_in, &seen(Some(("FR", DAY_MS)))).await;
    relay
        .enlist(&p_edge, &seen(Some(("NO", 119 * DAY_MS))))
        .await;
    relay
        .enlist(&gk_stale, &seen(Some(("DE", 130 * DAY_MS))))
        .await;
    relay
        .enlist(&p_stale, &seen(Some(("IT", 130 * DAY_MS))))
        .await;
    relay.enlist(&gk_never, &seen(None)).await;
    relay.enlist(&p_never, &seen(None)).await;
    // Seen just now, but outside the EEA (and never inside).
    relay.enlist(&gk_abroad, &seen(Some(("US", 0)))).await;
    relay.enlist(&p_abroad, &seen(Some(("GB", 0)))).await;
    for (who, inside) in [
        (gk_in, true),
        (p_in, true),
        (p_edge, true),
        (gk_stale, false),
        (p_stale, false),
        (gk_never, false),
        (p_never, false),
        (gk_abroad, false),
        (p_abroad, false),
    ] {
        assert_eq!(
            record(&relay, &who).await["in_region"],
            json!(inside),
            "{who}"
        );
    }

    let mut gk = relay.session(GATEKEEPER).await;
    let mut partner = relay.session(PARTNER).await;
    // Inside the window: reachable both ways.
    round(&mut gk, &mut partner, gk_in, p_in).await;
    round(&mut partner, &mut gk, p_in, gk_in).await;
    round(&mut gk, &mut partner, gk_in, p_edge).await;
    round(&mut partner, &mut gk, p_edge, gk_in).await;

    // Partner users outside: refused as recipients (gatekeeper → them) and as senders.
    for out in [p_stale, p_never, p_abroad] {
        send_refused(&mut gk, gk_in, out, ErrorCode::RecipientOutsideRegion).await;
        send_refused(&mut partner, out, gk_in, ErrorCode::SenderOutsideRegion).await;
    }
    // Gatekeeper users outside: exactly the same.
    for out in [gk_stale, gk_never, gk_abroad] {
        send_refused(&mut partner, p_in, out, ErrorCode::RecipientOutsideRegion).await;
        send_refused(&mut gk, out, p_in, ErrorCode::SenderOutsideRegion).await;
    }
    // Within one network the rule does not apply (that is not interop): the same session
    // gets the Ack and the delivery, in either order.
    let internal = envelope(gk_stale.device(DeviceId(1)), gk_in);
    gk.send_envelope(&internal, b"internal").await;
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        match gk.event().await {
            Event::Ack(ack) if ack.message_id == internal.message_id => {
                assert_eq!(ack.status, AckStatus::Accepted, "within one network");
                acked = true;
            }
            Event::Delivery { device, inner, .. } => {
                assert_eq!(inner.ack_id(), Some(internal.message_id));
                gk.ack(internal.message_id, device).await;
                delivered = true;
            }
            other => panic!("within one network: unexpected {other:?}"),
        }
    }

    // Nothing came of the refused envelopes. Those refused for their sender: a probe on
    // their path (same session, same recipient) arrives next.
    probe(&mut gk, gk_in.device(DeviceId(1)), &mut partner, p_in, &[1]).await;
    probe(&mut partner, p_in.device(DeviceId(1)), &mut gk, gk_in, &[1]).await;
    // Those refused for their recipient: their path opens only once the recipient meets the
    // rule again; its network attests it and is told so, then the probe goes their way.
    for out in [p_stale, p_never, p_abroad] {
        ok(attest(&relay, Who::Partner, &out, "SE", now_ms()).await);
        expect_location_notice(&mut partner, out).await;
        probe(&mut gk, gk_in.device(DeviceId(1)), &mut partner, out, &[1]).await;
    }
    for out in [gk_stale, gk_never, gk_abroad] {
        ok(attest(&relay, Who::Gatekeeper, &out, "DE", now_ms()).await);
        expect_location_notice(&mut gk, out).await;
        probe(&mut partner, p_in.device(DeviceId(1)), &mut gk, out, &[1]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_is_configurable() {
    let relay = ControlRelay::start_configured("location-window", |config| {
        config.interop.location = LocationRule::Eea { window_days: 60 };
    });
    let gk_in = user(GATEKEEPER, 0x1A02_0001);
    let p_recent = user(PARTNER, 0x1A02_0002);
    let p_old = user(PARTNER, 0x1A02_0003);
    let gk_old = user(GATEKEEPER, 0x1A02_0004);
    relay.enlist(&gk_in, &seen(Some(("DE", 0)))).await;
    relay
        .enlist(&p_recent, &seen(Some(("AT", 50 * DAY_MS))))
        .await;
    // Inside the default 120 days, outside this relay's 60.
    relay.enlist(&p_old, &seen(Some(("AT", 70 * DAY_MS)))).await;
    relay
        .enlist(&gk_old, &seen(Some(("DE", 61 * DAY_MS))))
        .await;

    let mut gk = relay.session(GATEKEEPER).await;
    let mut partner = relay.session(PARTNER).await;
    round(&mut gk, &mut partner, gk_in, p_recent).await;
    round(&mut partner, &mut gk, p_recent, gk_in).await;
    send_refused(&mut gk, gk_in, p_old, ErrorCode::RecipientOutsideRegion).await;
    send_refused(&mut partner, p_old, gk_in, ErrorCode::SenderOutsideRegion).await;
    send_refused(
        &mut partner,
        p_recent,
        gk_old,
        ErrorCode::RecipientOutsideRegion,
    )
    .await;
    send_refused(&mut gk, gk_old, p_recent, ErrorCode::SenderOutsideRegion).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_rule_off_users_without_attestations_are_reachable() {
    let relay = ControlRelay::start_configured("location-off", |config| {
        config.interop.location = LocationRule::Off;
    });
    let gk_never = user(GATEKEEPER, 0x1A03_0001);
    let p_never = user(PARTNER, 0x1A03_0002);
    let p_abroad = user(PARTNER, 0x1A03_0003);
    let gk_stale = user(GATEKEEPER, 0x1A03_0004);
    relay.enlist(&gk_never, &seen(None)).await;
    relay.enlist(&p_never, &seen(None)).await;
    relay.enlist(&p_abroad, &seen(Some(("US", 0)))).await;
    relay
        .enlist(&gk_stale, &seen(Some(("DE", 400 * DAY_MS))))
        .await;
    let mut gk = relay.session(GATEKEEPER).await;
    let mut partner = relay.session(PARTNER).await;
    round(&mut gk, &mut partner, gk_never, p_never).await;
    round(&mut partner, &mut gk, p_never, gk_never).await;
    round(&mut partner, &mut gk, p_abroad, gk_stale).await;
    round(&mut gk, &mut partner, gk_stale, p_abroad).await;
    // An attestation outside the EEA changes nothing either (no notice: the round's delivery
    // comes next, on the notice's way to the partner).
    ok(attest(&relay, Who::Partner, &p_never, "US", now_ms()).await);
    round(&mut gk, &mut partner, gk_never, p_never).await;
    // Nothing more on any path used.
    for (from, to) in [(gk_never, p_never), (gk_stale, p_abroad)] {
        probe(&mut gk, from.device(DeviceId(1)), &mut partner, to, &[1]).await;
    }
    for (from, to) in [(p_never, gk_never), (p_abroad, gk_stale)] {
        probe(&mut partner, from.device(DeviceId(1)), &mut gk, to, &[1]).await;
    }
}

// --- falling outside, and coming back ---

/// How long before the lapse the attestation that is about to lapse is enlisted with.
const LAPSES_IN_MS: u64 = 4_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_standing_lapses_is_told_before_it_is_refused_and_can_come_back() {
    // The periodic sweep finds the lapse; the user's network learns of it on its server
    // session before any envelope of or to the user is refused.
    let relay = ControlRelay::start_configured("location-lapse", |config| {
        config.interop.location_sweep_s = 1;
    });
    let gk_user = user(GATEKEEPER, 0x1A04_0001);
    let leaving = user(PARTNER, 0x1A04_0002);
    relay.enlist(&gk_user, &seen(Some(("DE", 0)))).await;
    // Both sessions run before the user's standing can lapse, so none of it is missed.
    let mut gk = relay.session(GATEKEEPER).await;
    let mut partner = relay.session(PARTNER).await;
    relay
        .enlist(&leaving, &seen(Some(("DE", 120 * DAY_MS - LAPSES_IN_MS))))
        .await;
    assert_eq!(record(&relay, &leaving).await["in_region"], json!(true));

    // Traffic both ways until both directions are refused. On the partner's session (the
    // leaving user's network) the notice must come before the first refusal.
    let mut notice: Option<Notice> = None;
    let mut refused_as_recipient = false;
    let mut refused_as_sender = false;
    let deadline = tokio::time::Instant::now() + 3 * STEP_TIMEOUT;
    while !(refused_as_recipient && refused_as_sender) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lapsed standing was never applied (notice: {notice:?}, refused as recipient: \
             {refused_as_recipient}, as sender: {refused_as_sender})"
        );
        let from_partner = envelope(leaving.device(DeviceId(1)), gk_user);
        partner.send_envelope(&from_partner, b"outbound").await;
        let to_partner = envelope(gk_user.device(DeviceId(1)), leaving);
        gk.send_envelope(&to_partner, b"inbound").await;

        // The gatekeeper's session: deliveries of the partner user's envelopes, and the Ack.
        loop {
            match gk.event().await {
                Event::Delivery { device, inner, .. } => {
                    let id = inner.ack_id().expect("an envelope");
                    gk.ack(id, device).await;
                }
                Event::Ack(ack) if ack.message_id == to_partner.message_id => {
                    match ack.status {
                        AckStatus::Accepted => {}
                        AckStatus::Rejected { code, .. }
                            if code == ErrorCode::RecipientOutsideRegion.as_u16() =>
                        {
                            refused_as_recipient = true;
                        }
                        other => panic!("to the leaving user: unexpected {other:?}"),
                    }
                    break;
                }
                other => panic!("gatekeeper session: unexpected {other:?}"),
            }
        }
        // The partner's session: deliveries to the leaving user, the notice, and the Ack.
        loop {
            match partner.event().await {
                Event::Delivery { device, inner, .. } => {
                    assert_eq!(device, leaving.device(DeviceId(1)));
                    let id = inner.ack_id().expect("an envelope");
                    partner.ack(id, device).await;
                }
                Event::Notice(got) => {
                    assert!(notice.is_none(), "one notice per change: {got:?}");
                    assert_eq!(got.kind, NoticeKind::LocationChange, "{got:?}");
                    assert_eq!(got.audience, Some(leaving), "{got:?}");
                    assert_ne!(
                        got.code, 0,
                        "falling outside carries a reason code: {got:?}"
                    );
                    assert!(!got.text.is_empty());
                    notice = Some(got);
                }
                Event::Ack(ack) if ack.message_id == from_partner.message_id => {
                    match ack.status {
                        AckStatus::Accepted => {}
                        AckStatus::Rejected { code, .. }
                            if code == ErrorCode::SenderOutsideRegion.as_u16() =>
                        {
                            assert!(
                                notice.is_some(),
                                "the leaving user's envelope was refused before its network \
                                 got the notice"
                            );
                            refused_as_sender = true;
                        }
                        other => panic!("from the leaving user: unexpected {other:?}"),
                    }
                    break;
                }
                other => panic!("partner session: unexpected {other:?}"),
            }
        }
        if !(refused_as_recipient && refused_as_sender) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(notice.is_some());
    // Nothing else is on its way (deliveries of envelopes accepted before the change aside):
    // no second notice, no stray frame.
    let gk_neighbour = user(GATEKEEPER, 0x1A04_0003).device(DeviceId(1));
    drain_deliveries(&mut gk, gk_neighbour, gk_user).await;
    let p_neighbour = user(PARTNER, 0x1A04_0004).device(DeviceId(1));
    drain_deliveries(&mut partner, p_neighbour, leaving).await;
    assert_eq!(record(&relay, &leaving).await["in_region"], json!(false));
    assert_eq!(
        location_events(&relay, Who::Partner, &leaving).await,
        [false],
        "the user's network's feed has the change"
    );
    assert!(
        location_events(&relay, Who::Gatekeeper, &leaving)
            .await
            .is_empty(),
        "another network's feed does not"
    );

    // Back in the EEA: reachable again at once, without re-enlisting, and told so.
    let back = ok(attest(&relay, Who::Partner, &leaving, "SE", now_ms()).await);
    assert_eq!(back["in_region"], json!(true), "{back}");
    assert_eq!(back["enlisted"], json!(true), "{back}");
    let again = expect_location_notice(&mut partner, leaving).await;
    assert_eq!(
        again.code, 0,
        "meeting the rule again is no error: {again:?}"
    );
    round(&mut gk, &mut partner, gk_user, leaving).await;
    round(&mut partner, &mut gk, leaving, gk_user).await;
    assert_eq!(
        location_events(&relay, Who::Partner, &leaving).await,
        [false, true]
    );
    probe(
        &mut gk,
        gk_user.device(DeviceId(1)),
        &mut partner,
        leaving,
        &[1],
    )
    .await;
    probe(
        &mut partner,
        leaving.device(DeviceId(1)),
        &mut gk,
        gk_user,
        &[1],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attestation_that_does_not_renew_the_standing_applies_the_lapse() {
    // A gatekeeper user this time, and an attestation (outside the EEA) as the trigger: the
    // sweep runs once a minute, the post re-evaluates at once.
    let relay = ControlRelay::start("location-post");
    let p_user = user(PARTNER, 0x1A05_0001);
    let leaving = user(GATEKEEPER, 0x1A05_0002);
    relay.enlist(&p_user, &seen(Some(("DE", 0)))).await;
    let mut gk = relay.session(GATEKEEPER).await;
    let mut partner = relay.session(PARTNER).await;
    relay
        .enlist(&leaving, &seen(Some(("DE", 120 * DAY_MS - 3_000))))
        .await;
    round(&mut partner, &mut gk, p_user, leaving).await;
    // Let the window pass (the test waits for the rule, not for the relay's speed).
    tokio::time::sleep(Duration::from_millis(3_500)).await;

    let after = ok(attest(&relay, Who::Gatekeeper, &leaving, "CH", now_ms()).await);
    assert_eq!(after["in_region"], json!(false), "{after}");
    let notice = expect_location_notice(&mut gk, leaving).await;
    assert_ne!(notice.code, 0, "{notice:?}");
    send_refused(
        &mut partner,
        p_user,
        leaving,
        ErrorCode::RecipientOutsideRegion,
    )
    .await;
    send_refused(&mut gk, leaving, p_user, ErrorCode::SenderOutsideRegion).await;
    assert_eq!(
        location_events(&relay, Who::Gatekeeper, &leaving).await,
        [false]
    );
    assert!(
        location_events(&relay, Who::Partner, &leaving)
            .await
            .is_empty()
    );

    // An EEA attestation older than the window does not bring it back either.
    let old = ok(attest(
        &relay,
        Who::Gatekeeper,
        &leaving,
        "DE",
        now_ms() - 121 * DAY_MS,
    )
    .await);
    assert_eq!(old["in_region"], json!(false), "{old}");
    send_refused(
        &mut partner,
        p_user,
        leaving,
        ErrorCode::RecipientOutsideRegion,
    )
    .await;

    // A fresh one does.
    let back = ok(attest(&relay, Who::Gatekeeper, &leaving, "DE", now_ms()).await);
    assert_eq!(back["in_region"], json!(true), "{back}");
    let again = expect_location_notice(&mut gk, leaving).await;
    assert_eq!(again.code, 0, "{again:?}");
    round(&mut partner, &mut gk, p_user, leaving).await;
    round(&mut gk, &mut partner, leaving, p_user).await;
    assert_eq!(
        location_events(&relay, Who::Gatekeeper, &leaving).await,
        [false, true]
    );
    probe(
        &mut partner,
        p_user.device(DeviceId(1)),
        &mut gk,
        leaving,
        &[1],
    )
    .await;
    probe(
        &mut gk,
        leaving.device(DeviceId(1)),
        &mut partner,
        p_user,
        &[1],
    )
    .await;
}

// --- what an attestation must be, and who may post it ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_attestations_are_refused() {
    let relay = ControlRelay::start("location-malformed");
    let target = user(PARTNER, 0x1A06_0001);
    relay.enlist(&target, &seen(Some(("DE", 0)))).await;
    let before = record(&relay, &target).await;
    let now = now_ms();
    for country in ["de", "DEU", "D", "", "1A", "D-", "ÄÖ", " DE"] {
        let response = attest(&relay, Who::Partner, &target, country, now).await;
        assert_error(&response, 400, ErrorCode::RequestMalformed);
    }
    // In the future beyond clock skew.
    for ahead in [3_600_000, 30 * DAY_MS, u64::MAX - now] {
        let response = attest(&relay, Who::Partner, &target, "DE", now + ahead).await;
        assert_error(&response, 400, ErrorCode::RequestMalformed);
    }
    let path = format!("{}/locations", user_path(&target));
    let api = relay.api(Who::Partner);
    for body in [
        json!({"country": "DE"}),
        json!({"observed_at_ms": now}),
        json!({"country": "DE", "observed_at_ms": -1}),
        json!({"country": "DE", "observed_at_ms": "yesterday"}),
        json!({"country": 49, "observed_at_ms": now}),
        json!({"country": "DE", "observed_at_ms": now, "city": "Berlin"}),
    ] {
        let response = api.post(&path, &body).await.unwrap();
        assert_error(&response, 400, ErrorCode::RequestMalformed);
    }
    // Nothing of it was recorded.
    assert_eq!(record(&relay, &target).await, before);
    // Enlisting with a bad location is refused the same way.
    let other = user(PARTNER, 0x1A06_0002);
    let refused = relay.try_enlist(&other, &seen(Some(("xx", 0)))).await;
    assert_error(&refused, 400, ErrorCode::RequestMalformed);
    // A minute ahead is clock skew, not an error.
    let skewed = ok(attest(&relay, Who::Partner, &target, "DE", now_ms() + 60_000).await);
    assert_eq!(skewed["in_region"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_users_own_network_attests_its_location() {
    let relay = ControlRelay::start("location-foreign");
    let gk_out = user(GATEKEEPER, 0x1A07_0001);
    let p_user = user(PARTNER, 0x1A07_0002);
    relay
        .enlist(&gk_out, &seen(Some(("DE", 200 * DAY_MS))))
        .await;
    relay.enlist(&p_user, &seen(Some(("DE", 0)))).await;
    let gk_before = record(&relay, &gk_out).await;
    let p_before = record(&relay, &p_user).await;

    // The partner tries to bring a gatekeeper user into the region, and the other way.
    let foreign = attest(&relay, Who::Partner, &gk_out, "DE", now_ms()).await;
    assert_error(&foreign, 403, ErrorCode::ForeignResource);
    let foreign = attest(&relay, Who::Gatekeeper, &p_user, "US", now_ms()).await;
    assert_error(&foreign, 403, ErrorCode::ForeignResource);
    // The operator does not act for users either; strangers are not let in at all.
    let operator = attest(&relay, Who::Operator, &p_user, "DE", now_ms()).await;
    assert_error(&operator, 403, ErrorCode::ForeignResource);
    let anonymous = attest(&relay, Who::Anonymous, &p_user, "DE", now_ms()).await;
    assert_error(&anonymous, 401, ErrorCode::CertificateRequired);

    assert_eq!(record(&relay, &gk_out).await, gk_before);
    assert_eq!(record(&relay, &p_user).await, p_before);
    let mut partner = relay.session(PARTNER).await;
    send_refused(
        &mut partner,
        p_user,
        gk_out,
        ErrorCode::RecipientOutsideRegion,
    )
    .await;
    // And its own network can.
    let back = ok(attest(&relay, Who::Gatekeeper, &gk_out, "DE", now_ms()).await);
    assert_eq!(back["in_region"], json!(true));
    send_ok(&mut partner, p_user, gk_out).await;
}
