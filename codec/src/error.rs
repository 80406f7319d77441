//! Error codes: the stable numeric registry every side of the protocol shares, and the
//! codec's own error type.
//!
//! Codes never change meaning and are never reused. Ranges: 1xx the bytes of a frame, 2xx the
//! session (handshake, authentication, who may send what), 3xx routing, 4xx flow control
//! (retryable), 5xx the relay itself, 6xx the control API's requests. `docs/protocol.md` lists what each side does on each.

use core::fmt;

use crate::frame::FrameKind;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $text:literal, retryable: $retry:literal; )*) => {
        /// A stable numeric error code, as carried by `Error` frames and rejected `Ack`s.
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code for a number read off the wire; `None` for a number this codec does
            /// not know (a newer peer): treat it by its range.
            pub const fn from_u16(value: u16) -> Option<ErrorCode> {
                match value {
                    $( $value => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// The code's name as documented, e.g. `FRAME_TOO_LARGE`.
            pub const fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $text, )*
                }
            }

            /// Whether sending the same thing again later may succeed.
            pub const fn is_retryable(self) -> bool {
                match self {
                    $( ErrorCode::$name => $retry, )*
                }
            }
        }
    };
}

error_codes! {
    /// The buffer ends before the frame its length prefix announces.
    FrameTruncated = 100, "FRAME_TRUNCATED", retryable: false;
    /// The length prefix exceeds `FRAME_BYTES_MAX`.
    FrameTooLarge = 101, "FRAME_TOO_LARGE", retryable: false;
    /// The length prefix is smaller than the rest of the preamble.
    FrameTooShort = 102, "FRAME_TOO_SHORT", retryable: false;
    /// The frame kind byte names no kind.
    UnknownKind = 103, "UNKNOWN_KIND", retryable: false;
    /// The wire version byte names a version this side does not speak.
    UnknownVersion = 104, "UNKNOWN_VERSION", retryable: false;
    /// The header length exceeds `HEADER_BYTES_MAX` or the frame.
    HeaderTooLarge = 105, "HEADER_TOO_LARGE", retryable: false;
    /// The header bytes are not a valid archived header of the frame's kind.
    HeaderMalformed = 106, "HEADER_MALFORMED", retryable: false;
    /// The payload exceeds `PAYLOAD_BYTES_MAX` (or the session's lower limit).
    PayloadTooLarge = 107, "PAYLOAD_TOO_LARGE", retryable: false;
    /// A frame kind that carries no payload has one.
    UnexpectedPayload = 108, "UNEXPECTED_PAYLOAD", retryable: false;
    /// An explicit device list is longer than `RECIPIENT_DEVICES_MAX`.
    TooManyRecipients = 109, "TOO_MANY_RECIPIENTS", retryable: false;
    /// A receipt lists more than `RECEIPT_IDS_MAX` message ids, or none.
    TooManyIds = 110, "TOO_MANY_IDS", retryable: false;
    /// A text field is longer than its limit.
    TextTooLong = 111, "TEXT_TOO_LONG", retryable: false;
    /// Bytes follow the one frame that was expected.
    TrailingBytes = 112, "TRAILING_BYTES", retryable: false;
    /// A field holds a value outside its domain (unknown flag bits, an empty range, ...).
    InvalidField = 113, "INVALID_FIELD", retryable: false;

    /// A frame other than `Hello` arrived before the session was established.
    HelloRequired = 200, "HELLO_REQUIRED", retryable: false;
    /// The `Hello` version range and the relay's share no version.
    UnsupportedVersion = 201, "UNSUPPORTED_VERSION", retryable: false;
    /// The TLS client presented no certificate.
    CertificateRequired = 202, "CERTIFICATE_REQUIRED", retryable: false;
    /// The client certificate chains to no CA the relay knows.
    CertificateUnknown = 203, "CERTIFICATE_UNKNOWN", retryable: false;
    /// The role in `Hello` is not one this certificate may take.
    RoleNotAllowed = 204, "ROLE_NOT_ALLOWED", retryable: false;
    /// A device connection sent no device token.
    TokenRequired = 205, "TOKEN_REQUIRED", retryable: false;
    /// The device token's expiry has passed.
    TokenExpired = 206, "TOKEN_EXPIRED", retryable: false;
    /// The device token's signature does not verify with its network's key.
    TokenInvalid = 207, "TOKEN_INVALID", retryable: false;
    /// The device token was already used.
    TokenReplayed = 208, "TOKEN_REPLAYED", retryable: false;
    /// The sender address is not one this session may send as.
    SenderNotAllowed = 209, "SENDER_NOT_ALLOWED", retryable: false;
    /// The frame kind is not valid in this direction or state (e.g. `Welcome` from a client).
    UnexpectedFrame = 210, "UNEXPECTED_FRAME", retryable: false;
    /// The TLS handshake did not finish within the relay's deadline (the connection is
    /// closed without a frame: there is no TLS session to carry one).
    HandshakeTimeout = 211, "HANDSHAKE_TIMEOUT", retryable: false;
    /// The session sent nothing for the relay's idle deadline (a dead or half-open peer).
    IdleTimeout = 212, "IDLE_TIMEOUT", retryable: false;
    /// Before authentication, a frame larger than the relay buffers for an unknown peer.
    PreauthLimit = 213, "PREAUTH_LIMIT", retryable: false;

    /// The recipient user is unknown to the relay.
    RecipientUnknown = 300, "RECIPIENT_UNKNOWN", retryable: false;
    /// The explicit device list misses a current device or names a removed one; the
    /// rejected `Ack` carries the current set.
    DeviceListStale = 301, "DEVICE_LIST_STALE", retryable: false;
    /// The recipient's network is not connected to this relay.
    NetworkUnknown = 302, "NETWORK_UNKNOWN", retryable: false;
    /// The envelope's TTL had already run out when it arrived.
    MessageExpired = 303, "MESSAGE_EXPIRED", retryable: false;
    /// The user already has `devices_per_user_max` devices; a new one cannot be added.
    DeviceLimit = 304, "DEVICE_LIMIT", retryable: false;
    /// The recipient has not opted in to interoperability (or has opted out).
    RecipientNotEnlisted = 305, "RECIPIENT_NOT_ENLISTED", retryable: false;
    /// The sending user has not opted in to interoperability (or has opted out).
    SenderNotEnlisted = 306, "SENDER_NOT_ENLISTED", retryable: false;
    /// The recipient's consent model asks them to accept a message request first; the
    /// request is recorded and nothing is delivered until it is accepted.
    MessageRequestPending = 307, "MESSAGE_REQUEST_PENDING", retryable: false;
    /// The recipient does not meet the location rule (EEA) right now.
    RecipientOutsideRegion = 308, "RECIPIENT_OUTSIDE_REGION", retryable: false;
    /// The sending user does not meet the location rule (EEA) right now.
    SenderOutsideRegion = 309, "SENDER_OUTSIDE_REGION", retryable: false;
    /// The sender's or the recipient's network is suspended.
    PartnerSuspended = 310, "PARTNER_SUSPENDED", retryable: false;
    /// A network in `testing` reaches, and is reached by, test users only.
    PartnerTesting = 311, "PARTNER_TESTING", retryable: false;
    /// The user's network has as many users on this relay as its cap (`users_max` in its
    /// partner record); a new user cannot be added until one goes or the operator raises it.
    NetworkUserLimit = 312, "NETWORK_USER_LIMIT", retryable: false;
    /// The user's network has as many devices on this relay as its cap (`devices_max`).
    NetworkDeviceLimit = 313, "NETWORK_DEVICE_LIMIT", retryable: false;

    /// A recipient device's queue is at its bound; retry after the hinted delay.
    QueueFull = 400, "QUEUE_FULL", retryable: true;
    /// The sender's network is over its traffic limit; retry after the hinted delay.
    RateLimited = 401, "RATE_LIMITED", retryable: true;
    /// The session has too many frames awaiting an `Ack`.
    InFlightLimit = 402, "IN_FLIGHT_LIMIT", retryable: true;
    /// The client left the relay's bytes untaken past the write deadline: it is closed, its
    /// deliveries stay queued.
    WriteTimeout = 403, "WRITE_TIMEOUT", retryable: true;
    /// The core started as many TLS handshakes this second as it allows; the connection was
    /// closed at accept (no frame: TLS is not up).
    HandshakeRateLimited = 404, "HANDSHAKE_RATE_LIMITED", retryable: true;
    /// The source address has as many unauthenticated connections open as it may; closed at
    /// accept (no frame).
    SourceConnectionLimit = 405, "SOURCE_CONNECTION_LIMIT", retryable: true;
    /// The core's unauthenticated connections were at their cap: the oldest was closed to
    /// make room for a newer one (no frame if TLS was not up yet).
    UnauthenticatedEvicted = 406, "UNAUTHENTICATED_EVICTED", retryable: true;
    /// The network's device-set changes are over its rate (`device_set_changes_per_s`);
    /// retry after the hinted delay.
    DeviceSetRateLimited = 410, "DEVICE_SET_RATE_LIMITED", retryable: true;
    /// The shard the user hashes to holds `limits.shard_users_max` users; retry later.
    ShardUserLimit = 411, "SHARD_USER_LIMIT", retryable: true;
    /// Control API: the calling network's own rate-limit table is full of live buckets
    /// (too many distinct requesters or pairs within their periods); retry after the hint.
    RateTableFull = 412, "RATE_TABLE_FULL", retryable: true;
    /// A device session's token could not be recorded against replay (the relay's token
    /// journal is behind); retry.
    TokenJournalBusy = 413, "TOKEN_JOURNAL_BUSY", retryable: true;

    /// The relay failed in a way that is not the client's fault.
    Internal = 500, "INTERNAL", retryable: true;
    /// The relay cannot store messages right now and acknowledges nothing.
    StorageUnavailable = 501, "STORAGE_UNAVAILABLE", retryable: true;
    /// The relay is shutting down; reconnect to another node or later.
    ShuttingDown = 502, "SHUTTING_DOWN", retryable: true;
    /// A control-plane change could not be carried out on the data plane in time (a core
    /// did not take it, or its log did not store it); the change was not applied.
    DataPlaneUnavailable = 503, "DATA_PLANE_UNAVAILABLE", retryable: true;

    /// A control-API request body or parameter is malformed (bad JSON, a missing field).
    RequestMalformed = 600, "REQUEST_MALFORMED", retryable: false;
    /// The endpoint is for the relay's operator; the client certificate is not an operator's.
    OperatorRequired = 601, "OPERATOR_REQUIRED", retryable: false;
    /// The resource belongs to another network than the caller's.
    ForeignResource = 602, "FOREIGN_RESOURCE", retryable: false;
    /// No such resource, or none the caller may see (the two are never told apart).
    NotFound = 603, "NOT_FOUND", retryable: false;
    /// Enlistment without a consent record.
    ConsentRequired = 604, "CONSENT_REQUIRED", retryable: false;
    /// The consent record does not verify, names another user, or its time is off.
    ConsentInvalid = 605, "CONSENT_INVALID", retryable: false;
    /// A user-visible identifier is malformed (e.g. a phone number that is not E.164).
    IdentifierInvalid = 606, "IDENTIFIER_INVALID", retryable: false;
    /// The user-visible identifier belongs to another user.
    IdentifierTaken = 607, "IDENTIFIER_TAKEN", retryable: false;
    /// A bulk discovery request lists more identifiers than allowed.
    DiscoveryBatchTooLarge = 608, "DISCOVERY_BATCH_TOO_LARGE", retryable: false;
    /// The resource exists already (a partner id, a certificate in use).
    AlreadyExists = 609, "ALREADY_EXISTS", retryable: false;
    /// A suspension without a statutory ground, or a status change without a reason.
    GroundRequired = 610, "GROUND_REQUIRED", retryable: false;
    /// Key material is malformed (wrong length, bad encoding, duplicate id).
    KeysInvalid = 611, "KEYS_INVALID", retryable: false;
    /// The message request was already accepted or refused.
    RequestDecided = 612, "REQUEST_DECIDED", retryable: false;
    /// The request body is larger than the API accepts.
    BodyTooLarge = 613, "BODY_TOO_LARGE", retryable: false;
    /// One source (an IPv4 address, an IPv6 /64) asked routes that need no certificate
    /// (`GET /v1/openapi.json`) more often than `http.open_requests_per_source_per_min`; retry
    /// after `Retry-After`.
    SourceRateLimited = 614, "SOURCE_RATE_LIMITED", retryable: true;
    /// The HTTP port is at `http.connections_max`: the connection was served on the lane kept
    /// for `/healthz` and `/metrics`, which answers nothing else; retry after `Retry-After`.
    HttpBusy = 615, "HTTP_BUSY", retryable: true;
}

