//! Who holds the HTTP port: connections per source and in all (two lanes), and the rate at
//! which one source may fetch what needs no certificate. Sans-IO: every call takes `now`;
//! the listener (`mod.rs`) keeps one [`Sources`] behind a mutex (each call is a few map
//! operations) and a [`Ticket`] per connection that gives its slot back on drop.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64, so a
//! cap per IPv6 address would cap nothing).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::limits::HttpLimits;

/// Where an accepted connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Every route.
    General,
    /// The general lane is full: `/healthz` and `/metrics` only, one request.
    Reserved,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source holds `connections_per_source_max` already.
    PerSource,
    /// Both lanes are full.
    Full,
}

/// A source's key in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

#[derive(Debug)]
struct Entry {
    connections: u32,
    /// Tokens times 60,000: a request costs 60,000 and each millisecond adds
    /// `open_requests_per_source_per_min`, so the arithmetic stays in integers.
    tokens: u64,
    refilled: Instant,
}

/// One unit of the bucket, scaled (see [`Entry::tokens`]).
const TOKEN: u64 = 60_000;

/// The per-source table and the lanes' occupancy.
#[derive(Debug)]
pub struct Sources {
    limits: HttpLimits,
    table: HashMap<Source, Entry>,
    general: u32,
    reserved: u32,
}

impl Sources {
    pub fn new(limits: HttpLimits) -> Sources {
        Sources {
            limits,
            table: HashMap::new(),
            general: 0,
            reserved: 0,
        }
    }

    fn bucket_max(&self) -> u64 {
        u64::from(self.limits.open_requests_per_source_per_min) * TOKEN
    }

    /// A slot for a new connection from `source`, or why not.
    pub fn admit(&mut self, source: Source, now: Instant) -> Result<Lane, Refusal> {
        let lane = if self.general < self.limits.connections_max {
            Lane::General
        } else if self.reserved < self.limits.connections_reserved {
            Lane::Reserved
        } else {
            return Err(Refusal::Full);
        };
        if let Some(entry) = self.table.get(&source)
            && entry.connections >= self.limits.connections_per_source_max
        {
            return Err(Refusal::PerSource);
        }
        if !self.table.contains_key(&source) && self.table.len() >= self.limits.sources_max as usize
        {
            // Sources with a connection are at most the slots in use, fewer than
            // `sources_max` (checked at start): forgetting the others makes room.
            self.table.retain(|_, entry| entry.connections > 0);
            assert!(self.table.len() < self.limits.sources_max as usize);
        }
        let bucket_max = self.bucket_max();
        let entry = self.table.entry(source).or_insert(Entry {
            connections: 0,
            tokens: bucket_max,
            refilled: now,
        });
        entry.connections += 1;
        match lane {
            Lane::General => self.general += 1,
            Lane::Reserved => self.reserved += 1,
        }
        Ok(lane)
    }

    /// The connection from `source` authenticated (a client certificate the TLS
    /// configuration trusts): it leaves its source's count, so a partner's servers behind
    /// one address may hold as many API connections as the lane has; the cap is for
    /// connections nobody vouched for.
    pub fn authenticated(&mut self, source: Source, now: Instant) {
        self.leave_source(source, now);
    }

    /// Gives back a slot taken by [`Sources::admit`]; `counted`: the connection still counts
    /// for its source (it did not authenticate).
    pub fn release(&mut self, source: Source, lane: Lane, counted: bool, now: Instant) {
        match lane {
            Lane::General => self.general -= 1,
            Lane::Reserved => self.reserved -= 1,
        }
        if counted {
            self.leave_source(source, now);
        }
    }

    fn leave_source(&mut self, source: Source, now: Instant) {
        let bucket_max = self.bucket_max();
        let rate = u64::from(self.limits.open_requests_per_source_per_min);
        let Some(entry) = self.table.get_mut(&source) else {
            return;
        };
        entry.connections -= 1;
        refill(entry, now, rate, bucket_max);
        if entry.connections == 0 && entry.tokens == bucket_max {
            self.table.remove(&source);
        }
    }

    /// Takes one request of the open routes' budget for `source`; `Err(wait)` when it has
    /// none left.
    pub fn take_open_request(&mut self, source: Source, now: Instant) -> Result<(), Duration> {
        let bucket_max = self.bucket_max();
        let rate = u64::from(self.limits.open_requests_per_source_per_min);
        // Only admitted connections ask, so the entry exists; if not, nothing to hold.
        let Some(entry) = self.table.get_mut(&source) else {
            return Ok(());
        };
        refill(entry, now, rate, bucket_max);
        if entry.tokens >= TOKEN {
            entry.tokens -= TOKEN;
            return Ok(());
        }
        let wait_ms = (TOKEN - entry.tokens).div_ceil(rate);
        Err(Duration::from_millis(wait_ms))
    }

    /// Connections open on each lane, and sources tracked.
    pub fn occupancy(&self) -> (u32, u32, usize) {
        (self.general, self.reserved, self.table.len())
    }
}

