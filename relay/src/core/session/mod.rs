//! One connection's protocol state, as a whole sans-IO state machine: the handshake, who it
//! speaks for, what each frame it sends turns into, the relay's acks for it, and its
//! deadlines. Inputs: [`Session::handle_frame`], [`Session::handle_decode_error`],
//! [`Session::handle_relay_ack`], [`Session::handle_timeout`], [`Session::handle_close`].
//! Outputs: [`Session::poll_transmit`] (frames of the relay's own to write: `Welcome`, acks,
//! errors), [`Session::poll_event`] (work for shards, metrics, close) and
//! [`Session::poll_timeout`]. The shell only moves bytes and timers.
//!
//! `frames.rs` holds one function per frame kind; `reply.rs` encodes what the session writes.

mod frames;
mod reply;

use std::collections::VecDeque;

use bytes::BytesMut;
use codec::{CodecError, DeviceAddress, ErrorCode, Frame, KeepAlive, MessageId, encode};

use super::ConnId;
use super::shard::interface::{AckOf, Refusal, ShardInput};
use super::shard_of;
use crate::limits::{HELLO_TIMEOUT, RelayLimits};
use crate::tables::auth::{Auth, Principal};
use crate::tables::policy::{ContactEvent, Policy};

pub use self::reply::{encode_ack, encode_error};

/// What a session asks of the IO shell.
#[derive(Debug)]
pub enum SessionEvent {
    /// Work for the shard with this index.
    Route { shard: u16, input: ShardInput },
    /// Work for every shard (a server session joining or leaving).
    Broadcast(ShardInput),
    /// An error was written to the client (for the errors-by-code metric).
    Refused(ErrorCode),
    /// A cross-network frame was checked against the interop rules (for `/metrics`).
    PolicyChecked { refused: bool },
    /// A first contact between two users, for the shell to record
    /// (`Policy::record_contact`).
    Contact(ContactEvent),
    /// A deadline passed and the session is closing for it (for `/metrics`).
    DeadlinePassed(Deadline),
    /// A `KeepAlive` request was written to a quiet session (for `/metrics`).
    KeepAliveSent,
    /// Flush what was written and close the connection.
    Close,
}

/// The session's deadlines (`RelayLimits`: `tls_handshake_timeout_ms`, `hello_timeout_ms`,
/// `idle_timeout_ms`; a device session's token expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    Handshake,
    Hello,
    Idle,
    TokenExpiry,
}

impl Deadline {
    pub const ALL: [Deadline; 4] = [
        Deadline::Handshake,
        Deadline::Hello,
        Deadline::Idle,
        Deadline::TokenExpiry,
    ];

    /// The label `/metrics` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Deadline::Handshake => "handshake",
            Deadline::Hello => "hello",
            Deadline::Idle => "idle",
            Deadline::TokenExpiry => "token_expiry",
        }
    }
}

/// What a session needs to know of the world for one call.
#[derive(Debug)]
pub struct SessionContext<'a> {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub now_ms: u64,
    pub auth: &'a Auth,
    /// The interop rules every cross-network frame is checked against.
    pub policy: &'a Policy,
    /// The TLS client certificate (DER), if the client sent one.
    pub peer_cert: Option<&'a [u8]>,
    pub limits: &'a RelayLimits,
    pub shards: u16,
}

#[derive(Debug)]
pub struct Session {
    conn: ConnId,
    session_id: u64,
    /// Set once `Hello` is accepted; taken when the session leaves the shards.
    principal: Option<Principal>,
    closed: bool,
    /// Envelopes and receipts routed to shards and not yet acknowledged by the relay: what
    /// `frames_in_flight_max` bounds, counted up in `route` and down in `handle_relay_ack`.
    in_flight: u32,
    /// Until TLS is up: when the connection is given up (no frame can be sent then).
    handshake_deadline_ms: Option<u64>,
    /// From TLS up until `Hello` is accepted: when the session is given up.
    hello_deadline_ms: Option<u64>,
    /// How long `Hello` may take once TLS is up.
    hello_timeout_ms: u64,
    /// When the client last sent anything: the idle deadline runs from it.
    last_input_ms: u64,
    idle_timeout_ms: u64,
    /// The client enabled `features::KEEPALIVE`: it is asked before its idle deadline.
    keepalive: bool,
    /// A `KeepAlive` request went out since the client last sent anything.
    keepalive_asked: bool,
    /// A device session ends when its token expires.
    token_expires_ms: Option<u64>,
    /// Frames of the relay's own, encoded, waiting for the shell.
    transmit: BytesMut,
    events: VecDeque<SessionEvent>,
}

