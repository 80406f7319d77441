//! The control plane end to end, over real sockets: the partner registry (point 1),
//! identifiers (2), enlistment with consent, consent models and message requests (3), each
//! with its hostile cases, and each decision checked where it matters: on the data plane.

mod common;

use std::time::Duration;

use client::control::user_hex;
use client::{ErrorCode, Event, NetworkId, UserAddress, UserId};
use codec::NoticeKind;
use common::control::{
    ControlRelay, Enlist, Who, assert_error, events, hash_of, ok, user_path, wait_request,
};
use common::{GATEKEEPER, PARTNER, envelope, payload, probe_within};
use serde_json::json;

fn user(network: NetworkId, id: u128) -> UserAddress {
    UserAddress::new(network, UserId(id))
}

// ---------------------------------------------------------------- 1. partners

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
    assert_eq!(list["partners"][0]["gatekeeper"], true);
    let refused = relay.api(Who::Partner).get("/v1/partners").await.unwrap();
    assert_error(&refused, 403, ErrorCode::OperatorRequired);
    let anonymous = relay.api(Who::Anonymous).get("/v1/partners").await.unwrap();
    assert_error(&anonymous, 401, ErrorCode::CertificateRequired);
    // A network reads its own registration, not another's.
    ok(relay.api(Who::Partner).get("/v1/partners/2").await.unwrap());
    let foreign = relay.api(Who::Partner).get("/v1/partners/1").await.unwrap();
    assert_error(&foreign, 403, ErrorCode::ForeignResource);
    let missing = relay
        .api(Who::Operator)
        .get("/v1/partners/99")
        .await
        .unwrap();
    assert_error(&missing, 404, ErrorCode::NotFound);
    let bad_id = relay
        .api(Who::Operator)
        .get("/v1/partners/x")
        .await
        .unwrap();
    assert_error(&bad_id, 400, ErrorCode::RequestMalformed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_in_testing_reaches_test_users_only_until_activated() {
    let mut relay = ControlRelay::start("testing_partner");
    let operator = relay.api(Who::Operator);
    let three = relay.new_network(3);
    let added = operator
        .post("/v1/partners", &relay.partner_body(&three, "testing"))
        .await
        .unwrap();
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.body["status"], "testing");

    let partner_user = user(three.id, 0x31);
    ok(relay.enlist_as(&three, &partner_user, false).await);
    let plain = user(GATEKEEPER, 0x11);
    let tester = user(GATEKEEPER, 0x12);
    relay.enlist(&plain, &Enlist::default()).await;
    relay
        .enlist(
            &tester,
            &Enlist {
                test: true,
                ..Enlist::default()
            },
        )
        .await;

    let mut sender = relay.session_as(&three).await.expect("network 3 connects");
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let to_plain = envelope(partner_user.device(client::DeviceId(1)), plain);
    sender.send_envelope(&to_plain, b"hi").await;
    sender
        .expect_rejected(to_plain.message_id, ErrorCode::PartnerTesting)
        .await;
    let to_tester = envelope(partner_user.device(client::DeviceId(1)), tester);
    sender.send_accepted(&to_tester, b"hi").await;
    let delivered = gatekeeper.expect_delivery().await;
    assert_eq!(delivered.id(), to_tester.message_id);

    // Activation is recorded with its reason and opens the network to everyone.
    let activated = ok(operator
        .post(
            "/v1/partners/3/status",
            &json!({"status": "active", "reason": "conformance suite passed"}),
        )
        .await
        .unwrap());
    assert_eq!(activated["history"].as_array().unwrap().len(), 2);
    assert_eq!(
        activated["history"][1]["reason"],
        "conformance suite passed"
    );
    assert_eq!(activated["history"][1]["from"], "testing");
    // Its sessions are told.
    match sender.event().await {
        Event::Notice(notice) => {
            assert!(
                notice.text.contains("conformance suite passed"),
                "{}",
                notice.text
            )
        }
        other => panic!("expected the status notice, got {other:?}"),
    }
    let again = envelope(partner_user.device(client::DeviceId(1)), plain);
    sender.send_accepted(&again, b"hi").await;
    assert_eq!(gatekeeper.expect_delivery().await.id(), again.message_id);

    // The registration survives a restart.
    drop((sender, gatekeeper));
    relay.restart(|_| {});
    let shown = ok(relay
        .api(Who::Operator)
        .get("/v1/partners/3")
        .await
        .unwrap());
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["source"], "api");
    relay
        .session_as(&three)
        .await
        .expect("network 3 still connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_needs_a_statutory_ground_and_stops_traffic_both_ways() {
    let relay = ControlRelay::start("suspension");
    let operator = relay.api(Who::Operator);
    let three = relay.new_network(3);
    ok(operator
        .post("/v1/partners", &relay.partner_body(&three, "active"))
        .await
        .unwrap());
    let theirs = user(three.id, 0x31);
    let ours = user(GATEKEEPER, 0x11);
    ok(relay.enlist_as(&three, &theirs, false).await);
    relay.enlist(&ours, &Enlist::default()).await;
    let mut session = relay.session_as(&three).await.expect("connects");
    session.declare(theirs, &[1]).await;

    let no_ground = operator
        .post(
            "/v1/partners/3/status",
            &json!({"status": "suspended", "reason": "spam"}),
        )
        .await
        .unwrap();
    assert_error(&no_ground, 400, ErrorCode::GroundRequired);
    let no_reason = operator
        .post(
            "/v1/partners/3/status",
            &json!({"status": "suspended", "reason": " ", "ground": "security"}),
        )
        .await
        .unwrap();
    assert_error(&no_reason, 400, ErrorCode::GroundRequired);
    let not_a_ground = operator
        .post(
            "/v1/partners/3/status",
            &json!({"status": "suspended", "reason": "x", "ground": "dislike"}),
        )
        .await
        .unwrap();
    assert_error(&not_a_ground, 400, ErrorCode::RequestMalformed);
    let by_partner = relay
        .api(Who::Partner)
        .post(
            "/v1/partners/3/status",
            &json!({"status": "suspended", "reason": "x", "ground": "security"}),
        )
        .await
        .unwrap();
    assert_error(&by_partner, 403, ErrorCode::OperatorRequired);

    let suspended = ok(operator
        .post(
            "/v1/partners/3/status",
            &json!({"status": "suspended", "reason": "compromised signing key", "ground": "security"}),
        )
        .await
        .unwrap());
    assert_eq!(suspended["history"][1]["ground"], "security");
    // Its open session is told why, then closed.
    match session.event().await {
        Event::Notice(notice) => {
            assert_eq!(notice.kind, NoticeKind::Suspension);
            assert_eq!(notice.code, ErrorCode::PartnerSuspended.as_u16());
            assert!(
                notice.text.contains("compromised signing key"),
                "{}",
                notice.text
            );
        }
        other => panic!("expected the suspension notice, got {other:?}"),
    }
    session.expect_error(ErrorCode::PartnerSuspended).await;
    // New sessions are refused; nothing reaches its users.
    match relay.session_as(&three).await {
        Err(client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::PartnerSuspended.as_u16())
        }
        Err(other) => panic!("expected PARTNER_SUSPENDED, got {other}"),
        Ok(_) => panic!("a suspended network connected"),
    }
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let to_them = envelope(ours.device(client::DeviceId(1)), theirs);
    gatekeeper.send_envelope(&to_them, b"x").await;
    gatekeeper
        .expect_rejected(to_them.message_id, ErrorCode::PartnerSuspended)
        .await;
    // The partner learns it from its feed too.
    let feed = events(&relay.api_as(&three)).await;
    assert!(
        feed.iter()
            .any(|e| e["kind"] == "partner_status" && e["data"]["status"] == "suspended"),
        "{feed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_partner_checks_every_field() {
    let relay = ControlRelay::start("partner_fields");
    let operator = relay.api(Who::Operator);
    let three = relay.new_network(3);
    let body = relay.partner_body(&three, "testing");
    let cases = [
        ("id", json!(1), 409, ErrorCode::AlreadyExists),
        ("id", json!(0), 400, ErrorCode::RequestMalformed),
        (
            "cert_sha256",
            json!(["abc"]),
            400,
            ErrorCode::RequestMalformed,
        ),
        ("cert_sha256", json!([]), 400, ErrorCode::RequestMalformed),
        (
            "token_public_key",
            json!("not base64!"),
            400,
            ErrorCode::RequestMalformed,
        ),
        (
            "architecture",
            json!("carrier-pigeon"),
            400,
            ErrorCode::RequestMalformed,
        ),
        (
            "status",
            json!("suspended"),
            400,
            ErrorCode::RequestMalformed,
        ),
        ("reason", json!(""), 400, ErrorCode::GroundRequired),
        ("name", json!(""), 400, ErrorCode::RequestMalformed),
        ("unknown_field", json!(1), 400, ErrorCode::RequestMalformed),
    ];
    for (field, value, status, code) in cases {
        let mut bad = body.clone();
        bad[field] = value;
        let answer = operator.post("/v1/partners", &bad).await.unwrap();
        assert_error(&answer, status, code);
    }
    // A certificate that already speaks for a network.
    let gatekeeper_fingerprint =
        ok(operator.get("/v1/partners/1").await.unwrap())["cert_sha256"][0].clone();
    let mut taken = body.clone();
    taken["cert_sha256"] = json!([gatekeeper_fingerprint]);
    assert_error(
        &operator.post("/v1/partners", &taken).await.unwrap(),
        409,
        ErrorCode::AlreadyExists,
    );
    let raw = operator
        .call_raw(
            "POST",
            "/v1/partners",
            bytes::Bytes::from_static(b"{\"id\": 3,"),
        )
        .await
        .unwrap();
    assert_error(&raw, 400, ErrorCode::RequestMalformed);
    let huge = operator
        .call_raw(
            "POST",
            "/v1/partners",
            bytes::Bytes::from(vec![b' '; 2 << 20]),
        )
        .await
        .unwrap();
    assert_error(&huge, 413, ErrorCode::BodyTooLarge);
    assert_eq!(
        operator.post("/v1/partners", &body).await.unwrap().status,
        201
    );
    assert_error(
        &operator.post("/v1/partners", &body).await.unwrap(),
        409,
        ErrorCode::AlreadyExists,
    );
}

