//! One shard: the users hashed to it, their devices, each device's queue and where it is
//! connected. A sans-IO state machine: [`Shard::handle`] and [`Shard::handle_timeout`] take
//! inputs with the time; [`Shard::poll_output`] hands out deliveries and acks for connections.
//!
//! Delivery model: each device is *bound* to at most one connection (its own device session,
//! or else one server session of its network, chosen by hash so its order holds). The first
//! `device_deliveries_in_flight_max` frames of its queue are written to that connection; an
//! `Ack` from the device releases a frame and lets the next one go. When the binding changes,
//! unacknowledged frames are written again from the front, so nothing acknowledged by the
//! relay is lost and order per device is kept.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use bytes::Bytes;
use codec::{DeviceAddress, DeviceId, ErrorCode, MessageId, NetworkId, UserAddress};

use super::dedup::Dedup;
use super::queue::{DeviceQueue, Queued};
use super::{ConnId, DeviceSet};
use crate::limits::RelayLimits;

/// An envelope or receipt on its way to the shard of its recipient.
#[derive(Debug, Clone)]
pub struct Routed {
    pub sender: DeviceAddress,
    pub recipient: UserAddress,
    /// `Some` for an explicit device list, which must equal the current set.
    pub listed: Option<DeviceSet>,
    pub id: MessageId,
    /// Delivered to bound devices only, never queued.
    pub ephemeral: bool,
    pub ttl_seconds: u32,
    /// The whole frame, as received.
    pub frame: Bytes,
    /// Where the relay's `Ack` goes.
    pub reply_to: ConnId,
}

/// Work for a shard.
#[derive(Debug, Clone)]
pub enum ShardInput {
    Envelope(Routed),
    Receipt(Routed),
    Signal {
        recipient: UserAddress,
        frame: Bytes,
    },
    DeviceAck {
        device: DeviceAddress,
        id: MessageId,
    },
    DeviceList {
        request_id: MessageId,
        user: UserAddress,
        devices: Vec<DeviceId>,
        reply_to: ConnId,
    },
    AttachDevice {
        device: DeviceAddress,
        conn: ConnId,
    },
    DetachDevice {
        device: DeviceAddress,
        conn: ConnId,
    },
    AttachServer {
        network: NetworkId,
        conn: ConnId,
    },
    DetachServer {
        network: NetworkId,
        conn: ConnId,
    },
}

/// Why the relay refused an envelope, receipt or device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub retry_after_ms: u32,
    /// Filled for `DEVICE_LIST_STALE`.
    pub current_devices: DeviceSet,
}

impl Refusal {
    fn new(code: ErrorCode) -> Refusal {
        Refusal {
            code,
            retry_after_ms: 0,
            current_devices: DeviceSet::new(),
        }
    }
}

/// What the shard asks the IO shell to do, each for one connection.
#[derive(Debug, Clone)]
pub enum ShardOutput {
    /// Write a `Delivery` of `frame` for `device`.
    Deliver {
        conn: ConnId,
        device: DeviceAddress,
        seq: u64,
        ephemeral: bool,
        frame: Bytes,
    },
    /// Write the relay's `Ack` for `id` (sent by `address`).
    Ack {
        conn: ConnId,
        id: MessageId,
        address: DeviceAddress,
        result: Result<(), Refusal>,
    },
    /// Close the connection with an error (e.g. a device past the user's device limit).
    Close { conn: ConnId, code: ErrorCode },
}

/// Counters a shard keeps for `/metrics` and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub delivered: u64,
    pub released: u64,
    pub expired: u64,
    pub deleted: u64,
    pub signals: u64,
    pub queued_frames: u64,
    pub queued_bytes: u64,
}

#[derive(Debug)]
struct DeviceState<Q> {
    id: DeviceId,
    queue: Q,
    next_seq: u64,
    /// The device's own session, when it has one.
    direct: Option<ConnId>,
    /// Where its deliveries go now.
    bound: Option<ConnId>,
    /// Queue entries written on the current binding and not yet acknowledged.
    cursor: usize,
}

#[derive(Debug)]
struct UserState<Q> {
    devices: Vec<DeviceState<Q>>,
}

#[derive(Debug)]
pub struct Shard<Q> {
    limits: RelayLimits,
    users: HashMap<UserAddress, UserState<Q>>,
    servers: HashMap<NetworkId, Vec<ConnId>>,
    dedup: Dedup,
    expiry: BinaryHeap<Reverse<(u64, UserAddress, DeviceId, u64)>>,
    out: VecDeque<ShardOutput>,
    stats: ShardStats,
}

