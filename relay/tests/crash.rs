//! Crash test: a relay at the `fsync` level is killed with SIGKILL at random moments while a
//! gatekeeper server sends to partner users whose devices come and go; after every restart,
//! and at the end with every device online, every envelope the relay acknowledged reaches
//! every device of its recipient, in send order per sender–recipient pair.
//!
//! `A7_CRASH_CYCLES=300 cargo test --release -p relay --test crash -- --nocapture` runs the
//! long version and prints its counts (the default run does 10 cycles).
#![allow(clippy::cast_possible_truncation, clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::{ClientTls, ConnectOptions, Event, Inbound, connect, mint_device_token};
use codec::*;

const USERS: u32 = 12;
const DEVICES: [u32; 2] = [1, 2];

struct Relay {
    child: Child,
    addr: SocketAddr,
}

fn start(data_dir: &Path) -> Relay {
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--cores",
            "2",
            "--durability",
            "fsync",
            // Durability under kill -9 is the subject; the interop rules are not.
            "--policy",
            "off",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next().expect("a ready line").expect("readable");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tls="))
        .unwrap_or_else(|| panic!("no tls= in {line:?}"))
        .parse()
        .unwrap();
    Relay { child, addr }
}

fn tls(pki: &Path, who: Option<&str>) -> ClientTls {
    let ca = pki.join("ca.pem");
    match who {
        Some(name) => ClientTls::from_pem_files(
            &ca,
            Some((
                &pki.join(format!("{name}.pem")),
                &pki.join(format!("{name}.key")),
            )),
        )
        .unwrap(),
        None => ClientTls::from_pem_files(&ca, None).unwrap(),
    }
}

fn partner_user(u: u32) -> UserAddress {
    UserAddress::new(NetworkId(2), UserId(0x2000 + u128::from(u)))
}

fn sender() -> DeviceAddress {
    DeviceAddress::new(NetworkId(1), UserId(0x1000), DeviceId(1))
}

/// What the devices received: first deliveries in order, and how many were repeats.
#[derive(Default)]
struct Received {
    order: HashMap<DeviceAddress, Vec<u64>>,
    seen: HashMap<DeviceAddress, HashSet<u64>>,
    repeats: u64,
}

async fn run_device(
    addr: SocketAddr,
    pki: PathBuf,
    device: DeviceAddress,
    token_id: u128,
    received: Arc<Mutex<Received>>,
    stay: Duration,
) {
    let key = std::fs::read(pki.join("partner-token.pk8")).unwrap();
    let token = mint_device_token(&key, device, relay::io::now_ms() + 600_000, token_id).unwrap();
    let Ok(conn) =
        connect(ConnectOptions::new(addr, tls(&pki, None), Role::Device).token(token)).await
    else {
        return;
    };
    let (mut send, mut recv) = conn.into_split();
    let deadline = tokio::time::Instant::now() + stay;
    loop {
        let Ok(Ok(event)) = tokio::time::timeout_at(deadline, recv.next_event()).await else {
            return;
        };
        let Event::Delivery {
            device: to,
            inner: Inbound::Envelope { header, payload },
            ..
        } = event
        else {
            continue;
        };
        let n = u64::from_le_bytes(payload[..8].try_into().unwrap());
        {
            let mut r = received.lock().unwrap();
            if r.seen.entry(to).or_default().insert(n) {
                r.order.entry(to).or_default().push(n);
            } else {
                r.repeats += 1;
            }
        }
        if send.ack_now(header.message_id, to).await.is_err() {
            return;
        }
    }
}

