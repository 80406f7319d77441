//! The SLA-parity verdict: does a partner's user get what a gatekeeper user gets? Compares
//! the `interop` class with the `first_party` class of the same run on p50, p99 and p999
//! latency and on delivery. Pure functions over the figures.
//!
//! Two guards keep the verdict about the relay and not about noise:
//! - a latency *floor*: both sides are raised to at least `floor_us` before dividing, so
//!   120 µs against 100 µs (scheduler jitter) is not a 20% gap;
//! - a percentile is judged only when both classes have at least `tail_samples` samples
//!   beyond it (10 by default: 1,000 samples for p99, 10,000 for p999); otherwise its ratio
//!   is reported and marked not judged.

use serde::Serialize;

/// Which interop traffic the verdict compares with first party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Interop traffic whose both ends go through server sessions, as first-party traffic
    /// does: the same path, so any gap is the relay treating the classes differently.
    Matched,
    /// All interop traffic, device sessions included: a gap may then also come from the
    /// cost of the direct architecture (one session per device), in the relay and in the
    /// load generator sharing its machine.
    All,
}

/// The bounds of the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParityConfig {
    pub scope: Scope,
    /// Largest interop/first-party latency ratio that passes (1.10: within 10%).
    pub bound: f64,
    /// Latencies below this count as this, in microseconds.
    pub floor_us: u64,
    /// How far interop's delivery ratio may fall below first party's (0: equal or better).
    pub delivery_tolerance: f64,
    /// Samples needed beyond a percentile for it to be judged.
    pub tail_samples: u64,
}

impl Default for ParityConfig {
    fn default() -> Self {
        ParityConfig {
            scope: Scope::Matched,
            bound: 1.10,
            floor_us: 1000,
            delivery_tolerance: 0.0,
            tail_samples: 10,
        }
    }
}

/// What the verdict needs of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ClassFigures {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Device deliveries over device deliveries due, for every scheduled message.
    pub delivery_ratio: f64,
}

/// Whether each percentile was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Judged {
    pub p50: bool,
    pub p99: bool,
    pub p999: bool,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parity {
    /// Which interop traffic was compared.
    pub scope: Scope,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub p999_ratio: f64,
    /// Interop's delivery ratio over first party's.
    pub delivery_ratio: f64,
    /// The ratios without the floor.
    pub p50_ratio_raw: f64,
    pub p99_ratio_raw: f64,
    pub p999_ratio_raw: f64,
    pub judged: Judged,
    pub bound: f64,
    pub floor_us: u64,
    pub delivery_tolerance: f64,
    pub pass: bool,
    /// Why it failed, or which percentiles were not judged.
    pub notes: Vec<String>,
}

