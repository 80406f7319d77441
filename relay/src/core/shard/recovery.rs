//! Rebuilding a shard from its log segments at start: each record replayed into the queues
//! through the same bookkeeping the live shard uses. The segment store is a trait so that the
//! same code runs on the real directory and on the simulated disks of the tests.
//!
//! Damage is never skipped silently. A torn tail of the last segment (a crash in the middle
//! of a write, never acknowledged) is cut off. Anything else (a damaged record in the middle,
//! a segment other than the last that ends inside a record) quarantines the segment: every
//! record of it the scanner can prove intact is replayed, including those after a damaged
//! record whose end is proven (see `Scanner::skip_damaged`); what of it is still queued is
//! appended to a new segment and made durable before recovery returns, and only then is the
//! damaged segment moved aside. A crash at any point of this leaves either the damaged
//! segment in place (replayed again) or its rescued records stored.

use std::collections::BTreeSet;
use std::io;

use bytes::Bytes;

use super::Shard;
use crate::core::log::ShardLog;
use crate::core::queue::Queued;
use crate::core::wal::{Record, ScanStop, Scanner};
use crate::limits::RelayLimits;

/// Where a shard's segments live.
pub trait SegmentStore {
    /// Segment ids, ascending.
    fn list(&mut self) -> io::Result<Vec<u64>>;
    fn read(&mut self, id: u64) -> io::Result<Bytes>;
    /// Cuts a torn tail off.
    fn truncate(&mut self, id: u64, len: u64) -> io::Result<()>;
    /// Appends `bytes` to segment `id` (a new one) and makes them durable: what recovery
    /// rescued from a damaged segment, stored before the relay takes any traffic.
    fn append_durably(&mut self, id: u64, bytes: &[u8]) -> io::Result<()>;
    /// Deletes a segment whose live records recovery stored again elsewhere.
    fn remove(&mut self, id: u64) -> io::Result<()>;
    /// Moves a damaged segment aside, where an operator can inspect it; it is never read again.
    fn quarantine(&mut self, id: u64) -> io::Result<()>;
}

/// A stretch of a damaged segment that could not be read as records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    pub offset: usize,
    /// Where reading went on (`resumed`), or the segment's end.
    pub end: usize,
    /// What was wrong: a `Damage` name, or "cut short" (a sealed segment ends in a record).
    pub what: &'static str,
    pub resumed: bool,
}

/// A segment recovery quarantined, and what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSegment {
    pub segment: u64,
    pub bytes: u64,
    /// Intact records read from it.
    pub records: u64,
    /// Queued frames whose record it held: rewritten to a new segment and stored.
    pub frames: u64,
    pub ranges: Vec<DamagedRange>,
}

impl DamagedSegment {
    /// Bytes that could not be read as records.
    pub fn lost_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| (r.end - r.offset) as u64).sum()
    }
}

/// What recovery found, for the log line and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    /// Frames back in queues (one per target device).
    pub restored_frames: u64,
    /// Frames whose TTL ran out while the relay was down.
    pub expired: u64,
    /// (segment, offset) of each torn tail cut off.
    pub torn_tails: Vec<(u64, usize)>,
    /// (segment, offset of its first damage) of each damaged segment moved aside.
    pub quarantined: Vec<(u64, usize)>,
    /// The same segments in detail.
    pub damaged: Vec<DamagedSegment>,
    /// Older segments that held what a damaged one released: rewritten and deleted.
    pub rewritten: Vec<u64>,
    /// Bytes of rescued records appended and made durable before recovery returned.
    pub rescued_bytes: u64,
}

/// How the scan of one segment ended.
struct SegmentScan {
    records: u64,
    ranges: Vec<DamagedRange>,
    torn_at: Option<usize>,
}

