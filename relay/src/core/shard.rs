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
use super::log::{LogWrite, ShardLog};
use super::queue::{DeviceQueue, Queued};
use super::wal::{Record, Target};
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
    /// The user opted out: delete every queued frame that came from another network.
    PurgeInterop {
        user: UserAddress,
    },
    /// Write `frame` (an encoded `Notice`) to the user's connected devices and to its
    /// network's server sessions.
    NoticeUser {
        user: UserAddress,
        frame: Bytes,
    },
    /// Write `frame` to the network's server sessions (sent to one shard only: every shard
    /// knows them all); `close` ends those sessions after it.
    NoticeNetwork {
        network: NetworkId,
        frame: Bytes,
        close: bool,
    },
    /// The network is suspended: write `frame` to the direct device sessions of its users on
    /// this shard, then close them (sent to every shard).
    CloseNetworkDevices {
        network: NetworkId,
        frame: Bytes,
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
    /// Write an encoded frame of the relay's own (a `Notice`) as it is.
    Send { conn: ConnId, frame: Bytes },
    /// Read a spilled frame back from the log, then call [`Shard::on_loaded`].
    Load {
        device: DeviceAddress,
        seq: u64,
        segment: u64,
        offset: u64,
        len: u32,
    },
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
    /// Bytes of queued frames held in memory (the rest are only in the log).
    pub ram_bytes: u64,
    /// Frames moved out of memory (their bytes stay in the log), and read back.
    pub spilled: u64,
    pub loads: u64,
    /// Frames deleted because their recipient opted out of interop.
    pub purged: u64,
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
    /// The log segment with this user's latest device-set record.
    device_set_segment: Option<u64>,
}

