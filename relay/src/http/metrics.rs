//! The HTTP port's own counters, rendered after the data plane's in `/metrics`: connections
//! per lane, sources tracked, and every connection or request the port refused or closed,
//! by reason.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::deadline::Expired;
use super::sources::{Lane, Refusal, Sources};

#[derive(Debug, Default)]
pub struct HttpMetrics {
    refused_per_source: AtomicU64,
    refused_full: AtomicU64,
    closed_handshake: AtomicU64,
    closed_header: AtomicU64,
    closed_write: AtomicU64,
    closed_idle: AtomicU64,
    closed_reserved: AtomicU64,
    accepted_general: AtomicU64,
    accepted_reserved: AtomicU64,
    rate_limited: AtomicU64,
    busy: AtomicU64,
}

/// Why the port closed a connection it had accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No first byte or no finished TLS handshake within `handshake_timeout_ms`.
    Handshake,
    /// No whole request head within `header_timeout_ms`.
    Header,
    Deadline(Expired),
    /// A reserved-lane connection past `reserved_deadline_ms`.
    Reserved,
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl HttpMetrics {
    pub fn accepted(&self, lane: Lane) {
        match lane {
            Lane::General => add(&self.accepted_general),
            Lane::Reserved => add(&self.accepted_reserved),
        }
    }

    pub fn refused(&self, refusal: Refusal) {
        match refusal {
            Refusal::PerSource => add(&self.refused_per_source),
            Refusal::Full => add(&self.refused_full),
        }
    }

    pub fn closed(&self, closed: Closed) {
        match closed {
            Closed::Handshake => add(&self.closed_handshake),
            Closed::Header => add(&self.closed_header),
            Closed::Deadline(Expired::Write) => add(&self.closed_write),
            Closed::Deadline(Expired::Idle) => add(&self.closed_idle),
            Closed::Reserved => add(&self.closed_reserved),
        }
    }

    /// A request to an open route refused as `SOURCE_RATE_LIMITED`.
    pub fn rate_limited(&self) {
        add(&self.rate_limited);
    }

    /// A request on the reserved lane for another route than `/healthz` or `/metrics`.
    pub fn busy(&self) {
        add(&self.busy);
    }

    pub fn render(&self, out: &mut String, sources: &Sources) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (general, reserved, tracked) = sources.occupancy();
        let _ = writeln!(
            out,
            "# HELP relay_http_connections HTTP-port connections open, by lane.\n\
             # TYPE relay_http_connections gauge\n\
             relay_http_connections{{lane=\"general\"}} {general}\n\
             relay_http_connections{{lane=\"reserved\"}} {reserved}\n\
             # HELP relay_http_sources Sources (IPv4 addresses, IPv6 /64s) the HTTP port tracks.\n\
             # TYPE relay_http_sources gauge\n\
             relay_http_sources {tracked}\n\
             # HELP relay_http_accepted_total HTTP-port connections accepted, by lane.\n\
             # TYPE relay_http_accepted_total counter\n\
             relay_http_accepted_total{{lane=\"general\"}} {}\n\
             relay_http_accepted_total{{lane=\"reserved\"}} {}\n\
             # HELP relay_http_refused_total HTTP-port connections closed at once, by reason.\n\
             # TYPE relay_http_refused_total counter\n\
             relay_http_refused_total{{reason=\"per_source\"}} {}\n\
             relay_http_refused_total{{reason=\"full\"}} {}\n\
             # HELP relay_http_closed_total HTTP-port connections closed for a missed deadline.\n\
             # TYPE relay_http_closed_total counter\n\
             relay_http_closed_total{{reason=\"handshake\"}} {}\n\
             relay_http_closed_total{{reason=\"header\"}} {}\n\
             relay_http_closed_total{{reason=\"write\"}} {}\n\
             relay_http_closed_total{{reason=\"idle\"}} {}\n\
             relay_http_closed_total{{reason=\"reserved\"}} {}\n\
             # HELP relay_http_rate_limited_total Open-route requests refused as SOURCE_RATE_LIMITED.\n\
             # TYPE relay_http_rate_limited_total counter\n\
             relay_http_rate_limited_total {}\n\
             # HELP relay_http_busy_total Reserved-lane requests refused as HTTP_BUSY.\n\
             # TYPE relay_http_busy_total counter\n\
             relay_http_busy_total {}",
            get(&self.accepted_general),
            get(&self.accepted_reserved),
            get(&self.refused_per_source),
            get(&self.refused_full),
            get(&self.closed_handshake),
            get(&self.closed_header),
            get(&self.closed_write),
            get(&self.closed_idle),
            get(&self.closed_reserved),
            get(&self.rate_limited),
            get(&self.busy),
        );
    }
}
