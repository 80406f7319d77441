//! The client against a fake relay over real sockets on 127.0.0.1: handshake, refusals,
//! certificates, sending, receiving (whole and split frames), malformed input, closing.

mod support;

use std::time::Duration;

use bytes::Bytes;
use client::{ClientError, ConnectOptions, Connection, Event, Inbound, connect};
use codec::{
    Ack, AckStatus, ContentType, Delivery, DeviceAddress, DeviceId, DeviceList, DeviceSelection,
    E2eProtocol, Envelope, ErrorCode, ErrorFrame, FrameKind, HeaderRef, MessageId, NetworkId,
    Notice, NoticeKind, Receipt, ReceiptKind, Role, Signal, SignalKind, UserAddress, UserId,
    delivery_flags, envelope_flags,
};
use rustls::AlertDescription;
use support::{FakeRelay, Pki, ServerConn, bounded, frame_bytes, test_welcome};

fn device(network: u32, user: u128, device: u32) -> DeviceAddress {
    DeviceAddress::new(NetworkId(network), UserId(user), DeviceId(device))
}

fn user(network: u32, user: u128) -> UserAddress {
    UserAddress::new(NetworkId(network), UserId(user))
}

fn envelope(id: u128, flags: u16) -> Envelope {
    Envelope {
        message_id: MessageId(id),
        sender: device(1, 0x1001, 1),
        recipient: user(2, 0x2002),
        devices: DeviceSelection::Listed(vec![DeviceId(1), DeviceId(2)]),
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: 1_700_000_000_000,
        ttl_seconds: 3600,
        flags,
    }
}

fn receipt(id: u128) -> Receipt {
    Receipt {
        receipt_id: MessageId(id),
        kind: ReceiptKind::Delivered,
        sender: device(2, 0x2002, 1),
        recipient: user(1, 0x1001),
        message_ids: vec![MessageId(1), MessageId(2), MessageId(3)],
        timestamp_ms: 1_700_000_000_500,
    }
}

fn signal() -> Signal {
    Signal {
        sender: device(2, 0x2002, 1),
        recipient: user(1, 0x1001),
        kind: SignalKind::TypingStarted,
        timestamp_ms: 1_700_000_000_900,
    }
}

fn deserialize<T, A>(archived: &A) -> T
where
    A: rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rkyv::rancor::Error>>,
{
    rkyv::deserialize::<T, rkyv::rancor::Error>(archived).expect("deserialize")
}

/// A fake relay that runs `serve` on its first connection, and a client connected to it
/// with the good certificate as a partner server.
async fn session<F, Fut>(serve: F) -> (Connection, tokio::task::JoinHandle<()>)
where
    F: FnOnce(ServerConn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let pki = Pki::generate();
    let relay = FakeRelay::start(&pki).await;
    let addr = relay.addr();
    let server = tokio::spawn(async move {
        let mut conn = relay.accept().await.expect("TLS accept");
        conn.handshake().await;
        serve(conn).await;
    });
    let options = ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer);
    let connection = connect(options).await.expect("connect");
    (connection, server)
}

#[tokio::test]
async fn handshake_sends_hello_and_returns_welcome() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let mut conn = relay.accept().await.expect("TLS accept");
            tx.send(conn.expect_hello().await).ok();
            conn.send(&test_welcome(42), &[]).await;
            conn.close().await;
        });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::GatekeeperServer)
            .agent("test-agent/1.0")
            .server_name("localhost");
        let mut connection = connect(options).await.expect("connect");
        assert_eq!(connection.welcome(), &test_welcome(42));
        assert_eq!(connection.session_id(), 42);
        assert_eq!(connection.peer_addr(), addr);

        let hello = rx.await.expect("Hello");
        assert_eq!(hello.version_min, codec::PROTOCOL_VERSION_MIN);
        assert_eq!(hello.version_max, codec::PROTOCOL_VERSION_MAX);
        assert_eq!(hello.role, Role::GatekeeperServer);
        assert_eq!(hello.agent, "test-agent/1.0");
        assert_eq!(hello.features, 0);
        assert_eq!(hello.token, None);

        assert_eq!(connection.next_event().await.expect("event"), Event::Closed);
        assert!(matches!(
            connection.next_event().await,
            Err(ClientError::Closed)
        ));
        connection.close().await.expect("close");
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn device_hello_carries_the_signed_token() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move {
            let mut conn = relay.accept().await.expect("TLS accept");
            let hello = conn.handshake().await;
            conn.close().await;
            hello
        });
        let key = client::generate_network_key();
        let me = device(2, 0x2002, 3);
        let token = client::mint_device_token(&key, me, 1_900_000_000_000, 77).expect("mint");
        let options =
            ConnectOptions::new(addr, pki.client_tls(), Role::Device).token(token.clone());
        let connection = connect(options).await.expect("connect");
        drop(connection);

        let hello = server.await.expect("server task");
        assert_eq!(hello.role, Role::Device);
        let received = hello.token.expect("token in Hello");
        assert_eq!(received, token);
        let public = client::network_public_key(&key).expect("public key");
        assert!(client::verify_device_token(&public, &received));
    })
    .await;
}

