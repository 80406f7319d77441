//! The exact account of one phase: one slot per scheduled message, updated as it is written,
//! acknowledged by the relay, delivered to each device of its recipient, and as the receipts
//! for it travel back. Plain data with atomic fields, so connection tasks update it without a
//! lock; no IO and no clock (times come from the caller).
//!
//! At the end, [`Ledger::tally`] walks every slot: a message the relay accepted that did not
//! reach every device of its recipient is lost; a second delivery of one message to one
//! device is a duplicate (counted as it happens); the same for receipts.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::population::{Class, DEVICES_PER_USER_MAX};

const EMPTY: u32 = 0;
const SCHEDULED: u32 = 1;
const WRITTEN: u32 = 2;
const ACCEPTED: u32 = 3;
const REJECTED: u32 = 4;
const RETRYING: u32 = 5;

const READ_DELIVERED_SHIFT: u32 = 8;
const RECEIPT_ACCEPTED_SHIFT: u32 = 16;
const READ_ACCEPTED_BIT: u32 = 1 << 24;

const _: () = assert!(DEVICES_PER_USER_MAX <= 8, "device masks are 8 bits wide");

#[derive(Debug, Default)]
struct Slot {
    /// class (bit 0), recipient devices (bits 1..5), sender's devices (5..9), size (32..64).
    info: AtomicU64,
    sender: AtomicU32,
    sender_user: AtomicU32,
    recipient: AtomicU32,
    /// Status (low 8 bits) and the final rejection code (high 16).
    status: AtomicU32,
    /// Envelope delivered per device (0..8), read receipt delivered per sender device
    /// (8..16), delivered-receipt from device r accepted by the relay (16..24), read receipt
    /// accepted (24).
    masks: AtomicU32,
    /// Delivered-receipt from recipient device r reached sender device s: bit (r-1)*8+(s-1).
    receipts: AtomicU64,
}

/// The fixed facts of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    pub class: Class,
    /// Global device index of the sender.
    pub sender: u32,
    /// Global user index of the sender.
    pub sender_user: u32,
    /// Global user index of the recipient.
    pub recipient: u32,
    /// Devices of the recipient (each gets the envelope).
    pub recipient_devices: u8,
    /// Devices of the sender's user (each gets every receipt).
    pub sender_devices: u8,
    pub size: u32,
}

/// What the relay answered to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Accepted,
    /// Refused with a retryable code: loadgen writes it again later.
    Retry(u16),
    /// Refused for good.
    Rejected(u16),
}

/// How a delivery compares with what came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    First,
    Duplicate,
    /// Not a message of this phase (or a device it was never for).
    Unknown,
}

#[derive(Debug, Default)]
struct ClassCounters {
    scheduled: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
    expected_deliveries: AtomicU64,
    deliveries: AtomicU64,
    duplicates: AtomicU64,
    reordered: AtomicU64,
}

#[derive(Debug, Default)]
struct ReceiptCounters {
    generated: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
    expected_deliveries: AtomicU64,
    deliveries: AtomicU64,
    duplicates: AtomicU64,
}

/// Whether device number `d` (1-based) of recipient user `u` is reachable now (online, or
/// served by a server session): deliveries to the others are pending, not due.
pub type Reachable = Box<dyn Fn(u32, u8) -> bool + Send + Sync>;

/// The ledger of one phase.
pub struct Ledger {
    reachable: Reachable,
    slots: Box<[Slot]>,
    classes: [ClassCounters; 2],
    receipts: ReceiptCounters,
    signals_sent: AtomicU64,
    signals_received: AtomicU64,
    /// Deliveries and acks that belong to no slot of this phase (an earlier phase, garbage).
    strays: AtomicU64,
    /// Acks for a slot that was not waiting for one.
    unexpected_acks: AtomicU64,
    /// Payloads that failed their checks (magic, checksum, length).
    corrupt: AtomicU64,
}

