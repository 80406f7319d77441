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
use codec::{Delivery, ErrorCode, FrameDecoder, FrameKind, delivery_flags, encode_head};
use rustls::ServerConnection;
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;

use super::worker::{Admitted, Connection, Worker};
use crate::core::ConnId;
use crate::core::session::{Session, SessionContext, SessionEvent};
use crate::core::shard::interface::ShardOutput;
use crate::limits::SLOW_CONSUMER_AFTER;
use crate::metrics::AcceptRefusal;
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
    /// While unauthenticated: how it was admitted (what to release when that ends).
    unauthenticated: Cell<Option<Admitted>>,
    /// While the writer has bytes in flight: when the client last took some (ms since the
    /// epoch). The write deadline runs from it; the slow-consumer rule reads it too.
    write_progress_ms: Cell<Option<u64>>,
    /// Bytes rustls has encrypted for the client and the socket has not taken yet.
    writing_bytes: Cell<usize>,
    /// The earliest time a timer of this connection is scheduled for (`u64::MAX`: none).
    timer_at: Cell<u64>,
}

impl Conn {
    fn wake_writer(&self) {
        self.writer_wake.notify_one();
    }

    /// Everything waiting for the client: frames not yet encrypted, and encrypted bytes the
    /// socket has not taken.
    fn pending_bytes(&self) -> usize {
        let out = self.out.borrow();
        out.bytes + out.scratch.len() + self.writing_bytes.get()
    }

    /// The write deadline, while the writer waits on the socket.
    fn write_deadline_ms(&self, worker: &Worker) -> Option<u64> {
        let timeout = u64::from(worker.shared.limits.write_timeout_ms);
        self.write_progress_ms
            .get()
            .map(|since| since.saturating_add(timeout))
    }

    /// Makes sure the worker's timer calls back by the earliest of the session's deadlines
    /// and the write deadline. Later timers already scheduled are harmless (`on_timer` looks
    /// again), so a deadline that moves later costs nothing until it is reached.
    fn ensure_timer(&self, worker: &Worker) {
        let session = self.session.borrow().poll_timeout();
        let due = [session, self.write_deadline_ms(worker)]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = due
            && at < self.timer_at.get()
        {
            self.timer_at.set(at);
            worker.schedule_timer(self.id, at);
        }
    }

    /// No longer unauthenticated (it authenticated, or it is closing).
    fn leave_unauthenticated(&self, worker: &Worker) {
        if let Some(admitted) = self.unauthenticated.take() {
            worker.leave_unauthenticated(admitted);
        }
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
        self.timer_at.set(u64::MAX);
        if self
            .write_deadline_ms(worker)
            .is_some_and(|at| at <= now_ms)
        {
            // The client took none of our bytes for the write deadline: whatever waits for
            // it (in the outbox and inside TLS) is dropped with the connection; its
            // deliveries stay queued. Shutting the socket ends the writer's write and the
            // reader's read.
            let metrics = worker.metrics();
            metrics
                .port
                .write_deadline_closes
                .fetch_add(1, Ordering::Relaxed);
            metrics.error(ErrorCode::WriteTimeout);
            self.write_progress_ms.set(None);
            self.closing.set(true);
            let _ = self.stream.shutdown(Shutdown::Both);
            self.drained.notify_waiters();
            return;
        }
        let due = self
            .session
            .borrow()
            .poll_timeout()
            .is_some_and(|at| at <= now_ms);
        if due {
            self.session.borrow_mut().handle_timeout(now_ms);
            self.pump_session(worker);
            self.wake_writer();
            if self.session.borrow().is_closed() {
                // Ends the reader's pending read, which takes the session out of the shards.
                let _ = self.stream.shutdown(Shutdown::Read);
                return;
            }
        }
        self.ensure_timer(worker);
    }

    fn is_unauthenticated(&self) -> bool {
        self.unauthenticated.get().is_some()
    }

