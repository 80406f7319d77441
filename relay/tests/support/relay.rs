//! The relay under test, driven the way its IO shell (`relay::io::worker` and `conn`) drives
//! it, with the sockets, threads and clock taken out. The sans-IO core is the real code
//! (sessions, shards, logs, recovery); the shell's rules are re-enacted here: cores, each
//! owning one shard (its log on a [`SimDisk`]) and the sessions of the connections it
//! accepted; work for another core's shard, and shard outputs for another core's
//! connections, travel in batches of at most `cross_core_batch_max` into inboxes of at most
//! `cross_core_inbox_batches_max` batches; an inbox turn handles at most
//! `INBOX_BATCHES_PER_TURN` batches and never waits on another core (what does not fit stays
//! in the outgoing batches for a later flush); a connection's reader waits for its core to
//! flush what it handed on, and stops while its client has more than
//! `connection_pending_bytes_max` waiting; a client that leaves more than twice that waiting
//! after the writer has waited `SLOW_CONSUMER_AFTER` for it is closed; the committer writes,
//! then syncs, then reports. Every shard call goes past the [`Ledger`], which checks it.

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use codec::{Delivery, DeviceAddress, FrameDecoder, delivery_flags, encode_head};
use devkit::sim::SimRng;
use relay::core::ConnId;
use relay::core::log::ShardLog;
use relay::core::session::{Session, SessionContext, SessionEvent};
use relay::core::shard::Shard;
use relay::core::shard::interface::{ShardInput, ShardOutput};
use relay::limits::{INBOX_BATCHES_PER_TURN, RelayLimits, SLOW_CONSUMER_AFTER};
use relay::tables::auth::Auth;
use relay::tables::policy::Policy;

use super::disk::{DiskFaults, SimDisk};
use super::ledger::{Asked, Ledger};

/// One connection as the relay sees it, with the bytes in flight both ways.
#[derive(Debug)]
pub struct RelayConn {
    session: Session,
    cert: Option<&'static [u8]>,
    decoder: FrameDecoder,
    /// Written by the client, not read by the relay yet.
    to_relay: BytesMut,
    /// Written by the session and the shards, not yet taken by the connection's writer (the
    /// worker's `Outbox`): what back-pressure and the slow-consumer rule count.
    outbox: BytesMut,
    /// Taken by the writer: in the socket's buffers, where the client reads it. The writer
    /// takes the whole outbox whenever the socket has room (at most `SOCKET_BUFFER_BYTES`
    /// waiting), once per turn of its core.
    wire: BytesMut,
    /// The relay closed it: it reads and writes nothing more; the client may still read
    /// what was written before.
    closed: bool,
    /// Since when the writer's write has waited for the client to read (the socket is
    /// full), if it has.
    write_started_ms: Option<u64>,
    /// Its reader handed work to other cores that did not fit their inboxes: it reads no
    /// more until its core has sent every batch (the worker's `flush().await`).
    waiting_flush: bool,
}

/// Work one core hands another.
#[derive(Debug)]
enum CrossCore {
    Shard(ShardInput),
    Conn(ShardOutput),
}

/// Bytes a connection's socket buffers hold (the relay's send buffer and the client's
/// receive buffer together); past this the writer waits for the client to read.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024;

/// A spilled frame to read back: (device, seq, segment, offset, len).
type LoadRequest = (DeviceAddress, u64, u64, u64, u32);

#[derive(Debug)]
struct Core {
    shard: Shard,
    inbox: VecDeque<Vec<CrossCore>>,
    /// Batches waiting for room in each other core's inbox.
    outgoing: Vec<VecDeque<Vec<CrossCore>>>,
    /// Outputs the ledger has seen and the shell has not carried out yet.
    emitted: VecDeque<ShardOutput>,
    loads: Vec<LoadRequest>,
    /// The segment the committer appends to.
    open_segment: Option<u64>,
    /// A write or sync failed: the committer writes nothing more until a restart.
    committer_stopped: bool,
}