#[tokio::test]
async fn an_error_answer_to_hello_is_refused_with_its_code() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move {
            let mut conn = relay.accept().await.expect("TLS accept");
            conn.expect_hello().await;
            let refusal = ErrorFrame {
                code: ErrorCode::RoleNotAllowed.as_u16(),
                refers_to: None,
                fatal: true,
                reason: "this certificate may not connect as a gatekeeper".into(),
            };
            conn.send(&refusal, &[]).await;
            conn.close().await;
        });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::GatekeeperServer);
        let error = connect(options).await.expect_err("refused");
        match &error {
            ClientError::Refused { code, name, reason } => {
                assert_eq!(*code, 204);
                assert_eq!(*name, Some(ErrorCode::RoleNotAllowed));
                assert_eq!(reason, "this certificate may not connect as a gatekeeper");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        assert_eq!(error.code(), Some(204));
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn an_unknown_error_code_is_refused_without_a_name() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move {
            let mut conn = relay.accept().await.expect("TLS accept");
            conn.expect_hello().await;
            let refusal = ErrorFrame {
                code: 299,
                refers_to: None,
                fatal: true,
                reason: "from the future".into(),
            };
            conn.send(&refusal, &[]).await;
            conn.close().await;
        });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer);
        match connect(options).await {
            Err(ClientError::Refused {
                code: 299,
                name: None,
                ..
            }) => {}
            other => panic!("expected Refused 299, got {other:?}"),
        }
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn a_client_certificate_from_an_unknown_ca_is_rejected() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move { relay.accept().await.map(|_| ()) });
        let tls = pki.client_tls_with(Some(&pki.rogue_client));
        let options = ConnectOptions::new(addr, tls, Role::PartnerServer);
        let error = connect(options).await.expect_err("rejected");
        assert!(
            matches!(
                error,
                ClientError::CertificateRejected(AlertDescription::UnknownCA)
            ),
            "got {error:?}"
        );
        assert!(server.await.expect("server task").is_err());
    })
    .await;
}

#[tokio::test]
async fn a_missing_client_certificate_is_rejected() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move { relay.accept().await.map(|_| ()) });
        let options = ConnectOptions::new(addr, pki.client_tls_with(None), Role::PartnerServer);
        let error = connect(options).await.expect_err("rejected");
        assert!(
            matches!(
                error,
                ClientError::CertificateRejected(AlertDescription::CertificateRequired)
            ),
            "got {error:?}"
        );
        assert!(server.await.expect("server task").is_err());
    })
    .await;
}

#[tokio::test]
async fn a_relay_certificate_from_an_untrusted_ca_is_a_tls_error() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move { relay.accept().await.map(|_| ()) });
        // Trusts only the rogue CA, so the relay's certificate does not verify.
        let tls = client::ClientTls::from_pem(
            pki.rogue_ca_pem.as_bytes(),
            Some((
                pki.client.cert_pem.as_bytes(),
                pki.client.key_pem.as_bytes(),
            )),
        )
        .expect("TLS config");
        let error = connect(ConnectOptions::new(addr, tls, Role::PartnerServer))
            .await
            .expect_err("untrusted relay");
        assert!(
            matches!(
                error,
                ClientError::Tls(rustls::Error::InvalidCertificate(_))
            ),
            "got {error:?}"
        );
        assert!(server.await.expect("server task").is_err());
    })
    .await;
}

