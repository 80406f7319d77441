//! Counters the cores update and `/metrics` renders in the Prometheus text format. Each core
//! writes only its own counters (relaxed atomics, no locks on the hot path).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use codec::{ErrorCode, NetworkId};

use crate::core::shard::interface::ShardStats;

#[derive(Debug)]
pub struct CoreMetrics {
    pub frames_in: AtomicU64,
    pub envelopes_in: AtomicU64,
    pub receipts_in: AtomicU64,
    pub signals_in: AtomicU64,
    pub acks_out: AtomicU64,
    pub deliveries_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub busy_ns: AtomicU64,
    pub turns: AtomicU64,
    pub log_commits: AtomicU64,
    pub log_bytes: AtomicU64,
    pub log_commit_ns: AtomicU64,
    pub log_disk_bytes: AtomicU64,
    pub storage_failed: AtomicU64,
    pub recovered_frames: AtomicU64,
    /// Damaged log segments kept in the shard's `quarantine/` (counted at start), the bytes of
    /// those quarantined at this start that could not be read, and the queued frames rescued
    /// from them (stored again before the relay was ready).
    pub log_quarantined_segments: AtomicU64,
    pub log_damaged_bytes: AtomicU64,
    pub log_rescued_frames: AtomicU64,
    /// Cross-network frames checked against the interop rules, and refused by them.
    pub policy_checked: AtomicU64,
    pub policy_refused: AtomicU64,
    /// The data port's deadlines and admission.
    pub port: PortMetrics,
    /// One per code of `ErrorCode::ALL` (room for the registry to grow).
    errors: [AtomicU64; ERROR_SLOTS],
    shard: [AtomicU64; SHARD_FIELDS],
}

