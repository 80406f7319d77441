//! The relay's configured bounds. Every queue, buffer and map of the relay is bounded by one
//! of these (or by a codec limit); the relations between them are checked at start.

use std::time::Duration;

use serde::Deserialize;

/// How often each core's timer runs: TTL expiry, the log's housekeeping, session deadlines.
pub const TIMER_TICK: Duration = Duration::from_millis(100);

/// Inbox batches a core handles in one turn before it lets its connections run: another
/// core's flood cannot starve this core's own sockets.
pub const INBOX_BATCHES_PER_TURN: usize = 16;

/// How long a connection's writer may wait on its socket before the client counts as slow:
/// past that, a client with more than twice `connection_pending_bytes_max` waiting is closed.
/// Until the writer has waited, what waits is a burst written in one turn (a backlog going
/// out when its device comes back), not a client that does not read.
pub const SLOW_CONSUMER_AFTER: Duration = Duration::from_secs(1);

/// How long a session has to send `Hello` once TLS is up, unless `hello_timeout_ms` says
/// otherwise (the default of that key, and what `Session::new` uses); past it the session is
/// closed with `HELLO_REQUIRED`. The deadline's place is the session's timer.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(
    HELLO_TIMEOUT.as_millis() == 10_000,
    "hello_timeout_ms defaults to HELLO_TIMEOUT"
);

