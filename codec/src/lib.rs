//! The Article 7 Relay wire format.
//!
//! Every frame on every connection (partner server, device, gatekeeper server, peer relay):
//!
//! ```text
//!  0        4      5         6            8              8+H          4+L
//!  | len:u32 | kind | version | hdr_len:u16 | header (H bytes) | payload |
//! ```
//!
//! `len` counts the bytes after itself; all integers are little-endian. The header is an rkyv
//! 0.8 archive (little-endian, unaligned, 32-bit relative pointers) of the kind's header type,
//! validated in place with bytecheck. The payload is opaque: end-to-end ciphertext for an
//! `Envelope`, a complete inner frame for a `Delivery`, empty for every other kind.
//!
//! **Invariants**: no IO, no async, no allocation on decode, no panic on any input. Every size
//! has a named limit in [`limits`], checked before anything is read or allocated.
//! `docs/protocol.md` is the normative description; this crate implements it.

pub mod consent;
pub mod decode;
pub mod encode;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod limits;
pub mod stream;

pub use decode::{FrameRef, HeaderRef, RawFrame, decode, frame_len};
pub use encode::{Encode, encode, encode_head, encode_to_bytes};
pub use error::{CodecError, ErrorCode};
pub use frame::*;
pub use ids::*;
pub use stream::{Frame, FrameDecoder};

/// The protocol versions this codec speaks. The preamble's version byte carries the session's
/// negotiated version; `Hello` and `Welcome` are always sent as version 1, whose preamble and
/// `Hello` layout every later version keeps.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
pub const PROTOCOL_VERSION_MAX: u16 = 1;

/// The version byte this codec writes.
pub const WIRE_VERSION: u8 = 1;

const _: () = assert!(WIRE_VERSION as u16 >= PROTOCOL_VERSION_MIN);
const _: () = assert!(WIRE_VERSION as u16 <= PROTOCOL_VERSION_MAX);
