//! Connection scale: hold many idle, authenticated device sessions (TLS 1.3, device token,
//! `Hello`/`Welcome`) while traffic flows through the others, and report how many were held,
//! the relay's resident memory per idle session (from `/proc/<pid>/status`), and the p99 of
//! the active traffic without and with the idle crowd.
//!
//! The idle sessions belong to a network of their own (devices only, five per user) and come
//! from several 127.x.y.z source addresses, since one source address has only ~28,000
//! ephemeral ports towards one relay port. They are lean on loadgen's side: a TLS stream and
//! nothing else, no SDK buffers and no task; nobody reads them until they are closed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use codec::{
    DeviceAddress, DeviceId, FrameDecoder, HeaderRef, Hello, NetworkId, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, Role, UserId,
};
use devkit::now_ms;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::cli::RunArgs;
use crate::parity::{Parity, ParityConfig};
use crate::phase::{PhaseResult, PhaseSpec};
use crate::pki::Identities;
use crate::relay_target::Harness;
use crate::report::parity_of;
use crate::stats::LatencySummary;
use crate::target::Target;

/// Idle sessions per source address (below the ~28,000 ephemeral ports of the default range).
pub const SESSIONS_PER_SOURCE: u32 = 25_000;
/// Idle sessions connecting at once.
const CONNECT_CONCURRENCY: usize = 256;
/// Devices per idle user (the relay's default `devices_per_user_max`).
const DEVICES_PER_USER: u32 = 5;
/// How long one idle session may take to connect and get its `Welcome`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The network the idle devices belong to (after the gatekeeper and the partners).
pub fn idle_network_id(partners: u32) -> u32 {
    partners + 2
}

/// Source addresses for `count` sessions: the given ones, or 127.0.1.1, 127.0.1.2, ...
pub fn sources(given: &[Ipv4Addr], count: u32) -> Vec<Ipv4Addr> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let needed = count.div_ceil(SESSIONS_PER_SOURCE).max(1);
    (1..=needed)
        .map(|i| {
            Ipv4Addr::new(
                127,
                0,
                u8::try_from(1 + i / 250).unwrap_or(255),
                u8::try_from(i % 250).unwrap_or(1),
            )
        })
        .collect()
}

/// The address of idle device `i`.
pub fn idle_device(network: u32, i: u32) -> DeviceAddress {
    DeviceAddress::new(
        NetworkId(network),
        UserId(0x1_0000 + u128::from(i / DEVICES_PER_USER)),
        DeviceId(1 + i % DEVICES_PER_USER),
    )
}

/// One lean idle session: connect from `source`, TLS, `Hello` with a token, wait for
/// `Welcome`.
async fn idle_session(
    addr: SocketAddr,
    source: Ipv4Addr,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    hello: BytesMut,
) -> Result<TlsStream<TcpStream>, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {}", e.kind()))?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(|e| format!("bind: {}", e.kind()))?;
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("tls: {}", e.kind()))?;
    tls.write_all(&hello)
        .await
        .map_err(|e| format!("hello: {}", e.kind()))?;
    tls.flush()
        .await
        .map_err(|e| format!("hello: {}", e.kind()))?;
    let mut decoder = FrameDecoder::with_capacity(1024);
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|e| format!("decode: {e}"))? {
            let decoded = frame.decode().map_err(|e| format!("decode: {e}"))?;
            return match decoded.header {
                HeaderRef::Welcome(_) => Ok(tls),
                HeaderRef::Error(e) => Err(format!("refused: code {}", e.code.to_native())),
                _ => Err("unexpected frame before Welcome".into()),
            };
        }
        let buf = decoder.buffer_mut();
        buf.reserve(1024);
        let n = tls
            .read_buf(buf)
            .await
            .map_err(|e| format!("read: {}", e.kind()))?;
        if n == 0 {
            return Err("closed before Welcome".into());
        }
    }
}

/// Opens `count` idle sessions; returns them and the failures by reason.
async fn open_idle(
    addr: SocketAddr,
    identities: &Identities,
    network: u32,
    count: u32,
    sources: &[Ipv4Addr],
) -> Result<
    (
        Vec<TlsStream<TcpStream>>,
        std::collections::BTreeMap<String, u64>,
    ),
    String,
