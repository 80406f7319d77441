//! What a relay connection yields: acks, deliveries, errors, notices, and the end of the
//! session; and how a frame read off the wire becomes one of them.

use bytes::Bytes;
use codec::{
    Ack, DeviceAddress, Envelope, ErrorCode, ErrorFrame, Frame, FrameKind, HeaderRef, KeepAlive,
    MessageId, Notice, Receipt, Signal, delivery_flags,
};
use rkyv::rancor;

use crate::error::ClientError;

/// One thing the relay told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The outcome of an envelope, receipt or device list we sent (`Accepted`: stored for
    /// every target device, or the device set recorded; `Rejected`: see the code).
    Ack(Ack),
    /// A frame for one of the devices this connection serves.
    Delivery {
        /// The device it is for; `ack` it with this address.
        device: DeviceAddress,
        /// Position in that device's queue.
        seq: u64,
        /// A signal or an ephemeral envelope: never queued, must not be acked.
        ephemeral: bool,
        inner: Inbound,
    },
    /// A refused frame (not fatal: the session goes on) or the reason the session ends
    /// (`fatal`: the relay closes the connection next).
    Error(ErrorFrame),
    /// A message from the relay's operator.
    Notice(Notice),
    /// A `KeepAlive` (sessions with `features::KEEPALIVE`): a reply to ours, or, through
    /// [`Receiver::next_event`](crate::Receiver::next_event) only, the relay's request, which
    /// the caller answers with the same nonce and `reply: true`.
    KeepAlive(KeepAlive),
    /// The relay ended the session cleanly (TLS `close_notify`, then end of stream).
    Closed,
}

/// The frame a `Delivery` carries, exactly as its sender wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// An end-to-end-encrypted message; `payload` is its ciphertext, a zero-copy slice of the
    /// connection's read buffer.
    Envelope {
        header: Envelope,
        payload: Bytes,
    },
    Receipt(Receipt),
    Signal(Signal),
}

impl Inbound {
    /// The id to acknowledge: the envelope's `message_id` or the receipt's `receipt_id`;
    /// `None` for a signal, which is never acknowledged.
    pub fn ack_id(&self) -> Option<MessageId> {
        match self {
            Inbound::Envelope { header, .. } => Some(header.message_id),
            Inbound::Receipt(receipt) => Some(receipt.receipt_id),
            Inbound::Signal(_) => None,
        }
    }

    pub fn kind(&self) -> FrameKind {
        match self {
            Inbound::Envelope { .. } => FrameKind::Envelope,
            Inbound::Receipt(_) => FrameKind::Receipt,
            Inbound::Signal(_) => FrameKind::Signal,
        }
    }
}

impl Event {
    /// For a queued (non-ephemeral) delivery of an envelope or receipt: the id and device to
    /// pass to `ack` once the frame is safely handled. `None` for everything else.
    pub fn ack_needed(&self) -> Option<(MessageId, DeviceAddress)> {
        match self {
            Event::Delivery {
                device,
                ephemeral: false,
                inner,
                ..
            } => inner.ack_id().map(|id| (id, *device)),
            _ => None,
        }
    }

    /// For an `Error` event: its code, if this SDK knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Event::Error(error) => ErrorCode::from_u16(error.code),
            _ => None,
        }
    }
}

/// Converts an archived header into its owned form.
pub(crate) fn owned<T, A>(archived: &A, kind: FrameKind) -> Result<T, ClientError>
where
    A: rkyv::Deserialize<T, rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    rkyv::deserialize::<T, rancor::Error>(archived)
        .map_err(|_| ClientError::Codec(codec::CodecError::HeaderMalformed { kind }))
}

/// Turns one frame from the relay into an event. Frames the relay never sends on a client
/// connection (`Hello`, `Welcome` after the handshake, bare `Envelope`/`Receipt`/`Signal`)
/// are [`ClientError::UnexpectedFrame`].
pub(crate) fn event_from_frame(frame: &Frame) -> Result<Event, ClientError> {
    let decoded = frame.decode().map_err(ClientError::Codec)?;
    match decoded.header {
        HeaderRef::Ack(ack) => Ok(Event::Ack(owned(ack, FrameKind::Ack)?)),
        HeaderRef::Error(error) => Ok(Event::Error(owned(error, FrameKind::Error)?)),
        HeaderRef::Notice(notice) => Ok(Event::Notice(owned(notice, FrameKind::Notice)?)),
        HeaderRef::KeepAlive(keep_alive) => Ok(Event::KeepAlive(KeepAlive {
            nonce: keep_alive.nonce.to_native(),
            reply: keep_alive.reply,
        })),
        HeaderRef::Delivery(delivery) => {
            // The codec checked the inner frame's preamble; decode it whole, as its own frame
            // sharing this buffer.
            let inner_frame = Frame::from_bytes(frame.payload()).map_err(ClientError::Codec)?;
            let inner = inbound_from_frame(&inner_frame)?;
            Ok(Event::Delivery {
                device: delivery.device.get(),
                seq: delivery.seq.to_native(),
                ephemeral: delivery.flags & delivery_flags::EPHEMERAL != 0,
                inner,
            })
        }
        other => Err(ClientError::UnexpectedFrame { kind: other.kind() }),
    }
}

fn inbound_from_frame(frame: &Frame) -> Result<Inbound, ClientError> {
    let decoded = frame.decode().map_err(ClientError::Codec)?;
    match decoded.header {
        HeaderRef::Envelope(envelope) => Ok(Inbound::Envelope {
            header: owned(envelope, FrameKind::Envelope)?,
            payload: frame.payload(),
        }),
        HeaderRef::Receipt(receipt) => Ok(Inbound::Receipt(owned(receipt, FrameKind::Receipt)?)),
        HeaderRef::Signal(signal) => Ok(Inbound::Signal(owned(signal, FrameKind::Signal)?)),
        _ => Err(ClientError::Codec(codec::CodecError::InvalidField {
            field: "delivery.payload (kind)",
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codec::{
        ContentType, Delivery, DeviceId, DeviceSelection, E2eProtocol, NetworkId, UserAddress,
        UserId,
    };

    #[test]
    fn an_envelope_payload_is_a_slice_of_the_frame_buffer() {
        let sender = DeviceAddress::new(NetworkId(1), UserId(2), DeviceId(3));
        let envelope = Envelope {
            message_id: MessageId(9),
            sender,
            recipient: UserAddress::new(NetworkId(4), UserId(5)),
            devices: DeviceSelection::All,
            content_type: ContentType::Media,
            e2e_protocol: E2eProtocol::Mls,
            timestamp_ms: 1,
            ttl_seconds: 60,
            flags: 0,
        };
        let inner = codec::encode_to_bytes(&envelope, &[0xC7; 1000]).expect("encode");
        let delivery = Delivery {
            device: sender,
            seq: 4,
            flags: 0,
        };
        let wire = codec::encode_to_bytes(&delivery, &inner).expect("encode");
        let frame = Frame::from_bytes(wire.clone()).expect("one frame");
        let event = event_from_frame(&frame).expect("event");
        let Event::Delivery {
            inner: Inbound::Envelope { header, payload },
            seq: 4,
            ..
        } = event
        else {
            panic!("expected an envelope delivery, got {event:?}");
        };
        assert_eq!(header, envelope);
        assert_eq!(payload.as_ref(), &[0xC7; 1000][..]);
        // The payload points into the received bytes: no copy was made.
        let start = wire.as_ptr() as usize;
        let at = payload.as_ptr() as usize;
        assert!(at >= start && at + payload.len() <= start + wire.len());
        assert_eq!(at + payload.len(), start + wire.len());
    }
}
