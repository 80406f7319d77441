//! The report: a phase's figures in the shape DESIGN.md promises (`sent`, `delivered`,
//! `lost`, `duplicates`, `throughput_per_s`, `latency_us`, `classes.first_party`,
//! `classes.interop`, `parity`), plus errors by code, receipts, signals and the timeline.

use serde::Serialize;
use serde_json::{Value, json};

use crate::ledger::ClassTally;
use crate::parity::{ClassFigures, Parity, ParityConfig, Scope, verdict};
use crate::phase::PhaseResult;
use crate::population::Class;
use crate::stats::{LatencySummary, new_histogram};

/// One class's figures in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub scheduled: u64,
    pub sent: u64,
    pub unsent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub retries: u64,
    /// Messages delivered to every device of their recipient.
    pub delivered: u64,
    /// Messages the relay accepted that did not reach every device.
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost_deliveries: u64,
    pub unacknowledged_deliveries: u64,
    pub pending_offline: u64,
    /// Device deliveries over device deliveries due, for every scheduled message (devices
    /// still offline at the end excepted).
    pub delivery_ratio: f64,
    pub throughput_per_s: f64,
    pub latency_us: LatencySummary,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        ((a as f64 / b as f64) * 1e6).round() / 1e6
    }
}

fn per_s(count: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        0.0
    } else {
        (count as f64 / seconds * 10.0).round() / 10.0
    }
}

impl ClassReport {
    fn new(t: &ClassTally, latency: LatencySummary, active_s: f64) -> ClassReport {
        ClassReport {
            scheduled: t.scheduled,
            sent: t.sent,
            unsent: t.unsent,
            accepted: t.accepted,
            rejected: t.rejected,
            retries: t.retries,
            delivered: t.delivered,
            lost: t.lost,
            duplicates: t.duplicates,
            reordered: t.reordered,
            expected_deliveries: t.expected_deliveries,
            deliveries: t.deliveries,
            lost_deliveries: t.lost_deliveries,
            unacknowledged_deliveries: t.unacknowledged_deliveries,
            pending_offline: t.pending_offline,
            delivery_ratio: ratio(t.deliveries, t.expected_deliveries - t.pending_offline),
            throughput_per_s: per_s(t.delivered, active_s),
            latency_us: latency,
        }
    }
}

/// The parity verdict of a phase, over the interop traffic `config.scope` names (all of it
/// when no interop message went server to server).
pub fn parity_of(result: &PhaseResult, config: &ParityConfig) -> Parity {
    let delivery = |class: Class| {
        let t = &result.tally.classes[class.index()];
        ratio(t.deliveries, t.expected_deliveries - t.pending_offline)
    };
    let figures = |s: LatencySummary, class: Class| ClassFigures {
        samples: s.count,
        p50_us: s.p50,
        p99_us: s.p99,
        p999_us: s.p999,
        delivery_ratio: delivery(class),
    };
    let first = LatencySummary::of(&result.latencies.classes[Class::FirstParty.index()]);
    let matched = &result.latencies.interop_by_architecture[0];
    let mut config = *config;
    let interop = if config.scope == Scope::Matched && !matched.is_empty() {
        LatencySummary::of(matched)
    } else {
        config.scope = Scope::All;
        LatencySummary::of(&result.latencies.classes[Class::Interop.index()])
    };
    verdict(
        &figures(first, Class::FirstParty),
        &figures(interop, Class::Interop),
        &config,
    )
}

/// Interop against first party per architecture of the interop traffic (both ends through
/// servers, or a device session at one end): where a parity gap comes from.
pub fn parity_by_architecture(result: &PhaseResult, config: &ParityConfig) -> Value {
    let first = LatencySummary::of(&result.latencies.classes[Class::FirstParty.index()]);
    let figures = |s: LatencySummary| ClassFigures {
        samples: s.count,
        p50_us: s.p50,
        p99_us: s.p99,
        p999_us: s.p999,
        delivery_ratio: 1.0,
    };
    let [proxy, direct] = &result.latencies.interop_by_architecture;
    let judge = |h| {
        let v = verdict(&figures(first), &figures(LatencySummary::of(h)), config);
        json!({ "p50_ratio": v.p50_ratio, "p99_ratio": v.p99_ratio, "p999_ratio": v.p999_ratio, "judged": v.judged, "latency_pass": v.pass })
    };
    json!({ "proxy": judge(proxy), "direct": judge(direct) })
}

