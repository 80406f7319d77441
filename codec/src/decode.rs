//! Decoding: bytes in, validated headers out, nothing allocated and nothing copied.
//!
//! Three steps, each with its own errors: the length prefix ([`frame_len`]), the rest of the
//! preamble and the payload bound ([`split`]), then the header through rkyv's checked access
//! and the kind's own limits ([`decode`]). Network bytes are never read any other way.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use rkyv::Portable;
use rkyv::api::low::LowValidator;
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::Failure;

use crate::error::CodecError;
use crate::frame::{
    Ack, ArchivedAck, ArchivedDelivery, ArchivedDeviceList, ArchivedEnvelope, ArchivedErrorFrame,
    ArchivedHello, ArchivedKeepAlive, ArchivedNotice, ArchivedReceipt, ArchivedSignal,
    ArchivedWelcome, Delivery, DeviceList, Envelope, ErrorFrame, FrameHeader, FrameKind, Hello,
    KeepAlive, Notice, Receipt, Signal, Welcome, check_payload_len,
};
use crate::limits::{FRAME_BYTES_MAX, HEADER_BYTES_MAX, LENGTH_PREFIX_BYTES, PREAMBLE_BYTES};
use crate::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

// Lengths travel as u32 and are used as usize.
const _: () = assert!(usize::BITS >= 32);

