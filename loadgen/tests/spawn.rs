//! End-to-end runs of the `loadgen` binary against a relay it spawns, which enforces the
//! interop rules: loadgen enlists its population through the control API first, the JSON
//! report has every field DESIGN.md promises and parity holds on an idle machine; a refused
//! enlistment fails the run with the HTTP status and the relay's error body; without
//! enlistment the relay refuses interop traffic; and the test-only fault switch (loadgen's
//! receiving path drops or duplicates deliveries) is reported as lost or duplicate with exit
//! status 1.
//!
//! Needs the `relay` binary of the same profile next to loadgen's (`target/debug/relay`): the
//! tests build it with `cargo build -p relay` when it is missing. Each run is a few seconds;
//! none asserts a performance figure.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn relay_binary() -> PathBuf {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let relay = loadgen.with_file_name("relay");
    if !relay.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "relay"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build -p relay failed");
    }
    assert!(relay.is_file(), "no relay binary at {}", relay.display());
    relay
}

/// One run at a time: each spawns a relay on both cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs loadgen with a small population; returns (exit code, parsed report).
fn loadgen(name: &str, extra: &[&str]) -> (i32, Value) {
    let (code, report, stderr) = loadgen_run(name, extra);
    let report = report.unwrap_or_else(|e| panic!("{e}; stderr:\n{stderr}"));
    (code, report)
}

/// Runs loadgen with a small population (90 users: 3 networks of 30); returns (exit code,
/// the parsed report or why there is none, stderr).
fn loadgen_run(name: &str, extra: &[&str]) -> (i32, Result<Value, String>, String) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let json =
        std::env::temp_dir().join(format!("loadgen-test-{name}-{}.json", std::process::id()));
    let relay = relay_binary();
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--spawn", "--relay-bin"])
        .arg(&relay)
        .args([
            "--users",
            "30",
            "--partners",
            "2",
            "--rate",
            "300",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--drain-s",
            "1",
            "--relay-cores",
            "2",
            "--threads",
            "2",
        ])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("loadgen runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = std::fs::read_to_string(&json)
        .map_err(|e| format!("no report {} ({e})", json.display()))
        .map(|text| serde_json::from_str::<Value>(&text).expect("the report is JSON"));
    let _ = std::fs::remove_file(&json);
    (output.status.code().unwrap_or(-1), report, stderr)
}

fn assert_latency(v: &Value, at: &str) {
    for field in ["p50", "p99", "p999", "max"] {
        assert!(v[field].is_u64(), "{at}.{field} missing in {v}");
    }
    assert!(v["p50"].as_u64() <= v["p99"].as_u64(), "{at}: p50 > p99");
    assert!(v["p99"].as_u64() <= v["max"].as_u64(), "{at}: p99 > max");
}

#[test]
fn a_short_spawned_run_reports_every_field_and_parity_holds() {
    // Debug builds of relay and loadgen share two cores with the test harness (and whatever
    // else builds): latencies of a few ms are scheduling noise there, so the parity floor is
    // raised to 5 ms; the verdict still compares p50 (and delivery) of both classes.
    let (code, r) = loadgen(
        "fields",
        &["--parity-floor-us", "5000", "--html", "/dev/null"],
    );
    for field in [
        "sent",
        "delivered",
        "lost",
        "duplicates",
        "throughput_per_s",
    ] {
        assert!(r[field].is_number(), "{field} missing");
    }
    assert_latency(&r["latency_us"], "latency_us");
    for class in ["first_party", "interop"] {
        let c = &r["classes"][class];
        for field in [
            "sent",
            "delivered",
            "lost",
            "duplicates",
            "throughput_per_s",
        ] {
            assert!(c[field].is_number(), "classes.{class}.{field} missing");
        }
        assert_latency(&c["latency_us"], class);
        assert!(c["sent"].as_u64().unwrap() > 0, "no {class} traffic");
    }
    assert!(r["parity"]["p99_ratio"].is_number());
    assert!(r["errors"]["by_code"].is_object());
    assert!(r["config"]["population"]["partners"].as_u64() == Some(2));
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(r["machine"]["kernel"].is_string());
    assert!(r["machine"]["sysctl"]["net.core.somaxconn"].is_string());
    assert!(r["relay"]["spawned"].as_bool().unwrap());
    // The relay enforced the interop rules, and knew every user of every network (with all
    // its devices) before the run through the control API.
    assert_eq!(r["relay"]["ready"]["policy"], "enforce");
    let enlistment = &r["enlistment"];
    assert_eq!(enlistment["enlisted"], true, "{enlistment}");
    assert_eq!(enlistment["users"], 90, "{enlistment}");
    assert_eq!(enlistment["created"], 90, "{enlistment}");
    assert_eq!(enlistment["networks"], 3, "{enlistment}");
    assert_eq!(enlistment["devices"], r["population"]["devices"]);
    assert!(enlistment["duration_s"].as_f64().unwrap() > 0.0);
    let by_code = r["errors"]["by_code"].as_object().unwrap();
    assert!(by_code.is_empty(), "refusals: {by_code:?}");
    // Nothing acknowledged lost, nothing twice, in order; every receipt arrived.
    assert_eq!(r["sent"], 600);
    assert_eq!(r["delivered"], 600, "{}", r["deliveries"]);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["reordered"], 0);
    assert_eq!(r["receipts"]["lost"], 0);
    assert!(r["receipts"]["deliveries"].as_u64().unwrap() > 0);
    assert_eq!(r["parity"]["pass"], true, "parity: {}", r["parity"]);
    assert_eq!(
        code, 0,
        "exit status; receipts {} anomalies {} exit_code {}",
        r["receipts"], r["anomalies"], r["exit_code"]
    );
}

