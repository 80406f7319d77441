//! One worker: the core's shard, its connections, and the batches it exchanges with other
//! cores. Everything here runs on the core's own thread; other cores reach it only through
//! its bounded inbox. A worker knows its connections only as [`Connection`]s (what a shard's
//! output needs of one), so `conn.rs` depends on this file and not the other way round.
//!
//! Cross-core flow cannot deadlock: the task that drains the inbox never waits for another
//! core's inbox (what it cannot send stays in its outgoing batches and a flusher task sends
//! it later), and it handles at most `INBOX_BATCHES_PER_TURN` batches before it lets the
//! core's other tasks run. Only tasks that take new work in (readers, the committer, the
//! loader, the timer) wait for room, which is the back-pressure.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TrySendError};
use tokio::sync::Notify;

use super::admission::{HandshakeBucket, SourceKey};
use super::shared::{Batch, ControlReply, Shared, WorkerMsg};
use super::store::ShardDir;
use crate::core::ConnId;
use crate::core::log::{Durability, LogWrite, ShardLog};
use crate::core::session::SessionEvent;
use crate::core::shard::Shard;
use crate::core::shard::interface::{ShardInput, ShardOutput, Ticket};
use crate::limits::{INBOX_BATCHES_PER_TURN, TIMER_TICK};
use crate::metrics::AcceptRefusal;
use codec::ErrorCode;
use devkit::now_ms;

/// What a worker needs of a connection: somewhere to put the shard's outputs for it, and a
/// way to end it.
pub trait Connection: std::fmt::Debug {
    fn id(&self) -> ConnId;
    /// A shard's output for this connection.
    fn apply(&self, worker: &Worker, output: ShardOutput);
    /// Flush what is pending, then close.
    fn begin_close(&self);
    /// The relay is stopping: say so to the client, then close.
    fn shut_down(&self, worker: &Worker);
    /// The session's timer may be due: let it act on its deadlines.
    fn on_timer(&self, worker: &Worker, now_ms: u64);
    /// Whether it has not authenticated yet (and so counts against the unauthenticated caps).
    fn is_unauthenticated(&self) -> bool;
    /// Closes an unauthenticated connection to make room for a newer one.
    fn evict(&self, worker: &Worker);
}

/// A connection let in by [`Worker::admit`]: counted as unauthenticated (on this core and
/// for its source address) until it authenticates or closes.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    pub source: SourceKey,
}

/// A spilled frame to read back: (device, seq, segment, offset, len).
type LoadRequest = (codec::DeviceAddress, u64, u64, u64, u32);

/// Segment files a loader keeps open.
const LOADER_FILES_OPEN_MAX: usize = 4;

/// How long the flusher sleeps between tries while another core's inbox stays full.
const FLUSH_RETRY: Duration = Duration::from_micros(200);

async fn read_frame(
    dir: &ShardDir,
    files: &mut VecDeque<(u64, Rc<tokio_uring::fs::File>)>,
    segment: u64,
    offset: u64,
    len: u32,
) -> std::io::Result<bytes::Bytes> {
    let file = match files.iter().find(|(id, _)| *id == segment) {
        Some((_, file)) => file.clone(),
        None => {
            let file = Rc::new(tokio_uring::fs::File::open(dir.segment(segment)).await?);
            if files.len() >= LOADER_FILES_OPEN_MAX {
                files.pop_front();
            }
            files.push_back((segment, file.clone()));
            file
        }
    };
    let (result, buf) = file.read_exact_at(vec![0u8; len as usize], offset).await;
    result?;
    Ok(bytes::Bytes::from(buf))
}

