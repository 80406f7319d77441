//! What each frame a client sends turns into: one function per frame kind, and the routing
//! every envelope and receipt goes through (sender, interop rules, traffic limit, in-flight
//! bound, then the recipient's shard).

use codec::{
    ArchivedAck, ArchivedDeviceList, ArchivedDeviceSelection, ArchivedEnvelope, ArchivedHello,
    ArchivedReceipt, ArchivedSignal, DeviceId, ErrorCode, Frame, FrameRef, HeaderRef, KeepAlive,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, SessionLimits, Welcome, encode,
};

use super::{Session, SessionContext, SessionEvent};
use crate::core::shard::interface::{Refusal, Routed, ShardInput};
use crate::core::{DeviceSet, shard_of};
use crate::tables::auth::{Principal, Refused};
use crate::tables::policy::PartnerStatus;

impl Session {
    pub(super) fn on_frame(&mut self, cx: &SessionContext<'_>, frame: &Frame, view: FrameRef<'_>) {
        self.handle_input(cx.now_ms);
        let Some(principal) = self.principal else {
            return match view.header {
                HeaderRef::Hello(hello) => self.on_hello(cx, hello),
                _ => self.fail(ErrorCode::HelloRequired, "the first frame must be Hello"),
            };
        };
        match view.header {
            HeaderRef::Envelope(envelope) => {
                self.on_envelope(cx, principal, frame, envelope, view.payload.len())
            }
            HeaderRef::Receipt(receipt) => self.on_receipt(cx, principal, frame, receipt),
            HeaderRef::Signal(signal) => self.on_signal(cx, principal, frame, signal),
            HeaderRef::Ack(ack) => self.on_ack(cx, principal, ack),
            HeaderRef::DeviceList(list) => self.on_device_list(cx, principal, list),
            HeaderRef::Error(_) => {
                // A client's report of our error: nothing to answer; the IO shell logs it.
            }
            HeaderRef::KeepAlive(keep_alive) => {
                // Answered whether or not the client enabled the feature: it knows the kind.
                if !keep_alive.reply {
                    let answer = KeepAlive {
                        nonce: keep_alive.nonce.to_native(),
                        reply: true,
                    };
                    let _ = encode(&mut self.transmit, &answer, &[]);
                }
            }
            HeaderRef::Hello(_)
            | HeaderRef::Welcome(_)
            | HeaderRef::Notice(_)
            | HeaderRef::Delivery(_) => {
                let reason = format!("a client does not send {:?}", view.kind());
                self.error(ErrorCode::UnexpectedFrame, None, &reason);
            }
        }
    }

    fn on_hello(&mut self, cx: &SessionContext<'_>, hello: &ArchivedHello) {
        // A device of a suspended network is refused before its token is even recorded (a
        // suspended network cannot fill the replay cache).
        if let rkyv::option::ArchivedOption::Some(token) = &hello.token
            && cx.policy.network_status(token.device.get().network)
                == Some(PartnerStatus::Suspended)
        {
            return self.fail(
                ErrorCode::PartnerSuspended,
                "this device's network is suspended",
            );
        }
        match cx.auth.authenticate(cx.now_ms, hello, cx.peer_cert) {
            Ok(principal)
                if cx.policy.network_status(principal.network())
                    == Some(PartnerStatus::Suspended) =>
            {
                let reason = format!("network {} is suspended", principal.network());
                self.fail(ErrorCode::PartnerSuspended, &reason)
            }
            Ok(principal) => {
                self.establish(
                    cx,
                    principal,
                    hello.version_min.to_native(),
                    hello.version_max.to_native(),
                    hello.features.to_native(),
                );
                // A device session lasts as long as its token: past its expiry the session
                // is closed with TOKEN_EXPIRED and the device reconnects with a fresh token
                // (tokens are good for one session, so there is no in-band renewal).
                if self.principal.is_some()
                    && let rkyv::option::ArchivedOption::Some(token) = &hello.token
                {
                    self.token_expires_ms = Some(token.expires_at_ms.to_native());
                }
            }
            Err(Refused { code, reason }) => self.fail(code, &reason),
        }
    }