impl Default for CoreMetrics {
    fn default() -> Self {
        CoreMetrics {
            frames_in: AtomicU64::new(0),
            envelopes_in: AtomicU64::new(0),
            receipts_in: AtomicU64::new(0),
            signals_in: AtomicU64::new(0),
            acks_out: AtomicU64::new(0),
            deliveries_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            log_commits: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            log_commit_ns: AtomicU64::new(0),
            log_disk_bytes: AtomicU64::new(0),
            storage_failed: AtomicU64::new(0),
            recovered_frames: AtomicU64::new(0),
            log_quarantined_segments: AtomicU64::new(0),
            log_damaged_bytes: AtomicU64::new(0),
            log_rescued_frames: AtomicU64::new(0),
            policy_checked: AtomicU64::new(0),
            policy_refused: AtomicU64::new(0),
            port: PortMetrics::default(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            shard: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl CoreMetrics {
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn publish_shard(&self, s: ShardStats) {
        let values = [
            s.accepted,
            s.duplicates,
            s.refused,
            s.delivered,
            s.released,
            s.expired,
            s.deleted,
            s.signals,
            s.queued_frames,
            s.queued_bytes,
            s.ram_bytes,
            s.spilled,
            s.loads,
            s.purged,
        ];
        for (slot, value) in self.shard.iter().zip(values) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    /// The shard's counters as last published (for tests and tools in-process).
    pub fn shard_stats(&self) -> ShardStats {
        let v = |i: usize| self.shard[i].load(Ordering::Relaxed);
        ShardStats {
            accepted: v(0),
            duplicates: v(1),
            refused: v(2),
            delivered: v(3),
            released: v(4),
            expired: v(5),
            deleted: v(6),
            signals: v(7),
            queued_frames: v(8),
            queued_bytes: v(9),
            ram_bytes: v(10),
            spilled: v(11),
            loads: v(12),
            purged: v(13),
        }
    }
}

const SHARD_FIELDS: usize = 14;

const SHARD_NAMES: [(&str, &str, &str); SHARD_FIELDS] = [
    (
        "relay_shard_accepted_total",
        "counter",
        "Envelopes and receipts stored for every target device",
    ),
    (
        "relay_shard_duplicates_total",
        "counter",
        "Resent ids acknowledged again and not queued",
    ),
    (
        "relay_shard_refused_total",
        "counter",
        "Envelopes and receipts refused by the shard",
    ),
    (
        "relay_shard_delivered_total",
        "counter",
        "Deliveries written to a device's connection",
    ),
    (
        "relay_shard_released_total",
        "counter",
        "Queued frames released by a device's Ack",
    ),
    (
        "relay_shard_expired_total",
        "counter",
        "Queued frames removed when their TTL ran out",
    ),
    (
        "relay_shard_deleted_total",
        "counter",
        "Queued frames deleted with a removed device",
    ),
    (
        "relay_shard_signals_total",
        "counter",
        "Ephemeral signals delivered",
    ),
    (
        "relay_queue_frames",
        "gauge",
        "Frames queued, delivered or not, awaiting a device's Ack",
    ),
    ("relay_queue_bytes", "gauge", "Bytes of queued frames"),
    (
        "relay_queue_ram_bytes",
        "gauge",
        "Bytes of queued frames held in memory (the rest are only in the log)",
    ),
    (
        "relay_shard_spilled_total",
        "counter",
        "Queued frames moved out of memory (their bytes stay in the log)",
    ),
    (
        "relay_shard_loads_total",
        "counter",
        "Spilled frames read back from the log for delivery",
    ),
    (
        "relay_shard_purged_total",
        "counter",
        "Queued frames deleted because their recipient opted out of interop",
    ),
];

/// Slots of `CoreMetrics::errors`, one per error code (room for the codes still to come).
const ERROR_SLOTS: usize = 128;

const _: () = assert!(
    ErrorCode::ALL.len() <= ERROR_SLOTS,
    "CoreMetrics::errors has a slot per code"
);

/// Connections open, by kind (server or device) and network.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<BTreeMap<(String, u32), i64>>,
}

impl Connections {
    pub fn add(&self, kind: &str, network: NetworkId, delta: i64) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *open.entry((kind.to_string(), network.0)).or_insert(0) += delta;
    }
}

/// Renders every core's counters.
pub fn render(
    cores: &[std::sync::Arc<CoreMetrics>],
    connections: &Connections,
    durability: &str,
) -> String {
    let mut out = String::with_capacity(8192);
    let _ = writeln!(
        out,
        "# HELP relay_info Static facts about this relay.\n# TYPE relay_info gauge"
    );
    let _ = writeln!(
        out,
        "relay_info{{version=\"{}\",durability=\"{durability}\",cores=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        cores.len()
    );
    let _ = writeln!(
        out,
        "# HELP relay_connections Connections open, by kind and network.\n# TYPE relay_connections gauge"
    );
    for ((role, network), n) in connections
        .open
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        let _ = writeln!(
            out,
            "relay_connections{{kind=\"{role}\",network=\"{network}\"}} {n}"
        );
    }
    type Field = fn(&CoreMetrics) -> &AtomicU64;
    let per_core: [(&str, &str, Field); 20] = [
        ("relay_frames_in_total", "Frames received", |m| &m.frames_in),
        ("relay_envelopes_in_total", "Envelopes received", |m| {
            &m.envelopes_in
        }),
        ("relay_receipts_in_total", "Receipts received", |m| {
            &m.receipts_in
        }),
        ("relay_signals_in_total", "Signals received", |m| {
            &m.signals_in
        }),
        ("relay_acks_out_total", "Acks written to senders", |m| {
            &m.acks_out
        }),
        (
            "relay_deliveries_out_total",
            "Delivery frames written",
            |m| &m.deliveries_out,
        ),
        ("relay_tls_bytes_in_total", "TLS bytes read", |m| {
            &m.bytes_in
        }),
        ("relay_tls_bytes_out_total", "TLS bytes written", |m| {
            &m.bytes_out
        }),
        (
            "relay_slow_consumer_closes_total",
            "Connections closed for not reading their deliveries",
            |m| &m.slow_consumer_closes,
        ),
        (
            "relay_core_busy_seconds_total",
            "Time each core spent processing (ns as seconds)",
            |m| &m.busy_ns,
        ),
        (
            "relay_core_turns_total",
            "Processing turns of each core",
            |m| &m.turns,
        ),
        (
            "relay_log_commits_total",
            "Log writes, each followed by one fdatasync at the fsync level",
            |m| &m.log_commits,
        ),
        ("relay_log_bytes_total", "Bytes written to the log", |m| {
            &m.log_bytes
        }),
        (
            "relay_log_commit_seconds_total",
            "Time spent writing and syncing the log (ns as seconds)",
            |m| &m.log_commit_ns,
        ),
        (
            "relay_log_disk_bytes",
            "Bytes in the log's segments now",
            |m| &m.log_disk_bytes,
        ),
        (
            "relay_storage_failed",
            "1 when the shard's log failed and it acknowledges nothing",
            |m| &m.storage_failed,
        ),
        (
            "relay_recovered_frames",
            "Queued frames rebuilt from the log at start",
            |m| &m.recovered_frames,
        ),
        (
            "relay_log_quarantined_segments",
            "Damaged log segments kept in the shard's quarantine directory",
            |m| &m.log_quarantined_segments,
        ),
        (
            "relay_log_damaged_bytes",
            "Bytes of the segments quarantined at start that could not be read as records",
            |m| &m.log_damaged_bytes,
        ),
        (
            "relay_log_rescued_frames",
            "Queued frames rescued from damaged segments at start and stored again",
            |m| &m.log_rescued_frames,
        ),
    ];
    for (name, help, field) in per_core {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        for (core, m) in cores.iter().enumerate() {
            let value = field(m).load(Ordering::Relaxed);
            if name == "relay_core_busy_seconds_total" || name == "relay_log_commit_seconds_total" {
                let _ = writeln!(out, "{name}{{core=\"{core}\"}} {:.6}", value as f64 / 1e9);
            } else {
                let _ = writeln!(out, "{name}{{core=\"{core}\"}} {value}");
            }
        }
    }
    for (i, (name, kind, help)) in SHARD_NAMES.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        for (core, m) in cores.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{core}\"}} {}",
                m.shard[i].load(Ordering::Relaxed)
            );
        }
    }
    render_port(&mut out, cores);
    let _ = writeln!(
        out,
        "# HELP relay_errors_total Errors sent to clients, by code.\n# TYPE relay_errors_total counter"
    );
    for (i, code) in ErrorCode::ALL.iter().enumerate() {
        let total: u64 = cores
            .iter()
            .map(|m| m.errors[i].load(Ordering::Relaxed))
            .sum();
        if total > 0 {
            let _ = writeln!(
                out,
                "relay_errors_total{{code=\"{}\",name=\"{}\"}} {total}",
                code.as_u16(),
                code.name()
            );
        }
    }
    out
}

