//! Encoding: a header value in, a complete frame (or its head) appended to a `BytesMut`.
//!
//! Limits are checked before a byte is written, so an encoder never produces what the decoder
//! refuses. Serialization uses rkyv's thread-local arena for scratch space, so steady-state
//! encoding allocates nothing beyond growing the output buffer.

use bytes::{BufMut, Bytes, BytesMut};
use rkyv::Serialize;
use rkyv::api::low::{LowSerializer, to_bytes_in_with_alloc};
use rkyv::rancor::Failure;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Positional, Writer};

use crate::error::CodecError;
use crate::frame::{FrameHeader, check_payload_len};
use crate::limits::{FRAME_BYTES_MAX, HEADER_BYTES_MAX, LENGTH_PREFIX_BYTES, PREAMBLE_BYTES};

/// rkyv writer that appends a header to a `BytesMut`; positions count from the header's
/// first byte (relative pointers only need a consistent origin).
#[derive(Debug)]
pub struct HeaderWriter<'a> {
    out: &'a mut BytesMut,
    start: usize,
}

impl Positional for HeaderWriter<'_> {
    fn pos(&self) -> usize {
        self.out.len() - self.start
    }
}

impl<E> Writer<E> for HeaderWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }
}

/// What a header type needs to be encoded: a [`FrameHeader`] that rkyv can serialize with
/// the low-level (allocation-free, no shared pointers) serializer.
pub trait Encode:
    FrameHeader + for<'a, 'b> Serialize<LowSerializer<HeaderWriter<'b>, ArenaHandle<'a>, Failure>>
{
}

impl<H> Encode for H where
    H: FrameHeader
        + for<'a, 'b> Serialize<LowSerializer<HeaderWriter<'b>, ArenaHandle<'a>, Failure>>
{
}

/// Appends a whole frame: preamble, header, payload.
pub fn encode<H: Encode>(out: &mut BytesMut, header: &H, payload: &[u8]) -> Result<(), CodecError> {
    encode_head(out, header, payload.len())?;
    out.put_slice(payload);
    Ok(())
}

/// Appends the preamble and header of a frame whose `payload_len` payload bytes the caller
/// sends next (as its own buffer of a vectored write, so the payload is never copied).
pub fn encode_head<H: Encode>(
    out: &mut BytesMut,
    header: &H,
    payload_len: usize,
) -> Result<(), CodecError> {
    header.check()?;
    check_payload_len(H::KIND, payload_len)?;
    let start = out.len();
    out.put_bytes(0, PREAMBLE_BYTES);
    let header_start = out.len();
    let serialized = rkyv::util::with_arena(|arena| {
        let writer = HeaderWriter {
            out: &mut *out,
            start: header_start,
        };
        to_bytes_in_with_alloc::<_, _, Failure>(header, writer, arena.acquire()).map(|_| ())
    });
    let header_len = out.len() - header_start;
    let total = PREAMBLE_BYTES + header_len + payload_len;
    let outcome = if serialized.is_err() {
        Err(CodecError::HeaderMalformed { kind: H::KIND })
    } else if header_len > HEADER_BYTES_MAX {
        Err(CodecError::HeaderTooLarge {
            len: header_len,
            max: HEADER_BYTES_MAX,
        })
    } else if total > FRAME_BYTES_MAX {
        Err(CodecError::FrameTooLarge {
            len: total,
            max: FRAME_BYTES_MAX,
        })
    } else {
        Ok(())
    };
    if let Err(error) = outcome {
        out.truncate(start);
        return Err(error);
    }
    // Both fit: header_len <= HEADER_BYTES_MAX <= u16::MAX, total <= FRAME_BYTES_MAX <= u32::MAX.
    let body = u32::try_from(total - LENGTH_PREFIX_BYTES).unwrap_or(u32::MAX);
    let header_len = u16::try_from(header_len).unwrap_or(u16::MAX);
    let mut preamble = [0u8; PREAMBLE_BYTES];
    preamble[..4].copy_from_slice(&body.to_le_bytes());
    preamble[4] = H::KIND as u8;
    preamble[5] = crate::WIRE_VERSION;
    preamble[6..].copy_from_slice(&header_len.to_le_bytes());
    out[start..header_start].copy_from_slice(&preamble);
    Ok(())
}

/// Encodes one whole frame into fresh bytes. Convenient off the hot path (tests, tools).
pub fn encode_to_bytes<H: Encode>(header: &H, payload: &[u8]) -> Result<Bytes, CodecError> {
    let mut out = BytesMut::with_capacity(PREAMBLE_BYTES + 128 + payload.len());
    encode(&mut out, header, payload)?;
    Ok(out.freeze())
}
