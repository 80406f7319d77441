//! One shard: the users hashed to it, their devices, each device's queue and where it is
//! connected. A sans-IO state machine: [`Shard::handle`] and [`Shard::handle_timeout`] take
//! inputs with the time; [`Shard::poll_output`] hands out deliveries, acks and log reads.
//!
//! This file is the public surface; the work lives in one module per job, in the manner of
//! quinn-proto's `Connection`: `directory` (who is connected where, device sets, notices),
//! `delivery` (enqueue, release, the delivery window, expiry), `durable` (the log's
//! bookkeeping, spill and load, compaction), `recovery` (rebuilding from the log) and
//! `invariants` (what must hold after every turn).
//!
//! Delivery model: each device is *bound* to at most one connection (its own device session,
//! or else one server session of its network, chosen by hash so its order holds). The first
//! `device_deliveries_in_flight_max` frames of its queue are written to that connection; an
//! `Ack` from the device releases a frame and lets the next one go. When the binding changes,
//! unacknowledged frames are written again from the front, so nothing acknowledged by the
//! relay is lost and order per device is kept.
//!
//! The outputs depend on the inputs alone: where the shard walks many users or devices it does
//! so in address order, never in a hash map's, so a seeded simulation replays exactly.

mod caps;
mod delivery;
mod directory;
mod durable;
pub mod interface;
mod invariants;
pub mod recovery;
mod state;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use codec::{DeviceAddress, DeviceId, MessageId, UserAddress};

use self::interface::{AckOf, ShardInput, ShardOutput, ShardStats};
use self::state::Directory;
use super::DeviceSet;
use super::dedup::Dedup;
use super::log::ShardLog;
use crate::limits::RelayLimits;
use crate::tables::caps::{CapDefaults, NetworkCaps};

/// A queued frame's TTL: (expires at, user, device, seq). Entries of frames released since
/// are dropped lazily.
type ExpiryEntry = Reverse<(u64, UserAddress, DeviceId, u64)>;

#[derive(Debug)]
pub struct Shard {
    limits: RelayLimits,
    dir: Directory,
    dedup: Dedup,
    expiry: BinaryHeap<ExpiryEntry>,
    out: VecDeque<ShardOutput>,
    stats: ShardStats,
    /// The durable log; `None` at the `memory` durability level.
    log: Option<ShardLog>,
    /// Outputs held until the log has stored everything appended before them: (log position,
    /// output). Acks and control answers wait here.
    awaiting: VecDeque<(u64, ShardOutput)>,
    /// A segment whose spilled frames are being read back so it can be rewritten: they must
    /// not be spilled again meanwhile.
    reloading: Option<u64>,
    /// Lists kept between calls for walks in address order (compaction, spilling).
    scratch: Scratch,
    /// The caps per network its users charge: the relay's, shared by every shard once
    /// [`Shard::share_caps`] ran; until then (and in tests) the shard's own.
    caps: Arc<NetworkCaps>,
}

#[derive(Debug, Default)]
struct Scratch {
    users: Vec<UserAddress>,
    devices: Vec<DeviceAddress>,
}

impl Shard {
    pub fn new(limits: RelayLimits) -> Shard {
        let window_ms = u64::from(limits.dedup_window_seconds) * 1000;
        Shard {
            limits,
            dir: Directory::default(),
            dedup: Dedup::new(window_ms, limits.dedup_entries_max.max(1) as usize),
            expiry: BinaryHeap::new(),
            out: VecDeque::new(),
            stats: ShardStats::default(),
            log: None,
            awaiting: VecDeque::new(),
            reloading: None,
            scratch: Scratch::default(),
            caps: Arc::new(NetworkCaps::new(CapDefaults::of(&limits))),
        }
    }

    /// A shard that records everything in `log` and acknowledges only what it stored.
    pub fn with_log(limits: RelayLimits, log: ShardLog) -> Shard {
        Shard {
            log: Some(log),
            ..Shard::new(limits)
        }
    }

