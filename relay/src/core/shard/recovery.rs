//! Rebuilding a shard from its log segments at start: each record replayed into the queues
//! through the same bookkeeping the live shard uses. The segment store is a trait so that the
//! same code runs on the real directory and on the simulated disks of the tests.

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
    /// Moves a damaged segment aside, where an operator can inspect it; it is never read again.
    fn quarantine(&mut self, id: u64) -> io::Result<()>;
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
    /// (segment, offset) of each damaged segment moved aside.
    pub quarantined: Vec<(u64, usize)>,
}

impl Shard {
    /// Replays every segment in `store` into a new shard that logs to a fresh segment after
    /// them. Records up to a torn tail are kept and the tail is cut; a segment damaged in the
    /// middle is replayed up to the damage, reported and quarantined, and whatever of it is
    /// still live is rewritten to the head of the log so that it is durable again.
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
        let mut damaged = Vec::new();
        for id in ids {
            let bytes = store.read(id)?;
            report.segments += 1;
            let mut kept = bytes.len();
            shard.adopt_segment(id, kept as u64);
            let mut scanner = Scanner::new(&bytes);
            loop {
                match scanner.next() {
                    Ok(Some((_, record))) => {
                        report.records += 1;
                        shard.replay(id, &bytes, record, now_ms, &mut report);
                    }
                    Ok(None) => break,
                    Err(ScanStop::TornTail { offset }) => {
                        store.truncate(id, offset as u64)?;
                        report.torn_tails.push((id, offset));
                        kept = offset;
                        break;
                    }
                    Err(ScanStop::Corrupt { offset }) => {
                        shard.fill_from_segment(id, &bytes);
                        store.quarantine(id)?;
                        report.quarantined.push((id, offset));
                        damaged.push(id);
                        break;
                    }
                }
            }
            report.bytes += kept as u64;
            shard.adopt_segment(id, kept as u64);
        }
        for id in damaged {
            shard.rewrite_segment(id, now_ms);
        }
        shard.finish_recovery(now_ms);
        Ok((shard, report))
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
