//! The command line: `loadgen [OPTIONS]` runs a scenario; `loadgen pki` writes identities and
//! a relay configuration for N partners; `loadgen tune-check` compares the kernel with a
//! tuning profile. Also the checks of the arguments that clap cannot make.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::phase::Faults;

/// Load generator and SLA-parity report for Article 7 Relay.
///
/// Drives a relay (or, with --spawn, one it starts) with a population of gatekeeper and
/// partner users, open loop at a fixed rate (or --max), and reports throughput, latency from
/// the scheduled send time (HdrHistogram, no coordinated omission), exact loss, duplicates and
/// reordering, and the parity of interop traffic with first-party traffic.
///
/// Exit status: 0 all good; 1 something the relay acknowledged was lost, duplicated,
/// reordered or damaged; 2 setup or usage error; 3 intact but the parity verdict failed.
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a CA, a relay certificate, per-network client certificates and token keys, and
    /// a relay config (relay.toml) into DIR, for a relay started by hand; then run loadgen
    /// with --pki DIR.
    Pki {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = 2)]
        partners: u32,
        /// Also a devices-only network for --idle-conns.
        #[arg(long)]
        idle_network: bool,
    },
    /// Print a side-by-side table (Markdown) of the main figures of several JSON reports.
    Compare {
        /// `LABEL=FILE` or `FILE` (the label is then the report's target).
        #[arg(required = true)]
        reports: Vec<String>,
    },
    /// The data port against a hostile crowd: spawn a relay, open --idle unauthenticated
    /// connections each pushing --push bytes of an unfinished Hello (the relay's memory per
    /// connection at its worst), then a TLS handshake flood at --flood-rate while a
    /// legitimate partner connects and delivers --rounds times (timed). Raises the open-file
    /// limit as needed. Prints JSON.
    Hostile {
        #[arg(long, default_value_t = 10_000)]
        idle: u32,
        /// Bytes of the unfinished Hello each idle connection sends (the relay's
        /// preauth_bytes_max, 8200 by default, is the worst case).
        #[arg(long, default_value_t = 8_200)]
        push: u32,
        /// TLS handshakes per second from other addresses while the partner is timed.
        #[arg(long, default_value_t = 1_000)]
        flood_rate: u32,
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        #[arg(long, value_name = "PATH")]
        relay_bin: Option<PathBuf>,
        #[arg(long, value_name = "N")]
        relay_cores: Option<u16>,
        /// A `[limits]` line for the spawned relay, KEY=VALUE (repeatable). By default the
        /// crowd is held past the relay's handshake and Hello deadlines (600 s each).
        #[arg(long = "relay-limit", value_name = "KEY=VALUE")]
        relay_limit: Vec<String>,
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Compare the live kernel's sysctl values with a tuning profile (throughput,
    /// connections, latency, or a sysctl.d file). Exit 1 when some differ.
    TuneCheck {
        #[arg(default_value = "throughput")]
        profile: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    // --- target ---
    /// What to drive: relay://HOST:PORT (or just HOST:PORT), or mqtt://HOST:PORT for an MQTT
    /// broker (one topic per device, QoS 1, persistent sessions).
    #[arg(
        long,
        default_value = "relay://127.0.0.1:7700",
        help_heading = "Target"
    )]
    pub target: String,
    /// Start a relay on free loopback ports with its own PKI for every network, run, stop it.
    #[arg(long, help_heading = "Target")]
    pub spawn: bool,
    /// The relay binary for --spawn (default: `relay` next to loadgen).
    #[arg(long, value_name = "PATH", help_heading = "Target")]
    pub relay_bin: Option<PathBuf>,
    /// Cores for the spawned relay (default: all).
    #[arg(long, value_name = "N", help_heading = "Target")]
    pub relay_cores: Option<u16>,
    /// Durability of the spawned relay: what its `Ack` means (fsync, os, memory; default:
    /// the relay's own, fsync).
    #[arg(long, value_name = "LEVEL", value_parser = ["fsync", "os", "memory"], help_heading = "Target")]
    pub relay_durability: Option<String>,
    /// The interop rules of the spawned relay: `enforce` (as in production; loadgen enlists
    /// its population first) or `off` (lab: the data plane alone, as loadgen measured before
    /// the rules; add --no-enlist to skip the enlistment as well).
    #[arg(long, value_name = "MODE", default_value = "enforce", value_parser = ["enforce", "off"], help_heading = "Target")]
    pub relay_policy: String,
    /// A `[limits]` line for the spawned relay's config, e.g. `device_queue_depth_max=50000`.
    #[arg(long, value_name = "KEY=VALUE", help_heading = "Target")]
    pub relay_limit: Vec<String>,
    /// Identities for a relay started by hand: a directory from `loadgen pki`, or a relay's
    /// development PKI (networks 1 and 2 only).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "relay-data/pki",
        help_heading = "Target"
    )]
    pub pki: PathBuf,
    /// The relay's control API (its HTTP port, TLS with each network's server certificate)
    /// for a relay started by hand; --spawn uses the spawned relay's.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:7780",
        help_heading = "Target"
    )]
    pub api: std::net::SocketAddr,
    /// Do not enlist the population through the control API before the run (every user of
    /// every network, with its devices, consent `everyone`, located in the EEA). For a relay
    /// whose users are already enlisted, or whose interop rules are off; against a relay
    /// that enforces them, interop traffic of users it does not know is refused.
    #[arg(long, help_heading = "Target")]
    pub no_enlist: bool,
    /// Keep the spawned relay's data directory and log.
    #[arg(long, help_heading = "Target")]
    pub keep_relay_data: bool,

    // --- population ---
    /// Partner networks (network 1 is the gatekeeper; partners are 2..).
    #[arg(long, default_value_t = 2, help_heading = "Population")]
    pub partners: u32,
    /// Users per network.
    #[arg(long, default_value_t = 1000, help_heading = "Population")]
    pub users: u32,
    /// Share of users with --devices-multi devices (the others have one).
    #[arg(long, default_value_t = 0.2, help_heading = "Population")]
    pub multi_device_share: f64,
    #[arg(long, default_value_t = 5, help_heading = "Population")]
    pub devices_multi: u8,
    /// Partners whose devices connect directly with tokens (the last ones); the others and
    /// the gatekeeper connect through servers. Default: half the partners, rounded down.
    #[arg(long, help_heading = "Population")]
    pub direct_partners: Option<u32>,
    /// Share of direct devices that start offline and come back during the run.
    #[arg(long, default_value_t = 0.1, help_heading = "Population")]
    pub offline_share: f64,
    /// When offline devices come back, seconds into the run (default: half the duration).
    #[arg(long, value_name = "S", help_heading = "Population")]
    pub offline_return_s: Option<f64>,
    /// Server sessions per proxy network.
    #[arg(long, default_value_t = 2, help_heading = "Population")]
    pub server_connections: u32,

    // --- traffic ---
    /// Messages per second, open loop.
    #[arg(long, default_value_t = 1000.0, help_heading = "Traffic")]
    pub rate: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 10.0, help_heading = "Traffic")]
    pub duration: f64,
    /// Seconds at the rate before measuring (not reported).
    #[arg(long, default_value_t = 1.0, help_heading = "Traffic")]
    pub warmup: f64,
    /// Share of messages that are interop (the rest first party).
    #[arg(long, default_value_t = 0.5, help_heading = "Traffic")]
    pub interop_share: f64,
    /// Share of interop messages sent gatekeeper → partner (the rest partner → gatekeeper).
    #[arg(long, default_value_t = 0.5, help_heading = "Traffic")]
    pub outbound_share: f64,
    /// Share of messages preceded by a typing signal.
    #[arg(long, default_value_t = 0.1, help_heading = "Traffic")]
    pub typing_share: f64,
    /// Payload sizes: `mixed` (80% texts 64-512 B, 19% media pointers 0.5-2 KiB, 1% 8-64
    /// KiB) or a fixed byte count (56 to 65536).
    #[arg(long, default_value = "mixed", help_heading = "Traffic")]
    pub payload: String,
    #[arg(long, default_value_t = 3600, help_heading = "Traffic")]
    pub ttl_s: u32,
    /// After the traffic, wait until everything arrived, or until nothing moved for this
    /// many seconds (what is still missing then is lost).
    #[arg(long, default_value_t = 5.0, help_heading = "Traffic")]
    pub drain_s: f64,
    #[arg(long, default_value_t = 1, help_heading = "Traffic")]
    pub seed: u64,

    // --- modes ---
    /// Find the highest rate with p99 under --p99-bound-ms (steps of --max-step-s), then
    /// run the parity check at half that rate (and --overload-factor times it).
    #[arg(long, help_heading = "Modes")]
    pub max: bool,
    #[arg(long, default_value_t = 5.0, help_heading = "Modes")]
    pub p99_bound_ms: f64,
    #[arg(long, default_value_t = 2000.0, help_heading = "Modes")]
    pub max_start: f64,
    #[arg(long, default_value_t = 5.0, help_heading = "Modes")]
    pub max_step_s: f64,
    #[arg(long, default_value_t = 12, help_heading = "Modes")]
    pub max_steps: usize,
    /// Stop bisecting when the bracket is this tight (0.05: within 5%).
    #[arg(long, default_value_t = 0.05, help_heading = "Modes")]
    pub max_precision: f64,
    /// Also run an overload phase at this multiple of the rate (of the max with --max; 3
    /// by default there, off otherwise).
    #[arg(long, help_heading = "Modes")]
    pub overload_factor: Option<f64>,
    /// Connection scale: hold this many idle authenticated device sessions (a network of
    /// their own) and measure the relay's memory per session and the active traffic's p99
    /// with and without them.
    #[arg(long, default_value_t = 0, help_heading = "Modes")]
    pub idle_conns: u32,
    /// Source addresses for idle sessions, comma-separated (default: as many of
    /// 127.0.1.1, 127.0.1.2, ... as the count needs, 25,000 each).
    #[arg(long, value_delimiter = ',', help_heading = "Modes")]
    pub idle_sources: Vec<std::net::Ipv4Addr>,

    // --- parity ---
    /// Which interop traffic the verdict compares with first party: `all` (every interop
    /// message, as the regulator's KPIs count them) or `matched` (only interop whose both
    /// ends go through server sessions, the path first-party traffic takes). The report
    /// carries both.
    #[arg(long, default_value = "all", value_parser = ["matched", "all"], help_heading = "Parity")]
    pub parity_scope: String,
    /// Largest interop/first-party latency ratio (p50, p99, p999) that passes.
    #[arg(long, default_value_t = 1.10, help_heading = "Parity")]
    pub parity_bound: f64,
    /// Latencies under this count as this in the ratios (microseconds).
    #[arg(long, default_value_t = 1000, help_heading = "Parity")]
    pub parity_floor_us: u64,
    /// How far interop's delivery ratio may fall below first party's.
    #[arg(long, default_value_t = 0.0, help_heading = "Parity")]
    pub parity_delivery_tolerance: f64,
    /// Samples needed beyond a percentile before it is judged.
    #[arg(long, default_value_t = 10, help_heading = "Parity")]
    pub parity_tail_samples: u64,

    // --- output ---
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report (inline SVG charts).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub html: Option<PathBuf>,
    /// Worker threads of loadgen's runtime.
    #[arg(long, default_value_t = 2, help_heading = "Output")]
    pub threads: usize,

    /// Test only: make loadgen's receiving path drop (`drop:N`) or duplicate (`dup:N`) every
    /// Nth envelope delivery, to prove the accounting catches it; or (`network-key`) sign
    /// network 2's consents and tokens with a key the relay does not have registered, to
    /// prove a refused enlistment fails the run.
    #[arg(long, hide = true)]
    pub fault: Option<String>,
}

