//! Token buckets against enumeration and draining: identifiers looked up per partner per
//! minute and per requesting user per day, key claims per partner and per (requester,
//! target). Sans-IO: the time is an argument.
//!
//! Each network's buckets live in a table of their own, bounded by
//! `interop.rate_buckets_per_network_max`: a network that fills its table is refused
//! (`RATE_TABLE_FULL`) until some of its buckets run full again, and no other network notices,
//! the gatekeeper included. A call that is refused takes nothing and creates no bucket, so
//! refused calls cannot fill a table either. A bucket is dropped once it would be full again
//! (one period without use). The tables themselves are one per network that made a call that
//! was charged: registered networks only, since every caller is authenticated first.

use std::collections::HashMap;

use codec::{NetworkId, UserAddress};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
    /// Its own period: after that long without use it is full and can go.
    period_ms: u64,
}

impl Bucket {
    /// The bucket as it stands at `now_ms` (refilled), without changing it.
    fn at(self, capacity: u32, period_ms: u64, now_ms: u64) -> Bucket {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        let rate = f64::from(capacity) / period_ms.max(1) as f64;
        Bucket {
            tokens: (self.tokens + elapsed * rate).min(f64::from(capacity)),
            at_ms: now_ms.max(self.at_ms),
            period_ms,
        }
    }

    /// When it is full again and may go.
    fn full_at_ms(self) -> u64 {
        self.at_ms.saturating_add(self.period_ms)
    }
}

/// What a bucket is for. Every key belongs to the network that is charged: the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Partner(NetworkId),
    User(UserAddress),
    /// Key claims of one partner.
    Claims(NetworkId),
    /// Key claims of one requester for one target user.
    ClaimPair(UserAddress, UserAddress),
}

/// Why a call was refused; either way nothing was taken and no bucket was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A bucket is short: the wait, in milliseconds, until the cost would fit.
    Wait(u64),
    /// The network's own table is full of live buckets: the wait until one runs full.
    TableFull(u64),
}

/// One network's buckets.
#[derive(Debug, Default)]
struct Table {
    buckets: HashMap<Key, Bucket>,
    /// When this table was last swept (at most once a second: a sweep scans it all).
    swept_at_ms: u64,
    /// After the last sweep: when its first bucket runs full (the `Retry-After` of a full
    /// table).
    next_full_ms: u64,
}

impl Table {
    /// Drops the buckets that have refilled completely.
    fn sweep(&mut self, now_ms: u64) {
        self.buckets.retain(|_, b| b.full_at_ms() > now_ms);
        self.swept_at_ms = now_ms;
        self.next_full_ms = self
            .buckets
            .values()
            .map(|b| b.full_at_ms())
            .min()
            .unwrap_or(now_ms);
    }
}

#[derive(Debug)]
pub struct RateLimiter {
    tables: HashMap<NetworkId, Table>,
    /// Live buckets one network may have (`interop.rate_buckets_per_network_max`).
    buckets_per_network_max: usize,
}

impl RateLimiter {
    pub fn new(buckets_per_network_max: u32) -> RateLimiter {
        RateLimiter {
            tables: HashMap::new(),
            buckets_per_network_max: (buckets_per_network_max as usize).max(1),
        }
    }

    /// Takes `cost` tokens from each `(key, capacity, period_ms)` bucket of `network`'s
    /// table, all or none. A refused call changes nothing.
    pub fn take(
        &mut self,
        network: NetworkId,
        now_ms: u64,
        cost: u32,
        limits: &[(Key, u32, u64)],
    ) -> Result<(), Refused> {
        let table = self.tables.entry(network).or_default();
        let mut wait_ms = 0u64;
        let mut new_keys = 0usize;
        for &(key, capacity, period_ms) in limits {
            let bucket = match table.buckets.get(&key) {
                Some(bucket) => bucket.at(capacity, period_ms, now_ms),
                None => {
                    new_keys += 1;
                    Bucket {
                        tokens: f64::from(capacity),
                        at_ms: now_ms,
                        period_ms,
                    }
                }
            };
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
            if table.buckets.is_empty() {
                self.tables.remove(&network);
            }
            return Err(Refused::Wait(wait_ms));
        }
        if table.buckets.len() + new_keys > self.buckets_per_network_max {
            if now_ms >= table.swept_at_ms + 1000 {
                table.sweep(now_ms);
            }
            if table.buckets.len() + new_keys > self.buckets_per_network_max {
                return Err(Refused::TableFull(
                    table.next_full_ms.saturating_sub(now_ms).max(1000),
                ));
            }
        }
        for &(key, capacity, period_ms) in limits {
            let bucket = table.buckets.entry(key).or_insert(Bucket {
                tokens: f64::from(capacity),
                at_ms: now_ms,
                period_ms,
            });
            *bucket = bucket.at(capacity, period_ms, now_ms);
            bucket.tokens -= f64::from(cost);
        }
        Ok(())
    }