impl Shard {
    /// Replays every segment in `store` into a new shard that logs to a fresh segment after
    /// them. Records up to a torn tail of the last segment are kept and the tail is cut; a
    /// damaged segment is replayed as far as it can be read, its live records are stored
    /// again at the head of the log, and it is quarantined (see the module comment).
    pub fn recover(
        limits: RelayLimits,
        segment_bytes_max: u64,
        store: &mut dyn SegmentStore,
        now_ms: u64,
    ) -> io::Result<(Shard, RecoveryReport)> {
        let ids = store.list()?;
        let first_new = ids.last().map_or(1, |last| last + 1);
        let mut shard = Shard::with_log(limits, ShardLog::new(first_new, segment_bytes_max));
        let mut report = RecoveryReport::default();
        for id in &ids {
            let id = *id;
            let bytes = store.read(id)?;
            report.segments += 1;
            shard.adopt_segment(id, bytes.len() as u64);
            let mut scan = shard.replay_segment(id, &bytes, now_ms, &mut report);
            let mut kept = bytes.len();
            match scan.torn_at {
                // Only the last segment can be torn by a crash: the one before it was synced
                // whole before the next was begun.
                Some(offset) if Some(&id) != ids.last() => scan.ranges.push(DamagedRange {
                    offset,
                    end: bytes.len(),
                    what: "cut short",
                    resumed: false,
                }),
                Some(offset) => {
                    kept = offset;
                    // A damaged one goes aside whole, torn tail and all.
                    if scan.ranges.is_empty() {
                        report.torn_tails.push((id, offset));
                        store.truncate(id, offset as u64)?;
                    }
                }
                None => {}
            }
            report.bytes += kept as u64;
            shard.adopt_segment(id, kept as u64);
            if let Some(first) = scan.ranges.first() {
                report.quarantined.push((id, first.offset));
                shard.fill_from_segment(id, &bytes);
                report.damaged.push(DamagedSegment {
                    segment: id,
                    bytes: bytes.len() as u64,
                    records: scan.records,
                    frames: 0,
                    ranges: scan.ranges,
                });
            }
        }
        for damaged in &mut report.damaged {
            damaged.frames = shard
                .log
                .as_ref()
                .and_then(|log| log.segments().get(&damaged.segment))
                .map_or(0, |s| s.live_frames);
            shard.rewrite_segment(damaged.segment, now_ms);
        }
        // What a quarantined segment released or superseded in older segments would come back
        // with them on the next start: they are rewritten too, and deleted.
        report.rewritten = shard.referred_by_damaged(&report.damaged);
        for &older in &report.rewritten {
            let bytes = store.read(older)?;
            shard.fill_from_segment(older, &bytes);
            shard.rewrite_segment(older, now_ms);
            report.rescued_bytes += shard.store_rescued(store)?;
        }
        report.rescued_bytes += shard.store_rescued(store)?;
        if let Some(log) = shard.log.as_mut() {
            log.seal();
        }
        // Stored first, removed after, oldest first: a crash in between replays the old and
        // damaged segments again, their rewritten copies are recognised as such, and no
        // release is lost before what it released.
        for &older in &report.rewritten {
            store.remove(older)?;
            shard.forget_segment(older);
        }
        for damaged in &report.damaged {
            store.quarantine(damaged.segment)?;
            shard.forget_segment(damaged.segment);
        }
        shard.finish_recovery(now_ms);
        Ok((shard, report))
    }

    /// The segments older than the damaged ones that hold something they released or
    /// superseded, and what those refer to in turn, ascending.
    fn referred_by_damaged(&self, damaged: &[DamagedSegment]) -> Vec<u64> {
        let Some(log) = self.log.as_ref() else {
            return Vec::new();
        };
        let segments = log.segments();
        let is_damaged = |id: &u64| damaged.iter().any(|d| d.segment == *id);
        let mut found = BTreeSet::new();
        let mut todo: Vec<u64> = damaged.iter().map(|d| d.segment).collect();
        while let Some(id) = todo.pop() {
            let Some(stats) = segments.get(&id) else {
                continue;
            };
            for &older in &stats.refs {
                if segments.contains_key(&older) && !is_damaged(&older) && found.insert(older) {
                    todo.push(older);
                }
            }
        }
        found.into_iter().collect()
    }

    /// Recovery removed segment `id` from the store.
    fn forget_segment(&mut self, id: u64) {
        if let Some(log) = self.log.as_mut() {
            log.forget(id);
        }
    }

    /// Replays the records of segment `id` that can be read, past damaged ones where their
    /// end is proven.
    fn replay_segment(
        &mut self,
        id: u64,
        bytes: &Bytes,
        now_ms: u64,
        report: &mut RecoveryReport,
    ) -> SegmentScan {
        let mut scan = SegmentScan {
            records: 0,
            ranges: Vec::new(),
            torn_at: None,
        };
        let mut scanner = Scanner::new(bytes);
        loop {
            match scanner.next() {
                Ok(Some((_, record))) => {
                    scan.records += 1;
                    report.records += 1;
                    self.replay(id, bytes, record, now_ms, report);
                }
                Ok(None) => return scan,
                Err(ScanStop::TornTail { offset }) => {
                    scan.torn_at = Some(offset);
                    return scan;
                }
                Err(ScanStop::Corrupt { offset, damage }) => {
                    let resumed = scanner.skip_damaged();
                    scan.ranges.push(DamagedRange {
                        offset,
                        end: resumed.unwrap_or(bytes.len()),
                        what: damage.name(),
                        resumed: resumed.is_some(),
                    });
                    if resumed.is_none() {
                        return scan;
                    }
                }
            }
        }
    }