    pub fn handle(&mut self, now_ms: u64, input: ShardInput) {
        match input {
            ShardInput::Envelope(routed) | ShardInput::Receipt(routed) => {
                self.enqueue(now_ms, routed)
            }
            ShardInput::Signal { recipient, frame } => self.signal(recipient, frame),
            ShardInput::DeviceAck { device, id } => self.release(device, id),
            ShardInput::DeviceList {
                request_id,
                user,
                devices,
                reply_to,
            } => {
                let result = self.set_devices(now_ms, user, &devices);
                let ack = ShardOutput::Ack {
                    conn: reply_to,
                    of: AckOf::DeviceList,
                    id: request_id,
                    address: user.device(DeviceId(0)),
                    result,
                };
                self.emit_when_stored(ack);
            }
            ShardInput::AttachDevice { device, conn } => self.attach_device(now_ms, device, conn),
            ShardInput::DetachDevice { device, conn } => self.detach_device(device, conn),
            ShardInput::AttachServer { network, conn } => self.attach_server(network, conn),
            ShardInput::DetachServer { network, conn } => self.detach_server(network, conn),
            ShardInput::Control { ticket, change } => {
                let result = self.apply_control(now_ms, change);
                self.emit_when_stored(ShardOutput::Applied { ticket, result });
            }
        }
    }

