//! What the world checks, message by message. The ledger watches every shard call (through the
//! shard's counters and outputs), every crash and recovery, and what each device's client
//! reads, and records the first rule broken:
//!
//! - **Acknowledged means stored:** an `Ack(Accepted)` leaves a shard only once the log is
//!   committed past the record of what it acknowledges.
//! - **Nothing acknowledged is lost:** after a crash, every acknowledged message is back in the
//!   queue of every device it was queued for (unless that device released it, its TTL ran out
//!   or the device was removed); at the end of the run every such device has read it.
//! - **Nothing is delivered again after its release:** once a shard has handled a device's
//!   `Ack` for a message it never writes it to that device again, unless a crash lost the
//!   release before it was stored (at-least-once; the client dedups by id).
//! - **A resend is queued once** (the dedup window is far longer than a run), across crashes
//!   too while the first copy's record is in the log. One exception is tolerated and
//!   counted (`forgotten`), because the relay has it by design today: once every device has
//!   released a message for good, compaction may delete its record, and with it the dedup
//!   entry recovery rebuilds; a sender that never saw the `Ack` and resends after a restart
//!   gets it queued and delivered again.
//! - **A refused frame is never delivered:** a shard that refuses a frame queues it nowhere,
//!   and delivers only what it queued, to the devices it queued it for.
//! - **Per-device order:** a device's queue positions follow the order its messages were
//!   accepted in, and on each connection a device first reads the messages of one sender in
//!   that order (across connections it may not: a frame written on the old binding can be
//!   read after newer ones on the new).
//!
//! After every step the world also runs every shard's own `audit()`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use codec::{DeviceAddress, DeviceId, HeaderRef, MessageId, UserAddress, decode};
use relay::core::shard::Shard;
use relay::core::shard::interface::{AckOf, ShardInput, ShardOutput, ShardStats};
use relay::core::{ConnId, shard_of};

/// One copy of a message a shard queued (a resend after a crash may be queued again).
#[derive(Debug, Clone)]
struct QueuedCopy {
    epoch: u32,
    /// Position in the order all shards queued copies in (per shard, the queue order).
    order: u64,
    /// Where the log was after its record (this epoch's log positions).
    lsn: u64,
    /// The devices it was queued for, each with its removal count then.
    targets: Vec<(DeviceAddress, u32)>,
    expires_at_ms: u64,
}

#[derive(Debug)]
struct Message {
    sender: DeviceAddress,
    recipient: UserAddress,
    ttl_seconds: u32,
    copies: Vec<QueuedCopy>,
    /// The latest copy a shard sent `Ack(Accepted)` for: what the relay promised.
    promised: Option<QueuedCopy>,
    /// A client read the acceptance.
    confirmed: bool,
}

/// A shard released a message for a device on the device's `Ack`.
#[derive(Debug, Clone, Copy)]
struct Release {
    epoch: u32,
    /// Stored (committed in its epoch): no crash brings the message back.
    durable: bool,
}

/// What a shard was asked, as far as the ledger cares.
#[derive(Debug, Clone, Copy)]
pub enum Asked {
    Routed {
        id: MessageId,
        recipient: UserAddress,
    },
    DeviceAck {
        device: DeviceAddress,
        id: MessageId,
    },
    DeviceSet {
        user: UserAddress,
    },
    Other,
}

impl Asked {
    pub fn of(input: &ShardInput) -> Asked {
        match input {
            ShardInput::Envelope(r) | ShardInput::Receipt(r) => Asked::Routed {
                id: r.id,
                recipient: r.recipient,
            },
            ShardInput::DeviceAck { device, id } => Asked::DeviceAck {
                device: *device,
                id: *id,
            },
            ShardInput::DeviceList { user, .. } => Asked::DeviceSet { user: *user },
            ShardInput::AttachDevice { device, .. } => Asked::DeviceSet {
                user: device.user_address(),
            },
            _ => Asked::Other,
        }
    }
}