fn ratio(interop: u64, first_party: u64, floor: u64) -> f64 {
    let a = interop.max(floor).max(1) as f64;
    let b = first_party.max(floor).max(1) as f64;
    round3(a / b)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Judges interop against first party.
pub fn verdict(
    first_party: &ClassFigures,
    interop: &ClassFigures,
    config: &ParityConfig,
) -> Parity {
    let mut notes = Vec::new();
    let mut pass = true;
    let fewest = first_party.samples.min(interop.samples);
    let enough = |q: f64| fewest as f64 * (1.0 - q) >= config.tail_samples as f64;
    let judged = Judged {
        p50: enough(0.5),
        p99: enough(0.99),
        p999: enough(0.999),
    };
    let p50 = ratio(interop.p50_us, first_party.p50_us, config.floor_us);
    let p99 = ratio(interop.p99_us, first_party.p99_us, config.floor_us);
    let p999 = ratio(interop.p999_us, first_party.p999_us, config.floor_us);
    for (name, value, is_judged) in [
        ("p50", p50, judged.p50),
        ("p99", p99, judged.p99),
        ("p999", p999, judged.p999),
    ] {
        if !is_judged {
            notes.push(format!(
                "{name} not judged: {fewest} samples in the smaller class, fewer than {} beyond it",
                config.tail_samples
            ));
        } else if value > config.bound {
            pass = false;
            notes.push(format!(
                "{name}: interop/first_party = {value} > {}",
                config.bound
            ));
        }
    }
    let delivery = if first_party.delivery_ratio > 0.0 {
        round3(interop.delivery_ratio / first_party.delivery_ratio)
    } else if interop.delivery_ratio > 0.0 {
        f64::INFINITY
    } else {
        1.0
    };
    if first_party.samples == 0 || interop.samples == 0 {
        pass = false;
        notes.push("a class has no latency samples".into());
    }
    if interop.delivery_ratio + config.delivery_tolerance < first_party.delivery_ratio {
        pass = false;
        notes.push(format!(
            "delivery: interop {:.6} < first_party {:.6}",
            interop.delivery_ratio, first_party.delivery_ratio
        ));
    }
    Parity {
        scope: config.scope,
        p50_ratio: p50,
        p99_ratio: p99,
        p999_ratio: p999,
        delivery_ratio: if delivery.is_finite() {
            delivery
        } else {
            999.0
        },
        p50_ratio_raw: ratio(interop.p50_us, first_party.p50_us, 0),
        p99_ratio_raw: ratio(interop.p99_us, first_party.p99_us, 0),
        p999_ratio_raw: ratio(interop.p999_us, first_party.p999_us, 0),
        judged,
        bound: config.bound,
        floor_us: config.floor_us,
        delivery_tolerance: config.delivery_tolerance,
        pass,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(samples: u64, p50: u64, p99: u64, p999: u64, delivery: f64) -> ClassFigures {
        ClassFigures {
            samples,
            p50_us: p50,
            p99_us: p99,
            p999_us: p999,
            delivery_ratio: delivery,
        }
    }

    #[test]
    fn equal_classes_pass() {
        let a = figures(100_000, 2000, 5000, 9000, 1.0);
        let v = verdict(&a, &a, &ParityConfig::default());
        assert!(v.pass, "{v:?}");
        assert_eq!((v.p50_ratio, v.p99_ratio, v.p999_ratio), (1.0, 1.0, 1.0));
        assert!(v.notes.is_empty());
    }

    #[test]
    fn a_slower_interop_fails() {
        let first = figures(100_000, 2000, 5000, 9000, 1.0);
        let interop = figures(100_000, 2000, 6000, 9000, 1.0);
        let v = verdict(&first, &interop, &ParityConfig::default());
        assert!(!v.pass);
        assert_eq!(v.p99_ratio, 1.2);
        assert!(v.notes[0].starts_with("p99"));
        // A faster interop class is not a parity failure.
        assert!(verdict(&interop, &first, &ParityConfig::default()).pass);
    }

    #[test]
    fn the_floor_absorbs_microsecond_noise() {
        let first = figures(100_000, 100, 300, 600, 1.0);
        let interop = figures(100_000, 150, 450, 900, 1.0);
        let v = verdict(&first, &interop, &ParityConfig::default());
        assert!(v.pass, "{v:?}");
        assert_eq!(v.p99_ratio, 1.0);
        assert_eq!(v.p99_ratio_raw, 1.5);
        let strict = ParityConfig {
            floor_us: 0,
            ..ParityConfig::default()
        };
        assert!(!verdict(&first, &interop, &strict).pass);
    }

    #[test]
    fn thin_tails_are_not_judged() {
        let first = figures(500, 2000, 5000, 5000, 1.0);
        let interop = figures(500, 2000, 9000, 9000, 1.0);
        let v = verdict(&first, &interop, &ParityConfig::default());
        assert!(v.pass, "{v:?}");
        assert_eq!(
            v.judged,
            Judged {
                p50: true,
                p99: false,
                p999: false
            }
        );
        assert_eq!(v.notes.len(), 2);
    }

    #[test]
    fn worse_delivery_fails() {
        let first = figures(100_000, 2000, 5000, 9000, 1.0);
        let interop = figures(100_000, 2000, 5000, 9000, 0.99);
        let v = verdict(&first, &interop, &ParityConfig::default());
        assert!(!v.pass);
        assert_eq!(v.delivery_ratio, 0.99);
        let lenient = ParityConfig {
            delivery_tolerance: 0.02,
            ..ParityConfig::default()
        };
        assert!(verdict(&first, &interop, &lenient).pass);
        let empty = figures(0, 0, 0, 0, 0.0);
        assert!(!verdict(&empty, &interop, &ParityConfig::default()).pass);
    }
}
