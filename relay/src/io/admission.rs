//! Who may start a TLS handshake on the data port: a token bucket of handshakes per core
//! (`handshakes_per_core_per_second_max`) and the unauthenticated connections each source
//! address holds, all cores together (`unauthenticated_per_source_max`). The per-core cap on
//! unauthenticated connections and its eviction of the oldest live in the worker, which
//! knows its connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// A source address as the caps count it: an IPv4 address, or an IPv6 /64 (one subscriber's
/// usual allocation, so an attacker cannot multiply itself by walking its own prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceKey(u128);

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(u128::from(u32::from(v4))),
                // The top bit marks IPv6, so no /64 collides with an IPv4 address.
                None => SourceKey((u128::from(v6) & !((1u128 << 64) - 1)) | 1),
            },
        }
    }
}

/// Unauthenticated connections open per source, every core's together. An entry exists only
/// while its count is above zero, so the map holds at most one entry per unauthenticated
/// connection: the per-core caps bound it.
#[derive(Debug, Default)]
pub struct Sources {
    open: Mutex<HashMap<SourceKey, u32>>,
}

impl Sources {
    /// Counts one more unauthenticated connection from `source`, unless it has `max`.
    pub fn try_add(&self, source: SourceKey, max: u32) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(source).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&source);
            }
            return false;
        }
        *count += 1;
        true
    }

    /// One unauthenticated connection from `source` authenticated or closed.
    pub fn remove(&self, source: SourceKey) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&source);
            }
        }
    }

    /// Source addresses with an unauthenticated connection open.
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A token bucket holding one second's worth of handshakes, refilled continuously (GCRA:
/// one theoretical arrival time instead of a token count).
#[derive(Debug)]
pub struct HandshakeBucket {
    interval_ns: u64,
    burst_ns: u64,
    /// When the bucket is next empty again, in nanoseconds of the caller's clock.
    tat_ns: u64,
}

impl HandshakeBucket {
    pub fn new(per_second: u32) -> HandshakeBucket {
        let per_second = u64::from(per_second.max(1));
        let interval_ns = 1_000_000_000 / per_second;
        HandshakeBucket {
            interval_ns,
            burst_ns: interval_ns * per_second,
            tat_ns: 0,
        }
    }

    /// Takes a token at `now_ns` if there is one.
    pub fn try_take(&mut self, now_ns: u64) -> bool {
        let tat = self.tat_ns.max(now_ns);
        if tat.saturating_sub(now_ns) + self.interval_ns > self.burst_ns {
            return false;
        }
        self.tat_ns = tat + self.interval_ns;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_one_second_and_refills() {
        let mut bucket = HandshakeBucket::new(10);
        let taken = (0..20).filter(|_| bucket.try_take(1_000)).count();
        assert_eq!(taken, 10, "a burst of one second's worth");
        assert!(!bucket.try_take(1_000 + 50_000_000), "not yet refilled");
        assert!(bucket.try_take(1_000 + 100_000_000), "one token per 100 ms");
    }

    #[test]
    fn sources_count_per_address_and_forget_at_zero() {
        let sources = Sources::default();
        let a = SourceKey::of("192.0.2.1".parse().unwrap());
        let b = SourceKey::of("2001:db8::1".parse().unwrap());
        let b_same_64 = SourceKey::of("2001:db8::ffff:1".parse().unwrap());
        assert_eq!(b, b_same_64);
        assert!(sources.try_add(a, 2));
        assert!(sources.try_add(a, 2));
        assert!(!sources.try_add(a, 2));
        assert!(sources.try_add(b, 2));
        sources.remove(a);
        assert!(sources.try_add(a, 2));
        sources.remove(a);
        sources.remove(a);
        sources.remove(b);
        assert!(sources.is_empty());
    }
}
