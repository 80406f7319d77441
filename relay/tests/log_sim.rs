//! The durable log on a simulated disk, deterministic: recovery rebuilds every queue exactly;
//! a tail torn at every byte offset, a failing sync, a full disk and damage in a middle segment
//! each end as they must; compaction keeps the disk proportional to what is queued; deleting
//! a device deletes its frames for good; frames spilled to the log come back byte for byte.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use bytes::Bytes;
use codec::*;
use relay::core::ConnId;
use relay::core::log::ShardLog;
use relay::core::shard::Shard;
use relay::core::shard::interface::{Routed, ShardInput, ShardOutput};
use relay::core::shard::recovery::{RecoveryReport, SegmentStore};
use relay::limits::RelayLimits;

/// A disk in memory: segments by id, an optional capacity, quarantined ids.
#[derive(Debug, Default, Clone)]
struct MemDisk {
    segments: BTreeMap<u64, Vec<u8>>,
    quarantined: BTreeSet<u64>,
    capacity: Option<usize>,
}

impl MemDisk {
    fn used(&self) -> usize {
        self.segments.values().map(Vec::len).sum()
    }
}

impl SegmentStore for MemDisk {
    fn list(&mut self) -> io::Result<Vec<u64>> {
        Ok(self.segments.keys().copied().collect())
    }
    fn read(&mut self, id: u64) -> io::Result<Bytes> {
        Ok(Bytes::from(
            self.segments.get(&id).cloned().unwrap_or_default(),
        ))
    }
    fn truncate(&mut self, id: u64, len: u64) -> io::Result<()> {
        if let Some(s) = self.segments.get_mut(&id) {
            s.truncate(len as usize);
        }
        Ok(())
    }
    fn append_durably(&mut self, id: u64, bytes: &[u8]) -> io::Result<()> {
        self.segments
            .entry(id)
            .or_default()
            .extend_from_slice(bytes);
        Ok(())
    }
    fn remove(&mut self, id: u64) -> io::Result<()> {
        self.segments.remove(&id);
        Ok(())
    }
    fn quarantine(&mut self, id: u64) -> io::Result<()> {
        self.segments.remove(&id);
        self.quarantined.insert(id);
        Ok(())
    }
}

const SENDER_CONN: ConnId = ConnId {
    core: 0,
    slot: 1,
    generation: 1,
};
const SEGMENT_BYTES: u64 = 4096;

fn limits() -> RelayLimits {
    RelayLimits {
        device_deliveries_in_flight_max: 1_000_000,
        ..RelayLimits::default()
    }
}

struct World {
    limits: RelayLimits,
    shard: Shard,
    disk: MemDisk,
    now_ms: u64,
    acks: Vec<(MessageId, Result<(), ErrorCode>)>,
    delivered: Vec<(DeviceAddress, Bytes)>,
    next_id: u128,
    /// The exact bytes of every envelope handed to the shard.
    sent: BTreeMap<MessageId, Bytes>,
}

fn user(n: u32) -> UserAddress {
    UserAddress::new(NetworkId(2), UserId(u128::from(n)))
}

impl World {
    fn new() -> World {
        World::with_limits(limits())
    }

    fn with_limits(limits: RelayLimits) -> World {
        World {
            limits,
            shard: Shard::with_log(limits, ShardLog::new(1, SEGMENT_BYTES)),
            disk: MemDisk::default(),
            now_ms: 1_000_000,
            acks: Vec::new(),
            delivered: Vec::new(),
            next_id: 1,
            sent: BTreeMap::new(),
        }
    }

    /// The same disk and traffic, served by `shard` (e.g. one recovered from it).
    fn with_shard(&self, shard: Shard, disk: MemDisk) -> World {
        World {
            limits: self.limits,
            shard,
            disk,
            now_ms: self.now_ms,
            acks: Vec::new(),
            delivered: Vec::new(),
            next_id: self.next_id,
            sent: self.sent.clone(),
        }
    }

