//! Rebuilding a shard from its log segments at start. The segment store is a trait so that
//! the same code runs on the real directory and on the simulated disks of the tests.

use std::io;

use bytes::Bytes;

use super::log::ShardLog;
use super::queue::DeviceQueue;
use super::shard::Shard;
use super::wal::{ScanStop, Scanner};
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

impl<Q: DeviceQueue> Shard<Q> {
    /// Replays every segment in `store` into a new shard that logs to a fresh segment after
    /// them. Records up to a torn tail are kept and the tail is cut; a segment damaged in the
    /// middle is replayed up to the damage, reported and quarantined, and whatever of it is
    /// still live is rewritten to the head of the log so that it is durable again.
    pub fn recover(
        limits: RelayLimits,
        segment_bytes_max: u64,
        store: &mut dyn SegmentStore,
        now_ms: u64,
    ) -> io::Result<(Shard<Q>, RecoveryReport)> {
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
}
