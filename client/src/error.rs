//! The SDK's one error type, and how IO and TLS failures map onto it.
//!
//! TLS failures reach the SDK wrapped in `std::io::Error`s (that is how tokio-rustls reports
//! them); [`ClientError::from_io`] unwraps them so a caller can match on what happened: the
//! relay refused our certificate, we refused the relay's, the connection dropped.

use std::io;
use std::time::Duration;

use codec::{CodecError, ErrorCode, FrameKind};
use rustls::AlertDescription;

/// Everything that can go wrong talking to a relay.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error: connection refused or reset, broken pipe, an abrupt end of stream
    /// (`UnexpectedEof`: the relay closed TCP without a TLS `close_notify`).
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),

    /// A TLS error on our side, e.g. the relay's certificate does not chain to the configured
    /// CA (`rustls::Error::InvalidCertificate`) or does not match the server name.
    #[error("TLS error: {0}")]
    Tls(#[source] rustls::Error),

    /// The relay refused our client certificate: it answered the handshake with this TLS
    /// alert (`UnknownCA`: not issued by a CA the relay trusts; `CertificateRequired`: none
    /// configured; `BadCertificate`, `CertificateExpired`, ...).
    #[error("the relay rejected the client certificate (TLS alert {0:?})")]
    CertificateRejected(AlertDescription),

    /// The TLS configuration could not be built: unreadable or malformed PEM, no CA
    /// certificate, a key that does not match its certificate, an invalid server name.
    #[error("invalid TLS configuration: {0}")]
    Config(String),

    /// A key could not be used to sign (not a PKCS#8 Ed25519 key).
    #[error("invalid key: {0}")]
    InvalidKey(String),

    /// The relay sent bytes that are not a valid frame. After an error with
    /// `is_framing() == false` the malformed frame was skipped and the receiver can go on;
    /// after a framing error the stream has no frame boundary left and every later read
    /// returns the same error.
    #[error("malformed frame from the relay: {0} ({code})", code = .0.code())]
    Codec(#[source] CodecError),

    /// A frame we were asked to send breaks a protocol limit (payload too large, too many
    /// ids, agent too long, ...). Nothing was buffered.
    #[error("cannot encode frame: {0} ({code})", code = .0.code())]
    Encode(#[source] CodecError),

    /// The relay answered `Hello` with an `Error` frame instead of `Welcome`.
    #[error("the relay refused the session: {} ({code}): {reason}", name.map_or("unknown code", ErrorCode::name))]
    Refused {
        /// The code on the wire.
        code: u16,
        /// The code, if this SDK knows it (a newer relay may send codes it does not).
        name: Option<ErrorCode>,
        /// The relay's text, for people; never parse it.
        reason: String,
    },

    /// The relay closed the connection before answering `Hello`. A relay that refuses the
    /// client certificate may also end up here when its TLS alert is lost to a TCP reset.
    #[error("the relay closed the connection before Welcome")]
    ClosedBeforeWelcome,

    /// Connecting (TCP, TLS and the `Hello`/`Welcome` exchange) took longer than this.
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// The connection is closed: it was closed locally, a previous error broke it, or the
    /// receiver already returned [`Event::Closed`](crate::Event::Closed).
    #[error("the connection is closed")]
    Closed,

    /// The relay sent a frame of a kind it never sends in this direction or state (e.g. a
    /// bare `Envelope` outside a `Delivery`, or a second `Welcome`). The frame was skipped.
    #[error("unexpected {kind:?} frame from the relay")]
    UnexpectedFrame { kind: FrameKind },

    /// An HTTP exchange with the control API failed (not an error answer: those are
    /// [`ApiResponse`](crate::control::ApiResponse)s).
    #[error("control API HTTP exchange failed: {0}")]
    Http(String),
}

impl ClientError {
    /// Maps an IO error from the TLS stream: a TLS alert that refuses our certificate becomes
    /// [`ClientError::CertificateRejected`], any other TLS error [`ClientError::Tls`], the
    /// rest stays [`ClientError::Io`].
    pub fn from_io(error: io::Error) -> ClientError {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned();
        match tls {
            Some(tls) => ClientError::from(tls),
            None => ClientError::Io(error),
        }
    }

    /// The protocol error code this error carries or stands for, if any: the relay's code for
    /// [`ClientError::Refused`], the codec's for [`ClientError::Codec`] and
    /// [`ClientError::Encode`].
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            ClientError::Codec(error) | ClientError::Encode(error) => Some(error.code().as_u16()),
            _ => None,
        }
    }
}

impl From<rustls::Error> for ClientError {
    fn from(error: rustls::Error) -> ClientError {
        match error {
            rustls::Error::AlertReceived(alert) if is_certificate_alert(alert) => {
                ClientError::CertificateRejected(alert)
            }
            other => ClientError::Tls(other),
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(error: io::Error) -> ClientError {
        ClientError::from_io(error)
    }
}

/// Alerts a TLS server sends when it does not accept the client's certificate.
fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::NoCertificate
            | AlertDescription::CertificateRequired
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alerts_map_to_typed_errors() {
        let io_error = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        );
        assert!(matches!(
            ClientError::from_io(io_error),
            ClientError::CertificateRejected(AlertDescription::UnknownCA)
        ));
        let io_error = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
        );
        assert!(matches!(
            ClientError::from_io(io_error),
            ClientError::Tls(rustls::Error::AlertReceived(_))
        ));
        let io_error = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(matches!(ClientError::from_io(io_error), ClientError::Io(_)));
    }

    #[test]
    fn refused_displays_the_code_name() {
        let error = ClientError::Refused {
            code: 204,
            name: ErrorCode::from_u16(204),
            reason: "no".into(),
        };
        assert_eq!(
            error.to_string(),
            "the relay refused the session: ROLE_NOT_ALLOWED (204): no"
        );
        assert_eq!(error.code(), Some(204));
    }
}