impl Session {
    /// A session whose transport is up: `Hello` is due within `HELLO_TIMEOUT`; the other
    /// deadlines are the default limits'. (The sans-IO harnesses start here.)
    pub fn new(conn: ConnId, session_id: u64, now_ms: u64) -> Session {
        let limits = RelayLimits {
            hello_timeout_ms: u32::try_from(HELLO_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
            ..RelayLimits::default()
        };
        let mut session = Session::accepted(conn, session_id, now_ms, &limits);
        session.handle_tls_established(now_ms);
        session
    }

    /// A session for a connection just accepted: TLS must be up within
    /// `tls_handshake_timeout_ms` ([`Session::handle_tls_established`]), then `Hello` within
    /// `hello_timeout_ms`.
    pub fn accepted(conn: ConnId, session_id: u64, now_ms: u64, limits: &RelayLimits) -> Session {
        let handshake_ms = u64::from(limits.tls_handshake_timeout_ms);
        Session {
            conn,
            session_id,
            principal: None,
            closed: false,
            in_flight: 0,
            handshake_deadline_ms: Some(now_ms.saturating_add(handshake_ms)),
            hello_deadline_ms: None,
            hello_timeout_ms: u64::from(limits.hello_timeout_ms),
            last_input_ms: now_ms,
            idle_timeout_ms: u64::from(limits.idle_timeout_ms),
            keepalive: false,
            keepalive_asked: false,
            token_expires_ms: None,
            transmit: BytesMut::new(),
            events: VecDeque::new(),
        }
    }

    /// The TLS handshake finished: `Hello` is due now.
    pub fn handle_tls_established(&mut self, now_ms: u64) {
        if self.closed || self.handshake_deadline_ms.is_none() {
            return;
        }
        self.handshake_deadline_ms = None;
        self.hello_deadline_ms = Some(now_ms.saturating_add(self.hello_timeout_ms));
    }

    /// Bytes arrived from the client (a whole frame or not): it is not idle.
    pub fn handle_input(&mut self, now_ms: u64) {
        self.last_input_ms = self.last_input_ms.max(now_ms);
        self.keepalive_asked = false;
    }

    /// Before authentication, the client announced a frame of `len` bytes, more than
    /// `preauth_bytes_max`: the session ends.
    pub fn handle_preauth_overflow(&mut self, len: usize, max: u32) {
        let reason = format!(
            "a frame of {len} bytes before authentication; the relay buffers {max} for an unauthenticated client"
        );
        self.fail(ErrorCode::PreauthLimit, &reason);
    }

    /// Whether `Hello` was accepted.
    pub fn is_established(&self) -> bool {
        self.principal.is_some()
    }

    pub fn principal(&self) -> Option<Principal> {
        self.principal
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Handles one frame from the client.
    pub fn handle_frame(&mut self, cx: &SessionContext<'_>, frame: &Frame) {
        if self.closed {
            return;
        }
        match frame.decode() {
            Ok(view) => self.on_frame(cx, frame, view),
            Err(error) => self.handle_decode_error(error),
        }
    }

    /// A frame that failed to decode: framing errors end the session, others spoil one frame.
    /// Before authentication every error ends it: an unknown client gets one error, no more.
    pub fn handle_decode_error(&mut self, err: CodecError) {
        if err.is_framing() || self.principal.is_none() {
            return self.fail(err.code(), &err.to_string());
        }
        self.error(err.code(), None, &err.to_string());
    }

    /// The relay's answer to a frame of this session, from its shard: written as an `Ack`; a
    /// routed frame's answer frees its place in the in-flight bound.
    pub fn handle_relay_ack(
        &mut self,
        of: AckOf,
        id: MessageId,
        address: DeviceAddress,
        result: Result<(), Refusal>,
    ) {
        if of == AckOf::Routed {
            assert!(self.in_flight > 0, "an ack for nothing in flight");
            self.in_flight -= 1;
        }
        if let Err(refusal) = &result {
            self.events.push_back(SessionEvent::Refused(refusal.code));
        }
        encode_ack(&mut self.transmit, id, address, result);
    }

    /// The relay closes the session (e.g. a device past the user's limit, a suspension).
    pub fn handle_relay_close(&mut self, code: ErrorCode) {
        self.fail(code, "the session is closed by the relay");
    }

    /// The relay is stopping.
    pub fn handle_shutdown(&mut self) {
        self.fail(ErrorCode::ShuttingDown, "the relay is shutting down");
    }

    /// The next time [`Session::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.closed {
            return None;
        }
        if self.principal.is_none() {
            return self.handshake_deadline_ms.or(self.hello_deadline_ms);
        }
        let idle = self.last_input_ms.saturating_add(self.idle_timeout_ms);
        let ask = (self.keepalive && !self.keepalive_asked)
            .then(|| self.last_input_ms.saturating_add(self.idle_timeout_ms / 2));
        [Some(idle), ask, self.token_expires_ms]
            .into_iter()
            .flatten()
            .min()
    }

