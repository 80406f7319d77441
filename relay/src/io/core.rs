//! One core: its shard, its connections, and the batches it exchanges with other cores.
//! Everything here runs on the core's own thread; other cores reach it only through its
//! bounded inbox.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::{Receiver, TrySendError};

use super::conn::Conn;
use super::{Shared, now_ms};
use crate::core::ConnId;
use crate::core::queue::MemoryQueue;
use crate::core::session::SessionEvent;
use crate::core::shard::{Shard, ShardInput, ShardOutput};

/// Work one core hands another.
#[derive(Debug)]
pub enum CoreMsg {
    Shard(ShardInput),
    Conn(ShardOutput),
}

pub type Batch = Vec<CoreMsg>;

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    conn: Option<Rc<Conn>>,
}

/// The connections of one core, by slot; a slot's generation grows on reuse, so a late
/// message for a closed connection never reaches its successor.
#[derive(Debug, Default)]
pub struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    pub fn get(&self, id: ConnId) -> Option<Rc<Conn>> {
        let slot = self.slots.get(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.conn.clone()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn all(&self) -> Vec<Rc<Conn>> {
        self.slots.iter().filter_map(|s| s.conn.clone()).collect()
    }
}

#[derive(Debug)]
pub struct Core {
    pub index: u16,
    pub shared: Arc<Shared>,
    inbox: Receiver<Batch>,
    pub shard: RefCell<Shard<MemoryQueue>>,
    pub conns: RefCell<Slab>,
    outgoing: RefCell<Vec<Batch>>,
    next_session: Cell<u64>,
}

impl Core {
    pub fn new(index: u16, shared: Arc<Shared>, inbox: Receiver<Batch>) -> Core {
        let cores = usize::from(shared.cores);
        let limits = shared.limits;
        Core {
            index,
            shared,
            inbox,
            shard: RefCell::new(Shard::new(limits)),
            conns: RefCell::new(Slab::default()),
            outgoing: RefCell::new((0..cores).map(|_| Vec::new()).collect()),
            next_session: Cell::new(1),
        }
    }

    pub fn metrics(&self) -> &crate::metrics::CoreMetrics {
        &self.shared.metrics[usize::from(self.index)]
    }

    /// A new slot for a connection, or `None` at `connections_per_core_max`.
    pub fn reserve_slot(&self) -> Option<(ConnId, u64)> {
        let mut slab = self.conns.borrow_mut();
        if slab.len >= self.shared.limits.connections_per_core_max as usize {
            return None;
        }
        let slot = match slab.free.pop() {
            Some(slot) => slot,
            None => {
                slab.slots.push(Slot::default());
                u32::try_from(slab.slots.len() - 1).ok()?
            }
        };
        let entry = slab.slots.get_mut(slot as usize)?;
        entry.generation = entry.generation.wrapping_add(1);
        let id = ConnId {
            core: self.index,
            slot,
            generation: entry.generation,
        };
        let session = (u64::from(self.index) << 48) | self.next_session.get();
        self.next_session.set(self.next_session.get() + 1);
        Some((id, session))
    }

    pub fn insert(&self, conn: Rc<Conn>) {
        let mut slab = self.conns.borrow_mut();
        let id = conn.id;
        if let Some(slot) = slab.slots.get_mut(id.slot as usize) {
            slot.conn = Some(conn);
        }
        slab.len += 1;
    }

    pub fn remove(&self, id: ConnId) {
        let mut slab = self.conns.borrow_mut();
        let Some(slot) = slab.slots.get_mut(id.slot as usize) else {
            return;
        };
        if slot.generation == id.generation && slot.conn.take().is_some() {
            slab.len -= 1;
            slab.free.push(id.slot);
        }
    }

    /// Carries out what a session asked for.
    pub fn dispatch(&self, events: &mut Vec<SessionEvent>, conn: &Conn) {
        for event in events.drain(..) {
            match event {
                SessionEvent::Route { shard, input } => self.to_shard(shard, input),
                SessionEvent::Broadcast(input) => {
                    for shard in 0..self.shared.cores {
                        self.to_shard(shard, input.clone());
                    }
                }
                SessionEvent::Refused(code) => self.metrics().error(code),
                SessionEvent::Close => conn.begin_close(),
            }
        }
    }

    fn to_shard(&self, shard: u16, input: ShardInput) {
        if shard == self.index {
            self.shard.borrow_mut().handle(now_ms(), input);
            self.drain_shard();
        } else if let Some(batch) = self.outgoing.borrow_mut().get_mut(usize::from(shard)) {
            batch.push(CoreMsg::Shard(input));
        }
    }

    /// Hands the shard's outputs to local connections or to the cores that own them.
    pub fn drain_shard(&self) {
        loop {
            let output = self.shard.borrow_mut().poll_output();
            let Some(output) = output else { break };
            let target = match &output {
                ShardOutput::Deliver { conn, .. }
                | ShardOutput::Ack { conn, .. }
                | ShardOutput::Close { conn, .. } => *conn,
            };
            if target.core == self.index {
                self.apply(output);
            } else if let Some(batch) = self.outgoing.borrow_mut().get_mut(usize::from(target.core))
            {
                batch.push(CoreMsg::Conn(output));
            }
        }
        self.metrics().publish_shard(self.shard.borrow().stats());
    }

    /// A shard's output for a connection of this core.
    fn apply(&self, output: ShardOutput) {
        let target = match &output {
            ShardOutput::Deliver { conn, .. }
            | ShardOutput::Ack { conn, .. }
            | ShardOutput::Close { conn, .. } => *conn,
        };
        // A connection that closed meanwhile: its deliveries stay queued in the shard, which
        // its detach has already unbound; its acks have no one left to read them.
        let Some(conn) = self.conns.borrow().get(target) else {
            return;
        };
        conn.apply(self, output);
    }

    /// Sends the batches built up for other cores. Returns `false` if an inbox was full; the
    /// batch stays and goes with the next call. A core whose inbox is gone has stopped (the
    /// relay is stopping): nothing there can take the batch, so it is dropped, not retried.
    pub fn try_flush(&self) -> bool {
        let mut all_sent = true;
        let mut outgoing = self.outgoing.borrow_mut();
        for (core, batch) in outgoing.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let taken = std::mem::take(batch);
            match self.shared.senders[core].try_send(taken) {
                Ok(()) => self.shared.notifies[core].notify_one(),
                Err(TrySendError::Full(back)) => {
                    *batch = back;
                    all_sent = false;
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        all_sent
    }

    /// Sends every batch, waiting (without blocking the core) while an inbox is full: the
    /// caller stops reading its socket meanwhile, which is the back-pressure.
    pub async fn flush(&self) {
        while !self.try_flush() {
            self.shared.notifies[usize::from(self.index)].notify_one();
            tokio::task::yield_now().await;
        }
    }

    /// Drains this core's inbox, forever.
    pub async fn run_inbox(self: Rc<Self>) {
        let notify = self.shared.notifies[usize::from(self.index)].clone();
        loop {
            notify.notified().await;
            let started = Instant::now();
            while let Ok(batch) = self.inbox.try_recv() {
                let now = now_ms();
                for msg in batch {
                    match msg {
                        CoreMsg::Shard(input) => {
                            self.shard.borrow_mut().handle(now, input);
                        }
                        CoreMsg::Conn(output) => self.apply(output),
                    }
                }
                self.drain_shard();
            }
            self.flush().await;
            self.record_turn(started);
            if self.shared.stopping.load(Ordering::Acquire) && self.conns.borrow().is_empty() {
                return;
            }
        }
    }

    /// Expires queued frames whose TTL ran out, every 100 ms.
    pub async fn run_timers(self: Rc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            tick.tick().await;
            if self.shared.stopping.load(Ordering::Acquire) {
                return;
            }
            let due = self
                .shard
                .borrow()
                .poll_timeout()
                .is_some_and(|at| at <= now_ms());
            if due {
                self.shard.borrow_mut().handle_timeout(now_ms());
                self.drain_shard();
                self.flush().await;
            }
        }
    }

    pub fn record_turn(&self, started: Instant) {
        let m = self.metrics();
        m.turns.fetch_add(1, Ordering::Relaxed);
        m.busy_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}
