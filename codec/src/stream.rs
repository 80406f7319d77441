//! The streaming decoder: bytes arrive in reads of any size; whole frames come out, each a
//! reference-counted slice of the read buffer (no copy of header or payload).
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use bytes::{Bytes, BytesMut};

use crate::decode::{FrameRef, decode_raw, frame_len, split};
use crate::error::CodecError;
use crate::frame::FrameKind;
use crate::limits::LENGTH_PREFIX_BYTES;

/// One complete frame whose preamble and payload bound were checked. Its header is validated
/// by [`Frame::decode`]; its bytes can be forwarded as they are.
#[derive(Debug, Clone)]
pub struct Frame {
    bytes: Bytes,
    kind: FrameKind,
}

impl Frame {
    /// Takes bytes that hold exactly one frame.
    pub fn from_bytes(bytes: Bytes) -> Result<Frame, CodecError> {
        match frame_len(&bytes)? {
            Some(total) if total == bytes.len() => {}
            Some(total) if total < bytes.len() => {
                return Err(CodecError::TrailingBytes {
                    extra: bytes.len() - total,
                });
            }
            Some(total) => {
                return Err(CodecError::Truncated {
                    needed: total,
                    available: bytes.len(),
                });
            }
            None => {
                return Err(CodecError::Truncated {
                    needed: 4,
                    available: bytes.len(),
                });
            }
        }
        let kind = split(&bytes)?.kind;
        Ok(Frame { bytes, kind })
    }

    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The whole frame as received, preamble included.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Validates the header (rkyv checked access and the kind's limits) and returns it with
    /// the payload, both borrowed from this frame.
    pub fn decode(&self) -> Result<FrameRef<'_>, CodecError> {
        decode_raw(split(&self.bytes)?)
    }

    /// The payload as a reference-counted slice of the same buffer.
    pub fn payload(&self) -> Bytes {
        match split(&self.bytes) {
            Ok(raw) => self.bytes.slice_ref(raw.payload),
            Err(_) => Bytes::new(),
        }
    }
}

/// Splits a byte stream into frames.
///
/// The IO shell appends what it reads ([`FrameDecoder::buffer_mut`] or
/// [`FrameDecoder::extend_from_slice`]) and then calls [`FrameDecoder::next_frame`] until it
/// returns `Ok(None)`. A frame split across reads completes on a later read. After a framing
/// error (a bad length prefix) the stream has no trustworthy boundary left: every later call
/// returns the same error, and the connection must close.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    broken: Option<CodecError>,
}

impl FrameDecoder {
    pub fn with_capacity(capacity: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::with_capacity(capacity),
            broken: None,
        }
    }

    /// The buffer reads append to.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    ///
    /// An error about one frame (`is_framing() == false`) has consumed that frame: call again
    /// for the next one.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        if let Some(error) = self.broken {
            return Err(error);
        }
        let total = match frame_len(&self.buf) {
            Ok(Some(total)) => total,
            Ok(None) => return Ok(None),
            Err(error) => {
                self.broken = Some(error);
                return Err(error);
            }
        };
        if self.buf.len() < total {
            // The length was checked against FRAME_BYTES_MAX above: this reserve is bounded.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let bytes = self.buf.split_to(total).freeze();
        let kind = split(&bytes)?.kind;
        Ok(Some(Frame { bytes, kind }))
    }

    /// At end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), CodecError> {
        if let Some(error) = self.broken {
            return Err(error);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let needed = frame_len(&self.buf)?.unwrap_or(LENGTH_PREFIX_BYTES);
        Err(CodecError::Truncated {
            needed,
            available: self.buf.len(),
        })
    }
}
