//! `loadgen hostile`: the data port against a hostile crowd. Opens N unauthenticated
//! connections that each make the relay hold the most an unknown client can (TLS up, no
//! certificate, a `Hello` announced at `preauth_bytes_max` and sent but for its last byte,
//! never reading), measures the relay's resident memory per such connection, then runs a
//! handshake flood (TLS handshakes without a certificate from other source addresses, at a
//! set rate) and times a legitimate partner's connect-and-deliver meanwhile: a gatekeeper
//! server and a partner server connect (retrying what the relay refuses), the partner
//! declares a user, one envelope goes across and is delivered.
//!
//! The spawned relay gets long handshake and `Hello` deadlines (unless `--relay-limit` says
//! otherwise) so that the crowd is still there while it is measured; with the default
//! deadlines the relay closes it after 10 s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use client::{
    AckStatus, ConnectOptions, ContentType, DeviceId, DeviceList, DeviceSelection, E2eProtocol,
    Envelope, Event, MessageId, NetworkId, Role, UserAddress, UserId,
};
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::pki::{Identities, NetworkRequest};
use crate::spawn::{SpawnedRelay, find_relay_binary, rss_kib};

/// What `loadgen hostile` is asked to do.
#[derive(Debug, Clone)]
pub struct HostileArgs {
    pub idle: u32,
    /// Bytes of the unfinished `Hello` each idle connection pushes (the relay's
    /// `preauth_bytes_max` is the worst case).
    pub push: u32,
    pub flood_rate: u32,
    pub rounds: u32,
    pub relay_bin: Option<std::path::PathBuf>,
    pub relay_cores: Option<u16>,
    pub relay_limits: Vec<String>,
    pub json: Option<std::path::PathBuf>,
}

/// Idle connections per source address (under the relay's default per-source cap of 256).
const IDLE_PER_SOURCE: u32 = 200;
/// Idle connections opening at once.
const OPEN_CONCURRENCY: usize = 128;
/// How long a legitimate round may take before it counts as failed.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// The source address of idle connection `i`: 127.0.2.x, 127.0.3.x, ... (the flood uses
/// 127.1.x.y, the partner 127.0.0.1).
fn idle_source(i: u32) -> Ipv4Addr {
    let n = i / IDLE_PER_SOURCE;
    Ipv4Addr::new(
        127,
        0,
        u8::try_from(2 + n / 250).unwrap_or(255),
        u8::try_from(1 + n % 250).unwrap_or(1),
    )
}

async fn tcp_from(addr: SocketAddr, source: Ipv4Addr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(addr).await
}