    /// Acts on the deadlines that passed: closes the session, or asks a quiet client that
    /// enabled the feature for a `KeepAlive`.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.closed {
            return;
        }
        let passed = |at: Option<u64>| at.is_some_and(|at| at <= now_ms);
        if passed(self.handshake_deadline_ms) {
            // No TLS session, so no frame: the code is for the log and `/metrics`.
            self.events
                .push_back(SessionEvent::DeadlinePassed(Deadline::Handshake));
            self.events
                .push_back(SessionEvent::Refused(ErrorCode::HandshakeTimeout));
            self.closed = true;
            self.handshake_deadline_ms = None;
            self.events.push_back(SessionEvent::Close);
            return;
        }
        if passed(self.hello_deadline_ms) {
            self.events
                .push_back(SessionEvent::DeadlinePassed(Deadline::Hello));
            return self.fail(
                ErrorCode::HelloRequired,
                "no Hello in time after the TLS handshake",
            );
        }
        if self.principal.is_none() {
            return;
        }
        if passed(self.token_expires_ms) {
            self.events
                .push_back(SessionEvent::DeadlinePassed(Deadline::TokenExpiry));
            return self.fail(
                ErrorCode::TokenExpired,
                "the session's device token expired; reconnect with a fresh one",
            );
        }
        if self.last_input_ms.saturating_add(self.idle_timeout_ms) <= now_ms {
            self.events
                .push_back(SessionEvent::DeadlinePassed(Deadline::Idle));
            let reason = format!("nothing received for {} ms", self.idle_timeout_ms);
            return self.fail(ErrorCode::IdleTimeout, &reason);
        }
        let ask_at = self.last_input_ms.saturating_add(self.idle_timeout_ms / 2);
        if self.keepalive && !self.keepalive_asked && ask_at <= now_ms {
            self.keepalive_asked = true;
            let ask = KeepAlive {
                nonce: now_ms,
                reply: false,
            };
            // Within limits by construction.
            let _ = encode(&mut self.transmit, &ask, &[]);
            self.events.push_back(SessionEvent::KeepAliveSent);
        }
    }

    /// The connection is gone: its devices and server binding leave the shards.
    pub fn handle_close(&mut self, shards: u16) {
        match self.principal.take() {
            Some(Principal::Device { device }) => {
                let shard = shard_of(&device.user_address(), shards);
                self.events.push_back(SessionEvent::Route {
                    shard,
                    input: ShardInput::DetachDevice {
                        device,
                        conn: self.conn,
                    },
                });
            }
            Some(Principal::Server { network }) => {
                self.events
                    .push_back(SessionEvent::Broadcast(ShardInput::DetachServer {
                        network,
                        conn: self.conn,
                    }));
            }
            None => {}
        }
        self.closed = true;
    }

    /// Moves the frames the session wrote into `out` (the connection's write buffer).
    pub fn poll_transmit(&mut self, out: &mut BytesMut) {
        // A few small frames: copied, so the session's buffer keeps its capacity.
        out.extend_from_slice(&self.transmit);
        self.transmit.clear();
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Writes an `Error` frame.
    fn error(&mut self, code: ErrorCode, refers_to: Option<MessageId>, reason: &str) {
        self.events.push_back(SessionEvent::Refused(code));
        encode_error(&mut self.transmit, code, refers_to, false, reason);
    }

    /// A fatal error: report it and close. The shell then calls [`Session::handle_close`],
    /// which takes the session out of the shards.
    fn fail(&mut self, code: ErrorCode, reason: &str) {
        if self.closed {
            return;
        }
        self.events.push_back(SessionEvent::Refused(code));
        encode_error(&mut self.transmit, code, None, true, reason);
        self.closed = true;
        self.handshake_deadline_ms = None;
        self.hello_deadline_ms = None;
        self.events.push_back(SessionEvent::Close);
    }

    /// Writes a rejected `Ack` for a frame refused before routing (never counted in flight).
    fn reject(&mut self, id: MessageId, address: DeviceAddress, refusal: Refusal) {
        self.events.push_back(SessionEvent::Refused(refusal.code));
        encode_ack(&mut self.transmit, id, address, Err(refusal));
    }
}