/// Messages of one class, counted at the end of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassTally {
    pub scheduled: u64,
    /// Written at least once.
    pub sent: u64,
    /// Scheduled but never written before the phase ended (loadgen's own backlog).
    pub unsent: u64,
    pub accepted: u64,
    /// Refused for good.
    pub rejected: u64,
    /// Writes refused with a retryable code and written again.
    pub retries: u64,
    /// Accepted and delivered to every device of the recipient.
    pub delivered: u64,
    /// Accepted and not delivered to every device of the recipient.
    pub lost: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost_deliveries: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries of a message the relay never accepted.
    pub unacknowledged_deliveries: u64,
    /// Deliveries still waiting for a device that is offline (not due yet, not lost).
    pub pending_offline: u64,
}

/// Receipts, counted at the end of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReceiptTally {
    pub generated: u64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub retries: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// Deliveries of accepted receipts that never arrived.
    pub lost: u64,
    pub duplicates: u64,
    /// Deliveries waiting for a sender device that is offline.
    pub pending_offline: u64,
}

/// The whole tally of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub classes: [ClassTally; 2],
    pub receipts: ReceiptTally,
    pub signals_sent: u64,
    pub signals_received: u64,
    pub strays: u64,
    pub unexpected_acks: u64,
    pub corrupt: u64,
}

impl Tally {
    /// Both classes together.
    pub fn total(&self) -> ClassTally {
        let [a, b] = self.classes;
        ClassTally {
            scheduled: a.scheduled + b.scheduled,
            sent: a.sent + b.sent,
            unsent: a.unsent + b.unsent,
            accepted: a.accepted + b.accepted,
            rejected: a.rejected + b.rejected,
            retries: a.retries + b.retries,
            delivered: a.delivered + b.delivered,
            lost: a.lost + b.lost,
            expected_deliveries: a.expected_deliveries + b.expected_deliveries,
            deliveries: a.deliveries + b.deliveries,
            lost_deliveries: a.lost_deliveries + b.lost_deliveries,
            duplicates: a.duplicates + b.duplicates,
            reordered: a.reordered + b.reordered,
            unacknowledged_deliveries: a.unacknowledged_deliveries + b.unacknowledged_deliveries,
            pending_offline: a.pending_offline + b.pending_offline,
        }
    }

    /// Whether the run kept its promise: nothing acknowledged lost, nothing delivered twice,
    /// nothing out of order, no payload damaged.
    pub fn intact(&self) -> bool {
        let total = self.total();
        total.lost == 0
            && total.duplicates == 0
            && total.reordered == 0
            && self.receipts.lost == 0
            && self.receipts.duplicates == 0
            && self.corrupt == 0
    }
}