// ---------------------------------------------------------------- 2. identifiers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_are_validated_unique_and_changeable() {
    let relay = ControlRelay::start("identifiers");
    let alice = user(PARTNER, 0x21);
    let bob = user(PARTNER, 0x22);
    let body = relay
        .enlist(
            &alice,
            &Enlist {
                identifiers: vec![
                    ("phone", "+49 170 123-4567".into()),
                    ("email", "Alice@Example.org".into()),
                    ("username", "Alice_21".into()),
                ],
                ..Enlist::default()
            },
        )
        .await;
    // Stored in normal form.
    assert_eq!(body["identifiers"][0]["value"], "+491701234567");
    assert_eq!(body["identifiers"][1]["value"], "alice@example.org");
    assert_eq!(body["identifiers"][2]["value"], "alice_21");

    for (kind, value) in [
        ("phone", "01701234567"),
        ("phone", "+49 170 abc"),
        ("email", "alice.example.org"),
        ("username", "a"),
    ] {
        let answer = relay
            .try_enlist(
                &bob,
                &Enlist {
                    identifiers: vec![(kind, value.into())],
                    ..Enlist::default()
                },
            )
            .await;
        assert_error(&answer, 400, ErrorCode::IdentifierInvalid);
    }
    let taken = relay
        .try_enlist(
            &bob,
            &Enlist {
                identifiers: vec![("phone", "+491701234567".into())],
                ..Enlist::default()
            },
        )
        .await;
    assert_error(&taken, 409, ErrorCode::IdentifierTaken);

    // A change: the old identifier stops resolving, the new one resolves, the user keeps
    // its internal id.
    let partner = relay.api(Who::Partner);
    let path = format!("{}/identifiers/change", user_path(&alice));
    let changed = ok(partner
        .post(
            &path,
            &json!({"old": {"type": "username", "value": "alice_21"}, "new": {"type": "username", "value": "alice_new"}}),
        )
        .await
        .unwrap());
    assert_eq!(changed["user"], format!("{:032x}", 0x21));
    let requester = user(GATEKEEPER, 0x11);
    relay.enlist(&requester, &Enlist::default()).await;
    let gatekeeper = relay.api(Who::Gatekeeper);
    let lookup = |hash: String| json!({"requester": user_hex(&requester), "identifier_hash": hash});
    let old = gatekeeper
        .post(
            "/v1/discovery/lookup",
            &lookup(hash_of("username", "alice_21")),
        )
        .await
        .unwrap();
    assert_error(&old, 404, ErrorCode::NotFound);
    let new = ok(gatekeeper
        .post(
            "/v1/discovery/lookup",
            &lookup(hash_of("username", "alice_new")),
        )
        .await
        .unwrap());
    assert_eq!(new["user"]["user"], format!("{:032x}", 0x21));

    // Hostile: a change of an identifier the user does not have, to a taken one, by
    // another network.
    let not_hers = partner
        .post(
            &path,
            &json!({"old": {"type": "username", "value": "nobody"}, "new": {"type": "username", "value": "x_new"}}),
        )
        .await
        .unwrap();
    assert_error(&not_hers, 404, ErrorCode::NotFound);
    relay
        .enlist(
            &bob,
            &Enlist {
                identifiers: vec![("username", "bob_22".into())],
                ..Enlist::default()
            },
        )
        .await;
    let to_taken = partner
        .post(
            &path,
            &json!({"old": {"type": "username", "value": "alice_new"}, "new": {"type": "username", "value": "bob_22"}}),
        )
        .await
        .unwrap();
    assert_error(&to_taken, 409, ErrorCode::IdentifierTaken);
    let foreign = gatekeeper
        .post(
            &path,
            &json!({"old": {"type": "username", "value": "alice_new"}, "new": {"type": "username", "value": "stolen"}}),
        )
        .await
        .unwrap();
    assert_error(&foreign, 403, ErrorCode::ForeignResource);
}

