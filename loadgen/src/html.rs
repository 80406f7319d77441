//! The HTML report: one self-contained page (inline CSS and SVG, no scripts, no external
//! assets) with the verdicts, the latency percentile curves of both classes on one chart,
//! throughput and p99 over time, delivery and error counts, and the configuration. Charts
//! are drawn here as plain SVG: a few polylines, axes and labels need no plotting library.

use std::fmt::Write as _;

use serde_json::Value;

/// Latency percentile curves of the main phase: (percentile, microseconds).
#[derive(Debug, Clone, Default)]
pub struct Curves {
    pub first_party: Vec<(f64, u64)>,
    pub interop: Vec<(f64, u64)>,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;
const FIRST_PARTY_COLOR: &str = "#1f77b4";
const INTEROP_COLOR: &str = "#d62728";

/// How the x axis maps values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XScale {
    Linear,
    /// Percentiles, spread as -log10(1 - p/100): 0, 90, 99, 99.9, 99.99 equally spaced.
    Percentile,
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn percentile_x(p: f64) -> f64 {
    let tail = (1.0 - p / 100.0).max(1e-5);
    -tail.log10()
}

/// A "nice" step for about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual > 5.0 {
        10.0
    } else if residual > 2.0 {
        5.0
    } else if residual > 1.0 {
        2.0
    } else {
        1.0
    };
    nice * magnitude
}

fn format_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart as an inline SVG element.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_scale: XScale,
    series: &[Series<'_>],
) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let map_x = |x: f64| match x_scale {
        XScale::Linear => x,
        XScale::Percentile => percentile_x(x),
    };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|&(x, y)| (map_x(x), y)))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{t}"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="18" font-size="14" font-weight="bold">{t}</text>"#,
        t = escape(title)
    );
    if all.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" fill="#888">no data</text></svg>"##,
            LEFT + 10.0,
            TOP + 30.0
        );
        return svg;
    }
    let (mut x_min, mut x_max) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &(x, _)| {
        (lo.min(x), hi.max(x))
    });
    if x_scale == XScale::Percentile {
        x_min = 0.0;
        x_max = x_max.max(3.0).ceil();
    }
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    let y_max_raw = all.iter().fold(0.0f64, |m, &(_, y)| m.max(y));
    let y_step = nice_step(y_max_raw.max(1e-9), 5.0);
    let y_max = (y_max_raw / y_step).ceil().max(1.0) * y_step;
    let px = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
    let py = |y: f64| TOP + plot_h - y / y_max * plot_h;
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= y_max + y_step / 2.0 {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py(y) + 4.0,
            format_tick(y),
            yy = py(y)
        );
        y += y_step;
    }
    // x ticks.
    let ticks: Vec<(f64, String)> = match x_scale {
        XScale::Percentile => (0..=i32::try_from(crate::rng::saturating_u64(x_max)).unwrap_or(5))
            .map(|k| {
                let p = 100.0 * (1.0 - 10f64.powi(-k));
                let label = match k {
                    0 => "0".to_string(),
                    1 => "90".to_string(),
                    2 => "99".to_string(),
                    _ => format!("{p:.*}", (k - 2) as usize),
                };
                (f64::from(k), label)
            })
            .collect(),
        XScale::Linear => {
            let step = nice_step(x_max - x_min, 8.0);
            let mut out = Vec::new();
            let mut x = (x_min / step).ceil() * step;
            while x <= x_max + step * 1e-9 {
                out.push((x, format_tick(x)));
                x += step;
            }
            out
        }
    };
    for (x, label) in ticks {
        let _ = write!(
            svg,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{TOP}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 15.0,
            escape(&label),
            xx = px(x)
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/><text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text><text x="14" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        escape(x_label),
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| (map_x(x), y))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/><rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            points.join(" "),
            LEFT + 10.0,
            TOP + 12.0 + 16.0 * i as f64,
            LEFT + 26.0,
            TOP + 17.0 + 16.0 * i as f64,
            escape(s.name),
            c = s.color
        );
    }
    svg.push_str("</svg>");
    svg
}

fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                let s = i.to_string();
                let mut out = String::new();
                for (k, ch) in s.chars().enumerate() {
                    if k > 0 && (s.len() - k) % 3 == 0 {
                        out.push(',');
                    }
                    out.push(ch);
                }
                out
            } else {
                n.as_f64().map_or_else(
                    || n.to_string(),
                    |f| {
                        format!("{f:.3}")
                            .trim_end_matches('0')
                            .trim_end_matches('.')
                            .to_string()
                    },
                )
            }
        }
        Value::Null => "–".into(),
        Value::Bool(b) => {
            if *b {
                "yes".into()
            } else {
                "no".into()
            }
        }
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or("–".into(), |us| format!("{:.2}", us / 1000.0))
}

fn badge(pass: bool) -> &'static str {
    if pass {
        r#"<span class="pass">PASS</span>"#
    } else {
        r#"<span class="fail">FAIL</span>"#
    }
}

/// The class and total figures of a phase, as a table.
fn phase_table(phase: &Value) -> String {
    let mut t = String::from(
        "<table><tr><th></th><th>sent</th><th>delivered</th><th>lost</th><th>duplicates</th><th>reordered</th><th>rejected</th><th>unsent</th><th>delivery ratio</th><th>throughput /s</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>",
    );
    let row = |name: &str, c: &Value, ratio: &Value| {
        format!(
            "<tr><th>{name}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            num(&c["sent"]),
            num(&c["delivered"]),
            num(&c["lost"]),
            num(&c["duplicates"]),
            num(&c["reordered"]),
            num(&c["rejected"]),
            num(&c["unsent"]),
            num(ratio),
            num(&c["throughput_per_s"]),
            ms(&c["latency_us"]["p50"]),
            ms(&c["latency_us"]["p99"]),
            ms(&c["latency_us"]["p999"]),
            ms(&c["latency_us"]["max"]),
        )
    };
    t.push_str(&row(
        "first party",
        &phase["classes"]["first_party"],
        &phase["classes"]["first_party"]["delivery_ratio"],
    ));
    t.push_str(&row(
        "interop",
        &phase["classes"]["interop"],
        &phase["classes"]["interop"]["delivery_ratio"],
    ));
    t.push_str(&row("all", phase, &phase["deliveries"]["ratio"]));
    t.push_str("</table>");
    t
}

fn parity_table(parity: &Value) -> String {
    let judged = |k: &str| {
        if parity["judged"][k].as_bool().unwrap_or(false) {
            ""
        } else {
            " (not judged)"
        }
    };
    let mut t = format!(
        "<p>Verdict: {} — interop/first-party latency ratio at most <b>{}</b> at p50, p99 and p99.9 (latencies under {} µs count as {} µs), and interop delivery at least first party's (tolerance {}). Interop traffic compared: <b>{}</b> (matched: both ends through server sessions, the path first-party traffic takes; all: device sessions too).</p><table><tr><th>p50 ratio</th><th>p99 ratio</th><th>p99.9 ratio</th><th>delivery ratio</th></tr><tr><td>{}{}</td><td>{}{}</td><td>{}{}</td><td>{}</td></tr></table>",
        badge(parity["pass"].as_bool().unwrap_or(false)),
        num(&parity["bound"]),
        num(&parity["floor_us"]),
        num(&parity["floor_us"]),
        num(&parity["delivery_tolerance"]),
        num(&parity["scope"]),
        num(&parity["p50_ratio"]),
        judged("p50"),
        num(&parity["p99_ratio"]),
        judged("p99"),
        num(&parity["p999_ratio"]),
        judged("p999"),
        num(&parity["delivery_ratio"]),
    );
    if let Some(notes) = parity["notes"].as_array().filter(|n| !n.is_empty()) {
        t.push_str("<ul>");
        for n in notes {
            let _ = write!(t, "<li>{}</li>", num(n));
        }
        t.push_str("</ul>");
    }
    t
}

