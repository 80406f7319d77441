//! The end-to-end harness: a relay started in-process per test (its own temporary data
//! directory, development PKI and port on 127.0.0.1), SDK sessions connected to it over real
//! TLS sockets, builders for frames, and `expect_*` helpers that read the next event under a
//! timeout and fail on anything else: no event is ever skipped silently.
//!
//! Several test crates include this module and each uses a part of it.
#![allow(dead_code)]

pub mod control;
pub mod http;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use client::{
    Ack, AckStatus, ClientError, ClientTls, ConnectOptions, Connection, ContentType, DeviceAddress,
    DeviceId, DeviceList, DeviceSelection, DeviceToken, E2eProtocol, Envelope, ErrorCode,
    ErrorFrame, Event, Inbound, MessageId, NetworkId, Receipt, ReceiptKind, Role, Signal,
    SignalKind, UserAddress, UserId, connect,
};
use codec::{Frame, FrameDecoder, HeaderRef};
use relay::config::Config;
use relay::io::shared::WorkerMsg;
use relay::io::{Relay, Shared};
use relay::limits::RelayLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long any single expected event may take to arrive.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The development PKI's gatekeeper network (role `GatekeeperServer`).
pub const GATEKEEPER: NetworkId = NetworkId(1);
/// The development PKI's partner network (role `PartnerServer`).
pub const PARTNER: NetworkId = NetworkId(2);

static RELAYS: AtomicU64 = AtomicU64::new(0);

pub fn user(network: NetworkId, id: u128) -> UserAddress {
    UserAddress::new(network, UserId(id))
}

pub fn device(network: NetworkId, user: u128, device: u32) -> DeviceAddress {
    DeviceAddress::new(network, UserId(user), DeviceId(device))
}

pub use devkit::now_ms;

fn random_u128() -> u128 {
    let bytes: [u8; 16] = ring::rand::generate(&ring::rand::SystemRandom::new())
        .expect("system random number generator")
        .expose();
    u128::from_le_bytes(bytes)
}

/// A fresh random message id.
pub fn new_id() -> MessageId {
    MessageId(random_u128())
}

/// An envelope from `sender` to every device of `recipient`: fresh id, now, one hour TTL.
pub fn envelope(sender: DeviceAddress, recipient: UserAddress) -> Envelope {
    Envelope {
        message_id: new_id(),
        sender,
        recipient,
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: now_ms(),
        ttl_seconds: 3600,
        flags: 0,
    }
}

/// The same, for exactly the `listed` devices.
pub fn envelope_listed(sender: DeviceAddress, recipient: UserAddress, listed: &[u32]) -> Envelope {
    Envelope {
        devices: DeviceSelection::Listed(listed.iter().map(|&d| DeviceId(d)).collect()),
        ..envelope(sender, recipient)
    }
}

/// A `Delivered` receipt from `sender` for `ids`, to their original sender `recipient`.
pub fn receipt(sender: DeviceAddress, recipient: UserAddress, ids: &[MessageId]) -> Receipt {
    Receipt {
        receipt_id: new_id(),
        kind: ReceiptKind::Delivered,
        sender,
        recipient,
        message_ids: ids.to_vec(),
        timestamp_ms: now_ms(),
    }
}

pub fn signal(sender: DeviceAddress, recipient: UserAddress, kind: SignalKind) -> Signal {
    Signal {
        sender,
        recipient,
        kind,
        timestamp_ms: now_ms(),
    }
}

/// Distinct, recognisable ciphertext stand-ins.
pub fn payload(tag: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let seed = tag.as_bytes();
    while out.len() < len {
        let i = out.len();
        let salt = u8::try_from(i % 251).unwrap_or(0);
        out.push(seed.get(i % seed.len().max(1)).copied().unwrap_or(0) ^ salt);
    }
    out
}

/// One relay, started in-process for one test. Stopped (and its directory removed) by
/// [`TestRelay::stop`], or on drop if the test failed before.
pub struct TestRelay {
    relay: Option<Relay>,
    /// What the cores share (metrics included); readable after the relay stopped.
    shared: Arc<Shared>,
    durability: &'static str,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    tokens: AtomicU64,
}

impl TestRelay {
    pub fn start(name: &str) -> TestRelay {
        TestRelay::start_with(name, RelayLimits::default())
    }