    /// The IO shell's part: write what the shard appended, "sync", report, delete.
    fn commit(&mut self) {
        if let Some(write) = self.shard.take_log_write() {
            let mut failed = false;
            for (segment, bytes) in &write.chunks {
                let full = self
                    .disk
                    .capacity
                    .is_some_and(|cap| self.disk.used() + bytes.len() > cap);
                if full {
                    failed = true;
                    break;
                }
                self.disk
                    .segments
                    .entry(*segment)
                    .or_default()
                    .extend_from_slice(bytes);
            }
            if failed {
                self.shard.on_log_failed();
            } else {
                self.shard.on_log_committed(write.lsn);
            }
        }
        for segment in self.shard.take_log_deletions() {
            self.disk.segments.remove(&segment);
        }
        loop {
            let mut progressed = false;
            while let Some(output) = self.shard.poll_output() {
                progressed = true;
                match output {
                    ShardOutput::Ack { id, result, .. } => {
                        self.acks.push((id, result.map_err(|r| r.code)))
                    }
                    ShardOutput::Deliver { device, frame, .. } => {
                        self.delivered.push((device, frame))
                    }
                    ShardOutput::Load {
                        device,
                        seq,
                        segment,
                        offset,
                        len,
                    } => {
                        // The IO shell's loader: read the frame back from its segment,
                        // unless it was released since it was asked for.
                        if !self.shard.wants_load(&device, seq) {
                            continue;
                        }
                        let Some(bytes) = self.disk.segments.get(&segment) else {
                            panic!(
                                "a load of {device} seq {seq} from segment {segment}, which is gone; on disk: {:?}; log: {:?}",
                                self.disk.segments.keys().collect::<Vec<_>>(),
                                self.shard.log().map(|l| l
                                    .segments()
                                    .iter()
                                    .map(|(id, s)| (*id, s.live_frames, s.spilled))
                                    .collect::<Vec<_>>())
                            );
                        };
                        let frame = Bytes::copy_from_slice(
                            &bytes[offset as usize..offset as usize + len as usize],
                        );
                        self.shard.on_loaded(device, seq, Some(frame));
                    }
                    ShardOutput::Close { .. }
                    | ShardOutput::Send { .. }
                    | ShardOutput::Applied { .. } => {}
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn handle(&mut self, input: ShardInput) {
        self.shard.handle(self.now_ms, input);
    }

    fn devices(&mut self, u: u32, devices: &[u32]) {
        let devices = devices.iter().map(|&d| DeviceId(d)).collect();
        self.handle(ShardInput::DeviceList {
            request_id: MessageId(0),
            user: user(u),
            devices,
            reply_to: SENDER_CONN,
        });
    }

    fn send(&mut self, u: u32, ttl_seconds: u32) -> MessageId {
        let id = MessageId(self.next_id);
        self.next_id += 1;
        let sender = DeviceAddress::new(NetworkId(1), UserId(9), DeviceId(1));
        let envelope = Envelope {
            message_id: id,
            sender,
            recipient: user(u),
            devices: DeviceSelection::All,
            content_type: ContentType::Text,
            e2e_protocol: E2eProtocol::Signal,
            timestamp_ms: self.now_ms,
            ttl_seconds,
            flags: 0,
        };
        let frame = encode_to_bytes(&envelope, &[id.0 as u8; 100]).unwrap();
        self.sent.insert(id, frame.clone());
        let routed = Routed {
            sender,
            recipient: user(u),
            listed: None,
            id,
            ephemeral: false,
            ttl_seconds,
            frame,
            reply_to: SENDER_CONN,
        };
        self.handle(ShardInput::Envelope(routed));
        id
    }

    fn ack(&mut self, u: u32, d: u32, id: MessageId) {
        self.handle(ShardInput::DeviceAck {
            device: user(u).device(DeviceId(d)),
            id,
        });
    }

    fn recover(&self, disk: &mut MemDisk) -> (Shard, RecoveryReport) {
        Shard::recover(self.limits, SEGMENT_BYTES, disk, self.now_ms).unwrap()
    }

    /// Connects every device of `users` and lets each receive and acknowledge its whole
    /// queue, which must be `expected` (ids per device, in order): every frame delivered,
    /// spilled and read back or not, is byte for byte the envelope that was sent.
    fn deliver_everything(&mut self, expected: &BTreeMap<DeviceAddress, Vec<MessageId>>) {
        let mut received: BTreeMap<DeviceAddress, usize> = BTreeMap::new();
        for (slot, device) in expected.keys().enumerate() {
            let conn = ConnId {
                core: 0,
                slot: 100 + slot as u32,
                generation: 1,
            };
            self.handle(ShardInput::AttachDevice {
                device: *device,
                conn,
            });
        }
        loop {
            self.commit();
            let batch = std::mem::take(&mut self.delivered);
            if batch.is_empty() {
                break;
            }
            for (device, frame) in batch {
                let n = received.entry(device).or_default();
                let Some(&id) = expected.get(&device).and_then(|ids| ids.get(*n)) else {
                    panic!("{device}: an unexpected delivery after {n} frames");
                };
                assert!(
                    frame == self.sent[&id],
                    "{device}: frame {n} ({id}) is not the bytes that were sent"
                );
                *n += 1;
                self.handle(ShardInput::DeviceAck { device, id });
            }
        }
        for (device, ids) in expected {
            assert_eq!(
                received.get(device).copied().unwrap_or(0),
                ids.len(),
                "{device}: frames missing"
            );
        }
        assert_eq!(self.shard.stats().queued_frames, 0);
    }

    fn accepted(&self) -> Vec<MessageId> {
        self.acks
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(id, _)| *id)
            .collect()
    }
}

/// (user, device, its queue as (seq, id, frame)).
type Snapshot = Vec<(u32, u32, Vec<(u64, MessageId, Bytes)>)>;

fn snapshot(shard: &Shard, users: u32, devices: u32) -> Snapshot {
    let mut out = Vec::new();
    for u in 0..users {
        for d in 1..=devices {
            out.push((u, d, shard.queued(&user(u).device(DeviceId(d)))));
        }
    }
    out
}

use devkit::sim::SimRng as Rng;

/// Random traffic, then a crash (the shard is dropped, only the disk survives): the
/// recovered shard holds exactly the same queues. Many seeds.
#[test]
fn recovery_rebuilds_every_queue_exactly() {
    devkit::sim::for_each_seed(300, |seed| {
        let mut rng = Rng::new(seed);
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("seed {seed}");
        }
        // Every other seed runs with a memory budget of a few frames: frames spill and
        // come back from the log.
        let spilling = seed % 2 == 0;
        let mut w = if spilling {
            World::with_limits(RelayLimits {
                shard_ram_bytes_max: 1500,
                ..limits()
            })
        } else {
            World::new()
        };
        for u in 0..8 {
            w.devices(u, &[1, 2]);
        }
        let mut sent: Vec<(u32, MessageId)> = Vec::new();
        for step in 0..400 {
            match rng.below(10) {
                0..=4 => {
                    let u = rng.below(8) as u32;
                    let ttl = if rng.below(10) == 0 { 1 } else { 3600 };
                    let id = w.send(u, ttl);
                    sent.push((u, id));
                }
                5..=7 => {
                    if !sent.is_empty() {
                        let (u, id) = sent[rng.below(sent.len() as u64) as usize];
                        w.ack(u, 1 + rng.below(2) as u32, id);
                    }
                }
                8 => {
                    let u = rng.below(8) as u32;
                    let set: &[u32] = match rng.below(3) {
                        0 => &[1],
                        1 => &[1, 2],
                        _ => &[2, 3],
                    };
                    w.devices(u, set);
                }
                _ => {
                    w.now_ms += rng.below(1500);
                    w.shard.handle_timeout(w.now_ms);
                }
            }
            if rng.below(3) == 0 {
                w.commit();
            }
            if let Err(e) = w.shard.audit() {
                panic!("seed {seed}, step {step}: {e}");
            }
        }
        w.commit();
        // A few compaction ticks (the relay runs one every 100 ms), within the TTLs.
        for _ in 0..8 {
            w.shard.handle_timeout(w.now_ms);
            w.commit();
        }
        let before = snapshot(&w.shard, 8, 3);
        let mut disk = w.disk.clone();
        let (recovered, report) = w.recover(&mut disk);
        let after = snapshot(&recovered, 8, 3);
        for (b, a) in before.iter().zip(&after) {
            let ids = |q: &Vec<(u64, MessageId, Bytes)>| {
                q.iter()
                    .map(|(seq, id, _)| (*seq, id.0))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                ids(&b.2),
                ids(&a.2),
                "seed {seed}: queue of user {} device {} differs after recovery",
                b.0,
                b.1
            );
        }
        if !spilling {
            assert_eq!(before, after, "seed {seed}: frames differ after recovery");
        }
        assert!(
            report.torn_tails.is_empty() && report.quarantined.is_empty(),
            "seed {seed}: {report:?}"
        );
        // Disk use follows what is queued: a segment is rewritten once under a quarter of it is
        // live, so the disk holds about four times the live records at most, plus the head
        // segments and those waiting on a reload or a reference.
        let live: usize = before
            .iter()
            .flat_map(|(_, _, q)| q.iter().map(|(_, _, f)| f.len() + 100))
            .sum();
        assert!(
            w.disk.used() <= 5 * live + 8 * SEGMENT_BYTES as usize,
            "seed {seed}: {} bytes on disk for {live} live",
            w.disk.used()
        );
        // Both shards deliver every queued frame as the exact bytes sent, those held only on
        // disk read back from it. The recovered one first: the live one deletes segments.
        let expected: BTreeMap<DeviceAddress, Vec<MessageId>> = before
            .iter()
            .filter(|(_, _, q)| !q.is_empty())
            .map(|(u, d, q)| {
                let ids = q.iter().map(|(_, id, _)| *id).collect();
                (user(*u).device(DeviceId(*d)), ids)
            })
            .collect();
        let recovered = w.with_shard(recovered, disk);
        let shard = std::mem::replace(&mut w.shard, Shard::new(limits()));
        let live = w.with_shard(shard, w.disk.clone());
        for mut world in [recovered, live] {
            let stats = world.shard.stats();
            world.deliver_everything(&expected);
            if stats.ram_bytes < stats.queued_bytes {
                assert!(
                    world.shard.stats().loads > stats.loads,
                    "seed {seed}: spilled frames delivered without a load"
                );
            }
        }
    });
}

/// Nothing is acknowledged before its record is stored, and everything acknowledged is
/// recovered.
#[test]
fn acks_wait_for_the_log() {
    let mut w = World::new();
    w.devices(0, &[1]);
    w.commit();
    let id = w.send(0, 3600);
    while let Some(output) = w.shard.poll_output() {
        assert!(
            !matches!(output, ShardOutput::Ack { id: acked, .. } if acked == id),
            "acked before stored"
        );
    }
    w.commit();
    assert_eq!(w.accepted().last(), Some(&id));
    let (recovered, _) = w.recover(&mut w.disk.clone());
    assert_eq!(recovered.queued(&user(0).device(DeviceId(1))).len(), 1);
}

/// A crash can tear the last write at any byte: recovery cuts the torn record, keeps
/// everything before it, and never resurrects half a record.
#[test]
fn a_tail_torn_at_every_byte_offset() {
    let mut w = World::new();
    w.devices(0, &[1]);
    let first = w.send(0, 3600);
    w.commit();
    let segment = *w.disk.segments.keys().last().unwrap();
    let stable = w.disk.segments[&segment].len();
    let second = w.send(0, 3600);
    w.commit();
    let full = w.disk.segments[&segment].len();
    assert!(full > stable);
    for cut in stable..full {
        let mut disk = w.disk.clone();
        disk.segments.get_mut(&segment).unwrap().truncate(cut);
        let (recovered, report) = w.recover(&mut disk);
        let ids: Vec<MessageId> = recovered
            .queued(&user(0).device(DeviceId(1)))
            .iter()
            .map(|q| q.1)
            .collect();
        if cut == stable {
            assert!(report.torn_tails.is_empty());
        } else {
            assert_eq!(report.torn_tails, vec![(segment, stable)], "cut at {cut}");
        }
        assert_eq!(ids, vec![first], "cut at {cut}");
        assert_eq!(
            disk.segments[&segment].len(),
            stable,
            "the torn tail is truncated"
        );
    }
    let (recovered, _) = w.recover(&mut w.disk.clone());
    assert_eq!(
        recovered.queued(&user(0).device(DeviceId(1))).len(),
        2,
        "{second} is there when whole"
    );
}

/// fdatasync fails: the waiting acks turn into STORAGE_UNAVAILABLE and nothing more is
/// acknowledged.
#[test]
fn a_failing_sync_acknowledges_nothing() {
    let mut w = World::new();
    w.devices(0, &[1]);
    w.commit();
    let id = w.send(0, 3600);
    let _ = w.shard.take_log_write();
    w.shard.on_log_failed();
    w.commit();
    assert_eq!(
        w.acks.last(),
        Some(&(id, Err(ErrorCode::StorageUnavailable)))
    );
    let later = w.send(0, 3600);
    w.commit();
    assert_eq!(
        w.acks.last(),
        Some(&(later, Err(ErrorCode::StorageUnavailable)))
    );
    assert!(ErrorCode::StorageUnavailable.is_retryable());
}

/// The disk fills up: the write that does not fit fails, its acks are refused, and what was
/// acknowledged before is all recovered.
#[test]
fn a_full_disk_refuses_and_loses_nothing_acknowledged() {
    let mut w = World::new();
    w.disk.capacity = Some(3000);
    w.devices(0, &[1]);
    w.commit();
    for _ in 0..40 {
        w.send(0, 3600);
        w.commit();
    }
    let accepted = w.accepted();
    let refused = w
        .acks
        .iter()
        .filter(|(_, r)| *r == Err(ErrorCode::StorageUnavailable))
        .count();
    assert!(refused > 0, "the disk never filled");
    assert!(!accepted.is_empty());
    let (recovered, _) = w.recover(&mut w.disk.clone());
    let ids: Vec<MessageId> = recovered
        .queued(&user(0).device(DeviceId(1)))
        .iter()
        .map(|q| q.1)
        .collect();
    for id in accepted.iter().filter(|id| id.0 != 0) {
        assert!(ids.contains(id), "{id} was acknowledged and is lost");
    }
}

/// Damage in a middle segment: reported with its offset, quarantined, never silently skipped;
/// the other segments are replayed and what was live before the damage is kept.
#[test]
fn crc_damage_in_a_middle_segment_is_quarantined() {
    let mut w = World::new();
    w.devices(0, &[1]);
    for _ in 0..200 {
        w.send(0, 3600);
        w.commit();
    }
    let ids: Vec<u64> = w.disk.segments.keys().copied().collect();
    assert!(ids.len() >= 4, "{} segments", ids.len());
    let middle = ids[ids.len() / 2];
    let mut disk = w.disk.clone();
    let bytes = disk.segments.get_mut(&middle).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    let (recovered, report) = w.recover(&mut disk);
    assert_eq!(report.quarantined.len(), 1);
    assert_eq!(report.quarantined[0].0, middle);
    assert!(report.quarantined[0].1 <= at);
    assert!(disk.quarantined.contains(&middle));
    let queued = recovered.queued(&user(0).device(DeviceId(1))).len();
    assert!(
        queued < 200 && queued > 100,
        "{queued} frames recovered around the damage"
    );
    // What survived from the damaged segment was rewritten: a second crash keeps it.
    let mut w2 = w.with_shard(recovered, disk);
    w2.commit();
    let (twice, report2) = w2.recover(&mut w2.disk.clone());
    assert!(report2.quarantined.is_empty());
    assert_eq!(twice.queued(&user(0).device(DeviceId(1))).len(), queued);
}

/// Removing a device deletes its frames from the log: they never come back, even after the
/// segments holding them are compacted away.
#[test]
fn removed_devices_stay_removed() {
    let mut w = World::new();
    w.devices(0, &[1, 2]);
    for _ in 0..100 {
        w.send(0, 3600);
        w.commit();
    }
    w.devices(0, &[1]);
    w.commit();
    for n in 0..100 {
        let id = w.send(1, 3600);
        w.commit();
        if n % 2 == 0 {
            w.devices(1, &[1]);
        }
        w.ack(1, 1, id);
        w.commit();
        w.now_ms += 10;
        w.shard.handle_timeout(w.now_ms);
        w.commit();
    }
    let (recovered, _) = w.recover(&mut w.disk.clone());
    assert!(recovered.queued(&user(0).device(DeviceId(2))).is_empty());
    assert_eq!(recovered.queued(&user(0).device(DeviceId(1))).len(), 100);
    assert_eq!(recovered.devices_of(&user(0)).as_slice(), &[DeviceId(1)]);
}

/// Everything acknowledged and released: the log shrinks to a few segments.
#[test]
fn compaction_keeps_disk_proportional_to_what_is_queued() {
    let mut w = World::new();
    w.devices(0, &[1]);
    for _ in 0..2_000 {
        let id = w.send(0, 3600);
        w.commit();
        w.ack(0, 1, id);
        w.now_ms += 1;
        w.shard.handle_timeout(w.now_ms);
        w.commit();
    }
    assert!(
        w.disk.used() < 4 * SEGMENT_BYTES as usize,
        "{} bytes on disk with nothing queued",
        w.disk.used()
    );
    let (recovered, _) = w.recover(&mut w.disk.clone());
    assert!(recovered.queued(&user(0).device(DeviceId(1))).is_empty());
}

/// An offline device's backlog leaves memory once stored: the shard keeps at most its memory
/// budget, and the device still gets every frame, in order and byte for byte, read back from
/// the log when it connects; after a restart too.
#[test]
fn a_large_offline_backlog_is_spilled_and_read_back_in_order() {
    let budget = 10 * 300;
    let limits = RelayLimits {
        shard_ram_bytes_max: budget,
        ..limits()
    };
    let mut w = World::with_limits(limits);
    w.devices(0, &[1]);
    w.commit();
    let mut sent = Vec::new();
    for _ in 0..100 {
        sent.push(w.send(0, 3600));
        w.commit();
        assert!(
            w.shard.stats().ram_bytes <= budget + 300,
            "{} bytes in memory",
            w.shard.stats().ram_bytes
        );
    }
    assert!(
        w.shard.stats().spilled >= 80,
        "{} spilled",
        w.shard.stats().spilled
    );
    let device = user(0).device(DeviceId(1));
    // After a restart with the same budget, and in the running shard: both deliver all.
    let mut disk = w.disk.clone();
    let (recovered, _) = Shard::recover(limits, SEGMENT_BYTES, &mut disk, w.now_ms).unwrap();
    assert!(
        recovered.stats().ram_bytes <= budget,
        "{} bytes in memory after recovery",
        recovered.stats().ram_bytes
    );
    let mut after_restart = w.with_shard(recovered, disk);
    let expected = BTreeMap::from([(device, sent)]);
    for world in [&mut w, &mut after_restart] {
        world.deliver_everything(&expected);
        assert!(world.shard.stats().loads >= 80);
    }
}

/// The bytes on disk, pinned: a device set, an enqueue for two devices and a release, as the
/// shard writes them. Recorded before the targets went inline and the write buffer was
/// reused; neither may change the format that recovery reads.
#[test]
fn the_log_format_is_pinned() {
    let mut shard = Shard::with_log(limits(), ShardLog::new(1, SEGMENT_BYTES));
    let recipient = UserAddress::new(NetworkId(2), UserId(7));
    shard.handle(
        5,
        ShardInput::DeviceList {
            request_id: MessageId(1),
            user: recipient,
            devices: vec![DeviceId(1), DeviceId(3)],
            reply_to: SENDER_CONN,
        },
    );
    shard.handle(
        10,
        ShardInput::Envelope(Routed {
            sender: DeviceAddress::new(NetworkId(1), UserId(3), DeviceId(1)),
            recipient,
            listed: None,
            id: MessageId(99),
            ephemeral: false,
            ttl_seconds: 60,
            frame: Bytes::from_static(b"the whole frame, as received"),
            reply_to: SENDER_CONN,
        }),
    );
    shard.handle(
        11,
        ShardInput::DeviceAck {
            device: recipient.device(DeviceId(3)),
            id: MessageId(99),
        },
    );
    let write = shard.take_log_write().unwrap();
    let [(1, bytes)] = write.chunks.as_slice() else {
        panic!("{:?}", write.chunks)
    };
    assert_eq!(
        devkit::hex::hex(bytes),
        concat!(
            // DeviceSet
            "1e000000ab14d2c4010200000007000000000000000000000000000000020100000003000000",
            // Enqueue
            "86000000d9259450020a000000000000006aea00000000000001000000030000000000000000",
            "0000000000000001000000630000000000000000000000000000000200000007000000000000",
            "000000000000000000020100000001000000000000000300000001000000000000001c000000",
            "7468652077686f6c65206672616d652c206173207265636569766564",
            // Release
            "22000000a6cfc519030200000007000000000000000000000000000000030000000100000000",
            "00000000",
        )
    );
}