/// A validated header, borrowed from the bytes it was read from.
#[derive(Debug, Clone, Copy)]
pub enum HeaderRef<'a> {
    Hello(&'a ArchivedHello),
    Welcome(&'a ArchivedWelcome),
    Envelope(&'a ArchivedEnvelope),
    Ack(&'a ArchivedAck),
    Receipt(&'a ArchivedReceipt),
    Signal(&'a ArchivedSignal),
    Error(&'a ArchivedErrorFrame),
    Notice(&'a ArchivedNotice),
    Delivery(&'a ArchivedDelivery),
    DeviceList(&'a ArchivedDeviceList),
    KeepAlive(&'a ArchivedKeepAlive),
}

/// One decoded frame: its wire version, its validated header and its payload bytes.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub version: u8,
    pub header: HeaderRef<'a>,
    pub payload: &'a [u8],
}

/// A frame split at its preamble: kind and version checked, header not yet validated.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    pub kind: FrameKind,
    pub version: u8,
    pub header: &'a [u8],
    pub payload: &'a [u8],
}

impl HeaderRef<'_> {
    pub fn kind(&self) -> FrameKind {
        match self {
            HeaderRef::Hello(_) => FrameKind::Hello,
            HeaderRef::Welcome(_) => FrameKind::Welcome,
            HeaderRef::Envelope(_) => FrameKind::Envelope,
            HeaderRef::Ack(_) => FrameKind::Ack,
            HeaderRef::Receipt(_) => FrameKind::Receipt,
            HeaderRef::Signal(_) => FrameKind::Signal,
            HeaderRef::Error(_) => FrameKind::Error,
            HeaderRef::Notice(_) => FrameKind::Notice,
            HeaderRef::Delivery(_) => FrameKind::Delivery,
            HeaderRef::DeviceList(_) => FrameKind::DeviceList,
            HeaderRef::KeepAlive(_) => FrameKind::KeepAlive,
        }
    }
}

impl<'a> FrameRef<'a> {
    pub fn kind(&self) -> FrameKind {
        self.header.kind()
    }

    /// For a `Delivery`, the inner frame it carries, fully decoded; `None` for other kinds.
    pub fn delivery_inner(&self) -> Result<Option<FrameRef<'a>>, CodecError> {
        match self.header {
            HeaderRef::Delivery(_) => decode(self.payload).map(Some),
            _ => Ok(None),
        }
    }
}

/// Reads the length prefix at the start of `buf`: the total length of the frame there,
/// preamble included, or `None` if fewer than four bytes are buffered.
///
/// A length outside the limits is reported as soon as the prefix arrives, before any byte of
/// the frame is buffered.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let body = u32::from_le_bytes(*prefix) as usize;
    if body < PREAMBLE_BYTES - LENGTH_PREFIX_BYTES {
        return Err(CodecError::FrameTooShort { len: body });
    }
    let total = body + LENGTH_PREFIX_BYTES;
    if total > FRAME_BYTES_MAX {
        return Err(CodecError::FrameTooLarge {
            len: total,
            max: FRAME_BYTES_MAX,
        });
    }
    Ok(Some(total))
}

/// Splits exactly one frame (whose length prefix [`frame_len`] accepted) into its parts.
pub fn split(frame: &[u8]) -> Result<RawFrame<'_>, CodecError> {
    let Some((preamble, rest)) = frame.split_first_chunk::<PREAMBLE_BYTES>() else {
        return Err(CodecError::Truncated {
            needed: PREAMBLE_BYTES,
            available: frame.len(),
        });
    };
    let [_, _, _, _, kind, version, header_lo, header_hi] = *preamble;
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&u16::from(version)) {
        return Err(CodecError::UnknownVersion(version));
    }
    let kind = FrameKind::from_u8(kind).ok_or(CodecError::UnknownKind(kind))?;
    let header_len = usize::from(u16::from_le_bytes([header_lo, header_hi]));
    if header_len > HEADER_BYTES_MAX {
        return Err(CodecError::HeaderTooLarge {
            len: header_len,
            max: HEADER_BYTES_MAX,
        });
    }
    let Some((header, payload)) = rest.split_at_checked(header_len) else {
        return Err(CodecError::HeaderTooLarge {
            len: header_len,
            max: rest.len(),
        });
    };
    check_payload_len(kind, payload.len())?;
    Ok(RawFrame {
        kind,
        version,
        header,
        payload,
    })
}

/// Decodes a buffer that holds exactly one complete frame.
pub fn decode(buf: &[u8]) -> Result<FrameRef<'_>, CodecError> {
    let Some(total) = frame_len(buf)? else {
        return Err(CodecError::Truncated {
            needed: LENGTH_PREFIX_BYTES,
            available: buf.len(),
        });
    };
    if buf.len() < total {
        return Err(CodecError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    if buf.len() > total {
        return Err(CodecError::TrailingBytes {
            extra: buf.len() - total,
        });
    }
    decode_raw(split(buf)?)
}

/// Validates the header of a split frame.
pub fn decode_raw(raw: RawFrame<'_>) -> Result<FrameRef<'_>, CodecError> {
    let bytes = raw.header;
    let header = match raw.kind {
        FrameKind::Hello => HeaderRef::Hello(access::<Hello>(bytes)?),
        FrameKind::Welcome => HeaderRef::Welcome(access::<Welcome>(bytes)?),
        FrameKind::Envelope => HeaderRef::Envelope(access::<Envelope>(bytes)?),
        FrameKind::Ack => HeaderRef::Ack(access::<Ack>(bytes)?),
        FrameKind::Receipt => HeaderRef::Receipt(access::<Receipt>(bytes)?),
        FrameKind::Signal => HeaderRef::Signal(access::<Signal>(bytes)?),
        FrameKind::Error => HeaderRef::Error(access::<ErrorFrame>(bytes)?),
        FrameKind::Notice => HeaderRef::Notice(access::<Notice>(bytes)?),
        FrameKind::Delivery => {
            let delivery = access::<Delivery>(bytes)?;
            check_delivery_payload(raw.payload)?;
            HeaderRef::Delivery(delivery)
        }
        FrameKind::DeviceList => HeaderRef::DeviceList(access::<DeviceList>(bytes)?),
        FrameKind::KeepAlive => HeaderRef::KeepAlive(access::<KeepAlive>(bytes)?),
    };
    Ok(FrameRef {
        version: raw.version,
        header,
        payload: raw.payload,
    })
}

/// A delivery's payload must be exactly one frame of a kind the relay queues or signals.
/// Only its preamble is checked here; [`FrameRef::delivery_inner`] validates the rest.
fn check_delivery_payload(payload: &[u8]) -> Result<(), CodecError> {
    let inner = match frame_len(payload)? {
        Some(total) if total == payload.len() => split(payload)?,
        Some(total) if total > payload.len() => {
            return Err(CodecError::Truncated {
                needed: total,
                available: payload.len(),
            });
        }
        Some(total) => {
            return Err(CodecError::TrailingBytes {
                extra: payload.len() - total,
            });
        }
        None => {
            return Err(CodecError::Truncated {
                needed: LENGTH_PREFIX_BYTES,
                available: payload.len(),
            });
        }
    };
    match inner.kind {
        FrameKind::Envelope | FrameKind::Receipt | FrameKind::Signal => Ok(()),
        _ => Err(CodecError::InvalidField {
            field: "delivery.payload (kind)",
        }),
    }
}

/// rkyv's checked access (bytecheck), then the kind's own limits. The low-level validator
/// supports no shared pointers (our headers have none) and allocates nothing.
fn access<H>(bytes: &[u8]) -> Result<&H::Archived, CodecError>
where
    H: FrameHeader,
    H::Archived: Portable + for<'b> CheckBytes<LowValidator<'b, Failure>>,
{
    let archived = rkyv::api::low::access::<H::Archived, Failure>(bytes)
        .map_err(|_| CodecError::HeaderMalformed { kind: H::KIND })?;
    H::check_archived(archived)?;
    Ok(archived)
}