    /// What the cores share: their inboxes, metrics and tables.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn start_with(name: &str, limits: RelayLimits) -> TestRelay {
        TestRelay::start_configured(name, |_, config| config.limits = limits)
    }

    /// A relay whose configuration `configure` adjusts (given the data directory, e.g. to
    /// write its own PKI there) after the test defaults are set.
    pub fn start_configured(name: &str, configure: impl FnOnce(&Path, &mut Config)) -> TestRelay {
        let n = RELAYS.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("a7-relay-e2e-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the relay's data dir");
        let mut config = Config::embedded();
        config.data_dir = dir.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.cores = 2;
        // These tests are about the data plane; the interop rules have their own
        // (`tests/control_e2e.rs`).
        config.interop.enforce = false;
        configure(&dir, &mut config);
        config.limits.validate().expect("test limits are valid");
        let relay = Relay::start(&config).expect("relay starts");
        TestRelay {
            addr: relay.listen,
            shared: relay.shared.clone(),
            durability: config.durability.name(),
            relay: Some(relay),
            dir,
            tokens: AtomicU64::new(1),
        }
    }

    pub fn pki(&self, file: &str) -> PathBuf {
        self.dir.join("pki").join(file)
    }

    /// TLS trusting the relay's CA, with the client certificate of `network` (1 gatekeeper, 2
    /// partner) or none.
    pub fn tls(&self, network: Option<NetworkId>) -> ClientTls {
        let identity = network.map(|n| {
            let stem = stem(n);
            (
                self.pki(&format!("{stem}.pem")),
                self.pki(&format!("{stem}.key")),
            )
        });
        ClientTls::from_pem_files(
            &self.pki("ca.pem"),
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .expect("client TLS from the dev PKI")
    }

    pub fn options(&self, tls: ClientTls, role: Role) -> ConnectOptions {
        ConnectOptions::new(self.addr, tls, role)
            .agent("relay-e2e/1")
            .connect_timeout(STEP_TIMEOUT)
    }

    pub async fn connect(&self, options: ConnectOptions) -> Result<Connection, ClientError> {
        connect(options).await
    }

    /// A server session of `network` with its own certificate and role.
    pub async fn server(&self, network: NetworkId) -> Session {
        let role = if network == GATEKEEPER {
            Role::GatekeeperServer
        } else {
            Role::PartnerServer
        };
        let conn = connect(self.options(self.tls(Some(network)), role))
            .await
            .unwrap_or_else(|e| panic!("server of network {network} connects: {e}"));
        Session::new(format!("server{}", network.0), conn)
    }

    /// The network's Ed25519 device-token key (PKCS#8).
    pub fn token_key(&self, network: NetworkId) -> Vec<u8> {
        let path = self.pki(&format!("{}-token.pk8", stem(network)));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A unique token id (the relay refuses a replayed one).
    pub fn token_id(&self) -> u128 {
        (u128::from(std::process::id()) << 96)
            | (u128::from(self.tokens.fetch_add(1, Ordering::Relaxed)) << 64)
            | u128::from(u64::try_from(random_u128() >> 64).unwrap_or(0))
    }

    /// A valid token for `device`, signed with its network's key, valid for an hour.
    pub fn token(&self, device: DeviceAddress) -> DeviceToken {
        self.token_signed(
            &self.token_key(device.network),
            device,
            now_ms() + 3_600_000,
        )
    }

    pub fn token_signed(
        &self,
        key: &[u8],
        device: DeviceAddress,
        expires_at_ms: u64,
    ) -> DeviceToken {
        client::mint_device_token(key, device, expires_at_ms, self.token_id()).expect("mint token")
    }

    /// A device session for `device`, with a fresh token.
    pub async fn device(&self, device: DeviceAddress) -> Session {
        let options = self
            .options(self.tls(None), Role::Device)
            .token(self.token(device));
        let conn = connect(options)
            .await
            .unwrap_or_else(|e| panic!("device {device} connects: {e}"));
        Session::new(format!("device {device}"), conn)
    }

    /// Makes `device` known to the relay and leaves it offline: it connects once (a device
    /// session adds its own device) and closes.
    pub async fn register_offline_device(&self, device: DeviceAddress) {
        let mut session = self.device(device).await;
        session.close().await;
    }

    /// The relay's metrics, as `/metrics` renders them.
    pub fn metrics_text(&self) -> String {
        let shared = &self.shared;
        relay::metrics::render(&shared.metrics, &shared.connections, self.durability)
    }

    /// The sum of a metric over its labels.
    pub fn metric(&self, name: &str) -> u64 {
        metric_sum(&self.metrics_text(), name)
    }

    /// Waits until `pred` holds of the metric (shard gauges are published after each turn).
    pub async fn wait_metric(&self, name: &str, pred: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let value = self.metric(name);
            if pred(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "metric {name} stayed at {value} for {STEP_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns once every core has handled everything sent to its inbox before the call
    /// (and handed the outputs on): work a closed session routed is then in its shard.
    pub async fn settle(&self) {
        settle_cores(&self.shared).await;
    }

    /// Stops the relay (off the async threads: it joins the relay's cores) and returns how
    /// long that took; fails if it takes longer than `STEP_TIMEOUT`.
    pub async fn stop(&mut self) -> Duration {
        let Some(relay) = self.relay.take() else {
            return Duration::ZERO;
        };
        let started = Instant::now();
        let stopping = tokio::task::spawn_blocking(move || relay.stop());
        tokio::time::timeout(STEP_TIMEOUT, stopping)
            .await
            .unwrap_or_else(|_| panic!("Relay::stop did not return within {STEP_TIMEOUT:?}"))
            .expect("Relay::stop panicked");
        started.elapsed()
    }

    /// A TLS connection without the SDK, to write frames the SDK would not.
    pub async fn raw_tls(&self, tls: &ClientTls) -> RawSession {
        let tcp = TcpStream::connect(self.addr).await.expect("TCP connect");
        tcp.set_nodelay(true).expect("nodelay");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let stream = tokio::time::timeout(
            STEP_TIMEOUT,
            TlsConnector::from(tls.config().clone()).connect(name, tcp),
        )
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
        RawSession {
            stream,
            decoder: FrameDecoder::with_capacity(16 * 1024),
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stem(network: NetworkId) -> &'static str {
    match network {
        GATEKEEPER => "gatekeeper",
        PARTNER => "partner",
        other => panic!("the dev PKI has no network {other}"),
    }
}

/// Sums the samples of the integer metric `name` (any labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            let metric = key.split('{').next()?;
            (metric == name).then_some(value)
        })
        .map(|value| {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}: {value:?} is not an integer"))
        })
        .sum()
}

/// A frame for one device, as a `Delivery` brings it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub device: DeviceAddress,
    pub seq: u64,
    pub ephemeral: bool,
    pub inner: Inbound,
}