fn counts_table(phase: &Value) -> String {
    let mut t = String::from("<table><tr><th>what</th><th>count</th></tr>");
    let rows = [
        ("messages scheduled", &phase["scheduled"]),
        ("messages accepted by the relay", &phase["accepted"]),
        ("retries after a retryable refusal", &phase["retries"]),
        ("device deliveries due", &phase["deliveries"]["expected"]),
        (
            "device deliveries received",
            &phase["deliveries"]["delivered"],
        ),
        ("device deliveries lost", &phase["deliveries"]["lost"]),
        (
            "device deliveries pending (device offline)",
            &phase["deliveries"]["pending_offline"],
        ),
        ("receipts sent", &phase["receipts"]["sent"]),
        (
            "receipt deliveries received",
            &phase["receipts"]["deliveries"],
        ),
        ("receipt deliveries lost", &phase["receipts"]["lost"]),
        (
            "typing signals sent / received",
            &Value::String(format!(
                "{} / {}",
                phase["signals"]["sent"], phase["signals"]["received"]
            )),
        ),
        (
            "catch-up deliveries (device was offline), p50 ms",
            &Value::String(ms(&phase["catchup_latency_us"]["p50"])),
        ),
        (
            "deliveries of earlier phases",
            &phase["anomalies"]["strays"],
        ),
        ("damaged payloads", &phase["anomalies"]["corrupt_payloads"]),
    ];
    for (name, v) in rows {
        let _ = write!(t, "<tr><td>{name}</td><td>{}</td></tr>", num(v));
    }
    t.push_str("</table>");
    let errors = &phase["errors"];
    let _ = write!(t, "<h3>Errors ({})</h3>", num(&errors["total"]));
    let mut any = false;
    t.push_str("<table><tr><th>code</th><th>name</th><th>count</th></tr>");
    if let Some(codes) = errors["by_code"].as_object() {
        for (code, e) in codes {
            any = true;
            let _ = write!(
                t,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(code),
                num(&e["name"]),
                num(&e["count"])
            );
        }
    }
    if let Some(other) = errors["other"].as_object() {
        for (what, count) in other {
            any = true;
            let _ = write!(
                t,
                "<tr><td>–</td><td>{}</td><td>{}</td></tr>",
                escape(what),
                num(count)
            );
        }
    }
    if !any {
        t.push_str("<tr><td colspan=3>none</td></tr>");
    }
    t.push_str("</table>");
    t
}

fn timeline_charts(phase: &Value) -> String {
    let points = phase["timeline"].as_array().cloned().unwrap_or_default();
    let series = |field: &str, scale: f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((p["t_s"].as_f64()?, p[field].as_f64()? * scale)))
            .collect()
    };
    let throughput = line_chart(
        "Throughput over time",
        "seconds into the phase",
        "device deliveries / s",
        XScale::Linear,
        &[Series {
            name: "deliveries per second",
            color: "#2ca02c",
            points: series("deliveries_per_s", 1.0),
        }],
    );
    let p99 = line_chart(
        "p99 latency over time (each second's deliveries)",
        "seconds into the phase",
        "p99, ms",
        XScale::Linear,
        &[Series {
            name: "p99",
            color: "#9467bd",
            points: series("p99_us", 0.001),
        }],
    );
    format!("{throughput}{p99}")
}

