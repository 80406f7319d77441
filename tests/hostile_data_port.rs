//! The data port against a hostile internet (issue 11, items 1, 2 and 7): real sockets on
//! loopback, the relay in-process with its deadlines made small through its configuration.
//! Each test asserts that the relay closes or limits the attacker AND that a legitimate
//! partner still connects and delivers (within `STEP_TIMEOUT`, a generous bound).
//!
//! Attackers connect from other loopback addresses (127.0.0.2 and up; all of 127/8 is local
//! on Linux), the legitimate partner from 127.0.0.1, so caps per source address can tell
//! them apart.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use client::{DeviceId, ErrorCode};
use common::{GATEKEEPER, PARTNER, STEP_TIMEOUT, TestRelay, device, envelope, payload, user};
use relay::limits::RelayLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to the relay from `source` (a loopback address).
async fn tcp_from(relay: &TestRelay, source: Ipv4Addr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .expect("bind a loopback source address");
    socket.connect(relay.addr).await.expect("TCP connect")
}

/// Whether the relay ends `stream` (EOF or reset) within `bound`; what it sends is drained.
async fn ended_within(stream: &mut TcpStream, bound: Duration) -> bool {
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, reading).await.is_ok()
}

/// The legitimate partner: a gatekeeper server and a partner server connect (from
/// 127.0.0.1) and one envelope goes across, acknowledged and delivered.
async fn partner_delivers(relay: &TestRelay, tag: &str) {
    let started = Instant::now();
    let gk_user = user(GATEKEEPER, 0x1001);
    let p_user = user(PARTNER, 0x2002);
    let mut gk = relay.server(GATEKEEPER).await;
    let mut partner = relay.server(PARTNER).await;
    partner.declare(p_user, &[1]).await;
    let env = envelope(gk_user.device(DeviceId(1)), p_user);
    let body = payload(tag, 1000);
    gk.send_accepted(&env, &body).await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    partner.ack_delivery(&delivered).await;
    gk.close().await;
    partner.close().await;
    assert!(
        started.elapsed() < STEP_TIMEOUT,
        "{tag}: the partner connected and delivered in {:?}",
        started.elapsed()
    );
}

/// `0400000001010000`: a `Hello` with an empty header (`HEADER_MALFORMED`).
const EMPTY_HELLO: [u8; 8] = [0x04, 0, 0, 0, 0x01, 0x01, 0, 0];

// --- 1. No deadline on the data port ---