impl Core {
    fn new(shard: Shard, cores: u16) -> Core {
        Core {
            shard,
            inbox: VecDeque::new(),
            outgoing: (0..cores).map(|_| VecDeque::new()).collect(),
            emitted: VecDeque::new(),
            loads: Vec::new(),
            open_segment: None,
            committer_stopped: false,
        }
    }
}

/// What the shell saw happen over a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShellCounts {
    /// Torn tails recovery cut off.
    pub torn_tails: u64,
    /// Connections closed because their client did not read.
    pub slow_consumer_closes: u64,
    /// Sessions closed for want of a `Hello` in time.
    pub hello_timeouts: u64,
    /// Batches that found another core's inbox full.
    pub inbox_full: u64,
    /// Spilled frames read back from a log.
    pub loads: u64,
}

/// What the client of a connection got when it read.
#[derive(Debug)]
pub struct ClientRead {
    pub bytes: Bytes,
    /// The relay closed the connection and the client has read everything it wrote.
    pub eof: bool,
}

/// The relay under test, with what every part of the world shares: the clock, the seed's
/// random numbers and the ledger.
#[derive(Debug)]
pub struct Relay {
    pub limits: RelayLimits,
    pub segment_bytes_max: u64,
    /// The world's clock, milliseconds since the epoch.
    pub now_ms: u64,
    pub rng: SimRng,
    pub ledger: Ledger,
    pub disks: Vec<SimDisk>,
    auth: Auth,
    policy: Policy,
    shards: u16,
    /// Empty while the relay is down.
    cores: Vec<Core>,
    conns: BTreeMap<ConnId, RelayConn>,
    next_slot: u32,
    /// What the shell saw happen, for the run's summary.
    pub seen: ShellCounts,
    /// Print every shard input and output (`A7_TRACE=2`).
    pub trace_shards: bool,
}

impl Relay {
    pub fn new(
        limits: RelayLimits,
        segment_bytes_max: u64,
        shards: u16,
        auth: Auth,
        rng: SimRng,
        now_ms: u64,
    ) -> Relay {
        let cores = (0..shards)
            .map(|_| {
                let log = ShardLog::new(1, segment_bytes_max);
                Core::new(Shard::with_log(limits, log), shards)
            })
            .collect();
        Relay {
            limits,
            segment_bytes_max,
            now_ms,
            rng,
            ledger: Ledger::new(limits.ttl_seconds_max),
            disks: (0..shards).map(|_| SimDisk::default()).collect(),
            auth,
            policy: Policy::new(false),
            shards,
            cores,
            conns: BTreeMap::new(),
            next_slot: 0,
            seen: ShellCounts::default(),
            trace_shards: std::env::var("A7_TRACE").is_ok_and(|v| v == "2"),
        }
    }

    pub fn is_up(&self) -> bool {
        !self.cores.is_empty()
    }

    pub fn shard(&self, index: u16) -> Option<&Shard> {
        self.cores.get(usize::from(index)).map(|c| &c.shard)
    }

    pub fn set_disk_faults(&mut self, faults: DiskFaults) {
        for disk in &mut self.disks {
            disk.faults = faults;
        }
    }

    /// Whether a core's log failed (its shard refuses everything until a restart).
    pub fn storage_failed(&self) -> bool {
        self.cores.iter().any(|c| c.committer_stopped)
    }

    /// Every shard's full invariant check.
    pub fn audit(&self) -> Result<(), String> {
        for (index, core) in self.cores.iter().enumerate() {
            core.shard
                .audit()
                .map_err(|e| format!("shard {index}: invariant broken: {e}"))?;
        }
        Ok(())
    }

    // ---- The client's end of a connection ----

