//! A session with a relay: connect (TCP, TLS 1.3, `Hello`/`Welcome`), then send frames and
//! receive events, from one task or, after [`Connection::into_split`], from two.
//!
//! Sending appends encoded frames to a write buffer; [`Sender::flush`] writes the whole buffer
//! at once (so many small frames cost one TLS record batch and one syscall), and a send that
//! takes the buffer past [`AUTO_FLUSH_BYTES`] flushes by itself. Receiving reads straight into
//! a [`codec::FrameDecoder`], whose frames are slices of the read buffer: an envelope's payload
//! reaches the caller without a copy.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use codec::{
    Ack, AckStatus, DeviceAddress, DeviceList, DeviceToken, Encode, Envelope, ErrorCode,
    ErrorFrame, Frame, FrameDecoder, FrameKind, HeaderRef, Hello, KeepAlive, MessageId,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Receipt, Role, Signal, Welcome,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::ClientError;
use crate::event::{Event, event_from_frame, owned};
use crate::tls::ClientTls;

/// How long [`connect`] waits for TCP, TLS and `Welcome` together, unless told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A send that leaves at least this many bytes buffered flushes them.
pub const AUTO_FLUSH_BYTES: usize = 64 * 1024;

/// The agent string sent in `Hello` unless told otherwise.
pub const DEFAULT_AGENT: &str = concat!("article7-client/", env!("CARGO_PKG_VERSION"));