fn new_user<Q>() -> UserState<Q> {
    UserState {
        devices: Vec::new(),
        device_set_segment: None,
    }
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
    /// The durable log; `None` at the `memory` durability level.
    log: Option<ShardLog>,
    /// Acks held until the log has stored their records: (log position, ack).
    awaiting: VecDeque<(u64, ShardOutput)>,
    /// Devices without a connection that may still hold frames in memory: where spilling
    /// looks first.
    offline: std::collections::HashSet<DeviceAddress>,
    /// A segment whose spilled frames are being read back so it can be rewritten: they must
    /// not be spilled again meanwhile.
    reloading: Option<u64>,
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
            log: None,
            awaiting: VecDeque::new(),
            offline: std::collections::HashSet::new(),
            reloading: None,
        }
    }

    /// Moves frames of offline devices out of memory (their bytes are in the log, committed)
    /// until the shard holds at most `shard_ram_bytes_max`. Devices that come back read them
    /// again, in order, as their deliveries need them.
    fn spill(&mut self) {
        let Some(log) = self.log.as_mut() else { return };
        if self.stats.ram_bytes <= self.limits.shard_ram_bytes_max {
            return;
        }
        let committed = log.committed();
        let reloading = self.reloading;
        let candidates: Vec<DeviceAddress> = self.offline.iter().copied().collect();
        for device in candidates {
            if self.stats.ram_bytes <= self.limits.shard_ram_bytes_max {
                break;
            }
            let Some(dev) = self
                .users
                .get_mut(&device.user_address())
                .and_then(|s| s.devices.iter_mut().find(|d| d.id == device.device))
            else {
                self.offline.remove(&device);
                continue;
            };
            if dev.bound.is_some() {
                self.offline.remove(&device);
                continue;
            }
            let mut kept = false;
            let stats = &mut self.stats;
            dev.queue.for_each_mut(&mut |item| {
                if item.frame.is_none() {
                    return;
                }
                if item.lsn > committed || item.loading || Some(item.segment) == reloading {
                    kept = true;
                    return;
                }
                item.frame = None;
                stats.ram_bytes -= u64::from(item.len);
                stats.spilled += 1;
                log.add_spilled(item.segment, 1);
            });
            if !kept {
                self.offline.remove(&device);
            }
        }
    }

    /// Whether a load asked for earlier is still wanted: the frame may have been released
    /// (and its segment deleted) since.
    pub fn wants_load(&self, device: &DeviceAddress, seq: u64) -> bool {
        self.device(device).is_some_and(|d| {
            let mut index = 0;
            while let Some(item) = d.queue.get(index) {
                if item.seq == seq {
                    return item.frame.is_none() && item.loading;
                }
                if item.seq > seq {
                    return false;
                }
                index += 1;
            }
            false
        })
    }

    /// A frame read back from the log (`None`: the read failed).
    pub fn on_loaded(&mut self, device: DeviceAddress, seq: u64, frame: Option<Bytes>) {
        let Some(dev) = self
            .users
            .get_mut(&device.user_address())
            .and_then(|s| s.devices.iter_mut().find(|d| d.id == device.device))
        else {
            return;
        };
        let Some(item) = dev.queue.find_seq_mut(seq) else {
            return;
        };
        match frame {
            Some(frame) if item.frame.is_none() => {
                item.loading = false;
                item.frame = Some(frame);
                self.stats.ram_bytes += u64::from(item.len);
                self.stats.loads += 1;
                if let Some(log) = self.log.as_mut() {
                    log.add_spilled(item.segment, -1);
                }
            }
            Some(_) => item.loading = false,
            None => {
                // Left marked as loading: this device stalls rather than retrying a bad
                // read forever; the shard stops acknowledging (STORAGE_UNAVAILABLE).
                self.on_log_failed();
                return;
            }
        }
        pump(dev, device, &self.limits, &mut self.out, &mut self.stats);
        if dev.bound.is_none() {
            self.offline.insert(device);
        }
    }

    /// Forgets a removed frame's memory or its spilled mark.
    fn forget_frame(&mut self, item: &Queued) {
        if item.frame.is_some() {
            self.stats.ram_bytes -= u64::from(item.len);
        } else if let Some(log) = self.log.as_mut() {
            log.add_spilled(item.segment, -1);
        }
    }

    /// A shard that records everything in `log` and acknowledges only what it stored.
    pub fn with_log(limits: RelayLimits, log: ShardLog) -> Shard<Q> {
        Shard {
            log: Some(log),
            ..Shard::new(limits)
        }
    }

    pub fn log(&self) -> Option<&ShardLog> {
        self.log.as_ref()
    }

    /// Records appended since the last call, for the IO shell to write (and sync).
    pub fn take_log_write(&mut self) -> Option<LogWrite> {
        self.log.as_mut()?.take_write()
    }

    /// Everything up to `lsn` is stored: the acks waiting for it go out.
    pub fn on_log_committed(&mut self, lsn: u64) {
        let Some(log) = self.log.as_mut() else { return };
        log.on_committed(lsn);
        while self.awaiting.front().is_some_and(|(at, _)| *at <= lsn) {
            if let Some((_, ack)) = self.awaiting.pop_front() {
                self.out.push_back(ack);
            }
        }
        // Frames stored now may leave memory.
        self.spill();
    }

    /// A log write or sync failed: nothing waiting is acknowledged, and nothing more will be
    /// (`STORAGE_UNAVAILABLE`, retryable) until the relay restarts on a working disk.
    pub fn on_log_failed(&mut self) {
        let Some(log) = self.log.as_mut() else { return };
        log.on_failed();
        for (_, output) in self.awaiting.drain(..) {
            if let ShardOutput::Ack {
                conn, id, address, ..
            } = output
            {
                let refusal = Refusal {
                    retry_after_ms: 1000,
                    ..Refusal::new(ErrorCode::StorageUnavailable)
                };
                self.stats.refused += 1;
                self.out.push_back(ShardOutput::Ack {
                    conn,
                    id,
                    address,
                    result: Err(refusal),
                });
            }
        }
    }

    /// Segments the IO shell may delete (everything in them is released or rewritten).
    pub fn take_log_deletions(&mut self) -> Vec<u64> {
        self.log
            .as_mut()
            .map(ShardLog::take_deletable)
            .unwrap_or_default()
    }

    /// Recovery found segment `id` holding `bytes`.
    pub(crate) fn adopt_segment(&mut self, id: u64, bytes: u64) {
        if let Some(log) = self.log.as_mut() {
            log.adopt(id, bytes);
        }
    }

    /// Applies one record read back from segment `segment` (whose bytes are `bytes`: queued
    /// frames are slices of them, not copies).
    pub(crate) fn replay(
        &mut self,
        segment: u64,
        bytes: &Bytes,
        record: Record<'_>,
        now_ms: u64,
        report: &mut super::recovery::RecoveryReport,
    ) {
        let Some(log) = self.log.as_mut() else { return };
        match record {
            Record::DeviceSet { user, devices } => {
                let state = self.users.entry(user).or_insert_with(new_user);
                let mut dropped: Vec<(u64, u64, bool)> = Vec::new();
                state.devices.retain_mut(|dev| {
                    let keep = devices.contains(dev.id);
                    if !keep {
                        dev.queue.clear(&mut |item| {
                            dropped.push((item.segment, u64::from(item.len), item.frame.is_some()))
                        });
                    }
                    keep
                });
                for &id in devices.as_slice() {
                    if !state.devices.iter().any(|d| d.id == id) {
                        state.devices.push(new_device(id));
                    }
                }
                for (from, len, in_ram) in dropped {
                    log.remove_live(from, len);
                    log.add_ref(segment, from);
                    if in_ram {
                        self.stats.ram_bytes -= len;
                    } else {
                        log.add_spilled(from, -1);
                    }
                    self.stats.queued_frames -= 1;
                    self.stats.queued_bytes -= len;
                    report.restored_frames -= 1;
                }
                if let Some(previous) = state.device_set_segment {
                    log.add_ref(segment, previous);
                }
                let latest = if devices.is_empty() {
                    None
                } else {
                    Some(segment)
                };
                log.move_device_set(state.device_set_segment, latest);
                state.device_set_segment = latest;
                if devices.is_empty() {
                    self.users.remove(&user);
                }
            }
            Record::Enqueue {
                arrival_ms,
                expires_at_ms,
                sender,
                id,
                recipient,
                targets,
                frame,
            } => {
                if arrival_ms + u64::from(self.limits.dedup_window_seconds) * 1000 > now_ms {
                    self.dedup.insert(arrival_ms, sender, id);
                }
                // The device-set record that created these devices may have been compacted
                // away (a later one supersedes it): the enqueue record is proof enough that
                // they existed. Later device-set records prune what was removed since.
                let state = self.users.entry(recipient).or_insert_with(new_user);
                for target in &targets {
                    if !state.devices.iter().any(|d| d.id == target.device) {
                        state.devices.push(new_device(target.device));
                    }
                    if let Some(dev) = state.devices.iter_mut().find(|d| d.id == target.device) {
                        dev.next_seq = dev.next_seq.max(target.seq + 1);
                    }
                }
                if expires_at_ms <= now_ms {
                    report.expired += targets.len() as u64;
                    return;
                }
                // Where the frame sits in the segment, to read it back if it stays on disk.
                let offset =
                    (frame.as_ptr() as usize).saturating_sub(bytes.as_ptr() as usize) as u64;
                let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                for target in targets {
                    let Some(dev) = state.devices.iter_mut().find(|d| d.id == target.device) else {
                        continue;
                    };
                    // Within the memory budget the frame is copied (so that the segment's
                    // buffer can go); past it, it stays only in the log.
                    let in_ram =
                        self.stats.ram_bytes + u64::from(len) <= self.limits.shard_ram_bytes_max;
                    let item = Queued {
                        seq: target.seq,
                        id,
                        sender,
                        expires_at_ms,
                        segment,
                        offset,
                        lsn: 0,
                        len,
                        frame: in_ram.then(|| Bytes::copy_from_slice(frame)),
                        loading: false,
                    };
                    let bytes_len = u64::from(len);
                    if dev.queue.insert_sorted(item) {
                        log.add_live(segment, bytes_len);
                        if in_ram {
                            self.stats.ram_bytes += bytes_len;
                        } else {
                            log.add_spilled(segment, 1);
                        }
                        self.expiry
                            .push(Reverse((expires_at_ms, recipient, dev.id, target.seq)));
                        self.stats.queued_frames += 1;
                        self.stats.queued_bytes += bytes_len;
                        report.restored_frames += 1;
                    } else {
                        // A rewritten copy: the newest segment holds it now.
                        dev.queue.for_each_mut(&mut |q| {
                            if q.seq == target.seq && q.segment != segment {
                                log.remove_live(q.segment, bytes_len);
                                log.add_live(segment, bytes_len);
                                if q.frame.is_none() {
                                    log.add_spilled(q.segment, -1);
                                    log.add_spilled(segment, 1);
                                }
                                q.segment = segment;
                                q.offset = offset;
                            }
                        });
                    }
                }
            }
            Record::Release { device, seq, .. } => {
                let user = device.user_address();
                let Some(dev) = self
                    .users
                    .get_mut(&user)
                    .and_then(|s| s.devices.iter_mut().find(|d| d.id == device.device))
                else {
                    return;
                };
                if let Some((_, item)) = dev.queue.remove_seq(seq) {
                    let len = u64::from(item.len);
                    log.remove_live(item.segment, len);
                    log.add_ref(segment, item.segment);
                    if item.frame.is_some() {
                        self.stats.ram_bytes -= len;
                    } else {
                        log.add_spilled(item.segment, -1);
                    }
                    self.stats.queued_frames -= 1;
                    self.stats.queued_bytes -= len;
                    report.restored_frames -= 1;
                }
            }
        }
    }

    /// After the last record: forget dedup entries past their window, drop dead segments.
    pub(crate) fn finish_recovery(&mut self, now_ms: u64) {
        self.dedup.forget_expired(now_ms);
        // No device is connected yet: every queue may give up memory.
        for (user, state) in &self.users {
            for dev in &state.devices {
                if !dev.queue.is_empty() {
                    self.offline.insert(user.device(dev.id));
                }
            }
        }
        if let Some(log) = self.log.as_mut() {
            log.collect_dead();
        }
    }

    fn log_failed(&self) -> bool {
        self.log.as_ref().is_some_and(ShardLog::is_failed)
    }

    /// Sends an ack now, or once the log has stored everything appended so far.
    fn ack_when_stored(&mut self, ack: ShardOutput) {
        match &self.log {
            Some(log) if log.committed() < log.appended() => {
                self.awaiting.push_back((log.appended(), ack))
            }
            _ => self.out.push_back(ack),
        }
    }

    /// Appends a release (ack or expiry) of `item` from `device`.
    fn log_release(&mut self, device: DeviceAddress, item: &Queued, expired: bool) {
        let Some(log) = self.log.as_mut() else { return };
        let segment = log.append(&Record::Release {
            device,
            seq: item.seq,
            expired,
        });
        log.remove_live(item.segment, u64::from(item.len));
        log.add_ref(segment, item.segment);
    }

    /// Appends `user`'s current device set.
    fn log_device_set(&mut self, user: UserAddress) {
        let Some(log) = self.log.as_mut() else { return };
        let mut devices = DeviceSet::new();
        let previous = self.users.get(&user).and_then(|s| {
            for d in &s.devices {
                devices.insert(d.id);
            }
            s.device_set_segment
        });
        let segment = log.append(&Record::DeviceSet { user, devices });
        if let Some(previous) = previous {
            log.add_ref(segment, previous);
        }
        let now_latest = if devices.is_empty() {
            None
        } else {
            Some(segment)
        };
        log.move_device_set(previous, now_latest);
        if let Some(state) = self.users.get_mut(&user) {
            state.device_set_segment = now_latest;
        }
    }

    /// Rewrites the oldest mostly-dead segment: its live records go to the head of the log,
    /// and the segment is deleted once they are stored.
    pub fn compact_log(&mut self, now_ms: u64) {
        let Some(log) = self.log.as_ref() else { return };
        let Some(segment) = log.rewrite_candidate() else {
            return;
        };
        let spilled = log.segments().get(&segment).map_or(0, |s| s.spilled);
        if spilled == 0 {
            self.reloading = None;
            self.rewrite_segment(segment, now_ms);
            return;
        }
        // Its live frames are mostly on disk only: read them back first (memory goes over
        // budget by at most a quarter of a segment); the rewrite follows on a later tick.
        self.reloading = Some(segment);
        let out = &mut self.out;
        for (user, state) in &mut self.users {
            for dev in &mut state.devices {
                let device = user.device(dev.id);
                dev.queue.for_each_mut(&mut |item| {
                    if item.segment == segment && item.frame.is_none() && !item.loading {
                        item.loading = true;
                        out.push_back(ShardOutput::Load {
                            device,
                            seq: item.seq,
                            segment,
                            offset: item.offset,
                            len: item.len,
                        });
                    }
                });
            }
        }
    }

    /// Re-appends every live record of `segment` at the head of the log; the segment is
    /// deleted once they are stored.
    pub fn rewrite_segment(&mut self, segment: u64, now_ms: u64) {
        let Some(log) = self.log.as_mut() else { return };
        for (user, state) in &mut self.users {
            for dev in &mut state.devices {
                let device = user.device(dev.id);
                dev.queue.for_each_mut(&mut |item| {
                    // Segments with spilled frames are never chosen (see `rewrite_candidate`)
                    // and recovery reloads a damaged segment's frames before rewriting it.
                    let Some(frame) = &item.frame else { return };
                    if item.segment != segment {
                        return;
                    }
                    let record = Record::Enqueue {
                        arrival_ms: now_ms,
                        expires_at_ms: item.expires_at_ms,
                        sender: item.sender,
                        id: item.id,
                        recipient: *user,
                        targets: vec![Target {
                            device: device.device,
                            seq: item.seq,
                        }],
                        frame,
                    };
                    let (moved_to, record_offset) = log.append_at(&record);
                    let bytes = u64::from(item.len);
                    log.remove_live(segment, bytes);
                    log.add_live(moved_to, bytes);
                    item.segment = moved_to;
                    item.offset = record_offset + super::wal::enqueue_frame_offset(1);
                    item.lsn = log.appended();
                });
            }
        }
        let users: Vec<UserAddress> = self
            .users
            .iter()
            .filter(|(_, s)| s.device_set_segment == Some(segment))
            .map(|(u, _)| *u)
            .collect();
        for user in users {
            self.log_device_set(user);
        }
        if let Some(log) = self.log.as_mut() {
            log.retire(segment);
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

    /// Checks the log's bookkeeping against the queues: every queued frame's segment exists,
    /// and each segment's live and spilled counts are the frames that point at it. For tests
    /// (the simulations call it after every step); `Err` says what disagrees.
    pub fn audit_log(&self) -> Result<(), String> {
        let Some(log) = &self.log else { return Ok(()) };
        let mut live: std::collections::BTreeMap<u64, (u64, u64)> =
            std::collections::BTreeMap::new();
        for (user, state) in &self.users {
            for dev in &state.devices {
                let mut index = 0;
                while let Some(item) = dev.queue.get(index) {
                    if !log.segments().contains_key(&item.segment) {
                        return Err(format!(
                            "{} seq {} points at segment {}, which is gone",
                            user.device(dev.id),
                            item.seq,
                            item.segment
                        ));
                    }
                    let counts = live.entry(item.segment).or_default();
                    counts.0 += 1;
                    if item.frame.is_none() {
                        counts.1 += 1;
                    }
                    index += 1;
                }
            }
        }
        for (id, stats) in log.segments() {
            let (frames, spilled) = live.get(id).copied().unwrap_or_default();
            if stats.live_frames != frames || stats.spilled != spilled {
                return Err(format!(
                    "segment {id}: counts {} live, {} spilled; queues hold {frames} and {spilled}",
                    stats.live_frames, stats.spilled
                ));
            }
        }
        Ok(())
    }

    /// (seq, id, frame) of every frame queued for a device, in order (for tests and tools).
    pub fn queued(&self, device: &DeviceAddress) -> Vec<(u64, MessageId, Bytes)> {
        let mut out = Vec::new();
        if let Some(dev) = self.device(device) {
            let mut index = 0;
            while let Some(item) = dev.queue.get(index) {
                out.push((item.seq, item.id, item.frame.clone().unwrap_or_default()));
                index += 1;
            }
        }
        out
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
                let ack = ShardOutput::Ack {
                    conn: reply_to,
                    id: request_id,
                    address,
                    result,
                };
                if result.is_ok() {
                    self.ack_when_stored(ack);
                } else {
                    self.out.push_back(ack);
                }
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
            ShardInput::PurgeInterop { user } => self.purge_interop(user),
            ShardInput::NoticeUser { user, frame } => {
                let mut conns: Vec<ConnId> = self
                    .users
                    .get(&user)
                    .map(|s| s.devices.iter().filter_map(|d| d.bound).collect())
                    .unwrap_or_default();
                if let Some(servers) = self.servers.get(&user.network) {
                    conns.extend(servers.iter().copied());
                }
                conns.sort_unstable();
                conns.dedup();
                for conn in conns {
                    self.out.push_back(ShardOutput::Send {
                        conn,
                        frame: frame.clone(),
                    });
                }
            }
            ShardInput::CloseNetworkDevices { network, frame } => {
                let mut conns: Vec<ConnId> = self
                    .users
                    .iter()
                    .filter(|(user, _)| user.network == network)
                    .flat_map(|(_, state)| state.devices.iter().filter_map(|d| d.direct))
                    .collect();
                conns.sort_unstable();
                conns.dedup();
                for conn in conns {
                    self.out.push_back(ShardOutput::Send {
                        conn,
                        frame: frame.clone(),
                    });
                    self.out.push_back(ShardOutput::Close {
                        conn,
                        code: ErrorCode::PartnerSuspended,
                    });
                }
            }
            ShardInput::NoticeNetwork {
                network,
                frame,
                close,
            } => {
                let conns = self.servers.get(&network).cloned().unwrap_or_default();
                for &conn in &conns {
                    self.out.push_back(ShardOutput::Send {
                        conn,
                        frame: frame.clone(),
                    });
                }
                if close {
                    for conn in conns {
                        self.out.push_back(ShardOutput::Close {
                            conn,
                            code: ErrorCode::PartnerSuspended,
                        });
                    }
                }
            }
        }
    }

    /// Deletes (and logs the release of) every queued frame for `user` whose sender is on
    /// another network: what opting out of interop removes.
    fn purge_interop(&mut self, user: UserAddress) {
        let mut doomed = Vec::new();
        if let Some(state) = self.users.get(&user) {
            for dev in &state.devices {
                for index in 0..dev.queue.len() {
                    if let Some(item) = dev.queue.get(index)
                        && item.sender.network != user.network
                    {
                        doomed.push((user.device(dev.id), item.id));
                    }
                }
            }
        }
        for (device, id) in doomed {
            self.stats.purged += 1;
            self.release(device, id);
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
                self.stats.queued_bytes -= u64::from(item.len);
                let address = user.device(device);
                pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
                self.forget_frame(&item);
                self.log_release(address, &item, true);
            }
        }
        self.compact_log(now_ms);
        self.spill();
        if let Some(log) = self.log.as_mut() {
            log.collect_dead();
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
        if self.log_failed() {
            let refusal = Refusal {
                retry_after_ms: 1000,
                ..Refusal::new(ErrorCode::StorageUnavailable)
            };
            return self.refuse(&routed, refusal);
        }
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
            // The first copy may not be stored yet: this ack waits for it too.
            self.ack_when_stored(ack);
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
            // Without a log, everything queued is in memory: the memory budget bounds it too.
            let bytes_max = match self.log {
                Some(_) => self.limits.shard_queued_bytes_max,
                None => self
                    .limits
                    .shard_queued_bytes_max
                    .min(self.limits.shard_ram_bytes_max),
            };
            if depth_full || self.stats.queued_bytes + frame_bytes * fan_out > bytes_max {
                let refusal = Refusal {
                    retry_after_ms: 100,
                    ..Refusal::new(ErrorCode::QueueFull)
                };
                return self.refuse(&routed, refusal);
            }
            let ttl_seconds = routed.ttl_seconds.clamp(1, self.limits.ttl_seconds_max);
            let expires_at_ms = now_ms + u64::from(ttl_seconds) * 1000;
            let segment = match self.log.as_mut() {
                Some(log) => {
                    let targets = state
                        .devices
                        .iter()
                        .map(|d| Target {
                            device: d.id,
                            seq: d.next_seq,
                        })
                        .collect();
                    let record = Record::Enqueue {
                        arrival_ms: now_ms,
                        expires_at_ms,
                        sender: routed.sender,
                        id: routed.id,
                        recipient: routed.recipient,
                        targets,
                        frame: &routed.frame,
                    };
                    let (segment, record_offset) = log.append_at(&record);
                    for _ in 0..fan_out {
                        log.add_live(segment, frame_bytes);
                    }
                    let offset =
                        record_offset + super::wal::enqueue_frame_offset(state.devices.len());
                    (segment, offset, log.appended())
                }
                None => (0, 0, 0),
            };
            let (segment, offset, lsn) = segment;
            let len = u32::try_from(routed.frame.len()).unwrap_or(u32::MAX);
            for dev in &mut state.devices {
                let seq = dev.next_seq;
                dev.next_seq += 1;
                let item = Queued {
                    seq,
                    id: routed.id,
                    sender: routed.sender,
                    expires_at_ms,
                    segment,
                    offset,
                    lsn,
                    len,
                    frame: Some(routed.frame.clone()),
                    loading: false,
                };
                dev.queue.push(item);
                self.expiry
                    .push(Reverse((expires_at_ms, routed.recipient, dev.id, seq)));
                self.stats.queued_frames += 1;
                self.stats.queued_bytes += frame_bytes;
                self.stats.ram_bytes += frame_bytes;
                let address = routed.recipient.device(dev.id);
                pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
                if dev.bound.is_none() {
                    self.offline.insert(address);
                }
            }
            // No spilling here: these frames are not stored yet; the next commit spills.
        }
        self.dedup.insert(now_ms, routed.sender, routed.id);
        self.stats.accepted += 1;
        self.compact_expiry();
        self.ack_when_stored(ShardOutput::Ack {
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
        self.stats.queued_bytes -= u64::from(item.len);
        self.forget_frame(&item);
        // Borrow again: `device_mut` borrowed all of self.
        let user = device.user_address();
        if let Some(dev) = self
            .users
            .get_mut(&user)
            .and_then(|s| s.devices.iter_mut().find(|d| d.id == device.device))
        {
            pump(dev, device, &self.limits, &mut self.out, &mut self.stats);
        }
        self.log_release(device, &item, false);
    }

    // A `Refusal` carries the current device set inline (no allocation); this path is rare.
    #[allow(clippy::result_large_err)]
    fn set_devices(&mut self, user: UserAddress, devices: &[DeviceId]) -> Result<(), Refusal> {
        let mut wanted = DeviceSet::new();
        for &id in devices {
            wanted.insert(id);
        }
        if wanted.len() > usize::from(self.limits.devices_per_user_max) {
            return Err(Refusal::new(ErrorCode::DeviceLimit));
        }
        if self.log_failed() {
            return Err(Refusal {
                retry_after_ms: 1000,
                ..Refusal::new(ErrorCode::StorageUnavailable)
            });
        }
        let state = self.users.entry(user).or_insert_with(new_user);
        let mut removed_frames = 0usize;
        let mut removed_bytes = 0u64;
        let mut removed_from: Vec<(u64, u64, bool)> = Vec::new();
        state.devices.retain_mut(|dev| {
            let keep = wanted.contains(dev.id);
            if !keep {
                removed_bytes += dev.queue.bytes();
                removed_frames += dev.queue.clear(&mut |item| {
                    removed_from.push((item.segment, u64::from(item.len), item.frame.is_some()))
                });
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
        self.stats.ram_bytes -= removed_from
            .iter()
            .filter(|r| r.2)
            .map(|r| r.1)
            .sum::<u64>();
        // The device-set record is what deletes the removed devices' frames on replay, so it
        // refers to every segment they were recorded in.
        self.log_device_set(user);
        if let Some(log) = self.log.as_mut() {
            let head = log.current();
            for &(segment, bytes, in_ram) in &removed_from {
                log.remove_live(segment, bytes);
                log.add_ref(head, segment);
                if !in_ram {
                    log.add_spilled(segment, -1);
                }
            }
        }
        if self.users.get(&user).is_some_and(|s| s.devices.is_empty()) {
            self.users.remove(&user);
            return Ok(());
        }
        self.rebind_user(user);
        Ok(())
    }

    fn attach_device(&mut self, device: DeviceAddress, conn: ConnId) {
        let user = device.user_address();
        let limit = usize::from(self.limits.devices_per_user_max);
        let state = self.users.entry(user).or_insert_with(new_user);
        let mut added = false;
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
            added = true;
        }
        if let Some(dev) = state.devices.iter_mut().find(|d| d.id == device.device) {
            dev.direct = Some(conn);
        }
        if added {
            self.log_device_set(user);
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
                if target.is_none() && !dev.queue.is_empty() {
                    self.offline.insert(address);
                } else {
                    self.offline.remove(&address);
                }
            }
        }
        self.spill();
    }

    /// Recovery found segment `segment` damaged: before it is moved aside, the frames of it
    /// that stayed on disk are read from its bytes into memory, so they can be rewritten.
    pub(crate) fn fill_from_segment(&mut self, segment: u64, bytes: &Bytes) {
        let Some(log) = self.log.as_mut() else { return };
        let stats = &mut self.stats;
        for state in self.users.values_mut() {
            for dev in &mut state.devices {
                dev.queue.for_each_mut(&mut |item| {
                    if item.segment != segment || item.frame.is_some() {
                        return;
                    }
                    let start = usize::try_from(item.offset).unwrap_or(usize::MAX);
                    let end = start.saturating_add(item.len as usize);
                    if let Some(frame) = bytes.get(start..end) {
                        item.frame = Some(Bytes::copy_from_slice(frame));
                        stats.ram_bytes += u64::from(item.len);
                        log.add_spilled(segment, -1);
                    }
                });
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
// Truncating casts fold the id into the hash on purpose.
#[allow(clippy::cast_possible_truncation)]
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
        let Some(frame) = &item.frame else {
            // Spilled: read back what the window needs, in order; deliveries resume from
            // here when the first of them is loaded.
            for index in dev.cursor..window {
                let Some(item) = dev.queue.get_mut(index) else {
                    break;
                };
                if item.frame.is_none() && !item.loading {
                    item.loading = true;
                    out.push_back(ShardOutput::Load {
                        device: address,
                        seq: item.seq,
                        segment: item.segment,
                        offset: item.offset,
                        len: item.len,
                    });
                }
            }
            break;
        };
        out.push_back(ShardOutput::Deliver {
            conn,
            device: address,
            seq: item.seq,
            ephemeral: false,
            frame: frame.clone(),
        });
        stats.delivered += 1;
        dev.cursor += 1;
    }
}