impl Delivered {
    pub fn envelope(&self) -> (&Envelope, &Bytes) {
        match &self.inner {
            Inbound::Envelope { header, payload } => (header, payload),
            other => panic!("expected an envelope delivery, got {other:?}"),
        }
    }

    pub fn receipt(&self) -> &Receipt {
        match &self.inner {
            Inbound::Receipt(receipt) => receipt,
            other => panic!("expected a receipt delivery, got {other:?}"),
        }
    }

    pub fn signal(&self) -> &Signal {
        match &self.inner {
            Inbound::Signal(signal) => signal,
            other => panic!("expected a signal delivery, got {other:?}"),
        }
    }

    /// The id to ack: the envelope's or the receipt's.
    pub fn id(&self) -> MessageId {
        self.inner.ack_id().expect("a queued frame has an id")
    }
}

/// One SDK session with a name for failure messages.
pub struct Session {
    pub name: String,
    pub conn: Connection,
}

impl Session {
    pub fn new(name: impl Into<String>, conn: Connection) -> Session {
        Session {
            name: name.into(),
            conn,
        }
    }

    // --- sending (each flushes) ---

    pub async fn send_envelope(&mut self, header: &Envelope, payload: &[u8]) {
        let name = &self.name;
        self.conn
            .sender()
            .send_envelope_now(header, payload)
            .await
            .unwrap_or_else(|e| panic!("{name}: sending envelope: {e}"));
    }

    pub async fn send_receipt(&mut self, receipt: &Receipt) {
        let name = &self.name;
        self.conn
            .sender()
            .send_receipt_now(receipt)
            .await
            .unwrap_or_else(|e| panic!("{name}: sending receipt: {e}"));
    }

    pub async fn send_signal(&mut self, signal: &Signal) {
        let name = &self.name;
        self.conn
            .sender()
            .send_signal_now(signal)
            .await
            .unwrap_or_else(|e| panic!("{name}: sending signal: {e}"));
    }

    pub async fn send_device_list(&mut self, list: &DeviceList) {
        let name = &self.name;
        self.conn
            .sender()
            .send_device_list_now(list)
            .await
            .unwrap_or_else(|e| panic!("{name}: sending device list: {e}"));
    }

