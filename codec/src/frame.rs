//! Frame kinds and their headers.
//!
//! Each frame is `preamble | header | payload`. The header is an rkyv archive of one of the
//! structs below, read in place; only `Envelope` (ciphertext) and `Delivery` (one complete
//! inner frame) carry a payload. Every header type knows its kind and checks its own limits,
//! both as a Rust value before encoding and as archived bytes after validation, so an encoder
//! can never produce a frame the decoder refuses.

use rkyv::{Archive, Deserialize, Serialize};

use crate::error::CodecError;
use crate::ids::{DeviceAddress, DeviceId, MessageId, UserAddress};
use crate::limits::{
    AGENT_BYTES_MAX, DELIVERY_PAYLOAD_BYTES_MAX, ERROR_REASON_BYTES_MAX, FRAME_BYTES_MAX,
    NOTICE_TEXT_BYTES_MAX, PAYLOAD_BYTES_MAX, RECEIPT_IDS_MAX, RECIPIENT_DEVICES_MAX,
    TTL_SECONDS_MAX,
};

/// The kind byte of a frame's preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Welcome = 2,
    Envelope = 3,
    Ack = 4,
    Receipt = 5,
    Signal = 6,
    Error = 7,
    Notice = 8,
    Delivery = 9,
    DeviceList = 10,
    KeepAlive = 11,
}

impl FrameKind {
    pub const ALL: [FrameKind; 11] = [
        FrameKind::Hello,
        FrameKind::Welcome,
        FrameKind::Envelope,
        FrameKind::Ack,
        FrameKind::Receipt,
        FrameKind::Signal,
        FrameKind::Error,
        FrameKind::Notice,
        FrameKind::Delivery,
        FrameKind::DeviceList,
        FrameKind::KeepAlive,
    ];

    pub const fn from_u8(value: u8) -> Option<FrameKind> {
        match value {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Welcome),
            3 => Some(FrameKind::Envelope),
            4 => Some(FrameKind::Ack),
            5 => Some(FrameKind::Receipt),
            6 => Some(FrameKind::Signal),
            7 => Some(FrameKind::Error),
            8 => Some(FrameKind::Notice),
            9 => Some(FrameKind::Delivery),
            10 => Some(FrameKind::DeviceList),
            11 => Some(FrameKind::KeepAlive),
            _ => None,
        }
    }

    /// The most payload bytes a frame of this kind may carry (0: none).
    pub const fn payload_bytes_max(self) -> usize {
        match self {
            FrameKind::Envelope => PAYLOAD_BYTES_MAX,
            FrameKind::Delivery => DELIVERY_PAYLOAD_BYTES_MAX,
            _ => 0,
        }
    }
}

/// Checks the payload length a frame of `kind` declares, before anything reads it.
pub(crate) fn check_payload_len(kind: FrameKind, len: usize) -> Result<(), CodecError> {
    let max = kind.payload_bytes_max();
    if max == 0 && len > 0 {
        return Err(CodecError::UnexpectedPayload { kind, len });
    }
    if len > max {
        return Err(CodecError::PayloadTooLarge { kind, len, max });
    }
    Ok(())
}

/// A header type: what kind of frame it heads, and its limits.
pub trait FrameHeader: Archive {
    const KIND: FrameKind;

    /// Checks the value against the wire limits before it is encoded.
    fn check(&self) -> Result<(), CodecError>;

    /// Checks the archived value against the same limits after bytecheck validated it.
    fn check_archived(archived: &Self::Archived) -> Result<(), CodecError>;
}

/// Defines a field-less wire enum and how its archived form reads back.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident / $archived:ident { $($(#[$vdoc:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[rkyv(derive(Debug, PartialEq, Eq))]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $archived {
            pub fn get(&self) -> $name {
                match self {
                    $($archived::$variant => $name::$variant),+
                }
            }
        }
    };
}

