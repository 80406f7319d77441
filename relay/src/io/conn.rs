//! One client connection on one core: a reader that decrypts into the frame decoder and feeds
//! the session, and a writer that encrypts everything pending into one buffer and writes it
//! with one io_uring write per turn.
//!
//! Payload bytes are never copied between reading and writing: rustls decrypts into the
//! decoder's buffer, each frame is a reference-counted slice of it, the shard queues that
//! slice, and the writer hands it to rustls, which encrypts it into the outgoing record.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use codec::{Delivery, FrameDecoder, FrameKind, delivery_flags, encode_head};
use rustls::ServerConnection;
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;

use super::worker::{Connection, Worker};
use crate::core::ConnId;
use crate::core::session::{Session, SessionContext, SessionEvent};
use crate::core::shard::interface::ShardOutput;
use crate::limits::SLOW_CONSUMER_AFTER;
use crate::tables::auth::Principal;
use devkit::now_ms;

/// Bytes read from the socket per read: one TLS record's worth, so an idle connection holds
/// little.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// A connection starts with a small read buffer, so that an idle one holds little; it
/// doubles (up to `READ_BUFFER_BYTES`) each time a read fills it.
const READ_BUFFER_BYTES_MIN: usize = 2 * 1024;

/// Chunks handed to rustls in one vectored write.
const WRITE_SLICES_MAX: usize = 64;

/// Frames waiting to be encrypted and written, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Small frames the relay encodes (acks, errors, delivery heads) are written here first...
    scratch: BytesMut,
    /// ...and sealed into chunks, next to the queued frames they precede or follow.
    chunks: VecDeque<Bytes>,
    bytes: usize,
}

impl Outbox {
    fn seal_scratch(&mut self) {
        if !self.scratch.is_empty() {
            let sealed = self.scratch.split().freeze();
            self.bytes += sealed.len();
            self.chunks.push_back(sealed);
        }
    }

    fn push(&mut self, chunk: Bytes) {
        self.seal_scratch();
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
    }
}

pub struct Conn {
    pub id: ConnId,
    stream: TcpStream,
    tls: RefCell<ServerConnection>,
    session: RefCell<Session>,
    peer_cert: RefCell<Option<Vec<u8>>>,
    handshake_seen: Cell<bool>,
    out: RefCell<Outbox>,
    writer_wake: Notify,
    drained: Notify,
    closing: Cell<bool>,
    counted: Cell<Option<Principal>>,
    /// When the writer's write in flight started: while it waits, the socket is full.
    write_started: Cell<Option<Instant>>,
}

impl Conn {
    fn wake_writer(&self) {
        self.writer_wake.notify_one();
    }

    /// Moves what the session wrote into the outbox and carries out what it asked for.
    fn pump_session(&self, worker: &Worker) {
        let mut events = Vec::new();
        {
            let mut session = self.session.borrow_mut();
            session.poll_transmit(&mut self.out.borrow_mut().scratch);
            while let Some(event) = session.poll_event() {
                events.push(event);
            }
        }
        worker.dispatch(&mut events, self);
    }
}

impl Connection for Conn {
    fn id(&self) -> ConnId {
        self.id
    }

    /// Marks the connection for closing: the writer flushes what is pending, sends
    /// close_notify and shuts the socket, which ends the reader's pending read.
    fn begin_close(&self) {
        self.closing.set(true);
        self.writer_wake.notify_one();
    }

    fn shut_down(&self, worker: &Worker) {
        self.session.borrow_mut().handle_shutdown();
        self.pump_session(worker);
        let _ = self.stream.shutdown(Shutdown::Read);
    }