#[test]
fn dropped_deliveries_are_reported_lost_and_fail_the_run() {
    let (code, r) = loadgen("drop", &["--fault", "drop:40"]);
    let lost = r["lost"].as_u64().unwrap();
    assert!(
        lost > 0,
        "lost = 0 with deliveries dropped: {}",
        r["deliveries"]
    );
    assert!(r["deliveries"]["lost"].as_u64().unwrap() >= lost);
    assert_eq!(r["integrity_pass"], false);
    assert_eq!(r["pass"], false);
    assert_eq!(code, 1, "exit status");
}

#[test]
fn duplicated_deliveries_are_reported_and_fail_the_run() {
    let (code, r) = loadgen("dup", &["--fault", "dup:40"]);
    assert!(r["duplicates"].as_u64().unwrap() > 0);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["integrity_pass"], false);
    assert_eq!(code, 1, "exit status");
}

#[test]
fn a_refused_enlistment_fails_the_run_with_the_status_and_the_error_body() {
    // Loadgen signs network 2's consents with a key the spawned relay does not have
    // registered for it: the relay refuses the enlistment with CONSENT_INVALID.
    let (code, report, stderr) = loadgen_run("enlist-refused", &["--fault", "network-key"]);
    assert_eq!(code, 2, "exit status; stderr:\n{stderr}");
    assert!(report.is_err(), "a report was written for a failed setup");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("loadgen: enlisting user n2/"))
        .unwrap_or_else(|| panic!("no enlistment error; stderr:\n{stderr}"));
    assert!(line.contains("HTTP 400"), "{line}");
    assert!(line.contains("CONSENT_INVALID"), "{line}");
    assert!(line.contains("does not verify"), "{line}");
    assert!(!stderr.contains("loadgen: enlisted "), "{stderr}");
}

#[test]
fn without_enlistment_the_relay_refuses_interop_and_parity_fails() {
    let (code, r) = loadgen("no-enlist", &["--no-enlist"]);
    assert_eq!(r["enlistment"]["enlisted"], false);
    assert_eq!(r["enlistment"]["skipped"], "--no-enlist");
    // First party is not interop: the rules do not apply to it.
    let first_party = &r["classes"]["first_party"];
    assert_eq!(first_party["delivered"], first_party["sent"]);
    let interop = &r["classes"]["interop"];
    assert!(interop["sent"].as_u64().unwrap() > 0);
    assert_eq!(interop["delivered"], 0, "{interop}");
    assert!(
        r["errors"]["by_code"]["306"]["count"].as_u64().unwrap() > 0,
        "no SENDER_NOT_ENLISTED: {}",
        r["errors"]
    );
    assert_eq!(r["lost"], 0);
    assert_eq!(r["integrity_pass"], true);
    assert_eq!(r["parity_pass"], false);
    assert_eq!(code, 3, "exit status");
}