wire_enum! {
    /// What the connecting side is.
    Role / ArchivedRole {
        /// A partner's server, multiplexing many users ("proxy" architecture).
        PartnerServer,
        /// One device connecting directly ("no proxy" architecture), with a device token.
        Device,
        /// A gatekeeper's server; treated exactly like a partner server (principle 6).
        GatekeeperServer,
        /// A relay on the other side of a federation link.
        PeerRelay,
    }
}

wire_enum! {
    /// What an envelope's ciphertext holds, as far as routing and metrics need to know.
    ContentType / ArchivedContentType {
        Text, Media, Reaction, Reply, Edit, Delete, ReceiptBearing, CallSignal, Other,
    }
}

wire_enum! {
    /// What a receipt reports.
    ReceiptKind / ArchivedReceiptKind { Delivered, Read, Played }
}

wire_enum! {
    /// An ephemeral signal: delivered to connected devices only, never queued.
    SignalKind / ArchivedSignalKind { TypingStarted, TypingStopped, PresenceOnline, PresenceOffline }
}

wire_enum! {
    /// Why the operator writes to a partner or a user.
    NoticeKind / ArchivedNoticeKind {
        /// A protocol version or feature will be withdrawn at `effective_at_ms`.
        Deprecation,
        /// The partner or user is suspended (the text states the statutory ground).
        Suspension,
        /// The user's location no longer meets (or again meets) the location rule.
        LocationChange,
        /// An incident affects the service.
        Incident,
        Other,
    }
}

/// The end-to-end encryption protocol the ciphertext uses. The relay never decrypts it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq))]
pub enum E2eProtocol {
    Signal,
    Mls,
    /// Any other protocol, by a number the networks agreed on.
    Other(u16),
}

impl ArchivedE2eProtocol {
    pub fn get(&self) -> E2eProtocol {
        match self {
            ArchivedE2eProtocol::Signal => E2eProtocol::Signal,
            ArchivedE2eProtocol::Mls => E2eProtocol::Mls,
            ArchivedE2eProtocol::Other(id) => E2eProtocol::Other(id.to_native()),
        }
    }
}

/// Which of the recipient's devices an envelope is for.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub enum DeviceSelection {
    /// Every current device of the recipient (fan-out by the relay).
    All,
    /// Exactly these devices; must equal the recipient's current set, or the relay refuses
    /// with `DEVICE_LIST_STALE` and the current set.
    Listed(Vec<DeviceId>),
}

/// Bits of `Envelope::flags`.
pub mod envelope_flags {
    /// Deliver to connected devices only; never queue, never store.
    pub const EPHEMERAL: u16 = 1 << 0;
    /// Do not wake the recipient's push gateway for this envelope.
    pub const SILENT: u16 = 1 << 1;
    /// Every bit this version defines; any other bit set is `INVALID_FIELD`.
    pub const KNOWN: u16 = EPHEMERAL | SILENT;
}

/// Bits of `Delivery::flags`.
pub mod delivery_flags {
    /// The inner frame is ephemeral (a signal, an ephemeral envelope): do not `Ack` it.
    pub const EPHEMERAL: u8 = 1 << 0;
    pub const KNOWN: u8 = EPHEMERAL;
}

/// First frame from the connecting side.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Hello {
    /// The lowest and highest protocol versions the client speaks.
    pub version_min: u16,
    pub version_max: u16,
    pub role: Role,
    /// Optional features the client supports (bit set); the relay answers with the subset
    /// it enables.
    pub features: u64,
    /// Client software and version, for operators ("partner-sdk/1.2"). At most
    /// `AGENT_BYTES_MAX` bytes.
    pub agent: String,
    /// Required for `Role::Device`, absent otherwise.
    pub token: Option<DeviceToken>,
}

/// A device's credential, signed by its network (Ed25519 over [`DeviceToken::signed_bytes`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DeviceToken {
    pub device: DeviceAddress,
    pub expires_at_ms: u64,
    /// Unique per token; the relay refuses a token id it has already seen.
    pub token_id: u128,
    pub signature: [u8; 64],
}

