//! Caps per network on what its users take in the shards: users, devices, and device-set
//! changes per second, each network's own (its partner record) or the configured defaults
//! (`limits.network_*`). The shards charge it when a user or a device is added or a device
//! set changes, and credit it when they go; the control plane sets the caps; `/metrics`
//! reads the figures.
//!
//! One shared counter per network rather than a share of the cap per shard. A share
//! (`cap / shards`) needs nothing shared, but users hash unevenly and an attacker can pick ids
//! that land on one shard, so a network would be refused well before its cap, or, for a
//! small cap, almost at once. The shared counter is exact, and its cost is off the message
//! path: one atomic read-modify-write (and a lookup in this table) per user or device added
//! or removed and per device-set change, never per envelope. Recovery rebuilds the counters
//! from what each shard replayed (`Shard::share_caps`) before any core accepts a
//! connection, so a restart keeps every admitted user and lets none past the cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use codec::{ErrorCode, NetworkId};
use dashmap::DashMap;

/// A network's caps; `None` takes the configured default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub users_max: Option<u64>,
    pub devices_max: Option<u64>,
    pub device_set_changes_per_s: Option<u32>,
}

/// The caps every network has unless its record says otherwise (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapDefaults {
    pub users_max: u64,
    pub devices_max: u64,
    pub device_set_changes_per_s: u32,
}

impl CapDefaults {
    pub fn of(limits: &crate::limits::RelayLimits) -> CapDefaults {
        CapDefaults {
            users_max: limits.network_users_max,
            devices_max: limits.network_devices_max,
            device_set_changes_per_s: limits.network_device_set_changes_per_s,
        }
    }
}

/// One network's figures, counters and caps. The caps are atomics so the control plane can
/// change them in place: the shards keep no copy.
#[derive(Debug, Default)]
pub struct NetworkUsage {
    users: AtomicU64,
    devices: AtomicU64,
    /// 0: the default.
    users_max: AtomicU64,
    devices_max: AtomicU64,
    changes_per_s: AtomicU64,
    /// GCRA: the theoretical arrival time of the next device-set change, microseconds.
    tat_us: AtomicU64,
    refused_users: AtomicU64,
    refused_devices: AtomicU64,
    refused_changes: AtomicU64,
}

/// What `/metrics` shows of one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageFigures {
    pub network: NetworkId,
    pub users: u64,
    pub devices: u64,
    pub users_max: u64,
    pub devices_max: u64,
    pub device_set_changes_per_s: u64,
    pub refused_users: u64,
    pub refused_devices: u64,
    pub refused_changes: u64,
}

/// How much of its rate a network may spend at once: one second's worth.
const BURST_US: u64 = 1_000_000;

/// Every network's usage and caps. Shared by the cores and the control plane.
#[derive(Debug)]
pub struct NetworkCaps {
    users_max: AtomicU64,
    devices_max: AtomicU64,
    changes_per_s: AtomicU64,
    networks: DashMap<NetworkId, Arc<NetworkUsage>, foldhash::fast::RandomState>,
    /// New users refused because their shard held `limits.shard_users_max` users.
    refused_shard_full: AtomicU64,
}

impl NetworkCaps {
    pub fn new(defaults: CapDefaults) -> NetworkCaps {
        let caps = NetworkCaps {
            users_max: AtomicU64::new(0),
            devices_max: AtomicU64::new(0),
            changes_per_s: AtomicU64::new(0),
            networks: DashMap::default(),
            refused_shard_full: AtomicU64::new(0),
        };
        caps.set_defaults(defaults);
        caps
    }

    /// The configured defaults (set at start, before the cores run).
    pub fn set_defaults(&self, defaults: CapDefaults) {
        self.users_max.store(defaults.users_max, Ordering::Relaxed);
        self.devices_max
            .store(defaults.devices_max, Ordering::Relaxed);
        self.changes_per_s.store(
            u64::from(defaults.device_set_changes_per_s),
            Ordering::Relaxed,
        );
    }