/// A read is attempted with at least this much free space in the read buffer...
const READ_SPARE_MIN: usize = 4 * 1024;
/// ...and the buffer grows by this much when it has less (two full TLS records).
const READ_RESERVE: usize = 32 * 1024;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    /// The name the relay's certificate must carry. Default `"localhost"`.
    pub server_name: String,
    pub tls: ClientTls,
    pub role: Role,
    /// Required for [`Role::Device`] (see [`mint_device_token`](crate::mint_device_token)),
    /// absent for every other role.
    pub token: Option<DeviceToken>,
    /// Client software and version, at most `AGENT_BYTES_MAX` (64) bytes.
    pub agent: String,
    /// Optional features to ask for (`codec::features`; the relay enables those it has).
    pub features: u64,
    /// The protocol versions to offer; default: every version this SDK speaks.
    pub version_min: u16,
    pub version_max: u16,
    /// Bound on TCP connect, TLS handshake and the `Hello`/`Welcome` exchange together.
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(addr: SocketAddr, tls: ClientTls, role: Role) -> ConnectOptions {
        ConnectOptions {
            addr,
            server_name: "localhost".to_owned(),
            tls,
            role,
            token: None,
            agent: DEFAULT_AGENT.to_owned(),
            features: 0,
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    pub fn server_name(mut self, server_name: impl Into<String>) -> ConnectOptions {
        self.server_name = server_name.into();
        self
    }

    pub fn token(mut self, token: DeviceToken) -> ConnectOptions {
        self.token = Some(token);
        self
    }

    pub fn agent(mut self, agent: impl Into<String>) -> ConnectOptions {
        self.agent = agent.into();
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.connect_timeout = timeout;
        self
    }
}

/// Connects to a relay and establishes a session.
///
/// Errors: [`ClientError::Refused`] when the relay answers `Hello` with an `Error` frame,
/// [`ClientError::CertificateRejected`] when it refuses our client certificate,
/// [`ClientError::Tls`] when we refuse its certificate, [`ClientError::ClosedBeforeWelcome`]
/// when it hangs up without answering, [`ClientError::Timeout`] past
/// [`ConnectOptions::connect_timeout`].
pub async fn connect(options: ConnectOptions) -> Result<Connection, ClientError> {
    let timeout = options.connect_timeout;
    match tokio::time::timeout(timeout, establish(options)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(ClientError::Timeout(timeout)),
    }
}

async fn establish(options: ConnectOptions) -> Result<Connection, ClientError> {
    let server_name = ServerName::try_from(options.server_name.clone())
        .map_err(|e| ClientError::Config(format!("server name {:?}: {e}", options.server_name)))?;
    let hello = Hello {
        version_min: options.version_min,
        version_max: options.version_max,
        role: options.role,
        features: options.features,
        agent: options.agent,
        token: options.token,
    };
    // Encoded before connecting, so a bad agent or version range fails without a round trip.
    let mut out = BytesMut::with_capacity(AUTO_FLUSH_BYTES);
    codec::encode(&mut out, &hello, &[]).map_err(ClientError::Encode)?;

    let tcp = TcpStream::connect(options.addr)
        .await
        .map_err(ClientError::Io)?;
    tcp.set_nodelay(true).map_err(ClientError::Io)?;
    let peer = options.addr;
    let stream = TlsConnector::from(options.tls.config().clone())
        .connect(server_name, tcp)
        .await
        .map_err(ClientError::from_io)?;
    let (read, write) = tokio::io::split(stream);
    let mut sender = Sender {
        io: write,
        buf: out,
        auto_flush_bytes: AUTO_FLUSH_BYTES,
        closed: false,
    };
    let mut receiver = Receiver {
        io: read,
        decoder: FrameDecoder::with_capacity(READ_RESERVE),
        state: ReadState::Open,
    };

    // In TLS 1.3 the relay checks our certificate after our side of the handshake is done:
    // its verdict (an alert) arrives on the first read, perhaps after our write failed.
    if let Err(write_error) = sender.flush().await {
        return Err(match await_welcome(&mut receiver, &hello).await {
            Err(
                error @ (ClientError::CertificateRejected(_)
                | ClientError::Tls(_)
                | ClientError::Refused { .. }),
            ) => error,
            _ => write_error,
        });
    }
    let welcome = await_welcome(&mut receiver, &hello).await?;
    tracing::debug!(
        relay = %peer,
        session_id = welcome.session_id,
        version = welcome.version,
        "session established"
    );
    Ok(Connection {
        welcome,
        peer,
        sender,
        receiver,
    })
}

/// Reads the relay's answer to `Hello`.
async fn await_welcome(receiver: &mut Receiver, hello: &Hello) -> Result<Welcome, ClientError> {
    let frame = match receiver.read_frame().await {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(ClientError::ClosedBeforeWelcome),
        Err(ClientError::Io(error)) if is_disconnect(&error) => {
            return Err(ClientError::ClosedBeforeWelcome);
        }
        Err(error) => return Err(error),
    };
    let decoded = frame.decode().map_err(ClientError::Codec)?;
    match decoded.header {
        HeaderRef::Welcome(welcome) => {
            let welcome: Welcome = owned(welcome, FrameKind::Welcome)?;
            if !(hello.version_min..=hello.version_max).contains(&welcome.version) {
                return Err(ClientError::Codec(codec::CodecError::InvalidField {
                    field: "welcome.version (outside the offered range)",
                }));
            }
            Ok(welcome)
        }
        HeaderRef::Error(error) => {
            let error: ErrorFrame = owned(error, FrameKind::Error)?;
            Err(ClientError::Refused {
                code: error.code,
                name: ErrorCode::from_u16(error.code),
                reason: error.reason,
            })
        }
        other => Err(ClientError::UnexpectedFrame { kind: other.kind() }),
    }
}

/// The ways a peer's abrupt hang-up shows up.
fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// An established session. Use it from one task, or [`into_split`](Connection::into_split)
/// it to send from one task while another receives.
#[derive(Debug)]
pub struct Connection {
    welcome: Welcome,
    peer: SocketAddr,
    sender: Sender,
    receiver: Receiver,
}

impl Connection {
    /// The relay's `Welcome`: negotiated version, session id, and the limits it enforces.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn session_id(&self) -> u64 {
        self.welcome.session_id
    }

    /// The relay's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The sending and receiving halves, to use from separate tasks.
    pub fn into_split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }

    pub fn sender(&mut self) -> &mut Sender {
        &mut self.sender
    }

    pub fn receiver(&mut self) -> &mut Receiver {
        &mut self.receiver
    }

    /// See [`Sender::send_envelope`].
    pub async fn send_envelope(
        &mut self,
        header: &Envelope,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.sender.send_envelope(header, payload).await
    }

    /// See [`Sender::send_receipt`].
    pub async fn send_receipt(&mut self, receipt: &Receipt) -> Result<(), ClientError> {
        self.sender.send_receipt(receipt).await
    }

    /// See [`Sender::send_signal`].
    pub async fn send_signal(&mut self, signal: &Signal) -> Result<(), ClientError> {
        self.sender.send_signal(signal).await
    }

    /// See [`Sender::send_device_list`].
    pub async fn send_device_list(&mut self, list: &DeviceList) -> Result<(), ClientError> {
        self.sender.send_device_list(list).await
    }

    /// See [`Sender::ack`].
    pub async fn ack(
        &mut self,
        message_id: MessageId,
        device: DeviceAddress,
    ) -> Result<(), ClientError> {
        self.sender.ack(message_id, device).await
    }

    /// See [`Sender::send_frame`].
    pub async fn send_frame<H: Encode>(
        &mut self,
        header: &H,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.sender.send_frame(header, payload).await
    }

    /// See [`Sender::flush`].
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.sender.flush().await
    }

    /// See [`Receiver::next_event`]. Buffered frames are not flushed first: call
    /// [`flush`](Connection::flush) before waiting for their answers.
    ///
    /// The relay's `KeepAlive` requests (sessions that asked for
    /// [`codec::features::KEEPALIVE`]) are answered here, and not returned; replies to our
    /// own are returned as [`Event::KeepAlive`]. Not cancel-safe while an answer is written.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            match self.receiver.next_event().await? {
                Event::KeepAlive(KeepAlive {
                    nonce,
                    reply: false,
                }) => {
                    let answer = KeepAlive { nonce, reply: true };
                    self.sender.send_frame(&answer, &[]).await?;
                    self.sender.flush().await?;
                }
                event => return Ok(event),
            }
        }
    }

    /// See [`Sender::close`].
    pub async fn close(&mut self) -> Result<(), ClientError> {
        self.sender.close().await
    }
}

