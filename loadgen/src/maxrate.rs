//! `--max`: the search for the highest rate the relay holds with p99 under a bound. A plain
//! state machine: it proposes a rate, the caller runs a step at that rate and reports the
//! outcome, until it has bracketed the answer closely enough.
//!
//! Doubling from the start rate until a step fails, then bisecting between the last rate that
//! held and the first that did not, until they are within `precision` of each other.

use serde::Serialize;

/// What one step showed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepOutcome {
    pub rate_per_s: f64,
    pub p99_us: u64,
    /// Nothing lost, duplicated or reordered.
    pub intact: bool,
    /// Messages loadgen could not write in time, or the relay refused (back-pressure).
    pub unsent: u64,
    pub rejected: u64,
    /// Every accepted message arrived before the drain timeout.
    pub settled: bool,
    pub held: bool,
}

/// The search.
#[derive(Debug, Clone, Serialize)]
pub struct MaxSearch {
    pub p99_bound_us: u64,
    pub precision: f64,
    pub steps_max: usize,
    pub steps: Vec<StepOutcome>,
    held: Option<f64>,
    failed: Option<f64>,
    next: Option<f64>,
}

impl MaxSearch {
    pub fn new(start_rate: f64, p99_bound_us: u64, precision: f64, steps_max: usize) -> MaxSearch {
        MaxSearch {
            p99_bound_us,
            precision,
            steps_max,
            steps: Vec::new(),
            held: None,
            failed: None,
            next: Some(start_rate.max(1.0)),
        }
    }

    /// The next rate to try, or `None` when the search is over.
    pub fn next_rate(&self) -> Option<f64> {
        self.next
    }

    /// Whether a step held: p99 within the bound, intact, no refusals, nothing left unsent,
    /// everything delivered.
    pub fn judge(
        &self,
        rate: f64,
        p99_us: u64,
        intact: bool,
        unsent: u64,
        rejected: u64,
        settled: bool,
    ) -> StepOutcome {
        StepOutcome {
            rate_per_s: rate,
            p99_us,
            intact,
            unsent,
            rejected,
            settled,
            held: p99_us <= self.p99_bound_us && intact && unsent == 0 && rejected == 0 && settled,
        }
    }

    pub fn observe(&mut self, outcome: StepOutcome) {
        let rate = outcome.rate_per_s;
        self.steps.push(outcome);
        if outcome.held {
            self.held = Some(self.held.map_or(rate, |h| h.max(rate)));
        } else {
            self.failed = Some(self.failed.map_or(rate, |f| f.min(rate)));
        }
        self.next = if self.steps.len() >= self.steps_max {
            None
        } else {
            match (self.held, self.failed) {
                (Some(held), None) => Some(held * 2.0),
                (None, Some(failed)) if failed > 2.0 => Some((failed / 2.0).floor()),
                (None, Some(_)) => None,
                (Some(held), Some(failed)) if (failed - held) / held > self.precision => {
                    Some(((held + failed) / 2.0).round())
                }
                _ => None,
            }
        };
    }

    /// The highest rate that held.
    pub fn result(&self) -> Option<f64> {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a relay that holds exactly up to `capacity`.
    fn search(capacity: f64, start: f64) -> MaxSearch {
        let mut s = MaxSearch::new(start, 5000, 0.05, 30);
        while let Some(rate) = s.next_rate() {
            let p99 = if rate <= capacity { 1000 } else { 50_000 };
            let outcome = s.judge(rate, p99, true, 0, 0, true);
            s.observe(outcome);
        }
        s
    }

    #[test]
    fn it_brackets_the_capacity() {
        let s = search(37_000.0, 1000.0);
        let found = s.result().unwrap();
        assert!((37_000.0 / 1.05..=37_000.0).contains(&found), "{found}");
        assert!(s.steps.len() < 20);
        // Starting above the capacity works too.
        let s = search(3_000.0, 100_000.0);
        let found = s.result().unwrap();
        assert!((3_000.0 / 1.05..=3_000.0).contains(&found), "{found}");
    }

    #[test]
    fn any_defect_fails_a_step() {
        let s = MaxSearch::new(100.0, 5000, 0.05, 10);
        assert!(s.judge(100.0, 100, true, 0, 0, true).held);
        assert!(!s.judge(100.0, 6000, true, 0, 0, true).held);
        assert!(!s.judge(100.0, 100, false, 0, 0, true).held);
        assert!(!s.judge(100.0, 100, true, 3, 0, true).held);
        assert!(!s.judge(100.0, 100, true, 0, 1, true).held);
        assert!(!s.judge(100.0, 100, true, 0, 0, false).held);
    }

    #[test]
    fn the_step_budget_ends_the_search() {
        let mut s = MaxSearch::new(10.0, 5000, 0.0, 3);
        while let Some(rate) = s.next_rate() {
            let outcome = s.judge(rate, 1, true, 0, 0, true);
            s.observe(outcome);
        }
        assert_eq!(s.steps.len(), 3);
        assert_eq!(s.result(), Some(40.0));
    }
}