#[test]
fn acknowledged_envelopes_survive_kill_9() {
    let cycles: u32 = std::env::var("A7_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(10);
    let data_dir = std::env::temp_dir().join(format!("a7-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let pki = data_dir.join("pki");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let received = Arc::new(Mutex::new(Received::default()));
    // message number → recipient user, for every envelope the relay acknowledged.
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let mut next: u64 = 1;
    let mut token_id: u128 = 1;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for cycle in 0..=cycles {
        let mut relay = start(&data_dir);
        let addr = relay.addr;
        let last = cycle == cycles;
        runtime.block_on(async {
            if cycle == 0 {
                // The partner declares its users' devices once; the log keeps them.
                let mut partner = connect(ConnectOptions::new(
                    addr,
                    tls(&pki, Some("partner")),
                    Role::PartnerServer,
                ))
                .await
                .unwrap();
                for u in 0..USERS {
                    let devices = DEVICES.iter().map(|&d| DeviceId(d)).collect();
                    partner
                        .send_device_list(&DeviceList {
                            request_id: MessageId(u128::from(u) + 1),
                            user: partner_user(u),
                            devices,
                        })
                        .await
                        .unwrap();
                }
                partner.flush().await.unwrap();
                for _ in 0..USERS {
                    assert!(matches!(
                        partner.next_event().await.unwrap(),
                        Event::Ack(Ack {
                            status: AckStatus::Accepted,
                            ..
                        })
                    ));
                }
            }
            // Some devices online for a while (all of them in the last round).
            let stay = if last {
                Duration::from_secs(4)
            } else {
                Duration::from_millis(1500)
            };
            let mut devices = Vec::new();
            for u in 0..USERS {
                for d in DEVICES {
                    if last || random(2) == 0 {
                        token_id += 1;
                        let device = partner_user(u).device(DeviceId(d));
                        devices.push(tokio::spawn(run_device(
                            addr,
                            pki.clone(),
                            device,
                            token_id,
                            received.clone(),
                            stay,
                        )));
                    }
                }
            }
            if last {
                for task in devices {
                    let _ = task.await;
                }
                return;
            }
            let gatekeeper = connect(ConnectOptions::new(
                addr,
                tls(&pki, Some("gatekeeper")),
                Role::GatekeeperServer,
            ))
            .await
            .unwrap();
            let (mut send, mut recv) = gatekeeper.into_split();
            let mut sent: HashMap<MessageId, (u64, u32)> = HashMap::new();
            let batches = 1 + random(6);
            for _ in 0..batches {
                for _ in 0..20 {
                    let u = random(u64::from(USERS)) as u32;
                    let id = MessageId(u128::from(next) | (0xC0DE << 64));
                    let envelope = Envelope {
                        message_id: id,
                        sender: sender(),
                        recipient: partner_user(u),
                        devices: DeviceSelection::All,
                        content_type: ContentType::Text,
                        e2e_protocol: E2eProtocol::Signal,
                        timestamp_ms: relay::io::now_ms(),
                        ttl_seconds: 3600,
                        flags: 0,
                    };
                    sent.insert(id, (next, u));
                    send.send_envelope(&envelope, &next.to_le_bytes())
                        .await
                        .unwrap();
                    next += 1;
                }
                send.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(random(40))).await;
            }
            // Collect acks for a random while, then the relay is killed mid-flight.
            let until = tokio::time::Instant::now() + Duration::from_millis(random(300));
            while let Ok(Ok(event)) = tokio::time::timeout_at(until, recv.next_event()).await {
                if let Event::Ack(Ack {
                    message_id,
                    status: AckStatus::Accepted,
                    ..
                }) = event
                    && let Some((n, u)) = sent.get(&message_id)
                {
                    acked.insert(*n, *u);
                }
            }
        });
        relay.child.kill().expect("SIGKILL");
        relay.child.wait().unwrap();
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let received = received.lock().unwrap();
    let mut lost = Vec::new();
    for (&n, &u) in &acked {
        for d in DEVICES {
            let device = partner_user(u).device(DeviceId(d));
            if !received.seen.get(&device).is_some_and(|s| s.contains(&n)) {
                lost.push((n, device));
            }
        }
    }
    // Order per sender–recipient pair: each device saw the single sender's messages in send
    // order (message numbers increase with send order).
    for (device, order) in &received.order {
        let acked_only: Vec<u64> = order
            .iter()
            .copied()
            .filter(|n| acked.contains_key(n))
            .collect();
        assert!(
            acked_only.windows(2).all(|w| w[0] < w[1]),
            "order broken on {device}: {acked_only:?}"
        );
    }
    println!(
        "{cycles} kill -9 cycles: {} envelopes acknowledged, {} deliveries expected, {} lost, {} repeated deliveries (unacknowledged when the relay died)",
        acked.len(),
        acked.len() * DEVICES.len(),
        lost.len(),
        received.repeats
    );
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged: the test proved nothing"
    );
    assert!(
        lost.is_empty(),
        "acknowledged and lost: {:?}",
        &lost[..lost.len().min(10)]
    );
    let _ = std::fs::remove_dir_all(&data_dir);
}