    /// A client connects to `core`; `cert` is its TLS client certificate.
    pub fn connect(&mut self, core: u16, cert: Option<&'static [u8]>) -> ConnId {
        self.next_slot += 1;
        let id = ConnId {
            core,
            slot: self.next_slot,
            generation: 1,
        };
        let conn = RelayConn {
            session: Session::new(id, u64::from(self.next_slot), self.now_ms),
            cert,
            decoder: FrameDecoder::with_capacity(0),
            to_relay: BytesMut::new(),
            outbox: BytesMut::new(),
            wire: BytesMut::new(),
            closed: false,
            write_started_ms: None,
            waiting_flush: false,
        };
        self.conns.insert(id, conn);
        id
    }

    /// The client writes; `false` if the relay has closed the connection (the bytes are lost).
    pub fn client_write(&mut self, conn: ConnId, bytes: &[u8]) -> bool {
        match self.conns.get_mut(&conn) {
            Some(c) if !c.closed => {
                c.to_relay.extend_from_slice(bytes);
                true
            }
            _ => false,
        }
    }

    /// The client reads at most `max` bytes.
    pub fn client_read(&mut self, conn: ConnId, max: usize) -> ClientRead {
        let Some(c) = self.conns.get_mut(&conn) else {
            return ClientRead {
                bytes: Bytes::new(),
                eof: true,
            };
        };
        let take = max.min(c.wire.len());
        let bytes = c.wire.split_to(take).freeze();
        if c.wire.len() <= SOCKET_BUFFER_BYTES {
            c.write_started_ms = None;
        }
        let eof = c.closed && c.wire.is_empty() && c.outbox.is_empty();
        if eof {
            self.conns.remove(&conn);
        }
        ClientRead { bytes, eof }
    }

    /// The connection breaks (the client vanished, or the network dropped it). What the
    /// client wrote may or may not have been read by the relay before it noticed.
    pub fn drop_conn(&mut self, conn: ConnId, relay_reads_first: bool) {
        if relay_reads_first {
            self.read_turn(conn, true);
        }
        self.close_conn(conn);
        self.conns.remove(&conn);
    }

    // ---- The relay's turns ----