/// The sending half of a connection.
///
/// Frames are buffered until [`flush`](Sender::flush) (or an auto-flush); frames still
/// buffered when a `Sender` is dropped are lost, so flush or [`close`](Sender::close) first.
pub struct Sender {
    io: WriteHalf<TlsStream<TcpStream>>,
    buf: BytesMut,
    auto_flush_bytes: usize,
    closed: bool,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("buffered", &self.buf.len())
            .field("auto_flush_bytes", &self.auto_flush_bytes)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// Buffers an envelope with its ciphertext. The relay answers with an `Ack` for
    /// `(header.message_id, header.sender)`; keep the envelope until then (resending the same
    /// `message_id` is safe).
    pub async fn send_envelope(
        &mut self,
        header: &Envelope,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.send_frame(header, payload).await
    }

    /// Buffers a receipt for messages of `receipt.recipient`. Acked like an envelope, by
    /// `receipt_id`.
    pub async fn send_receipt(&mut self, receipt: &Receipt) -> Result<(), ClientError> {
        self.send_frame(receipt, &[]).await
    }

    /// Buffers a typing or presence signal (ephemeral: never acked).
    pub async fn send_signal(&mut self, signal: &Signal) -> Result<(), ClientError> {
        self.send_frame(signal, &[]).await
    }

    /// Buffers a `DeviceList` (server sessions only): the complete current device set of one
    /// user of our network. The relay fans envelopes out to these devices and checks `Listed`
    /// selections against them; devices left out are removed with their queued frames, and a
    /// user without devices is `RECIPIENT_UNKNOWN` to senders. The relay answers with an `Ack`
    /// for `list.request_id` (rejected with `DEVICE_LIMIT` past `devices_per_user_max`).
    pub async fn send_device_list(&mut self, list: &DeviceList) -> Result<(), ClientError> {
        self.send_frame(list, &[]).await
    }

    /// Buffers an `Ack(Accepted)` for a delivered envelope or receipt: the relay removes it
    /// from `device`'s queue. Pass the `device` of the [`Event::Delivery`].
    pub async fn ack(
        &mut self,
        message_id: MessageId,
        device: DeviceAddress,
    ) -> Result<(), ClientError> {
        let ack = Ack {
            message_id,
            address: device,
            status: AckStatus::Accepted,
        };
        self.send_frame(&ack, &[]).await
    }

    /// [`send_envelope`](Sender::send_envelope), then [`flush`](Sender::flush).
    pub async fn send_envelope_now(
        &mut self,
        header: &Envelope,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.send_envelope(header, payload).await?;
        self.flush().await
    }

    /// [`send_receipt`](Sender::send_receipt), then [`flush`](Sender::flush).
    pub async fn send_receipt_now(&mut self, receipt: &Receipt) -> Result<(), ClientError> {
        self.send_receipt(receipt).await?;
        self.flush().await
    }

    /// [`send_signal`](Sender::send_signal), then [`flush`](Sender::flush).
    pub async fn send_signal_now(&mut self, signal: &Signal) -> Result<(), ClientError> {
        self.send_signal(signal).await?;
        self.flush().await
    }

    /// [`send_device_list`](Sender::send_device_list), then [`flush`](Sender::flush).
    pub async fn send_device_list_now(&mut self, list: &DeviceList) -> Result<(), ClientError> {
        self.send_device_list(list).await?;
        self.flush().await
    }

    /// [`ack`](Sender::ack), then [`flush`](Sender::flush).
    pub async fn ack_now(
        &mut self,
        message_id: MessageId,
        device: DeviceAddress,
    ) -> Result<(), ClientError> {
        self.ack(message_id, device).await?;
        self.flush().await
    }

    /// Buffers a frame of any kind (the relay refuses kinds that make no sense from a
    /// client). A frame that breaks a protocol limit is [`ClientError::Encode`] and nothing is
    /// buffered. Flushes when the buffer reaches the auto-flush threshold.
    pub async fn send_frame<H: Encode>(
        &mut self,
        header: &H,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.check_open()?;
        codec::encode(&mut self.buf, header, payload).map_err(ClientError::Encode)?;
        self.maybe_flush().await
    }

