//! A fake relay for the client tests: an rcgen PKI (a CA, a server certificate for
//! "localhost", client certificates from that CA and from a rogue one) and a tokio-rustls
//! server that accepts one connection at a time and lets the test write whatever bytes it
//! wants.

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use client::ClientTls;
use codec::{Frame, FrameDecoder, HeaderRef, Hello, SessionLimits, Welcome};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Every test body runs under this bound.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

pub async fn bounded<F: Future>(future: F) -> F::Output {
    match tokio::time::timeout(TEST_TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// A certificate (PEM) with its private key (PKCS#8 PEM).
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Pki {
    pub ca_pem: String,
    pub server_cert: CertificateDer<'static>,
    pub server_key_pkcs8: Vec<u8>,
    /// Issued by the CA the fake relay trusts.
    pub client: Identity,
    /// A self-contained PKI the relay does not trust.
    pub rogue_ca_pem: String,
    pub rogue_client: Identity,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    CertifiedIssuer::self_signed(params, key).expect("CA certificate")
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![purpose];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, &**issuer).expect("leaf certificate");
    (cert, key)
}

fn identity(issuer: &CertifiedIssuer<'static, KeyPair>, name: &str) -> Identity {
    let (cert, key) = leaf(issuer, name, ExtendedKeyUsagePurpose::ClientAuth);
    Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

impl Pki {
    pub fn generate() -> Pki {
        let ca = ca("fake relay test CA");
        let (server_cert, server_key) = leaf(&ca, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let rogue = ca_rogue();
        Pki {
            ca_pem: ca.pem(),
            server_cert: server_cert.der().clone(),
            server_key_pkcs8: server_key.serialize_der(),
            client: identity(&ca, "partner.test"),
            rogue_client: identity(&rogue, "intruder.test"),
            rogue_ca_pem: rogue.pem(),
        }
    }

    /// Trusts the relay's CA and presents the good client certificate.
    pub fn client_tls(&self) -> ClientTls {
        self.client_tls_with(Some(&self.client))
    }

    /// Trusts the relay's CA and presents `identity` (or no certificate).
    pub fn client_tls_with(&self, identity: Option<&Identity>) -> ClientTls {
        ClientTls::from_pem(
            self.ca_pem.as_bytes(),
            identity.map(|id| (id.cert_pem.as_bytes(), id.key_pem.as_bytes())),
        )
        .expect("client TLS config")
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA root");
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_pkcs8.clone())),
            )
            .expect("server certificate");
        Arc::new(config)
    }
}

fn ca_rogue() -> CertifiedIssuer<'static, KeyPair> {
    ca("rogue CA")
}

/// The fake relay's listening socket.
pub struct FakeRelay {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl FakeRelay {
    pub async fn start(pki: &Pki) -> FakeRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        FakeRelay {
            listener,
            acceptor: TlsAcceptor::from(pki.server_config()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local addr")
    }

    /// Accepts one connection and runs the TLS handshake. When the handshake fails (the
    /// client's certificate was refused), the socket is kept open until the client hangs up,
    /// so the alert reaches the client instead of a TCP reset.
    pub async fn accept(&self) -> io::Result<ServerConn> {
        let (tcp, _) = self.listener.accept().await?;
        tcp.set_nodelay(true)?;
        match self.acceptor.accept(tcp).into_fallible().await {
            Ok(stream) => Ok(ServerConn {
                stream,
                decoder: FrameDecoder::with_capacity(16 * 1024),
            }),
            Err((error, mut tcp)) => {
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                Err(error)
            }
        }
    }
}

/// One accepted session on the fake relay.
pub struct ServerConn {
    stream: TlsStream<TcpStream>,
    decoder: FrameDecoder,
}

pub fn test_limits() -> SessionLimits {
    SessionLimits {
        frame_bytes_max: u32::try_from(codec::limits::FRAME_BYTES_MAX).expect("fits"),
        payload_bytes_max: u32::try_from(codec::limits::PAYLOAD_BYTES_MAX).expect("fits"),
        recipient_devices_max: 32,
        receipt_ids_max: 256,
        devices_per_user_max: 5,
        frames_in_flight_max: 1024,
        ttl_seconds_max: codec::limits::TTL_SECONDS_MAX,
    }
}

pub fn test_welcome(session_id: u64) -> Welcome {
    Welcome {
        version: 1,
        session_id,
        features: 0,
        limits: test_limits(),
    }
}

impl ServerConn {
    /// The next frame from the client; `None` at end of stream (clean or not).
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(error) => panic!("client sent a malformed frame: {error}"),
            }
            match self.stream.read_buf(self.decoder.buffer_mut()).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn expect_frame(&mut self) -> Frame {
        self.read_frame().await.expect("a frame from the client")
    }

    /// Reads the client's `Hello`.
    pub async fn expect_hello(&mut self) -> Hello {
        let frame = self.expect_frame().await;
        let decoded = frame.decode().expect("Hello decodes");
        match decoded.header {
            HeaderRef::Hello(hello) => {
                rkyv::deserialize::<Hello, rkyv::rancor::Error>(hello).expect("owned Hello")
            }
            other => panic!("expected Hello, got {:?}", other.kind()),
        }
    }

    /// Reads `Hello`, answers `Welcome`.
    pub async fn handshake(&mut self) -> Hello {
        let hello = self.expect_hello().await;
        self.send(&test_welcome(7), &[]).await;
        hello
    }

    pub async fn send<H: codec::Encode>(&mut self, header: &H, payload: &[u8]) {
        let bytes = codec::encode_to_bytes(header, payload).expect("encode");
        self.write(&bytes).await;
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("server write");
        self.stream.flush().await.expect("server flush");
    }

    /// Writes `bytes` in pieces of the given sizes (cycling), each its own TLS record and
    /// flush, so the client's reads see frames split anywhere.
    pub async fn write_in_pieces(&mut self, bytes: &[u8], sizes: &[usize]) {
        let mut at = 0;
        for &size in sizes.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + size.max(1)).min(bytes.len());
            self.write(&bytes[at..end]).await;
            at = end;
        }
    }

    /// TLS close_notify, then TCP shutdown: a clean end of session.
    pub async fn close(mut self) {
        self.stream.shutdown().await.expect("server shutdown");
        // Wait for the client's side to end too, so the socket is not reset under it.
        let mut sink = BytesMut::with_capacity(1024);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while matches!(self.stream.read_buf(&mut sink).await, Ok(n) if n > 0) {
                sink.clear();
            }
        })
        .await;
    }

    /// Drops the TCP connection without a TLS close_notify.
    pub fn abort(self) {
        drop(self.stream);
    }
}

/// An envelope frame's bytes, for building deliveries.
pub fn frame_bytes<H: codec::Encode>(header: &H, payload: &[u8]) -> Bytes {
    codec::encode_to_bytes(header, payload).expect("encode")
}