/// How long the control plane waits for a core to take a change before it gives up (and the
/// change is not applied), and then for the change's log record to be stored.
pub const CONTROL_TAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONTROL_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds the relay enforces, set in the `[limits]` table of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayLimits {
    /// Devices a user may have: a primary and four companions by default, as the gatekeeper
    /// allows.
    pub devices_per_user_max: u16,
    /// Frames queued for one device; past it, senders get `QUEUE_FULL`.
    pub device_queue_depth_max: u32,
    /// Bytes queued on one shard (one core), all devices together; past it, `QUEUE_FULL`.
    pub shard_queued_bytes_max: u64,
    /// Deliveries written to a device and not yet acknowledged by it.
    pub device_deliveries_in_flight_max: u32,
    /// Envelopes and receipts a session may have awaiting the relay's `Ack`.
    pub frames_in_flight_max: u32,
    /// Bytes waiting to be written to one connection before the relay stops reading from it.
    pub connection_pending_bytes_max: u32,
    /// The largest envelope payload the relay accepts (at most the codec's 256 KiB).
    pub payload_bytes_max: u32,
    /// The longest TTL honoured; longer ones are cut to it.
    pub ttl_seconds_max: u32,
    /// How long a (sender, message id) pair is remembered for deduplication.
    pub dedup_window_seconds: u32,
    /// Pairs remembered per shard; the oldest are forgotten first past it.
    pub dedup_entries_max: u32,
    /// Connections one core accepts; past it, new connections are closed at once.
    pub connections_per_core_max: u32,
    /// Device tokens remembered for replay detection (until they expire).
    pub token_ids_max: u32,
    /// Work items one core sends another in one batch; more go in further batches.
    pub cross_core_batch_max: u32,
    /// Batches waiting in one core's inbox; a full inbox pushes back on the sending core.
    pub cross_core_inbox_batches_max: u32,
    /// Size at which a shard's log segment is sealed and a new one started.
    pub log_segment_bytes_max: u64,
    /// Bytes of queued frames a shard keeps in memory at the `os` and `fsync` levels; past
    /// it, frames of offline devices leave memory (they are in the log) and are read back
    /// when their device returns. `shard_queued_bytes_max` bounds what is queued in all.
    pub shard_ram_bytes_max: u64,

    // Caps per network (a partner record may set its own; these are the defaults) and per
    // shard: what one tenant's users may take of the shards' memory and log.
    /// Users of one network the relay holds, over every shard; past it a new user is refused
    /// with `NETWORK_USER_LIMIT`.
    pub network_users_max: u64,
    /// Devices of one network's users, over every shard (`NETWORK_DEVICE_LIMIT`).
    pub network_devices_max: u64,
    /// Device-set changes of one network per second (`DeviceList`, a device session's new
    /// device, the control API's device sets), bursts of a second's worth
    /// (`DEVICE_SET_RATE_LIMITED`).
    pub network_device_set_changes_per_s: u32,
    /// Users one shard holds, all networks together (`SHARD_USER_LIMIT`).
    pub shard_users_max: u64,
    /// Device token ids waiting for the token journal's thread to store them; past it a
    /// device session is refused with `TOKEN_JOURNAL_BUSY` rather than welcomed with a token
    /// a restart could forget.
    pub token_journal_pending_max: u32,
    // The data port against a hostile internet: deadlines and admission (docs/operations.md,
    // "The data port's deadlines and admission").
    /// How long a new connection has to finish its TLS handshake; past it, it is closed
    /// (`HANDSHAKE_TIMEOUT`, counted; no frame can be sent without TLS).
    pub tls_handshake_timeout_ms: u32,
    /// How long a connection has, once TLS is up, to send `Hello`; past it, `HELLO_REQUIRED`.
    pub hello_timeout_ms: u32,
    /// How long an established session may send nothing; past it, `IDLE_TIMEOUT`. The relay
    /// sends a `KeepAlive` to sessions that enabled the feature after half of it.
    pub idle_timeout_ms: u32,
    /// How long a client may leave the relay's bytes untaken (no progress on a write);
    /// past it, `WRITE_TIMEOUT`.
    pub write_timeout_ms: u32,
    /// Plaintext bytes the relay buffers for a client before it is authenticated: a frame
    /// announced larger than this before `Hello` is accepted ends the session
    /// (`PREAUTH_LIMIT`).
    pub preauth_bytes_max: u32,
    /// Connections one core keeps that have not authenticated; the rest of
    /// `connections_per_core_max` is reserved for authenticated sessions. At the cap, the
    /// oldest unauthenticated connection is closed to make room.
    pub unauthenticated_per_core_max: u32,
    /// Unauthenticated connections from one source address (an IPv6 /64), all cores together.
    pub unauthenticated_per_source_max: u32,
    /// TLS handshakes one core starts per second (a token bucket holding one second's
    /// worth); connections past it are closed at once.
    pub handshakes_per_core_per_second_max: u32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            devices_per_user_max: 5,
            device_queue_depth_max: 10_000,
            shard_queued_bytes_max: 16 << 30,
            device_deliveries_in_flight_max: 256,
            frames_in_flight_max: 4096,
            connection_pending_bytes_max: 4 << 20,
            payload_bytes_max: 64 * 1024,
            ttl_seconds_max: 7 * 24 * 3600,
            dedup_window_seconds: 600,
            dedup_entries_max: 1_000_000,
            connections_per_core_max: 200_000,
            token_ids_max: 1_000_000,
            cross_core_batch_max: 1024,
            cross_core_inbox_batches_max: 1024,
            log_segment_bytes_max: 64 << 20,
            shard_ram_bytes_max: 256 << 20,
            network_users_max: 1_000_000,
            network_devices_max: 5_000_000,
            network_device_set_changes_per_s: 10_000,
            shard_users_max: 2_000_000,
            token_journal_pending_max: 65_536,

            tls_handshake_timeout_ms: 10_000,
            hello_timeout_ms: 10_000, // HELLO_TIMEOUT
            idle_timeout_ms: 120_000,
            write_timeout_ms: 30_000,
            // The largest Hello: an unauthenticated client needs no more.
            preauth_bytes_max: u32::try_from(
                codec::limits::PREAMBLE_BYTES + codec::limits::HEADER_BYTES_MAX,
            )
            .unwrap_or(u32::MAX),
            unauthenticated_per_core_max: 10_000,
            unauthenticated_per_source_max: 256,
            handshakes_per_core_per_second_max: 2_000,
        }
    }
}

