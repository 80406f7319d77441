//! A backlog larger than the shard's memory budget, through the real IO path: the frames of
//! an offline device leave memory once stored, and the io_uring loader reads them back from
//! the log, in order, when the device connects.
#![allow(clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::time::Duration;

use client::{ClientTls, ConnectOptions, Event, Inbound, connect, mint_device_token};
use codec::*;
use relay::config::Config;
use relay::io::Relay;

#[test]
fn an_offline_backlog_beyond_memory_is_delivered_in_order() {
    let data_dir = std::env::temp_dir().join(format!("a7-spill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut config = Config::embedded();
    config.data_dir = data_dir.clone();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.cores = 1;
    // The smallest budget allowed: one whole frame's worth (about 270 KiB).
    config.limits.shard_ram_bytes_max = codec::limits::FRAME_BYTES_MAX as u64;
    config.interop.enforce = false;
    let relay = Relay::start(&config).expect("relay starts");
    let addr = relay.listen;
    let pki = data_dir.join("pki");
    let tls = |name: &str| {
        ClientTls::from_pem_files(
            &pki.join("ca.pem"),
            Some((
                &pki.join(format!("{name}.pem")),
                &pki.join(format!("{name}.key")),
            )),
        )
        .unwrap()
    };
    let user = UserAddress::new(NetworkId(2), UserId(77));
    let device = user.device(DeviceId(1));
    let messages: u64 = 400;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut partner = connect(ConnectOptions::new(
            addr,
            tls("partner"),
            Role::PartnerServer,
        ))
        .await
        .unwrap();
        partner
            .sender()
            .send_device_list_now(&DeviceList {
                request_id: MessageId(1),
                user,
                devices: vec![DeviceId(1)],
            })
            .await
            .unwrap();
        assert!(matches!(
            partner.next_event().await.unwrap(),
            Event::Ack(Ack {
                status: AckStatus::Accepted,
                ..
            })
        ));
        // The partner's server leaves: its users' devices are offline now.
        partner.close().await.unwrap();
        let mut gatekeeper = connect(ConnectOptions::new(
            addr,
            tls("gatekeeper"),
            Role::GatekeeperServer,
        ))
        .await
        .unwrap();
        for n in 0..messages {
            let envelope = Envelope {
                message_id: MessageId(u128::from(n) + 100),
                sender: DeviceAddress::new(NetworkId(1), UserId(1), DeviceId(1)),
                recipient: user,
                devices: DeviceSelection::All,
                content_type: ContentType::Media,
                e2e_protocol: E2eProtocol::Mls,
                timestamp_ms: relay::io::now_ms(),
                ttl_seconds: 3600,
                flags: 0,
            };
            let mut payload = vec![(n % 251) as u8; 4096];
            payload[..8].copy_from_slice(&n.to_le_bytes());
            gatekeeper.send_envelope(&envelope, &payload).await.unwrap();
        }
        gatekeeper.flush().await.unwrap();
        let mut accepted = 0;
        while accepted < messages {
            match tokio::time::timeout(Duration::from_secs(20), gatekeeper.next_event())
                .await
                .unwrap()
                .unwrap()
            {
                Event::Ack(Ack {
                    status: AckStatus::Accepted,
                    ..
                }) => accepted += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Let a timer tick spill what was stored.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let spilled: u64 = relay_stat(&relay, |s| s.spilled);
        assert!(
            spilled > messages / 2,
            "only {spilled} of {messages} frames left memory"
        );
        let in_memory = relay_stat(&relay, |s| s.ram_bytes);
        assert!(
            in_memory <= config.limits.shard_ram_bytes_max,
            "{in_memory} bytes in memory"
        );

        let key = std::fs::read(pki.join("partner-token.pk8")).unwrap();
        let token = mint_device_token(&key, device, relay::io::now_ms() + 60_000, 5).unwrap();
        let mut phone = connect(
            ConnectOptions::new(
                addr,
                ClientTls::from_pem_files(&pki.join("ca.pem"), None).unwrap(),
                Role::Device,
            )
            .token(token),
        )
        .await
        .unwrap();
        let mut next = 0u64;
        while next < messages {
            let event = tokio::time::timeout(Duration::from_secs(20), phone.next_event())
                .await
                .unwrap()
                .unwrap();
            let Event::Delivery {
                inner: Inbound::Envelope { header, payload },
                ..
            } = event
            else {
                continue;
            };
            let n = u64::from_le_bytes(payload[..8].try_into().unwrap());
            assert_eq!(n, next, "deliveries out of order");
            assert!(
                payload[8..].iter().all(|&b| b == (n % 251) as u8),
                "frame {n} read back damaged"
            );
            phone
                .sender()
                .ack_now(header.message_id, device)
                .await
                .unwrap();
            next += 1;
        }
        assert!(relay_stat(&relay, |s| s.loads) > messages / 2);
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    relay.stop();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A shard counter, as `/metrics` publishes it.
fn relay_stat(relay: &Relay, field: fn(&relay::core::shard::interface::ShardStats) -> u64) -> u64 {
    relay
        .shared
        .metrics
        .iter()
        .map(|m| field(&m.shard_stats()))
        .sum::<u64>()
}