/// The domain separator that starts the bytes a device token signs.
pub const DEVICE_TOKEN_CONTEXT: &[u8; 8] = b"A7TOKEN1";

/// Length of [`DeviceToken::signed_bytes`].
pub const DEVICE_TOKEN_SIGNED_BYTES: usize = 8 + 4 + 16 + 4 + 8 + 16;

/// The exact bytes a network signs for a device token: the context, then network, user,
/// device, expiry and token id, little-endian.
pub fn device_token_signed_bytes(
    device: DeviceAddress,
    expires_at_ms: u64,
    token_id: u128,
) -> [u8; DEVICE_TOKEN_SIGNED_BYTES] {
    let mut out = [0u8; DEVICE_TOKEN_SIGNED_BYTES];
    let parts: [&[u8]; 6] = [
        DEVICE_TOKEN_CONTEXT,
        &device.network.0.to_le_bytes(),
        &device.user.0.to_le_bytes(),
        &device.device.0.to_le_bytes(),
        &expires_at_ms.to_le_bytes(),
        &token_id.to_le_bytes(),
    ];
    let mut at = 0;
    for part in parts {
        let end = at + part.len();
        out[at..end].copy_from_slice(part);
        at = end;
    }
    debug_assert_eq!(at, DEVICE_TOKEN_SIGNED_BYTES);
    out
}

impl DeviceToken {
    pub fn signed_bytes(&self) -> [u8; DEVICE_TOKEN_SIGNED_BYTES] {
        device_token_signed_bytes(self.device, self.expires_at_ms, self.token_id)
    }
}

impl ArchivedDeviceToken {
    pub fn signed_bytes(&self) -> [u8; DEVICE_TOKEN_SIGNED_BYTES] {
        device_token_signed_bytes(
            self.device.get(),
            self.expires_at_ms.to_native(),
            self.token_id.to_native(),
        )
    }
}

/// The limits a relay enforces on one session, announced in `Welcome`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
/// Each is at least 1 and at most the codec's own limit of the same name.
pub struct SessionLimits {
    pub frame_bytes_max: u32,
    pub payload_bytes_max: u32,
    pub recipient_devices_max: u16,
    pub receipt_ids_max: u16,
    pub devices_per_user_max: u16,
    /// Frames the client may send before it has their `Ack`s.
    pub frames_in_flight_max: u32,
    pub ttl_seconds_max: u32,
}

/// The relay's answer to an acceptable `Hello`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Welcome {
    /// The protocol version this session speaks: the highest both sides support.
    pub version: u16,
    pub session_id: u64,
    pub features: u64,
    pub limits: SessionLimits,
}

/// An end-to-end-encrypted message; the payload is its opaque ciphertext.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Envelope {
    pub message_id: MessageId,
    pub sender: DeviceAddress,
    pub recipient: UserAddress,
    pub devices: DeviceSelection,
    pub content_type: ContentType,
    pub e2e_protocol: E2eProtocol,
    /// The sender's clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// How long the relay may queue it, 1 to `TTL_SECONDS_MAX`.
    pub ttl_seconds: u32,
    /// [`envelope_flags`].
    pub flags: u16,
}

/// Outcome of one envelope or receipt.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum AckStatus {
    /// Stored for every target device at the relay's durability level (or, from a device:
    /// received, remove it from my queue).
    Accepted,
    /// Refused: an [`ErrorCode`](crate::ErrorCode) number; for retryable codes a hint of when
    /// to retry; for `DEVICE_LIST_STALE` the recipient's current device set.
    Rejected {
        code: u16,
        retry_after_ms: u32,
        current_devices: Vec<DeviceId>,
    },
}

/// Acknowledges one envelope or receipt, in either direction.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Ack {
    pub message_id: MessageId,
    /// Relay to sender: the sending device. Device (or its server) to relay: the device that
    /// received it.
    pub address: DeviceAddress,
    pub status: AckStatus,
}