    fn on_timer(&self, worker: &Worker, now_ms: u64) {
        let due = self
            .session
            .borrow()
            .poll_timeout()
            .is_some_and(|at| at <= now_ms);
        if !due {
            return;
        }
        self.session.borrow_mut().handle_timeout(now_ms);
        self.pump_session(worker);
        if self.session.borrow().is_closed() {
            // Ends the reader's pending read, which takes the session out of the shards.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
    }

    /// A shard's output for this connection.
    fn apply(&self, worker: &Worker, output: ShardOutput) {
        let metrics = worker.metrics();
        let mut out = self.out.borrow_mut();
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
                if encode_head(
                    &mut out.scratch,
                    &Delivery { device, seq, flags },
                    frame.len(),
                )
                .is_ok()
                {
                    out.push(frame);
                    metrics.deliveries_out.fetch_add(1, Ordering::Relaxed);
                }
            }
            ShardOutput::Ack {
                of,
                id,
                address,
                result,
                ..
            } => {
                // The hot path: the session writes the ack and counts it; only a refusal
                // has an event (its code, for the metric).
                let mut session = self.session.borrow_mut();
                session.handle_relay_ack(of, id, address, result);
                session.poll_transmit(&mut out.scratch);
                while let Some(event) = session.poll_event() {
                    match event {
                        SessionEvent::Refused(code) => metrics.error(code),
                        other => debug_assert!(false, "an ack caused {other:?}"),
                    }
                }
                metrics.acks_out.fetch_add(1, Ordering::Relaxed);
            }
            // Never addressed to a connection: the worker takes these.
            ShardOutput::Load { .. } | ShardOutput::Applied { .. } => {}
            ShardOutput::Send { frame, .. } => out.push(frame),
            ShardOutput::Close { code, .. } => {
                drop(out);
                self.session.borrow_mut().handle_relay_close(code);
                self.pump_session(worker);
                return;
            }
        }
        // A client that does not read its deliveries must not grow the relay's memory: once
        // the writer has waited on its socket for SLOW_CONSUMER_AFTER, past twice the pending
        // bound it is closed. (A burst written in one turn, such as a backlog going out when
        // its device comes back, is not slowness: the writer has not had its turn yet.)
        // Nothing is lost: unacknowledged deliveries stay queued and go out again when it
        // reconnects.
        let over = out.bytes + out.scratch.len()
            > 2 * worker.shared.limits.connection_pending_bytes_max as usize;
        let stuck = || {
            self.write_started
                .get()
                .is_some_and(|started| started.elapsed() >= SLOW_CONSUMER_AFTER)
        };
        if over && stuck() {
            metrics.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
            drop(out);
            self.begin_close();
            let _ = self.stream.shutdown(Shutdown::Read);
            return;
        }
        drop(out);
        self.wake_writer();
    }
}

impl Conn {
    /// Feeds bytes from the socket to rustls and moves the plaintext into the decoder.
    /// `Ok(true)` when the peer closed the TLS session.
    fn take_plaintext(
        &self,
        mut input: &[u8],
        decoder: &mut FrameDecoder,
    ) -> Result<bool, rustls::Error> {
        let mut tls = self.tls.borrow_mut();
        while !input.is_empty() {
            if tls.read_tls(&mut input).is_err() {
                return Err(rustls::Error::General("reading TLS records".into()));
            }
            let state = tls.process_new_packets()?;
            if !self.handshake_seen.get() && !tls.is_handshaking() {
                self.handshake_seen.set(true);
                let cert = tls
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec());
                *self.peer_cert.borrow_mut() = cert;
            }
            let mut want = state.plaintext_bytes_to_read();
            while want > 0 {
                let buf = decoder.buffer_mut();
                let start = buf.len();
                buf.resize(start + want, 0);
                let got = tls.reader().read(&mut buf[start..]).unwrap_or(0);
                buf.truncate(start + got);
                if got == 0 {
                    break;
                }
                want -= got;
            }
            if state.peer_has_closed() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Runs every complete frame through the session.
    fn handle_frames(
        &self,
        worker: &Worker,
        decoder: &mut FrameDecoder,
        events: &mut Vec<SessionEvent>,
    ) {
        let metrics = worker.metrics();
        let peer = self.peer_cert.borrow();
        let cx = SessionContext {
            now_ms: now_ms(),
            auth: &worker.shared.auth,
            policy: &worker.shared.policy,
            peer_cert: peer.as_deref(),
            limits: &worker.shared.limits,
            shards: worker.shared.cores,
        };
        let mut session = self.session.borrow_mut();
        let mut out = self.out.borrow_mut();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    metrics.frames_in.fetch_add(1, Ordering::Relaxed);
                    let counter = match frame.kind() {
                        FrameKind::Envelope => Some(&metrics.envelopes_in),
                        FrameKind::Receipt => Some(&metrics.receipts_in),
                        FrameKind::Signal => Some(&metrics.signals_in),
                        _ => None,
                    };
                    if let Some(counter) = counter {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    session.handle_frame(&cx, &frame);
                }
                Ok(None) => break,
                Err(err) => {
                    session.handle_decode_error(err);
                    if err.is_framing() {
                        break;
                    }
                }
            }
            if session.is_closed() {
                break;
            }
        }
        session.poll_transmit(&mut out.scratch);
        while let Some(event) = session.poll_event() {
            events.push(event);
        }
        out.seal_scratch();
        if self.counted.get().is_none()
            && let Some(principal) = session.principal()
        {
            self.counted.set(Some(principal));
            count_connection(worker, principal, 1);
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("closing", &self.closing.get())
            .finish_non_exhaustive()
    }
}

fn count_connection(worker: &Worker, principal: Principal, delta: i64) {
    let (kind, network) = match principal {
        Principal::Server { network } => ("server", network),
        Principal::Device { device } => ("device", device.network),
    };
    worker.shared.connections.add(kind, network, delta);
}