/// One idle connection at its worst: TLS without a certificate, then all but the last byte
/// of a frame of `push` bytes. Retried while the relay refuses it at accept.
async fn open_idle(
    addr: SocketAddr,
    source: Ipv4Addr,
    connector: TlsConnector,
    push: u32,
) -> Result<TlsStream<TcpStream>, String> {
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    // The length prefix counts the bytes after it: the frame is `push` bytes in all.
    let mut frame = push.saturating_sub(4).to_le_bytes().to_vec();
    frame.extend_from_slice(&[1, 1]);
    frame.extend_from_slice(&8192u16.to_le_bytes());
    frame.resize(push.saturating_sub(1).max(8) as usize, 0x5a);
    let started = Instant::now();
    loop {
        let attempt = async {
            let tcp = tcp_from(addr, source).await.map_err(|e| e.to_string())?;
            let mut tls = connector
                .clone()
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(&frame).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(tls)
        };
        match attempt.await {
            Ok(tls) => return Ok(tls),
            Err(e) if started.elapsed() > Duration::from_secs(60) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// TLS handshakes without a certificate at `rate` per second from 127.1.x.y, until `stop`.
async fn flood(
    addr: SocketAddr,
    connector: TlsConnector,
    rate: u32,
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
) {
    let name = match ServerName::try_from("localhost") {
        Ok(name) => name,
        Err(_) => return,
    };
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u32 = 0;
    let mut tasks = JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n = n.wrapping_add(1);
        let source = Ipv4Addr::new(
            127,
            1,
            u8::try_from((n / 250) % 250).unwrap_or(0),
            1 + u8::try_from(n % 250).unwrap_or(0),
        );
        let (connector, name) = (connector.clone(), name.clone());
        let (attempts, completed) = (attempts.clone(), completed.clone());
        tasks.spawn(async move {
            attempts.fetch_add(1, Ordering::Relaxed);
            let Ok(tcp) = tcp_from(addr, source).await else {
                return;
            };
            let handshake =
                tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp));
            if let Ok(Ok(_tls)) = handshake.await {
                completed.fetch_add(1, Ordering::Relaxed);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
}

/// A server session of `network`, retried while the relay refuses it (a flood takes some of
/// the handshake budget); also returns how many tries were refused.
async fn connect_retrying(
    addr: SocketAddr,
    identities: &Identities,
    network: u32,
    role: Role,
    started: Instant,
) -> Result<(client::Connection, u32), String> {
    let mut refused = 0;
    loop {
        let tls = identities.server_tls(network)?;
        let options = ConnectOptions::new(addr, tls, role).connect_timeout(ROUND_TIMEOUT);
        match client::connect(options).await {
            Ok(conn) => return Ok((conn, refused)),
            Err(e) if started.elapsed() > ROUND_TIMEOUT => return Err(e.to_string()),
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One legitimate round: both servers connect (retrying refusals), the partner declares a
/// user, one envelope goes across. Returns the time it took and the connects refused.
async fn partner_round(
    addr: SocketAddr,
    identities: &Identities,
    round: u32,
) -> Result<(Duration, u32), String> {
    let started = Instant::now();
    let (mut gk, refused_gk) =
        connect_retrying(addr, identities, 1, Role::GatekeeperServer, started).await?;
    let (mut partner, refused_partner) =
        connect_retrying(addr, identities, 2, Role::PartnerServer, started).await?;
    let refused = refused_gk + refused_partner;
    let user = UserAddress::new(NetworkId(2), UserId(0x4000 + u128::from(round)));
    let list = DeviceList {
        request_id: MessageId(u128::from(round) << 64 | 1),
        user,
        devices: vec![DeviceId(1)],
    };
    partner
        .send_device_list(&list)
        .await
        .map_err(|e| e.to_string())?;
    partner.flush().await.map_err(|e| e.to_string())?;
    match partner.next_event().await.map_err(|e| e.to_string())? {
        Event::Ack(ack) if ack.status == AckStatus::Accepted => {}
        other => return Err(format!("device list: {other:?}")),
    }
    let envelope = Envelope {
        message_id: MessageId(u128::from(round) << 64 | 2),
        sender: UserAddress::new(NetworkId(1), UserId(0x1001)).device(DeviceId(1)),
        recipient: user,
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: devkit::now_ms(),
        ttl_seconds: 600,
        flags: 0,
    };
    gk.send_envelope(&envelope, b"through the crowd")
        .await
        .map_err(|e| e.to_string())?;
    gk.flush().await.map_err(|e| e.to_string())?;
    loop {
        match partner.next_event().await.map_err(|e| e.to_string())? {
            Event::Delivery { device, inner, .. } => {
                if inner.ack_id() == Some(envelope.message_id) {
                    let elapsed = started.elapsed();
                    partner
                        .ack(envelope.message_id, device)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = partner.close().await;
                    let _ = gk.close().await;
                    return Ok((elapsed, refused));
                }
            }
            other => return Err(format!("expected the delivery, got {other:?}")),
        }
    }
}

/// The sum of the relay's integer metric `name` (any labels), read from its `/metrics`.
async fn metric(http: SocketAddr, name: &str) -> Result<u64, String> {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(http).await.map_err(|e| e.to_string())?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter(|line| line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the whole measurement; prints a summary (and writes `--json`).
pub fn run(args: &HostileArgs) -> Result<(), String> {
    // Loadgen and the relay it spawns (which inherits the limit) each hold one end of every
    // idle connection, plus the flood's and the partner's.
    let wanted = u64::from(args.idle) + 4096;
    let nofile = crate::machine::raise_nofile(wanted);
    if nofile < wanted {
        return Err(format!(
            "open-file limit {nofile} is below the {wanted} this run needs (raise `ulimit -n`)"
        ));
    }
    let workdir = std::env::temp_dir().join(format!("loadgen-hostile-{}", std::process::id()));
    let requests = [
        NetworkRequest {
            id: 1,
            name: "gatekeeper".into(),
            server_role: Some("gatekeeper_server"),
        },
        NetworkRequest {
            id: 2,
            name: "partner-2".into(),
            server_role: Some("partner_server"),
        },
    ];
    let (identities, server) = Identities::generate(&requests)?;
    let mut limits = vec![
        "tls_handshake_timeout_ms = 600000".to_string(),
        "hello_timeout_ms = 600000".to_string(),
    ];
    for l in &args.relay_limits {
        let line = match l.split_once('=') {
            Some((k, v)) => format!("{} = {}", k.trim(), v.trim()),
            None => l.clone(),
        };
        let key = line.split(' ').next().unwrap_or_default().to_string();
        limits.retain(|existing| !existing.starts_with(&format!("{key} ")));
        limits.push(line);
    }
    let data = workdir.join("data");
    let config = identities.write(&server, &workdir.join("pki"), &data, &limits)?;
    let bin = find_relay_binary(args.relay_bin.as_deref())?;
    let relay = SpawnedRelay::start(
        &bin,
        Some(&config),
        &data,
        args.relay_cores,
        Some("memory"),
        Some("off"),
        &workdir.join("relay.log"),
    )?;
    let addr = relay.ready.tls;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let http = relay.ready.http;
    let outcome = runtime.block_on(measure(args, addr, http, &identities, relay.pid()));
    let log = relay.stop();
    let _ = std::fs::remove_dir_all(&workdir);
    let report = outcome.map_err(|e| format!("{e}\nrelay log:\n{log}"))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    );
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_string()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

async fn measure(
    args: &HostileArgs,
    addr: SocketAddr,
    http: SocketAddr,
    identities: &Identities,
    pid: u32,
) -> Result<serde_json::Value, String> {
    let device_tls = identities.device_tls()?;
    let connector = TlsConnector::from(device_tls.config().clone());
    // A first round warms the relay (allocator arenas, TLS state) before the baseline.
    let (warm, _) = partner_round(addr, identities, 0).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid).ok_or("no RSS for the relay")?;

    let opened_at = Instant::now();
    let mut idle = Vec::with_capacity(args.idle as usize);
    let mut opening = JoinSet::new();
    let mut next = 0;
    while next < args.idle || !opening.is_empty() {
        while next < args.idle && opening.len() < OPEN_CONCURRENCY {
            let connector = connector.clone();
            let (source, push) = (idle_source(next), args.push);
            opening.spawn(async move { open_idle(addr, source, connector, push).await });
            next += 1;
        }
        match opening.join_next().await {
            Some(Ok(Ok(stream))) => idle.push(stream),
            Some(Ok(Err(e))) => return Err(format!("an idle connection: {e}")),
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
    }
    let open_s = opened_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_crowd = rss_kib(pid).ok_or("no RSS for the relay")?;
    // What the relay itself says: the crowd is held, unauthenticated, its bytes read.
    let held = metric(http, "relay_connections_unauthenticated").await?;
    let bytes_in = metric(http, "relay_tls_bytes_in_total").await?;
    let per_conn_bytes =
        (rss_crowd.saturating_sub(rss_before) * 1024) / u64::from(args.idle.max(1));

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let flooding = (args.flood_rate > 0).then(|| {
        tokio::spawn(flood(
            addr,
            connector.clone(),
            args.flood_rate,
            stop.clone(),
            attempts.clone(),
            completed.clone(),
        ))
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rounds = Vec::new();
    let mut refused_total = 0;
    for round in 1..=args.rounds {
        let (took, refused) =
            tokio::time::timeout(ROUND_TIMEOUT, partner_round(addr, identities, round))
                .await
                .map_err(|_| format!("round {round} did not finish in {ROUND_TIMEOUT:?}"))??;
        rounds.push(took.as_secs_f64() * 1000.0);
        refused_total += refused;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_flood = rss_kib(pid).ok_or("no RSS for the relay")?;
    let refused_at_accept = metric(http, "relay_accept_refused_total").await?;
    let held_after = metric(http, "relay_connections_unauthenticated").await?;
    stop.store(true, Ordering::Relaxed);
    if let Some(flooding) = flooding {
        let _ = flooding.await;
    }
    let still_open = idle.len();
    drop(idle);
    let mut sorted = rounds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    Ok(json!({
        "idle_connections": still_open,
        "relay_unauthenticated_with_crowd": held,
        "relay_unauthenticated_after_flood": held_after,
        "relay_tls_bytes_in_with_crowd": bytes_in,
        "relay_accept_refused_total": refused_at_accept,
        "idle_push_bytes": args.push,
        "idle_open_seconds": open_s,
        "relay_rss_mib_before": mib(rss_before),
        "relay_rss_mib_with_crowd": mib(rss_crowd),
        "relay_rss_mib_with_crowd_and_flood": mib(rss_flood),
        "relay_bytes_per_unauthenticated_connection": per_conn_bytes,
        "flood_rate_per_s": args.flood_rate,
        "flood_attempts": attempts.load(Ordering::Relaxed),
        "flood_handshakes_completed": completed.load(Ordering::Relaxed),
        "partner_rounds_ms": rounds,
        "partner_connect_and_deliver_ms_median": median,
        "partner_connect_and_deliver_ms_max": max,
        "partner_connects_refused": refused_total,
        "partner_round_ms_without_crowd": warm.as_secs_f64() * 1000.0,
    }))
}
