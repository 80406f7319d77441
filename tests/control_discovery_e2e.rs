//! Discovery end to end, over real sockets (issue point 4): single and bulk lookups by
//! identifier hash, what a miss looks like (the same whatever the reason), the batch and
//! rate limits, who may ask, opted-out users, and a changed identifier (the old one moves
//! for contacts only, during the grace period; messages in flight still arrive).

mod common;

use std::collections::BTreeMap;

use client::control::{ApiResponse, user_hex};
use client::{ErrorCode, UserAddress};
use common::control::{ControlRelay, Enlist, Who, assert_error, hash_of, ok, user_path};
use common::{GATEKEEPER, PARTNER, STEP_TIMEOUT, envelope, payload, user};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

// --- helpers ---

/// A German mobile number in E.164 normal form, distinct per `n`.
fn phone(n: u32) -> String {
    format!("+49170{n:07}")
}

/// Enlisted under `model`, discoverable or not, with these identifiers and devices, seen in
/// Germany just now.
fn enlist(
    model: &'static str,
    discoverable: bool,
    identifiers: Vec<(&'static str, String)>,
    devices: Vec<u32>,
) -> Enlist {
    Enlist {
        model,
        discoverable,
        devices,
        identifiers,
        ..Enlist::default()
    }
}

/// A requester: enlisted, reachable by everyone, not discoverable, no identifiers.
fn requester() -> Enlist {
    enlist("everyone", false, Vec::new(), vec![1])
}

fn user_json(user: &UserAddress) -> Value {
    json!({"network": user.network.0, "user": user_hex(user)})
}

async fn lookup(relay: &ControlRelay, requester: &UserAddress, hash: &str) -> ApiResponse {
    relay
        .api_of(requester)
        .post(
            "/v1/discovery/lookup",
            &json!({"requester": user_hex(requester), "identifier_hash": hash}),
        )
        .await
        .expect("lookup call")
}

async fn bulk(relay: &ControlRelay, requester: &UserAddress, hashes: &[String]) -> ApiResponse {
    relay
        .api_of(requester)
        .post(
            "/v1/discovery/bulk",
            &json!({"requester": user_hex(requester), "identifier_hashes": hashes}),
        )
        .await
        .expect("bulk discovery call")
}

/// The matches of a successful bulk answer, by identifier hash (each hash at most once).
fn matches_of(response: ApiResponse) -> BTreeMap<String, Value> {
    let body = ok(response);
    let list = body["matches"]
        .as_array()
        .unwrap_or_else(|| panic!("a bulk answer lists matches: {body}"));
    let mut out = BTreeMap::new();
    for found in list {
        let hash = found["identifier_hash"]
            .as_str()
            .unwrap_or_else(|| panic!("a match names its hash: {found}"))
            .to_string();
        assert!(
            out.insert(hash, found.clone()).is_none(),
            "a hash asked once is answered once: {body}"
        );
    }
    out
}

/// A lookup that found nothing: 404 `NOT_FOUND`, as for an identifier nobody registered.
#[track_caller]
fn assert_not_found(response: &ApiResponse) {
    assert_error(response, 404, ErrorCode::NotFound);
}

/// A POST over TLS with `stem`'s client certificate, read back byte for byte: the status and
/// the exact body bytes (what a prober would compare).
async fn raw_post(relay: &ControlRelay, stem: &str, path: &str, body: &Value) -> (u16, Vec<u8>) {
    let exchange = async {
        let tcp = TcpStream::connect(relay.http).await.expect("TCP connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let mut tls = TlsConnector::from(relay.tls(Some(stem)).config().clone())
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let body = serde_json::to_vec(body).expect("JSON");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.expect("write head");
        tls.write_all(&body).await.expect("write body");
        tls.flush().await.expect("flush");
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        answer
    };
    let answer = tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .expect("the raw exchange ends in time");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP head");
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = answer[split + 4..].to_vec();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the answer has a content-length: {head}"));
    assert_eq!(body.len(), length, "the whole body was read");
    (status, body)
}

// --- lookups ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_finds_an_enlisted_discoverable_user() {
    let relay = ControlRelay::start("discovery-lookup");
    let target = user(GATEKEEPER, 0xD101_0001);
    let asker = user(PARTNER, 0xD101_0002);
    // Entered with formatting; discovery hashes the normal form.
    relay
        .enlist(
            &target,
            &enlist(
                "everyone",
                true,
                vec![("phone", "+49 170 1010001".into())],
                vec![1, 2, 3],
            ),
        )
        .await;
    relay.enlist(&asker, &requester()).await;

    let hash = hash_of("phone", "+491701010001");
    let found = ok(lookup(&relay, &asker, &hash).await);
    assert_eq!(
        found,
        json!({
            "identifier_hash": hash,
            "user": user_json(&target),
            "contact": "direct",
            "devices": [1, 2, 3],
        }),
        "a direct match names the user and its devices, and nothing else"
    );
    // Hex digits in either case: the answer names the hash in lower case.
    let upper = ok(lookup(&relay, &asker, &hash.to_ascii_uppercase()).await);
    assert_eq!(upper, found);
    // The devices listed are the user's current set.
    ok(relay
        .api(Who::Gatekeeper)
        .put(
            &format!("{}/devices", user_path(&target)),
            &json!({"devices": [2, 5]}),
        )
        .await
        .unwrap());
    let found = ok(lookup(&relay, &asker, &hash).await);
    assert_eq!(found["devices"], json!([2, 5]), "{found}");

    // The same rules the other way round: the gatekeeper's users discover a partner's user.
    let partner_user = user(PARTNER, 0xD101_0003);
    let gk_asker = user(GATEKEEPER, 0xD101_0004);
    relay
        .enlist(
            &partner_user,
            &enlist(
                "everyone",
                true,
                vec![("email", "Dora.D101@Example.ORG".into())],
                vec![7],
            ),
        )
        .await;
    relay.enlist(&gk_asker, &requester()).await;
    let email = hash_of("email", "dora.d101@example.org");
    let found = ok(lookup(&relay, &gk_asker, &email).await);
    assert_eq!(
        found,
        json!({
            "identifier_hash": email,
            "user": user_json(&partner_user),
            "contact": "direct",
            "devices": [7],
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_user_and_an_unknown_identifier_look_the_same() {
    let relay = ControlRelay::start("discovery-misses");
    let asker = user(PARTNER, 0xD102_0001);
    let hidden = user(GATEKEEPER, 0xD102_0002);
    let visible = user(GATEKEEPER, 0xD102_0003);
    let outside = user(GATEKEEPER, 0xD102_0004);
    relay.enlist(&asker, &requester()).await;
    relay
        .enlist(
            &hidden,
            &enlist(
                "everyone",
                false,
                vec![("phone", phone(1_020_002))],
                vec![1],
            ),
        )
        .await;
    relay
        .enlist(
            &visible,
            &enlist("everyone", true, vec![("phone", phone(1_020_003))], vec![1]),
        )
        .await;
    // Discoverable, but without any location attestation: it does not meet the rule, so
    // nobody can reach it, so nobody finds it.
    relay
        .enlist(
            &outside,
            &Enlist {
                location: None,
                ..enlist("everyone", true, vec![("phone", phone(1_020_004))], vec![1])
            },
        )
        .await;

    let hidden_hash = hash_of("phone", &phone(1_020_002));
    let unknown_hash = hash_of("phone", &phone(1_020_099));
    let outside_hash = hash_of("phone", &phone(1_020_004));
    let visible_hash = hash_of("phone", &phone(1_020_003));
    // Not even an identifier's hash: 64 hex digits nobody registered.
    let random_hash = "5a".repeat(32);

    // The control case: the lookup works at all.
    ok(lookup(&relay, &asker, &visible_hash).await);

    let body = |hash: &str| json!({"requester": user_hex(&asker), "identifier_hash": hash});
    let (status, unknown_bytes) = raw_post(
        &relay,
        "partner",
        "/v1/discovery/lookup",
        &body(&unknown_hash),
    )
    .await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&unknown_bytes));
    for (what, hash) in [
        ("not discoverable", &hidden_hash),
        ("outside the region", &outside_hash),
        ("not an identifier", &random_hash),
    ] {
        let (status, bytes) =
            raw_post(&relay, "partner", "/v1/discovery/lookup", &body(hash)).await;
        assert_eq!(
            (status, bytes.as_slice()),
            (404, unknown_bytes.as_slice()),
            "a user {what} must look exactly like an identifier nobody registered: {} vs {}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&unknown_bytes)
        );
        let response = lookup(&relay, &asker, hash).await;
        assert_not_found(&response);
        assert_eq!(response.retry_after_s, None);
    }
    // In a batch, each is simply absent.
    let matches = matches_of(
        bulk(
            &relay,
            &asker,
            &[
                hidden_hash.clone(),
                unknown_hash.clone(),
                outside_hash.clone(),
                random_hash.clone(),
                visible_hash.clone(),
            ],
        )
        .await,
    );
    assert_eq!(
        matches.keys().cloned().collect::<Vec<_>>(),
        [visible_hash],
        "only the discoverable, reachable user comes back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_discovery_returns_exactly_the_enlisted_discoverable_subset() {
    let relay = ControlRelay::start("discovery-bulk");
    let asker = user(PARTNER, 0xD103_0001);
    let asker_phone = phone(1_030_001);
    relay
        .enlist(
            &asker,
            &enlist(
                "everyone",
                false,
                vec![("phone", asker_phone.clone())],
                vec![1],
            ),
        )
        .await;

    let everyone = user(GATEKEEPER, 0xD103_0002);
    let always = user(GATEKEEPER, 0xD103_0003);
    let hidden = user(GATEKEEPER, 0xD103_0004);
    let by_name = user(GATEKEEPER, 0xD103_0005);
    let knows_asker = user(GATEKEEPER, 0xD103_0006);
    let unknown_model = user(GATEKEEPER, 0xD103_0007);
    let per_network = user(GATEKEEPER, 0xD103_0008);
    let opted_out = user(GATEKEEPER, 0xD103_0009);

    relay
        .enlist(
            &everyone,
            &enlist(
                "everyone",
                true,
                vec![("phone", phone(1_030_002))],
                vec![1, 2],
            ),
        )
        .await;
    relay
        .enlist(
            &always,
            &enlist(
                "request_always",
                true,
                vec![("email", "always.d103@example.org".into())],
                vec![1, 2],
            ),
        )
        .await;
    relay
        .enlist(
            &hidden,
            &enlist(
                "everyone",
                false,
                vec![("phone", phone(1_030_004))],
                vec![1],
            ),
        )
        .await;
    relay
        .enlist(
            &by_name,
            &enlist(
                "everyone",
                true,
                vec![("username", "Dee_D103".into())],
                vec![4],
            ),
        )
        .await;
    // Model iii with the asker in its contact book: direct; without: a request.
    relay
        .enlist(
            &knows_asker,
            &enlist(
                "request_unknown",
                true,
                vec![("phone", phone(1_030_006))],
                vec![3],
            ),
        )
        .await;
    ok(relay
        .api(Who::Gatekeeper)
        .put(
            &format!("{}/contact-book", user_path(&knows_asker)),
            &json!({"hashes": [hash_of("phone", &asker_phone)]}),
        )
        .await
        .unwrap());
    relay
        .enlist(
            &unknown_model,
            &enlist(
                "request_unknown",
                true,
                vec![("phone", phone(1_030_007))],
                vec![1],
            ),
        )
        .await;
    relay
        .enlist(
            &per_network,
            &enlist(
                "request_per_network",
                true,
                vec![("phone", phone(1_030_008))],
                vec![1],
            ),
        )
        .await;
    relay
        .enlist(
            &opted_out,
            &enlist("everyone", true, vec![("phone", phone(1_030_009))], vec![1]),
        )
        .await;
    ok(relay
        .api(Who::Gatekeeper)
        .delete(&user_path(&opted_out))
        .await
        .unwrap());

    let h = |kind: &str, value: &str| hash_of(kind, value);
    let expected: BTreeMap<String, Value> = [
        (
            h("phone", &phone(1_030_002)),
            json!({"user": user_json(&everyone), "contact": "direct", "devices": [1, 2]}),
        ),
        (
            h("email", "always.d103@example.org"),
            json!({"user": user_json(&always), "contact": "request"}),
        ),
        (
            h("username", "dee_d103"),
            json!({"user": user_json(&by_name), "contact": "direct", "devices": [4]}),
        ),
        (
            h("phone", &phone(1_030_006)),
            json!({"user": user_json(&knows_asker), "contact": "direct", "devices": [3]}),
        ),
        (
            h("phone", &phone(1_030_007)),
            json!({"user": user_json(&unknown_model), "contact": "request"}),
        ),
        (
            h("phone", &phone(1_030_008)),
            json!({"user": user_json(&per_network), "contact": "request"}),
        ),
    ]
    .into_iter()
    .map(|(hash, mut m)| {
        m["identifier_hash"] = json!(hash);
        (hash, m)
    })
    .collect();

    // A phone book as a network would send it: its hits mixed with misses of every kind.
    let phone_book = vec![
        h("phone", &phone(1_030_900)),
        h("phone", &phone(1_030_002)),
        h("phone", &phone(1_030_004)),
        h("email", "always.d103@example.org"),
        h("phone", &phone(1_030_009)),
        h("username", "dee_d103"),
        h("email", "nobody.d103@example.org"),
        h("phone", &phone(1_030_006)),
        h("phone", &asker_phone),
        h("phone", &phone(1_030_007)),
        h("phone", &phone(1_030_008)),
        h("username", "nobody_d103"),
    ];
    let matches = matches_of(bulk(&relay, &asker, &phone_book).await);
    assert_eq!(
        matches.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "exactly the enlisted, discoverable, reachable users of the phone book"
    );
    for (hash, want) in &expected {
        assert_eq!(
            &matches[hash], want,
            "a `request` match gives no devices; a `direct` one lists them"
        );
    }

    // Discovery only looks: nothing became a message request, and a request match still
    // refuses the first envelope as a request.
    let pending = ok(relay
        .api(Who::Gatekeeper)
        .get("/v1/requests?state=pending")
        .await
        .unwrap());
    assert_eq!(pending["requests"], json!([]), "{pending}");
    let mut partner = relay.session(PARTNER).await;
    let first = envelope(asker.device(client::DeviceId(1)), always);
    partner.send_envelope(&first, b"hello").await;
    partner
        .expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let direct = envelope(asker.device(client::DeviceId(1)), everyone);
    partner.send_accepted(&direct, b"hello").await;
}

// --- limits ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_request_past_the_batch_limit_is_refused() {
    let relay = ControlRelay::start_configured("discovery-batch", |config| {
        config.interop.discovery_batch_max = 5;
    });
    let asker = user(PARTNER, 0xD104_0001);
    let target = user(GATEKEEPER, 0xD104_0002);
    relay.enlist(&asker, &requester()).await;
    relay
        .enlist(
            &target,
            &enlist("everyone", true, vec![("phone", phone(1_040_002))], vec![1]),
        )
        .await;
    let mut book: Vec<String> = (10..14).map(|n| hash_of("phone", &phone(n))).collect();
    book.push(hash_of("phone", &phone(1_040_002)));
    assert_eq!(book.len(), 5);
    let matches = matches_of(bulk(&relay, &asker, &book).await);
    assert_eq!(matches.len(), 1, "at the limit, the batch is answered");

    book.push(hash_of("phone", &phone(14)));
    let refused = bulk(&relay, &asker, &book).await;
    assert_error(&refused, 400, ErrorCode::DiscoveryBatchTooLarge);
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains('5')),
        "the refusal names the limit: {}",
        refused.body
    );
    // Far past it: the same, not a partial answer.
    let huge: Vec<String> = (100..400).map(|n| hash_of("phone", &phone(n))).collect();
    assert_error(
        &bulk(&relay, &asker, &huge).await,
        400,
        ErrorCode::DiscoveryBatchTooLarge,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_rate_limited_per_user_and_per_partner() {
    let relay = ControlRelay::start_configured("discovery-rate", |config| {
        config.interop.discovery_per_user_per_day = 10;
        config.interop.discovery_per_partner_per_min = 20;
    });
    let target = user(GATEKEEPER, 0xD105_0001);
    let target_hash = hash_of("phone", &phone(1_050_001));
    relay
        .enlist(
            &target,
            &enlist("everyone", true, vec![("phone", phone(1_050_001))], vec![1]),
        )
        .await;
    let first = user(PARTNER, 0xD105_0002);
    let second = user(PARTNER, 0xD105_0003);
    let third = user(PARTNER, 0xD105_0004);
    let gk_asker = user(GATEKEEPER, 0xD105_0005);
    let partner_target = user(PARTNER, 0xD105_0006);
    let partner_target_hash = hash_of("phone", &phone(1_050_006));
    relay
        .enlist(
            &partner_target,
            &enlist("everyone", true, vec![("phone", phone(1_050_006))], vec![1]),
        )
        .await;
    for asker in [first, second, third, gk_asker] {
        relay.enlist(&asker, &requester()).await;
    }
    let ten: Vec<String> = (0..9)
        .map(|n| hash_of("phone", &phone(1_050_100 + n)))
        .chain([target_hash.clone()])
        .collect();

    // The first user spends its day's budget (10): the partner bucket has 10 of 20 left.
    assert_eq!(matches_of(bulk(&relay, &first, &ten).await).len(), 1);
    let limited = lookup(&relay, &first, &target_hash).await;
    assert_error(&limited, 429, ErrorCode::RateLimited);
    let wait = limited
        .retry_after_s
        .expect("a rate-limited answer says when to retry (Retry-After)");
    assert!(
        wait > 3600 && wait <= 86_400,
        "the user's bucket refills over a day: one lookup in {wait} s"
    );
    let bulk_limited = bulk(&relay, &first, std::slice::from_ref(&target_hash)).await;
    assert_error(&bulk_limited, 429, ErrorCode::RateLimited);
    assert!(bulk_limited.retry_after_s.is_some());

    // A second user of the same partner: its own budget, and the partner's last 10.
    assert_eq!(matches_of(bulk(&relay, &second, &ten).await).len(), 1);

    // A third user has its whole day's budget, but the partner has none left.
    let partner_limited = bulk(&relay, &third, &ten).await;
    assert_error(&partner_limited, 429, ErrorCode::RateLimited);
    let wait = partner_limited
        .retry_after_s
        .expect("a rate-limited answer says when to retry (Retry-After)");
    assert!(
        (1..=60).contains(&wait),
        "the partner's bucket refills within the minute: {wait} s"
    );

    // Another network's bucket is its own: the gatekeeper's users still look up.
    let found = ok(lookup(&relay, &gk_asker, &partner_target_hash).await);
    assert_eq!(found["user"], user_json(&partner_target));
}

// --- who may ask, and what ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hashes_are_refused() {
    let relay = ControlRelay::start("discovery-malformed");
    let asker = user(PARTNER, 0xD106_0001);
    let target = user(GATEKEEPER, 0xD106_0002);
    relay.enlist(&asker, &requester()).await;
    relay
        .enlist(
            &target,
            &enlist("everyone", true, vec![("phone", phone(1_060_002))], vec![1]),
        )
        .await;
    let good = hash_of("phone", &phone(1_060_002));
    let bad = [
        String::new(),
        "zz".into(),
        "ab".repeat(31) + "a",
        "ab".repeat(33),
        "g".repeat(64),
        format!("{}+", &good[..63]),
        format!("0x{}", &good[..62]),
        "+491701060002".into(),
    ];
    for hash in &bad {
        assert_error(
            &lookup(&relay, &asker, hash).await,
            400,
            ErrorCode::RequestMalformed,
        );
        // One bad hash spoils the batch: no partial answer.
        assert_error(
            &bulk(&relay, &asker, &[good.clone(), hash.clone()]).await,
            400,
            ErrorCode::RequestMalformed,
        );
    }
    let api = relay.api(Who::Partner);
    let requester = user_hex(&asker);
    for body in [
        json!({"requester": requester, "identifier_hashes": [good, 12]}),
        json!({"requester": requester, "identifier_hashes": good}),
        json!({"requester": requester}),
        json!({"requester": "not-hex", "identifier_hashes": [good]}),
        json!({"requester": "ab".repeat(17), "identifier_hashes": [good]}),
        json!({"requester": requester, "identifier_hashes": [good], "extra": true}),
        json!([good]),
    ] {
        let response = api.post("/v1/discovery/bulk", &body).await.unwrap();
        assert_error(&response, 400, ErrorCode::RequestMalformed);
    }
    for body in [
        json!({"requester": requester, "identifier_hash": 7}),
        json!({"requester": requester}),
        json!({"requester": requester, "identifier_hashes": [good]}),
    ] {
        let response = api.post("/v1/discovery/lookup", &body).await.unwrap();
        assert_error(&response, 400, ErrorCode::RequestMalformed);
    }
    let not_json = api
        .call_raw("POST", "/v1/discovery/lookup", "{not json".into())
        .await
        .unwrap();
    assert_error(&not_json, 400, ErrorCode::RequestMalformed);
    // And the well-formed request still works.
    ok(lookup(&relay, &asker, &good).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_must_be_an_enlisted_user_of_the_caller() {
    let relay = ControlRelay::start("discovery-requester");
    let target = user(GATEKEEPER, 0xD107_0001);
    let hash = hash_of("phone", &phone(1_070_001));
    relay
        .enlist(
            &target,
            &enlist("everyone", true, vec![("phone", phone(1_070_001))], vec![1]),
        )
        .await;

    let never = user(PARTNER, 0xD107_0002);
    for response in [
        lookup(&relay, &never, &hash).await,
        bulk(&relay, &never, std::slice::from_ref(&hash)).await,
    ] {
        assert_error(&response, 403, ErrorCode::SenderNotEnlisted);
    }

    // A user who opted out is no longer a requester.
    let left = user(PARTNER, 0xD107_0003);
    relay.enlist(&left, &requester()).await;
    ok(lookup(&relay, &left, &hash).await);
    ok(relay
        .api(Who::Partner)
        .delete(&user_path(&left))
        .await
        .unwrap());
    assert_error(
        &lookup(&relay, &left, &hash).await,
        403,
        ErrorCode::SenderNotEnlisted,
    );

    // The requester is a user of the calling network: the partner cannot borrow the id of
    // an enlisted gatekeeper user.
    let gk_user = user(GATEKEEPER, 0xD107_0004);
    relay.enlist(&gk_user, &requester()).await;
    let borrowed = relay
        .api(Who::Partner)
        .post(
            "/v1/discovery/lookup",
            &json!({"requester": user_hex(&gk_user), "identifier_hash": hash}),
        )
        .await
        .unwrap();
    assert_error(&borrowed, 403, ErrorCode::SenderNotEnlisted);

    // A requester outside the region may not discover (it could not write anyway).
    let abroad = user(PARTNER, 0xD107_0005);
    relay
        .enlist(
            &abroad,
            &Enlist {
                location: Some(("US", 0)),
                ..requester()
            },
        )
        .await;
    assert_error(
        &lookup(&relay, &abroad, &hash).await,
        403,
        ErrorCode::SenderOutsideRegion,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_needs_a_network_certificate() {
    let relay = ControlRelay::start("discovery-cert");
    let asker = user(PARTNER, 0xD108_0001);
    relay.enlist(&asker, &requester()).await;
    let hash = hash_of("phone", &phone(1_080_001));
    let lookup_body = json!({"requester": user_hex(&asker), "identifier_hash": hash});
    let bulk_body = json!({"requester": user_hex(&asker), "identifier_hashes": [hash]});
    let anonymous = relay.api(Who::Anonymous);
    for (path, body) in [
        ("/v1/discovery/lookup", &lookup_body),
        ("/v1/discovery/bulk", &bulk_body),
    ] {
        let response = anonymous.post(path, body).await.unwrap();
        assert_error(&response, 401, ErrorCode::CertificateRequired);
        // The operator runs the relay; it does not look users up.
        let response = relay.api(Who::Operator).post(path, body).await.unwrap();
        assert_error(&response, 403, ErrorCode::ForeignResource);
    }
    // With the network's certificate, the same request is answered.
    assert_not_found(&lookup(&relay, &asker, &hash).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opted_out_user_stops_resolving() {
    let relay = ControlRelay::start("discovery-opt-out");
    let asker = user(PARTNER, 0xD109_0001);
    let target = user(GATEKEEPER, 0xD109_0002);
    relay.enlist(&asker, &requester()).await;
    relay
        .enlist(
            &target,
            &enlist(
                "everyone",
                true,
                vec![
                    ("phone", phone(1_090_002)),
                    ("username", "leaver_d109".into()),
                ],
                vec![1],
            ),
        )
        .await;
    let hashes = [
        hash_of("phone", &phone(1_090_002)),
        hash_of("username", "leaver_d109"),
    ];
    for hash in &hashes {
        ok(lookup(&relay, &asker, hash).await);
    }
    ok(relay
        .api(Who::Gatekeeper)
        .delete(&user_path(&target))
        .await
        .unwrap());
    let unknown = lookup(&relay, &asker, &hash_of("phone", &phone(1_090_099))).await;
    assert_not_found(&unknown);
    for hash in &hashes {
        let response = lookup(&relay, &asker, hash).await;
        assert_eq!(
            (response.status, &response.body),
            (unknown.status, &unknown.body),
            "an opted-out user looks like one who never registered"
        );
    }
    assert!(matches_of(bulk(&relay, &asker, &hashes).await).is_empty());
}

// --- a changed identifier ---

/// Changes one of `user`'s phone numbers through its network's API.
async fn change_phone(relay: &ControlRelay, user: &UserAddress, old: &str, new: &str) -> Value {
    ok(relay
        .api_of(user)
        .post(
            &format!("{}/identifiers/change", user_path(user)),
            &json!({"old": {"type": "phone", "value": old}, "new": {"type": "phone", "value": new}}),
        )
        .await
        .unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_identifier_moves_for_contacts_and_messages_in_flight_arrive() {
    let relay = ControlRelay::start("discovery-change");
    // The user who changes its number (partner network), and gatekeeper users who look it up.
    let mover = user(PARTNER, 0xD10A_0001);
    let old = phone(1_100_001);
    let new = phone(1_100_901);
    let stranger = user(GATEKEEPER, 0xD10A_0002);
    let wrote_to_mover = user(GATEKEEPER, 0xD10A_0003);
    let in_book = user(GATEKEEPER, 0xD10A_0004);
    let written_by_mover = user(GATEKEEPER, 0xD10A_0005);
    relay
        .enlist(
            &mover,
            &enlist("everyone", true, vec![("phone", old.clone())], vec![1]),
        )
        .await;
    relay.enlist(&stranger, &requester()).await;
    relay.enlist(&wrote_to_mover, &requester()).await;
    relay
        .enlist(
            &in_book,
            &enlist(
                "everyone",
                false,
                vec![("phone", phone(1_100_004))],
                vec![1],
            ),
        )
        .await;
    relay.enlist(&written_by_mover, &requester()).await;
    ok(relay
        .api(Who::Partner)
        .put(
            &format!("{}/contact-book", user_path(&mover)),
            &json!({"hashes": [hash_of("phone", &phone(1_100_004))]}),
        )
        .await
        .unwrap());

    let mut gk = relay.session(GATEKEEPER).await;
    {
        // The mover writes first to one user, then its network's server goes away.
        let mut partner = relay.session(PARTNER).await;
        let hello = envelope(mover.device(client::DeviceId(1)), written_by_mover);
        partner.send_accepted(&hello, b"hello from the mover").await;
        partner.close().await;
        let carried = gk.expect_delivery().await;
        assert_eq!(carried.envelope().0, &hello);
        gk.ack_delivery(&carried).await;
    }
    // A message to the mover while its network is offline: in flight across the change.
    let in_flight = envelope(wrote_to_mover.device(client::DeviceId(1)), mover);
    let in_flight_body = payload("in flight across the change", 700);
    gk.send_accepted(&in_flight, &in_flight_body).await;

    let old_hash = hash_of("phone", &old);
    let new_hash = hash_of("phone", &new);
    for asker in [stranger, wrote_to_mover, in_book, written_by_mover] {
        ok(lookup(&relay, &asker, &old_hash).await);
        assert_not_found(&lookup(&relay, &asker, &new_hash).await);
    }

    let record = change_phone(&relay, &mover, &old, &new).await;
    assert_eq!(
        record["identifiers"],
        json!([{"type": "phone", "value": new}]),
        "{record}"
    );

    // A stranger: the old number is gone (like one never registered); the new one is found.
    let unknown = lookup(&relay, &stranger, &hash_of("phone", &phone(1_100_999))).await;
    let gone = lookup(&relay, &stranger, &old_hash).await;
    assert_not_found(&gone);
    assert_eq!(gone.body, unknown.body);
    let direct = json!({"user": user_json(&mover), "contact": "direct", "devices": [1]});
    let mut want_new = direct.clone();
    want_new["identifier_hash"] = json!(new_hash);
    assert_eq!(ok(lookup(&relay, &stranger, &new_hash).await), want_new);

    // Someone who only wrote to it is not a contact of its own choosing: nothing moves for
    // them (a changed number must not follow a sender its owner wanted to leave behind).
    let one_sided = lookup(&relay, &wrote_to_mover, &old_hash).await;
    assert_not_found(&one_sided);
    assert_eq!(one_sided.body, unknown.body);

    // Contacts of its own doing (in its contact book; written to by it) learn where it went.
    let mut want_moved = direct.clone();
    want_moved["identifier_hash"] = json!(old_hash);
    want_moved["moved_to"] = json!({"type": "phone", "value": new});
    for (why, asker) in [
        ("is in its contact book", in_book),
        ("received a message from it", written_by_mover),
    ] {
        assert_eq!(
            ok(lookup(&relay, &asker, &old_hash).await),
            want_moved,
            "a user who {why} looks up the old number during the grace period"
        );
        let matches = matches_of(bulk(&relay, &asker, &[old_hash.clone(), new_hash.clone()]).await);
        assert_eq!(matches.get(&old_hash), Some(&want_moved));
        assert_eq!(matches.get(&new_hash), Some(&want_new));
    }

    // Routing is on the internal id: the message sent before the change arrives, and so do
    // new ones, both ways.
    let mut partner = relay.session(PARTNER).await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.device, mover.device(client::DeviceId(1)));
    assert_eq!(delivered.envelope().0, &in_flight);
    assert_eq!(delivered.envelope().1.as_ref(), in_flight_body.as_slice());
    partner.ack_delivery(&delivered).await;
    let after = envelope(stranger.device(client::DeviceId(1)), mover);
    gk.send_accepted(&after, b"to the new number").await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &after);
    partner.ack_delivery(&delivered).await;
    let reply = envelope(mover.device(client::DeviceId(1)), wrote_to_mover);
    partner.send_accepted(&reply, b"reply").await;
    let delivered = gk.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &reply);
    gk.ack_delivery(&delivered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_request_makes_a_contact() {
    let relay = ControlRelay::start("discovery-change-request");
    let mover = user(PARTNER, 0xD10B_0001);
    let asker = user(GATEKEEPER, 0xD10B_0002);
    let old = phone(1_110_001);
    let new = phone(1_110_901);
    relay
        .enlist(
            &mover,
            &enlist(
                "request_always",
                true,
                vec![("phone", old.clone())],
                vec![1],
            ),
        )
        .await;
    relay.enlist(&asker, &requester()).await;

    let mut gk = relay.session(GATEKEEPER).await;
    let first = envelope(asker.device(client::DeviceId(1)), mover);
    gk.send_envelope(&first, b"may I?").await;
    gk.expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    let request = wait_pending_request(&relay, &mover).await;
    ok(relay
        .api(Who::Partner)
        .post(&format!("/v1/requests/{request}/accept"), &json!({}))
        .await
        .unwrap());
    change_phone(&relay, &mover, &old, &new).await;

    let found = ok(lookup(&relay, &asker, &hash_of("phone", &old)).await);
    assert_eq!(
        found,
        json!({
            "identifier_hash": hash_of("phone", &old),
            "user": user_json(&mover),
            "contact": "direct",
            "devices": [1],
            "moved_to": {"type": "phone", "value": new},
        })
    );
}

/// The id of the pending request addressed to `recipient`, once the relay recorded it.
async fn wait_pending_request(relay: &ControlRelay, recipient: &UserAddress) -> u64 {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let list = ok(relay
            .api_of(recipient)
            .get("/v1/requests?state=pending")
            .await
            .unwrap());
        let found = list["requests"].as_array().and_then(|requests| {
            requests
                .iter()
                .find(|r| r["recipient"] == user_json(recipient))
                .and_then(|r| r["id"].as_u64())
        });
        if let Some(id) = found {
            return id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pending request for {recipient} within {STEP_TIMEOUT:?}: {list}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_does_not_make_a_contact() {
    // Someone the user never answered (a pending request, refused by the data plane) is not
    // a contact: it must not learn the new number (a number is often changed to get away
    // from exactly such a sender).
    let relay = ControlRelay::start("discovery-change-pending");
    let mover = user(PARTNER, 0xD10C_0001);
    let pest = user(GATEKEEPER, 0xD10C_0002);
    let old = phone(1_120_001);
    let new = phone(1_120_901);
    relay
        .enlist(
            &mover,
            &enlist(
                "request_always",
                true,
                vec![("phone", old.clone())],
                vec![1],
            ),
        )
        .await;
    relay.enlist(&pest, &requester()).await;
    let mut gk = relay.session(GATEKEEPER).await;
    let first = envelope(pest.device(client::DeviceId(1)), mover);
    gk.send_envelope(&first, b"answer me").await;
    gk.expect_rejected(first.message_id, ErrorCode::MessageRequestPending)
        .await;
    wait_pending_request(&relay, &mover).await;
    change_phone(&relay, &mover, &old, &new).await;

    let unknown = lookup(&relay, &pest, &hash_of("phone", &phone(1_120_999))).await;
    let response = lookup(&relay, &pest, &hash_of("phone", &old)).await;
    assert_eq!(
        (response.status, &response.body),
        (unknown.status, &unknown.body),
        "the sender of an unanswered request learnt the new number"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_users_former_identifier_does_not_resolve_for_contacts() {
    // Discovery returns only discoverable users; a user who is not does not become findable
    // through its former identifier.
    let relay = ControlRelay::start("discovery-change-hidden");
    let mover = user(PARTNER, 0xD10D_0001);
    let contact = user(GATEKEEPER, 0xD10D_0002);
    let old = phone(1_130_001);
    let new = phone(1_130_901);
    relay
        .enlist(
            &mover,
            &enlist("everyone", false, vec![("phone", old.clone())], vec![1]),
        )
        .await;
    relay
        .enlist(
            &contact,
            &enlist(
                "everyone",
                false,
                vec![("phone", phone(1_130_002))],
                vec![1],
            ),
        )
        .await;
    ok(relay
        .api(Who::Partner)
        .put(
            &format!("{}/contact-book", user_path(&mover)),
            &json!({"hashes": [hash_of("phone", &phone(1_130_002))]}),
        )
        .await
        .unwrap());
    assert_not_found(&lookup(&relay, &contact, &hash_of("phone", &old)).await);
    change_phone(&relay, &mover, &old, &new).await;
    assert_not_found(&lookup(&relay, &contact, &hash_of("phone", &new)).await);
    let response = lookup(&relay, &contact, &hash_of("phone", &old)).await;
    assert_eq!(
        response.status, 404,
        "a non-discoverable user was found (with its new number) through its former one: {}",
        response.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_the_old_identifier_resolves_for_nobody() {
    let relay = ControlRelay::start_configured("discovery-change-grace", |config| {
        config.interop.identifier_grace_days = 0;
    });
    let mover = user(PARTNER, 0xD10E_0001);
    let contact = user(GATEKEEPER, 0xD10E_0002);
    let old = phone(1_140_001);
    let new = phone(1_140_901);
    relay
        .enlist(
            &mover,
            &enlist("everyone", true, vec![("phone", old.clone())], vec![1]),
        )
        .await;
    relay
        .enlist(
            &contact,
            &enlist(
                "everyone",
                false,
                vec![("phone", phone(1_140_002))],
                vec![1],
            ),
        )
        .await;
    ok(relay
        .api(Who::Partner)
        .put(
            &format!("{}/contact-book", user_path(&mover)),
            &json!({"hashes": [hash_of("phone", &phone(1_140_002))]}),
        )
        .await
        .unwrap());
    change_phone(&relay, &mover, &old, &new).await;
    assert_not_found(&lookup(&relay, &contact, &hash_of("phone", &old)).await);
    let found = ok(lookup(&relay, &contact, &hash_of("phone", &new)).await);
    assert_eq!(found["user"], user_json(&mover));
    assert!(found.get("moved_to").is_none(), "{found}");
}