// ---------------------------------------------------------------- 3. enlistment, consent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enlistment_needs_a_valid_consent_and_gates_the_data_plane() {
    let relay = ControlRelay::start("consent");
    let alice = user(PARTNER, 0x21);
    let gk = user(GATEKEEPER, 0x11);
    let partner = relay.api(Who::Partner);
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let mut partner_session = relay.session(PARTNER).await;

    // Before anyone opted in, nothing crosses.
    let early = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&early, b"x").await;
    gatekeeper
        .expect_rejected(early.message_id, ErrorCode::SenderNotEnlisted)
        .await;
    relay.enlist(&gk, &Enlist::default()).await;
    let early = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&early, b"x").await;
    gatekeeper
        .expect_rejected(early.message_id, ErrorCode::RecipientNotEnlisted)
        .await;

    // No consent, a forged one, one for someone else, a stale one, one from the future.
    let path = user_path(&alice);
    let no_consent = partner.put(&path, &json!({"devices": [1]})).await.unwrap();
    assert_error(&no_consent, 400, ErrorCode::ConsentRequired);
    let mut forged = relay.consent(&alice, "everyone", true);
    forged["signature"] = relay.consent(&gk, "everyone", true)["signature"].clone();
    let answer = partner
        .put(&path, &json!({"consent": forged, "devices": [1]}))
        .await
        .unwrap();
    assert_error(&answer, 400, ErrorCode::ConsentInvalid);
    let someone_else = relay.consent(&user(PARTNER, 0x99), "everyone", true);
    let answer = partner
        .put(&path, &json!({"consent": someone_else, "devices": [1]}))
        .await
        .unwrap();
    assert_error(&answer, 400, ErrorCode::ConsentInvalid);
    let mut tampered = relay.consent(&alice, "request_always", true);
    tampered["model"] = json!("everyone");
    let answer = partner
        .put(&path, &json!({"consent": tampered, "devices": [1]}))
        .await
        .unwrap();
    assert_error(&answer, 400, ErrorCode::ConsentInvalid);
    for at in [
        common::now_ms() - 31 * 24 * 3_600_000,
        common::now_ms() + 3_600_000,
    ] {
        let signature =
            client::control::sign_consent(&relay.network_key(&alice), &alice, at, "everyone", true)
                .unwrap();
        let consent = json!({"opted_in_at_ms": at, "model": "everyone", "discoverable": true, "signature": signature});
        let answer = partner
            .put(&path, &json!({"consent": consent, "devices": [1]}))
            .await
            .unwrap();
        assert_error(&answer, 400, ErrorCode::ConsentInvalid);
    }
    // The gatekeeper cannot enlist the partner's users, nor read them.
    let foreign = relay
        .api(Who::Gatekeeper)
        .put(
            &path,
            &json!({"consent": relay.consent(&alice, "everyone", true)}),
        )
        .await
        .unwrap();
    assert_error(&foreign, 403, ErrorCode::ForeignResource);
    assert_error(
        &relay.api(Who::Gatekeeper).get(&path).await.unwrap(),
        403,
        ErrorCode::ForeignResource,
    );
    let bad_user = partner.get("/v1/users/2/not-hex").await.unwrap();
    assert_error(&bad_user, 400, ErrorCode::RequestMalformed);
    let operator = relay.api(Who::Operator).get(&path).await.unwrap();
    assert_error(&operator, 403, ErrorCode::ForeignResource);

    // With consent the user is enlisted (201), its record kept; then traffic passes.
    let first = relay.try_enlist(&alice, &Enlist::default()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body["enlisted"], true);
    assert_eq!(first.body["consent"]["model"], "everyone");
    assert_eq!(
        relay.try_enlist(&alice, &Enlist::default()).await.status,
        200
    );
    let message = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_accepted(&message, &payload("m", 40)).await;
    assert_eq!(
        partner_session.expect_delivery().await.id(),
        message.message_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_first_contact_holds_everything_until_accepted() {
    let relay = ControlRelay::start("request_always");
    let alice = user(PARTNER, 0x21);
    let gk = user(GATEKEEPER, 0x11);
    relay
        .enlist(
            &alice,
            &Enlist {
                model: "request_always",
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&gk, &Enlist::default()).await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let mut partner_session = relay.session(PARTNER).await;

    let first = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&first, b"hello?").await;
    gatekeeper
        .expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let partner = relay.api(Who::Partner);
    let request = wait_request(&partner, |r| r["recipient"]["user"] == user_hex(&alice)).await;
    assert_eq!(request["sender"]["user"], user_hex(&gk));
    assert_eq!(request["admits"]["user"]["user"], user_hex(&gk));
    // Nothing of it reached the recipient (proven below: `third` takes the same path and is
    // the next thing the recipient's session sees), and the sender's network sees no request
    // and no event about the recipient.
    let gatekeeper_api = relay.api(Who::Gatekeeper);
    let theirs = ok(gatekeeper_api.get("/v1/requests").await.unwrap());
    assert_eq!(theirs["requests"], json!([]));
    assert!(events(&gatekeeper_api).await.is_empty());
    assert!(
        events(&partner)
            .await
            .iter()
            .any(|e| e["kind"] == "request_created")
    );
    // Retrying does not make a second request.
    let second = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&second, b"hello??").await;
    gatekeeper
        .expect_rejected(second.message_id, ErrorCode::MessageRequestPending)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pending = ok(partner.get("/v1/requests?state=pending").await.unwrap());
    assert_eq!(pending["requests"].as_array().unwrap().len(), 1);

    // Only the recipient's network decides.
    let id = request["id"].as_u64().unwrap();
    let accept = format!("/v1/requests/{id}/accept");
    assert_error(
        &gatekeeper_api.post(&accept, &json!({})).await.unwrap(),
        404,
        ErrorCode::NotFound,
    );
    let accepted = ok(partner.post(&accept, &json!({})).await.unwrap());
    assert_eq!(accepted["state"], "accepted");
    assert_error(
        &partner.post(&accept, &json!({})).await.unwrap(),
        409,
        ErrorCode::RequestDecided,
    );
    assert!(
        events(&gatekeeper_api)
            .await
            .iter()
            .any(|e| e["kind"] == "request_accepted" && e["data"]["request"] == id)
    );
    // The refused envelopes were not held: only new ones arrive (this one, sent on their
    // path, is the first thing the recipient's session sees), and replies pass.
    let third = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_accepted(&third, b"hi").await;
    let delivered = partner_session.expect_delivery().await;
    assert_eq!(delivered.id(), third.message_id);
    partner_session.ack_delivery(&delivered).await;
    let reply = envelope(alice.device(client::DeviceId(1)), gk);
    partner_session.send_accepted(&reply, b"hello").await;
    assert_eq!(gatekeeper.expect_delivery().await.id(), reply.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_never_disclosed_to_the_sender() {
    let relay = ControlRelay::start("request_refused");
    let alice = user(PARTNER, 0x21);
    let gk = user(GATEKEEPER, 0x11);
    relay
        .enlist(
            &alice,
            &Enlist {
                model: "request_always",
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&gk, &Enlist::default()).await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let first = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&first, b"x").await;
    gatekeeper
        .expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let partner = relay.api(Who::Partner);
    let request = wait_request(&partner, |_| true).await;
    let id = request["id"].as_u64().unwrap();
    let refused = ok(partner
        .post(&format!("/v1/requests/{id}/refuse"), &json!({}))
        .await
        .unwrap());
    assert_eq!(refused["state"], "refused");
    // The sender sees the same answer as before, learns nothing from its feed, and no new
    // request pesters the recipient.
    let later = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&later, b"x").await;
    gatekeeper
        .expect_rejected(later.message_id, ErrorCode::MessageRequestPending)
        .await;
    assert!(events(&relay.api(Who::Gatekeeper)).await.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pending = ok(partner.get("/v1/requests?state=pending").await.unwrap());
    assert_eq!(pending["requests"], json!([]));
    let bad_state = partner.get("/v1/requests?state=maybe").await.unwrap();
    assert_error(&bad_state, 400, ErrorCode::RequestMalformed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_book_and_per_network_models() {
    let relay = ControlRelay::start("models");
    let friend = user(GATEKEEPER, 0x11);
    let stranger = user(GATEKEEPER, 0x12);
    let careful = user(PARTNER, 0x21);
    let per_network = user(PARTNER, 0x22);
    relay
        .enlist(
            &friend,
            &Enlist {
                identifiers: vec![("phone", "+4915112345678".into())],
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&stranger, &Enlist::default()).await;
    relay
        .enlist(
            &careful,
            &Enlist {
                model: "request_unknown",
                ..Enlist::default()
            },
        )
        .await;
    relay
        .enlist(
            &per_network,
            &Enlist {
                model: "request_per_network",
                ..Enlist::default()
            },
        )
        .await;
    let partner = relay.api(Who::Partner);
    let book = ok(partner
        .put(
            &format!("{}/contact-book", user_path(&careful)),
            &json!({"hashes": [hash_of("phone", "+4915112345678")]}),
        )
        .await
        .unwrap());
    assert_eq!(book["contacts"], 1);
    let bad_book = partner
        .put(
            &format!("{}/contact-book", user_path(&careful)),
            &json!({"hashes": ["nothex"]}),
        )
        .await
        .unwrap();
    assert_error(&bad_book, 400, ErrorCode::RequestMalformed);

    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let mut partner_session = relay.session(PARTNER).await;
    // (iii): someone in the book gets through, a stranger makes a request.
    let known = envelope(friend.device(client::DeviceId(1)), careful);
    gatekeeper.send_accepted(&known, b"x").await;
    assert_eq!(
        partner_session.expect_delivery().await.id(),
        known.message_id
    );
    let unknown = envelope(stranger.device(client::DeviceId(1)), careful);
    gatekeeper.send_envelope(&unknown, b"x").await;
    gatekeeper
        .expect_rejected(unknown.message_id, ErrorCode::MessageRequestPending)
        .await;

    // (iv): the first contact from a network is a request for the whole network.
    let first = envelope(friend.device(client::DeviceId(1)), per_network);
    gatekeeper.send_envelope(&first, b"x").await;
    gatekeeper
        .expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let request = wait_request(&partner, |r| r["admits"]["network"] == 1).await;
    let id = request["id"].as_u64().unwrap();
    ok(partner
        .post(&format!("/v1/requests/{id}/accept"), &json!({}))
        .await
        .unwrap());
    // Now anyone on that network gets through, not only the first sender.
    let from_stranger = envelope(stranger.device(client::DeviceId(1)), per_network);
    gatekeeper.send_accepted(&from_stranger, b"x").await;
    assert_eq!(
        partner_session.expect_delivery().await.id(),
        from_stranger.message_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_out_deletes_queued_messages_and_tells_other_networks() {
    let mut relay = ControlRelay::start("opt_out");
    let alice = user(PARTNER, 0x21);
    let gk = user(GATEKEEPER, 0x11);
    relay
        .enlist(
            &alice,
            &Enlist {
                identifiers: vec![("email", "alice@example.org".into())],
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&gk, &Enlist::default()).await;
    // The partner is offline: the envelopes wait in the relay's queue.
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    for _ in 0..3 {
        let message = envelope(gk.device(client::DeviceId(1)), alice);
        gatekeeper.send_accepted(&message, b"queued").await;
    }
    let partner = relay.api(Who::Partner);
    let out = ok(partner.delete(&user_path(&alice)).await.unwrap());
    assert_eq!(out["enlisted"], false);
    assert_eq!(out["identifiers"], json!([]));
    assert!(out["consent"].is_null());
    let metrics = relay.metrics().await;
    assert_eq!(
        common::metric_sum(&metrics, "relay_shard_purged_total"),
        3,
        "{metrics}"
    );
    // When its server comes back, nothing of it is delivered: a probe to the user from its
    // own network (not interop, so still allowed) is queued behind anything left.
    let mut partner_session = relay.session(PARTNER).await;
    let neighbour = user(PARTNER, 0x22).device(client::DeviceId(1));
    probe_within(&mut partner_session, neighbour, alice, &[1]).await;
    // It is unreachable, it no longer resolves, the others are told; twice is NOT_FOUND.
    let after = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&after, b"x").await;
    gatekeeper
        .expect_rejected(after.message_id, ErrorCode::RecipientNotEnlisted)
        .await;
    let lookup = relay
        .api(Who::Gatekeeper)
        .post(
            "/v1/discovery/lookup",
            &json!({"requester": user_hex(&gk), "identifier_hash": hash_of("email", "alice@example.org")}),
        )
        .await
        .unwrap();
    assert_error(&lookup, 404, ErrorCode::NotFound);
    let told = events(&relay.api(Who::Gatekeeper)).await;
    assert!(
        told.iter()
            .any(|e| e["kind"] == "user_delisted" && e["data"]["user"]["user"] == user_hex(&alice)),
        "{told:?}"
    );
    assert!(events(&partner).await.is_empty());
    assert_error(
        &partner.delete(&user_path(&alice)).await.unwrap(),
        404,
        ErrorCode::NotFound,
    );
    // And it stays so across a restart; the deleted messages do not come back.
    drop((gatekeeper, partner_session));
    relay.restart(|_| {});
    let mut partner_session = relay.session(PARTNER).await;
    probe_within(&mut partner_session, neighbour, alice, &[1]).await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let after = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&after, b"x").await;
    gatekeeper
        .expect_rejected(after.message_id, ErrorCode::RecipientNotEnlisted)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_and_accepted_requests_survive_a_restart() {
    let mut relay = ControlRelay::start("restart");
    let alice = user(PARTNER, 0x21);
    let gk = user(GATEKEEPER, 0x11);
    relay
        .enlist(
            &alice,
            &Enlist {
                model: "request_always",
                ..Enlist::default()
            },
        )
        .await;
    relay.enlist(&gk, &Enlist::default()).await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let first = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_envelope(&first, b"x").await;
    gatekeeper
        .expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let partner = relay.api(Who::Partner);
    let request = wait_request(&partner, |_| true).await;
    let id = request["id"].as_u64().unwrap();
    ok(partner
        .post(&format!("/v1/requests/{id}/accept"), &json!({}))
        .await
        .unwrap());
    drop(gatekeeper);
    relay.restart(|_| {});
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let mut partner_session = relay.session(PARTNER).await;
    let message = envelope(gk.device(client::DeviceId(1)), alice);
    gatekeeper.send_accepted(&message, b"x").await;
    assert_eq!(
        partner_session.expect_delivery().await.id(),
        message.message_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_refuses_strangers_and_plain_http() {
    let relay = ControlRelay::start("strangers");
    // Plain HTTP: /metrics and /healthz only.
    let metrics = relay.metrics().await;
    assert!(metrics.contains("relay_policy_enforced 1"), "{metrics}");
    let plain = plain_get(relay.http, "/v1/partners").await;
    assert!(plain.starts_with("HTTP/1.1 401"), "{plain}");
    assert!(plain.contains("CERTIFICATE_REQUIRED"), "{plain}");
    let unknown_route = relay.api(Who::Operator).get("/v1/nothing").await.unwrap();
    assert_error(&unknown_route, 404, ErrorCode::NotFound);
    let wrong_method = relay
        .api(Who::Operator)
        .delete("/v1/partners")
        .await
        .unwrap();
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.body);
    // A certificate from the CA that no network or operator owns.
    let four = relay.new_network(4);
    let answer = relay.api_as(&four).get("/v1/events").await.unwrap();
    assert_error(&answer, 403, ErrorCode::CertificateUnknown);
    let bad_query = relay
        .api(Who::Partner)
        .get("/v1/events?after=-1")
        .await
        .unwrap();
    assert_error(&bad_query, 400, ErrorCode::RequestMalformed);
}

async fn plain_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_traffic_limit_holds_across_its_sessions() {
    let relay = ControlRelay::start("traffic_limit");
    let three = relay.new_network(3);
    let mut body = relay.partner_body(&three, "active");
    body["limits"] = json!({"messages_per_s": 2});
    let added = ok(relay
        .api(Who::Operator)
        .post("/v1/partners", &body)
        .await
        .unwrap());
    assert_eq!(added["limits"]["messages_per_s"], 2);
    let theirs = user(three.id, 0x31);
    let ours = user(GATEKEEPER, 0x11);
    ok(relay.enlist_as(&three, &theirs, false).await);
    relay.enlist(&ours, &Enlist::default()).await;
    // Two sessions share one budget: a second's worth (plus one) passes, then RATE_LIMITED
    // with a hint.
    let mut first = relay.session_as(&three).await.expect("connects");
    let mut second = relay.session_as(&three).await.expect("connects");
    let (mut accepted, mut limited) = (0, 0);
    for n in 0..10 {
        let session = if n % 2 == 0 { &mut first } else { &mut second };
        let message = envelope(theirs.device(client::DeviceId(1)), ours);
        session.send_envelope(&message, b"x").await;
        match session.expect_ack(message.message_id).await.status {
            client::AckStatus::Accepted => accepted += 1,
            client::AckStatus::Rejected {
                code,
                retry_after_ms,
                ..
            } => {
                assert_eq!(code, ErrorCode::RateLimited.as_u16());
                assert!(retry_after_ms > 0);
                limited += 1;
            }
        }
    }
    assert!((3..=4).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + limited, 10);
    // The gatekeeper has no limit (the session also carries what network 3 sent).
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..10 {
        let message = envelope(ours.device(client::DeviceId(1)), theirs);
        gatekeeper.send_envelope(&message, b"x").await;
        ids.insert(message.message_id);
    }
    while !ids.is_empty() {
        match gatekeeper.event().await {
            Event::Ack(ack) => {
                assert_eq!(ack.status, client::AckStatus::Accepted);
                assert!(ids.remove(&ack.message_id));
            }
            Event::Delivery { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_cannot_read_or_change_another_partners_data() {
    let relay = ControlRelay::start("foreign_data");
    let three = relay.new_network(3);
    ok(relay
        .api(Who::Operator)
        .post("/v1/partners", &relay.partner_body(&three, "active"))
        .await
        .unwrap());
    let alice = user(PARTNER, 0x21);
    relay
        .enlist(
            &alice,
            &Enlist {
                devices: vec![1],
                ..Enlist::default()
            },
        )
        .await;
    let keys = json!({"identity_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="});
    ok(relay
        .api(Who::Partner)
        .put(&format!("/v1/keys/2/{}/1", user_hex(&alice)), &keys)
        .await
        .unwrap());
    let other = relay.api_as(&three);
    let path = user_path(&alice);
    for answer in [
        other.get(&path).await.unwrap(),
        other.delete(&path).await.unwrap(),
        other
            .put(&format!("{path}/devices"), &json!({"devices": [9]}))
            .await
            .unwrap(),
        other
            .post(
                &format!("{path}/locations"),
                &json!({"country": "US", "observed_at_ms": common::now_ms()}),
            )
            .await
            .unwrap(),
        other
            .put(&format!("{path}/contact-book"), &json!({"hashes": []}))
            .await
            .unwrap(),
        other
            .get(&format!("/v1/keys/2/{}/1", user_hex(&alice)))
            .await
            .unwrap(),
        other
            .put(&format!("/v1/keys/2/{}/1", user_hex(&alice)), &keys)
            .await
            .unwrap(),
        other.get("/v1/partners/2").await.unwrap(),
    ] {
        assert_error(&answer, 403, ErrorCode::ForeignResource);
    }
    // Its own view shows nothing of network 2: no requests, no events.
    assert_eq!(
        ok(other.get("/v1/requests").await.unwrap())["requests"],
        json!([])
    );
    assert!(events(&other).await.is_empty());
    // Nothing changed.
    let record = ok(relay.api(Who::Partner).get(&path).await.unwrap());
    assert_eq!(record["enlisted"], true);
    assert_eq!(record["devices"], json!([1]));
    let stored = ok(relay
        .api(Who::Partner)
        .get(&format!("/v1/keys/2/{}/1", user_hex(&alice)))
        .await
        .unwrap());
    assert_eq!(
        stored["identity_key"],
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    );
}

/// A CA and one client certificate it issued: (CA PEM, client TLS trusting the relay).
fn own_ca_client(relay: &ControlRelay, name: &str) -> (String, client::ClientTls) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let relay_ca = std::fs::read(relay.pki("ca.pem")).unwrap();
    let tls = client::ClientTls::from_pem(
        &relay_ca,
        Some((cert.pem().as_bytes(), key.serialize_pem().as_bytes())),
    )
    .unwrap();
    (ca_cert.pem(), tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_registered_by_its_ca_connects_with_any_certificate_it_issued() {
    let relay = ControlRelay::start("partner_ca");
    let (ca_pem, tls) = own_ca_client(&relay, "acme");
    let connect = |tls: client::ClientTls| {
        let options = client::ConnectOptions::new(relay.addr, tls, client::Role::PartnerServer)
            .connect_timeout(common::STEP_TIMEOUT);
        client::connect(options)
    };
    // Unknown CA: the TLS handshake fails.
    assert!(connect(tls.clone()).await.is_err());
    let four = relay.new_network(4);
    let mut body = relay.partner_body(&four, "active");
    body["cert_sha256"] = json!([]);
    body["ca_pem"] = json!(ca_pem);
    let added = ok(relay
        .api(Who::Operator)
        .post("/v1/partners", &body)
        .await
        .unwrap());
    assert_eq!(added["ca_pem"], json!(ca_pem));
    // Now its certificates are trusted and speak for network 4, on both ports.
    let session = connect(tls.clone())
        .await
        .expect("network 4 connects by its CA");
    drop(session);
    let api = client::control::ControlClient::new(relay.http, tls, "localhost").unwrap();
    ok(api.get("/v1/partners/4").await.unwrap());
    assert_error(
        &api.get("/v1/partners/2").await.unwrap(),
        403,
        ErrorCode::ForeignResource,
    );
    // Another CA's certificate still fails; a PEM that is not a certificate is refused.
    let (_, stranger) = own_ca_client(&relay, "mallory");
    assert!(connect(stranger).await.is_err());
    let five = relay.new_network(5);
    let mut bad = relay.partner_body(&five, "active");
    bad["cert_sha256"] = json!([]);
    bad["ca_pem"] = json!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    assert_error(
        &relay
            .api(Who::Operator)
            .post("/v1/partners", &bad)
            .await
            .unwrap(),
        400,
        ErrorCode::RequestMalformed,
    );
}

/// Inputs that once slipped through: a bad percent-encoding in the path, ids with a sign,
/// more devices than the data plane takes, the operator's certificate given to a partner, a
/// lookup hash of the wrong length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_paths_ids_and_device_sets_are_refused_in_json() {
    let relay = ControlRelay::start("malformed_inputs");
    let operator = relay.api(Who::Operator);
    let partner = relay.api(Who::Partner);
    for path in ["/v1/partners/%FF", "/v1/partners/+2"] {
        assert_error(
            &operator.get(path).await.unwrap(),
            400,
            ErrorCode::RequestMalformed,
        );
    }
    for path in ["/v1/users/2/%C3%28", "/v1/users/+2/21", "/v1/users/2/+21"] {
        assert_error(
            &partner.get(path).await.unwrap(),
            400,
            ErrorCode::RequestMalformed,
        );
    }
    let alice = user(PARTNER, 0x21);
    let too_many = relay
        .try_enlist(
            &alice,
            &Enlist {
                devices: vec![1, 2, 3, 4, 5, 6],
                ..Enlist::default()
            },
        )
        .await;
    assert_error(&too_many, 400, ErrorCode::DeviceLimit);
    relay.enlist(&alice, &Enlist::default()).await;
    let answer = partner
        .put(
            &format!("{}/devices", user_path(&alice)),
            &json!({"devices": [1, 2, 3, 4, 5, 6]}),
        )
        .await
        .unwrap();
    assert_error(&answer, 400, ErrorCode::DeviceLimit);
    let five = ok(partner
        .put(
            &format!("{}/devices", user_path(&alice)),
            &json!({"devices": [1, 2, 3, 4, 5]}),
        )
        .await
        .unwrap());
    assert_eq!(five["devices"], json!([1, 2, 3, 4, 5]));

    let pem = std::fs::read(relay.pki("operator.pem")).unwrap();
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
    };
    let three = relay.new_network(3);
    let mut body = relay.partner_body(&three, "active");
    body["cert_sha256"] = json!([devkit::hex::fingerprint_hex(&der)]);
    assert_error(
        &operator.post("/v1/partners", &body).await.unwrap(),
        409,
        ErrorCode::AlreadyExists,
    );

    let gk = user(GATEKEEPER, 0x11);
    relay.enlist(&gk, &Enlist::default()).await;
    let lookup = relay
        .api(Who::Gatekeeper)
        .post(
            "/v1/discovery/lookup",
            &json!({"requester": user_hex(&gk), "identifier_hash": "00"}),
        )
        .await
        .unwrap();
    assert_error(&lookup, 400, ErrorCode::RequestMalformed);
    let message = lookup.body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("identifier_hash:"), "{message}");
}

/// Each network has its own identifiers: one network can neither probe nor take another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_are_per_network() {
    let relay = ControlRelay::start("identifier_namespaces");
    let hidden = user(GATEKEEPER, 0x11);
    let theirs = user(PARTNER, 0x21);
    let asker = user(GATEKEEPER, 0x12);
    let number = "+491701112233";
    relay
        .enlist(
            &hidden,
            &Enlist {
                discoverable: false,
                identifiers: vec![("phone", number.into())],
                ..Enlist::default()
            },
        )
        .await;
    // The partner's user may hold the same number: no clash is reported across networks.
    let same = relay
        .try_enlist(
            &theirs,
            &Enlist {
                identifiers: vec![("phone", number.into())],
                ..Enlist::default()
            },
        )
        .await;
    assert_eq!(same.status, 201, "{}", same.body);
    relay.enlist(&asker, &Enlist::default()).await;
    let found = ok(relay
        .api(Who::Gatekeeper)
        .post(
            "/v1/discovery/bulk",
            &json!({"requester": user_hex(&asker), "identifier_hashes": [hash_of("phone", number)]}),
        )
        .await
        .unwrap());
    let matches = found["matches"].as_array().unwrap();
    assert_eq!(matches.len(), 1, "{found}");
    assert_eq!(matches[0]["user"]["network"], 2);
}

/// Opting out forgets the user's contacts and requests, in the store too: after a restart
/// and a new enlistment, an old contact starts over with a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_opt_out_old_contacts_start_over() {
    let mut relay = ControlRelay::start("opt_out_contacts");
    let a = user(GATEKEEPER, 0x11);
    let b = user(PARTNER, 0x21);
    relay.enlist(&a, &Enlist::default()).await;
    let request_always = Enlist {
        model: "request_always",
        ..Enlist::default()
    };
    relay.enlist(&b, &request_always).await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let first = envelope(a.device(client::DeviceId(1)), b);
    gatekeeper.send_envelope(&first, b"x").await;
    gatekeeper
        .expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let partner = relay.api(Who::Partner);
    let request = wait_request(&partner, |_| true).await;
    let id = request["id"].as_u64().unwrap();
    ok(partner
        .post(&format!("/v1/requests/{id}/accept"), &json!({}))
        .await
        .unwrap());
    // B opts out; its network cannot decide for it any more; an old consent does not bring
    // it back.
    let old_consent = relay.consent(&b, "request_always", true);
    ok(partner.delete(&user_path(&b)).await.unwrap());
    let stale = partner
        .put(&user_path(&b), &json!({"consent": old_consent}))
        .await
        .unwrap();
    assert_error(&stale, 400, ErrorCode::ConsentInvalid);
    drop(gatekeeper);
    relay.restart(|_| {});
    tokio::time::sleep(Duration::from_millis(5)).await;
    relay.enlist(&b, &request_always).await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let again = envelope(a.device(client::DeviceId(1)), b);
    gatekeeper.send_envelope(&again, b"x").await;
    gatekeeper
        .expect_rejected(again.message_id, ErrorCode::MessageRequestPending)
        .await;
    // A new request, which B's network sees.
    let partner = relay.api(Who::Partner);
    let fresh = wait_request(&partner, |r| r["id"].as_u64() != Some(id)).await;
    assert_eq!(fresh["sender"]["user"], user_hex(&a));
}

/// Re-enlisting (a fresh consent) without a device list keeps the devices and the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_enlisting_without_devices_keeps_them() {
    let relay = ControlRelay::start("re_enlist_devices");
    let a = user(GATEKEEPER, 0x11);
    let b = user(PARTNER, 0x21);
    relay.enlist(&a, &Enlist::default()).await;
    relay
        .enlist(
            &b,
            &Enlist {
                devices: vec![1, 2],
                ..Enlist::default()
            },
        )
        .await;
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let queued = envelope(a.device(client::DeviceId(1)), b);
    gatekeeper.send_accepted(&queued, b"waiting").await;
    let renewed = ok(relay
        .api(Who::Partner)
        .put(
            &user_path(&b),
            &json!({"consent": relay.consent(&b, "everyone", true)}),
        )
        .await
        .unwrap());
    assert_eq!(renewed["devices"], json!([1, 2]));
    let mut partner = relay.session(PARTNER).await;
    let delivered = partner.expect_deliveries(2).await;
    assert!(delivered.iter().all(|d| d.id() == queued.message_id));
}

/// A suspended network may read and opt its users out, nothing more; a device token valid
/// for more than a day is refused; a fingerprint listed twice (in any case) is refused and
/// the registry still loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_networks_tokens_and_duplicate_fingerprints() {
    let mut relay = ControlRelay::start("suspended_writes");
    let b = user(PARTNER, 0x21);
    relay.enlist(&b, &Enlist::default()).await;
    let operator = relay.api(Who::Operator);
    ok(operator
        .post(
            "/v1/partners/2/status",
            &json!({"status": "suspended", "reason": "audit", "ground": "integrity"}),
        )
        .await
        .unwrap());
    let partner = relay.api(Who::Partner);
    let write = partner
        .put(
            &format!("{}/devices", user_path(&b)),
            &json!({"devices": [1]}),
        )
        .await
        .unwrap();
    assert_error(&write, 403, ErrorCode::PartnerSuspended);
    ok(partner.get(&user_path(&b)).await.unwrap());
    ok(partner.delete(&user_path(&b)).await.unwrap());

    let device = user(GATEKEEPER, 0x11).device(client::DeviceId(1));
    let key = std::fs::read(relay.pki("gatekeeper-token.pk8")).unwrap();
    let token =
        client::mint_device_token(&key, device, common::now_ms() + 48 * 3_600_000, 77).unwrap();
    let options = client::ConnectOptions::new(relay.addr, relay.tls(None), client::Role::Device)
        .token(token)
        .connect_timeout(common::STEP_TIMEOUT);
    match client::connect(options).await {
        Err(client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::TokenInvalid.as_u16())
        }
        Err(other) => panic!("expected TOKEN_INVALID, got {other}"),
        Ok(_) => panic!("a two-day token was accepted"),
    }

    let three = relay.new_network(3);
    let mut body = relay.partner_body(&three, "testing");
    body["cert_sha256"] = json!([three.fingerprint, three.fingerprint.to_ascii_uppercase()]);
    assert_error(
        &operator.post("/v1/partners", &body).await.unwrap(),
        400,
        ErrorCode::RequestMalformed,
    );
    relay.restart(|_| {});
    ok(relay.api(Who::Operator).get("/v1/partners").await.unwrap());
}

/// A suspension reaches the network's direct device sessions too: told, then closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_closes_direct_device_sessions() {
    let relay = ControlRelay::start("suspend_devices");
    let b = user(PARTNER, 0x21);
    relay.enlist(&b, &Enlist::default()).await;
    let key = std::fs::read(relay.pki("partner-token.pk8")).unwrap();
    let token = client::mint_device_token(
        &key,
        b.device(client::DeviceId(1)),
        common::now_ms() + 3_600_000,
        91,
    )
    .unwrap();
    let options = client::ConnectOptions::new(relay.addr, relay.tls(None), client::Role::Device)
        .token(token)
        .connect_timeout(common::STEP_TIMEOUT);
    let mut device = common::Session::new("device", client::connect(options).await.unwrap());
    // The device is bound before the suspension is ordered.
    tokio::time::sleep(Duration::from_millis(50)).await;
    ok(relay
        .api(Who::Operator)
        .post(
            "/v1/partners/2/status",
            &json!({"status": "suspended", "reason": "audit", "ground": "privacy"}),
        )
        .await
        .unwrap());
    match device.event().await {
        Event::Notice(notice) => assert_eq!(notice.kind, NoticeKind::Suspension),
        other => panic!("expected the suspension notice, got {other:?}"),
    }
    device.expect_error(ErrorCode::PartnerSuspended).await;
}

/// A control change that a stalled core cannot take in time is answered
/// `DATA_PLANE_UNAVAILABLE` (503) and changes nothing: neither the stored record nor the
/// shard's device set, not even once the core resumes and finds the abandoned change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_a_stalled_core_cannot_take_changes_nothing() {
    let relay = ControlRelay::start("stalled_core");
    let a = user(GATEKEEPER, 0x11);
    let b = user(PARTNER, 0x21);
    relay.enlist(&a, &Enlist::default()).await;
    relay.enlist(&b, &Enlist::default()).await;
    let shared = relay.server().relay.shared.clone();
    let hold = common::hold_core(&shared, relay::core::shard_of(&b, shared.cores)).await;
    let devices = format!("{}/devices", user_path(&b));
    let answer = relay
        .api(Who::Partner)
        .put(&devices, &json!({"devices": [1, 2]}))
        .await
        .unwrap();
    assert_error(&answer, 503, ErrorCode::DataPlaneUnavailable);
    drop(hold);
    common::settle_cores(&shared).await;
    let record = ok(relay.api(Who::Partner).get(&user_path(&b)).await.unwrap());
    assert_eq!(record["devices"], json!([1]), "the stored record changed");
    // The shard still knows device 1 only: an envelope listing exactly that set is accepted.
    let mut gatekeeper = relay.session(GATEKEEPER).await;
    let listed = common::envelope_listed(a.device(client::DeviceId(1)), b, &[1]);
    gatekeeper.send_accepted(&listed, b"still one device").await;
    // And a change the core can take goes through.
    ok(relay
        .api(Who::Partner)
        .put(&devices, &json!({"devices": [1, 2]}))
        .await
        .unwrap());
}