    /// Writes what recovery appended (the rescued records) through `store`, durably. Returns
    /// the bytes stored.
    fn store_rescued(&mut self, store: &mut dyn SegmentStore) -> io::Result<u64> {
        let mut stored = 0;
        while let Some(write) = self.take_log_write() {
            for (segment, chunk) in &write.chunks {
                store.append_durably(*segment, chunk)?;
                stored += chunk.len() as u64;
            }
            self.on_log_committed(write.lsn);
        }
        Ok(stored)
    }

    /// Recovery found segment `id` holding `bytes`.
    fn adopt_segment(&mut self, id: u64, bytes: u64) {
        if let Some(log) = self.log.as_mut() {
            log.adopt(id, bytes);
        }
    }

    /// Applies one record read back from segment `segment` (whose bytes are `bytes`).
    fn replay(
        &mut self,
        segment: u64,
        bytes: &Bytes,
        record: Record<'_>,
        now_ms: u64,
        report: &mut RecoveryReport,
    ) {
        let Some(log) = self.log.as_mut() else { return };
        match record {
            Record::DeviceSet { user, devices } => {
                let state = self.dir.users.entry(user).or_default();
                let dropped = state.replace_devices(&devices);
                if let Some(previous) = state.device_set_segment {
                    log.add_ref(segment, previous);
                }
                let latest = (!devices.is_empty()).then_some(segment);
                log.move_device_set(state.device_set_segment, latest);
                state.device_set_segment = latest;
                if devices.is_empty() {
                    self.dir.users.remove(&user);
                }
                for item in &dropped {
                    Shard::left_queue(&mut self.stats, Some(&mut *log), item, Some(segment));
                    report.restored_frames -= 1;
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
                let state = self.dir.users.entry(recipient).or_default();
                for target in &targets {
                    let dev = state.device_or_new(target.device);
                    dev.next_seq = dev.next_seq.max(target.seq + 1);
                }
                if expires_at_ms <= now_ms {
                    report.expired += targets.len() as u64;
                    return;
                }
                // Where the frame sits in the segment, to read it back if it stays on disk.
                let offset =
                    (frame.as_ptr() as usize).saturating_sub(bytes.as_ptr() as usize) as u64;
                let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
                for target in &targets {
                    let Some(dev) = state.device_mut(target.device) else {
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
                    if dev.queue.contains_seq(target.seq) {
                        // A rewritten copy: the newest segment holds it now.
                        if let Some(queued) = dev.queue.find_seq_mut(target.seq) {
                            Shard::record_moved(log, queued, segment, offset);
                        }
                        continue;
                    }
                    Shard::entered_queue(&mut self.stats, Some(&mut *log), &item);
                    dev.queue.insert_sorted(item);
                    self.expiry.push(std::cmp::Reverse((
                        expires_at_ms,
                        recipient,
                        dev.id,
                        target.seq,
                    )));
                    report.restored_frames += 1;
                }
            }
            Record::Release { device, seq, .. } => {
                let Some(dev) = self.dir.device_mut(&device) else {
                    return;
                };
                if let Some(item) = dev.queue.remove_seq(seq) {
                    Shard::left_queue(&mut self.stats, Some(log), &item, Some(segment));
                    report.restored_frames -= 1;
                }
            }
        }
    }

    /// Recovery found segment `segment` damaged: before it is moved aside, the frames of it
    /// that stayed on disk are read from its bytes into memory, so they can be rewritten.
    fn fill_from_segment(&mut self, segment: u64, bytes: &Bytes) {
        let Some(log) = self.log.as_mut() else { return };
        for (_, queue) in self.dir.queues_mut() {
            for item in queue.iter_mut() {
                if item.segment != segment || item.frame.is_some() {
                    continue;
                }
                let start = usize::try_from(item.offset).unwrap_or(usize::MAX);
                let end = start.saturating_add(item.len as usize);
                if let Some(frame) = bytes.get(start..end) {
                    item.frame = Some(Bytes::copy_from_slice(frame));
                    self.stats.ram_bytes += item.bytes();
                    log.add_spilled(segment, -1);
                }
            }
        }
    }

    /// After the last record: forget dedup entries past their window, drop dead segments.
    fn finish_recovery(&mut self, now_ms: u64) {
        self.dedup.forget_expired(now_ms);
        // No device is connected yet: every queue may give up memory.
        let offline: Vec<_> = self
            .dir
            .queues()
            .filter(|(_, queue)| !queue.is_empty())
            .map(|(device, _)| device)
            .collect();
        self.dir.offline.extend(offline);
        if let Some(log) = self.log.as_mut() {
            log.collect_dead();
        }
        // Everything replayed was admitted once: it counts, and is never refused now.
        self.count_users_into_caps();
    }
}
