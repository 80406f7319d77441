//! Token buckets against enumeration and draining: identifiers looked up per partner per
//! minute and per requesting user per day, key claims per partner and per (requester,
//! target). Sans-IO: the time is an argument. A bucket is dropped once it would be full again
//! (one period without use), and the map is bounded: past `BUCKETS_MAX` live buckets a new
//! key is refused until some run full.

use std::collections::HashMap;

use codec::{NetworkId, UserAddress};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
    /// Its own period: after that long without use it is full and can go.
    period_ms: u64,
}

/// What a bucket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Partner(NetworkId),
    User(UserAddress),
    /// Key claims of one partner.
    Claims(NetworkId),
    /// Key claims of one requester for one target user.
    ClaimPair(UserAddress, UserAddress),
}

/// Buckets kept before idle (full) ones are swept.
const BUCKETS_SWEEP_AT: usize = 100_000;
/// Live buckets at most.
const BUCKETS_MAX: usize = 1_000_000;

#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<Key, Bucket>,
    /// When the buckets were last swept (at most once a second: a sweep scans them all).
    swept_at_ms: u64,
}

impl RateLimiter {
    /// Takes `cost` tokens from each `(key, capacity, period_ms)` bucket, all or none.
    /// `Err` is the wait, in milliseconds, until the cost would fit.
    pub fn take(&mut self, now_ms: u64, cost: u32, limits: &[(Key, u32, u64)]) -> Result<(), u64> {
        if self.buckets.len() > BUCKETS_SWEEP_AT && now_ms >= self.swept_at_ms + 1000 {
            self.sweep(now_ms);
            self.swept_at_ms = now_ms;
        }
        let new_keys = limits
            .iter()
            .filter(|(key, ..)| !self.buckets.contains_key(key))
            .count();
        if self.buckets.len() + new_keys > BUCKETS_MAX {
            return Err(limits.iter().map(|l| l.2).max().unwrap_or(60_000));
        }
        let mut wait_ms = 0u64;
        for &(key, capacity, period_ms) in limits {
            let bucket = self.refill(key, capacity, period_ms, now_ms);
            let missing = f64::from(cost) - bucket.tokens;
            if missing > 0.0 {
                let rate = f64::from(capacity.max(1)) / period_ms.max(1) as f64;
                // A cost above the capacity never fits: report the full period.
                let wait = if cost > capacity {
                    period_ms as f64
                } else {
                    missing / rate
                };
                // A wait in milliseconds: far below u64::MAX, and never negative.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let wait = wait.ceil() as u64;
                wait_ms = wait_ms.max(wait);
            }
        }
        if wait_ms > 0 {
            return Err(wait_ms);
        }
        for &(key, ..) in limits {
            if let Some(bucket) = self.buckets.get_mut(&key) {
                bucket.tokens -= f64::from(cost);
            }
        }
        Ok(())
    }

    fn refill(&mut self, key: Key, capacity: u32, period_ms: u64, now_ms: u64) -> Bucket {
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: f64::from(capacity),
            at_ms: now_ms,
            period_ms,
        });
        bucket.period_ms = period_ms;
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64;
        let rate = f64::from(capacity) / period_ms.max(1) as f64;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(f64::from(capacity));
        bucket.at_ms = now_ms;
        *bucket
    }

    /// Drops the buckets that have refilled completely.
    fn sweep(&mut self, now_ms: u64) {
        self.buckets
            .retain(|_, b| now_ms.saturating_sub(b.at_ms) < b.period_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_over_their_period() {
        let mut limiter = RateLimiter::default();
        let key = Key::Partner(NetworkId(2));
        let limits = [(key, 100, 60_000)];
        assert!(limiter.take(0, 60, &limits).is_ok());
        let wait = limiter.take(0, 60, &limits).unwrap_err();
        assert_eq!(wait, 12_000);
        assert!(limiter.take(12_000, 60, &limits).is_ok());
        assert_eq!(limiter.take(12_000, 101, &limits), Err(60_000));
    }

    #[test]
    fn all_or_nothing_across_buckets() {
        let mut limiter = RateLimiter::default();
        let partner = (Key::Partner(NetworkId(2)), 1000, 60_000);
        let user = (
            Key::User(UserAddress {
                network: NetworkId(2),
                user: codec::UserId(1),
            }),
            10,
            86_400_000,
        );
        assert!(limiter.take(0, 10, &[partner, user]).is_ok());
        assert!(limiter.take(0, 1, &[partner, user]).is_err());
        // The partner bucket was not charged by the refused call.
        assert!(limiter.take(0, 990, &[partner]).is_ok());
    }
}