fn bit(device: u8) -> u32 {
    1u32 << (device.saturating_sub(1) & 7)
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("capacity", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// A ledger for up to `capacity` messages, every device reachable.
    pub fn new(capacity: usize) -> Ledger {
        Ledger::with_reachability(capacity, Box::new(|_, _| true))
    }

    /// A ledger for up to `capacity` messages; `reachable` says which devices are online.
    pub fn with_reachability(capacity: usize, reachable: Reachable) -> Ledger {
        let slots = (0..capacity).map(|_| Slot::default()).collect();
        Ledger {
            reachable,
            slots,
            classes: Default::default(),
            receipts: ReceiptCounters::default(),
            signals_sent: AtomicU64::new(0),
            signals_received: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            unexpected_acks: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, seq: u64) -> Option<&Slot> {
        self.slots.get(usize::try_from(seq).ok()?)
    }

    /// Records a message as scheduled. Returns false when the ledger is full.
    pub fn schedule(&self, seq: u64, info: SlotInfo) -> bool {
        let Some(slot) = self.slot(seq) else {
            return false;
        };
        assert!(info.recipient_devices >= 1 && info.recipient_devices <= DEVICES_PER_USER_MAX);
        assert!(info.sender_devices >= 1 && info.sender_devices <= DEVICES_PER_USER_MAX);
        let packed = (info.class.index() as u64)
            | (u64::from(info.recipient_devices) << 1)
            | (u64::from(info.sender_devices) << 5)
            | (u64::from(info.size) << 32);
        slot.info.store(packed, Relaxed);
        slot.sender.store(info.sender, Relaxed);
        slot.sender_user.store(info.sender_user, Relaxed);
        slot.recipient.store(info.recipient, Relaxed);
        slot.masks.store(0, Relaxed);
        slot.receipts.store(0, Relaxed);
        slot.status.store(SCHEDULED, Relaxed);
        self.classes[info.class.index()]
            .scheduled
            .fetch_add(1, Relaxed);
        true
    }

    /// The facts of a scheduled message.
    pub fn info(&self, seq: u64) -> Option<SlotInfo> {
        let slot = self.slot(seq)?;
        if slot.status.load(Relaxed) & 0xFF == EMPTY {
            return None;
        }
        let packed = slot.info.load(Relaxed);
        Some(SlotInfo {
            class: if packed & 1 == 0 {
                Class::FirstParty
            } else {
                Class::Interop
            },
            recipient_devices: u8::try_from((packed >> 1) & 0xF).unwrap_or(1),
            sender_devices: u8::try_from((packed >> 5) & 0xF).unwrap_or(1),
            size: u32::try_from(packed >> 32).unwrap_or(0),
            sender: slot.sender.load(Relaxed),
            sender_user: slot.sender_user.load(Relaxed),
            recipient: slot.recipient.load(Relaxed),
        })
    }

    /// The message was written to the relay (first time or again after a retryable refusal).
    pub fn written(&self, seq: u64) {
        let (Some(slot), Some(info)) = (self.slot(seq), self.info(seq)) else {
            return;
        };
        let before = slot.status.swap(WRITTEN, Relaxed) & 0xFF;
        if before == SCHEDULED {
            self.classes[info.class.index()].sent.fetch_add(1, Relaxed);
        }
    }

    /// The relay's answer to the latest write of `seq`.
    pub fn acked(&self, seq: u64, outcome: AckOutcome) {
        let (Some(slot), Some(info)) = (self.slot(seq), self.info(seq)) else {
            self.strays.fetch_add(1, Relaxed);
            return;
        };
        let counters = &self.classes[info.class.index()];
        let (status, count) = match outcome {
            AckOutcome::Accepted => (ACCEPTED, &counters.accepted),
            AckOutcome::Retry(_) => (RETRYING, &counters.retries),
            AckOutcome::Rejected(code) => (REJECTED | (u32::from(code) << 16), &counters.rejected),
        };
        let exchanged = slot
            .status
            .compare_exchange(WRITTEN, status, Relaxed, Relaxed);
        if exchanged.is_err() {
            self.unexpected_acks.fetch_add(1, Relaxed);
            return;
        }
        count.fetch_add(1, Relaxed);
        if outcome == AckOutcome::Accepted {
            let due = (1..=info.recipient_devices)
                .filter(|&d| (self.reachable)(info.recipient, d))
                .count();
            counters.expected_deliveries.fetch_add(due as u64, Relaxed);
        }
    }

    /// The envelope `seq` reached device `device` (1-based) of its recipient.
    pub fn delivered(&self, seq: u64, device: u8) -> Arrival {
        let (Some(slot), Some(info)) = (self.slot(seq), self.info(seq)) else {
            self.strays.fetch_add(1, Relaxed);
            return Arrival::Unknown;
        };
        if device == 0 || device > info.recipient_devices {
            self.strays.fetch_add(1, Relaxed);
            return Arrival::Unknown;
        }
        let counters = &self.classes[info.class.index()];
        let before = slot.masks.fetch_or(bit(device), Relaxed);
        if before & bit(device) != 0 {
            counters.duplicates.fetch_add(1, Relaxed);
            Arrival::Duplicate
        } else {
            counters.deliveries.fetch_add(1, Relaxed);
            Arrival::First
        }
    }

    /// A receiving device saw this message after a later one from the same sender.
    pub fn reordered(&self, class: Class) {
        self.classes[class.index()].reordered.fetch_add(1, Relaxed);
    }

    pub fn corrupt(&self) {
        self.corrupt.fetch_add(1, Relaxed);
    }

    pub fn stray(&self) {
        self.strays.fetch_add(1, Relaxed);
    }

    /// A receipt was created for `seq` by its recipient's device (it will be written).
    pub fn receipt_generated(&self) {
        self.receipts.generated.fetch_add(1, Relaxed);
    }

    /// A receipt was written; `first` for its first write.
    pub fn receipt_written(&self, first: bool) {
        if first {
            self.receipts.sent.fetch_add(1, Relaxed);
        }
    }

    /// The relay's answer to a receipt from recipient device `from` about `seq`.
    pub fn receipt_acked(&self, seq: u64, from: u8, read: bool, outcome: AckOutcome) {
        let (Some(slot), Some(info)) = (self.slot(seq), self.info(seq)) else {
            self.strays.fetch_add(1, Relaxed);
            return;
        };
        match outcome {
            AckOutcome::Accepted => {
                let flag = if read {
                    READ_ACCEPTED_BIT
                } else {
                    bit(from) << RECEIPT_ACCEPTED_SHIFT
                };
                let before = slot.masks.fetch_or(flag, Relaxed);
                if before & flag != 0 {
                    self.unexpected_acks.fetch_add(1, Relaxed);
                    return;
                }
                self.receipts.accepted.fetch_add(1, Relaxed);
                let due = (1..=info.sender_devices)
                    .filter(|&d| (self.reachable)(info.sender_user, d))
                    .count();
                self.receipts
                    .expected_deliveries
                    .fetch_add(due as u64, Relaxed);
            }
            AckOutcome::Retry(_) => {
                self.receipts.retries.fetch_add(1, Relaxed);
            }
            AckOutcome::Rejected(_) => {
                self.receipts.rejected.fetch_add(1, Relaxed);
            }
        }
    }

    /// A receipt from recipient device `from` about `seq` reached sender device `to`.
    pub fn receipt_delivered(&self, seq: u64, from: u8, read: bool, to: u8) -> Arrival {
        let (Some(slot), Some(info)) = (self.slot(seq), self.info(seq)) else {
            self.strays.fetch_add(1, Relaxed);
            return Arrival::Unknown;
        };
        if from == 0 || from > info.recipient_devices || to == 0 || to > info.sender_devices {
            self.strays.fetch_add(1, Relaxed);
            return Arrival::Unknown;
        }
        let first = if read {
            let flag = bit(to) << READ_DELIVERED_SHIFT;
            slot.masks.fetch_or(flag, Relaxed) & flag == 0
        } else {
            let flag = 1u64 << (u32::from(from - 1) * 8 + u32::from(to - 1));
            slot.receipts.fetch_or(flag, Relaxed) & flag == 0
        };
        if first {
            self.receipts.deliveries.fetch_add(1, Relaxed);
            Arrival::First
        } else {
            self.receipts.duplicates.fetch_add(1, Relaxed);
            Arrival::Duplicate
        }
    }

    pub fn signal_sent(&self) {
        self.signals_sent.fetch_add(1, Relaxed);
    }

    pub fn signal_received(&self) {
        self.signals_received.fetch_add(1, Relaxed);
    }

    /// Messages scheduled so far, both classes.
    pub fn scheduled(&self) -> u64 {
        self.classes.iter().map(|c| c.scheduled.load(Relaxed)).sum()
    }

    /// A number that changes whenever anything arrives or is answered (for the drain).
    pub fn progress_mark(&self) -> u64 {
        let classes: u64 = self
            .classes
            .iter()
            .map(|c| {
                c.sent.load(Relaxed)
                    + c.accepted.load(Relaxed)
                    + c.rejected.load(Relaxed)
                    + c.retries.load(Relaxed)
                    + c.deliveries.load(Relaxed)
            })
            .sum();
        let r = &self.receipts;
        classes
            + r.sent.load(Relaxed)
            + r.accepted.load(Relaxed)
            + r.rejected.load(Relaxed)
            + r.retries.load(Relaxed)
            + r.deliveries.load(Relaxed)
    }

    /// Messages written at least once so far, both classes.
    pub fn sent(&self) -> u64 {
        self.classes.iter().map(|c| c.sent.load(Relaxed)).sum()
    }

    /// Device deliveries so far (first arrivals), both classes.
    pub fn deliveries(&self) -> u64 {
        self.classes
            .iter()
            .map(|c| c.deliveries.load(Relaxed))
            .sum()
    }

    /// Whether every scheduled message has its final answer, every accepted one reached
    /// every device, and every receipt did the same: nothing more is coming.
    pub fn settled(&self) -> bool {
        let classes_done = self.classes.iter().all(|c| {
            let finished = c.accepted.load(Relaxed) + c.rejected.load(Relaxed);
            finished == c.scheduled.load(Relaxed)
                && c.deliveries.load(Relaxed) >= c.expected_deliveries.load(Relaxed)
        });
        let r = &self.receipts;
        let receipts_done = r.accepted.load(Relaxed) + r.rejected.load(Relaxed)
            == r.generated.load(Relaxed)
            && r.deliveries.load(Relaxed) >= r.expected_deliveries.load(Relaxed);
        classes_done && receipts_done
    }

    /// Deliveries of accepted messages to reachable devices that have not arrived (walks
    /// every slot; the drain calls it once the counters say everything is in).
    pub fn missing(&self) -> u64 {
        let mut missing = 0;
        for seq in 0..self.capacity() {
            let Some(slot) = self.slot(seq) else { continue };
            if slot.status.load(Relaxed) & 0xFF != ACCEPTED {
                continue;
            }
            let Some(info) = self.info(seq) else { continue };
            let got = slot.masks.load(Relaxed) & 0xFF;
            missing += (1..=info.recipient_devices)
                .filter(|&d| got & bit(d) == 0 && (self.reachable)(info.recipient, d))
                .count() as u64;
        }
        missing
    }

    /// Walks every slot and counts what happened.
    pub fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        for (index, counters) in self.classes.iter().enumerate() {
            let t = &mut tally.classes[index];
            t.scheduled = counters.scheduled.load(Relaxed);
            t.sent = counters.sent.load(Relaxed);
            t.unsent = t.scheduled - t.sent.min(t.scheduled);
            t.accepted = counters.accepted.load(Relaxed);
            t.rejected = counters.rejected.load(Relaxed);
            t.retries = counters.retries.load(Relaxed);
            t.duplicates = counters.duplicates.load(Relaxed);
            t.reordered = counters.reordered.load(Relaxed);
        }
        let receipts = &mut tally.receipts;
        receipts.generated = self.receipts.generated.load(Relaxed);
        receipts.sent = self.receipts.sent.load(Relaxed);
        receipts.accepted = self.receipts.accepted.load(Relaxed);
        receipts.rejected = self.receipts.rejected.load(Relaxed);
        receipts.retries = self.receipts.retries.load(Relaxed);
        receipts.duplicates = self.receipts.duplicates.load(Relaxed);
        for seq in 0..self.capacity() {
            let Some(info) = self.info(seq) else { continue };
            let Some(slot) = self.slot(seq) else { continue };
            let status = slot.status.load(Relaxed) & 0xFF;
            let masks = slot.masks.load(Relaxed);
            let all = (1u32 << info.recipient_devices) - 1;
            let got = masks & 0xFF;
            let t = &mut tally.classes[info.class.index()];
            t.expected_deliveries += u64::from(info.recipient_devices);
            t.deliveries += u64::from(got.count_ones());
            if status == ACCEPTED {
                let unreachable = (1..=info.recipient_devices)
                    .filter(|&d| got & bit(d) == 0 && !(self.reachable)(info.recipient, d))
                    .fold(0u32, |m, d| m | bit(d));
                let missing = all & !got & !unreachable;
                if got & all == all {
                    t.delivered += 1;
                } else if missing != 0 {
                    t.lost += 1;
                    t.lost_deliveries += u64::from(missing.count_ones());
                }
                t.pending_offline += u64::from(unreachable.count_ones());
            } else if got != 0 {
                t.unacknowledged_deliveries += u64::from(got.count_ones());
            }
            // Receipt deliveries due: every device of the sender's user that is reachable.
            let mut due_mask = 0u32;
            for d in 1..=info.sender_devices {
                if (self.reachable)(info.sender_user, d) {
                    due_mask |= bit(d);
                }
            }
            let senders = u64::from(info.sender_devices);
            let receipt_bits = slot.receipts.load(Relaxed);
            let mut count = |arrived_mask: u32| {
                let arrived = u64::from(arrived_mask.count_ones());
                let missing = u64::from((due_mask & !arrived_mask).count_ones());
                receipts.expected_deliveries += senders;
                receipts.deliveries += arrived;
                receipts.lost += missing;
                receipts.pending_offline += senders - arrived - missing;
            };
            for from in 1..=info.recipient_devices {
                if masks & (bit(from) << RECEIPT_ACCEPTED_SHIFT) != 0 {
                    let row = (receipt_bits >> (u32::from(from - 1) * 8)) & 0xFF;
                    count(u32::try_from(row).unwrap_or(0));
                }
            }
            if masks & READ_ACCEPTED_BIT != 0 {
                count((masks >> READ_DELIVERED_SHIFT) & 0xFF);
            }
        }
        tally.signals_sent = self.signals_sent.load(Relaxed);
        tally.signals_received = self.signals_received.load(Relaxed);
        tally.strays = self.strays.load(Relaxed);
        tally.unexpected_acks = self.unexpected_acks.load(Relaxed);
        tally.corrupt = self.corrupt.load(Relaxed);
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(class: Class, recipient_devices: u8, sender_devices: u8) -> SlotInfo {
        SlotInfo {
            class,
            sender: 10,
            sender_user: 5,
            recipient: 20,
            recipient_devices,
            sender_devices,
            size: 300,
        }
    }

    #[test]
    fn a_clean_run_tallies_clean() {
        let ledger = Ledger::new(4);
        assert!(ledger.schedule(0, info(Class::FirstParty, 2, 1)));
        assert!(ledger.schedule(1, info(Class::Interop, 1, 3)));
        assert_eq!(ledger.info(1), Some(info(Class::Interop, 1, 3)));
        for seq in 0..2 {
            ledger.written(seq);
            ledger.acked(seq, AckOutcome::Accepted);
        }
        assert!(!ledger.settled());
        assert_eq!(ledger.delivered(0, 1), Arrival::First);
        assert_eq!(ledger.delivered(0, 2), Arrival::First);
        assert_eq!(ledger.delivered(1, 1), Arrival::First);
        // Receipts: from message 1's only recipient device, delivered and read.
        for read in [false, true] {
            ledger.receipt_generated();
            ledger.receipt_written(true);
            ledger.receipt_acked(1, 1, read, AckOutcome::Accepted);
            for to in 1..=3 {
                assert_eq!(ledger.receipt_delivered(1, 1, read, to), Arrival::First);
            }
        }
        assert!(ledger.settled());
        let tally = ledger.tally();
        assert!(tally.intact());
        let total = tally.total();
        assert_eq!(
            (total.sent, total.accepted, total.delivered, total.lost),
            (2, 2, 2, 0)
        );
        assert_eq!(total.expected_deliveries, 3);
        assert_eq!(tally.receipts.expected_deliveries, 6);
        assert_eq!(tally.receipts.deliveries, 6);
        assert_eq!(tally.classes[Class::Interop.index()].delivered, 1);
    }

    #[test]
    fn a_missing_device_is_a_loss_and_a_repeat_a_duplicate() {
        let ledger = Ledger::new(2);
        ledger.schedule(0, info(Class::Interop, 3, 1));
        ledger.written(0);
        ledger.acked(0, AckOutcome::Accepted);
        ledger.delivered(0, 1);
        assert_eq!(ledger.delivered(0, 1), Arrival::Duplicate);
        ledger.delivered(0, 3);
        assert_eq!(ledger.delivered(0, 4), Arrival::Unknown);
        assert!(!ledger.settled());
        let tally = ledger.tally();
        assert!(!tally.intact());
        let interop = tally.classes[Class::Interop.index()];
        assert_eq!(interop.lost, 1);
        assert_eq!(interop.lost_deliveries, 1);
        assert_eq!(interop.duplicates, 1);
        assert_eq!(tally.strays, 1);
    }

    #[test]
    fn refusals_retries_and_unsent_messages() {
        let ledger = Ledger::new(3);
        for seq in 0..3 {
            ledger.schedule(seq, info(Class::FirstParty, 1, 1));
        }
        ledger.written(0);
        ledger.acked(0, AckOutcome::Retry(400));
        ledger.written(0);
        ledger.acked(0, AckOutcome::Accepted);
        ledger.delivered(0, 1);
        ledger.written(1);
        ledger.acked(1, AckOutcome::Rejected(300));
        // A second answer to the same write is not expected.
        ledger.acked(1, AckOutcome::Accepted);
        let t = ledger.tally().classes[0];
        assert_eq!((t.scheduled, t.sent, t.unsent), (3, 2, 1));
        assert_eq!((t.accepted, t.rejected, t.retries), (1, 1, 1));
        assert_eq!((t.delivered, t.lost), (1, 0));
        assert_eq!(ledger.tally().unexpected_acks, 1);
        // A rejected message is not lost, but a delivery of it is reported.
        ledger.delivered(1, 1);
        assert_eq!(ledger.tally().classes[0].unacknowledged_deliveries, 1);
    }

    #[test]
    fn lost_receipts_are_counted() {
        let ledger = Ledger::new(1);
        ledger.schedule(0, info(Class::FirstParty, 1, 2));
        ledger.written(0);
        ledger.acked(0, AckOutcome::Accepted);
        ledger.delivered(0, 1);
        ledger.receipt_generated();
        ledger.receipt_written(true);
        ledger.receipt_acked(0, 1, false, AckOutcome::Accepted);
        assert_eq!(ledger.receipt_delivered(0, 1, false, 2), Arrival::First);
        assert_eq!(ledger.receipt_delivered(0, 1, false, 2), Arrival::Duplicate);
        let tally = ledger.tally();
        assert_eq!(tally.receipts.lost, 1);
        assert_eq!(tally.receipts.duplicates, 1);
        assert!(!tally.intact());
    }

    #[test]
    fn deliveries_to_offline_devices_are_pending_not_lost() {
        // Device 2 of every recipient is offline.
        let ledger = Ledger::with_reachability(1, Box::new(|_, device| device != 2));
        ledger.schedule(0, info(Class::Interop, 2, 1));
        ledger.written(0);
        ledger.acked(0, AckOutcome::Accepted);
        ledger.delivered(0, 1);
        assert!(ledger.settled());
        assert_eq!(ledger.missing(), 0);
        let t = ledger.tally().classes[Class::Interop.index()];
        assert_eq!((t.delivered, t.lost, t.pending_offline), (0, 0, 1));
        // Once it arrives, the message is delivered.
        ledger.delivered(0, 2);
        let t = ledger.tally().classes[Class::Interop.index()];
        assert_eq!((t.delivered, t.lost, t.pending_offline), (1, 0, 0));
    }

    #[test]
    fn out_of_range_is_refused_not_a_panic() {
        let ledger = Ledger::new(1);
        assert!(!ledger.schedule(5, info(Class::FirstParty, 1, 1)));
        assert_eq!(ledger.delivered(9, 1), Arrival::Unknown);
        ledger.acked(9, AckOutcome::Accepted);
        assert_eq!(ledger.info(0), None);
        assert_eq!(ledger.tally().strays, 2);
    }
}
