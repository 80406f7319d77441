//! The HTTP port held by slow readers (issue 11, item 4), on the default configuration:
//! 1,030 connections that pipeline `GET /v1/openapi.json` (137 KB, no certificate) and never
//! read. Before the fix they took every one of the port's 1,024 slots, the listener waited
//! for a free one, and `/healthz`, `/metrics` and the control API went unanswered for as long
//! as the attackers stayed. Now `/healthz` and `/metrics` answer during the flood (the lane
//! kept for them), the attackers are closed by the write deadline, and the control API
//! answers the operator again without any attacker leaving on its own.
//!
//! The attackers come from 20 loopback addresses (127.0.0.2 to .21), as a flood from a
//! botnet would; the probes from 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::control::{ControlRelay, Who};
use common::http::{closed_by_server, get_from, loopback, slow_reader};

/// The finding's figure: past the port's former single limit of 1,024 connections.
const ATTACKERS: usize = 1030;
const ATTACKER_SOURCES: usize = 20;
/// Requests each attacker pipelines (about 80 KB of requests, 274 MB of answers): more
/// than the relay reads before its writes block, so a next request head is always there.
const PIPELINED: usize = 2000;
/// A generous bound for anything the relay must do while flooded.
const BOUND: Duration = Duration::from_secs(60);

fn labeled(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_do_not_hold_the_http_port() {
    let relay = ControlRelay::start("http-flood");
    let http = relay.http;
    let mut attackers = Vec::with_capacity(ATTACKERS);
    for i in 0..ATTACKERS {
        let from = loopback(2 + u8::try_from(i % ATTACKER_SOURCES).unwrap());
        if let Some(stream) = slow_reader(from, http, "/v1/openapi.json", PIPELINED).await {
            attackers.push(stream);
        }
    }
    eprintln!(
        "{} of {ATTACKERS} attackers connected and sent their requests",
        attackers.len()
    );

    // While every attacker is still connected and reads nothing.
    let probe = loopback(1);
    let (status, body) = get_from(probe, http, "/healthz", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("/healthz during the flood: {e}"));
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "/healthz during the flood"
    );
    let (status, metrics) = get_from(probe, http, "/metrics", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("/metrics during the flood: {e}"));
    assert_eq!(status, 200, "/metrics during the flood");
    assert!(metrics.contains("relay_http_connections"), "{metrics}");

    // The relay closes the attackers (none of them leaves on its own), and the operator's
    // control-API calls are answered again.
    let started = Instant::now();
    let operator = relay.api(Who::Operator);
    loop {
        let answer = operator.get("/v1/partners").await;
        if answer.as_ref().is_ok_and(|a| a.status == 200) {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "the control API did not answer the operator within {BOUND:?} of the flood: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the control API answered the operator {:?} after the flood",
        started.elapsed()
    );
    // Every attacker is closed by the relay, without reading a byte of it (reading would let
    // the relay's writes go on).
    let metrics = loop {
        let (_, metrics) = get_from(probe, http, "/metrics", Duration::from_secs(10))
            .await
            .unwrap();
        let open = labeled(&metrics, "relay_http_connections{lane=\"general\"}");
        // The probe itself holds one slot.
        if open <= 1 {
            break metrics;
        }
        assert!(
            started.elapsed() < BOUND,
            "{open} connections still open {BOUND:?} after the flood:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "every attacker closed {:?} after the flood",
        started.elapsed()
    );
    // Closed for the write deadline (or the head deadline, once hyper waits for a next
    // request that never comes), or after the `SOURCE_RATE_LIMITED` answer to their source's
    // first request past its budget: whichever comes first. That is the general lane's 1,024
    // (the default `http.connections_max`); the attackers past it were served on the reserved
    // lane, answered `HTTP_BUSY` and closed.
    let closed: u64 = ["write", "header", "idle"]
        .iter()
        .map(|reason| {
            labeled(
                &metrics,
                &format!("relay_http_closed_total{{reason=\"{reason}\"}}"),
            )
        })
        .sum();
    let rate_limited = labeled(&metrics, "relay_http_rate_limited_total");
    assert!(
        closed + rate_limited >= 1024,
        "{} attackers but {closed} closed for a deadline and {rate_limited} after a refusal:\n{metrics}",
        attackers.len()
    );
    let mut still_open = 0;
    for attacker in &mut attackers {
        if !closed_by_server(&mut attacker.read, Duration::from_secs(10)).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "attackers the relay did not close");
    eprintln!(
        "closed for a deadline: {closed} (write {}, head {}); refused at once: {} (per source) + {} (full); open-route requests refused: {}",
        labeled(&metrics, "relay_http_closed_total{reason=\"write\"}"),
        labeled(&metrics, "relay_http_closed_total{reason=\"header\"}"),
        labeled(&metrics, "relay_http_refused_total{reason=\"per_source\"}"),
        labeled(&metrics, "relay_http_refused_total{reason=\"full\"}"),
        labeled(&metrics, "relay_http_rate_limited_total"),
    );
}