    /// Connections the relay would read now: something written to it, its client not too far
    /// behind (back-pressure), and its reader not waiting for its core to flush.
    pub fn readable(&self) -> Vec<ConnId> {
        let pending_max = self.limits.connection_pending_bytes_max as usize;
        self.conns
            .iter()
            .filter(|(id, c)| {
                let flushed = || {
                    self.cores
                        .get(usize::from(id.core))
                        .is_some_and(|core| core.outgoing.iter().all(VecDeque::is_empty))
                };
                !c.closed
                    && !c.to_relay.is_empty()
                    && c.outbox.len() <= pending_max
                    && (!c.waiting_flush || flushed())
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// The relay reads from `conn` (all of what is there, or some prefix of it) and the
    /// session handles every whole frame.
    pub fn read_turn(&mut self, id: ConnId, all: bool) {
        let now_ms = self.now_ms;
        let Relay {
            conns,
            auth,
            policy,
            limits,
            rng,
            shards,
            ..
        } = self;
        let Some(conn) = conns.get_mut(&id).filter(|c| !c.closed) else {
            return;
        };
        let len = conn.to_relay.len();
        let take = if all || rng.chance(70) {
            len
        } else {
            rng.below(len as u64 + 1) as usize
        };
        let bytes = conn.to_relay.split_to(take);
        conn.decoder.extend_from_slice(&bytes);
        let cx = SessionContext {
            now_ms,
            auth,
            policy,
            peer_cert: conn.cert,
            limits,
            shards: *shards,
        };
        loop {
            match conn.decoder.next_frame() {
                Ok(Some(frame)) => conn.session.handle_frame(&cx, &frame),
                Ok(None) => break,
                Err(err) => {
                    conn.session.handle_decode_error(err);
                    if err.is_framing() {
                        break;
                    }
                }
            }
            if conn.session.is_closed() {
                break;
            }
        }
        conn.waiting_flush = false;
        let events = pump(conn);
        self.dispatch(id, events);
        if !self.try_flush(id.core)
            && let Some(conn) = self.conns.get_mut(&id)
        {
            conn.waiting_flush = true;
        }
        self.write_out(id.core);
    }

    /// Handles at most `INBOX_BATCHES_PER_TURN` batches of the core's inbox; sends what it
    /// can to the others without waiting.
    pub fn inbox_turn(&mut self, core: u16) {
        for _ in 0..INBOX_BATCHES_PER_TURN {
            let Some(batch) = self.core_mut(core).and_then(|c| c.inbox.pop_front()) else {
                break;
            };
            for msg in batch {
                match msg {
                    CrossCore::Shard(input) => self.shard_handle(core, input),
                    CrossCore::Conn(output) => self.apply(output),
                }
            }
        }
        self.drain(core);
        self.try_flush(core);
        self.write_out(core);
    }

    /// The core's flusher: sends the batches an inbox had no room for.
    pub fn flush_turn(&mut self, core: u16) {
        self.try_flush(core);
    }

    /// The committer: writes what the shard appended, syncs it, and lets the acks waiting
    /// for it go; after a failed write or sync it stops, and the shard refuses everything.
    pub fn commit_turn(&mut self, index: u16) {
        let Relay {
            cores,
            disks,
            rng,
            ledger,
            ..
        } = self;
        let (Some(core), Some(disk)) = (
            cores.get_mut(usize::from(index)),
            disks.get_mut(usize::from(index)),
        ) else {
            return;
        };
        if core.committer_stopped {
            return;
        }
        let Some(write) = core.shard.take_log_write() else {
            return;
        };
        let mut stored = Ok(());
        for (segment, bytes) in &write.chunks {
            if core.open_segment != Some(*segment) {
                // A sealed segment is synced once more before it is let go.
                if let Some(previous) = core.open_segment.take() {
                    stored = disk.sync(rng, previous);
                    if stored.is_err() {
                        break;
                    }
                }
                core.open_segment = Some(*segment);
            }
            stored = disk.write(rng, *segment, bytes);
            if stored.is_err() {
                break;
            }
        }
        if stored.is_ok()
            && let Some(current) = core.open_segment
        {
            stored = disk.sync(rng, current);
        }
        if self.trace_shards {
            let chunks: Vec<(u64, usize)> =
                write.chunks.iter().map(|(s, b)| (*s, b.len())).collect();
            eprintln!(
                "  shard {index} log write {chunks:?} to {}: {stored:?}",
                write.lsn
            );
        }
        match stored {
            Ok(()) => {
                core.shard.on_log_committed(write.lsn);
                ledger.committed(index, write.lsn);
                for segment in core.shard.take_log_deletions() {
                    if self.trace_shards {
                        eprintln!("  shard {index} deletes segment {segment}");
                    }
                    if core.open_segment == Some(segment) {
                        core.open_segment = None;
                    }
                    disk.delete(segment);
                }
            }
            Err(_) => {
                core.shard.on_log_failed();
                core.committer_stopped = true;
            }
        }
        self.collect(index);
        self.drain(index);
        self.try_flush(index);
        self.write_out(index);
    }

    /// The loader: reads spilled frames back from the log, in the order asked.
    pub fn load_turn(&mut self, index: u16) {
        let Some(core) = self.core_mut(index) else {
            return;
        };
        let loads = std::mem::take(&mut core.loads);
        for (device, seq, segment, offset, len) in loads {
            let Relay { cores, disks, .. } = &mut *self;
            let core = &mut cores[usize::from(index)];
            if !core.shard.wants_load(&device, seq) {
                continue;
            }
            let frame = disks[usize::from(index)].read_at(segment, offset, len);
            core.shard.on_loaded(device, seq, frame);
            self.seen.loads += 1;
            self.collect(index);
            self.drain(index);
        }
        self.try_flush(index);
        self.write_out(index);
    }

    /// The core's timer: session deadlines, then TTL expiry and the log's housekeeping.
    pub fn timer_turn(&mut self, index: u16) {
        if self.core_mut(index).is_none() {
            return;
        }
        let now_ms = self.now_ms;
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, c)| {
                id.core == index
                    && !c.closed
                    && c.session.poll_timeout().is_some_and(|at| at <= now_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.session.handle_timeout(now_ms);
            if conn.session.is_closed() {
                self.seen.hello_timeouts += 1;
            }
            let events = pump(conn);
            self.dispatch(id, events);
        }
        if let Some(core) = self.core_mut(index) {
            core.shard.handle_timeout(now_ms);
        }
        self.collect(index);
        self.drain(index);
        self.try_flush(index);
        self.write_out(index);
    }

    /// Power is lost: every core, session and batch is gone; the disks keep what they keep.
    pub fn crash(&mut self) {
        for disk in &mut self.disks {
            disk.crash(&mut self.rng);
        }
        self.cores.clear();
        self.conns.clear();
        self.ledger.crashed();
    }

    /// Starts again: every shard recovered from its disk.
    pub fn restart(&mut self) -> Result<(), String> {
        assert!(self.cores.is_empty(), "restart of a running relay");
        for index in 0..self.shards {
            let disk = &mut self.disks[usize::from(index)];
            let (shard, report) =
                Shard::recover(self.limits, self.segment_bytes_max, disk, self.now_ms)
                    .map_err(|e| format!("shard {index} did not recover: {e}"))?;
            if !report.quarantined.is_empty() {
                return Err(format!(
                    "shard {index}: recovery found damage, not a torn tail: {report:?}"
                ));
            }
            self.seen.torn_tails += report.torn_tails.len() as u64;
            if self.trace_shards {
                eprintln!("  shard {index} recovered: {report:?}");
            }
            self.ledger
                .recovered(index, &shard, self.shards, self.now_ms);
            self.cores.push(Core::new(shard, self.shards));
        }
        Ok(())
    }

    /// What is still moving: bytes in flight, batches, log writes, loads. `None` when quiet.
    pub fn busy(&self) -> Option<String> {
        for (id, conn) in &self.conns {
            let unread = !conn.outbox.is_empty() || !conn.wire.is_empty();
            if unread || (!conn.closed && !conn.to_relay.is_empty()) {
                return Some(format!("bytes in flight on {id:?}"));
            }
        }
        for (index, core) in self.cores.iter().enumerate() {
            let batches = !core.inbox.is_empty() || core.outgoing.iter().any(|o| !o.is_empty());
            if batches || !core.emitted.is_empty() || !core.loads.is_empty() {
                return Some(format!("core {index} has work queued"));
            }
            if let Some(log) = core.shard.log()
                && log.committed() < log.appended()
            {
                return Some(format!("shard {index} has log records to store"));
            }
        }
        None
    }

    /// Every connection's state, to say why a world did not settle.
    pub fn describe(&self) -> String {
        let conns: Vec<String> = self
            .conns
            .iter()
            .map(|(id, c)| {
                format!(
                    "{id:?}: closed {}, {} bytes to the relay, {} + {} to the client, {} in \
                     flight, {:?}",
                    c.closed,
                    c.to_relay.len(),
                    c.outbox.len(),
                    c.wire.len(),
                    c.session.in_flight(),
                    c.session.principal()
                )
            })
            .collect();
        let cores: Vec<String> = self
            .cores
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "core {i}: inbox {}, outgoing {:?}, emitted {}, loads {}, committer stopped {}",
                    c.inbox.len(),
                    c.outgoing.iter().map(VecDeque::len).collect::<Vec<_>>(),
                    c.emitted.len(),
                    c.loads.len(),
                    c.committer_stopped
                )
            })
            .collect();
        format!(
            "{} slow consumers closed; {}; {}",
            self.seen.slow_consumer_closes,
            cores.join("; "),
            conns.join("; ")
        )
    }

