//! Whole-system throughput, measured in one run next to a baseline:
//!
//! - `forwarder`: a plain TCP forwarder on one tokio-uring thread (no TLS, no routing)
//!   moving length-prefixed 256-byte frames from one loopback connection to another: what
//!   this machine's loopback and one core allow at best;
//! - `relay`: the relay in-process (TLS 1.3, memory queues, 2 cores) with 10,000 partner users
//!   × 2 devices all online through 4 partner server sessions, 2 gatekeeper server sessions
//!   sending envelopes with 256-byte payloads, every delivery acknowledged by its device and
//!   every envelope acknowledged by the relay.
//!
//! Run: `cargo bench --bench throughput` (about 20 s; `A7_BENCH_ONLY=relay` or `=forwarder`
//! runs one half). Prints frames/s and envelopes/s and
//! their ratio. The load clients run in the same process and share the machine's cores with
//! the relay; the figure is the whole system's, not the relay's alone.
#![allow(clippy::cast_possible_truncation, clippy::print_stdout)]

use relay::tables::policy::{PartnerStatus, UserPolicy};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use client::{ClientTls, ConnectOptions, Event, connect};
use codec::*;
use relay::config::Config;
use relay::core::log::Durability;
use relay::io::Relay;

const FRAME_BYTES: usize = 256;
const MEASURE: Duration = Duration::from_secs(5);
const USERS: u32 = 10_000;
const PAYLOAD_BYTES: usize = 256;
/// Envelopes a gatekeeper session has sent and not yet had acknowledged, at most.
const WINDOW: u64 = 2_000;
const PARTNER_SESSIONS: usize = 4;
const GATEKEEPER_SESSIONS: u64 = 2;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then only smoke-run.
    let full = std::env::args().any(|a| a == "--bench");
    let measure = if full {
        MEASURE
    } else {
        Duration::from_millis(300)
    };
    let users = if full { USERS } else { 100 };
    // A7_BENCH_ONLY=forwarder, =memory or =fsync runs one part (e.g. under `perf record`).
    let only = std::env::var("A7_BENCH_ONLY").unwrap_or_default();
    let wants = |part: &str| only.is_empty() || only == part;
    let forwarded = if wants("forwarder") {
        forwarder(measure)
    } else {
        f64::NAN
    };
    println!(
        "forwarder:     {forwarded:>10.0} frames/s (plain TCP, 256-byte frames, one tokio-uring thread)"
    );
    let mut memory_rate = f64::NAN;
    for durability in [Durability::Memory, Durability::Fsync] {
        if !wants(durability.name()) {
            continue;
        }
        let run = relay_run(measure, users, durability, false);
        println!(
            "relay {:<7} {:>10.0} envelopes/s accepted, {:.0} deliveries/s acknowledged (TLS, 2 devices each){}",
            durability.name(),
            run.envelopes,
            run.deliveries,
            if run.syncs > 0.0 {
                format!(", {:.0} acks per fdatasync", run.envelopes / run.syncs)
            } else {
                String::new()
            }
        );
        println!(
            "  ratio to the forwarder: {:.3} (envelopes), {:.3} (deliveries)",
            run.envelopes / forwarded,
            run.deliveries / forwarded
        );
        if durability == Durability::Memory {
            memory_rate = run.envelopes;
        } else {
            println!("  fsync / memory: {:.3}", run.envelopes / memory_rate);
        }
    }
    // A7_BENCH_POLICY=1: the memory run again with the interop rules enforced (every user
    // enlisted, reachable by everyone), to see what the policy check costs.
    if std::env::var_os("A7_BENCH_POLICY").is_some() && wants("memory") {
        let run = relay_run(measure, users, Durability::Memory, true);
        println!(
            "relay memory+policy {:>10.0} envelopes/s accepted, {:.0} deliveries/s acknowledged; policy / no policy: {:.3}",
            run.envelopes,
            run.deliveries,
            run.envelopes / memory_rate
        );
    }
}

struct Run {
    envelopes: f64,
    deliveries: f64,
    /// Log syncs per second.
    syncs: f64,
}

