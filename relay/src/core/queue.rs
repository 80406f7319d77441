//! One device's queue: the frames waiting for it in order, and how many of them are written
//! to its connection and not yet acknowledged (the delivery cursor). It knows nothing of the
//! log: where a frame's record lives is data it carries for the shard's durable bookkeeping.

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
    /// Where its enqueue record is: the log segment and the frame's offset there (both 0
    /// without a log).
    pub segment: u64,
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

impl Queued {
    pub fn bytes(&self) -> u64 {
        u64::from(self.len)
    }

    pub fn in_ram(&self) -> bool {
        self.frame.is_some()
    }
}

/// A device's frames in queue order, with the delivery cursor: the first `cursor` frames
/// are written on the current binding and wait for the device's `Ack`.
#[derive(Debug, Default)]
pub struct DeviceQueue {
    items: VecDeque<Queued>,
    bytes: u64,
    cursor: usize,
}

impl DeviceQueue {
    pub fn push(&mut self, item: Queued) {
        assert!(
            self.items.back().is_none_or(|last| last.seq < item.seq),
            "queue order"
        );
        self.bytes += item.bytes();
        self.items.push_back(item);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of all queued frames.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn get(&self, index: usize) -> Option<&Queued> {
        self.items.get(index)
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut Queued> {
        self.items.get_mut(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Queued> {
        self.items.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Queued> {
        self.items.iter_mut()
    }

    fn index_of_seq(&self, seq: u64) -> Option<usize> {
        self.items.binary_search_by_key(&seq, |q| q.seq).ok()
    }

    /// The frame with `seq`, to fill in what was read back from the log.
    pub fn find_seq_mut(&mut self, seq: u64) -> Option<&mut Queued> {
        let index = self.index_of_seq(seq)?;
        self.items.get_mut(index)
    }

    pub fn contains_seq(&self, seq: u64) -> bool {
        self.index_of_seq(seq).is_some()
    }

    /// Removes the frame with `id` (the device acknowledged it).
    pub fn remove_id(&mut self, id: MessageId) -> Option<Queued> {
        // Acks come in delivery order, so the match is almost always at the front.
        let index = self.items.iter().position(|q| q.id == id)?;
        self.take(index)
    }

    /// Removes the frame with `seq` (it expired, or a replayed release names it).
    pub fn remove_seq(&mut self, seq: u64) -> Option<Queued> {
        let index = self.index_of_seq(seq)?;
        self.take(index)
    }

    fn take(&mut self, index: usize) -> Option<Queued> {
        let item = self.items.remove(index)?;
        self.bytes -= item.bytes();
        // A frame already written leaves the window; the cursor still points at the next
        // frame to write.
        if index < self.cursor {
            self.cursor -= 1;
        }
        Some(item)
    }

    /// Takes every frame out (the device was removed), in order.
    pub fn drain(&mut self) -> impl Iterator<Item = Queued> + '_ {
        self.bytes = 0;
        self.cursor = 0;
        self.items.drain(..)
    }

    /// Inserts a frame at its place by `seq` (recovery replays rewritten records out of
    /// order); a `seq` already present is left as it is. Returns whether it was inserted.
    pub fn insert_sorted(&mut self, item: Queued) -> bool {
        // Replay appends in order except for rewritten records: take the common case first.
        if self.items.back().is_none_or(|last| last.seq < item.seq) {
            self.push(item);
            return true;
        }
        match self.items.binary_search_by_key(&item.seq, |q| q.seq) {
            Ok(_) => false,
            Err(index) => {
                self.bytes += item.bytes();
                self.items.insert(index, item);
                true
            }
        }
    }

    /// Frames written on the current binding and not acknowledged yet.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The binding changed: everything unacknowledged is written again from the front.
    pub fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// The frame at the cursor was written.
    pub fn advance(&mut self) {
        assert!(self.cursor < self.items.len(), "cursor past the queue");
        self.cursor += 1;
    }
}