    pub async fn ack(&mut self, id: MessageId, device: DeviceAddress) {
        let name = &self.name;
        self.conn
            .sender()
            .ack_now(id, device)
            .await
            .unwrap_or_else(|e| panic!("{name}: sending ack: {e}"));
    }

    /// Acks a queued delivery.
    pub async fn ack_delivery(&mut self, delivered: &Delivered) {
        self.ack(delivered.id(), delivered.device).await;
    }

    /// Writes bytes as they are and flushes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let name = &self.name;
        let sender = self.conn.sender();
        sender
            .send_raw(bytes)
            .await
            .unwrap_or_else(|e| panic!("{name}: send_raw: {e}"));
        sender
            .flush()
            .await
            .unwrap_or_else(|e| panic!("{name}: flush: {e}"));
    }

    /// Sends an envelope and expects the relay to accept it.
    pub async fn send_accepted(&mut self, header: &Envelope, payload: &[u8]) {
        self.send_envelope(header, payload).await;
        self.expect_accepted(header.message_id).await;
    }

    /// Declares `devices` as `user`'s complete set and expects the relay's `Ack(Accepted)`.
    pub async fn declare(&mut self, user: UserAddress, devices: &[u32]) {
        let status = self.declare_status(user, devices).await;
        assert_eq!(
            status,
            AckStatus::Accepted,
            "{}: declaring devices {devices:?} of {user}",
            self.name
        );
    }

    /// Declares a device set and returns the status of the relay's `Ack`.
    pub async fn declare_status(&mut self, user: UserAddress, devices: &[u32]) -> AckStatus {
        let list = DeviceList {
            request_id: new_id(),
            user,
            devices: devices.iter().map(|&d| DeviceId(d)).collect(),
        };
        self.send_device_list(&list).await;
        let ack = self.expect_ack(list.request_id).await;
        assert_eq!(
            ack.address,
            user.device(DeviceId(0)),
            "{}: a device list's Ack carries the user",
            self.name
        );
        ack.status
    }

    /// Closes our side and expects the relay to end the session cleanly.
    pub async fn close(&mut self) {
        let name = &self.name;
        self.conn
            .close()
            .await
            .unwrap_or_else(|e| panic!("{name}: close: {e}"));
        self.expect_closed().await;
    }

    // --- receiving ---

    /// The next event or error, within `STEP_TIMEOUT`.
    pub async fn try_event(&mut self) -> Result<Event, ClientError> {
        match tokio::time::timeout(STEP_TIMEOUT, self.conn.next_event()).await {
            Ok(outcome) => outcome,
            Err(_) => panic!("{}: no event within {STEP_TIMEOUT:?}", self.name),
        }
    }

    /// The next event; fails on a client error or a timeout.
    pub async fn event(&mut self) -> Event {
        match self.try_event().await {
            Ok(event) => event,
            Err(e) => panic!("{}: error instead of an event: {e:?}", self.name),
        }
    }

    /// The next event must be the relay's `Ack` for `id`.
    pub async fn expect_ack(&mut self, id: MessageId) -> Ack {
        match self.event().await {
            Event::Ack(ack) if ack.message_id == id => ack,
            other => panic!("{}: expected the Ack of {id}, got {other:?}", self.name),
        }
    }

    pub async fn expect_accepted(&mut self, id: MessageId) {
        let ack = self.expect_ack(id).await;
        assert_eq!(
            ack.status,
            AckStatus::Accepted,
            "{}: {id} was not accepted",
            self.name
        );
    }

    /// The next event must be a rejected `Ack` for `id` with `code`; returns its
    /// `retry_after_ms` and `current_devices` (sorted).
    pub async fn expect_rejected(&mut self, id: MessageId, code: ErrorCode) -> (u32, Vec<u32>) {
        let ack = self.expect_ack(id).await;
        match ack.status {
            AckStatus::Rejected {
                code: got,
                retry_after_ms,
                current_devices,
            } if got == code.as_u16() => {
                let mut devices: Vec<u32> = current_devices.iter().map(|d| d.0).collect();
                devices.sort_unstable();
                (retry_after_ms, devices)
            }
            other => panic!(
                "{}: expected {id} rejected with {} ({}), got {other:?}",
                self.name,
                code.name(),
                code.as_u16()
            ),
        }
    }

    /// The next event must be a `Delivery`.
    pub async fn expect_delivery(&mut self) -> Delivered {
        match self.event().await {
            Event::Delivery {
                device,
                seq,
                ephemeral,
                inner,
            } => Delivered {
                device,
                seq,
                ephemeral,
                inner,
            },
            other => panic!("{}: expected a Delivery, got {other:?}", self.name),
        }
    }

    /// The next `count` events must all be deliveries.
    pub async fn expect_deliveries(&mut self, count: usize) -> Vec<Delivered> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.expect_delivery().await);
        }
        out
    }

    /// The next event must be an `Error` frame with `code`.
    pub async fn expect_error(&mut self, code: ErrorCode) -> ErrorFrame {
        match self.event().await {
            Event::Error(error) if error.code == code.as_u16() => error,
            other => panic!(
                "{}: expected Error {} ({}), got {other:?}",
                self.name,
                code.name(),
                code.as_u16()
            ),
        }
    }

    /// The next event must be the clean end of the session.
    pub async fn expect_closed(&mut self) {
        match self.event().await {
            Event::Closed => {}
            other => panic!(
                "{}: expected the session to close, got {other:?}",
                self.name
            ),
        }
    }

    /// The next `devices.len()` events must be `probe`'s deliveries, one to each of
    /// `devices` (of its recipient), each acked.
    pub async fn expect_probe(&mut self, probe: &Envelope, devices: &[u32]) {
        let mut got = BTreeSet::new();
        for _ in devices {
            let delivered = self.expect_delivery().await;
            assert_eq!(
                delivered.envelope().0,
                probe,
                "{}: expected the probe, got another envelope",
                self.name
            );
            assert!(!delivered.ephemeral, "{}: the probe is queued", self.name);
            assert_eq!(delivered.device.user_address(), probe.recipient);
            got.insert(delivered.device.device.0);
            self.ack_delivery(&delivered).await;
        }
        assert_eq!(
            got,
            devices.iter().copied().collect::<BTreeSet<u32>>(),
            "{}: the probe's devices",
            self.name
        );
    }
}

