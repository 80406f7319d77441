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
use codec::{CodecError, DeviceAddress, ErrorCode, Frame, MessageId};

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
    /// Flush what was written and close the connection.
    Close,
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
    /// Until `Hello` is accepted: when the session is given up.
    hello_deadline_ms: Option<u64>,
    /// Frames of the relay's own, encoded, waiting for the shell.
    transmit: BytesMut,
    events: VecDeque<SessionEvent>,
}

impl Session {
    pub fn new(conn: ConnId, session_id: u64, now_ms: u64) -> Session {
        let hello_ms = u64::try_from(HELLO_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        Session {
            conn,
            session_id,
            principal: None,
            closed: false,
            in_flight: 0,
            hello_deadline_ms: Some(now_ms.saturating_add(hello_ms)),
            transmit: BytesMut::new(),
            events: VecDeque::new(),
        }
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
    pub fn handle_decode_error(&mut self, err: CodecError) {
        if err.is_framing() {
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
        self.hello_deadline_ms
    }

    /// Gives up on a session whose deadline passed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.closed {
            return;
        }
        if self.hello_deadline_ms.is_some_and(|at| at <= now_ms) {
            self.fail(
                ErrorCode::HelloRequired,
                "no Hello in time after the connection opened",
            );
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
        self.hello_deadline_ms = None;
        self.events.push_back(SessionEvent::Close);
    }

    /// Writes a rejected `Ack` for a frame refused before routing (never counted in flight).
    fn reject(&mut self, id: MessageId, address: DeviceAddress, refusal: Refusal) {
        self.events.push_back(SessionEvent::Refused(refusal.code));
        encode_ack(&mut self.transmit, id, address, Err(refusal));
    }
}