    fn on_envelope(
        &mut self,
        cx: &SessionContext<'_>,
        principal: Principal,
        frame: &Frame,
        envelope: &ArchivedEnvelope,
        payload_len: usize,
    ) {
        let sender = envelope.sender.get();
        let id = envelope.message_id.get();
        if !principal.may_act_as(&sender) {
            return self.reject(id, sender, Refusal::new(ErrorCode::SenderNotAllowed));
        }
        if payload_len > cx.limits.payload_bytes_max as usize {
            return self.reject(id, sender, Refusal::new(ErrorCode::PayloadTooLarge));
        }
        let ttl_seconds = envelope.ttl_seconds.to_native();
        let sent_at = envelope.timestamp_ms.to_native();
        if sent_at.saturating_add(u64::from(ttl_seconds) * 1000) < cx.now_ms {
            return self.reject(id, sender, Refusal::new(ErrorCode::MessageExpired));
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
        let routed = Routed {
            sender,
            recipient: envelope.recipient.get(),
            listed,
            id,
            ephemeral,
            ttl_seconds,
            frame: frame.as_bytes().clone(),
            reply_to: self.conn,
        };
        self.route(cx, routed, ShardInput::Envelope);
    }

    fn on_receipt(
        &mut self,
        cx: &SessionContext<'_>,
        principal: Principal,
        frame: &Frame,
        receipt: &ArchivedReceipt,
    ) {
        let sender = receipt.sender.get();
        let id = receipt.receipt_id.get();
        if !principal.may_act_as(&sender) {
            return self.reject(id, sender, Refusal::new(ErrorCode::SenderNotAllowed));
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
        self.route(cx, routed, ShardInput::Receipt);
    }

    fn on_signal(
        &mut self,
        cx: &SessionContext<'_>,
        principal: Principal,
        frame: &Frame,
        signal: &ArchivedSignal,
    ) {
        if !principal.may_act_as(&signal.sender.get()) {
            let reason = "a signal's sender must be one of yours";
            return self.error(ErrorCode::SenderNotAllowed, None, reason);
        }
        let recipient = signal.recipient.get();
        let sender = signal.sender.get().user_address();
        if let Err(code) = self.check_policy(cx, &sender, &recipient) {
            let reason = "the interop rules do not let this signal through";
            return self.error(code, None, reason);
        }
        if cx.policy.admit(&sender, &recipient, cx.now_ms).is_err() {
            let reason = "your network is over its traffic limit; the signal was dropped";
            return self.error(ErrorCode::RateLimited, None, reason);
        }
        let shard = shard_of(&recipient, cx.shards);
        self.events.push_back(SessionEvent::Route {
            shard,
            input: ShardInput::Signal {
                recipient,
                frame: frame.as_bytes().clone(),
            },
        });
    }

    fn on_ack(&mut self, cx: &SessionContext<'_>, principal: Principal, ack: &ArchivedAck) {
        let device = ack.address.get();
        if !principal.may_act_as(&device) {
            let reason = "you may only acknowledge for your own devices";
            return self.error(
                ErrorCode::SenderNotAllowed,
                Some(ack.message_id.get()),
                reason,
            );
        }
        let shard = shard_of(&device.user_address(), cx.shards);
        self.events.push_back(SessionEvent::Route {
            shard,
            input: ShardInput::DeviceAck {
                device,
                id: ack.message_id.get(),
            },
        });
    }

    fn on_device_list(
        &mut self,
        cx: &SessionContext<'_>,
        principal: Principal,
        list: &ArchivedDeviceList,
    ) {
        let user = list.user.get();
        let request_id = list.request_id.get();
        if !matches!(principal, Principal::Server { .. }) {
            let reason = "only server sessions declare device sets";
            return self.error(ErrorCode::UnexpectedFrame, Some(request_id), reason);
        }
        if !principal.may_manage(&user) {
            let refusal = Refusal::new(ErrorCode::SenderNotAllowed);
            return self.reject(request_id, user.device(DeviceId(0)), refusal);
        }
        let devices = list.devices.iter().map(|d| d.get()).collect();
        let shard = shard_of(&user, cx.shards);
        self.events.push_back(SessionEvent::Route {
            shard,
            input: ShardInput::DeviceList {
                request_id,
                user,
                devices,
                reply_to: self.conn,
            },
        });
    }

    /// Asks the interop rules; the decision's first contact goes to the shell to record.
    fn check_policy(
        &mut self,
        cx: &SessionContext<'_>,
        sender: &codec::UserAddress,
        recipient: &codec::UserAddress,
    ) -> Result<(), ErrorCode> {
        let verdict = cx.policy.check(sender, recipient);
        if verdict.checked {
            self.events.push_back(SessionEvent::PolicyChecked {
                refused: verdict.result.is_err(),
            });
        }
        if let Some(contact) = verdict.contact {
            self.events.push_back(SessionEvent::Contact(contact));
        }
        verdict.result
    }

    /// Sends an envelope or receipt to its recipient's shard, once it passed the interop
    /// rules, its network's traffic limit and the session's in-flight bound.
    fn route(&mut self, cx: &SessionContext<'_>, routed: Routed, kind: fn(Routed) -> ShardInput) {
        let sender = routed.sender.user_address();
        if let Err(code) = self.check_policy(cx, &sender, &routed.recipient) {
            return self.reject(routed.id, routed.sender, Refusal::new(code));
        }
        if let Err(retry_after_ms) = cx.policy.admit(&sender, &routed.recipient, cx.now_ms) {
            let refusal = Refusal {
                retry_after_ms,
                ..Refusal::new(ErrorCode::RateLimited)
            };
            return self.reject(routed.id, routed.sender, refusal);
        }
        if self.in_flight >= cx.limits.frames_in_flight_max {
            let refusal = Refusal::new(ErrorCode::InFlightLimit);
            return self.reject(routed.id, routed.sender, refusal);
        }
        self.in_flight += 1;
        let shard = shard_of(&routed.recipient, cx.shards);
        self.events.push_back(SessionEvent::Route {
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
        features: u64,
    ) {
        let low = version_min.max(PROTOCOL_VERSION_MIN);
        let high = version_max.min(PROTOCOL_VERSION_MAX);
        if low > high {
            let reason = format!(
                "this relay speaks versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION_MAX}"
            );
            return self.fail(ErrorCode::UnsupportedVersion, &reason);
        }
        let l = cx.limits;
        let welcome = Welcome {
            version: high,
            session_id: self.session_id,
            features: features & codec::features::ALL,
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
        if encode(&mut self.transmit, &welcome, &[]).is_err() {
            return self.fail(ErrorCode::Internal, "could not encode Welcome");
        }
        self.principal = Some(principal);
        self.hello_deadline_ms = None;
        self.keepalive = features & codec::features::KEEPALIVE != 0;
        let input = match principal {
            Principal::Device { device } => SessionEvent::Route {
                shard: shard_of(&device.user_address(), cx.shards),
                input: ShardInput::AttachDevice {
                    device,
                    conn: self.conn,
                },
            },
            Principal::Server { network } => SessionEvent::Broadcast(ShardInput::AttachServer {
                network,
                conn: self.conn,
            }),
        };
        self.events.push_back(input);
    }
}
