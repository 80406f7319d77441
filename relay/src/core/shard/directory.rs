//! The directory: which devices a user has, which connection each device's deliveries go to
//! (its own session, or one server session of its network), device sets declared by servers
//! and by the control plane, and the notices that go to whoever is connected.

use codec::{DeviceAddress, DeviceId, ErrorCode, NetworkId, UserAddress};

use super::Shard;
use super::interface::{ControlChange, Refusal, ShardOutput};
use crate::core::{ConnId, DeviceSet};

impl Shard {
    pub(super) fn attach_server(&mut self, network: NetworkId, conn: ConnId) {
        let conns = self.dir.servers.entry(network).or_default();
        if !conns.contains(&conn) {
            conns.push(conn);
        }
        self.rebind_network(network);
    }

    pub(super) fn detach_server(&mut self, network: NetworkId, conn: ConnId) {
        if let Some(conns) = self.dir.servers.get_mut(&network) {
            conns.retain(|c| *c != conn);
        }
        self.rebind_network(network);
    }

    pub(super) fn attach_device(&mut self, now_ms: u64, device: DeviceAddress, conn: ConnId) {
        let user = device.user_address();
        let limit = usize::from(self.limits.devices_per_user_max);
        let old = self.dir.users.get(&user).map(|s| s.devices.len());
        let added = !self
            .dir
            .users
            .get(&user)
            .is_some_and(|s| s.devices.iter().any(|d| d.id == device.device));
        let charged = if !added {
            Ok(())
        } else if old.unwrap_or(0) >= limit {
            Err(ErrorCode::DeviceLimit)
        } else {
            // A device session adding its own device changes the set like a `DeviceList`.
            let new = old.unwrap_or(0) + 1;
            self.charge_device_set(now_ms, user, old, new)
                .map_err(|refusal| refusal.code)
        };
        if let Err(code) = charged {
            self.out.push_back(ShardOutput::Close { conn, code });
            return;
        }
        let state = self.dir.users.entry(user).or_default();
        state.device_or_new(device.device).direct = Some(conn);
        if added {
            self.log_device_set(user);
        }
        self.rebind_user(user);
    }

    pub(super) fn detach_device(&mut self, device: DeviceAddress, conn: ConnId) {
        let Some(dev) = self.dir.device_mut(&device) else {
            return;
        };
        if dev.direct == Some(conn) {
            dev.direct = None;
            self.rebind_user(device.user_address());
        }
    }

    fn rebind_network(&mut self, network: NetworkId) {
        let mut users: Vec<UserAddress> = self
            .dir
            .users
            .keys()
            .filter(|u| u.network == network)
            .copied()
            .collect();
        // In address order, not the hash map's: the same inputs give the same outputs.
        users.sort_unstable();
        for user in users {
            self.rebind_user(user);
        }
    }

    /// Points each of the user's devices at its connection now; a device whose binding
    /// changed gets its unacknowledged frames again from the front.
    fn rebind_user(&mut self, user: UserAddress) {
        let servers = self
            .dir
            .servers
            .get(&user.network)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let Some(state) = self.dir.users.get_mut(&user) else {
            return;
        };
        for dev in &mut state.devices {
            let address = user.device(dev.id);
            let target = dev.direct.or_else(|| server_for(servers, &address));
            if target != dev.bound {
                dev.bound = target;
                dev.queue.rewind();
                Shard::pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
                let has_frames = !dev.queue.is_empty();
                note_offline(&mut self.dir.offline, address, target.is_some(), has_frames);
            }
        }
        self.spill();
    }