    fn evict(&self, worker: &Worker) {
        self.leave_unauthenticated(worker);
        self.session
            .borrow_mut()
            .handle_relay_close(ErrorCode::UnauthenticatedEvicted);
        self.pump_session(worker);
        let _ = self.stream.shutdown(Shutdown::Read);
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
        // Everything that waits for the client counts, the bytes already inside TLS too.
        let over = out.bytes + out.scratch.len() + self.writing_bytes.get()
            > 2 * worker.shared.limits.connection_pending_bytes_max as usize;
        let stuck = || {
            let after = u64::try_from(SLOW_CONSUMER_AFTER.as_millis()).unwrap_or(u64::MAX);
            self.write_progress_ms
                .get()
                .is_some_and(|since| now_ms().saturating_sub(since) >= after)
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
                self.session.borrow_mut().handle_tls_established(now_ms());
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
        let preauth_max = worker.shared.limits.preauth_bytes_max;
        if decoder.buffered_len() > 0 {
            session.handle_input(cx.now_ms);
        }
        loop {
            // Before authentication a client may make the relay hold at most
            // `preauth_bytes_max` (plus one read): a longer frame is refused as announced.
            if !session.is_established()
                && let Ok(Some(len)) = codec::frame_len(decoder.buffer_mut())
                && len > preauth_max as usize
            {
                session.handle_preauth_overflow(len, preauth_max);
                break;
            }
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
            self.leave_unauthenticated(worker);
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
pub async fn serve(worker: Rc<Worker>, stream: TcpStream, admitted: Admitted) {
    let Some((id, session_id)) = worker.reserve_slot() else {
        worker.leave_unauthenticated(admitted);
        worker
            .metrics()
            .port
            .refused(AcceptRefusal::ConnectionsFull);
        tracing::debug!(
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
            worker.leave_unauthenticated(admitted);
            return;
        }
    };
    // The outbox bounds what waits for this client; rustls need not bound it again.
    tls.set_buffer_limit(None);
    let conn = Rc::new(Conn {
        id,
        stream,
        tls: RefCell::new(tls),
        session: RefCell::new(Session::accepted(
            id,
            session_id,
            now_ms(),
            &worker.shared.limits,
        )),
        peer_cert: RefCell::new(None),
        handshake_seen: Cell::new(false),
        out: RefCell::new(Outbox::default()),
        writer_wake: Notify::new(),
        drained: Notify::new(),
        closing: Cell::new(false),
        counted: Cell::new(None),
        unauthenticated: Cell::new(Some(admitted)),
        write_progress_ms: Cell::new(None),
        writing_bytes: Cell::new(0),
        timer_at: Cell::new(u64::MAX),
    });
    worker.insert(conn.clone() as Rc<dyn Connection>);
    worker.track_unauthenticated(id);
    conn.ensure_timer(&worker);
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
    conn.leave_unauthenticated(&worker);
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
        conn.ensure_timer(worker);
        worker.flush().await;
        conn.wake_writer();
        worker.end_turn(started);
        if peer_closed {
            return;
        }
        // An unauthenticated client keeps the smallest buffer: what it can make the relay
        // hold stays small (it sends at most a Hello anyway).
        if read == buf.len() && buf.len() < READ_BUFFER_BYTES && !conn.is_unauthenticated() {
            buf = vec![0u8; buf.len() * 2];
        }
        // Back-pressure: stop reading while this client has too much waiting to be written.
        while conn.pending_bytes() > pending_max && !conn.closing.get() {
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
            let (result, returned) = write_tracked(&worker, &conn, tls_out).await;
            spare = returned;
            if result.is_err() {
                break;
            }
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

/// Writes all of `buf`, one socket write at a time, keeping the write deadline's clock: the
/// bytes not yet taken count as pending (`writing_bytes`), and each write that takes some
/// restarts `write_progress_ms`. The timer closes the socket past the deadline, which ends
/// the write in flight.
async fn write_tracked(
    worker: &Worker,
    conn: &Conn,
    buf: Vec<u8>,
) -> (std::io::Result<()>, Vec<u8>) {
    use tokio_uring::buf::BoundedBuf;
    let total = buf.len();
    let mut written = 0;
    let mut buf = buf;
    conn.writing_bytes.set(total);
    conn.write_progress_ms.set(Some(now_ms()));
    conn.ensure_timer(worker);
    let result = loop {
        if written == total {
            break Ok(());
        }
        let (result, slice) = conn.stream.write(buf.slice(written..)).submit().await;
        buf = slice.into_inner();
        match result {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                conn.writing_bytes.set(total - written);
                if conn.write_progress_ms.get().is_some() {
                    conn.write_progress_ms.set(Some(now_ms()));
                }
                worker
                    .metrics()
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
                conn.drained.notify_waiters();
            }
            Err(e) => break Err(e),
        }
    };
    conn.writing_bytes.set(0);
    conn.write_progress_ms.set(None);
    (result, buf)
}
