//! The per-shard log's bookkeeping, sans-IO: records the shard appends wait here until the
//! IO shell takes them to write (and, at the `fsync` level, fdatasync); the shard holds its
//! `Ack`s until [`ShardLog::on_committed`] says their records are stored (group commit: one
//! sync covers everything appended before it). It also tracks what is still live in each
//! segment, so dead segments are deleted and mostly-dead ones rewritten: disk use follows
//! what is queued, not what passed through.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use smallvec::SmallVec;

use super::wal::{self, Record};

/// How far a frame is stored before the relay acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// No log: queues live in memory only (tests, benchmarks).
    Memory,
    /// Written to the log before the `Ack`; the OS flushes it to disk when it will.
    Os,
    /// On disk (fdatasync) before the `Ack`.
    #[default]
    Fsync,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Memory => "memory",
            Durability::Os => "os",
            Durability::Fsync => "fsync",
        }
    }
}

/// What one segment still holds that recovery would need.
#[derive(Debug, Default, Clone)]
pub struct SegmentStats {
    pub bytes: u64,
    /// Queued frames (per device) whose enqueue record is in this segment.
    pub live_frames: u64,
    pub live_bytes: u64,
    /// Users whose latest device set is recorded in this segment.
    pub device_sets: u64,
    /// Live frames of this segment held only on disk (spilled): they are read back before
    /// the segment is rewritten.
    pub spilled: u64,
    /// Older segments this one's releases and device-set changes refer to: while any of them
    /// exists, deleting this one would bring what it removed back on replay.
    pub refs: BTreeSet<u64>,
}

impl SegmentStats {
    fn is_dead(&self) -> bool {
        self.live_frames == 0 && self.device_sets == 0
    }
}

/// Records for the IO shell to write: per segment, in order; then sync; then
/// [`ShardLog::on_committed`] with `lsn`.
#[derive(Debug)]
pub struct LogWrite {
    /// Inline: a write spans two segments at most unless it is larger than a segment.
    pub chunks: SmallVec<[(u64, Bytes); 2]>,
    pub lsn: u64,
}

/// The size of a write buffer.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Where records wait to be taken, back to back. What is taken is split off the buffer, and
/// its memory is reused once the IO shell has dropped those chunks; a second buffer takes
/// turns with it, so that appending goes on without allocating while chunks of one are still
/// being written.
#[derive(Debug)]
struct WriteBuffer {
    buf: BytesMut,
    /// The allocation `buf` is in (0: none yet).
    size: usize,
    /// The other buffer, empty (or none yet).
    spare: BytesMut,
}

impl WriteBuffer {
    fn new() -> WriteBuffer {
        WriteBuffer {
            buf: BytesMut::with_capacity(WRITE_BUFFER_BYTES),
            size: WRITE_BUFFER_BYTES,
            spare: BytesMut::new(),
        }
    }

    /// Room for `additional` more bytes.
    fn reserve(&mut self, additional: usize) {
        if self.buf.try_reclaim(additional) {
            return;
        }
        let needed = self.buf.len() + additional;
        let (mut next, size) = if self.spare.try_reclaim(needed) {
            (std::mem::take(&mut self.spare), WRITE_BUFFER_BYTES)
        } else {
            // Doubling: a burst between two takes costs a few allocations, not one a record.
            let size = needed.max(WRITE_BUFFER_BYTES).next_power_of_two();
            (BytesMut::with_capacity(size), size)
        };
        next.extend_from_slice(&self.buf);
        let mut previous = std::mem::replace(&mut self.buf, next);
        // Only a buffer of the usual size is kept: one a burst grew goes with its chunks.
        if self.size == WRITE_BUFFER_BYTES {
            previous.clear();
            self.spare = previous;
        }
        self.size = size;
    }

    /// Splits off everything appended.
    fn take(&mut self) -> BytesMut {
        let taken = self.buf.split();
        if self.size > WRITE_BUFFER_BYTES {
            self.buf = BytesMut::new();
            self.size = 0;
        }
        taken
    }
}

#[derive(Debug)]
pub struct ShardLog {
    write: WriteBuffer,
    /// (segment, bytes of `write`) for each run of records appended to one segment, in order.
    pending: Vec<(u64, usize)>,
    /// Bytes appended since start (the log sequence number of the end of the log).
    appended: u64,
    committed: u64,
    current: u64,
    segment_bytes_max: u64,
    segments: BTreeMap<u64, SegmentStats>,
    /// Segments to delete once `committed` reaches the LSN (their live records were rewritten).
    retiring: Vec<(u64, u64)>,
    /// Segments the IO shell may delete now.
    deletable: Vec<u64>,
    failed: bool,
}