fn refill(entry: &mut Entry, now: Instant, rate: u64, bucket_max: u64) {
    let elapsed_ms = now.saturating_duration_since(entry.refilled).as_millis();
    let elapsed_ms = u64::try_from(elapsed_ms).unwrap_or(u64::MAX);
    entry.tokens = entry
        .tokens
        .saturating_add(elapsed_ms.saturating_mul(rate))
        .min(bucket_max);
    entry.refilled = now;
}

/// A connection's slot; given back when dropped (however the connection's task ends).
#[derive(Debug)]
pub struct Ticket {
    sources: Arc<Mutex<Sources>>,
    pub source: Source,
    pub lane: Lane,
    /// Still counted for its source (not authenticated).
    counted: AtomicBool,
}

impl Ticket {
    pub fn admit(
        sources: &Arc<Mutex<Sources>>,
        source: Source,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let lane = lock(sources).admit(source, now)?;
        Ok(Ticket {
            sources: sources.clone(),
            source,
            lane,
            counted: AtomicBool::new(true),
        })
    }

    /// See [`Sources::authenticated`]; once.
    pub fn authenticated(&self) {
        if self.counted.swap(false, Ordering::Relaxed) {
            lock(&self.sources).authenticated(self.source, Instant::now());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let counted = *self.counted.get_mut();
        lock(&self.sources).release(self.source, self.lane, counted, Instant::now());
    }
}

/// The table, even if a thread panicked holding it (its counts stay consistent: every
/// update is done before anything that could panic).
pub fn lock(sources: &Mutex<Sources>) -> std::sync::MutexGuard<'_, Sources> {
    sources
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            connections_max: 3,
            connections_reserved: 1,
            connections_per_source_max: 2,
            open_requests_per_source_per_min: 60,
            sources_max: 4,
            ..HttpLimits::default()
        }
    }

    fn ip(last: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn lanes_and_the_per_source_cap() {
        let now = Instant::now();
        let mut s = Sources::new(limits());
        assert_eq!(s.admit(ip(1), now), Ok(Lane::General));
        assert_eq!(s.admit(ip(1), now), Ok(Lane::General));
        assert_eq!(s.admit(ip(1), now), Err(Refusal::PerSource));
        assert_eq!(s.admit(ip(2), now), Ok(Lane::General));
        assert_eq!(s.admit(ip(3), now), Ok(Lane::Reserved));
        assert_eq!(s.admit(ip(4), now), Err(Refusal::Full));
        s.release(ip(1), Lane::General, true, now);
        assert_eq!(s.admit(ip(4), now), Ok(Lane::General));
        assert_eq!(s.occupancy(), (3, 1, 4));
        for (source, lane) in [
            (ip(1), Lane::General),
            (ip(2), Lane::General),
            (ip(3), Lane::Reserved),
            (ip(4), Lane::General),
        ] {
            s.release(source, lane, true, now);
        }
        assert_eq!(s.occupancy(), (0, 0, 0));
    }

    #[test]
    fn authenticated_connections_leave_their_source_count() {
        let now = Instant::now();
        let mut s = Sources::new(limits());
        s.admit(ip(1), now).unwrap();
        s.admit(ip(1), now).unwrap();
        assert_eq!(s.admit(ip(1), now), Err(Refusal::PerSource));
        s.authenticated(ip(1), now);
        assert_eq!(s.admit(ip(1), now), Ok(Lane::General));
        s.release(ip(1), Lane::General, false, now);
        s.release(ip(1), Lane::General, true, now);
        s.release(ip(1), Lane::General, true, now);
        assert_eq!(s.occupancy(), (0, 0, 0));
    }

    #[test]
    fn the_open_route_budget_refills_with_time() {
        let now = Instant::now();
        let mut s = Sources::new(limits());
        s.admit(ip(1), now).unwrap();
        for _ in 0..60 {
            s.take_open_request(ip(1), now).unwrap();
        }
        assert_eq!(
            s.take_open_request(ip(1), now),
            Err(Duration::from_millis(1000))
        );
        // Another source has its own budget.
        s.admit(ip(2), now).unwrap();
        s.take_open_request(ip(2), now).unwrap();
        let later = now + Duration::from_millis(1000);
        s.take_open_request(ip(1), later).unwrap();
        assert!(s.take_open_request(ip(1), later).is_err());
        // A source that left with an empty bucket is remembered, so reconnecting does not
        // refill it.
        s.release(ip(1), Lane::General, true, later);
        s.admit(ip(1), later).unwrap();
        assert!(s.take_open_request(ip(1), later).is_err());
    }

    #[test]
    fn a_full_table_forgets_sources_without_connections() {
        let now = Instant::now();
        let mut s = Sources::new(limits());
        for last in 1..=4 {
            s.admit(ip(last), now).unwrap();
            s.take_open_request(ip(last), now).unwrap();
            s.release(ip(last), Lane::General, true, now);
        }
        assert_eq!(s.occupancy().2, 4);
        assert_eq!(s.admit(ip(5), now), Ok(Lane::General));
        assert_eq!(s.occupancy().2, 1);
    }

    #[test]
    fn ipv6_sources_are_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped), ip(1));
    }
}