/// Delivered / read / played, for messages of one original sender; routed back to every
/// device of that sender and queued like an envelope.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Receipt {
    /// The receipt's own id, for its `Ack` and for dedup.
    pub receipt_id: MessageId,
    pub kind: ReceiptKind,
    /// The device that received (or read, or played) the messages.
    pub sender: DeviceAddress,
    /// The original sender of the messages.
    pub recipient: UserAddress,
    pub message_ids: Vec<MessageId>,
    pub timestamp_ms: u64,
}

/// Typing or presence: ephemeral, for connected devices only.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Signal {
    pub sender: DeviceAddress,
    pub recipient: UserAddress,
    pub kind: SignalKind,
    pub timestamp_ms: u64,
}

/// Bits of `Hello::features` and `Welcome::features`: optional parts of protocol v1 that a
/// client asks for and the relay enables.
pub mod features {
    /// `KeepAlive` frames (kind 11) in both directions: the relay asks a session that has
    /// been silent for half its idle deadline, and answers a client's.
    pub const KEEPALIVE: u64 = 1 << 0;
    /// Every feature this codec knows.
    pub const ALL: u64 = KEEPALIVE;
}

/// A liveness probe, either direction, for sessions that enabled `features::KEEPALIVE`: the
/// receiver of one with `reply` false answers with the same `nonce` and `reply` true; a
/// reply is never answered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct KeepAlive {
    pub nonce: u64,
    pub reply: bool,
}

/// A session-level error: a refused frame, or the reason the session ends.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ErrorFrame {
    /// An [`ErrorCode`](crate::ErrorCode) number.
    pub code: u16,
    /// The message the error is about, when there is one.
    pub refers_to: Option<MessageId>,
    /// The sender closes the connection after this frame.
    pub fatal: bool,
    /// Human-readable, at most `ERROR_REASON_BYTES_MAX` bytes.
    pub reason: String,
}

/// A message from the relay's operator.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Notice {
    pub notice_id: MessageId,
    pub kind: NoticeKind,
    /// The user it concerns; `None` when it concerns the whole network of the session.
    pub audience: Option<UserAddress>,
    pub effective_at_ms: u64,
    /// A related [`ErrorCode`](crate::ErrorCode) number, or 0.
    pub code: u16,
    /// At most `NOTICE_TEXT_BYTES_MAX` bytes.
    pub text: String,
}

/// Relay to client: one queued (or ephemeral) frame for one device. The payload is the
/// complete inner frame (`Envelope`, `Receipt` or `Signal`) exactly as its sender wrote it,
/// so the relay forwards it without re-encoding.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Delivery {
    /// The device it is for (a server connection carries many).
    pub device: DeviceAddress,
    /// Position in that device's queue; increases by one per queued frame.
    pub seq: u64,
    /// [`delivery_flags`].
    pub flags: u8,
}

/// Server to relay: the complete current device set of one user of the server's network.
/// Devices missing from it are removed, with their queued messages. The relay answers with an
/// `Ack` for `request_id`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DeviceList {
    pub request_id: MessageId,
    pub user: UserAddress,
    /// 0 to `RECIPIENT_DEVICES_MAX` distinct device ids; empty removes every device.
    pub devices: Vec<DeviceId>,
}

fn check_device_list(count: usize) -> Result<(), CodecError> {
    if count > RECIPIENT_DEVICES_MAX {
        return Err(CodecError::TooManyRecipients {
            count,
            max: RECIPIENT_DEVICES_MAX,
        });
    }
    Ok(())
}

fn check_text(field: &'static str, len: usize, max: usize) -> Result<(), CodecError> {
    if len > max {
        return Err(CodecError::TextTooLong { field, len, max });
    }
    Ok(())
}

fn check_hello(version_min: u16, version_max: u16, agent_len: usize) -> Result<(), CodecError> {
    if version_min == 0 || version_min > version_max {
        return Err(CodecError::InvalidField {
            field: "hello.version_min..version_max",
        });
    }
    check_text("hello.agent", agent_len, AGENT_BYTES_MAX)
}

