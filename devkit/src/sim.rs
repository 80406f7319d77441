//! Seeded simulation: a small deterministic generator and a loop over seeds that names the
//! failing one, so any failure replays exactly.
//!
//! `A7_SEEDS=n` runs seeds `1..=n` instead of the test's default count; `A7_SEED=n` runs seed
//! `n` alone (what a failure prints).

use std::fmt::Display;

/// Seeds to run when `A7_SEED` is not set: `1..=A7_SEEDS` (or the test's default).
pub const SEEDS_VAR: &str = "A7_SEEDS";
/// The one seed to run.
pub const SEED_VAR: &str = "A7_SEED";

/// Xorshift64: fast, and the same numbers on every machine. Not for anything secret.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// The generator of `seed`; nearby seeds give unrelated sequences (and the state is never
    /// 0, where xorshift stays).
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `0..n` (`n` > 0; modulo bias is fine for a simulation).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What one seed's run can end with: `()` (it panics on failure) or a `Result`.
pub trait SeedOutcome {
    /// The failure, if any.
    fn failure(self) -> Option<String>;
}

impl SeedOutcome for () {
    fn failure(self) -> Option<String> {
        None
    }
}

impl<E: Display> SeedOutcome for Result<(), E> {
    fn failure(self) -> Option<String> {
        self.err().map(|e| e.to_string())
    }
}

/// The seeds to run: `A7_SEED` alone if set, else `1..=A7_SEEDS`, else `1..=default_count`.
///
/// # Panics
///
/// If either variable is set but not a number: a typo must not quietly run the defaults.
pub fn seeds(default_count: u64) -> Vec<u64> {
    let var = |name| std::env::var(name).ok();
    seeds_from(
        var(SEED_VAR).as_deref(),
        var(SEEDS_VAR).as_deref(),
        default_count,
    )
}

fn seeds_from(seed: Option<&str>, count: Option<&str>, default_count: u64) -> Vec<u64> {
    let number = |name: &str, text: &str| -> u64 {
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number"))
    };
    if let Some(seed) = seed {
        return vec![number(SEED_VAR, seed)];
    }
    let count = count.map_or(default_count, |c| number(SEEDS_VAR, c));
    (1..=count).collect()
}

/// Runs `run` for every seed of [`seeds`]. A failure, returned or panicked, names its seed and
/// how to replay it alone.
///
/// # Panics
///
/// On the first failing seed.
pub fn for_each_seed<O: SeedOutcome>(default_count: u64, run: impl FnMut(u64) -> O) {
    run_seeds(seeds(default_count), run);
}

fn run_seeds<O: SeedOutcome>(seeds: Vec<u64>, mut run: impl FnMut(u64) -> O) {
    for seed in seeds {
        let guard = NameSeedOnPanic(seed);
        let failure = run(seed).failure();
        drop(guard);
        if let Some(failure) = failure {
            panic!("SEED={seed}: {failure} (replay: {SEED_VAR}={seed})");
        }
    }
}

/// Names the seed when its run panics (the panic's own message comes first).
struct NameSeedOnPanic(u64);

impl Drop for NameSeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let seed = self.0;
            eprintln!("SEED={seed} failed (replay: {SEED_VAR}={seed})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator the relay's simulation tests have used: their seeds must replay the same.
    #[test]
    fn the_sequence_is_the_simulations_xorshift() {
        let mut state = 7u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rng = SimRng::new(7);
        for _ in 0..100 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            assert_eq!(rng.next_u64(), state);
        }
        let mut a = SimRng::new(3);
        assert!((0..1000).all(|_| a.below(10) < 10));
        assert!((0..1000).all(|_| !a.chance(0) && a.chance(100)));
    }

    #[test]
    fn seeds_come_from_the_variables_or_the_default() {
        assert_eq!(seeds_from(None, None, 3), [1, 2, 3]);
        assert_eq!(seeds_from(None, Some("2"), 3), [1, 2]);
        assert_eq!(seeds_from(Some("42"), Some("2"), 3), [42]);
        assert!(seeds_from(None, Some("0"), 3).is_empty());
    }

    #[test]
    #[should_panic(expected = "A7_SEEDS=\"x\" is not a number")]
    fn a_garbled_count_is_an_error() {
        seeds_from(None, Some("x"), 3);
    }

    #[test]
    fn every_seed_runs_once_in_order() {
        let mut ran = Vec::new();
        run_seeds(vec![1, 2, 3, 4], |seed| ran.push(seed));
        assert_eq!(ran, [1, 2, 3, 4]);
    }

    #[test]
    #[should_panic(expected = "SEED=2: odd (replay: A7_SEED=2)")]
    fn a_failure_names_its_seed() {
        run_seeds(
            vec![1, 2, 3],
            |seed| if seed == 2 { Err("odd") } else { Ok(()) },
        );
    }
}