/// Serves one accepted connection until it closes.
pub async fn serve(worker: Rc<Worker>, stream: TcpStream) {
    let Some((id, session_id)) = worker.reserve_slot() else {
        tracing::warn!(
            core = worker.index,
            "connection refused: connections_per_core_max reached"
        );
        return;
    };
    let _ = stream.set_nodelay(true);
    let mut tls = match ServerConnection::new(worker.shared.tls.clone()) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!("TLS session setup failed: {e}");
            return;
        }
    };
    // The outbox bounds what waits for this client; rustls need not bound it again.
    tls.set_buffer_limit(None);
    let conn = Rc::new(Conn {
        id,
        stream,
        tls: RefCell::new(tls),
        session: RefCell::new(Session::new(id, session_id, now_ms())),
        peer_cert: RefCell::new(None),
        handshake_seen: Cell::new(false),
        out: RefCell::new(Outbox::default()),
        writer_wake: Notify::new(),
        drained: Notify::new(),
        closing: Cell::new(false),
        counted: Cell::new(None),
        write_started: Cell::new(None),
    });
    worker.insert(conn.clone() as Rc<dyn Connection>);
    if let Some(at) = conn.session.borrow().poll_timeout() {
        worker.schedule_timer(id, at);
    }
    let writer = tokio_uring::spawn(write_loop(worker.clone(), conn.clone()));
    read_loop(&worker, &conn).await;
    conn.session.borrow_mut().handle_close(worker.shared.cores);
    conn.pump_session(&worker);
    worker.flush().await;
    conn.begin_close();
    let _ = writer.await;
    if let Some(principal) = conn.counted.get() {
        count_connection(&worker, principal, -1);
    }
    worker.remove(id);
}

async fn read_loop(worker: &Worker, conn: &Conn) {
    let mut buf = vec![0u8; READ_BUFFER_BYTES_MIN];
    let mut decoder = FrameDecoder::with_capacity(0);
    let mut events = Vec::new();
    let pending_max = worker.shared.limits.connection_pending_bytes_max as usize;
    while !conn.closing.get() {
        let (result, returned) = conn.stream.read(buf).await;
        buf = returned;
        let read = match result {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let started = Instant::now();
        worker
            .metrics()
            .bytes_in
            .fetch_add(read as u64, Ordering::Relaxed);
        let peer_closed = match conn.take_plaintext(&buf[..read], &mut decoder) {
            Ok(closed) => closed,
            Err(e) => {
                tracing::debug!(conn = ?conn.id, "TLS error: {e}");
                conn.begin_close();
                return;
            }
        };
        conn.handle_frames(worker, &mut decoder, &mut events);
        worker.dispatch(&mut events, conn);
        worker.flush().await;
        conn.wake_writer();
        worker.end_turn(started);
        if peer_closed {
            return;
        }
        if read == buf.len() && buf.len() < READ_BUFFER_BYTES {
            buf = vec![0u8; buf.len() * 2];
        }
        // Back-pressure: stop reading while this client has too much waiting to be written.
        while conn.out.borrow().bytes > pending_max && !conn.closing.get() {
            conn.drained.notified().await;
        }
    }
}

async fn write_loop(worker: Rc<Worker>, conn: Rc<Conn>) {
    // Grows with the first write; an idle connection keeps what its last turn needed.
    let mut spare: Vec<u8> = Vec::new();
    let mut close_notify_sent = false;
    loop {
        let mut tls_out = std::mem::take(&mut spare);
        tls_out.clear();
        {
            let mut tls = conn.tls.borrow_mut();
            let mut out = conn.out.borrow_mut();
            out.seal_scratch();
            // Hand rustls up to WRITE_SLICES_MAX chunks at a time: it encrypts straight from
            // them into full-size records, so a turn costs a few records, not one per frame.
            while !out.chunks.is_empty() {
                let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX];
                let mut count = 0;
                let mut total = 0;
                for (slot, chunk) in slices.iter_mut().zip(out.chunks.iter()) {
                    *slot = IoSlice::new(chunk);
                    total += chunk.len();
                    count += 1;
                }
                match tls.writer().write_vectored(&slices[..count]) {
                    Ok(written) if written == total => {
                        out.chunks.drain(..count);
                    }
                    _ => {
                        // Only a failed connection refuses plaintext (the buffer is unbounded).
                        conn.closing.set(true);
                        out.chunks.clear();
                    }
                }
            }
            out.bytes = 0;
            if conn.closing.get() && out.chunks.is_empty() && !close_notify_sent {
                tls.send_close_notify();
                close_notify_sent = true;
            }
            while tls.wants_write() {
                if tls.write_tls(&mut tls_out).is_err() {
                    break;
                }
            }
        }
        if !tls_out.is_empty() {
            let written = tls_out.len() as u64;
            conn.write_started.set(Some(Instant::now()));
            let (result, returned) = conn.stream.write_all(tls_out).await;
            conn.write_started.set(None);
            spare = returned;
            if result.is_err() {
                break;
            }
            worker
                .metrics()
                .bytes_out
                .fetch_add(written, Ordering::Relaxed);
            continue;
        }
        conn.drained.notify_waiters();
        if conn.closing.get() && close_notify_sent {
            break;
        }
        conn.writer_wake.notified().await;
    }
    conn.closing.set(true);
    conn.drained.notify_waiters();
    let _ = conn.stream.shutdown(Shutdown::Both);
}