impl<Q: DeviceQueue> Shard<Q> {
    pub fn new(limits: RelayLimits) -> Shard<Q> {
        let window_ms = u64::from(limits.dedup_window_seconds) * 1000;
        Shard {
            limits,
            users: HashMap::new(),
            servers: HashMap::new(),
            dedup: Dedup::new(window_ms, limits.dedup_entries_max.max(1) as usize),
            expiry: BinaryHeap::new(),
            out: VecDeque::new(),
            stats: ShardStats::default(),
        }
    }

    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// The device set of a user, as the shard knows it.
    pub fn devices_of(&self, user: &UserAddress) -> DeviceSet {
        let mut set = DeviceSet::new();
        if let Some(state) = self.users.get(user) {
            for device in &state.devices {
                set.insert(device.id);
            }
        }
        set
    }

    /// Frames queued for a device (delivered or not, until acknowledged).
    pub fn queue_len(&self, device: &DeviceAddress) -> usize {
        self.device(device).map_or(0, |d| d.queue.len())
    }

    /// Entries in the expiry heap (live and stale), for the bound checks of the tests.
    pub fn expiry_entries(&self) -> usize {
        self.expiry.len()
    }

    pub fn poll_output(&mut self) -> Option<ShardOutput> {
        self.out.pop_front()
    }