/// Producer → forwarder → consumer over loopback; returns frames/s through the forwarder.
fn forwarder(measure: Duration) -> f64 {
    let inbound = TcpListener::bind("127.0.0.1:0").unwrap();
    let outbound = TcpListener::bind("127.0.0.1:0").unwrap();
    let (in_addr, out_addr) = (
        inbound.local_addr().unwrap(),
        outbound.local_addr().unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));

    let producer_stop = stop.clone();
    let producer = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(in_addr).unwrap();
        let mut batch = Vec::with_capacity(64 * 1024);
        while batch.len() + FRAME_BYTES <= 64 * 1024 {
            batch.extend_from_slice(&((FRAME_BYTES - 4) as u32).to_le_bytes());
            batch.extend_from_slice(&[0xAB; FRAME_BYTES - 4]);
        }
        while !producer_stop.load(Ordering::Relaxed) {
            if stream.write_all(&batch).is_err() {
                break;
            }
        }
    });
    let consumer_counted = counted.clone();
    let consumer_stop = stop.clone();
    let consumer = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(out_addr).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        while !consumer_stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes += n as u64;
                    consumer_counted.store(bytes / FRAME_BYTES as u64, Ordering::Relaxed);
                }
            }
        }
    });
    let forward_stop = stop.clone();
    let forwarder = std::thread::spawn(move || {
        tokio_uring::start(async move {
            let inbound = tokio_uring::net::TcpListener::from_std(inbound);
            let outbound = tokio_uring::net::TcpListener::from_std(outbound);
            let (src, _) = inbound.accept().await.unwrap();
            let (dst, _) = outbound.accept().await.unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut pending = Vec::with_capacity(512 * 1024);
            while !forward_stop.load(Ordering::Relaxed) {
                let (result, returned) = src.read(buf).await;
                buf = returned;
                let Ok(n) = result else { break };
                if n == 0 {
                    break;
                }
                // Walk the length prefixes and forward whole frames only.
                pending.extend_from_slice(&buf[..n]);
                let mut at = 0;
                while pending.len() - at >= 4 {
                    let len =
                        u32::from_le_bytes(pending[at..at + 4].try_into().unwrap()) as usize + 4;
                    if pending.len() - at < len {
                        break;
                    }
                    at += len;
                }
                let whole: Vec<u8> = pending.drain(..at).collect();
                let (result, _) = dst.write_all(whole).await;
                if result.is_err() {
                    break;
                }
            }
        });
    });
    std::thread::sleep(Duration::from_millis(300));
    let start_count = counted.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(measure);
    let frames = counted.load(Ordering::Relaxed) - start_count;
    let rate = frames as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = forwarder.join();
    let _ = producer.join();
    let _ = consumer.join();
    rate
}