impl RelayLimits {
    /// Checks each bound against the codec's and against each other; names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, bool, String); 11] = [
            (
                "limits.devices_per_user_max",
                (1..=codec::limits::RECIPIENT_DEVICES_MAX)
                    .contains(&usize::from(self.devices_per_user_max)),
                format!("must be 1 to {}", codec::limits::RECIPIENT_DEVICES_MAX),
            ),
            (
                "limits.device_queue_depth_max",
                self.device_queue_depth_max >= 1,
                "must be at least 1".into(),
            ),
            (
                "limits.payload_bytes_max",
                (1..=codec::limits::PAYLOAD_BYTES_MAX).contains(&(self.payload_bytes_max as usize)),
                format!("must be 1 to {}", codec::limits::PAYLOAD_BYTES_MAX),
            ),
            (
                "limits.ttl_seconds_max",
                (1..=codec::limits::TTL_SECONDS_MAX).contains(&self.ttl_seconds_max),
                format!("must be 1 to {}", codec::limits::TTL_SECONDS_MAX),
            ),
            (
                "limits.device_deliveries_in_flight_max",
                self.device_deliveries_in_flight_max >= 1,
                "must be at least 1".into(),
            ),
            (
                "limits.frames_in_flight_max",
                self.frames_in_flight_max >= 1,
                "must be at least 1".into(),
            ),
            (
                "limits.connection_pending_bytes_max",
                self.connection_pending_bytes_max as usize >= codec::limits::FRAME_BYTES_MAX,
                format!(
                    "must hold at least one whole frame ({} bytes)",
                    codec::limits::FRAME_BYTES_MAX
                ),
            ),
            (
                "limits.shard_queued_bytes_max",
                self.shard_queued_bytes_max >= codec::limits::FRAME_BYTES_MAX as u64,
                format!(
                    "must hold at least one whole frame ({} bytes)",
                    codec::limits::FRAME_BYTES_MAX
                ),
            ),
            (
                "limits.log_segment_bytes_max",
                self.log_segment_bytes_max >= (codec::limits::FRAME_BYTES_MAX as u64) * 2,
                format!(
                    "must hold at least two whole frames ({} bytes)",
                    codec::limits::FRAME_BYTES_MAX * 2
                ),
            ),
            (
                "limits.shard_ram_bytes_max",
                self.shard_ram_bytes_max >= codec::limits::FRAME_BYTES_MAX as u64,
                format!(
                    "must hold at least one whole frame ({} bytes)",
                    codec::limits::FRAME_BYTES_MAX
                ),
            ),
            (
                "limits.cross_core_batch_max",
                self.cross_core_batch_max >= 1 && self.cross_core_inbox_batches_max >= 1,
                "cross_core_batch_max and cross_core_inbox_batches_max must be at least 1".into(),
            ),
        ];
        for (key, ok, why) in checks {
            if !ok {
                return Err(format!("{key}: {why}"));
            }
        }
        self.validate_caps()?;
        self.validate_data_port()
    }

    /// The caps per network and per shard.
    fn validate_caps(&self) -> Result<(), String> {
        if self.network_users_max == 0 || self.network_devices_max == 0 {
            return Err(
                "limits.network_users_max, limits.network_devices_max: must be at least 1".into(),
            );
        }
        if self.network_device_set_changes_per_s == 0 {
            return Err("limits.network_device_set_changes_per_s: must be at least 1".into());
        }
        if self.shard_users_max == 0 {
            return Err("limits.shard_users_max: must be at least 1".into());
        }
        if self.token_journal_pending_max == 0 {
            return Err("limits.token_journal_pending_max: must be at least 1".into());
        }
        Ok(())
    }

    /// The data port's deadlines and admission bounds.
    fn validate_data_port(&self) -> Result<(), String> {
        let hello_bytes = codec::limits::PREAMBLE_BYTES + codec::limits::HEADER_BYTES_MAX;
        let checks: [(&str, bool, String); 6] = [
            (
                "limits.tls_handshake_timeout_ms",
                self.tls_handshake_timeout_ms >= 1 && self.hello_timeout_ms >= 1,
                "tls_handshake_timeout_ms and hello_timeout_ms must be at least 1".into(),
            ),
            (
                "limits.idle_timeout_ms",
                self.idle_timeout_ms >= 2,
                "must be at least 2 (a keep-alive goes out after half of it)".into(),
            ),
            (
                "limits.write_timeout_ms",
                self.write_timeout_ms >= 1,
                "must be at least 1".into(),
            ),
            (
                "limits.preauth_bytes_max",
                self.preauth_bytes_max as usize >= hello_bytes,
                format!("must hold the largest Hello ({hello_bytes} bytes)"),
            ),
            (
                "limits.unauthenticated_per_core_max",
                (1..=self.connections_per_core_max).contains(&self.unauthenticated_per_core_max),
                "must be 1 to connections_per_core_max".into(),
            ),
            (
                "limits.unauthenticated_per_source_max",
                self.unauthenticated_per_source_max >= 1
                    && self.handshakes_per_core_per_second_max >= 1,
                "unauthenticated_per_source_max and handshakes_per_core_per_second_max must be at least 1".into(),
            ),
        ];
        for (key, ok, why) in checks {
            if !ok {
                return Err(format!("{key}: {why}"));
            }
        }
        Ok(())
    }
}