impl ErrorCode {
    /// The number on the wire.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// Why bytes could not be decoded, or a header could not be encoded.
///
/// Each variant maps to one [`ErrorCode`]; the `Display` text is the reason sent to the peer.
/// Nothing here allocates, so decoding stays allocation-free on the error path too.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame truncated: {needed} bytes announced, {available} present")]
    Truncated { needed: usize, available: usize },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame length prefix {len} is shorter than the preamble")]
    FrameTooShort { len: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    #[error("header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("{kind:?} header is malformed")]
    HeaderMalformed { kind: FrameKind },
    #[error("{kind:?} payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        kind: FrameKind,
        len: usize,
        max: usize,
    },
    #[error("{kind:?} frames carry no payload, found {len} bytes")]
    UnexpectedPayload { kind: FrameKind, len: usize },
    #[error("{count} recipient devices exceed the limit of {max}")]
    TooManyRecipients { count: usize, max: usize },
    #[error("{count} message ids in a receipt, allowed 1 to {max}")]
    TooManyIds { count: usize, max: usize },
    #[error("{field} of {len} bytes exceeds the limit of {max}")]
    TextTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{extra} bytes follow the frame")]
    TrailingBytes { extra: usize },
    #[error("invalid {field}")]
    InvalidField { field: &'static str },
}

impl CodecError {
    /// The wire code for this error.
    pub const fn code(&self) -> ErrorCode {
        match self {
            CodecError::Truncated { .. } => ErrorCode::FrameTruncated,
            CodecError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            CodecError::FrameTooShort { .. } => ErrorCode::FrameTooShort,
            CodecError::UnknownKind(_) => ErrorCode::UnknownKind,
            CodecError::UnknownVersion(_) => ErrorCode::UnknownVersion,
            CodecError::HeaderTooLarge { .. } => ErrorCode::HeaderTooLarge,
            CodecError::HeaderMalformed { .. } => ErrorCode::HeaderMalformed,
            CodecError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            CodecError::UnexpectedPayload { .. } => ErrorCode::UnexpectedPayload,
            CodecError::TooManyRecipients { .. } => ErrorCode::TooManyRecipients,
            CodecError::TooManyIds { .. } => ErrorCode::TooManyIds,
            CodecError::TextTooLong { .. } => ErrorCode::TextTooLong,
            CodecError::TrailingBytes { .. } => ErrorCode::TrailingBytes,
            CodecError::InvalidField { .. } => ErrorCode::InvalidField,
        }
    }

    /// Whether the byte stream can no longer be split into frames after this error.
    ///
    /// Only a bad length prefix leaves no trustworthy frame boundary: the connection must close
    /// after reporting it. Any other error spoils one well-delimited frame, which the streaming
    /// decoder has already consumed: the session reports it and goes on.
    pub const fn is_framing(&self) -> bool {
        matches!(
            self,
            CodecError::Truncated { .. }
                | CodecError::FrameTooLarge { .. }
                | CodecError::FrameTooShort { .. }
        )
    }
}
