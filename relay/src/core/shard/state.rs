//! What a shard knows of its users: each user's devices with their queues and bindings, and
//! the server sessions of each network. Plain data and lookups; the jobs that change it live
//! in the sibling modules.

use std::collections::{HashMap, HashSet};

use codec::{DeviceAddress, DeviceId, NetworkId, UserAddress};

use crate::core::queue::{DeviceQueue, Queued};
use crate::core::{ConnId, DeviceSet};

#[derive(Debug)]
pub struct DeviceState {
    pub id: DeviceId,
    pub queue: DeviceQueue,
    pub next_seq: u64,
    /// The device's own session, when it has one.
    pub direct: Option<ConnId>,
    /// Where its deliveries go now.
    pub bound: Option<ConnId>,
}

impl DeviceState {
    pub fn new(id: DeviceId) -> DeviceState {
        DeviceState {
            id,
            queue: DeviceQueue::default(),
            next_seq: 1,
            direct: None,
            bound: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct UserState {
    pub devices: Vec<DeviceState>,
    /// The log segment with this user's latest device-set record.
    pub device_set_segment: Option<u64>,
}

impl UserState {
    pub fn device_set(&self) -> DeviceSet {
        let mut set = DeviceSet::new();
        for device in &self.devices {
            set.insert(device.id);
        }
        set
    }

    pub fn device_mut(&mut self, id: DeviceId) -> Option<&mut DeviceState> {
        self.devices.iter_mut().find(|d| d.id == id)
    }

    /// Makes the user's devices exactly `wanted`: new ones start empty; the frames of those
    /// removed are returned, for the bookkeeping of their leaving.
    pub fn replace_devices(&mut self, wanted: &DeviceSet) -> Vec<Queued> {
        let mut removed = Vec::new();
        self.devices.retain_mut(|dev| {
            let keep = wanted.contains(dev.id);
            if !keep {
                removed.extend(dev.queue.drain());
            }
            keep
        });
        for &id in wanted.as_slice() {
            self.device_or_new(id);
        }
        removed
    }

    /// The device `id`, created (with an empty queue) if the user has none by that id.
    pub fn device_or_new(&mut self, id: DeviceId) -> &mut DeviceState {
        let index = match self.devices.iter().position(|d| d.id == id) {
            Some(index) => index,
            None => {
                self.devices.push(DeviceState::new(id));
                self.devices.len() - 1
            }
        };
        &mut self.devices[index]
    }
}

/// The users of one shard and the connections their deliveries can go to.
#[derive(Debug, Default)]
pub struct Directory {
    pub users: HashMap<UserAddress, UserState>,
    /// Every server session of each network (each shard knows them all).
    pub servers: HashMap<NetworkId, Vec<ConnId>>,
    /// Devices without a connection that may still hold frames in memory: where spilling
    /// looks first.
    pub offline: HashSet<DeviceAddress>,
}

impl Directory {
    pub fn device(&self, device: &DeviceAddress) -> Option<&DeviceState> {
        self.users
            .get(&device.user_address())?
            .devices
            .iter()
            .find(|d| d.id == device.device)
    }

    pub fn device_mut(&mut self, device: &DeviceAddress) -> Option<&mut DeviceState> {
        self.users
            .get_mut(&device.user_address())?
            .device_mut(device.device)
    }

    /// Every queue of the shard, with its device's address, in address order (not the hash
    /// map's), so that what is done to them in turn (log rewrites, loads) depends on the
    /// shard's inputs alone. Used off the message path: compaction and recovery.
    pub fn queues_mut(&mut self) -> impl Iterator<Item = (DeviceAddress, &mut DeviceQueue)> {
        let mut users: Vec<(&UserAddress, &mut UserState)> = self.users.iter_mut().collect();
        users.sort_unstable_by_key(|(user, _)| **user);
        users.into_iter().flat_map(|(user, state)| {
            state
                .devices
                .iter_mut()
                .map(move |d| (user.device(d.id), &mut d.queue))
        })
    }

    /// Every queue of the shard, with its device's address.
    pub fn queues(&self) -> impl Iterator<Item = (DeviceAddress, &DeviceQueue)> {
        self.users.iter().flat_map(|(user, state)| {
            state
                .devices
                .iter()
                .map(move |d| (user.device(d.id), &d.queue))
        })
    }
}