/// A phase as a JSON object with every field DESIGN.md lists.
pub fn phase_json(
    result: &PhaseResult,
    parity: &Parity,
    config: &ParityConfig,
    with_timeline: bool,
) -> Value {
    let total = result.tally.total();
    let active_s = result.active_s.max(1e-9);
    let all = result.latencies.all();
    let classes: serde_json::Map<String, Value> = Class::ALL
        .iter()
        .map(|&class| {
            let report = ClassReport::new(
                &result.tally.classes[class.index()],
                LatencySummary::of(&result.latencies.classes[class.index()]),
                active_s,
            );
            let mut value = json!(report);
            if let Some(map) = value.as_object_mut() {
                map.insert(
                    "latency_from_write_us".into(),
                    json!(LatencySummary::of(
                        &result.latencies.from_write_classes[class.index()]
                    )),
                );
                if class == Class::Interop {
                    let [proxy, direct] = &result.latencies.interop_by_architecture;
                    map.insert(
                        "by_architecture".into(),
                        json!({
                            "proxy": { "latency_us": LatencySummary::of(proxy) },
                            "direct": { "latency_us": LatencySummary::of(direct) },
                        }),
                    );
                }
            }
            (class.name().to_string(), value)
        })
        .collect();
    let receipts = &result.tally.receipts;
    let mut object = json!({
        "name": result.spec.name,
        "rate_per_s": result.spec.rate_per_s,
        "duration_s": result.spec.duration.as_secs_f64(),
        "elapsed_s": round1(result.elapsed_s),
        "active_s": round1(result.active_s),
        "settled": result.settled,
        "intact": result.tally.intact(),
        "scheduled": total.scheduled,
        "sent": total.sent,
        "unsent": total.unsent,
        "accepted": total.accepted,
        "rejected": total.rejected,
        "retries": total.retries,
        "delivered": total.delivered,
        "lost": total.lost,
        "duplicates": total.duplicates,
        "reordered": total.reordered,
        "throughput_per_s": per_s(total.delivered, active_s),
        "deliveries_per_s": per_s(total.deliveries, active_s),
        "deliveries": {
            "expected": total.expected_deliveries,
            "delivered": total.deliveries,
            "lost": total.lost_deliveries,
            "duplicates": total.duplicates,
            "unacknowledged": total.unacknowledged_deliveries,
            "pending_offline": total.pending_offline,
            "ratio": ratio(total.deliveries, total.expected_deliveries),
        },
        "receipts": receipts,
        "signals": { "sent": result.tally.signals_sent, "received": result.tally.signals_received },
        "latency_us": LatencySummary::of(&all),
        "latency_from_write_us": LatencySummary::of(&result.latencies.from_write),
        "catchup_latency_us": LatencySummary::of(&result.latencies.catchup),
        "classes": classes,
        "parity": parity,
        "parity_all_interop": parity_of(result, &ParityConfig { scope: Scope::All, ..*config }),
        "parity_by_architecture": parity_by_architecture(result, config),
        "errors": result.errors.to_json(),
        "anomalies": {
            "strays": result.tally.strays,
            "unexpected_acks": result.tally.unexpected_acks,
            "corrupt_payloads": result.tally.corrupt,
        },
    });
    if with_timeline && let Some(map) = object.as_object_mut() {
        map.insert("timeline".into(), json!(result.timeline));
    }
    object
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// An empty histogram's summary, for phases that did not run.
pub fn empty_latency() -> LatencySummary {
    LatencySummary::of(&new_histogram())
}

/// A one-line summary for the terminal.
pub fn one_line(result: &PhaseResult, parity: &Parity) -> String {
    let total = result.tally.total();
    let all = LatencySummary::of(&result.latencies.all());
    let fmt = crate::phase::format_us;
    format!(
        "{:<10} rate {:>8.0}/s  sent {:>9}  delivered {:>9}  lost {}  dup {}  reordered {}  throughput {:>9.0}/s  p50 {}  p99 {}  p999 {}  parity p99 x{} {}",
        result.spec.name,
        result.spec.rate_per_s,
        total.sent,
        total.delivered,
        total.lost,
        total.duplicates,
        total.reordered,
        per_s(total.delivered, result.active_s.max(1e-9)),
        fmt(all.p50),
        fmt(all.p99),
        fmt(all.p999),
        parity.p99_ratio,
        if parity.pass { "pass" } else { "FAIL" },
    )
}

/// A Markdown table of the main figures of several reports, one column each.
pub fn compare_table(reports: &[(String, Value)]) -> String {
    let ms = |v: &Value| {
        v.as_f64()
            .map_or("–".to_string(), |us| format!("{:.2}", us / 1000.0))
    };
    let count = |v: &Value| v.as_u64().map_or("–".to_string(), |n| n.to_string());
    let float = |v: &Value| v.as_f64().map_or("–".to_string(), |f| format!("{f:.0}"));
    let ratio = |v: &Value| v.as_f64().map_or("–".to_string(), |f| format!("{f:.3}"));
    // Whether the relay enforced the interop rules and loadgen enlisted its population
    // (reports from before enlistment have neither field).
    let rules = |r: &Value| {
        let policy = r["relay"]["ready"]["policy"].as_str();
        match (policy, r["enlistment"]["enlisted"].as_bool()) {
            (_, None) => "–".to_string(),
            (Some("off"), Some(enlisted)) => format!("off ({})", yes_no(enlisted)),
            (Some(_), Some(enlisted)) => format!("enforced ({})", yes_no(enlisted)),
            (None, Some(enlisted)) => yes_no(enlisted).to_string(),
        }
    };
    type Row<'a> = (&'a str, Box<dyn Fn(&Value) -> String + 'a>);
    let rows: Vec<Row<'_>> = vec![
        (
            "interop rules (population enlisted)",
            Box::new(move |r: &Value| rules(r)),
        ),
        (
            "offered rate, msg/s",
            Box::new(move |r: &Value| float(&r["rate_per_s"])),
        ),
        (
            "throughput, msg/s",
            Box::new(move |r: &Value| float(&r["throughput_per_s"])),
        ),
        (
            "device deliveries/s",
            Box::new(move |r: &Value| float(&r["deliveries_per_s"])),
        ),
        (
            "p50 latency, ms",
            Box::new(move |r: &Value| ms(&r["latency_us"]["p50"])),
        ),
        (
            "p99 latency, ms",
            Box::new(move |r: &Value| ms(&r["latency_us"]["p99"])),
        ),
        (
            "p99.9 latency, ms",
            Box::new(move |r: &Value| ms(&r["latency_us"]["p999"])),
        ),
        (
            "max latency, ms",
            Box::new(move |r: &Value| ms(&r["latency_us"]["max"])),
        ),
        ("sent", Box::new(move |r: &Value| count(&r["sent"]))),
        (
            "lost (acknowledged, never delivered)",
            Box::new(move |r: &Value| count(&r["lost"])),
        ),
        (
            "duplicates",
            Box::new(move |r: &Value| count(&r["duplicates"])),
        ),
        (
            "receipts lost",
            Box::new(move |r: &Value| count(&r["receipts"]["lost"])),
        ),
        (
            "delivery ratio",
            Box::new(move |r: &Value| ratio(&r["deliveries"]["ratio"])),
        ),
        (
            "parity p99 ratio (interop/first party)",
            Box::new(move |r: &Value| ratio(&r["parity"]["p99_ratio"])),
        ),
    ];
    let mut out = String::from("| |");
    for (label, _) in reports {
        out.push_str(&format!(" {label} |"));
    }
    out.push_str("\n|---|");
    for _ in reports {
        out.push_str("---:|");
    }
    out.push('\n');
    for (name, cell) in &rows {
        out.push_str(&format!("| {name} |"));
        for (_, report) in reports {
            out.push_str(&format!(" {} |", cell(report)));
        }
        out.push('\n');
    }
    out
}