/// Raw TCP connections that never start TLS hold slots; with a small handshake deadline they
/// are closed, and a partner connects meanwhile (the unauthenticated ones cannot take the
/// slots authenticated sessions need).
#[tokio::test]
async fn a_silent_tcp_connection_is_closed_at_the_handshake_deadline() {
    let limits = RelayLimits {
        connections_per_core_max: 20,
        unauthenticated_per_core_max: 8,
        tls_handshake_timeout_ms: 2_000,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_slow_handshake", limits);
    let mut silent = Vec::new();
    for i in 0..39u8 {
        silent.push(tcp_from(&relay, Ipv4Addr::new(127, 0, 0, 2 + i % 4)).await);
    }
    // Every slot but one is held by a connection that sends nothing: the partner needs two.
    partner_delivers(&relay, "past the silent crowd").await;
    for stream in &mut silent {
        assert!(
            ended_within(stream, STEP_TIMEOUT).await,
            "a connection that never started TLS is closed"
        );
    }
    let text = relay.metrics_text();
    let timed_out = labelled(
        &text,
        "relay_deadline_closes_total",
        "deadline=\"handshake\"",
    );
    let evicted = relay.metric("relay_unauthenticated_evicted_total");
    assert_eq!(
        timed_out + evicted,
        39,
        "each closed by its deadline or evicted"
    );
    assert!(evicted > 0, "the partner's connections made room");
    relay
        .wait_metric("relay_connections_unauthenticated", |n| n == 0)
        .await;
    relay.stop().await;
}

/// A TLS connection without a certificate that never sends `Hello` is closed with
/// `HELLO_REQUIRED` at the Hello deadline, which starts once TLS is up.
#[tokio::test]
async fn a_tls_session_without_hello_is_closed_at_the_hello_deadline() {
    let limits = RelayLimits {
        hello_timeout_ms: 1_000,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_no_hello", limits);
    let mut raw = relay.raw_tls(&relay.tls(None)).await;
    assert!(raw.expect_error(ErrorCode::HelloRequired).await, "fatal");
    raw.expect_end().await;
    let text = relay.metrics_text();
    assert_eq!(
        labelled(&text, "relay_deadline_closes_total", "deadline=\"hello\""),
        1
    );
    partner_delivers(&relay, "after the silent TLS session").await;
    relay.stop().await;
}

/// The sum of `name`'s samples whose labels contain `label`.
fn labelled(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

// --- 2. Before authentication only Hello ---

/// 1,000 malformed `Hello`s without a certificate: one fatal `Error`, then the end.
#[tokio::test]
async fn pre_auth_garbage_ends_the_session_with_one_error() {
    let mut relay = TestRelay::start("hostile_garbage");
    let mut raw = relay.raw_tls(&relay.tls(None)).await;
    let garbage: Vec<u8> = EMPTY_HELLO.repeat(1000);
    raw.write(&garbage).await;
    assert!(
        raw.expect_error(ErrorCode::HeaderMalformed).await,
        "an error before authentication is fatal"
    );
    raw.expect_end().await;
    assert_eq!(relay.metric("relay_errors_total"), 1);
    partner_delivers(&relay, "after the garbage").await;
    relay.stop().await;
}

/// A connection that writes 800 KB of garbage and never reads gets one error out of the
/// relay and is closed: the relay stops reading it after the first frame.
#[tokio::test]
async fn pre_auth_garbage_from_a_client_that_never_reads_costs_little() {
    let mut relay = TestRelay::start("hostile_garbage_unread");
    let mut raw = relay.raw_tls(&relay.tls(None)).await;
    let garbage: Vec<u8> = EMPTY_HELLO.repeat(100_000);
    // The relay ends the session after the first frame; the rest of the write may fail.
    let _ = tokio::time::timeout(STEP_TIMEOUT, raw.write_quietly(&garbage)).await;
    relay.wait_metric("relay_errors_total", |n| n >= 1).await;
    assert_eq!(relay.metric("relay_errors_total"), 1);
    // The relay closed with our bytes unread, so the stream may end in a reset before its
    // one Error frame is read: at most that frame, then the end.
    let mut frames = 0;
    while raw.read_frame().await.is_some() {
        frames += 1;
    }
    assert!(frames <= 1, "{frames} frames for one connection's garbage");
    partner_delivers(&relay, "after the unread garbage").await;
    relay.stop().await;
}

/// Before authentication a client may announce no frame larger than `preauth_bytes_max`:
/// the relay answers the length prefix, without waiting for (or buffering) the frame.
#[tokio::test]
async fn a_large_frame_before_authentication_is_refused_as_announced() {
    let mut relay = TestRelay::start("hostile_preauth_bytes");
    let mut raw = relay.raw_tls(&relay.tls(None)).await;
    let announced = RelayLimits::default().preauth_bytes_max * 8;
    let mut bytes = announced.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0x01, 0x01, 0x00, 0x00]);
    raw.write(&bytes).await;
    assert!(raw.expect_error(ErrorCode::PreauthLimit).await, "fatal");
    raw.expect_end().await;
    partner_delivers(&relay, "after the oversized hello").await;
    relay.stop().await;
}

// --- idle, half-open, keep-alive ---

/// A server session that authenticated and then goes silent (a half-open connection looks
/// the same from the relay) is closed with `IDLE_TIMEOUT`; sessions that enabled
/// `KEEPALIVE` answer the relay's requests (the SDK does it) and outlive several deadlines.
#[tokio::test]
async fn a_silent_session_is_closed_at_the_idle_deadline_and_keepalive_holds_one_open() {
    let limits = RelayLimits {
        idle_timeout_ms: 2_000,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_idle", limits);
    let mut raw = relay.raw_tls(&relay.tls(Some(PARTNER))).await;
    let hello = client::codec::Hello {
        version_min: 1,
        version_max: 1,
        role: client::Role::PartnerServer,
        features: 0,
        agent: "silent".into(),
        token: None,
    };
    raw.write(&common::frame_bytes(&hello, &[])).await;
    let welcome = raw.read_frame().await.expect("Welcome");
    assert_eq!(welcome.kind(), client::codec::FrameKind::Welcome);
    assert!(raw.expect_error(ErrorCode::IdleTimeout).await, "fatal");
    raw.expect_end().await;

    let keepalive = |network| {
        let role = if network == GATEKEEPER {
            client::Role::GatekeeperServer
        } else {
            client::Role::PartnerServer
        };
        let mut options = relay.options(relay.tls(Some(network)), role);
        options.features = client::features::KEEPALIVE;
        relay.connect(options)
    };
    let mut gk = common::Session::new("gk", keepalive(GATEKEEPER).await.expect("gk"));
    let mut partner = common::Session::new("partner", keepalive(PARTNER).await.expect("p"));
    let p_user = user(PARTNER, 0x2002);
    partner.declare(p_user, &[1]).await;
    // Two and a half idle deadlines with nothing to say: reading answers the relay's
    // requests.
    let quiet = Duration::from_millis(5_000);
    let (a, b) = tokio::join!(
        tokio::time::timeout(quiet, gk.try_event()),
        tokio::time::timeout(quiet, partner.try_event())
    );
    assert!(a.is_err() && b.is_err(), "no event, no close: {a:?} {b:?}");
    let env = envelope(user(GATEKEEPER, 0x1001).device(DeviceId(1)), p_user);
    gk.send_accepted(&env, b"still here").await;
    let delivered = partner.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    assert!(relay.metric("relay_keepalives_sent_total") >= 4);
    let text = relay.metrics_text();
    assert_eq!(
        labelled(&text, "relay_deadline_closes_total", "deadline=\"idle\""),
        1,
        "only the silent session"
    );
    relay.stop().await;
}

// --- a client that never reads ---

/// A device that stops reading while deliveries pile up is closed at the write deadline
/// (`WRITE_TIMEOUT`); its deliveries stay queued, and the rest of the relay goes on.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_at_the_write_deadline() {
    let limits = RelayLimits {
        write_timeout_ms: 1_000,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_never_reads", limits);
    let me = device(PARTNER, 0x2009, 1);
    let _deaf = relay.device(me).await;
    let mut gk = relay.server(GATEKEEPER).await;
    let gk_dev = device(GATEKEEPER, 0x1001, 1);
    let body = payload("unread", 60_000);
    // 12 MB: more than loopback's socket buffers take, less than twice the pending bound
    // plus them (the slow-consumer rule is not what closes it).
    for _ in 0..200 {
        gk.send_accepted(&envelope(gk_dev, me.user_address()), &body)
            .await;
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let text = relay.metrics_text();
        if labelled(&text, "relay_deadline_closes_total", "deadline=\"write\"") == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "closed at the write deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing acknowledged is lost: the device, back with a fresh session, gets them all.
    assert_eq!(relay.metric("relay_queue_frames"), 200);
    let mut back = relay.device(me).await;
    for delivered in back.expect_deliveries(200).await {
        back.ack_delivery(&delivered).await;
    }
    relay.wait_metric("relay_queue_frames", |n| n == 0).await;
    back.close().await;
    gk.close().await;
    partner_delivers(&relay, "past the deaf device").await;
    relay.stop().await;
}

// --- admission: handshake rate, sources ---

/// A flood of connections from one address past the core's handshake rate is refused at
/// accept; a partner that retries gets in and delivers.
#[tokio::test]
async fn a_handshake_flood_is_rate_limited() {
    let limits = RelayLimits {
        handshakes_per_core_per_second_max: 20,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_flood", limits);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let addr = relay.addr;
        flood.push(tokio::spawn(async move {
            let mut opened = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let socket = TcpSocket::new_v4().expect("socket");
                socket
                    .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)), 0))
                    .expect("bind");
                if let Ok(mut stream) = socket.connect(addr).await {
                    let _ = stream.write_all(b"\x16\x03\x01").await;
                    opened += 1;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            opened
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut gk = connect_retrying(&relay, GATEKEEPER).await;
    let mut partner = connect_retrying(&relay, PARTNER).await;
    let p_user = user(PARTNER, 0x2002);
    partner.declare(p_user, &[1]).await;
    let env = envelope(user(GATEKEEPER, 0x1001).device(DeviceId(1)), p_user);
    gk.send_accepted(&env, b"through the flood").await;
    assert_eq!(partner.expect_delivery().await.envelope().0, &env);
    assert!(started.elapsed() < STEP_TIMEOUT);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut opened = 0;
    for task in flood {
        opened += task.await.expect("flood task");
    }
    let text = relay.metrics_text();
    let refused = labelled(
        &text,
        "relay_accept_refused_total",
        "reason=\"handshake_rate\"",
    );
    assert!(refused > 0, "{opened} flood connections, {refused} refused");
    relay.stop().await;
}

/// A server session, retried until admitted (a handshake flood refuses some tries).
async fn connect_retrying(relay: &TestRelay, network: client::NetworkId) -> common::Session {
    let role = if network == GATEKEEPER {
        client::Role::GatekeeperServer
    } else {
        client::Role::PartnerServer
    };
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let options = relay.options(relay.tls(Some(network)), role);
        match relay.connect(options).await {
            Ok(conn) => return common::Session::new(format!("server {network}"), conn),
            Err(e) => assert!(Instant::now() < deadline, "still refused: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One source address may hold only `unauthenticated_per_source_max` unauthenticated
/// connections (all cores together); more are closed at accept, others are unaffected.
#[tokio::test]
async fn one_source_holds_a_bounded_number_of_unauthenticated_connections() {
    let limits = RelayLimits {
        unauthenticated_per_source_max: 4,
        ..RelayLimits::default()
    };
    let mut relay = TestRelay::start_with("hostile_source_cap", limits);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(tcp_from(&relay, Ipv4Addr::new(127, 0, 0, 9)).await);
    }
    let mut ended = 0;
    for stream in &mut held {
        if ended_within(stream, Duration::from_millis(500)).await {
            ended += 1;
        }
    }
    assert_eq!(ended, 6, "four held, the rest closed at accept");
    let text = relay.metrics_text();
    assert_eq!(
        labelled(&text, "relay_accept_refused_total", "reason=\"source\""),
        6
    );
    partner_delivers(&relay, "from another address").await;
    relay.stop().await;
}

// --- token expiry during a session ---

/// A device session ends when its token expires (`TOKEN_EXPIRED`, fatal); the device
/// reconnects with a fresh token and gets what was queued meanwhile.
#[tokio::test]
async fn a_device_session_ends_when_its_token_expires() {
    let mut relay = TestRelay::start("hostile_token_expiry");
    let me = device(PARTNER, 0x2011, 1);
    let token = relay.token_signed(&relay.token_key(PARTNER), me, common::now_ms() + 3_000);
    let options = relay
        .options(relay.tls(None), client::Role::Device)
        .token(token);
    let mut short =
        common::Session::new("short-lived", relay.connect(options).await.expect("device"));
    let error = short.expect_error(ErrorCode::TokenExpired).await;
    assert!(error.fatal);
    short.expect_closed().await;
    let text = relay.metrics_text();
    assert_eq!(
        labelled(
            &text,
            "relay_deadline_closes_total",
            "deadline=\"token_expiry\""
        ),
        1
    );
    let mut gk = relay.server(GATEKEEPER).await;
    let env = envelope(device(GATEKEEPER, 0x1001, 1), me.user_address());
    gk.send_accepted(&env, b"for the next session").await;
    let mut fresh = relay.device(me).await;
    let delivered = fresh.expect_delivery().await;
    assert_eq!(delivered.envelope().0, &env);
    fresh.ack_delivery(&delivered).await;
    relay.stop().await;
}
