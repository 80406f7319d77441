//! The phases of a run, the same for every target: warmup, the `--max` search steps, the
//! main (or parity) phase and the overload phase.

use std::time::Duration;

use serde_json::Value;

use crate::cli::RunArgs;
use crate::maxrate::MaxSearch;
use crate::parity::{Parity, ParityConfig};
use crate::phase::{PhaseResult, PhaseSpec};
use crate::report::parity_of;
use crate::target::Target;

/// Everything the phases produced.
pub(crate) struct Outcome {
    /// (role, result, parity) of each reported phase.
    pub phases: Vec<(String, PhaseResult, Parity)>,
    pub main: usize,
    pub overload: Option<usize>,
    pub max: Option<MaxSearch>,
    pub scale: Option<Value>,
    pub setup: Value,
    pub relay: Value,
    /// What enlisting the population did ([`crate::enlist::EnlistReport`]).
    pub enlistment: Value,
}

/// Runs the phases of the chosen mode.
pub(crate) async fn scenario<T: Target>(
    target: &T,
    args: &RunArgs,
    parity: &ParityConfig,
) -> Outcome {
    let drain = Duration::from_secs_f64(args.drain_s);
    let duration = Duration::from_secs_f64(args.duration);
    let offline_return = Some(Duration::from_secs_f64(
        args.offline_return_s.unwrap_or(args.duration / 2.0),
    ));
    let phase = |name: &str, rate: f64, duration: Duration| PhaseSpec {
        name: name.to_string(),
        rate_per_s: rate,
        duration,
        drain,
    };
    let warmup_rate = if args.max { args.max_start } else { args.rate };
    // With --max, offline devices come back during the warmup, so that the steps (and the
    // parity run) measure a steady state rather than the catch-up of queued messages.
    let warmup = Duration::from_secs_f64(args.warmup);
    if args.warmup > 0.0 || args.max {
        let warmup = warmup.max(Duration::from_secs(1));
        let spec = phase("warmup", warmup_rate, warmup);
        let back = args.max.then_some(warmup / 4);
        let _ = target.run_phase(&spec, back).await;
    }
    let mut phases = Vec::new();
    let mut search = None;
    let base_rate = if args.max {
        let mut s = MaxSearch::new(
            args.max_start,
            crate::rng::saturating_u64(args.p99_bound_ms * 1000.0),
            args.max_precision,
            args.max_steps,
        );
        let step = Duration::from_secs_f64(args.max_step_s);
        let mut n = 0;
        while let Some(rate) = s.next_rate() {
            n += 1;
            let result = target
                .run_phase(&phase(&format!("step-{n}"), rate, step), None)
                .await;
            let all = crate::stats::LatencySummary::of(&result.latencies.all());
            let total = result.tally.total();
            let outcome = s.judge(
                rate,
                all.p99,
                result.tally.intact(),
                total.unsent,
                total.rejected,
                result.settled,
            );
            if let Some(p) = outcome
                .held
                .then_some(())
                .map(|()| "held")
                .or(Some("failed"))
            {
                eprintln!(
                    "max: step {n} at {rate:.0}/s: p99 {} {p}",
                    crate::phase::format_us(all.p99)
                );
            }
            s.observe(outcome);
            let verdict = parity_of(&result, parity);
            phases.push(("max-step".to_string(), result, verdict));
        }
        let found = s.result().unwrap_or(args.max_start / 2.0);
        search = Some(s);
        found * 0.5
    } else {
        args.rate
    };
    let main_name = if args.max { "parity" } else { "main" };
    let back = if args.max { None } else { offline_return };
    let result = target
        .run_phase(&phase(main_name, base_rate, duration), back)
        .await;
    let verdict = parity_of(&result, parity);
    phases.push(("main".to_string(), result, verdict));
    let main = phases.len() - 1;
    let factor = args.overload_factor.or(args.max.then_some(3.0));
    let mut overload = None;
    if let Some(factor) = factor {
        let rate = if args.max {
            base_rate * 2.0 * factor
        } else {
            base_rate * factor
        };
        let result = target
            .run_phase(&phase("overload", rate, duration), None)
            .await;
        let verdict = parity_of(&result, parity);
        phases.push(("overload".to_string(), result, verdict));
        overload = Some(phases.len() - 1);
    }
    Outcome {
        phases,
        main,
        overload,
        max: search,
        scale: None,
        setup: Value::Null,
        relay: Value::Null,
        enlistment: Value::Null,
    }
}
