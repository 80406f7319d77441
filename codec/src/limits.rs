//! Every size the wire format bounds, by name.
//!
//! These are the codec's hard maxima: no frame past them is ever decoded or encoded. A relay
//! may announce lower limits in `Welcome` (`SessionLimits`), never higher ones.

/// Bytes before the header: `u32` length, `u8` kind, `u8` wire version, `u16` header length.
pub const PREAMBLE_BYTES: usize = 8;

/// Bytes of the length prefix itself; the prefix counts the bytes that follow it.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// The largest archived header of any frame kind.
pub const HEADER_BYTES_MAX: usize = 8 * 1024;

/// The largest opaque ciphertext an `Envelope` carries.
pub const PAYLOAD_BYTES_MAX: usize = 256 * 1024;

/// The largest complete frame, preamble included. Sized so that a `Delivery` can wrap the
/// largest `Envelope` whole.
pub const FRAME_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 2 * (PREAMBLE_BYTES + HEADER_BYTES_MAX);

/// The largest explicit device list in an `Envelope` or a rejected `Ack`.
pub const RECIPIENT_DEVICES_MAX: usize = 32;

/// The most message ids one `Receipt` acknowledges.
pub const RECEIPT_IDS_MAX: usize = 256;

/// The longest reason text of an `Error` frame.
pub const ERROR_REASON_BYTES_MAX: usize = 512;

/// The longest operator text of a `Notice`.
pub const NOTICE_TEXT_BYTES_MAX: usize = 2048;

/// The longest client agent string in `Hello` ("partner-sdk/1.2").
pub const AGENT_BYTES_MAX: usize = 64;

/// The longest time an envelope may ask to be queued: 30 days.
pub const TTL_SECONDS_MAX: u32 = 30 * 24 * 3600;

/// Bytes of a complete inner frame a `Delivery` may carry.
pub const DELIVERY_PAYLOAD_BYTES_MAX: usize = PREAMBLE_BYTES + HEADER_BYTES_MAX + PAYLOAD_BYTES_MAX;

const _: () = {
    assert!(PREAMBLE_BYTES == LENGTH_PREFIX_BYTES + 4);
    // The header length travels as a u16.
    assert!(HEADER_BYTES_MAX <= u16::MAX as usize);
    // The frame length travels as a u32.
    assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
    // A Delivery (small header) wrapping the largest Envelope must fit in one frame.
    assert!(PREAMBLE_BYTES + HEADER_BYTES_MAX + DELIVERY_PAYLOAD_BYTES_MAX <= FRAME_BYTES_MAX);
    // The largest receipt (16-byte ids) and device list fit in a header with room to spare.
    assert!(RECEIPT_IDS_MAX * 16 + 256 <= HEADER_BYTES_MAX);
    assert!(NOTICE_TEXT_BYTES_MAX + 256 <= HEADER_BYTES_MAX);
    assert!(RECIPIENT_DEVICES_MAX * 4 + ERROR_REASON_BYTES_MAX + 256 <= HEADER_BYTES_MAX);
};