#[tokio::test]
async fn a_wrong_server_name_is_a_tls_error() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move { relay.accept().await.map(|_| ()) });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer)
            .server_name("relay.elsewhere.test");
        let error = connect(options).await.expect_err("name mismatch");
        assert!(
            matches!(
                error,
                ClientError::Tls(rustls::Error::InvalidCertificate(_))
            ),
            "got {error:?}"
        );
        assert!(server.await.expect("server task").is_err());
    })
    .await;
}

#[tokio::test]
async fn a_close_before_welcome_is_a_clear_error() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move {
            let mut conn = relay.accept().await.expect("TLS accept");
            conn.expect_hello().await;
            conn.close().await;
        });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer);
        let error = connect(options).await.expect_err("no Welcome");
        assert!(
            matches!(error, ClientError::ClosedBeforeWelcome),
            "got {error:?}"
        );
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn an_abrupt_close_before_welcome_is_a_clear_error() {
    bounded(async {
        let pki = Pki::generate();
        let relay = FakeRelay::start(&pki).await;
        let addr = relay.addr();
        let server = tokio::spawn(async move {
            let mut conn = relay.accept().await.expect("TLS accept");
            conn.expect_hello().await;
            conn.abort();
        });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer);
        let error = connect(options).await.expect_err("no Welcome");
        assert!(
            matches!(error, ClientError::ClosedBeforeWelcome),
            "got {error:?}"
        );
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn a_silent_relay_times_out() {
    bounded(async {
        let pki = Pki::generate();
        // Accepts TCP, never speaks TLS.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(socket);
        });
        let options = ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer)
            .connect_timeout(Duration::from_millis(200));
        let error = connect(options).await.expect_err("timeout");
        assert!(
            matches!(error, ClientError::Timeout(t) if t == Duration::from_millis(200)),
            "got {error:?}"
        );
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn an_overlong_agent_fails_before_connecting() {
    bounded(async {
        let pki = Pki::generate();
        // Nothing listens here: the error must come from encoding, not from the socket.
        let addr = "127.0.0.1:9".parse().expect("addr");
        let options =
            ConnectOptions::new(addr, pki.client_tls(), Role::PartnerServer).agent("x".repeat(65));
        let error = connect(options).await.expect_err("agent too long");
        assert!(
            matches!(error, ClientError::Encode(e) if e.code() == ErrorCode::TextTooLong),
            "got {error:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn sent_frames_decode_on_the_relay() {
    bounded(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (mut connection, server) = session(|mut conn| async move {
            let mut frames = Vec::new();
            for _ in 0..6 {
                frames.push(conn.expect_frame().await);
            }
            tx.send(frames).ok();
            conn.close().await;
        })
        .await;

        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251).to_le_bytes()[0]).collect();
        let env = envelope(0xABCD, envelope_flags::SILENT);
        connection
            .send_envelope(&env, &payload)
            .await
            .expect("send");
        connection.send_receipt(&receipt(0x55)).await.expect("send");
        connection.send_signal(&signal()).await.expect("send");
        connection
            .ack(MessageId(0x99), device(2, 0x2002, 1))
            .await
            .expect("ack");
        // Nothing is written until flush (the buffer is far below the auto-flush threshold).
        assert!(connection.sender().buffered_len() > payload.len());

        // A frame past a protocol limit is refused and leaves the buffer as it was.
        let before = connection.sender().buffered_len();
        let huge = vec![0u8; codec::limits::PAYLOAD_BYTES_MAX + 1];
        let error = connection
            .send_envelope(&env, &huge)
            .await
            .expect_err("payload too large");
        assert_eq!(error.code(), Some(ErrorCode::PayloadTooLarge.as_u16()));
        assert!(matches!(error, ClientError::Encode(_)));
        assert_eq!(connection.sender().buffered_len(), before);

        // A bare Error frame through the generic path.
        let complaint = ErrorFrame {
            code: ErrorCode::UnexpectedFrame.as_u16(),
            refers_to: Some(MessageId(5)),
            fatal: false,
            reason: "huh".into(),
        };
        connection.send_frame(&complaint, &[]).await.expect("send");
        let devices = DeviceList {
            request_id: MessageId(0xD1),
            user: user(2, 0x2002),
            devices: vec![DeviceId(1), DeviceId(2)],
        };
        connection.send_device_list(&devices).await.expect("send");
        connection.flush().await.expect("flush");
        assert_eq!(connection.sender().buffered_len(), 0);

        let frames = rx.await.expect("frames");
        let decoded: Vec<_> = frames
            .iter()
            .map(|f| f.decode().expect("decodes"))
            .collect();
        match decoded[0].header {
            HeaderRef::Envelope(h) => {
                assert_eq!(deserialize::<Envelope, _>(h), env);
                assert_eq!(decoded[0].payload, &payload[..]);
            }
            other => panic!("expected Envelope, got {:?}", other.kind()),
        }
        match decoded[1].header {
            HeaderRef::Receipt(h) => assert_eq!(deserialize::<Receipt, _>(h), receipt(0x55)),
            other => panic!("expected Receipt, got {:?}", other.kind()),
        }
        match decoded[2].header {
            HeaderRef::Signal(h) => assert_eq!(deserialize::<Signal, _>(h), signal()),
            other => panic!("expected Signal, got {:?}", other.kind()),
        }
        match decoded[3].header {
            HeaderRef::Ack(h) => assert_eq!(
                deserialize::<Ack, _>(h),
                Ack {
                    message_id: MessageId(0x99),
                    address: device(2, 0x2002, 1),
                    status: AckStatus::Accepted,
                }
            ),
            other => panic!("expected Ack, got {:?}", other.kind()),
        }
        match decoded[4].header {
            HeaderRef::Error(h) => assert_eq!(deserialize::<ErrorFrame, _>(h), complaint),
            other => panic!("expected Error, got {:?}", other.kind()),
        }
        match decoded[5].header {
            HeaderRef::DeviceList(h) => assert_eq!(deserialize::<DeviceList, _>(h), devices),
            other => panic!("expected DeviceList, got {:?}", other.kind()),
        }
        for frame in &decoded {
            assert!(frame.delivery_inner().expect("not a delivery").is_none());
        }

        assert_eq!(connection.next_event().await.expect("event"), Event::Closed);
        connection.close().await.expect("close");
        assert!(matches!(
            connection.send_signal(&signal()).await,
            Err(ClientError::Closed)
        ));
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn a_send_past_the_threshold_flushes_by_itself() {
    bounded(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (connection, server) = session(|mut conn| async move {
            let first = conn.expect_frame().await;
            let second = conn.expect_frame().await;
            tx.send((first.payload().len(), second.payload().len()))
                .ok();
            conn.close().await;
        })
        .await;
        let (mut sender, mut receiver) = connection.into_split();
        let payload = vec![7u8; 40 * 1024];
        sender
            .send_envelope(&envelope(1, 0), &payload)
            .await
            .expect("send");
        assert!(sender.buffered_len() >= payload.len());
        sender
            .send_envelope(&envelope(2, 0), &payload)
            .await
            .expect("send");
        assert_eq!(sender.buffered_len(), 0, "passed 64 KiB: flushed");
        // No explicit flush: the relay has both frames already.
        assert_eq!(rx.await.expect("sizes"), (payload.len(), payload.len()));
        assert_eq!(receiver.next_event().await.expect("event"), Event::Closed);
        sender.close().await.expect("close");
        server.await.expect("server task");
    })
    .await;
}

/// The frames the fake relay sends in the receive tests, and the events they must become.
fn relay_script() -> (Vec<u8>, Vec<Event>) {
    let mut wire = Vec::new();
    let mut events = Vec::new();

    let ack = Ack {
        message_id: MessageId(0xA1),
        address: device(1, 0x1001, 1),
        status: AckStatus::Accepted,
    };
    wire.extend_from_slice(&frame_bytes(&ack, &[]));
    events.push(Event::Ack(ack));

    let rejected = Ack {
        message_id: MessageId(0xA2),
        address: device(1, 0x1001, 1),
        status: AckStatus::Rejected {
            code: ErrorCode::DeviceListStale.as_u16(),
            retry_after_ms: 0,
            current_devices: vec![DeviceId(1), DeviceId(4)],
        },
    };
    wire.extend_from_slice(&frame_bytes(&rejected, &[]));
    events.push(Event::Ack(rejected));

    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
    let env = envelope(0xE1, 0);
    let inner = frame_bytes(&env, &payload);
    let target = device(2, 0x2002, 1);
    let delivery = Delivery {
        device: target,
        seq: 10,
        flags: 0,
    };
    wire.extend_from_slice(&frame_bytes(&delivery, &inner));
    events.push(Event::Delivery {
        device: target,
        seq: 10,
        ephemeral: false,
        inner: Inbound::Envelope {
            header: env,
            payload: Bytes::from(payload),
        },
    });

    let rec = receipt(0xE2);
    let delivery = Delivery {
        device: device(1, 0x1001, 1),
        seq: 3,
        flags: 0,
    };
    wire.extend_from_slice(&frame_bytes(&delivery, &frame_bytes(&rec, &[])));
    events.push(Event::Delivery {
        device: device(1, 0x1001, 1),
        seq: 3,
        ephemeral: false,
        inner: Inbound::Receipt(rec),
    });

    let delivery = Delivery {
        device: device(1, 0x1001, 2),
        seq: 0,
        flags: delivery_flags::EPHEMERAL,
    };
    wire.extend_from_slice(&frame_bytes(&delivery, &frame_bytes(&signal(), &[])));
    events.push(Event::Delivery {
        device: device(1, 0x1001, 2),
        seq: 0,
        ephemeral: true,
        inner: Inbound::Signal(signal()),
    });

    let error = ErrorFrame {
        code: ErrorCode::SenderNotAllowed.as_u16(),
        refers_to: Some(MessageId(0x51)),
        fatal: false,
        reason: "spoofed sender".into(),
    };
    wire.extend_from_slice(&frame_bytes(&error, &[]));
    events.push(Event::Error(error));

    let notice = Notice {
        notice_id: MessageId(0x40),
        kind: NoticeKind::Deprecation,
        audience: Some(user(2, 0x2002)),
        effective_at_ms: 1_800_000_000_000,
        code: 0,
        text: "protocol version 1 ends in 2027; please upgrade".into(),
    };
    wire.extend_from_slice(&frame_bytes(&notice, &[]));
    events.push(Event::Notice(notice));

    (wire, events)
}

async fn receive_script(pieces: &'static [usize]) {
    let (wire, expected) = relay_script();
    let (mut connection, server) = session(move |mut conn| async move {
        if pieces.is_empty() {
            conn.write(&wire).await;
        } else {
            conn.write_in_pieces(&wire, pieces).await;
        }
        conn.close().await;
    })
    .await;
    for want in &expected {
        let got = connection.next_event().await.expect("event");
        assert_eq!(&got, want);
    }
    assert_eq!(connection.next_event().await.expect("end"), Event::Closed);
    assert!(matches!(
        connection.next_event().await,
        Err(ClientError::Closed)
    ));
    connection.close().await.expect("close");
    server.await.expect("server task");

    // What the events say about acking.
    assert_eq!(expected[0].ack_needed(), None);
    assert_eq!(
        expected[2].ack_needed(),
        Some((MessageId(0xE1), device(2, 0x2002, 1)))
    );
    assert_eq!(
        expected[3].ack_needed(),
        Some((MessageId(0xE2), device(1, 0x1001, 1)))
    );
    assert_eq!(expected[4].ack_needed(), None, "ephemeral signal");
    assert_eq!(expected[5].error_code(), Some(ErrorCode::SenderNotAllowed));
}

#[tokio::test]
async fn the_receiver_yields_every_event_kind() {
    bounded(receive_script(&[])).await;
}

#[tokio::test]
async fn frames_split_across_many_small_writes_are_reassembled() {
    bounded(receive_script(&[1, 2, 3, 5, 7, 11, 64, 1])).await;
}

#[tokio::test]
async fn a_large_envelope_payload_arrives_whole() {
    bounded(async {
        let payload = vec![0x5Au8; 10_000];
        let inner = frame_bytes(&envelope(1, 0), &payload);
        let delivery = Delivery {
            device: device(2, 0x2002, 1),
            seq: 1,
            flags: 0,
        };
        let wire = frame_bytes(&delivery, &inner);
        let (mut connection, server) = session(move |mut conn| async move {
            conn.write(&wire).await;
            conn.close().await;
        })
        .await;
        match connection.next_event().await.expect("event") {
            Event::Delivery {
                inner: Inbound::Envelope { payload: got, .. },
                ..
            } => {
                assert_eq!(got, payload);
            }
            other => panic!("expected an envelope delivery, got {other:?}"),
        }
        drop(connection);
        server.await.expect("server task");
    })
    .await;
}

/// A frame of `kind` whose header is `header`, with a correct preamble.
fn raw_frame(kind: u8, header: &[u8]) -> Vec<u8> {
    let len = u32::try_from(4 + header.len()).expect("small");
    let hdr_len = u16::try_from(header.len()).expect("small");
    let mut out = Vec::new();
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.push(1);
    out.extend_from_slice(&hdr_len.to_le_bytes());
    out.extend_from_slice(header);
    out
}

#[tokio::test]
async fn malformed_frames_yield_codec_errors_with_their_codes() {
    bounded(async {
        let notice = Notice {
            notice_id: MessageId(1),
            kind: NoticeKind::Incident,
            audience: None,
            effective_at_ms: 0,
            code: 0,
            text: "still here".into(),
        };
        let mut wire = Vec::new();
        // An Ack whose header is garbage: HEADER_MALFORMED, one frame spoiled.
        wire.extend_from_slice(&raw_frame(4, &[0xFF; 55]));
        wire.extend_from_slice(&frame_bytes(&notice, &[]));
        // An unknown kind: UNKNOWN_KIND.
        wire.extend_from_slice(&raw_frame(42, &[]));
        // A Delivery wrapping a Welcome: INVALID_FIELD.
        let delivery = Delivery {
            device: device(2, 0x2002, 1),
            seq: 1,
            flags: 0,
        };
        wire.extend_from_slice(&frame_bytes(&delivery, &frame_bytes(&test_welcome(1), &[])));
        // A bare Envelope, which a relay only sends inside a Delivery.
        wire.extend_from_slice(&frame_bytes(&envelope(3, 0), b"ct"));
        wire.extend_from_slice(&frame_bytes(&notice, &[]));
        // A length prefix shorter than the preamble: FRAME_TOO_SHORT, fatal.
        wire.extend_from_slice(&[2, 0, 0, 0, 0xAA, 0xBB]);

        let (mut connection, server) = session(move |mut conn| async move {
            conn.write(&wire).await;
            conn.close().await;
        })
        .await;

        let codec_code = |result: Result<Event, ClientError>| match result {
            Err(ClientError::Codec(error)) => (error.code(), error.is_framing()),
            other => panic!("expected a codec error, got {other:?}"),
        };
        assert_eq!(
            codec_code(connection.next_event().await),
            (ErrorCode::HeaderMalformed, false)
        );
        assert_eq!(
            connection.next_event().await.expect("goes on"),
            Event::Notice(notice.clone())
        );
        assert_eq!(
            codec_code(connection.next_event().await),
            (ErrorCode::UnknownKind, false)
        );
        assert_eq!(
            codec_code(connection.next_event().await),
            (ErrorCode::InvalidField, false)
        );
        match connection.next_event().await {
            Err(ClientError::UnexpectedFrame {
                kind: FrameKind::Envelope,
            }) => {}
            other => panic!("expected UnexpectedFrame, got {other:?}"),
        }
        assert_eq!(
            connection.next_event().await.expect("goes on"),
            Event::Notice(notice)
        );
        assert_eq!(
            codec_code(connection.next_event().await),
            (ErrorCode::FrameTooShort, true)
        );
        // A framing error is final.
        let again = connection.next_event().await;
        assert_eq!(codec_code(again), (ErrorCode::FrameTooShort, true));
        drop(connection);
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn a_frame_cut_by_the_end_of_stream_is_truncated() {
    bounded(async {
        let bytes = frame_bytes(&envelope(1, 0), &[1u8; 100]);
        let cut = bytes.slice(..bytes.len() - 10);
        let (mut connection, server) = session(move |mut conn| async move {
            conn.write(&cut).await;
            conn.close().await;
        })
        .await;
        match connection.next_event().await {
            Err(ClientError::Codec(error)) => {
                assert_eq!(error.code(), ErrorCode::FrameTruncated);
            }
            other => panic!("expected FRAME_TRUNCATED, got {other:?}"),
        }
        drop(connection);
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn a_fatal_error_then_a_hang_up_ends_the_session() {
    bounded(async {
        let fatal = ErrorFrame {
            code: ErrorCode::ShuttingDown.as_u16(),
            refers_to: None,
            fatal: true,
            reason: "draining".into(),
        };
        let sent = fatal.clone();
        let (mut connection, server) = session(move |mut conn| async move {
            conn.send(&sent, &[]).await;
            // No close_notify: the TCP connection just goes away.
            conn.abort();
        })
        .await;
        assert_eq!(
            connection.next_event().await.expect("error event"),
            Event::Error(fatal)
        );
        assert_eq!(connection.next_event().await.expect("end"), Event::Closed);
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test]
async fn a_hang_up_without_close_notify_is_an_io_error() {
    bounded(async {
        let (mut connection, server) = session(|conn| async move {
            conn.abort();
        })
        .await;
        match connection.next_event().await {
            Err(ClientError::Io(error)) => {
                assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
            }
            other => panic!("expected an IO error, got {other:?}"),
        }
        assert!(matches!(
            connection.next_event().await,
            Err(ClientError::Closed)
        ));
        server.await.expect("server task");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_halves_send_and_receive_concurrently() {
    const COUNT: u128 = 300;
    bounded(async {
        // The relay acks every envelope as it arrives.
        let (connection, server) = session(|mut conn| async move {
            while let Some(frame) = conn.read_frame().await {
                let decoded = frame.decode().expect("decodes");
                if let HeaderRef::Envelope(envelope) = decoded.header {
                    let ack = Ack {
                        message_id: envelope.message_id.get(),
                        address: envelope.sender.get(),
                        status: AckStatus::Accepted,
                    };
                    conn.send(&ack, &[]).await;
                }
            }
        })
        .await;
        let (mut sender, mut receiver) = connection.into_split();
        let sending = tokio::spawn(async move {
            for id in 0..COUNT {
                sender
                    .send_envelope(&envelope(id, 0), &[0u8; 512])
                    .await
                    .expect("send");
                if id % 16 == 15 {
                    sender.flush().await.expect("flush");
                }
            }
            sender.flush().await.expect("flush");
            sender
        });
        let mut acked = Vec::new();
        while acked.len() < COUNT as usize {
            match receiver.next_event().await.expect("event") {
                Event::Ack(Ack {
                    message_id,
                    status: AckStatus::Accepted,
                    ..
                }) => acked.push(message_id.0),
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
        assert_eq!(acked, (0..COUNT).collect::<Vec<_>>());
        let mut sender = sending.await.expect("sender task");
        sender.close().await.expect("close");
        server.await.expect("server task");
    })
    .await;
}

/// `next_frame` hands out the same frames `next_event` would, unconverted and in order, and
/// both can be mixed on one receiver.
#[tokio::test]
async fn raw_frames_come_in_order_and_mix_with_events() {
    bounded(async {
        let (wire, expected) = relay_script();
        let (connection, server) = session(move |mut conn| async move {
            conn.write_in_pieces(&wire, &[3, 17, 1, 100]).await;
            conn.close().await;
        })
        .await;
        let (_send, mut recv) = connection.into_split();
        // The first two as raw frames, the rest as events.
        for want in &expected[..2] {
            let frame = recv
                .next_frame()
                .await
                .expect("frame")
                .expect("not the end");
            let view = frame.decode().expect("valid");
            let HeaderRef::Ack(ack) = view.header else {
                panic!("not an ack: {:?}", view.kind())
            };
            let Event::Ack(expected_ack) = want else {
                unreachable!()
            };
            assert_eq!(ack.message_id.get(), expected_ack.message_id);
        }
        let frame = recv
            .next_frame()
            .await
            .expect("frame")
            .expect("not the end");
        let view = frame.decode().expect("valid");
        let HeaderRef::Delivery(delivery) = view.header else {
            panic!("not a delivery")
        };
        assert_eq!(delivery.device.get(), device(2, 0x2002, 1));
        let inner = view
            .delivery_inner()
            .expect("inner")
            .expect("a delivery has one");
        let HeaderRef::Envelope(envelope) = inner.header else {
            panic!("not an envelope")
        };
        assert_eq!(envelope.message_id.get(), MessageId(0xE1));
        for want in &expected[3..] {
            assert_eq!(&recv.next_event().await.expect("event"), want);
        }
        assert!(recv.next_frame().await.expect("clean end").is_none());
        assert!(matches!(recv.next_frame().await, Err(ClientError::Closed)));
        server.await.expect("server task");
    })
    .await;
}