    /// The next time [`Shard::handle_timeout`] has work (a TTL running out).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.expiry.peek().map(|Reverse((at, ..))| *at)
    }

    pub fn handle(&mut self, now_ms: u64, input: ShardInput) {
        match input {
            ShardInput::Envelope(routed) | ShardInput::Receipt(routed) => {
                self.enqueue(now_ms, routed)
            }
            ShardInput::Signal { recipient, frame } => self.signal(recipient, frame),
            ShardInput::DeviceAck { device, id } => self.release(device, id),
            ShardInput::DeviceList {
                request_id,
                user,
                devices,
                reply_to,
            } => {
                let result = self.set_devices(user, &devices);
                let address = user.device(DeviceId(0));
                self.out.push_back(ShardOutput::Ack {
                    conn: reply_to,
                    id: request_id,
                    address,
                    result,
                });
            }
            ShardInput::AttachDevice { device, conn } => self.attach_device(device, conn),
            ShardInput::DetachDevice { device, conn } => self.detach_device(device, conn),
            ShardInput::AttachServer { network, conn } => {
                let conns = self.servers.entry(network).or_default();
                if !conns.contains(&conn) {
                    conns.push(conn);
                }
                self.rebind_network(network);
            }
            ShardInput::DetachServer { network, conn } => {
                if let Some(conns) = self.servers.get_mut(&network) {
                    conns.retain(|c| *c != conn);
                }
                self.rebind_network(network);
            }
        }
    }

    /// The expiry heap keeps an entry per queued frame and learns of releases lazily; when
    /// stale entries outnumber live ones it drops them, so its size stays within twice the
    /// frames actually queued (plus a constant), however long the TTLs.
    fn compact_expiry(&mut self) {
        if self.expiry.len() as u64 <= 2 * self.stats.queued_frames + EXPIRY_SLACK {
            return;
        }
        let users = &self.users;
        self.expiry.retain(|Reverse((_, user, device, seq))| {
            users
                .get(user)
                .and_then(|s| s.devices.iter().find(|d| d.id == *device))
                .is_some_and(|d| d.queue.contains_seq(*seq))
        });
    }

    /// Removes every queued frame whose TTL ran out by `now_ms`.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.dedup.forget_expired(now_ms);
        while let Some(&Reverse((at, user, device, seq))) = self.expiry.peek() {
            if at > now_ms {
                break;
            }
            self.expiry.pop();
            let Some(state) = self.users.get_mut(&user) else {
                continue;
            };
            let Some(dev) = state.devices.iter_mut().find(|d| d.id == device) else {
                continue;
            };
            if let Some((index, item)) = dev.queue.remove_seq(seq) {
                if index < dev.cursor {
                    dev.cursor -= 1;
                }
                self.stats.expired += 1;
                self.stats.queued_frames -= 1;
                self.stats.queued_bytes -= item.frame.len() as u64;
                let address = user.device(device);
                pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
            }
        }
    }

    fn refuse(&mut self, routed: &Routed, refusal: Refusal) {
        self.stats.refused += 1;
        self.out.push_back(ShardOutput::Ack {
            conn: routed.reply_to,
            id: routed.id,
            address: routed.sender,
            result: Err(refusal),
        });
    }

    fn enqueue(&mut self, now_ms: u64, routed: Routed) {
        let Some(state) = self
            .users
            .get_mut(&routed.recipient)
            .filter(|s| !s.devices.is_empty())
        else {
            return self.refuse(&routed, Refusal::new(ErrorCode::RecipientUnknown));
        };
        if self.dedup.contains(routed.sender, routed.id) {
            self.stats.duplicates += 1;
            let ack = ShardOutput::Ack {
                conn: routed.reply_to,
                id: routed.id,
                address: routed.sender,
                result: Ok(()),
            };
            self.out.push_back(ack);
            return;
        }
        let mut current = DeviceSet::new();
        for device in &state.devices {
            current.insert(device.id);
        }
        if let Some(listed) = &routed.listed
            && !current.same_members(listed.as_slice())
        {
            let refusal = Refusal {
                current_devices: current,
                ..Refusal::new(ErrorCode::DeviceListStale)
            };
            return self.refuse(&routed, refusal);
        }
        if routed.ephemeral {
            for dev in &state.devices {
                if let Some(conn) = dev.bound {
                    let device = routed.recipient.device(dev.id);
                    let frame = routed.frame.clone();
                    self.out.push_back(ShardOutput::Deliver {
                        conn,
                        device,
                        seq: 0,
                        ephemeral: true,
                        frame,
                    });
                }
            }
        } else {
            let frame_bytes = routed.frame.len() as u64;
            let fan_out = state.devices.len() as u64;
            let depth_full = state
                .devices
                .iter()
                .any(|d| d.queue.len() >= self.limits.device_queue_depth_max as usize);
            if depth_full
                || self.stats.queued_bytes + frame_bytes * fan_out
                    > self.limits.shard_queued_bytes_max
            {
                let refusal = Refusal {
                    retry_after_ms: 100,
                    ..Refusal::new(ErrorCode::QueueFull)
                };
                return self.refuse(&routed, refusal);
            }
            let ttl_seconds = routed.ttl_seconds.clamp(1, self.limits.ttl_seconds_max);
            let expires_at_ms = now_ms + u64::from(ttl_seconds) * 1000;
            for dev in &mut state.devices {
                let seq = dev.next_seq;
                dev.next_seq += 1;
                let item = Queued {
                    seq,
                    id: routed.id,
                    sender: routed.sender,
                    expires_at_ms,
                    frame: routed.frame.clone(),
                };
                dev.queue.push(item);
                self.expiry
                    .push(Reverse((expires_at_ms, routed.recipient, dev.id, seq)));
                self.stats.queued_frames += 1;
                self.stats.queued_bytes += frame_bytes;
                let address = routed.recipient.device(dev.id);
                pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
            }
        }
        self.dedup.insert(now_ms, routed.sender, routed.id);
        self.stats.accepted += 1;
        self.compact_expiry();
        self.out.push_back(ShardOutput::Ack {
            conn: routed.reply_to,
            id: routed.id,
            address: routed.sender,
            result: Ok(()),
        });
    }

    fn signal(&mut self, recipient: UserAddress, frame: Bytes) {
        let Some(state) = self.users.get(&recipient) else {
            return;
        };
        for dev in &state.devices {
            if let Some(conn) = dev.bound {
                let device = recipient.device(dev.id);
                self.stats.signals += 1;
                self.out.push_back(ShardOutput::Deliver {
                    conn,
                    device,
                    seq: 0,
                    ephemeral: true,
                    frame: frame.clone(),
                });
            }
        }
    }

    fn release(&mut self, device: DeviceAddress, id: MessageId) {
        let Some(dev) = self.device_mut(&device) else {
            return;
        };
        let Some((index, item)) = dev.queue.remove_id(id) else {
            return;
        };
        if index < dev.cursor {
            dev.cursor -= 1;
        }
        self.stats.released += 1;
        self.stats.queued_frames -= 1;
        self.stats.queued_bytes -= item.frame.len() as u64;
        // Borrow again: `device_mut` borrowed all of self.
        let user = device.user_address();
        if let Some(dev) = self
            .users
            .get_mut(&user)
            .and_then(|s| s.devices.iter_mut().find(|d| d.id == device.device))
        {
            pump(dev, device, &self.limits, &mut self.out, &mut self.stats);
        }
    }

    fn set_devices(&mut self, user: UserAddress, devices: &[DeviceId]) -> Result<(), Refusal> {
        let mut wanted = DeviceSet::new();
        for &id in devices {
            wanted.insert(id);
        }
        if wanted.len() > usize::from(self.limits.devices_per_user_max) {
            return Err(Refusal::new(ErrorCode::DeviceLimit));
        }
        let state = self.users.entry(user).or_insert_with(|| UserState {
            devices: Vec::new(),
        });
        let mut removed_frames = 0usize;
        let mut removed_bytes = 0u64;
        state.devices.retain_mut(|dev| {
            let keep = wanted.contains(dev.id);
            if !keep {
                removed_bytes += dev.queue.bytes();
                removed_frames += dev.queue.clear();
            }
            keep
        });
        for &id in wanted.as_slice() {
            if !state.devices.iter().any(|d| d.id == id) {
                state.devices.push(new_device(id));
            }
        }
        self.stats.deleted += removed_frames as u64;
        self.stats.queued_frames -= removed_frames as u64;
        self.stats.queued_bytes -= removed_bytes;
        if state.devices.is_empty() {
            self.users.remove(&user);
            return Ok(());
        }
        self.rebind_user(user);
        Ok(())
    }

    fn attach_device(&mut self, device: DeviceAddress, conn: ConnId) {
        let user = device.user_address();
        let limit = usize::from(self.limits.devices_per_user_max);
        let state = self.users.entry(user).or_insert_with(|| UserState {
            devices: Vec::new(),
        });
        if !state.devices.iter().any(|d| d.id == device.device) {
            if state.devices.len() >= limit {
                if state.devices.is_empty() {
                    self.users.remove(&user);
                }
                self.out.push_back(ShardOutput::Close {
                    conn,
                    code: ErrorCode::DeviceLimit,
                });
                return;
            }
            state.devices.push(new_device(device.device));
        }
        if let Some(dev) = state.devices.iter_mut().find(|d| d.id == device.device) {
            dev.direct = Some(conn);
        }
        self.rebind_user(user);
    }

    fn detach_device(&mut self, device: DeviceAddress, conn: ConnId) {
        let Some(dev) = self.device_mut(&device) else {
            return;
        };
        if dev.direct == Some(conn) {
            dev.direct = None;
            self.rebind_user(device.user_address());
        }
    }

    fn rebind_network(&mut self, network: NetworkId) {
        let users: Vec<UserAddress> = self
            .users
            .keys()
            .filter(|u| u.network == network)
            .copied()
            .collect();
        for user in users {
            self.rebind_user(user);
        }
    }

    fn rebind_user(&mut self, user: UserAddress) {
        let servers = self
            .servers
            .get(&user.network)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let Some(state) = self.users.get_mut(&user) else {
            return;
        };
        for dev in &mut state.devices {
            let address = user.device(dev.id);
            let target = dev.direct.or_else(|| server_for(servers, &address));
            if target != dev.bound {
                dev.bound = target;
                dev.cursor = 0;
                pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
            }
        }
    }

    fn device(&self, device: &DeviceAddress) -> Option<&DeviceState<Q>> {
        self.users
            .get(&device.user_address())?
            .devices
            .iter()
            .find(|d| d.id == device.device)
    }

    fn device_mut(&mut self, device: &DeviceAddress) -> Option<&mut DeviceState<Q>> {
        self.users
            .get_mut(&device.user_address())?
            .devices
            .iter_mut()
            .find(|d| d.id == device.device)
    }
}

