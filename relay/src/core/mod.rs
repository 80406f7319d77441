//! The relay's sans-IO core: state machines that take events (with the time as an argument)
//! and return actions. No sockets, files, threads or clocks in here: `relay::io` drives them,
//! and the simulation tests drive them on a fake clock.

pub mod dedup;
pub mod log;
pub mod queue;
pub mod session;
pub mod shard;
pub mod wal;
pub mod wal_fuzzing;

use codec::{DeviceId, UserAddress};

/// Identifies a connection across cores: the core that owns it and its slot there. The
/// generation tells a reused slot from the connection that held it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub core: u16,
    pub slot: u32,
    pub generation: u32,
}

/// The shard that owns a user: a fixed hash of its address, so every core computes the same
/// answer without asking anyone.
// Truncating casts fold the id into the hash on purpose; the result is below `shards`.
#[allow(clippy::cast_possible_truncation)]
pub fn shard_of(user: &UserAddress, shards: u16) -> u16 {
    debug_assert!(shards > 0);
    let folded =
        (user.user.0 as u64) ^ ((user.user.0 >> 64) as u64) ^ (u64::from(user.network.0) << 32);
    let mixed = folded.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % u64::from(shards.max(1))) as u16
}

/// A set of device ids held inline (no allocation on the hot path), at most the protocol's
/// `RECIPIENT_DEVICES_MAX`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DeviceSet {
    ids: [DeviceId; codec::limits::RECIPIENT_DEVICES_MAX],
    len: u8,
}

impl DeviceSet {
    pub const fn new() -> DeviceSet {
        DeviceSet {
            ids: [DeviceId(0); codec::limits::RECIPIENT_DEVICES_MAX],
            len: 0,
        }
    }

    /// Adds `id` unless present; `false` when the set is full.
    pub fn insert(&mut self, id: DeviceId) -> bool {
        if self.contains(id) {
            return true;
        }
        let Some(slot) = self.ids.get_mut(usize::from(self.len)) else {
            return false;
        };
        *slot = id;
        self.len += 1;
        true
    }

    pub fn contains(&self, id: DeviceId) -> bool {
        self.as_slice().contains(&id)
    }

    pub fn as_slice(&self) -> &[DeviceId] {
        &self.ids[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Same members, in any order.
    pub fn same_members(&self, other: &[DeviceId]) -> bool {
        let mut other_set = DeviceSet::new();
        for &id in other {
            if !other_set.insert(id) {
                return false;
            }
        }
        other_set.len() == self.len() && self.as_slice().iter().all(|&id| other_set.contains(id))
    }
}

impl Default for DeviceSet {
    fn default() -> Self {
        DeviceSet::new()
    }
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}