/// Where the traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAddr {
    Relay(SocketAddr),
    Mqtt(SocketAddr),
}

/// `--target`: `relay://IP:PORT` (or `IP:PORT`) or `mqtt://IP:PORT`, loopback only.
pub fn parse_target(text: &str) -> Result<TargetAddr, String> {
    let (scheme, rest) = text.split_once("://").unwrap_or(("relay", text));
    let addr: SocketAddr = rest
        .trim_end_matches('/')
        .parse()
        .map_err(|e| format!("--target {text:?}: {e} (want relay://IP:PORT or mqtt://IP:PORT)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--target {text:?}: loadgen only sends to loopback addresses (127.0.0.0/8, ::1)"
        ));
    }
    match scheme {
        "relay" | "tls" => Ok(TargetAddr::Relay(addr)),
        "mqtt" => Ok(TargetAddr::Mqtt(addr)),
        other => Err(format!("--target: unknown scheme {other:?} (relay, mqtt)")),
    }
}

/// `--fault`: `drop:N`, `dup:N` or `network-key`.
pub fn parse_fault(text: Option<&str>) -> Result<Faults, String> {
    let Some(text) = text else {
        return Ok(Faults::default());
    };
    if text == "network-key" {
        return Ok(Faults {
            network_key_mismatch: true,
            ..Faults::default()
        });
    }
    let (kind, every) = text
        .split_once(':')
        .ok_or_else(|| format!("--fault {text:?}: drop:N, dup:N or network-key"))?;
    let every: u64 = every
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("--fault {text:?}: N must be a positive integer"))?;
    match kind {
        "drop" => Ok(Faults {
            drop_every: every,
            ..Faults::default()
        }),
        "dup" | "duplicate" => Ok(Faults {
            duplicate_every: every,
            ..Faults::default()
        }),
        _ => Err(format!("--fault {text:?}: drop:N, dup:N or network-key")),
    }
}