/// A relay may announce limits below the codec's, never above, and never zero.
fn check_welcome(version: u16, limits: [(u32, usize); 5]) -> Result<(), CodecError> {
    if version == 0 {
        return Err(CodecError::InvalidField {
            field: "welcome.version",
        });
    }
    for (value, max) in limits {
        if value == 0 || value as usize > max {
            return Err(CodecError::InvalidField {
                field: "welcome.limits",
            });
        }
    }
    Ok(())
}

fn check_envelope(listed: Option<usize>, ttl_seconds: u32, flags: u16) -> Result<(), CodecError> {
    match listed {
        Some(0) => {
            return Err(CodecError::InvalidField {
                field: "envelope.devices (empty list)",
            });
        }
        Some(count) if count > RECIPIENT_DEVICES_MAX => {
            return Err(CodecError::TooManyRecipients {
                count,
                max: RECIPIENT_DEVICES_MAX,
            });
        }
        _ => {}
    }
    if ttl_seconds == 0 || ttl_seconds > TTL_SECONDS_MAX {
        return Err(CodecError::InvalidField {
            field: "envelope.ttl_seconds",
        });
    }
    if flags & !envelope_flags::KNOWN != 0 {
        return Err(CodecError::InvalidField {
            field: "envelope.flags",
        });
    }
    Ok(())
}

fn check_ack(current_devices: usize) -> Result<(), CodecError> {
    if current_devices > RECIPIENT_DEVICES_MAX {
        return Err(CodecError::TooManyRecipients {
            count: current_devices,
            max: RECIPIENT_DEVICES_MAX,
        });
    }
    Ok(())
}

fn check_receipt(count: usize) -> Result<(), CodecError> {
    if count == 0 || count > RECEIPT_IDS_MAX {
        return Err(CodecError::TooManyIds {
            count,
            max: RECEIPT_IDS_MAX,
        });
    }
    Ok(())
}

fn check_delivery(flags: u8) -> Result<(), CodecError> {
    if flags & !delivery_flags::KNOWN != 0 {
        return Err(CodecError::InvalidField {
            field: "delivery.flags",
        });
    }
    Ok(())
}

impl FrameHeader for Hello {
    const KIND: FrameKind = FrameKind::Hello;
    fn check(&self) -> Result<(), CodecError> {
        check_hello(self.version_min, self.version_max, self.agent.len())
    }
    fn check_archived(a: &ArchivedHello) -> Result<(), CodecError> {
        check_hello(
            a.version_min.to_native(),
            a.version_max.to_native(),
            a.agent.len(),
        )
    }
}

impl FrameHeader for Welcome {
    const KIND: FrameKind = FrameKind::Welcome;
    fn check(&self) -> Result<(), CodecError> {
        let l = &self.limits;
        check_welcome(
            self.version,
            [
                (l.frame_bytes_max, FRAME_BYTES_MAX),
                (l.payload_bytes_max, PAYLOAD_BYTES_MAX),
                (u32::from(l.recipient_devices_max), RECIPIENT_DEVICES_MAX),
                (u32::from(l.receipt_ids_max), RECEIPT_IDS_MAX),
                (l.ttl_seconds_max, TTL_SECONDS_MAX as usize),
            ],
        )
    }
    fn check_archived(a: &ArchivedWelcome) -> Result<(), CodecError> {
        let l = &a.limits;
        check_welcome(
            a.version.to_native(),
            [
                (l.frame_bytes_max.to_native(), FRAME_BYTES_MAX),
                (l.payload_bytes_max.to_native(), PAYLOAD_BYTES_MAX),
                (
                    u32::from(l.recipient_devices_max.to_native()),
                    RECIPIENT_DEVICES_MAX,
                ),
                (u32::from(l.receipt_ids_max.to_native()), RECEIPT_IDS_MAX),
                (l.ttl_seconds_max.to_native(), TTL_SECONDS_MAX as usize),
            ],
        )
    }
}