    /// Live buckets per network (for `/metrics`), in network order.
    pub fn buckets(&self) -> Vec<(NetworkId, usize)> {
        let mut out: Vec<(NetworkId, usize)> = self
            .tables
            .iter()
            .map(|(network, table)| (*network, table.buckets.len()))
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTNER: NetworkId = NetworkId(2);

    fn user(network: u32, id: u128) -> UserAddress {
        UserAddress {
            network: NetworkId(network),
            user: codec::UserId(id),
        }
    }

    #[test]
    fn buckets_refill_over_their_period() {
        let mut limiter = RateLimiter::new(100);
        let key = Key::Partner(PARTNER);
        let limits = [(key, 100, 60_000)];
        assert!(limiter.take(PARTNER, 0, 60, &limits).is_ok());
        let wait = limiter.take(PARTNER, 0, 60, &limits).unwrap_err();
        assert_eq!(wait, Refused::Wait(12_000));
        assert!(limiter.take(PARTNER, 12_000, 60, &limits).is_ok());
        assert_eq!(
            limiter.take(PARTNER, 12_000, 101, &limits),
            Err(Refused::Wait(60_000))
        );
    }

    #[test]
    fn all_or_nothing_across_buckets() {
        let mut limiter = RateLimiter::new(100);
        let partner = (Key::Partner(PARTNER), 1000, 60_000);
        let user = (Key::User(user(2, 1)), 10, 86_400_000);
        assert!(limiter.take(PARTNER, 0, 10, &[partner, user]).is_ok());
        assert!(limiter.take(PARTNER, 0, 1, &[partner, user]).is_err());
        // The partner bucket was not charged by the refused call.
        assert!(limiter.take(PARTNER, 0, 990, &[partner]).is_ok());
    }

    /// A refused call leaves no bucket behind, even for keys it named for the first time.
    #[test]
    fn a_refused_call_creates_no_bucket() {
        let mut limiter = RateLimiter::new(100);
        let claims = (Key::Claims(PARTNER), 1, 60_000);
        assert!(limiter.take(PARTNER, 0, 1, &[claims]).is_ok());
        for n in 0..50 {
            let pair = (Key::ClaimPair(user(2, n), user(1, 7)), 100, 86_400_000);
            assert_eq!(
                limiter.take(PARTNER, 0, 1, &[claims, pair]),
                Err(Refused::Wait(60_000))
            );
        }
        assert_eq!(limiter.buckets(), [(PARTNER, 1)]);
    }

    /// One network filling its table is refused with `TableFull`; another network's calls,
    /// the gatekeeper's included, go on as before.
    #[test]
    fn a_full_table_is_the_filling_networks_alone() {
        let mut limiter = RateLimiter::new(8);
        let day = 86_400_000;
        for n in 0..8 {
            let pair = (Key::ClaimPair(user(2, n), user(1, 7)), 100, day);
            assert!(limiter.take(PARTNER, 0, 1, &[pair]).is_ok());
        }
        let pair = (Key::ClaimPair(user(2, 99), user(1, 7)), 100, day);
        let Err(Refused::TableFull(wait)) = limiter.take(PARTNER, 5_000, 1, &[pair]) else {
            panic!("the ninth bucket fits in a table of eight");
        };
        assert_eq!(wait, day - 5_000, "until the first bucket runs full");
        for network in [1, 3] {
            let own = NetworkId(network);
            for n in 0..8 {
                let pair = (Key::ClaimPair(user(network, n), user(2, 7)), 100, day);
                assert!(limiter.take(own, 5_000, 1, &[pair]).is_ok());
            }
        }
        // Once its buckets run full, the network is served again.
        assert!(limiter.take(PARTNER, day, 1, &[pair]).is_ok());
        assert_eq!(
            limiter.buckets(),
            [(NetworkId(1), 8), (PARTNER, 1), (NetworkId(3), 8)]
        );
    }
}