    /// Sets a network's own caps (its partner record); `None` fields take the defaults.
    pub fn set(&self, network: NetworkId, caps: Caps) {
        let usage = self.usage(network);
        usage
            .users_max
            .store(caps.users_max.unwrap_or(0), Ordering::Relaxed);
        usage
            .devices_max
            .store(caps.devices_max.unwrap_or(0), Ordering::Relaxed);
        usage.changes_per_s.store(
            caps.device_set_changes_per_s.map_or(0, u64::from),
            Ordering::Relaxed,
        );
    }

    /// The network's entry, made on first use. Entries are never replaced, so a caller may
    /// keep the `Arc`.
    pub fn usage(&self, network: NetworkId) -> Arc<NetworkUsage> {
        if let Some(usage) = self.networks.get(&network) {
            return usage.clone();
        }
        self.networks.entry(network).or_default().clone()
    }

    fn effective(&self, own: &AtomicU64, default: &AtomicU64) -> u64 {
        match own.load(Ordering::Relaxed) {
            0 => default.load(Ordering::Relaxed),
            own => own,
        }
    }

    /// Takes one device-set change of `network` at `now_ms`; `Err` is the wait in
    /// milliseconds (`DEVICE_SET_RATE_LIMITED`).
    pub fn take_change(&self, network: NetworkId, now_ms: u64) -> Result<(), u32> {
        let usage = self.usage(network);
        let per_s = self
            .effective(&usage.changes_per_s, &self.changes_per_s)
            .max(1);
        let interval_us = (1_000_000 / per_s).max(1);
        let now = now_ms.saturating_mul(1000);
        let mut tat = usage.tat_us.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + interval_us;
            if next - now > BURST_US + interval_us {
                usage.refused_changes.fetch_add(1, Ordering::Relaxed);
                // It fits once `now` reaches `tat - BURST_US`.
                let wait_ms = tat.saturating_sub(now + BURST_US).div_ceil(1000).max(1);
                return Err(u32::try_from(wait_ms).unwrap_or(u32::MAX));
            }
            match usage.tat_us.compare_exchange_weak(
                tat,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    /// Admits `users` more users and `devices` more devices of `network`, both or neither:
    /// `NETWORK_USER_LIMIT` or `NETWORK_DEVICE_LIMIT` past a cap.
    pub fn admit(&self, network: NetworkId, users: u64, devices: u64) -> Result<(), ErrorCode> {
        let usage = self.usage(network);
        let users_max = self.effective(&usage.users_max, &self.users_max);
        let devices_max = self.effective(&usage.devices_max, &self.devices_max);
        if !add_within(&usage.users, users, users_max) {
            usage.refused_users.fetch_add(1, Ordering::Relaxed);
            return Err(ErrorCode::NetworkUserLimit);
        }
        if !add_within(&usage.devices, devices, devices_max) {
            // Give the users back: the change is refused as a whole.
            sub_saturating(&usage.users, users);
            usage.refused_devices.fetch_add(1, Ordering::Relaxed);
            return Err(ErrorCode::NetworkDeviceLimit);
        }
        Ok(())
    }

    /// Counts users and devices that are there already (recovery), whatever the caps say:
    /// nothing admitted before a restart is refused after it.
    pub fn count_existing(&self, network: NetworkId, users: u64, devices: u64) {
        let usage = self.usage(network);
        usage.users.fetch_add(users, Ordering::Relaxed);
        usage.devices.fetch_add(devices, Ordering::Relaxed);
    }

    /// `users` users and `devices` devices of `network` went.
    pub fn release(&self, network: NetworkId, users: u64, devices: u64) {
        let usage = self.usage(network);
        sub_saturating(&usage.users, users);
        sub_saturating(&usage.devices, devices);
    }

    /// A new user was refused because its shard is full.
    pub fn note_shard_full(&self) {
        self.refused_shard_full.fetch_add(1, Ordering::Relaxed);
    }

    /// New users refused because their shard was full.
    pub fn refused_shard_full(&self) -> u64 {
        self.refused_shard_full.load(Ordering::Relaxed)
    }

    /// Every network's figures, in network order (for `/metrics`; networks are a registered
    /// few).
    pub fn figures(&self) -> Vec<UsageFigures> {
        let mut out: Vec<UsageFigures> = self
            .networks
            .iter()
            .map(|entry| {
                let usage = entry.value();
                UsageFigures {
                    network: *entry.key(),
                    users: usage.users.load(Ordering::Relaxed),
                    devices: usage.devices.load(Ordering::Relaxed),
                    users_max: self.effective(&usage.users_max, &self.users_max),
                    devices_max: self.effective(&usage.devices_max, &self.devices_max),
                    device_set_changes_per_s: self
                        .effective(&usage.changes_per_s, &self.changes_per_s),
                    refused_users: usage.refused_users.load(Ordering::Relaxed),
                    refused_devices: usage.refused_devices.load(Ordering::Relaxed),
                    refused_changes: usage.refused_changes.load(Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_unstable_by_key(|f| f.network);
        out
    }
}

/// Adds `amount` to `counter` if the sum stays within `max`.
fn add_within(counter: &AtomicU64, amount: u64, max: u64) -> bool {
    if amount == 0 {
        return true;
    }
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
            current.checked_add(amount).filter(|sum| *sum <= max)
        })
        .is_ok()
}

fn sub_saturating(counter: &AtomicU64, amount: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
        Some(current.saturating_sub(amount))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: NetworkId = NetworkId(2);

    fn caps() -> NetworkCaps {
        NetworkCaps::new(CapDefaults {
            users_max: 3,
            devices_max: 4,
            device_set_changes_per_s: 2,
        })
    }

    #[test]
    fn users_and_devices_are_admitted_up_to_the_caps_both_or_neither() {
        let caps = caps();
        assert_eq!(caps.admit(NET, 1, 2), Ok(()));
        assert_eq!(caps.admit(NET, 1, 3), Err(ErrorCode::NetworkDeviceLimit));
        assert_eq!(caps.admit(NET, 1, 2), Ok(()));
        assert_eq!(caps.admit(NET, 1, 0), Ok(()));
        assert_eq!(caps.admit(NET, 1, 0), Err(ErrorCode::NetworkUserLimit));
        // Another network has caps of its own.
        assert_eq!(caps.admit(NetworkId(1), 3, 4), Ok(()));
        caps.release(NET, 1, 2);
        assert_eq!(caps.admit(NET, 1, 2), Ok(()));
        let figures = caps.figures();
        assert_eq!((figures[1].users, figures[1].devices), (3, 4));
        assert_eq!(
            (figures[1].refused_users, figures[1].refused_devices),
            (1, 1)
        );
    }

    #[test]
    fn a_networks_own_caps_replace_the_defaults_and_existing_users_always_count() {
        let caps = caps();
        caps.count_existing(NET, 5, 5);
        assert_eq!(caps.admit(NET, 1, 0), Err(ErrorCode::NetworkUserLimit));
        caps.set(
            NET,
            Caps {
                users_max: Some(10),
                devices_max: Some(10),
                device_set_changes_per_s: None,
            },
        );
        assert_eq!(caps.admit(NET, 1, 1), Ok(()));
        assert_eq!(caps.figures()[0].users_max, 10);
    }

    #[test]
    fn device_set_changes_pass_at_their_rate_with_a_second_of_burst() {
        let caps = caps();
        let passed = (0..10).filter(|_| caps.take_change(NET, 0).is_ok()).count();
        assert_eq!(passed, 3, "a burst of one second's worth, and one more");
        let Err(wait_ms) = caps.take_change(NET, 0) else {
            panic!("over the rate");
        };
        assert_eq!(wait_ms, 500);
        assert!(caps.take_change(NET, 500).is_ok());
        assert_eq!(caps.figures()[0].refused_changes, 8);
    }
}