    /// Buffers bytes as they are, unchecked: for forwarding frames received elsewhere
    /// ([`codec::Frame::as_bytes`]) and for testing how a relay handles malformed input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.check_open()?;
        self.buf.extend_from_slice(bytes);
        self.maybe_flush().await
    }

    /// Writes everything buffered, in one write, and flushes the TLS stream.
    ///
    /// Not cancel-safe: if the future is dropped midway, part of a frame may have been
    /// written; close the connection then.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.check_open()?;
        let written = if self.buf.is_empty() {
            Ok(())
        } else {
            self.io.write_all(&self.buf).await
        };
        self.buf.clear();
        let outcome = match written {
            Ok(()) => self.io.flush().await,
            Err(error) => Err(error),
        };
        outcome.map_err(|error| {
            self.closed = true;
            ClientError::from_io(error)
        })
    }

    /// Flushes, then ends our side of the session: TLS `close_notify` and TCP shutdown. The
    /// receiving half still gets what the relay sends until it closes too. Closing twice is
    /// harmless.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.flush().await;
        self.closed = true;
        let shutdown = self.io.shutdown().await.map_err(ClientError::from_io);
        flushed.and(shutdown)
    }

    /// Bytes buffered and not yet written.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Sets the buffered size at which a send flushes by itself (0: every send flushes).
    pub fn set_auto_flush_bytes(&mut self, bytes: usize) {
        self.auto_flush_bytes = bytes;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    async fn maybe_flush(&mut self) -> Result<(), ClientError> {
        if self.buf.len() >= self.auto_flush_bytes {
            self.flush().await
        } else {
            Ok(())
        }
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.closed {
            Err(ClientError::Closed)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The relay sent a fatal `Error`: its hang-up that follows is the normal end.
    FatalErrorSeen,
    /// `Event::Closed` or a connection error was returned; nothing more will come.
    Ended,
}

/// The receiving half of a connection.
pub struct Receiver {
    io: ReadHalf<TlsStream<TcpStream>>,
    decoder: FrameDecoder,
    state: ReadState,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("buffered", &self.decoder.buffered_len())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// The next event from the relay.
    ///
    /// [`Event::Closed`] once, when the relay ends the session cleanly (or hangs up after a
    /// fatal `Error` event); [`ClientError::Closed`] on every call after that.
    ///
    /// Errors about one frame ([`ClientError::Codec`] with `is_framing() == false`,
    /// [`ClientError::UnexpectedFrame`]) skip that frame: call again for the next one. A
    /// framing error repeats on every call. An IO or TLS error ends the connection.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses no bytes.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if self.state == ReadState::Ended {
            return Err(ClientError::Closed);
        }
        let frame = match self.read_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                self.state = ReadState::Ended;
                return Ok(Event::Closed);
            }
            Err(ClientError::Io(error))
                if self.state == ReadState::FatalErrorSeen && is_disconnect(&error) =>
            {
                self.state = ReadState::Ended;
                return Ok(Event::Closed);
            }
            Err(error) => {
                if matches!(
                    error,
                    ClientError::Io(_) | ClientError::Tls(_) | ClientError::CertificateRejected(_)
                ) {
                    self.state = ReadState::Ended;
                }
                return Err(error);
            }
        };
        let event = event_from_frame(&frame)?;
        if let Event::Error(ErrorFrame { fatal: true, .. }) = &event {
            self.state = ReadState::FatalErrorSeen;
        }
        Ok(event)
    }

    /// The next frame exactly as the relay sent it, for callers that read headers in place
    /// (`Frame::decode`, zero-copy) rather than as owned [`Event`]s: nothing is allocated per
    /// frame. `None` at a clean end of stream. Frames come in order whichever of this and
    /// [`Receiver::next_event`] takes them.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        if self.state == ReadState::Ended {
            return Err(ClientError::Closed);
        }
        match self.read_frame().await {
            Ok(None) => {
                self.state = ReadState::Ended;
                Ok(None)
            }
            Err(error) => {
                if matches!(
                    error,
                    ClientError::Io(_) | ClientError::Tls(_) | ClientError::CertificateRejected(_)
                ) {
                    self.state = ReadState::Ended;
                }
                Err(error)
            }
            frame => frame,
        }
    }

    /// Bytes received and not yet returned as events.
    pub fn buffered_len(&self) -> usize {
        self.decoder.buffered_len()
    }

    /// The next whole frame, `None` at a clean end of stream.
    async fn read_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(ClientError::Codec)? {
                return Ok(Some(frame));
            }
            let buf = self.decoder.buffer_mut();
            if buf.capacity() - buf.len() < READ_SPARE_MIN {
                buf.reserve(READ_RESERVE);
            }
            let read = self.io.read_buf(buf).await.map_err(ClientError::from_io)?;
            if read == 0 {
                self.decoder.finish().map_err(ClientError::Codec)?;
                return Ok(None);
            }
        }
    }
}