/// Nanoseconds since `started` (saturating: a u64 holds 584 years).
fn nanos(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The segment file the committer appends to.
struct OpenSegment {
    id: u64,
    file: tokio_uring::fs::File,
    len: u64,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    conn: Option<Rc<dyn Connection>>,
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
    pub fn get(&self, id: ConnId) -> Option<Rc<dyn Connection>> {
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

    pub fn all(&self) -> Vec<Rc<dyn Connection>> {
        self.slots.iter().filter_map(|s| s.conn.clone()).collect()
    }
}

/// Batches waiting to go to one other core, each at most `cross_core_batch_max` items.
#[derive(Debug, Default)]
struct Outgoing {
    batches: VecDeque<Batch>,
}

#[derive(Debug)]
pub struct Worker {
    pub index: u16,
    pub shared: Arc<Shared>,
    inbox: Receiver<Batch>,
    pub shard: RefCell<Shard>,
    /// The shard's log directory; `None` at the memory durability level.
    log_dir: Option<ShardDir>,
    /// Wakes the committer when the shard appended to its log.
    commit_wake: Notify,
    /// Spilled frames to read back from the log.
    loads: RefCell<Vec<LoadRequest>>,
    load_wake: Notify,
    /// Wakes the flusher: some batch could not be sent.
    flush_wake: Notify,
    pub conns: RefCell<Slab>,
    outgoing: RefCell<Vec<Outgoing>>,
    /// Session deadlines: (when, connection); stale entries are skipped by the session.
    session_timers: RefCell<BinaryHeap<Reverse<(u64, ConnId)>>>,
    /// Control changes taken and not yet answered by the shard.
    control_waiting: RefCell<HashMap<Ticket, Arc<ControlReply>>>,
    next_session: Cell<u64>,
    /// Connections of this core that have not authenticated (`unauthenticated_per_core_max`).
    unauthenticated: Cell<u32>,
    /// The same, oldest first (entries of connections that authenticated or closed are
    /// skipped, and dropped when they outnumber the live ones).
    unauthenticated_order: RefCell<VecDeque<ConnId>>,
    /// `handshakes_per_core_per_second_max`, on the clock of `started`.
    handshakes: RefCell<HandshakeBucket>,
    started: Instant,
}

impl Worker {
    pub fn new(
        index: u16,
        shared: Arc<Shared>,
        inbox: Receiver<Batch>,
        shard: Shard,
        log_dir: Option<ShardDir>,
    ) -> Worker {
        let cores = usize::from(shared.cores);
        Worker {
            index,
            inbox,
            shard: RefCell::new(shard),
            log_dir,
            commit_wake: Notify::new(),
            loads: RefCell::new(Vec::new()),
            load_wake: Notify::new(),
            flush_wake: Notify::new(),
            conns: RefCell::new(Slab::default()),
            outgoing: RefCell::new((0..cores).map(|_| Outgoing::default()).collect()),
            session_timers: RefCell::new(BinaryHeap::new()),
            control_waiting: RefCell::new(HashMap::new()),
            next_session: Cell::new(1),
            unauthenticated: Cell::new(0),
            unauthenticated_order: RefCell::new(VecDeque::new()),
            handshakes: RefCell::new(HandshakeBucket::new(
                shared.limits.handshakes_per_core_per_second_max,
            )),
            started: Instant::now(),
            shared,
        }
    }

    /// Whether a connection just accepted from `ip` may start its handshake: the core's
    /// handshake rate, the source's unauthenticated connections, and room among this core's
    /// unauthenticated ones (made by closing the oldest, so that a crowd of connections that
    /// never authenticate cannot keep a newer, faster one out). A refused connection is
    /// closed at once (dropped) and counted.
    pub fn admit(&self, ip: std::net::IpAddr) -> Option<Admitted> {
        let limits = &self.shared.limits;
        let metrics = self.metrics();
        if !self.handshakes.borrow_mut().try_take(nanos(self.started)) {
            metrics.port.refused(AcceptRefusal::HandshakeRate);
            metrics.error(ErrorCode::HandshakeRateLimited);
            return None;
        }
        let source = SourceKey::of(ip);
        if !self
            .shared
            .sources
            .try_add(source, limits.unauthenticated_per_source_max)
        {
            metrics.port.refused(AcceptRefusal::Source);
            metrics.error(ErrorCode::SourceConnectionLimit);
            return None;
        }
        if self.unauthenticated.get() >= limits.unauthenticated_per_core_max {
            self.evict_oldest_unauthenticated();
        }
        self.unauthenticated.set(self.unauthenticated.get() + 1);
        metrics
            .port
            .unauthenticated
            .store(u64::from(self.unauthenticated.get()), Ordering::Relaxed);
        Some(Admitted { source })
    }

    /// Remembers connection `id`, just admitted, in the order eviction takes.
    pub fn track_unauthenticated(&self, id: ConnId) {
        let mut order = self.unauthenticated_order.borrow_mut();
        order.push_back(id);
        let live = self.unauthenticated.get() as usize;
        if order.len() > 2 * live + 64 {
            let slab = self.conns.borrow();
            order.retain(|id| slab.get(*id).is_some_and(|c| c.is_unauthenticated()));
        }
    }

    /// A connection admitted as `admitted` authenticated or closed: it no longer counts.
    pub fn leave_unauthenticated(&self, admitted: Admitted) {
        self.unauthenticated
            .set(self.unauthenticated.get().saturating_sub(1));
        self.shared.sources.remove(admitted.source);
        self.metrics()
            .port
            .unauthenticated
            .store(u64::from(self.unauthenticated.get()), Ordering::Relaxed);
    }

    fn evict_oldest_unauthenticated(&self) {
        loop {
            let Some(id) = self.unauthenticated_order.borrow_mut().pop_front() else {
                return;
            };
            let conn = self.conns.borrow().get(id);
            if let Some(conn) = conn
                && conn.is_unauthenticated()
            {
                self.metrics().port.evicted.fetch_add(1, Ordering::Relaxed);
                conn.evict(self);
                return;
            }
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

    pub fn insert(&self, conn: Rc<dyn Connection>) {
        let mut slab = self.conns.borrow_mut();
        let id = conn.id();
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

    /// Asks for `conn`'s `on_timer` at `at` (milliseconds since the epoch).
    pub fn schedule_timer(&self, conn: ConnId, at: u64) {
        self.session_timers.borrow_mut().push(Reverse((at, conn)));
    }

    /// Lets every session whose deadline passed act on it.
    fn fire_session_timers(&self, now: u64) {
        loop {
            let due = {
                let mut timers = self.session_timers.borrow_mut();
                match timers.peek() {
                    Some(Reverse((at, _))) if *at <= now => timers.pop(),
                    _ => None,
                }
            };
            let Some(Reverse((_, id))) = due else { break };
            let conn = self.conns.borrow().get(id);
            if let Some(conn) = conn {
                conn.on_timer(self, now);
            }
        }
    }

    /// Carries out what a session asked for.
    pub fn dispatch(&self, events: &mut Vec<SessionEvent>, conn: &dyn Connection) {
        for event in events.drain(..) {
            match event {
                SessionEvent::Route { shard, input } => self.to_shard(shard, input),
                SessionEvent::Broadcast(input) => {
                    for shard in 0..self.shared.cores {
                        self.to_shard(shard, input.clone());
                    }
                }
                SessionEvent::Refused(code) => self.metrics().error(code),
                SessionEvent::PolicyChecked { refused } => {
                    let m = self.metrics();
                    m.policy_checked.fetch_add(1, Ordering::Relaxed);
                    if refused {
                        m.policy_refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                SessionEvent::Contact(contact) => self.shared.policy.record_contact(contact),
                SessionEvent::DeadlinePassed(deadline) => self.metrics().port.deadline(deadline),
                SessionEvent::KeepAliveSent => {
                    let sent = &self.metrics().port.keepalives_sent;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                SessionEvent::Close => conn.begin_close(),
            }
        }
    }

    fn to_shard(&self, shard: u16, input: ShardInput) {
        if shard == self.index {
            self.shard.borrow_mut().handle(now_ms(), input);
            self.drain_shard();
        } else {
            self.send_to(shard, WorkerMsg::Shard(input));
        }
    }

    /// Adds `msg` to the outgoing batches for `core`.
    fn send_to(&self, core: u16, msg: WorkerMsg) {
        let batch_max = self.shared.limits.cross_core_batch_max as usize;
        let mut outgoing = self.outgoing.borrow_mut();
        let Some(out) = outgoing.get_mut(usize::from(core)) else {
            return;
        };
        match out.batches.back_mut() {
            Some(batch) if batch.len() < batch_max => batch.push(msg),
            _ => {
                let mut batch = Vec::with_capacity(batch_max.min(64));
                batch.push(msg);
                out.batches.push_back(batch);
            }
        }
    }

    /// Hands the shard's outputs to local connections or to the cores that own them.
    pub fn drain_shard(&self) {
        loop {
            let output = self.shard.borrow_mut().poll_output();
            let Some(output) = output else { break };
            match output.conn() {
                Some(target) if target.core == self.index => self.apply(output),
                Some(target) => self.send_to(target.core, WorkerMsg::Conn(output)),
                None => self.take_shell_work(output),
            }
        }
        let shard = self.shard.borrow();
        self.metrics().publish_shard(shard.stats());
        if shard.log().is_some_and(ShardLog::has_pending) {
            self.commit_wake.notify_one();
        }
    }

    /// Outputs for the shell itself: log reads and control answers.
    fn take_shell_work(&self, output: ShardOutput) {
        match output {
            ShardOutput::Load {
                device,
                seq,
                segment,
                offset,
                len,
            } => {
                self.loads
                    .borrow_mut()
                    .push((device, seq, segment, offset, len));
                self.load_wake.notify_one();
            }
            ShardOutput::Applied { ticket, result } => {
                if let Some(reply) = self.control_waiting.borrow_mut().remove(&ticket) {
                    reply.answer(result);
                }
            }
            ShardOutput::Deliver { .. }
            | ShardOutput::Ack { .. }
            | ShardOutput::Close { .. }
            | ShardOutput::Send { .. } => {}
        }
    }

    /// Writes what the shard appended to its log, syncs it (at the fsync level), and lets the
    /// acks waiting for it go: group commit, one sync for everything appended meanwhile.
    pub async fn run_committer(self: Rc<Self>) {
        let Some(dir) = self.log_dir.clone() else {
            return;
        };
        let mut open: Option<OpenSegment> = None;
        loop {
            self.commit_wake.notified().await;
            loop {
                let write = self.shard.borrow_mut().take_log_write();
                let Some(write) = write else { break };
                let started = Instant::now();
                match self.write_log(&dir, &mut open, &write).await {
                    Ok(bytes) => {
                        self.shard.borrow_mut().on_log_committed(write.lsn);
                        let m = self.metrics();
                        m.log_commits.fetch_add(1, Ordering::Relaxed);
                        m.log_bytes.fetch_add(bytes, Ordering::Relaxed);
                        m.log_commit_ns.fetch_add(nanos(started), Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(
                            shard = self.index,
                            "log write failed, this shard acknowledges nothing more (STORAGE_UNAVAILABLE): {e}"
                        );
                        self.metrics().storage_failed.store(1, Ordering::Relaxed);
                        self.shard.borrow_mut().on_log_failed();
                        self.drain_shard();
                        self.flush().await;
                        // Nothing more is written: the tail of the segment is in an unknown
                        // state, and recovery (after a restart) is what sorts it out.
                        return;
                    }
                }
                let deletions = self.shard.borrow_mut().take_log_deletions();
                for id in deletions {
                    if open.as_ref().is_some_and(|o| o.id == id) {
                        open = None;
                    }
                    if let Err(e) = tokio_uring::fs::remove_file(dir.segment(id)).await
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        tracing::warn!(shard = self.index, "deleting log segment {id}: {e}");
                    }
                }
                if let Some(log) = self.shard.borrow().log() {
                    self.metrics()
                        .log_disk_bytes
                        .store(log.disk_bytes(), Ordering::Relaxed);
                }
                self.drain_shard();
                self.audit_in_debug();
                self.flush().await;
            }
        }
    }

    /// Reads spilled frames back from the log for the devices that need them, in the order
    /// the shard asked.
    pub async fn run_loader(self: Rc<Self>) {
        let Some(dir) = self.log_dir.clone() else {
            return;
        };
        // A few segment files stay open: a returning device reads mostly from one or two.
        let mut files: VecDeque<(u64, Rc<tokio_uring::fs::File>)> = VecDeque::new();
        loop {
            self.load_wake.notified().await;
            loop {
                let batch = std::mem::take(&mut *self.loads.borrow_mut());
                if batch.is_empty() {
                    break;
                }
                for (device, seq, segment, offset, len) in batch {
                    if !self.shard.borrow().wants_load(&device, seq) {
                        continue;
                    }
                    let frame = match read_frame(&dir, &mut files, segment, offset, len).await {
                        Ok(bytes) => Some(bytes),
                        // Released (and its segment deleted) while the read was in flight.
                        Err(_) if !self.shard.borrow().wants_load(&device, seq) => continue,
                        Err(e) => {
                            tracing::error!(
                                shard = self.index,
                                "reading a queued frame back from log segment {segment}: {e}"
                            );
                            self.metrics().storage_failed.store(1, Ordering::Relaxed);
                            None
                        }
                    };
                    self.shard.borrow_mut().on_loaded(device, seq, frame);
                    self.drain_shard();
                }
                self.audit_in_debug();
                self.flush().await;
            }
        }
    }

    async fn write_log(
        &self,
        dir: &ShardDir,
        open: &mut Option<OpenSegment>,
        write: &LogWrite,
    ) -> std::io::Result<u64> {
        let fsync = self.shared.durability == Durability::Fsync;
        let mut written = 0;
        for (segment, bytes) in &write.chunks {
            if open.as_ref().is_none_or(|o| o.id != *segment) {
                // A sealed segment is synced once more before it is let go.
                if let Some(previous) = open.take()
                    && fsync
                {
                    previous.file.sync_data().await?;
                }
                let file = tokio_uring::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .open(dir.segment(*segment))
                    .await?;
                if fsync {
                    dir.sync_dir()?;
                }
                *open = Some(OpenSegment {
                    id: *segment,
                    file,
                    len: 0,
                });
            }
            let Some(current) = open.as_mut() else {
                continue;
            };
            let (result, _) = current.file.write_all_at(bytes.clone(), current.len).await;
            result?;
            current.len += bytes.len() as u64;
            written += bytes.len() as u64;
        }
        if fsync && let Some(current) = open.as_ref() {
            current.file.sync_data().await?;
        }
        Ok(written)
    }

    /// A shard's output for a connection of this core.
    fn apply(&self, output: ShardOutput) {
        let Some(target) = output.conn() else { return };
        // A connection that closed meanwhile: its deliveries stay queued in the shard, which
        // its detach has already unbound; its acks have no one left to read them.
        let Some(conn) = self.conns.borrow().get(target) else {
            return;
        };
        conn.apply(self, output);
    }

    /// Sends the batches built up for other cores, in order. Returns `false` if an inbox was
    /// full; what did not go stays for the next call. A core whose inbox is gone has stopped
    /// (the relay is stopping): nothing there can take the batch, so it is dropped.
    pub fn try_flush(&self) -> bool {
        let mut all_sent = true;
        let mut outgoing = self.outgoing.borrow_mut();
        for (core, out) in outgoing.iter_mut().enumerate() {
            let mut sent = false;
            while let Some(batch) = out.batches.pop_front() {
                match self.shared.senders[core].try_send(batch) {
                    Ok(()) => sent = true,
                    Err(TrySendError::Full(back)) => {
                        out.batches.push_front(back);
                        all_sent = false;
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => out.batches.clear(),
                }
            }
            if sent {
                self.shared.notifies[core].notify_one();
            }
        }
        all_sent
    }

    /// Sends every batch, waiting (without blocking the core) while an inbox is full: the
    /// caller takes no new work meanwhile, which is the back-pressure. Never called by the
    /// inbox task, which must keep draining for the others to make progress.
    pub async fn flush(&self) {
        while !self.try_flush() {
            tokio::time::sleep(FLUSH_RETRY).await;
        }
    }

    /// Sends what the inbox task could not, once there is room.
    pub async fn run_flusher(self: Rc<Self>) {
        loop {
            self.flush_wake.notified().await;
            self.flush().await;
            if self.shared.stopping.load(Ordering::Acquire) && self.conns.borrow().is_empty() {
                return;
            }
        }
    }

    /// Drains this core's inbox, forever, a bounded number of batches per turn.
    pub async fn run_inbox(self: Rc<Self>) {
        let notify = self.shared.notifies[usize::from(self.index)].clone();
        loop {
            notify.notified().await;
            loop {
                let started = Instant::now();
                let mut handled = 0;
                let mut barriers = Vec::new();
                while handled < INBOX_BATCHES_PER_TURN {
                    let Ok(batch) = self.inbox.try_recv() else {
                        break;
                    };
                    handled += 1;
                    self.handle_batch(batch, &mut barriers);
                }
                if !self.try_flush() {
                    self.flush_wake.notify_one();
                }
                for done in barriers {
                    let _ = done.send(());
                }
                self.end_turn(started);
                if handled < INBOX_BATCHES_PER_TURN {
                    break;
                }
                // More may wait: let this core's connections have a turn first.
                tokio::task::yield_now().await;
            }
            if self.shared.stopping.load(Ordering::Acquire) && self.conns.borrow().is_empty() {
                return;
            }
        }
    }

    fn handle_batch(&self, batch: Batch, barriers: &mut Vec<crossbeam_channel::Sender<()>>) {
        let now = now_ms();
        for msg in batch {
            match msg {
                WorkerMsg::Shard(input) => self.shard.borrow_mut().handle(now, input),
                WorkerMsg::Conn(output) => self.apply(output),
                WorkerMsg::Barrier(done) => barriers.push(done),
                WorkerMsg::Hold { entered, release } => {
                    let _ = entered.send(());
                    let _ = release.recv();
                }
                WorkerMsg::Control {
                    ticket,
                    change,
                    reply,
                } => {
                    // The control plane may have given up on this change: then it must not
                    // happen at all.
                    if reply.take() {
                        self.control_waiting.borrow_mut().insert(ticket, reply);
                        let input = ShardInput::Control { ticket, change };
                        self.shard.borrow_mut().handle(now, input);
                    }
                }
            }
        }
        self.drain_shard();
    }

    /// Every `TIMER_TICK`: expires queued frames whose TTL ran out and does the log's
    /// housekeeping.
    pub async fn run_timers(self: Rc<Self>) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        loop {
            tick.tick().await;
            if self.shared.stopping.load(Ordering::Acquire) {
                return;
            }
            let started = Instant::now();
            let now = now_ms();
            self.fire_session_timers(now);
            self.shard.borrow_mut().handle_timeout(now);
            self.drain_shard();
            self.flush().await;
            self.end_turn(started);
        }
    }

    /// Counts a turn; in debug builds, checks every invariant of the shard after it.
    pub fn end_turn(&self, started: Instant) {
        let m = self.metrics();
        m.turns.fetch_add(1, Ordering::Relaxed);
        m.busy_ns.fetch_add(nanos(started), Ordering::Relaxed);
        self.audit_in_debug();
    }

    /// In debug builds, checks every invariant of the shard (after each turn of any task that
    /// changed it); release builds keep only the shard's cheap assertions.
    fn audit_in_debug(&self) {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.shard.borrow().audit() {
            panic!("shard {}: invariant broken: {broken}", self.index);
        }
    }
}