/// The interop rules' figures: whether they are enforced, and the frames they checked and
/// refused (the refusals by code are in `relay_errors_total`).
pub fn render_policy(out: &mut String, cores: &[std::sync::Arc<CoreMetrics>], enforced: bool) {
    let sum = |field: fn(&CoreMetrics) -> &AtomicU64| -> u64 {
        cores.iter().map(|c| field(c).load(Ordering::Relaxed)).sum()
    };
    let _ = writeln!(
        out,
        "# HELP relay_policy_enforced Whether the interop rules are enforced (0: lab mode)\n# TYPE relay_policy_enforced gauge\nrelay_policy_enforced {}",
        u8::from(enforced)
    );
    let _ = writeln!(
        out,
        "# HELP relay_policy_checked_total Cross-network frames checked against the interop rules\n# TYPE relay_policy_checked_total counter\nrelay_policy_checked_total {}",
        sum(|c| &c.policy_checked)
    );
    let _ = writeln!(
        out,
        "# HELP relay_policy_refused_total Cross-network frames the interop rules refused (by code in relay_errors_total)\n# TYPE relay_policy_refused_total counter\nrelay_policy_refused_total {}",
        sum(|c| &c.policy_refused)
    );
}

/// The control plane's rate tables: live buckets per network (registered networks only, so
/// the label set stays small).
pub fn render_rate_buckets(out: &mut String, buckets: &[(NetworkId, usize)]) {
    let _ = writeln!(
        out,
        "# HELP relay_control_rate_buckets Live rate-limit buckets in each network's own table (bounded by interop.rate_buckets_per_network_max)\n# TYPE relay_control_rate_buckets gauge"
    );
    for (network, count) in buckets {
        let _ = writeln!(
            out,
            "relay_control_rate_buckets{{network=\"{}\"}} {count}",
            network.0
        );
    }
}