    // ---- The shell's plumbing ----

    fn core_mut(&mut self, index: u16) -> Option<&mut Core> {
        self.cores.get_mut(usize::from(index))
    }

    /// One input into shard `index`, past the ledger.
    fn shard_handle(&mut self, index: u16, input: ShardInput) {
        let now_ms = self.now_ms;
        let Some(core) = self.cores.get_mut(usize::from(index)) else {
            return;
        };
        let asked = Asked::of(&input);
        if self.trace_shards {
            eprintln!("  shard {index} <- {input:?}");
        }
        let before = core.shard.stats();
        core.shard.handle(now_ms, input);
        self.ledger
            .handled(index, &core.shard, asked, before, now_ms);
        self.collect(index);
    }

    /// Takes the shard's outputs past the ledger, in order.
    fn collect(&mut self, index: u16) {
        let Some(core) = self.cores.get_mut(usize::from(index)) else {
            return;
        };
        while let Some(output) = core.shard.poll_output() {
            if self.trace_shards {
                eprintln!("  shard {index} -> {output:?}");
            }
            self.ledger.output(index, &core.shard, &output);
            core.emitted.push_back(output);
        }
    }

    /// Carries out the shard's outputs: for this core's connections, for other cores, or
    /// for the shell itself (loads).
    fn drain(&mut self, index: u16) {
        loop {
            let Some(output) = self.core_mut(index).and_then(|c| c.emitted.pop_front()) else {
                return;
            };
            match output.conn() {
                Some(target) if target.core == index => self.apply(output),
                Some(target) => self.send_to(index, target.core, CrossCore::Conn(output)),
                None => {
                    if let ShardOutput::Load {
                        device,
                        seq,
                        segment,
                        offset,
                        len,
                    } = output
                        && let Some(core) = self.core_mut(index)
                    {
                        core.loads.push((device, seq, segment, offset, len));
                    }
                }
            }
        }
    }

