//! Development helpers the relay, loadgen, the SDK example and the tests share, so each
//! exists once: the wall clock ([`now_ms`]), hex and SHA-256 fingerprints ([`hex`]), the
//! development PKI ([`pki`]) and seeded simulation ([`sim`]).
//!
//! Nothing here is for secrets beyond development: production PKIs and keys are the
//! operator's.

pub mod hex;
pub mod pki;
pub mod sim;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (0 before it, `u64::MAX` past its range).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_is_past_2020() {
        assert!(super::now_ms() > 1_577_836_800_000);
    }
}
