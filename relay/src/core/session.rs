//! One connection's protocol state: the handshake, who it speaks for, and what each frame it
//! sends turns into. Sans-IO: frames and the time in; reply frames (written into the
//! connection's output buffer) and work for shards out.

use bytes::BytesMut;
use codec::{
    Ack, AckStatus, ArchivedDeviceSelection, CodecError, DeviceId, ErrorCode, ErrorFrame, Frame,
    HeaderRef, MessageId, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, SessionLimits, Welcome,
    encode,
};

use super::auth::{Auth, Refused};
use super::policy::{PartnerStatus, Policy};
use super::shard::interface::{Refusal, Routed, ShardInput};
use super::{ConnId, DeviceSet, Principal, shard_of};
use crate::limits::RelayLimits;

/// What a session asks of the IO shell.
#[derive(Debug)]
pub enum SessionEvent {
    /// Work for the shard with this index.
    Route { shard: u16, input: ShardInput },
    /// Work for every shard (a server session joining or leaving).
    Broadcast(ShardInput),
    /// An error was written to the client (for the errors-by-code metric).
    Refused(ErrorCode),
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
    /// Envelopes and receipts routed and not yet acknowledged by the relay.
    in_flight: u32,
}

impl Session {
    pub fn new(conn: ConnId, session_id: u64) -> Session {
        Session {
            conn,
            session_id,
            principal: None,
            closed: false,
            in_flight: 0,
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
    pub fn handle_frame(
        &mut self,
        cx: &SessionContext<'_>,
        frame: &Frame,
        out: &mut BytesMut,
        events: &mut Vec<SessionEvent>,
    ) {
        if self.closed {
            return;
        }
        let view = match frame.decode() {
            Ok(view) => view,
            Err(error) => return self.handle_decode_error(error, out, events),
        };
        let Some(principal) = self.principal else {
            return match view.header {
                // A device of a suspended network is refused before its token is even
                // recorded (a suspended network cannot fill the replay cache).
                HeaderRef::Hello(hello)
                    if matches!(&hello.token, rkyv::option::ArchivedOption::Some(t)
                        if cx.policy.network_status(t.device.get().network)
                            == Some(PartnerStatus::Suspended)) =>
                {
                    self.fail(
                        ErrorCode::PartnerSuspended,
                        "this device's network is suspended",
                        out,
                        events,
                    )
                }
                HeaderRef::Hello(hello) => {
                    match cx.auth.authenticate(cx.now_ms, hello, cx.peer_cert) {
                        Ok(principal)
                            if cx.policy.network_status(principal.network())
                                == Some(PartnerStatus::Suspended) =>
                        {
                            self.fail(
                                ErrorCode::PartnerSuspended,
                                &format!("network {} is suspended", principal.network()),
                                out,
                                events,
                            )
                        }
                        Ok(principal) => self.establish(
                            cx,
                            principal,
                            hello.version_min.to_native(),
                            hello.version_max.to_native(),
                            out,
                            events,
                        ),
                        Err(Refused { code, reason }) => self.fail(code, &reason, out, events),
                    }
                }
                _ => self.fail(
                    ErrorCode::HelloRequired,
                    "the first frame must be Hello",
                    out,
                    events,
                ),
            };
        };
        match view.header {
            HeaderRef::Envelope(envelope) => {
                let sender = envelope.sender.get();
                let id = envelope.message_id.get();
                if !principal.may_act_as(&sender) {
                    return reject(out, events, id, sender, ErrorCode::SenderNotAllowed);
                }
                if view.payload.len() > cx.limits.payload_bytes_max as usize {
                    return reject(out, events, id, sender, ErrorCode::PayloadTooLarge);
                }
                let ttl_seconds = envelope.ttl_seconds.to_native();
                let sent_at = envelope.timestamp_ms.to_native();
                if sent_at.saturating_add(u64::from(ttl_seconds) * 1000) < cx.now_ms {
                    return reject(out, events, id, sender, ErrorCode::MessageExpired);
                }
                let listed = match &envelope.devices {
                    ArchivedDeviceSelection::All => None,
                    ArchivedDeviceSelection::Listed(ids) => {
                        let mut set = DeviceSet::new();
                        for id in ids.iter() {
                            set.insert(id.get());
                        }
                        Some(set)
                    }
                };
                let ephemeral = envelope.flags.to_native() & codec::envelope_flags::EPHEMERAL != 0;
                let recipient = envelope.recipient.get();
                let routed = Routed {
                    sender,
                    recipient,
                    listed,
                    id,
                    ephemeral,
                    ttl_seconds,
                    frame: frame.as_bytes().clone(),
                    reply_to: self.conn,
                };
                self.route(cx, routed, ShardInput::Envelope, out, events);
            }
            HeaderRef::Receipt(receipt) => {
                let sender = receipt.sender.get();
                let id = receipt.receipt_id.get();
                if !principal.may_act_as(&sender) {
                    return reject(out, events, id, sender, ErrorCode::SenderNotAllowed);
                }
                let routed = Routed {
                    sender,
                    recipient: receipt.recipient.get(),
                    listed: None,
                    id,
                    ephemeral: false,
                    ttl_seconds: cx.limits.ttl_seconds_max,
                    frame: frame.as_bytes().clone(),
                    reply_to: self.conn,
                };
                self.route(cx, routed, ShardInput::Receipt, out, events);
            }
            HeaderRef::Signal(signal) => {
                if !principal.may_act_as(&signal.sender.get()) {
                    return error(
                        out,
                        events,
                        ErrorCode::SenderNotAllowed,
                        None,
                        false,
                        "a signal's sender must be one of yours",
                    );
                }
                let recipient = signal.recipient.get();
                let sender = signal.sender.get().user_address();
                if let Err(code) = cx.policy.check(&sender, &recipient) {
                    return error(
                        out,
                        events,
                        code,
                        None,
                        false,
                        "the interop rules do not let this signal through",
                    );
                }
                if cx.policy.admit(&sender, &recipient, cx.now_ms).is_err() {
                    return error(
                        out,
                        events,
                        ErrorCode::RateLimited,
                        None,
                        false,
                        "your network is over its traffic limit; the signal was dropped",
                    );
                }
                let shard = shard_of(&recipient, cx.shards);
                events.push(SessionEvent::Route {
                    shard,
                    input: ShardInput::Signal {
                        recipient,
                        frame: frame.as_bytes().clone(),
                    },
                });
            }
            HeaderRef::Ack(ack) => {
                let device = ack.address.get();
                if !principal.may_act_as(&device) {
                    return error(
                        out,
                        events,
                        ErrorCode::SenderNotAllowed,
                        Some(ack.message_id.get()),
                        false,
                        "you may only acknowledge for your own devices",
                    );
                }
                let shard = shard_of(&device.user_address(), cx.shards);
                events.push(SessionEvent::Route {
                    shard,
                    input: ShardInput::DeviceAck {
                        device,
                        id: ack.message_id.get(),
                    },
                });
            }
            HeaderRef::DeviceList(list) => {
                let user = list.user.get();
                let request_id = list.request_id.get();
                if !matches!(principal, Principal::Server { .. }) {
                    return error(
                        out,
                        events,
                        ErrorCode::UnexpectedFrame,
                        Some(request_id),
                        false,
                        "only server sessions declare device sets",
                    );
                }
                if !principal.may_manage(&user) {
                    return reject(
                        out,
                        events,
                        request_id,
                        user.device(DeviceId(0)),
                        ErrorCode::SenderNotAllowed,
                    );
                }
                let devices = list.devices.iter().map(|d| d.get()).collect();
                let shard = shard_of(&user, cx.shards);
                events.push(SessionEvent::Route {
                    shard,
                    input: ShardInput::DeviceList {
                        request_id,
                        user,
                        devices,
                        reply_to: self.conn,
                    },
                });
            }
            HeaderRef::Error(_) => {
                // A client's report of our error: nothing to answer; the IO shell logs it.
            }
            HeaderRef::Hello(_)
            | HeaderRef::Welcome(_)
            | HeaderRef::Notice(_)
            | HeaderRef::Delivery(_) => {
                error(
                    out,
                    events,
                    ErrorCode::UnexpectedFrame,
                    None,
                    false,
                    &format!("a client does not send {:?}", view.kind()),
                );
            }
        }
    }

    /// A frame that failed to decode: framing errors end the session, others spoil one frame.
    pub fn handle_decode_error(
        &mut self,
        err: CodecError,
        out: &mut BytesMut,
        events: &mut Vec<SessionEvent>,
    ) {
        if err.is_framing() {
            return self.fail(err.code(), &err.to_string(), out, events);
        }
        error(out, events, err.code(), None, false, &err.to_string());
    }

    /// The relay's `Ack` for one of this session's frames is being written.
    pub fn on_relay_ack(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// The connection is gone: its devices and server binding leave the shards.
    pub fn on_close(&mut self, cx_shards: u16, events: &mut Vec<SessionEvent>) {
        match self.principal.take() {
            Some(Principal::Device { device }) => {
                let shard = shard_of(&device.user_address(), cx_shards);
                events.push(SessionEvent::Route {
                    shard,
                    input: ShardInput::DetachDevice {
                        device,
                        conn: self.conn,
                    },
                });
            }
            Some(Principal::Server { network }) => {
                events.push(SessionEvent::Broadcast(ShardInput::DetachServer {
                    network,
                    conn: self.conn,
                }));
            }
            None => {}
        }
        self.closed = true;
    }

    fn route(
        &mut self,
        cx: &SessionContext<'_>,
        routed: Routed,
        kind: fn(Routed) -> ShardInput,
        out: &mut BytesMut,
        events: &mut Vec<SessionEvent>,
    ) {
        if let Err(code) = cx
            .policy
            .check(&routed.sender.user_address(), &routed.recipient)
        {
            return reject(out, events, routed.id, routed.sender, code);
        }
        if let Err(retry_after_ms) =
            cx.policy
                .admit(&routed.sender.user_address(), &routed.recipient, cx.now_ms)
        {
            events.push(SessionEvent::Refused(ErrorCode::RateLimited));
            let refusal = Refusal {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                current_devices: DeviceSet::new(),
            };
            return write_ack(out, routed.id, routed.sender, Err(refusal));
        }
        if self.in_flight >= cx.limits.frames_in_flight_max {
            return reject(
                out,
                events,
                routed.id,
                routed.sender,
                ErrorCode::InFlightLimit,
            );
        }
        self.in_flight += 1;
        let shard = shard_of(&routed.recipient, cx.shards);
        events.push(SessionEvent::Route {
            shard,
            input: kind(routed),
        });
    }

    fn establish(
        &mut self,
        cx: &SessionContext<'_>,
        principal: Principal,
        version_min: u16,
        version_max: u16,
        out: &mut BytesMut,
        events: &mut Vec<SessionEvent>,
    ) {
        let low = version_min.max(PROTOCOL_VERSION_MIN);
        let high = version_max.min(PROTOCOL_VERSION_MAX);
        if low > high {
            let reason = format!(
                "this relay speaks versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION_MAX}"
            );
            return self.fail(ErrorCode::UnsupportedVersion, &reason, out, events);
        }
        let l = cx.limits;
        let welcome = Welcome {
            version: high,
            session_id: self.session_id,
            features: 0,
            limits: SessionLimits {
                frame_bytes_max: u32::try_from(codec::limits::FRAME_BYTES_MAX).unwrap_or(u32::MAX),
                payload_bytes_max: l.payload_bytes_max,
                recipient_devices_max: u16::try_from(codec::limits::RECIPIENT_DEVICES_MAX)
                    .unwrap_or(u16::MAX),
                receipt_ids_max: u16::try_from(codec::limits::RECEIPT_IDS_MAX).unwrap_or(u16::MAX),
                devices_per_user_max: l.devices_per_user_max,
                frames_in_flight_max: l.frames_in_flight_max,
                ttl_seconds_max: l.ttl_seconds_max,
            },
        };
        if encode(out, &welcome, &[]).is_err() {
            return self.fail(ErrorCode::Internal, "could not encode Welcome", out, events);
        }
        self.principal = Some(principal);
        match principal {
            Principal::Device { device } => {
                let shard = shard_of(&device.user_address(), cx.shards);
                events.push(SessionEvent::Route {
                    shard,
                    input: ShardInput::AttachDevice {
                        device,
                        conn: self.conn,
                    },
                });
            }
            Principal::Server { network } => {
                events.push(SessionEvent::Broadcast(ShardInput::AttachServer {
                    network,
                    conn: self.conn,
                }));
            }
        }
    }

    /// A fatal error: report it and close. The IO shell then calls [`Session::on_close`],
    /// which takes the session out of the shards.
    fn fail(
        &mut self,
        code: ErrorCode,
        reason: &str,
        out: &mut BytesMut,
        events: &mut Vec<SessionEvent>,
    ) {
        error(out, events, code, None, true, reason);
        self.closed = true;
        events.push(SessionEvent::Close);
    }
}

/// Writes an `Error` frame.
pub fn error(
    out: &mut BytesMut,
    events: &mut Vec<SessionEvent>,
    code: ErrorCode,
    refers_to: Option<MessageId>,
    fatal: bool,
    reason: &str,
) {
    events.push(SessionEvent::Refused(code));
    let mut end = reason.len().min(codec::limits::ERROR_REASON_BYTES_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = ErrorFrame {
        code: code.as_u16(),
        refers_to,
        fatal,
        reason: reason[..end].to_string(),
    };
    // Within limits by construction; nothing else can fail.
    let _ = encode(out, &frame, &[]);
}

/// Writes a rejected `Ack` for a frame refused before routing.
fn reject(
    out: &mut BytesMut,
    events: &mut Vec<SessionEvent>,
    id: MessageId,
    address: codec::DeviceAddress,
    code: ErrorCode,
) {
    events.push(SessionEvent::Refused(code));
    write_ack(
        out,
        id,
        address,
        Err(Refusal {
            code,
            retry_after_ms: 0,
            current_devices: DeviceSet::new(),
        }),
    );
}

/// Writes the relay's `Ack` for `id`.
pub fn write_ack(
    out: &mut BytesMut,
    id: MessageId,
    address: codec::DeviceAddress,
    result: Result<(), Refusal>,
) {
    let status = match result {
        Ok(()) => AckStatus::Accepted,
        Err(refusal) => AckStatus::Rejected {
            code: refusal.code.as_u16(),
            retry_after_ms: refusal.retry_after_ms,
            current_devices: refusal.current_devices.as_slice().to_vec(),
        },
    };
    let _ = encode(
        out,
        &Ack {
            message_id: id,
            address,
            status,
        },
        &[],
    );
}
