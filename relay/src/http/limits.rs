//! The HTTP port's bounds (`[http]` in the configuration file): how many connections it
//! serves, from one source and in all, how long each may sit on a handshake, a request head,
//! a write nobody reads or nothing at all, and how often one source may fetch what needs no
//! certificate. Checked at start, each error naming its key.

use std::time::Duration;

use serde::Deserialize;

/// Bounds of the HTTP port, set in the `[http]` table of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Connections served at once on the general lane (every route). Past it a connection
    /// goes to the reserved lane, or is closed at once when that is full too: the listener
    /// never stops accepting, so a probe is never stuck in the kernel's backlog.
    pub connections_max: u32,
    /// Extra connections kept for `/healthz` and `/metrics` when the general lane is full:
    /// one request each, within `reserved_deadline_ms`; any other route gets `HTTP_BUSY`.
    pub connections_reserved: u32,
    /// Connections one source (an IPv4 address, an IPv6 /64) may hold on both lanes until
    /// they authenticate (a client certificate the relay trusts); then they count only
    /// against `connections_max`. Above a partner's burst of concurrent API calls, below the
    /// lane, so one address cannot fill it.
    pub connections_per_source_max: u32,
    /// Time to send the first byte and finish the TLS handshake.
    pub handshake_timeout_ms: u32,
    /// Time to send a request head.
    pub header_timeout_ms: u32,
    /// Time for the bytes the relay has to write to be taken: from the moment a write can
    /// not go on until everything pending is written. A client that does not read is
    /// closed past it.
    pub write_timeout_ms: u32,
    /// Time a connection may move no byte either way (between requests, or while a request
    /// runs: above the control plane's take and commit timeouts, 35 s).
    pub idle_timeout_ms: u32,
    /// The whole life of a reserved-lane connection.
    pub reserved_deadline_ms: u32,
    /// Requests per minute one source may make to routes that need no certificate and cost
    /// the relay more than a few bytes (`GET /v1/openapi.json`); past it `SOURCE_RATE_LIMITED`.
    /// `/healthz` and `/metrics` are not counted: monitoring polls them, and the connection
    /// caps bound them.
    pub open_requests_per_source_per_min: u32,
    /// Sources the per-source table tracks; past it the sources without a connection are
    /// forgotten (their rate buckets start full again).
    pub sources_max: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            connections_max: 1024,
            connections_reserved: 16,
            connections_per_source_max: 256,
            handshake_timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            reserved_deadline_ms: 5_000,
            open_requests_per_source_per_min: 120,
            sources_max: 65_536,
        }
    }
}

fn ms(value: u32) -> Duration {
    Duration::from_millis(u64::from(value))
}

impl HttpLimits {
    pub fn handshake_timeout(&self) -> Duration {
        ms(self.handshake_timeout_ms)
    }
    pub fn header_timeout(&self) -> Duration {
        ms(self.header_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        ms(self.write_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        ms(self.idle_timeout_ms)
    }
    pub fn reserved_deadline(&self) -> Duration {
        ms(self.reserved_deadline_ms)
    }

    /// Checks each bound and their relations; names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, bool, &str); 10] = [
            (
                "http.connections_max",
                self.connections_max >= 1,
                "must be at least 1",
            ),
            (
                "http.connections_reserved",
                self.connections_reserved >= 1,
                "must be at least 1 (the lane that keeps /healthz and /metrics answerable)",
            ),
            (
                "http.connections_per_source_max",
                self.connections_per_source_max >= 1,
                "must be at least 1",
            ),
            (
                "http.handshake_timeout_ms",
                self.handshake_timeout_ms >= 1,
                "must be at least 1",
            ),
            (
                "http.header_timeout_ms",
                self.header_timeout_ms >= 1,
                "must be at least 1",
            ),
            (
                "http.write_timeout_ms",
                self.write_timeout_ms >= 1,
                "must be at least 1",
            ),
            (
                "http.idle_timeout_ms",
                self.idle_timeout_ms >= 1,
                "must be at least 1",
            ),
            (
                "http.reserved_deadline_ms",
                self.reserved_deadline_ms >= 1,
                "must be at least 1",
            ),
            (
                "http.open_requests_per_source_per_min",
                self.open_requests_per_source_per_min >= 1,
                "must be at least 1",
            ),
            (
                "http.sources_max",
                u64::from(self.sources_max)
                    >= u64::from(self.connections_max) + u64::from(self.connections_reserved),
                "must be at least connections_max + connections_reserved (every connected source has an entry)",
            ),
        ];
        for (key, ok, message) in checks {
            if !ok {
                return Err(format!("{key}: {message}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        HttpLimits::default().validate().unwrap();
        let bad = HttpLimits {
            sources_max: 10,
            ..HttpLimits::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("http.sources_max"));
        let bad = HttpLimits {
            write_timeout_ms: 0,
            ..HttpLimits::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .starts_with("http.write_timeout_ms")
        );
    }
}
