//! The HTTP port's named limits (`[http]` in the configuration), each made small and shown
//! over real sockets: the write deadline closes a client that does not read, the idle and
//! handshake deadlines a silent one, the per-source cap and the lanes keep `/healthz` and
//! `/metrics` answerable when the port is full, and the routes that need no certificate are
//! rate-limited per source. In each, the operator's control-API calls are answered again
//! afterwards.

mod common;

use std::time::{Duration, Instant};

use common::control::{ControlRelay, Who};
use common::http::{closed_by_server, connect_from, get_from, loopback, slow_reader};
use relay::http::limits::HttpLimits;

/// A generous bound for anything the relay must do.
const BOUND: Duration = Duration::from_secs(30);
const PROBE: Duration = Duration::from_secs(10);

fn start(name: &str, limits: HttpLimits) -> ControlRelay {
    ControlRelay::start_configured(name, |config| config.http = limits)
}

fn labeled(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn metrics(relay: &ControlRelay) -> String {
    let (status, text) = get_from(loopback(1), relay.http, "/metrics", PROBE)
        .await
        .unwrap_or_else(|e| panic!("/metrics: {e}"));
    assert_eq!(status, 200);
    text
}

/// Polls `/metrics` until `series` reaches `at_least`; the text then.
async fn wait_metric(relay: &ControlRelay, series: &str, at_least: u64) -> String {
    let started = Instant::now();
    loop {
        // A probe may find both lanes full for a moment (the slots of connections the test
        // just closed are given back when the relay sees them close): ask again.
        let text = match get_from(loopback(1), relay.http, "/metrics", PROBE).await {
            Ok((200, text)) => text,
            other => format!("(no answer: {other:?})"),
        };
        if labeled(&text, series) >= at_least {
            return text;
        }
        assert!(
            started.elapsed() < BOUND,
            "{series} did not reach {at_least} within {BOUND:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn operator_answered(relay: &ControlRelay) {
    let started = Instant::now();
    let operator = relay.api(Who::Operator);
    loop {
        let answer = operator.get("/v1/partners").await;
        if answer.as_ref().is_ok_and(|a| a.status == 200) {
            return;
        }
        assert!(
            started.elapsed() < BOUND,
            "the operator's call was not answered within {BOUND:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_closed_at_the_write_deadline() {
    let relay = start(
        "http-write-deadline",
        HttpLimits {
            write_timeout_ms: 300,
            open_requests_per_source_per_min: 1_000_000,
            ..HttpLimits::default()
        },
    );
    let mut attackers = Vec::new();
    for _ in 0..4 {
        attackers.push(
            slow_reader(loopback(2), relay.http, "/v1/openapi.json", 200)
                .await
                .expect("connected"),
        );
    }
    let text = wait_metric(&relay, "relay_http_closed_total{reason=\"write\"}", 4).await;
    assert_eq!(
        labeled(&text, "relay_http_connections{lane=\"general\"}"),
        1,
        "{text}"
    );
    for attacker in &mut attackers {
        assert!(closed_by_server(&mut attacker.read, BOUND).await);
    }
    operator_answered(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_port_keeps_healthz_and_metrics_and_caps_each_source() {
    let relay = start(
        "http-lanes",
        HttpLimits {
            connections_max: 8,
            connections_reserved: 2,
            connections_per_source_max: 4,
            // Long enough that nothing the test holds is closed under it.
            write_timeout_ms: 60_000,
            open_requests_per_source_per_min: 1_000_000,
            ..HttpLimits::default()
        },
    );
    let http = relay.http;
    // Two sources fill the general lane; the first tries two more than its cap.
    let mut attackers = Vec::new();
    for (source, count) in [(2, 6), (3, 4)] {
        for _ in 0..count {
            if let Some(read) = slow_reader(loopback(source), http, "/v1/openapi.json", 50).await {
                attackers.push(read);
            }
        }
    }
    let text = wait_metric(&relay, "relay_http_refused_total{reason=\"per_source\"}", 2).await;
    assert_eq!(
        labeled(&text, "relay_http_accepted_total{lane=\"general\"}"),
        8,
        "{text}"
    );

    // The general lane is full: the probes are served on the reserved lane.
    let (status, body) = get_from(loopback(1), http, "/healthz", PROBE)
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get_from(loopback(1), http, "/v1/openapi.json", PROBE)
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("HTTP_BUSY"), "{body}");
    let answer = relay.api(Who::Operator).get("/v1/partners").await.unwrap();
    assert_eq!(
        (answer.status, answer.error_code()),
        (503, Some(615)),
        "{answer:?}"
    );
    assert!(answer.retry_after_s.is_some());

    // Both lanes full: closed at once, counted; the lanes' probes still answer once a
    // reserved slot is free again.
    // (The listener accepts in connection order, so these two are admitted before the probe.)
    let silent: Vec<_> = futures_connect(http, 2).await;
    let refused = get_from(loopback(1), http, "/healthz", PROBE).await;
    assert!(refused.is_err(), "{refused:?}");
    drop(silent);
    let text = wait_metric(&relay, "relay_http_refused_total{reason=\"full\"}", 1).await;
    assert!(text.contains("relay_http_busy_total 2"), "{text}");

    // The attackers leave: the control API answers again.
    drop(attackers);
    operator_answered(&relay).await;
}

/// `count` connections from 127.0.0.4 that send nothing.
async fn futures_connect(http: std::net::SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(
            connect_from(loopback(4), http, None)
                .await
                .expect("connect"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_the_handshake_and_idle_deadlines() {
    let relay = start(
        "http-idle",
        HttpLimits {
            handshake_timeout_ms: 300,
            idle_timeout_ms: 600,
            header_timeout_ms: 60_000,
            ..HttpLimits::default()
        },
    );
    // Sends nothing at all.
    let mut silent = connect_from(loopback(2), relay.http, None).await.unwrap();
    assert!(closed_by_server(&mut silent, BOUND).await);
    wait_metric(&relay, "relay_http_closed_total{reason=\"handshake\"}", 1).await;

    // One request on a keep-alive connection, then silence.
    use tokio::io::AsyncWriteExt;
    let mut quiet = connect_from(loopback(2), relay.http, None).await.unwrap();
    quiet
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut quiet, BOUND).await);
    wait_metric(&relay, "relay_http_closed_total{reason=\"idle\"}", 1).await;
    operator_answered(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_routes_are_rate_limited_per_source() {
    let relay = start(
        "http-open-rate",
        HttpLimits {
            open_requests_per_source_per_min: 3,
            ..HttpLimits::default()
        },
    );
    let http = relay.http;
    for _ in 0..3 {
        let (status, _) = get_from(loopback(2), http, "/v1/openapi.json", PROBE)
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let (status, body) = get_from(loopback(2), http, "/v1/openapi.json", PROBE)
        .await
        .unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("SOURCE_RATE_LIMITED"), "{body}");
    // Another source has its own budget; /healthz and /metrics are not counted.
    let (status, _) = get_from(loopback(3), http, "/v1/openapi.json", PROBE)
        .await
        .unwrap();
    assert_eq!(status, 200);
    for _ in 0..5 {
        let (status, _) = get_from(loopback(2), http, "/healthz", PROBE)
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let text = metrics(&relay).await;
    assert_eq!(labeled(&text, "relay_http_rate_limited_total"), 1, "{text}");
    operator_answered(&relay).await;
}