    /// Replaces the user's device set: devices removed lose their queues (recorded by the
    /// device-set record), new ones start empty.
    // A `Refusal` carries the current device set inline (no allocation); this path is rare.
    #[allow(clippy::result_large_err)]
    pub(super) fn set_devices(
        &mut self,
        now_ms: u64,
        user: UserAddress,
        devices: &[DeviceId],
    ) -> Result<(), Refusal> {
        let mut wanted = DeviceSet::new();
        for &id in devices {
            if !wanted.insert(id) {
                return Err(Refusal::new(ErrorCode::DeviceLimit));
            }
        }
        if wanted.len() > usize::from(self.limits.devices_per_user_max) {
            return Err(Refusal::new(ErrorCode::DeviceLimit));
        }
        if self.log_failed() {
            return Err(Refusal::storage_unavailable());
        }
        let old = self.dir.users.get(&user).map(|s| s.devices.len());
        self.charge_device_set(now_ms, user, old, wanted.len())?;
        let removed = self
            .dir
            .users
            .entry(user)
            .or_default()
            .replace_devices(&wanted);
        // The device-set record is what deletes the removed devices' frames on replay: it
        // refers to every segment they were recorded in.
        let record_segment = self.log_device_set(user);
        for item in &removed {
            self.stats.deleted += 1;
            Shard::left_queue(&mut self.stats, self.log.as_mut(), item, record_segment);
        }
        if self
            .dir
            .users
            .get(&user)
            .is_some_and(|s| s.devices.is_empty())
        {
            self.dir.users.remove(&user);
            return Ok(());
        }
        self.rebind_user(user);
        Ok(())
    }

    /// Carries out a control-plane change.
    // See `set_devices`.
    #[allow(clippy::result_large_err)]
    pub(super) fn apply_control(
        &mut self,
        now_ms: u64,
        change: ControlChange,
    ) -> Result<(), Refusal> {
        match change {
            ControlChange::SetDevices { user, devices } => self.set_devices(now_ms, user, &devices),
            ControlChange::PurgeInterop { user } => {
                if self.log_failed() {
                    return Err(Refusal::storage_unavailable());
                }
                self.purge_interop(user);
                Ok(())
            }
            ControlChange::NoticeUser { user, frame } => {
                let mut conns: Vec<ConnId> = self
                    .dir
                    .users
                    .get(&user)
                    .map(|s| s.devices.iter().filter_map(|d| d.bound).collect())
                    .unwrap_or_default();
                if let Some(servers) = self.dir.servers.get(&user.network) {
                    conns.extend(servers.iter().copied());
                }
                self.send_to(conns, &frame, None);
                Ok(())
            }
            ControlChange::NoticeNetwork {
                network,
                frame,
                close,
            } => {
                let conns = self.dir.servers.get(&network).cloned().unwrap_or_default();
                self.send_to(conns, &frame, close.then_some(ErrorCode::PartnerSuspended));
                Ok(())
            }
            ControlChange::CloseNetworkDevices { network, frame } => {
                let conns: Vec<ConnId> = self
                    .dir
                    .users
                    .iter()
                    .filter(|(user, _)| user.network == network)
                    .flat_map(|(_, state)| state.devices.iter().filter_map(|d| d.direct))
                    .collect();
                self.send_to(conns, &frame, Some(ErrorCode::PartnerSuspended));
                Ok(())
            }
        }
    }

    /// Writes `frame` once to each connection; with `close`, ends each after it.
    fn send_to(&mut self, mut conns: Vec<ConnId>, frame: &bytes::Bytes, close: Option<ErrorCode>) {
        conns.sort_unstable();
        conns.dedup();
        for &conn in &conns {
            self.out.push_back(ShardOutput::Send {
                conn,
                frame: frame.clone(),
            });
        }
        if let Some(code) = close {
            for conn in conns {
                self.out.push_back(ShardOutput::Close { conn, code });
            }
        }
    }
}

/// Notes whether a device is offline with frames queued (a spill candidate).
fn note_offline(
    offline: &mut std::collections::HashSet<DeviceAddress>,
    device: DeviceAddress,
    bound: bool,
    has_frames: bool,
) {
    if !bound && has_frames {
        offline.insert(device);
    } else {
        offline.remove(&device);
    }
}

/// The server session a device of a proxied network is delivered through: fixed by a hash of
/// the device while the set of server sessions stays the same, so its order holds.
// Truncating casts fold the id into the hash on purpose.
#[allow(clippy::cast_possible_truncation)]
fn server_for(servers: &[ConnId], device: &DeviceAddress) -> Option<ConnId> {
    if servers.is_empty() {
        return None;
    }
    let h = (device.user.0 as u64 ^ u64::from(device.device.0)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    servers.get((h >> 32) as usize % servers.len()).copied()
}