/// The caps per network: each network's users and devices on the relay, its caps, and what
/// they refused (networks are a registered few, so the label set stays small).
pub fn render_network_caps(out: &mut String, caps: &crate::tables::caps::NetworkCaps) {
    let figures = caps.figures();
    type Field = fn(&crate::tables::caps::UsageFigures) -> u64;
    let gauges: [(&str, &str, Field); 5] = [
        (
            "relay_network_users",
            "Users of the network the relay holds",
            |f| f.users,
        ),
        (
            "relay_network_devices",
            "Devices of the network's users the relay holds",
            |f| f.devices,
        ),
        (
            "relay_network_users_max",
            "The network's cap on users",
            |f| f.users_max,
        ),
        (
            "relay_network_devices_max",
            "The network's cap on devices",
            |f| f.devices_max,
        ),
        (
            "relay_network_device_set_changes_per_s",
            "The network's cap on device-set changes per second",
            |f| f.device_set_changes_per_s,
        ),
    ];
    for (name, help, field) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for f in &figures {
            let _ = writeln!(out, "{name}{{network=\"{}\"}} {}", f.network.0, field(f));
        }
    }
    let _ = writeln!(
        out,
        "# HELP relay_network_cap_refused_total Changes refused by a cap of the network (users: NETWORK_USER_LIMIT, devices: NETWORK_DEVICE_LIMIT, device_set_rate: DEVICE_SET_RATE_LIMITED)\n# TYPE relay_network_cap_refused_total counter"
    );
    for f in &figures {
        for (cap, value) in [
            ("users", f.refused_users),
            ("devices", f.refused_devices),
            ("device_set_rate", f.refused_changes),
        ] {
            let _ = writeln!(
                out,
                "relay_network_cap_refused_total{{network=\"{}\",cap=\"{cap}\"}} {value}",
                f.network.0
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP relay_shard_user_limit_refused_total New users refused because their shard held limits.shard_users_max users (SHARD_USER_LIMIT)\n# TYPE relay_shard_user_limit_refused_total counter\nrelay_shard_user_limit_refused_total {}",
        caps.refused_shard_full()
    );
}

/// The device-token journal (absent at the `memory` level).
pub fn render_token_journal(out: &mut String, journal: &crate::io::tokens::JournalMetrics) {
    let value = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP relay_token_journal_records_total Device token ids written to the token journal\n# TYPE relay_token_journal_records_total counter\nrelay_token_journal_records_total {}",
        value(&journal.records)
    );
    let _ = writeln!(
        out,
        "# HELP relay_token_journal_restored Device token ids read back at start, refused as replays until they expire\n# TYPE relay_token_journal_restored gauge\nrelay_token_journal_restored {}",
        value(&journal.restored)
    );
    let _ = writeln!(
        out,
        "# HELP relay_token_journal_write_errors_total Journal writes that failed (those ids would be forgotten by a restart)\n# TYPE relay_token_journal_write_errors_total counter\nrelay_token_journal_write_errors_total {}",
        value(&journal.write_errors)
    );
    let _ = writeln!(
        out,
        "# HELP relay_token_journal_files Token journal files on disk\n# TYPE relay_token_journal_files gauge\nrelay_token_journal_files {}",
        value(&journal.files)
    );
}

/// Why a connection was refused at accept, before its TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptRefusal {
    /// `handshakes_per_core_per_second_max`.
    HandshakeRate,
    /// `unauthenticated_per_source_max`.
    Source,
    /// `connections_per_core_max`.
    ConnectionsFull,
}