/// Checks what clap cannot: shares, rates and loopback-only addresses.
pub fn check_args(args: &RunArgs) -> Result<(), String> {
    let share = |name: &str, v: f64| {
        if (0.0..=1.0).contains(&v) {
            Ok(())
        } else {
            Err(format!("--{name}: a share between 0 and 1"))
        }
    };
    share("interop-share", args.interop_share)?;
    share("outbound-share", args.outbound_share)?;
    share("typing-share", args.typing_share)?;
    share("multi-device-share", args.multi_device_share)?;
    share("offline-share", args.offline_share)?;
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--rate: a positive number of messages per second".into());
    }
    if args.duration.is_nan() || args.duration <= 0.0 {
        return Err("--duration: positive seconds".into());
    }
    if args.threads == 0 {
        return Err("--threads: at least 1".into());
    }
    if args.parity_bound < 1.0 {
        return Err("--parity-bound: at least 1.0".into());
    }
    if !args.spawn && !args.no_enlist && !args.api.ip().is_loopback() {
        return Err(format!(
            "--api {}: loadgen only talks to loopback addresses (127.0.0.0/8, ::1)",
            args.api
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_stay_on_loopback() {
        assert_eq!(
            parse_target("relay://127.0.0.1:7700").unwrap(),
            TargetAddr::Relay("127.0.0.1:7700".parse().unwrap())
        );
        assert_eq!(
            parse_target("127.0.0.2:1").unwrap(),
            TargetAddr::Relay("127.0.0.2:1".parse().unwrap())
        );
        assert_eq!(
            parse_target("mqtt://127.0.0.1:1883").unwrap(),
            TargetAddr::Mqtt("127.0.0.1:1883".parse().unwrap())
        );
        assert!(parse_target("mqtt://10.0.0.1:1883").is_err());
        assert!(parse_target("http://127.0.0.1:1").is_err());
        assert!(parse_target("relay://localhost").is_err());
    }

    #[test]
    fn faults_parse() {
        assert_eq!(parse_fault(Some("drop:7")).unwrap().drop_every, 7);
        assert_eq!(parse_fault(Some("dup:3")).unwrap().duplicate_every, 3);
        assert!(parse_fault(Some("drop:0")).is_err());
        assert!(parse_fault(Some("lose:1")).is_err());
        assert_eq!(parse_fault(None).unwrap().drop_every, 0);
        let key = parse_fault(Some("network-key")).unwrap();
        assert!(key.network_key_mismatch);
        assert_eq!(key.drop_every + key.duplicate_every, 0);
        assert!(!parse_fault(Some("drop:7")).unwrap().network_key_mismatch);
    }
}