/// The whole page.
pub fn render(report: &Value, curves: &Curves) -> String {
    let mut page = String::new();
    let pass = report["pass"].as_bool().unwrap_or(false);
    let _ = write!(
        page,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>loadgen report: {target}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}}th{{background:#f4f4f4}}
.pass{{background:#2ca02c;color:white;padding:2px 8px;border-radius:4px}}.fail{{background:#d62728;color:white;padding:2px 8px;border-radius:4px}}
pre{{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}}svg{{display:block;margin:1em 0}}
</style></head><body>"#,
        target = num(&report["target"])
    );
    let _ = write!(
        page,
        "<h1>Article 7 Relay load report {}</h1><p>Target <b>{}</b>, mode <b>{}</b>, {} at {} messages/s for {} s. Integrity (nothing acknowledged lost, duplicated or reordered): {}. SLA parity: {}.</p>",
        badge(pass),
        num(&report["target"]),
        num(&report["mode"]),
        num(&report["name"]),
        num(&report["rate_per_s"]),
        num(&report["duration_s"]),
        badge(report["integrity_pass"].as_bool().unwrap_or(false)),
        badge(report["parity_pass"].as_bool().unwrap_or(false)),
    );
    page.push_str("<h2>Delivery and latency</h2>");
    page.push_str(&phase_table(report));
    page.push_str(&line_chart(
        "Latency percentiles, first party vs interop (from scheduled send to the recipient's read)",
        "percentile",
        "latency, ms",
        XScale::Percentile,
        &[
            Series {
                name: "first party",
                color: FIRST_PARTY_COLOR,
                points: curves
                    .first_party
                    .iter()
                    .map(|&(p, us)| (p, us as f64 / 1000.0))
                    .collect(),
            },
            Series {
                name: "interop",
                color: INTEROP_COLOR,
                points: curves
                    .interop
                    .iter()
                    .map(|&(p, us)| (p, us as f64 / 1000.0))
                    .collect(),
            },
        ],
    ));
    page.push_str("<h2>SLA parity</h2>");
    page.push_str(&parity_table(&report["parity"]));
    page.push_str(&timeline_charts(report));
    page.push_str("<h2>Counts</h2>");
    page.push_str(&counts_table(report));
    if report["overload"].is_object() {
        let o = &report["overload"];
        let _ = write!(
            page,
            "<h2>Overload: {} messages/s offered</h2>",
            num(&o["rate_per_s"])
        );
        page.push_str(&phase_table(o));
        page.push_str(&parity_table(&o["parity"]));
        page.push_str(&timeline_charts(o));
    }
    if report["max"].is_object() {
        let m = &report["max"];
        let _ = write!(
            page,
            "<h2>Highest rate with p99 under {} ms: {} messages/s</h2><table><tr><th>step</th><th>rate /s</th><th>p99 ms</th><th>refused</th><th>unsent</th><th>held</th></tr>",
            ms(&m["p99_bound_us"]),
            num(&m["rate_per_s"])
        );
        for (i, s) in m["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                num(&s["rate_per_s"]),
                ms(&s["p99_us"]),
                num(&s["rejected"]),
                num(&s["unsent"]),
                num(&s["held"])
            );
        }
        page.push_str("</table>");
        let points: Vec<(f64, f64)> = m["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| Some((s["rate_per_s"].as_f64()?, s["p99_us"].as_f64()? / 1000.0)))
            .collect();
        let mut sorted = points;
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        page.push_str(&line_chart(
            "p99 by offered rate (search steps)",
            "messages / s",
            "p99, ms",
            XScale::Linear,
            &[Series {
                name: "p99",
                color: "#ff7f0e",
                points: sorted,
            }],
        ));
    }
    if report["connection_scale"].is_object() {
        let c = &report["connection_scale"];
        page.push_str("<h2>Connection scale</h2><table>");
        if let Some(map) = c.as_object() {
            for (k, v) in map {
                if !v.is_object() && !v.is_array() {
                    let _ = write!(page, "<tr><th>{}</th><td>{}</td></tr>", escape(k), num(v));
                }
            }
        }
        page.push_str("</table>");
    }
    let pretty = |v: &Value| escape(&serde_json::to_string_pretty(v).unwrap_or_default());
    let _ = write!(
        page,
        "<h2>Configuration</h2><pre>{}</pre><h2>Machine</h2><pre>{}</pre><h2>Setup</h2><pre>{}</pre><pre>{}</pre></body></html>",
        pretty(&report["config"]),
        pretty(&report["machine"]),
        pretty(&report["setup"]),
        pretty(&report["relay"]),
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_and_escape_text() {
        let svg = line_chart(
            "a <b> & c",
            "x",
            "y",
            XScale::Percentile,
            &[Series {
                name: "s",
                color: "#000",
                points: vec![(0.0, 1.0), (50.0, 2.0), (99.0, 5.0), (99.99, 9.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains(">99.9<"));
        let empty = line_chart("e", "x", "y", XScale::Linear, &[]);
        assert!(empty.contains("no data"));
    }

    #[test]
    fn the_page_is_self_contained() {
        let report = serde_json::json!({
            "pass": true, "integrity_pass": true, "parity_pass": true, "target": "relay://127.0.0.1:1",
            "parity": {"pass": true, "bound": 1.1, "judged": {"p50": true}},
            "timeline": [{"t_s": 1.0, "deliveries_per_s": 10.0, "p99_us": 900}],
            "classes": {"first_party": {}, "interop": {}},
        });
        let curves = Curves {
            first_party: vec![(50.0, 100), (99.0, 900)],
            interop: vec![(50.0, 110)],
        };
        let page = render(&report, &curves);
        assert!(page.contains("<svg"));
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"));
        assert!(!page.contains("href=\"http"));
        assert!(page.ends_with("</html>"));
    }

    #[test]
    fn ticks_are_nice() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
        assert_eq!(format_tick(25_000.0), "25k");
        assert!((percentile_x(99.0) - 2.0).abs() < 1e-9);
    }
}