impl AcceptRefusal {
    pub const ALL: [AcceptRefusal; 3] = [
        AcceptRefusal::HandshakeRate,
        AcceptRefusal::Source,
        AcceptRefusal::ConnectionsFull,
    ];

    fn name(self) -> &'static str {
        match self {
            AcceptRefusal::HandshakeRate => "handshake_rate",
            AcceptRefusal::Source => "source",
            AcceptRefusal::ConnectionsFull => "connections_full",
        }
    }
}

/// The data port's deadlines and admission, per core.
#[derive(Debug, Default)]
pub struct PortMetrics {
    /// Sessions closed at a deadline, by `Deadline` (handshake, hello, idle, token expiry).
    deadline_closes: [AtomicU64; 4],
    /// Connections closed at the write deadline (`WRITE_TIMEOUT`).
    pub write_deadline_closes: AtomicU64,
    /// Connections refused at accept, by `AcceptRefusal`.
    refused: [AtomicU64; 3],
    /// Unauthenticated connections closed to make room for newer ones.
    pub evicted: AtomicU64,
    /// Unauthenticated connections open now.
    pub unauthenticated: AtomicU64,
    /// `KeepAlive` requests sent to quiet sessions.
    pub keepalives_sent: AtomicU64,
}

impl PortMetrics {
    pub fn deadline(&self, deadline: crate::core::session::Deadline) {
        if let Some(i) = crate::core::session::Deadline::ALL
            .iter()
            .position(|d| *d == deadline)
        {
            self.deadline_closes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused(&self, why: AcceptRefusal) {
        if let Some(i) = AcceptRefusal::ALL.iter().position(|r| *r == why) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Renders the data port's figures (docs/operations.md, metrics).
fn render_port(out: &mut String, cores: &[std::sync::Arc<CoreMetrics>]) {
    use crate::core::session::Deadline;
    let _ = writeln!(
        out,
        "# HELP relay_deadline_closes_total Connections closed at a deadline of the data port.\n# TYPE relay_deadline_closes_total counter"
    );
    for (core, m) in cores.iter().enumerate() {
        for (i, deadline) in Deadline::ALL.iter().enumerate() {
            let value = m.port.deadline_closes[i].load(Ordering::Relaxed);
            let name = deadline.name();
            let _ = writeln!(
                out,
                "relay_deadline_closes_total{{core=\"{core}\",deadline=\"{name}\"}} {value}"
            );
        }
        let value = m.port.write_deadline_closes.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "relay_deadline_closes_total{{core=\"{core}\",deadline=\"write\"}} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP relay_accept_refused_total Connections closed at accept, before TLS, by reason.\n# TYPE relay_accept_refused_total counter"
    );
    for (core, m) in cores.iter().enumerate() {
        for (i, why) in AcceptRefusal::ALL.iter().enumerate() {
            let value = m.port.refused[i].load(Ordering::Relaxed);
            let reason = why.name();
            let _ = writeln!(
                out,
                "relay_accept_refused_total{{core=\"{core}\",reason=\"{reason}\"}} {value}"
            );
        }
    }
    type Field = fn(&PortMetrics) -> &AtomicU64;
    let simple: [(&str, &str, &str, Field); 3] = [
        (
            "relay_unauthenticated_evicted_total",
            "counter",
            "Unauthenticated connections closed to make room for newer ones",
            |p| &p.evicted,
        ),
        (
            "relay_connections_unauthenticated",
            "gauge",
            "Connections open that have not authenticated",
            |p| &p.unauthenticated,
        ),
        (
            "relay_keepalives_sent_total",
            "counter",
            "KeepAlive requests sent to quiet sessions",
            |p| &p.keepalives_sent,
        ),
    ];
    for (name, kind, help, field) in simple {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        for (core, m) in cores.iter().enumerate() {
            let value = field(&m.port).load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{core=\"{core}\"}} {value}");
        }
    }
}