// --- probes: proving that something does not arrive ---
//
// Waiting a while proves nothing against a slow relay. A probe does: a frame sent after the
// action whose outcome must not arrive, on the same ordered path. Frames one session sends
// to one recipient user reach that user's shard in order, and each device's deliveries leave
// in queue order; so anything the action wrongly let through would arrive before the probe,
// and "the next event is the probe" proves nothing else is on its way.

/// An envelope from `from` (as `sender`) to `recipient`: the next event on `from` must be
/// its `Ack(Accepted)` (so no answer to an earlier frame of `from` to that user is still due)
/// and the next ones on `to` its deliveries to exactly `devices` (so nothing queued or
/// written earlier for them is). Acks the deliveries; returns the probe.
pub async fn probe(
    from: &mut Session,
    sender: DeviceAddress,
    to: &mut Session,
    recipient: UserAddress,
    devices: &[u32],
) -> Envelope {
    let probe = envelope(sender, recipient);
    from.send_accepted(&probe, b"probe").await;
    to.expect_probe(&probe, devices).await;
    probe
}

/// [`probe`] where one session both sends and receives it (a server session writing to a
/// user of its own network, a device to its own user): its `Ack` and its deliveries may come
/// in either order, and nothing else may come before all of them.
pub async fn probe_within(
    session: &mut Session,
    sender: DeviceAddress,
    recipient: UserAddress,
    devices: &[u32],
) -> Envelope {
    let probe = envelope(sender, recipient);
    session.send_envelope(&probe, b"probe").await;
    let mut acked = false;
    let mut got = BTreeSet::new();
    while !acked || got.len() < devices.len() {
        match session.event().await {
            Event::Ack(ack) if ack.message_id == probe.message_id && !acked => {
                assert_eq!(
                    ack.status,
                    AckStatus::Accepted,
                    "{}: the probe",
                    session.name
                );
                acked = true;
            }
            Event::Delivery {
                device,
                ephemeral: false,
                inner: Inbound::Envelope { header, .. },
                ..
            } if header == probe && device.user_address() == recipient => {
                assert!(
                    got.insert(device.device.0),
                    "{}: the probe twice",
                    session.name
                );
                session.ack(probe.message_id, device).await;
            }
            other => panic!("{}: expected only the probe, got {other:?}", session.name),
        }
    }
    assert_eq!(
        got,
        devices.iter().copied().collect::<BTreeSet<u32>>(),
        "{}: the probe's devices",
        session.name
    );
    probe
}

