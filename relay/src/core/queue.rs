//! Per-device queues. The shard talks to them through [`DeviceQueue`]: memory today; the
//! durable per-shard log slots in behind the same trait.

use std::collections::VecDeque;

use bytes::Bytes;
use codec::{DeviceAddress, MessageId};

/// One frame waiting for one device: an `Envelope` or `Receipt` exactly as its sender wrote it.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Position in the device's queue; strictly increasing.
    pub seq: u64,
    /// The envelope's `message_id` or the receipt's `receipt_id`.
    pub id: MessageId,
    pub sender: DeviceAddress,
    pub expires_at_ms: u64,
    /// The log segment holding its enqueue record (0 without a log).
    pub segment: u64,
    /// Where the frame's bytes start in that segment (0 without a log).
    pub offset: u64,
    /// The log position after its record: the frame may leave memory once the log is
    /// committed past it (0 without a log, or when read back from the log).
    pub lsn: u64,
    /// Length of the frame in bytes.
    pub len: u32,
    /// The whole frame, a reference-counted slice of the buffer it was read into; `None`
    /// while it lives only in the log (spilled), until it is read back for delivery.
    pub frame: Option<Bytes>,
    /// A read of the frame from the log is in flight.
    pub loading: bool,
}

/// The operations the shard needs of a device's queue, in queue order.
pub trait DeviceQueue: Default {
    fn push(&mut self, item: Queued);
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of all queued frames.
    fn bytes(&self) -> u64;
    fn get(&self, index: usize) -> Option<&Queued>;
    fn get_mut(&mut self, index: usize) -> Option<&mut Queued>;
    /// The frame with `seq`, to fill in what was read back from the log.
    fn find_seq_mut(&mut self, seq: u64) -> Option<&mut Queued>;
    /// Removes the frame with `id`, returning its index and the frame.
    fn remove_id(&mut self, id: MessageId) -> Option<(usize, Queued)>;
    /// Removes the frame with `seq`, returning its index and the frame.
    fn remove_seq(&mut self, seq: u64) -> Option<(usize, Queued)>;
    /// Drops everything (the device was removed), showing each frame to `on_drop` first;
    /// returns how many frames were dropped.
    fn clear(&mut self, on_drop: &mut dyn FnMut(&Queued)) -> usize;
    /// Visits every frame in queue order (to move its log record).
    fn for_each_mut(&mut self, visit: &mut dyn FnMut(&mut Queued));
    /// Inserts a frame at its place by `seq` (recovery replays rewritten records out of
    /// order); a `seq` already present is ignored. Returns whether it was inserted.
    fn insert_sorted(&mut self, item: Queued) -> bool;
    /// Whether the frame with `seq` is still queued.
    fn contains_seq(&self, seq: u64) -> bool;
}

/// A device queue in memory.
#[derive(Debug, Default)]
pub struct MemoryQueue {
    items: VecDeque<Queued>,
    bytes: u64,
}

impl MemoryQueue {
    fn take(&mut self, index: usize) -> Option<(usize, Queued)> {
        let item = self.items.remove(index)?;
        self.bytes -= u64::from(item.len);
        Some((index, item))
    }
}

impl DeviceQueue for MemoryQueue {
    fn push(&mut self, item: Queued) {
        debug_assert!(self.items.back().is_none_or(|last| last.seq < item.seq));
        self.bytes += u64::from(item.len);
        self.items.push_back(item);
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn get(&self, index: usize) -> Option<&Queued> {
        self.items.get(index)
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Queued> {
        self.items.get_mut(index)
    }

    fn find_seq_mut(&mut self, seq: u64) -> Option<&mut Queued> {
        let index = self.items.binary_search_by_key(&seq, |q| q.seq).ok()?;
        self.items.get_mut(index)
    }

    fn remove_id(&mut self, id: MessageId) -> Option<(usize, Queued)> {
        // Acks come in delivery order, so the match is almost always at the front.
        let index = self.items.iter().position(|q| q.id == id)?;
        self.take(index)
    }

    fn remove_seq(&mut self, seq: u64) -> Option<(usize, Queued)> {
        let index = self.items.binary_search_by_key(&seq, |q| q.seq).ok()?;
        self.take(index)
    }

    fn contains_seq(&self, seq: u64) -> bool {
        self.items.binary_search_by_key(&seq, |q| q.seq).is_ok()
    }

    fn clear(&mut self, on_drop: &mut dyn FnMut(&Queued)) -> usize {
        let dropped = self.items.len();
        for item in &self.items {
            on_drop(item);
        }
        self.items.clear();
        self.bytes = 0;
        dropped
    }

    fn for_each_mut(&mut self, visit: &mut dyn FnMut(&mut Queued)) {
        for item in &mut self.items {
            visit(item);
        }
    }

    fn insert_sorted(&mut self, item: Queued) -> bool {
        // Replay appends in order except for rewritten records: take the common case first.
        if self.items.back().is_none_or(|last| last.seq < item.seq) {
            self.bytes += u64::from(item.len);
            self.items.push_back(item);
            return true;
        }
        match self.items.binary_search_by_key(&item.seq, |q| q.seq) {
            Ok(_) => false,
            Err(index) => {
                self.bytes += u64::from(item.len);
                self.items.insert(index, item);
                true
            }
        }
    }
}
