//! Remembers (sender, message id) pairs for the dedup window, so a resent envelope is
//! acknowledged again but delivered once. Bounded: past `entries_max` the oldest pair is
//! forgotten first (a resend that late is delivered twice, which the client dedups by id).

use std::collections::{HashSet, VecDeque};

use codec::{DeviceAddress, MessageId};

#[derive(Debug)]
pub struct Dedup {
    seen: HashSet<(DeviceAddress, MessageId)>,
    order: VecDeque<(u64, DeviceAddress, MessageId)>,
    window_ms: u64,
    entries_max: usize,
}

impl Dedup {
    pub fn new(window_ms: u64, entries_max: usize) -> Dedup {
        assert!(entries_max > 0);
        Dedup {
            seen: HashSet::new(),
            order: VecDeque::new(),
            window_ms,
            entries_max,
        }
    }

    pub fn contains(&self, sender: DeviceAddress, id: MessageId) -> bool {
        self.seen.contains(&(sender, id))
    }

    pub fn insert(&mut self, now_ms: u64, sender: DeviceAddress, id: MessageId) {
        self.forget_expired(now_ms);
        if self.seen.insert((sender, id)) {
            self.order.push_back((now_ms + self.window_ms, sender, id));
        }
        while self.order.len() > self.entries_max {
            self.forget_oldest();
        }
        debug_assert_eq!(self.seen.len(), self.order.len());
    }

    pub fn forget_expired(&mut self, now_ms: u64) {
        while self
            .order
            .front()
            .is_some_and(|&(expires, _, _)| expires <= now_ms)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, sender, id)) = self.order.pop_front() {
            self.seen.remove(&(sender, id));
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}