    /// Carries out what a session asked.
    fn dispatch(&mut self, conn: ConnId, events: Vec<SessionEvent>) {
        let mut close = false;
        for event in events {
            match event {
                SessionEvent::Route { shard, input } => {
                    self.route_to_shard(conn.core, shard, input)
                }
                SessionEvent::Broadcast(input) => {
                    for shard in 0..self.shards {
                        self.route_to_shard(conn.core, shard, input.clone());
                    }
                }
                SessionEvent::Contact(contact) => self.policy.record_contact(contact),
                SessionEvent::Refused(_)
                | SessionEvent::PolicyChecked { .. }
                | SessionEvent::DeadlinePassed(_)
                | SessionEvent::KeepAliveSent => {}
                SessionEvent::Close => close = true,
            }
        }
        if close {
            self.close_conn(conn);
        }
    }

    fn route_to_shard(&mut self, from: u16, shard: u16, input: ShardInput) {
        if from == shard {
            self.shard_handle(shard, input);
            self.drain(shard);
        } else {
            self.send_to(from, shard, CrossCore::Shard(input));
        }
    }

    /// Adds `msg` to the outgoing batches of core `from` for core `to`.
    fn send_to(&mut self, from: u16, to: u16, msg: CrossCore) {
        let batch_max = self.limits.cross_core_batch_max as usize;
        let Some(out) = self
            .core_mut(from)
            .and_then(|c| c.outgoing.get_mut(usize::from(to)))
        else {
            return;
        };
        match out.back_mut() {
            Some(batch) if batch.len() < batch_max => batch.push(msg),
            _ => out.push_back(vec![msg]),
        }
    }

    /// Sends core `from`'s batches, in order, while the inboxes have room.
    fn try_flush(&mut self, from: u16) -> bool {
        let inbox_max = self.limits.cross_core_inbox_batches_max as usize;
        let mut all_sent = true;
        for to in 0..self.cores.len() {
            loop {
                let Some(batch) = self.cores[usize::from(from)].outgoing[to].pop_front() else {
                    break;
                };
                if self.cores[to].inbox.len() < inbox_max {
                    self.cores[to].inbox.push_back(batch);
                } else {
                    self.cores[usize::from(from)].outgoing[to].push_front(batch);
                    self.seen.inbox_full += 1;
                    all_sent = false;
                    break;
                }
            }
        }
        all_sent
    }