/// Counts for the run's summary and for checking that a run did something.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub queued: u64,
    pub promised: u64,
    pub confirmed: u64,
    pub duplicates: u64,
    pub refused_by_shard: u64,
    pub delivered: u64,
    pub first_reads: u64,
    pub releases: u64,
    pub crashes: u64,
    /// Resends queued again after a crash because every device had released the first
    /// copy and its record (with the dedup entry recovery rebuilds from it) was compacted
    /// away: the devices read them twice and dedup them by id.
    pub forgotten: u64,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Crashes so far: log positions and in-memory state belong to one epoch.
    epoch: u32,
    ttl_seconds_max: u32,
    messages: BTreeMap<MessageId, Message>,
    releases: BTreeMap<(DeviceAddress, MessageId), Release>,
    /// Releases not stored yet: (shard, log position after the release, key).
    unstored_releases: Vec<(u16, u64, (DeviceAddress, MessageId))>,
    /// Every (device, message) a shard ever released, stored or not.
    released_ever: BTreeSet<(DeviceAddress, MessageId)>,
    /// Each user's device set as its shard last said.
    device_sets: BTreeMap<UserAddress, Vec<DeviceId>>,
    /// Times each device left its user's set.
    removals: BTreeMap<DeviceAddress, u32>,
    /// Per device: the messages its client has read.
    seen: BTreeMap<DeviceAddress, BTreeSet<MessageId>>,
    /// Per connection and device: what was read there; per sender too, the queue order of
    /// the last message read there first.
    seen_on: BTreeMap<(ConnId, DeviceAddress), BTreeSet<MessageId>>,
    last_order: BTreeMap<(ConnId, DeviceAddress, DeviceAddress), u64>,
    /// Per device, what its shard has written this run, by queue position: (order, id).
    written: BTreeMap<DeviceAddress, BTreeMap<u64, (u64, MessageId)>>,
    next_order: u64,
    next_id: u128,
    violation: Option<String>,
    pub counts: Counts,
    /// Refusals clients read, by error code.
    pub refusals: BTreeMap<u16, u64>,
}

/// The message id and sender of a queued frame (an `Envelope` or `Receipt`).
pub fn inner_message(frame: &Bytes) -> Option<(MessageId, DeviceAddress)> {
    match decode(frame).ok()?.header {
        HeaderRef::Envelope(e) => Some((e.message_id.get(), e.sender.get())),
        HeaderRef::Receipt(r) => Some((r.receipt_id.get(), r.sender.get())),
        _ => None,
    }
}

impl Ledger {
    pub fn new(ttl_seconds_max: u32) -> Ledger {
        Ledger {
            ttl_seconds_max,
            ..Ledger::default()
        }
    }

    /// A new message (or device list) id, never used before in the run.
    pub fn next_id(&mut self) -> MessageId {
        self.next_id += 1;
        MessageId((0xA7 << 96) | self.next_id)
    }

    /// Every device of every user, as their shards last said.
    pub fn devices(&self) -> Vec<DeviceAddress> {
        self.device_sets
            .iter()
            .flat_map(|(user, devices)| devices.iter().map(|d| user.device(*d)))
            .collect()
    }

    /// The user's device set, as its shard last said.
    pub fn devices_of(&self, user: &UserAddress) -> Vec<DeviceId> {
        self.device_sets.get(user).cloned().unwrap_or_default()
    }