    /// Removes every queued frame whose TTL ran out by `now_ms`, and does the log's
    /// housekeeping (compaction, spill, dead segments).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.dedup.forget_expired(now_ms);
        self.expire(now_ms);
        self.housekeep_log(now_ms);
    }

    pub fn poll_output(&mut self) -> Option<ShardOutput> {
        self.out.pop_front()
    }

    /// The next time [`Shard::handle_timeout`] has work (a TTL running out).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.expiry.peek().map(|Reverse((at, ..))| *at)
    }

    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    pub fn log(&self) -> Option<&ShardLog> {
        self.log.as_ref()
    }

    /// The device set of a user, as the shard knows it.
    pub fn devices_of(&self, user: &UserAddress) -> DeviceSet {
        self.dir
            .users
            .get(user)
            .map(state::UserState::device_set)
            .unwrap_or_default()
    }

    /// (seq, id, frame) of every frame queued for a device, in order; a spilled frame's bytes
    /// are empty (for tests and tools).
    pub fn queued(&self, device: &DeviceAddress) -> Vec<(u64, MessageId, Bytes)> {
        self.dir.device(device).map_or_else(Vec::new, |d| {
            d.queue
                .iter()
                .map(|q| (q.seq, q.id, q.frame.clone().unwrap_or_default()))
                .collect()
        })
    }

    /// Frames queued for a device (delivered or not, until acknowledged).
    pub fn queue_len(&self, device: &DeviceAddress) -> usize {
        self.dir.device(device).map_or(0, |d| d.queue.len())
    }

    /// Entries in the expiry heap (live and stale), for the bound checks of the tests.
    pub fn expiry_entries(&self) -> usize {
        self.expiry.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use codec::{DeviceId, MessageId, NetworkId, UserAddress, UserId};

    use super::Shard;
    use super::interface::{Routed, ShardInput};
    use crate::core::ConnId;
    use crate::core::log::ShardLog;
    use crate::limits::RelayLimits;

    /// A device removed and added back starts its queue at seq 1 again: the TTLs of what its
    /// earlier self had queued must not expire the new frames that reuse those seqs.
    #[test]
    fn a_device_added_back_keeps_its_frames_until_their_own_ttl_runs_out() {
        let mut shard = Shard::new(RelayLimits::default());
        let user = UserAddress::new(NetworkId(2), UserId(7));
        let sender = UserAddress::new(NetworkId(1), UserId(1)).device(DeviceId(1));
        let conn = ConnId {
            core: 0,
            slot: 1,
            generation: 1,
        };
        let declare = |shard: &mut Shard, now: u64, devices: Vec<DeviceId>| {
            let list = ShardInput::DeviceList {
                request_id: MessageId(0),
                user,
                devices,
                reply_to: conn,
            };
            shard.handle(now, list);
        };
        let send = |shard: &mut Shard, now: u64, id: u128, ttl_seconds: u32| {
            let routed = Routed {
                sender,
                recipient: user,
                listed: None,
                id: MessageId(id),
                ephemeral: false,
                ttl_seconds,
                frame: Bytes::from_static(b"frame"),
                reply_to: conn,
            };
            shard.handle(now, ShardInput::Envelope(routed));
        };
        declare(&mut shard, 0, vec![DeviceId(1), DeviceId(2)]);
        send(&mut shard, 0, 1, 5);
        declare(&mut shard, 1, vec![DeviceId(1)]);
        declare(&mut shard, 2, vec![DeviceId(1), DeviceId(2)]);
        send(&mut shard, 3, 2, 3600);
        let second = user.device(DeviceId(2));
        assert_eq!(shard.queued(&second)[0].0, 1, "the seq is given again");
        shard.handle_timeout(6_000);
        let ids: Vec<MessageId> = shard.queued(&second).iter().map(|q| q.1).collect();
        assert_eq!(ids, [MessageId(2)], "only the first frame's TTL ran out");
        assert_eq!(shard.queue_len(&user.device(DeviceId(1))), 1);
        assert_eq!(shard.stats().expired, 1);
        shard.audit().expect("the shard's invariants");
    }

    /// Two shards fed the same inputs give the same outputs in the same order, log bytes
    /// included: no hash map's order leaks out (each map has its own random seed), so a seeded
    /// simulation replays exactly. Rebinding a network's users, spilling frames over the memory
    /// budget and compaction each walk many users.
    #[test]
    fn the_same_inputs_give_the_same_outputs() {
        fn run() -> Vec<String> {
            let limits = RelayLimits {
                shard_ram_bytes_max: 2048,
                ..RelayLimits::default()
            };
            let mut shard = Shard::with_log(limits, ShardLog::new(1, 4096));
            let server = |slot| ConnId {
                core: 0,
                slot,
                generation: 1,
            };
            let mut seen = Vec::new();
            let commit = |shard: &mut Shard, seen: &mut Vec<String>| {
                while let Some(write) = shard.take_log_write() {
                    seen.push(format!("{:?}", write.chunks));
                    shard.on_log_committed(write.lsn);
                }
                seen.push(format!("{:?}", shard.take_log_deletions()));
                while let Some(output) = shard.poll_output() {
                    seen.push(format!("{output:?}"));
                }
            };
            let users: Vec<UserAddress> = (0..64u32)
                .map(|u| UserAddress::new(NetworkId(2), UserId(u128::from(u) * 7919)))
                .collect();
            for (n, &user) in users.iter().enumerate() {
                shard.handle(
                    0,
                    ShardInput::DeviceList {
                        request_id: MessageId(n as u128),
                        user,
                        devices: vec![DeviceId(1), DeviceId(2)],
                        reply_to: server(1),
                    },
                );
                let sender = UserAddress::new(NetworkId(1), UserId(1)).device(DeviceId(1));
                let routed = Routed {
                    sender,
                    recipient: user,
                    listed: None,
                    id: MessageId(1000 + n as u128),
                    ephemeral: false,
                    ttl_seconds: 3600,
                    frame: Bytes::from(vec![u8::try_from(n).unwrap_or(0); 100]),
                    reply_to: server(1),
                };
                shard.handle(1, ShardInput::Envelope(routed));
                commit(&mut shard, &mut seen);
            }
            shard.handle(
                2,
                ShardInput::AttachServer {
                    network: NetworkId(2),
                    conn: server(2),
                },
            );
            commit(&mut shard, &mut seen);
            for (n, &user) in users.iter().enumerate().take(48) {
                for device in [1, 2] {
                    let id = MessageId(1000 + n as u128);
                    shard.handle(
                        3,
                        ShardInput::DeviceAck {
                            device: user.device(DeviceId(device)),
                            id,
                        },
                    );
                }
            }
            for now in 4..8 {
                shard.handle_timeout(now);
                commit(&mut shard, &mut seen);
            }
            seen
        }
        assert_eq!(run(), run());
    }
}