impl FrameHeader for Envelope {
    const KIND: FrameKind = FrameKind::Envelope;
    fn check(&self) -> Result<(), CodecError> {
        let listed = match &self.devices {
            DeviceSelection::All => None,
            DeviceSelection::Listed(list) => Some(list.len()),
        };
        check_envelope(listed, self.ttl_seconds, self.flags)
    }
    fn check_archived(a: &ArchivedEnvelope) -> Result<(), CodecError> {
        let listed = match &a.devices {
            ArchivedDeviceSelection::All => None,
            ArchivedDeviceSelection::Listed(list) => Some(list.len()),
        };
        check_envelope(listed, a.ttl_seconds.to_native(), a.flags.to_native())
    }
}

impl FrameHeader for Ack {
    const KIND: FrameKind = FrameKind::Ack;
    fn check(&self) -> Result<(), CodecError> {
        match &self.status {
            AckStatus::Accepted => Ok(()),
            AckStatus::Rejected {
                current_devices, ..
            } => check_ack(current_devices.len()),
        }
    }
    fn check_archived(a: &ArchivedAck) -> Result<(), CodecError> {
        match &a.status {
            ArchivedAckStatus::Accepted => Ok(()),
            ArchivedAckStatus::Rejected {
                current_devices, ..
            } => check_ack(current_devices.len()),
        }
    }
}

impl FrameHeader for Receipt {
    const KIND: FrameKind = FrameKind::Receipt;
    fn check(&self) -> Result<(), CodecError> {
        check_receipt(self.message_ids.len())
    }
    fn check_archived(a: &ArchivedReceipt) -> Result<(), CodecError> {
        check_receipt(a.message_ids.len())
    }
}

impl FrameHeader for Signal {
    const KIND: FrameKind = FrameKind::Signal;
    fn check(&self) -> Result<(), CodecError> {
        Ok(())
    }
    fn check_archived(_: &ArchivedSignal) -> Result<(), CodecError> {
        Ok(())
    }
}

impl FrameHeader for KeepAlive {
    const KIND: FrameKind = FrameKind::KeepAlive;
    fn check(&self) -> Result<(), CodecError> {
        Ok(())
    }
    fn check_archived(_: &ArchivedKeepAlive) -> Result<(), CodecError> {
        Ok(())
    }
}

impl FrameHeader for ErrorFrame {
    const KIND: FrameKind = FrameKind::Error;
    fn check(&self) -> Result<(), CodecError> {
        check_text("error.reason", self.reason.len(), ERROR_REASON_BYTES_MAX)
    }
    fn check_archived(a: &ArchivedErrorFrame) -> Result<(), CodecError> {
        check_text("error.reason", a.reason.len(), ERROR_REASON_BYTES_MAX)
    }
}

impl FrameHeader for Notice {
    const KIND: FrameKind = FrameKind::Notice;
    fn check(&self) -> Result<(), CodecError> {
        check_text("notice.text", self.text.len(), NOTICE_TEXT_BYTES_MAX)
    }
    fn check_archived(a: &ArchivedNotice) -> Result<(), CodecError> {
        check_text("notice.text", a.text.len(), NOTICE_TEXT_BYTES_MAX)
    }
}

impl FrameHeader for Delivery {
    const KIND: FrameKind = FrameKind::Delivery;
    fn check(&self) -> Result<(), CodecError> {
        check_delivery(self.flags)
    }
    fn check_archived(a: &ArchivedDelivery) -> Result<(), CodecError> {
        check_delivery(a.flags)
    }
}

impl FrameHeader for DeviceList {
    const KIND: FrameKind = FrameKind::DeviceList;
    fn check(&self) -> Result<(), CodecError> {
        check_device_list(self.devices.len())
    }
    fn check_archived(a: &ArchivedDeviceList) -> Result<(), CodecError> {
        check_device_list(a.devices.len())
    }
}