fn yes_no(yes: bool) -> &'static str {
    if yes { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_comparison_table_has_a_column_per_report() {
        let a = json!({"rate_per_s": 5000.0, "throughput_per_s": 4999.5, "latency_us": {"p50": 250, "p99": 1500}, "lost": 0, "deliveries": {"ratio": 1.0}});
        let b = json!({"rate_per_s": 5000.0, "throughput_per_s": 3000.0, "latency_us": {"p50": 900}, "lost": 12});
        let table = compare_table(&[("relay".into(), a), ("mosquitto".into(), b)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| | relay | mosquitto |");
        assert!(
            table.contains("| throughput, msg/s | 5000 | 3000 |"),
            "{table}"
        );
        assert!(table.contains("| p50 latency, ms | 0.25 | 0.90 |"));
        assert!(table.contains("| lost (acknowledged, never delivered) | 0 | 12 |"));
        assert!(table.contains("| p99.9 latency, ms | – | – |"));
        assert!(table.contains("| interop rules (population enlisted) | – | – |"));
        let enforced =
            json!({"relay": {"ready": {"policy": "enforce"}}, "enlistment": {"enlisted": true}});
        let lab = json!({"relay": {"ready": {"policy": "off"}}, "enlistment": {"enlisted": false}});
        let table = compare_table(&[("enforced".into(), enforced), ("lab".into(), lab)]);
        assert!(
            table.contains("| interop rules (population enlisted) | enforced (yes) | off (no) |"),
            "{table}"
        );
    }
}