    /// A shard's output for a connection of this core.
    fn apply(&mut self, output: ShardOutput) {
        let Some(target) = output.conn() else { return };
        // A connection that closed meanwhile: its deliveries stay queued in the shard.
        let Some(conn) = self.conns.get_mut(&target).filter(|c| !c.closed) else {
            return;
        };
        match output {
            ShardOutput::Deliver {
                device,
                seq,
                ephemeral,
                frame,
                ..
            } => {
                let flags = if ephemeral {
                    delivery_flags::EPHEMERAL
                } else {
                    0
                };
                let head = Delivery { device, seq, flags };
                encode_head(&mut conn.outbox, &head, frame.len()).expect("a delivery head");
                conn.outbox.extend_from_slice(&frame);
            }
            ShardOutput::Ack {
                of,
                id,
                address,
                result,
                ..
            } => {
                conn.session.handle_relay_ack(of, id, address, result);
                let events = pump(conn);
                self.dispatch(target, events);
            }
            ShardOutput::Close { code, .. } => {
                conn.session.handle_relay_close(code);
                let events = pump(conn);
                self.dispatch(target, events);
                return;
            }
            ShardOutput::Send { frame, .. } => conn.outbox.extend_from_slice(&frame),
            ShardOutput::Load { .. } | ShardOutput::Applied { .. } => {}
        }
        // A client that does not read must not grow the relay's memory: once the writer has
        // waited on it for `SLOW_CONSUMER_AFTER`, past twice the pending bound it is closed;
        // its deliveries stay queued.
        let pending_max = self.limits.connection_pending_bytes_max as usize;
        let now_ms = self.now_ms;
        let stuck = |c: &RelayConn| {
            c.write_started_ms
                .is_some_and(|at| now_ms - at >= SLOW_CONSUMER_AFTER.as_millis() as u64)
        };
        if self
            .conns
            .get(&target)
            .is_some_and(|c| stuck(c) && c.outbox.len() > 2 * pending_max)
        {
            self.seen.slow_consumer_closes += 1;
            if self.trace_shards {
                eprintln!("  {target:?} closed: a slow consumer");
            }
            self.close_conn(target);
        }
    }

    /// The relay closes its side: the session leaves the shards; what it wrote stays for the
    /// client to read.
    fn close_conn(&mut self, id: ConnId) {
        let shards = self.shards;
        let Some(conn) = self.conns.get_mut(&id).filter(|c| !c.closed) else {
            return;
        };
        conn.session.handle_close(shards);
        conn.closed = true;
        conn.to_relay.clear();
        let events = pump(conn);
        self.dispatch(id, events);
        // The writer writes what is pending, then closes.
        if let Some(conn) = self.conns.get_mut(&id) {
            let pending = conn.outbox.split();
            conn.wire.extend_from_slice(&pending);
        }
    }

    /// The writers of `core`'s connections run (the core yields after each turn): each takes
    /// its whole outbox if its socket has room.
    fn write_out(&mut self, core: u16) {
        for (id, conn) in &mut self.conns {
            if id.core == core && conn.wire.len() <= SOCKET_BUFFER_BYTES {
                let pending = conn.outbox.split();
                conn.wire.extend_from_slice(&pending);
                if conn.wire.len() > SOCKET_BUFFER_BYTES {
                    conn.write_started_ms.get_or_insert(self.now_ms);
                }
            }
        }
    }
}

/// Moves what the session wrote to its client's side and takes the work it asked for.
fn pump(conn: &mut RelayConn) -> Vec<SessionEvent> {
    conn.session.poll_transmit(&mut conn.outbox);
    let mut events = Vec::new();
    while let Some(event) = conn.session.poll_event() {
        events.push(event);
    }
    events
}