/// Stale expiry entries tolerated before compaction, beyond twice the queued frames.
const EXPIRY_SLACK: u64 = 4096;

fn new_device<Q: DeviceQueue>(id: DeviceId) -> DeviceState<Q> {
    DeviceState {
        id,
        queue: Q::default(),
        next_seq: 1,
        direct: None,
        bound: None,
        cursor: 0,
    }
}

/// The server session a device of a proxied network is delivered through: fixed by a hash of
/// the device while the set of server sessions stays the same, so its order holds.
fn server_for(servers: &[ConnId], device: &DeviceAddress) -> Option<ConnId> {
    if servers.is_empty() {
        return None;
    }
    let h = (device.user.0 as u64 ^ u64::from(device.device.0)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    servers.get((h >> 32) as usize % servers.len()).copied()
}

/// Writes queued frames to the device's connection up to its in-flight window.
fn pump<Q: DeviceQueue>(
    dev: &mut DeviceState<Q>,
    address: DeviceAddress,
    limits: &RelayLimits,
    out: &mut VecDeque<ShardOutput>,
    stats: &mut ShardStats,
) {
    let Some(conn) = dev.bound else { return };
    let window = limits.device_deliveries_in_flight_max as usize;
    while dev.cursor < window {
        let Some(item) = dev.queue.get(dev.cursor) else {
            break;
        };
        out.push_back(ShardOutput::Deliver {
            conn,
            device: address,
            seq: item.seq,
            ephemeral: false,
            frame: item.frame.clone(),
        });
        stats.delivered += 1;
        dev.cursor += 1;
    }
}