impl ShardLog {
    /// A log that appends to segment `first` (recovery sets it past every existing segment).
    pub fn new(first: u64, segment_bytes_max: u64) -> ShardLog {
        let mut segments = BTreeMap::new();
        segments.insert(first, SegmentStats::default());
        ShardLog {
            write: WriteBuffer::new(),
            pending: Vec::new(),
            appended: 0,
            committed: 0,
            current: first,
            segment_bytes_max: segment_bytes_max.max(1),
            segments,
            retiring: Vec::new(),
            deletable: Vec::new(),
            failed: false,
        }
    }

    pub fn current(&self) -> u64 {
        self.current
    }

    pub fn appended(&self) -> u64 {
        self.appended
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    pub fn segments(&self) -> &BTreeMap<u64, SegmentStats> {
        &self.segments
    }

    /// Registers a segment found by recovery.
    pub fn adopt(&mut self, id: u64, bytes: u64) {
        self.segments.entry(id).or_default().bytes = bytes;
    }

    /// Later records go to a new segment, if the current one holds any: recovery writes the
    /// current one itself and the IO shell then appends only to segments it began.
    pub fn seal(&mut self) {
        if self
            .segments
            .get(&self.current)
            .is_some_and(|s| s.bytes > 0)
        {
            self.current += 1;
            self.segments.insert(self.current, SegmentStats::default());
        }
    }

    /// Recovery deleted or quarantined segment `id`; nothing live refers to it any more.
    pub fn forget(&mut self, id: u64) {
        debug_assert!(id < self.current);
        self.segments.remove(&id);
        self.retiring.retain(|(_, segment)| *segment != id);
    }

    /// Appends a record; returns the segment it went to.
    pub fn append(&mut self, record: &Record<'_>) -> u64 {
        self.append_at(record).0
    }

    /// Appends a record; returns the segment it went to and its offset there.
    pub fn append_at(&mut self, record: &Record<'_>) -> (u64, u64) {
        let current_bytes = self.segments.get(&self.current).map_or(0, |s| s.bytes);
        if current_bytes >= self.segment_bytes_max {
            self.current += 1;
            self.segments.insert(self.current, SegmentStats::default());
        }
        let segment = self.current;
        let offset = self.segments.get(&segment).map_or(0, |s| s.bytes);
        if self.pending.last().is_none_or(|(s, _)| *s != segment) {
            self.pending.push((segment, 0));
        }
        let len = wal::encoded_len(record);
        self.write.reserve(len);
        let buf = &mut self.write.buf;
        let before = buf.len();
        wal::encode(buf, record);
        let written = buf.len() - before;
        debug_assert_eq!(written, len);
        if let Some((_, run)) = self.pending.last_mut() {
            *run += written;
        }
        let written = written as u64;
        self.appended += written;
        if let Some(stats) = self.segments.get_mut(&segment) {
            stats.bytes += written;
        }
        (segment, offset)
    }

    /// A live frame of `segment` left memory (`+1`) or came back (`-1`).
    pub fn add_spilled(&mut self, segment: u64, delta: i64) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.spilled = s.spilled.saturating_add_signed(delta);
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Everything appended since the last call, for one write (and one sync) per segment.
    pub fn take_write(&mut self) -> Option<LogWrite> {
        if self.pending.is_empty() {
            return None;
        }
        let mut all = self.write.take();
        let chunks = self
            .pending
            .drain(..)
            .map(|(segment, len)| (segment, all.split_to(len).freeze()))
            .collect();
        Some(LogWrite {
            chunks,
            lsn: self.appended,
        })
    }

    /// The IO shell stored everything up to `lsn`.
    pub fn on_committed(&mut self, lsn: u64) {
        debug_assert!(lsn <= self.appended);
        self.committed = self.committed.max(lsn);
        let committed = self.committed;
        let segments = &mut self.segments;
        self.retiring.retain(|&(at, segment)| {
            let done = at <= committed;
            if done && let Some(stats) = segments.get_mut(&segment) {
                stats.live_frames = 0;
                stats.live_bytes = 0;
                stats.device_sets = 0;
            }
            !done
        });
        self.collect_dead();
    }

    /// A write or sync failed: the shard acknowledges nothing more.
    pub fn on_failed(&mut self) {
        self.failed = true;
    }

    pub fn add_live(&mut self, segment: u64, bytes: u64) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live_frames += 1;
            s.live_bytes += bytes;
        }
    }

    pub fn remove_live(&mut self, segment: u64, bytes: u64) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live_frames = s.live_frames.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(bytes);
        }
    }

    pub fn move_device_set(&mut self, from: Option<u64>, to: Option<u64>) {
        if let Some(s) = from.and_then(|f| self.segments.get_mut(&f)) {
            s.device_sets = s.device_sets.saturating_sub(1);
        }
        if let Some(s) = to.and_then(|t| self.segments.get_mut(&t)) {
            s.device_sets += 1;
        }
    }

    /// Records that `segment` holds a release or removal of something recorded in `older`.
    pub fn add_ref(&mut self, segment: u64, older: u64) {
        if older != segment
            && let Some(s) = self.segments.get_mut(&segment)
        {
            s.refs.insert(older);
        }
    }

    /// The oldest sealed segment worth rewriting: live, but mostly dead (under a quarter of
    /// its bytes still queued). The shard re-appends its live records, then calls
    /// [`ShardLog::retire`].
    pub fn rewrite_candidate(&self) -> Option<u64> {
        self.segments
            .iter()
            .filter(|(id, s)| **id < self.current && !s.is_dead() && !self.is_retiring(**id))
            .find(|(_, s)| s.live_bytes * 4 < s.bytes)
            .map(|(id, _)| *id)
    }

    fn is_retiring(&self, segment: u64) -> bool {
        self.retiring.iter().any(|(_, s)| *s == segment)
    }

    /// `segment`'s live records were re-appended: it dies once they are committed.
    pub fn retire(&mut self, segment: u64) {
        self.retiring.push((self.appended, segment));
    }

    /// Moves every deletable segment to the list for the IO shell.
    pub fn collect_dead(&mut self) {
        // One at a time: deleting one may free others that refer to it.
        while let Some(id) = self
            .segments
            .iter()
            .find(|(id, s)| {
                **id < self.current
                    && s.is_dead()
                    && !self.is_retiring(**id)
                    && s.refs
                        .iter()
                        .all(|r| !self.segments.contains_key(r) || *r == **id)
            })
            .map(|(id, _)| *id)
        {
            self.segments.remove(&id);
            self.deletable.push(id);
        }
    }

    /// Segments the IO shell should delete from disk now.
    pub fn take_deletable(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.deletable)
    }

    /// Bytes on disk (and pending) in all segments.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use codec::{DeviceAddress, DeviceId, MessageId, NetworkId, UserId};

    use super::*;
    use crate::core::wal::{Target, Targets};

    /// However many writes the IO shell still holds and however much is appended between two
    /// takes (records larger than a buffer too), each write's chunks are its records, in
    /// order, per segment, until the shell drops them.
    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn writes_hold_their_records_while_the_buffers_are_reused() {
        let device = DeviceAddress::new(NetworkId(2), UserId(7), DeviceId(1));
        let mut log = ShardLog::new(1, 300_000);
        let mut expected: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut written: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut held: VecDeque<LogWrite> = VecDeque::new();
        let land = |write: LogWrite, written: &mut BTreeMap<u64, Vec<u8>>| {
            for (segment, bytes) in &write.chunks {
                written
                    .entry(*segment)
                    .or_default()
                    .extend_from_slice(bytes);
            }
        };
        for round in 0..300usize {
            for i in 0..[1, 3, 40, 300][round % 4] {
                let len = if (round + i) % 97 == 0 {
                    100_000
                } else {
                    (round * 37 + i * 11) % 2000
                };
                let frame = vec![(round + i) as u8; len];
                let record = Record::Enqueue {
                    arrival_ms: round as u64,
                    expires_at_ms: i as u64,
                    sender: device,
                    id: MessageId(i as u128),
                    recipient: device.user_address(),
                    targets: Targets::one(Target {
                        device: device.device,
                        seq: i as u64,
                    }),
                    frame: &frame,
                };
                let segment = log.append(&record);
                let mut one = BytesMut::new();
                wal::encode(&mut one, &record);
                expected.entry(segment).or_default().extend_from_slice(&one);
            }
            if let Some(write) = log.take_write() {
                held.push_back(write);
            }
            while held.len() > round % 3 {
                land(held.pop_front().unwrap(), &mut written);
            }
        }
        while let Some(write) = held.pop_front() {
            land(write, &mut written);
        }
        assert!(expected.len() > 3, "{} segments", expected.len());
        assert!(written == expected, "the chunks differ from the records");
    }
}
