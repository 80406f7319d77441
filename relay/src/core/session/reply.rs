//! The frames a session writes of its own: `Error` and the relay's `Ack`.

use bytes::BytesMut;
use codec::{Ack, AckStatus, DeviceAddress, ErrorCode, ErrorFrame, MessageId, encode};

use crate::core::shard::interface::Refusal;

/// Encodes an `Error` frame; the reason is cut to the protocol's limit at a char boundary.
pub fn encode_error(
    out: &mut BytesMut,
    code: ErrorCode,
    refers_to: Option<MessageId>,
    fatal: bool,
    reason: &str,
) {
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

/// Encodes the relay's `Ack` for `id`.
pub fn encode_ack(
    out: &mut BytesMut,
    id: MessageId,
    address: DeviceAddress,
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