    /// Records a broken rule (the first one is what the run reports).
    pub fn violated(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    pub fn take_violation(&mut self) -> Option<String> {
        self.violation.take()
    }

    /// A client wrote a new envelope or receipt.
    pub fn sent(&mut self, id: MessageId, sender: DeviceAddress, recipient: UserAddress, ttl: u32) {
        let message = Message {
            sender,
            recipient,
            ttl_seconds: ttl,
            copies: Vec::new(),
            promised: None,
            confirmed: false,
        };
        assert!(self.messages.insert(id, message).is_none(), "{id} reused");
    }

    /// A client read `Ack(Accepted)` for its message.
    pub fn confirmed(&mut self, id: MessageId) {
        if let Some(m) = self.messages.get_mut(&id)
            && !m.confirmed
        {
            m.confirmed = true;
            self.counts.confirmed += 1;
        }
    }

    /// A client read a refusal of one of its frames.
    pub fn refused(&mut self, code: u16) {
        *self.refusals.entry(code).or_default() += 1;
    }

    /// After shard `index` handled an input: what it did, read from its counters.
    pub fn handled(
        &mut self,
        index: u16,
        shard: &Shard,
        asked: Asked,
        before: ShardStats,
        now_ms: u64,
    ) {
        let after = shard.stats();
        let appended = shard.log().map_or(0, |l| l.appended());
        match asked {
            Asked::Routed { id, recipient } => {
                self.counts.duplicates += after.duplicates - before.duplicates;
                self.counts.refused_by_shard += after.refused - before.refused;
                if after.accepted > before.accepted {
                    self.queued(shard, id, recipient, appended, now_ms);
                } else if after.refused > before.refused {
                    self.not_queued(shard, id, recipient);
                }
            }
            Asked::DeviceAck { device, id } => {
                if after.released == before.released {
                    return;
                }
                self.counts.releases += 1;
                let release = Release {
                    epoch: self.epoch,
                    durable: false,
                };
                self.releases.insert((device, id), release);
                self.released_ever.insert((device, id));
                self.unstored_releases.push((index, appended, (device, id)));
            }
            Asked::DeviceSet { user } => self.observe_devices(user, shard),
            Asked::Other => {}
        }
    }

    /// A shard queued a copy of `id` for every device `recipient` has now. A resend is
    /// queued once: a second copy is allowed only after a crash lost the first (it was never
    /// stored), or after every device had released it for good before the crash, when its
    /// record may have been compacted away with the dedup entry recovery would rebuild from it
    /// (counted as `forgotten`).
    fn queued(
        &mut self,
        shard: &Shard,
        id: MessageId,
        recipient: UserAddress,
        lsn: u64,
        now_ms: u64,
    ) {
        let Some(message) = self.messages.get(&id) else {
            return self.violated(format!("a shard queued {id}, which no client sent"));
        };
        if let Some(previous) = message.copies.last() {
            if previous.epoch == self.epoch {
                return self.violated(format!(
                    "{id} was queued twice: its resend was not recognised as a duplicate"
                ));
            }
            if let Some(promised) = &message.promised {
                let gone_for_good = promised.targets.iter().all(|&(device, removals)| {
                    self.removals.get(&device).copied().unwrap_or(0) != removals
                        || self.releases.get(&(device, id)).is_some_and(|r| r.durable)
                        || promised.expires_at_ms <= now_ms
                });
                if !gone_for_good {
                    return self.violated(format!(
                        "{id} was acknowledged, then resent after a crash and queued again \
                         although its first copy was still in the log"
                    ));
                }
                self.counts.forgotten += 1;
            }
        }
        let targets: Vec<(DeviceAddress, u32)> = shard
            .devices_of(&recipient)
            .as_slice()
            .iter()
            .map(|&d| {
                let device = recipient.device(d);
                (device, self.removals.get(&device).copied().unwrap_or(0))
            })
            .collect();
        let ttl = u64::from(message.ttl_seconds.clamp(1, self.ttl_seconds_max));
        let copy = QueuedCopy {
            epoch: self.epoch,
            order: self.next_order,
            lsn,
            targets,
            expires_at_ms: now_ms + ttl * 1000,
        };
        if let Some(message) = self.messages.get_mut(&id) {
            message.copies.push(copy);
        }
        self.next_order += 1;
        self.counts.queued += 1;
    }

    /// A shard refused `id`: unless an earlier copy is queued, no queue holds it.
    fn not_queued(&mut self, shard: &Shard, id: MessageId, recipient: UserAddress) {
        if self.messages.get(&id).is_some_and(|m| !m.copies.is_empty()) {
            return;
        }
        for &d in shard.devices_of(&recipient).as_slice() {
            let device = recipient.device(d);
            if shard.queued(&device).iter().any(|q| q.1 == id) {
                return self.violated(format!("{id} was refused and queued for {device} anyway"));
            }
        }
    }

    /// Notes the user's device set as its shard has it now; devices gone count a removal.
    fn observe_devices(&mut self, user: UserAddress, shard: &Shard) {
        let now: Vec<DeviceId> = shard.devices_of(&user).as_slice().to_vec();
        let before = self
            .device_sets
            .insert(user, now.clone())
            .unwrap_or_default();
        for gone in before.iter().filter(|d| !now.contains(d)) {
            let device = user.device(*gone);
            *self.removals.entry(device).or_default() += 1;
            // Back later, it starts a new queue from position 1.
            self.written.remove(&device);
        }
    }

    /// Checks one output of shard `index` as it leaves the shard.
    pub fn output(&mut self, index: u16, shard: &Shard, output: &ShardOutput) {
        match output {
            ShardOutput::Ack {
                of: AckOf::Routed,
                id,
                result: Ok(()),
                ..
            } => self.accepted(shard, index, *id),
            ShardOutput::Deliver {
                device,
                seq,
                frame,
                ephemeral: false,
                ..
            } => self.delivered(*device, *seq, frame),
            ShardOutput::Deliver {
                device,
                frame,
                ephemeral: true,
                ..
            } => {
                if !matches!(decode(frame).map(|f| f.header), Ok(HeaderRef::Signal(_))) {
                    self.violated(format!("an ephemeral delivery to {device} is not a signal"));
                }
            }
            ShardOutput::Close { conn, code } => {
                self.violated(format!("shard {index} closed {conn:?} with {code}"))
            }
            ShardOutput::Send { .. } | ShardOutput::Applied { .. } => self.violated(format!(
                "shard {index} answered a control change nobody made"
            )),
            ShardOutput::Ack { .. } | ShardOutput::Load { .. } => {}
        }
    }

    fn accepted(&mut self, shard: &Shard, index: u16, id: MessageId) {
        let epoch = self.epoch;
        let committed = shard.log().map_or(0, |l| l.committed());
        let Some(message) = self.messages.get_mut(&id) else {
            return self.violated(format!("shard {index} accepted {id}, which no client sent"));
        };
        let Some(copy) = message.copies.last().cloned() else {
            return self.violated(format!("shard {index} accepted {id} and never queued it"));
        };
        if copy.epoch == epoch && copy.lsn > committed {
            return self.violated(format!(
                "shard {index} acknowledged {id} before storing it: its record ends at log \
                 position {}, committed is {committed}",
                copy.lsn
            ));
        }
        if message.promised.is_none() {
            self.counts.promised += 1;
        }
        // A later copy (queued again after a crash) is what the relay promises now.
        if message
            .promised
            .as_ref()
            .is_none_or(|p| p.order < copy.order)
        {
            message.promised = Some(copy);
        }
    }

    fn delivered(&mut self, device: DeviceAddress, seq: u64, frame: &Bytes) {
        let Some((id, sender)) = inner_message(frame) else {
            return self.violated(format!(
                "a delivery to {device} holds no envelope or receipt"
            ));
        };
        self.counts.delivered += 1;
        let Some(message) = self.messages.get(&id) else {
            return self.violated(format!("{id} delivered to {device}; no client sent it"));
        };
        if message.sender != sender {
            return self.violated(format!("{id} delivered with sender {sender}"));
        }
        let queued_for = |c: &QueuedCopy| c.targets.iter().any(|(d, _)| *d == device);
        if !message.copies.iter().any(queued_for) {
            return self.violated(format!(
                "{id} delivered to {device}, which no shard queued it for (a refused frame, or a \
                 device added after it)"
            ));
        }
        if let Some(copy) = message.copies.last() {
            let order = copy.order;
            self.check_queue_order(device, seq, order, id);
        }
        let Some(message) = self.messages.get(&id) else {
            return;
        };
        let requeued_since = |release: &Release| {
            message
                .copies
                .last()
                .is_some_and(|c| c.epoch > release.epoch)
        };
        if let Some(release) = self.releases.get(&(device, id))
            && (release.durable || release.epoch == self.epoch)
            && !requeued_since(release)
        {
            let how = if release.durable {
                "its release was stored"
            } else {
                "in the same run of the relay"
            };
            self.violated(format!(
                "{id} delivered to {device} again after the device acknowledged it ({how})"
            ));
        }
    }

    /// A device's queue is in the order its messages were queued (accepted): queue positions
    /// and queue order agree, and a position holds one message.
    fn check_queue_order(&mut self, device: DeviceAddress, seq: u64, order: u64, id: MessageId) {
        let written = self.written.entry(device).or_default();
        if let Some(&(_, other)) = written.get(&seq) {
            if other != id {
                return self.violated(format!("{device}: seq {seq} holds {other} and {id}"));
            }
            return;
        }
        let before = written.range(..seq).next_back().map(|(_, &(o, _))| o);
        let after = written.range(seq + 1..).next().map(|(_, &(o, _))| o);
        written.insert(seq, (order, id));
        if before.is_some_and(|o| o > order) || after.is_some_and(|o| o < order) {
            self.violated(format!(
                "{device}: {id} at seq {seq} is out of the order its messages were accepted in"
            ));
        }
    }

    /// Shard `index` stored its log up to `lsn`: releases up to there survive a crash.
    pub fn committed(&mut self, index: u16, lsn: u64) {
        let epoch = self.epoch;
        let releases = &mut self.releases;
        self.unstored_releases.retain(|&(shard, at, key)| {
            if shard != index || at > lsn {
                return true;
            }
            if let Some(release) = releases.get_mut(&key)
                && release.epoch == epoch
            {
                release.durable = true;
            }
            false
        });
    }

    /// The relay crashed: what was not stored may be gone.
    pub fn crashed(&mut self) {
        self.epoch += 1;
        self.counts.crashes += 1;
        self.unstored_releases.clear();
        self.releases.retain(|_, r| r.durable);
        // Positions of frames lost in the crash are given again.
        self.written.clear();
    }

    /// Shard `index` was rebuilt from its disk: every message it acknowledged is queued
    /// again for every device that has not released it (unless its TTL ran out or the device
    /// was removed), and nothing released for good is back.
    pub fn recovered(&mut self, index: u16, shard: &Shard, shards: u16, now_ms: u64) {
        let users: Vec<UserAddress> = self
            .device_sets
            .keys()
            .filter(|u| shard_of(u, shards) == index)
            .copied()
            .collect();
        for &user in &users {
            self.observe_devices(user, shard);
        }
        let mut queued: BTreeMap<DeviceAddress, BTreeSet<MessageId>> = BTreeMap::new();
        for &user in &users {
            for &d in shard.devices_of(&user).as_slice() {
                let device = user.device(d);
                let ids = shard.queued(&device).into_iter().map(|(_, id, _)| id);
                queued.insert(device, ids.collect());
            }
        }
        let mut lost = None;
        for (id, message) in &self.messages {
            let Some(promise) = &message.promised else {
                continue;
            };
            if shard_of(&message.recipient, shards) != index || promise.expires_at_ms <= now_ms {
                continue;
            }
            for &(device, removals) in &promise.targets {
                let removed = self.removals.get(&device).copied().unwrap_or(0) != removals;
                if removed || self.released_ever.contains(&(device, *id)) {
                    continue;
                }
                if !queued.get(&device).is_some_and(|q| q.contains(id)) {
                    lost.get_or_insert(format!(
                        "{id} was acknowledged and is lost: after the crash it is not in the \
                         queue of {device} on shard {index}"
                    ));
                }
            }
        }
        if let Some(lost) = lost {
            self.violated(lost);
        }
        for (device, ids) in &queued {
            for id in ids {
                // Queued again since (a resend the relay had forgotten) is a new copy.
                let last_queued = self.messages.get(id).and_then(|m| m.copies.last());
                let back = self
                    .releases
                    .get(&(*device, *id))
                    .is_some_and(|r| r.durable && last_queued.is_none_or(|c| c.epoch <= r.epoch));
                if back {
                    self.violated(format!(
                        "{id} is back in the queue of {device} after a crash although its \
                         release was stored"
                    ));
                }
            }
        }
    }

    /// A device's client read a delivery of `id` on connection `conn` (a repeat is fine:
    /// the client dedups). On one connection, what a device reads for the first time there
    /// comes in queue order, sender by sender; across connections (the device's own session
    /// and its server's, one after the other) a frame written on the old one may be read
    /// after newer ones on the new one.
    pub fn read_by_client(&mut self, conn: ConnId, device: DeviceAddress, id: MessageId) {
        if self.seen.entry(device).or_default().insert(id) {
            self.counts.first_reads += 1;
        }
        if !self.seen_on.entry((conn, device)).or_default().insert(id) {
            return;
        }
        let Some(message) = self.messages.get(&id) else {
            return self.violated(format!("{device} read {id}, which no client sent"));
        };
        let Some(copy) = message.copies.last() else {
            return self.violated(format!("{device} read {id}, which no shard queued"));
        };
        let last = self
            .last_order
            .entry((conn, device, message.sender))
            .or_insert(0);
        if copy.order < *last {
            return self.violated(format!(
                "order broken on {device}: on {conn:?} it read {id} from {} after a message \
                 queued later",
                message.sender
            ));
        }
        *last = copy.order;
    }

    /// At the end, all faults healed and everything drained: every acknowledged message has
    /// been read by every device it was queued for, unless its TTL ran out or the device
    /// was removed.
    pub fn check_all_arrived(&mut self, now_ms: u64) {
        let mut missing = None;
        for (id, message) in &self.messages {
            let Some(promise) = &message.promised else {
                continue;
            };
            for &(device, removals) in &promise.targets {
                let removed = self.removals.get(&device).copied().unwrap_or(0) != removals;
                let read = self.seen.get(&device).is_some_and(|s| s.contains(id));
                if !read && !removed && promise.expires_at_ms > now_ms {
                    missing.get_or_insert(format!(
                        "{id} from {} was acknowledged and never reached {device}",
                        message.sender
                    ));
                }
            }
        }
        if let Some(missing) = missing {
            self.violated(missing);
        }
    }
}