/// A signal from `from` (as `sender`) to `recipient`: the next events on `to` must be its
/// ephemeral deliveries to exactly `devices`. For ruling out ephemeral frames: signals and
/// ephemeral envelopes reach connected devices only, and a signal passes a full queue.
pub async fn probe_signal(
    from: &mut Session,
    sender: DeviceAddress,
    to: &mut Session,
    recipient: UserAddress,
    devices: &[u32],
) {
    let probe = signal(sender, recipient, SignalKind::PresenceOnline);
    from.send_signal(&probe).await;
    let mut got = BTreeSet::new();
    for _ in devices {
        let delivered = to.expect_delivery().await;
        assert!(delivered.ephemeral, "{}: a signal is ephemeral", to.name);
        assert_eq!(
            delivered.signal(),
            &probe,
            "{}: expected the probe",
            to.name
        );
        got.insert(delivered.device.device.0);
    }
    assert_eq!(
        got,
        devices.iter().copied().collect::<BTreeSet<u32>>(),
        "{}: the probe's devices",
        to.name
    );
}

/// A TLS session driven by hand: raw bytes out, frames in.
pub struct RawSession {
    stream: TlsStream<TcpStream>,
    decoder: FrameDecoder,
}

impl RawSession {
    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
        self.stream.flush().await.expect("raw flush");
    }

    /// Writes `bytes`; whether the relay took them all (it may close the stream first).
    pub async fn write_quietly(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// The next frame; `None` at the end of the stream (clean or not).
    pub async fn read_frame(&mut self) -> Option<Frame> {
        let reading = async {
            loop {
                if let Some(frame) = self.decoder.next_frame().expect("relay framing") {
                    return Some(frame);
                }
                let mut chunk = BytesMut::with_capacity(16 * 1024);
                match self.stream.read_buf(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => self.decoder.extend_from_slice(&chunk),
                }
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, reading)
            .await
            .expect("a frame or the end of the stream in time")
    }

    /// The next frame must be an `Error` with `code`; returns whether it is fatal.
    pub async fn expect_error(&mut self, code: ErrorCode) -> bool {
        let frame = self.read_frame().await.expect("an Error frame");
        let decoded = frame.decode().expect("the relay's frame decodes");
        match decoded.header {
            HeaderRef::Error(error) => {
                assert_eq!(
                    error.code.to_native(),
                    code.as_u16(),
                    "expected {}, got {error:?}",
                    code.name()
                );
                error.fatal
            }
            other => panic!("expected an Error frame, got {:?}", other.kind()),
        }
    }

    /// The relay ends the stream without another frame.
    pub async fn expect_end(&mut self) {
        if let Some(frame) = self.read_frame().await {
            panic!(
                "expected the end of the stream, got a {:?} frame",
                frame.kind()
            );
        }
    }
}

/// Encodes one frame.
pub fn frame_bytes<H: codec::Encode>(header: &H, payload: &[u8]) -> Bytes {
    codec::encode_to_bytes(header, payload).expect("encode")
}

/// Sorted device numbers of a set of deliveries.
pub fn devices_of(deliveries: &[Delivered]) -> BTreeSet<u32> {
    deliveries.iter().map(|d| d.device.device.0).collect()
}

/// A PEM file's contents, for TLS set-ups built by hand.
pub fn read_pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Returns once every core has handled everything sent to its inbox before the call.
pub async fn settle_cores(shared: &std::sync::Arc<relay::io::Shared>) {
    let shared = shared.clone();
    let settling = tokio::task::spawn_blocking(move || {
        for (core, inbox) in shared.senders.iter().enumerate() {
            let (done, handled) = crossbeam_channel::bounded(1);
            inbox
                .send(vec![WorkerMsg::Barrier(done)])
                .expect("a running core's inbox");
            shared.notifies[core].notify_one();
            handled
                .recv_timeout(STEP_TIMEOUT)
                .unwrap_or_else(|_| panic!("core {core} did not settle in {STEP_TIMEOUT:?}"));
        }
    });
    settling.await.expect("settling panicked");
}

/// Stalls core `core` (its thread waits) until the returned sender is dropped; returns once
/// the core has stopped.
pub async fn hold_core(
    shared: &std::sync::Arc<relay::io::Shared>,
    core: u16,
) -> crossbeam_channel::Sender<()> {
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded(1);
    let index = usize::from(core);
    shared.senders[index]
        .send(vec![WorkerMsg::Hold {
            entered: entered_tx,
            release: release_rx,
        }])
        .expect("a running core's inbox");
    shared.notifies[index].notify_one();
    tokio::task::spawn_blocking(move || entered.recv_timeout(STEP_TIMEOUT))
        .await
        .expect("waiting for the hold")
        .expect("the core stopped in time");
    release
}