/// Envelopes accepted, deliveries acknowledged and log syncs, per second.
fn relay_run(measure: Duration, users: u32, durability: Durability, enforce: bool) -> Run {
    let data_dir = std::env::temp_dir().join(format!("a7-bench-{}", std::process::id()));
    let mut config = Config::embedded();
    config.data_dir = data_dir.clone();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.cores = 2;
    config.durability = durability;
    // The data plane alone, unless the policy's cost is asked for (`A7_BENCH_POLICY=1`).
    config.interop.enforce = enforce;
    let _ = std::fs::remove_dir_all(&data_dir);
    let relay = Relay::start(&config).expect("relay starts");
    if enforce {
        let enlisted = UserPolicy::reachable_by_everyone;
        let policy = &relay.shared.policy;
        policy.set_network(NetworkId(1), PartnerStatus::Active);
        policy.set_network(NetworkId(2), PartnerStatus::Active);
        for u in 0..1000u32 {
            policy.set_user(
                UserAddress::new(NetworkId(1), UserId(u128::from(u))),
                enlisted(),
            );
        }
        for u in 0..users {
            policy.set_user(
                UserAddress::new(NetworkId(2), UserId(u128::from(u))),
                enlisted(),
            );
        }
        // What the control plane does with contact events: take them off the channel.
        let contacts = policy.contact_events().clone();
        std::thread::spawn(move || while contacts.recv().is_ok() {});
    }
    let shared = relay.shared.clone();
    let syncs = move || {
        shared
            .metrics
            .iter()
            .map(|m| m.log_commits.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let addr = relay.listen;
    let pki = data_dir.join("pki");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async move {
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
        let accepted = Arc::new(AtomicU64::new(0));
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        // Several sessions of each network, so SO_REUSEPORT spreads them over both cores;
        // each partner user's devices are bound to one of the partner sessions.
        for p in 0..PARTNER_SESSIONS {
            let mut partner = connect(ConnectOptions::new(
                addr,
                tls("partner"),
                Role::PartnerServer,
            ))
            .await
            .unwrap();
            if p == 0 {
                // Every partner user has two devices, declared by the partner's server.
                for u in 0..users {
                    let list = DeviceList {
                        request_id: MessageId(u128::from(u) + 1),
                        user: UserAddress::new(NetworkId(2), UserId(u128::from(u))),
                        devices: vec![DeviceId(1), DeviceId(2)],
                    };
                    partner.send_device_list(&list).await.unwrap();
                }
                partner.flush().await.unwrap();
                let mut declared = 0;
                while declared < users {
                    if let Event::Ack(_) = partner.next_event().await.unwrap() {
                        declared += 1;
                    }
                }
            }
            let (mut p_send, mut p_recv) = partner.into_split();
            let d = delivered.clone();
            let s = stop.clone();
            // Acks are written by a task of their own: a reader that waits for its own writes
            // can deadlock with the relay, which stops reading a client whose deliveries it
            // cannot write (each waits for the other to read; seen once in ten runs).
            let (acks, mut ack_queue) = tokio::sync::mpsc::unbounded_channel();
            tasks.push(tokio::spawn(async move {
                let mut batch = Vec::new();
                while ack_queue.recv_many(&mut batch, 256).await > 0 {
                    for (id, device) in batch.drain(..) {
                        if p_send.ack(id, device).await.is_err() {
                            return;
                        }
                    }
                    if p_send.flush().await.is_err() {
                        return;
                    }
                }
            }));
            tasks.push(tokio::spawn(async move {
                while !s.load(Ordering::Relaxed) {
                    // Frames read in place (no owned events): the load client should cost the
                    // shared cores as little as it can.
                    let Ok(Ok(Some(frame))) =
                        tokio::time::timeout(Duration::from_millis(200), p_recv.next_frame()).await
                    else {
                        continue;
                    };
                    let Ok(view) = frame.decode() else { continue };
                    let HeaderRef::Delivery(delivery) = view.header else {
                        continue;
                    };
                    let device = delivery.device.get();
                    let Ok(Some(inner)) = view.delivery_inner() else {
                        continue;
                    };
                    let id = match inner.header {
                        HeaderRef::Envelope(e) => e.message_id.get(),
                        HeaderRef::Receipt(r) => r.receipt_id.get(),
                        _ => continue,
                    };
                    if acks.send((id, device)).is_err() {
                        return;
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for g in 0..GATEKEEPER_SESSIONS {
            let gatekeeper = connect(ConnectOptions::new(
                addr,
                tls("gatekeeper"),
                Role::GatekeeperServer,
            ))
            .await
            .unwrap();
            let (mut g_send, mut g_recv) = gatekeeper.into_split();
            let in_flight = Arc::new(AtomicU64::new(0));
            let (a, s, f) = (accepted.clone(), stop.clone(), in_flight.clone());
            tasks.push(tokio::spawn(async move {
                while !s.load(Ordering::Relaxed) {
                    let Ok(Ok(Some(frame))) =
                        tokio::time::timeout(Duration::from_millis(200), g_recv.next_frame()).await
                    else {
                        continue;
                    };
                    if let Ok(view) = frame.decode()
                        && let HeaderRef::Ack(ack) = view.header
                    {
                        f.fetch_sub(1, Ordering::Relaxed);
                        if matches!(ack.status, ArchivedAckStatus::Accepted) {
                            a.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
            let s = stop.clone();
            tasks.push(tokio::spawn(async move {
                let payload = [0xCD_u8; PAYLOAD_BYTES];
                let mut n: u64 = g << 40;
                while !s.load(Ordering::Relaxed) {
                    if in_flight.load(Ordering::Relaxed) > WINDOW {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    for _ in 0..64 {
                        n += 1;
                        let envelope = Envelope {
                            message_id: MessageId(u128::from(n)),
                            sender: DeviceAddress::new(
                                NetworkId(1),
                                UserId(u128::from(n % 1000)),
                                DeviceId(1),
                            ),
                            recipient: UserAddress::new(
                                NetworkId(2),
                                UserId(u128::from(n % u64::from(users))),
                            ),
                            devices: DeviceSelection::All,
                            content_type: ContentType::Text,
                            e2e_protocol: E2eProtocol::Signal,
                            timestamp_ms: devkit::now_ms(),
                            ttl_seconds: 3600,
                            flags: 0,
                        };
                        g_send.send_envelope(&envelope, &payload).await.unwrap();
                    }
                    in_flight.fetch_add(64, Ordering::Relaxed);
                    g_send.flush().await.unwrap();
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (a0, d0, s0) = (
            accepted.load(Ordering::Relaxed),
            delivered.load(Ordering::Relaxed),
            syncs(),
        );
        let started = Instant::now();
        tokio::time::sleep(measure).await;
        let elapsed = started.elapsed().as_secs_f64();
        let (a1, d1, s1) = (
            accepted.load(Ordering::Relaxed),
            delivered.load(Ordering::Relaxed),
            syncs(),
        );
        stop.store(true, Ordering::Relaxed);
        // Readers stop reading at once; a writer blocked on a full socket then never finishes
        // (the relay has stopped reading a client that no longer reads): give the tasks a
        // moment, then drop them. The figures above are already taken.
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        Run {
            envelopes: (a1 - a0) as f64 / elapsed,
            deliveries: (d1 - d0) as f64 / elapsed,
            syncs: (s1 - s0) as f64 / elapsed,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    relay.stop();
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}