> {
    let key = identities.network(network)?.token_key_pkcs8.clone();
    let tls = identities.device_tls()?;
    let connector = TlsConnector::from(tls.config().clone());
    let server_name =
        ServerName::try_from(identities.server_name.clone()).map_err(|e| e.to_string())?;
    let mut held = Vec::with_capacity(count as usize);
    let mut failures = std::collections::BTreeMap::new();
    let mut set = JoinSet::new();
    let mut next = 0u32;
    let agent = format!("loadgen-idle/{}", env!("CARGO_PKG_VERSION"));
    while next < count || !set.is_empty() {
        while next < count && set.len() < CONNECT_CONCURRENCY {
            let device = idle_device(network, next);
            let token_id = u128::from(crate::rng::os_random_u64()) << 64 | u128::from(next);
            let token =
                client::mint_device_token(&key, device, now_ms() + 24 * 3600 * 1000, token_id)
                    .map_err(|e| e.to_string())?;
            let hello = Hello {
                version_min: PROTOCOL_VERSION_MIN,
                version_max: PROTOCOL_VERSION_MAX,
                role: Role::Device,
                features: 0,
                agent: agent.clone(),
                token: Some(token),
            };
            let mut frame = BytesMut::new();
            codec::encode(&mut frame, &hello, &[]).map_err(|e| e.to_string())?;
            // Round robin over the source addresses: each holds an equal share.
            let source = sources[next as usize % sources.len()];
            let (connector, name) = (connector.clone(), server_name.clone());
            set.spawn(async move {
                match tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    idle_session(addr, source, connector, name, frame),
                )
                .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Err("timeout".into()),
                }
            });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(stream)) => held.push(stream),
                Ok(Err(reason)) => *failures.entry(reason).or_insert(0) += 1,
                Err(e) => *failures.entry(format!("task: {e}")).or_insert(0) += 1,
            }
        }
    }
    Ok((held, failures))
}

/// Runs the scenario: active traffic, then idle sessions opened, then active traffic again
/// with them held. Adds its two phases to `phases`; returns the figures.
pub(crate) async fn run(
    harness: &Harness,
    args: &RunArgs,
    identities: &Arc<Identities>,
    addr: SocketAddr,
    relay_pid: Option<u32>,
    parity: &ParityConfig,
    phases: &mut Vec<(String, PhaseResult, Parity)>,
) -> Value {
    let spec = |name: &str| PhaseSpec {
        name: name.to_string(),
        rate_per_s: args.rate,
        duration: Duration::from_secs_f64(args.duration),
        drain: Duration::from_secs_f64(args.drain_s),
    };
    let rss = || relay_pid.and_then(crate::spawn::rss_kib);
    let without = harness.run_phase(&spec("idle-0"), None).await;
    let p99_without = LatencySummary::of(&without.latencies.all()).p99;
    let verdict = parity_of(&without, parity);
    phases.push(("scale-without-idle".into(), without, verdict));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss();
    let network = idle_network_id(args.partners);
    let sources = sources(&args.idle_sources, args.idle_conns);
    let started = Instant::now();
    let opened = open_idle(addr, identities, network, args.idle_conns, &sources).await;
    let setup_s = started.elapsed().as_secs_f64();
    let (held, failures) = match opened {
        Ok(x) => x,
        Err(e) => return json!({ "error": e }),
    };
    // Let the relay settle (allocator, deferred frees) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss();
    let loadgen_rss = crate::spawn::rss_kib(std::process::id());
    let with = harness
        .run_phase(&spec(&format!("idle-{}", held.len())), None)
        .await;
    let p99_with = LatencySummary::of(&with.latencies.all()).p99;
    let verdict = parity_of(&with, parity);
    phases.push(("scale-with-idle".into(), with, verdict));
    let rss_still = rss();
    let count = held.len() as u64;
    drop(held);
    let per_connection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if count > 0 => Some(a.saturating_sub(b) * 1024 / count),
        _ => None,
    };
    json!({
        "idle_target": args.idle_conns,
        "idle_held": count,
        "idle_failed": failures.values().sum::<u64>(),
        "idle_failures": failures,
        "source_addresses": sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "idle_setup_s": (setup_s * 10.0).round() / 10.0,
        "idle_sessions_per_s": if setup_s > 0.0 { (count as f64 / setup_s).round() } else { 0.0 },
        "relay_rss_kib_before": rss_before,
        "relay_rss_kib_with_idle": rss_after,
        "relay_rss_kib_after_traffic": rss_still,
        "relay_rss_bytes_per_idle_connection": per_connection,
        "loadgen_rss_kib_with_idle": loadgen_rss,
        "active_rate_per_s": args.rate,
        "active_p99_us_without_idle": p99_without,
        "active_p99_us_with_idle": p99_with,
        "goal": "100,000 idle connections, under 16 KiB of relay memory each",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_cover_the_count() {
        assert_eq!(sources(&[], 10), vec![Ipv4Addr::new(127, 0, 1, 1)]);
        let s = sources(&[], 100_000);
        assert_eq!(s.len(), 4);
        assert!(s.iter().all(Ipv4Addr::is_loopback));
        let given = [Ipv4Addr::new(127, 9, 9, 9)];
        assert_eq!(sources(&given, 100_000), given.to_vec());
    }

    #[test]
    fn idle_devices_fill_users_of_five() {
        assert_eq!(idle_device(4, 0).device, DeviceId(1));
        assert_eq!(idle_device(4, 4).device, DeviceId(5));
        assert_eq!(idle_device(4, 5).device, DeviceId(1));
        assert_ne!(idle_device(4, 4).user, idle_device(4, 5).user);
    }
}
