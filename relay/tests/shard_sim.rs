//! Deterministic simulation of the shards: seeded schedules of devices connecting and
//! disconnecting (directly and through their network's server sessions), sending, resending
//! and acknowledging in random orders, with TTLs running out. After every run:
//!
//! - nothing the relay acknowledged is lost: every accepted message reaches every device of
//!   its recipient (or its TTL ran out);
//! - nothing is delivered again after the device acknowledged it, and a resent id is queued once;
//! - order per sender–recipient pair holds on every device;
//! - no queue grows past its bound.
//!
//! A failure prints `SEED=n`; `A7_SEED=n cargo test -p relay --test shard_sim` replays it.

// The simulation casts small random numbers and ids on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use codec::*;
use relay::core::shard::Shard;
use relay::core::shard::interface::{Routed, ShardInput, ShardOutput};
use relay::core::{ConnId, shard_of};
use relay::limits::RelayLimits;

use devkit::sim::SimRng as Rng;

const SHARDS: u16 = 3;
const USERS_PER_NETWORK: u32 = 6;

fn frame_for(
    id: MessageId,
    sender: DeviceAddress,
    recipient: UserAddress,
    ttl_seconds: u32,
) -> Bytes {
    let envelope = Envelope {
        message_id: id,
        sender,
        recipient,
        devices: DeviceSelection::All,
        content_type: ContentType::Text,
        e2e_protocol: E2eProtocol::Signal,
        timestamp_ms: 0,
        ttl_seconds,
        flags: 0,
    };
    encode_to_bytes(&envelope, &id.0.to_le_bytes()).unwrap()
}

fn message_of(frame: &Bytes) -> (MessageId, DeviceAddress) {
    match decode(frame).unwrap().header {
        HeaderRef::Envelope(e) => (e.message_id.get(), e.sender.get()),
        other => panic!("unexpected {:?}", other.kind()),
    }
}

struct World {
    now_ms: u64,
    limits: RelayLimits,
    shards: Vec<Shard>,
    users: Vec<(UserAddress, Vec<DeviceId>)>,
    /// Device → its live direct connection.
    online: HashMap<DeviceAddress, ConnId>,
    /// Network 2 is proxied: its live server connection, if any.
    server: Option<ConnId>,
    next_slot: u32,
    /// Per sender: the next message number.
    sent_count: HashMap<DeviceAddress, u128>,
    /// Messages the relay accepted: id → (recipient, expires_at_ms).
    accepted: HashMap<MessageId, (UserAddress, u64)>,
    /// Message ids the relay refused (queue full): never expected.
    refused: HashSet<MessageId>,
    /// Per device: ids it has acknowledged (released).
    acked: HashMap<DeviceAddress, HashSet<MessageId>>,
    /// Per device: deliveries received and not yet acknowledged, in order.
    inbox: HashMap<DeviceAddress, Vec<(ConnId, MessageId)>>,
    /// Per (device, sender): last message number seen, for the order check.
    last_from: HashMap<(DeviceAddress, DeviceAddress), u128>,
    /// Every message first seen by each device.
    received: HashMap<DeviceAddress, HashSet<MessageId>>,
}

impl World {
    fn conn(&mut self) -> ConnId {
        self.next_slot += 1;
        ConnId {
            core: 0,
            slot: self.next_slot,
            generation: 1,
        }
    }

    fn send_to_shard(&mut self, user: &UserAddress, input: ShardInput) -> Result<(), String> {
        let s = shard_of(user, SHARDS) as usize;
        self.shards[s].handle(self.now_ms, input);
        self.drain()
    }

    fn broadcast(&mut self, input: ShardInput) -> Result<(), String> {
        for s in 0..self.shards.len() {
            self.shards[s].handle(self.now_ms, input.clone());
        }
        self.drain()
    }

    fn live(&self, conn: ConnId, device: &DeviceAddress) -> bool {
        self.online.get(device) == Some(&conn)
            || (device.network == NetworkId(2)
                && self.server == Some(conn)
                && !self.online.contains_key(device))
    }

    fn drain(&mut self) -> Result<(), String> {
        for s in 0..self.shards.len() {
            while let Some(output) = self.shards[s].poll_output() {
                match output {
                    ShardOutput::Deliver {
                        conn,
                        device,
                        frame,
                        ephemeral,
                        ..
                    } => {
                        assert!(!ephemeral);
                        if !self.live(conn, &device) {
                            return Err(format!(
                                "delivery for {device} to a connection that is not its binding"
                            ));
                        }
                        let (id, sender) = message_of(&frame);
                        if self.acked.get(&device).is_some_and(|a| a.contains(&id)) {
                            return Err(format!(
                                "{id} delivered to {device} after it acknowledged it"
                            ));
                        }
                        if self.received.entry(device).or_default().insert(id) {
                            let n = id.0 & 0xFFFF_FFFF;
                            let last = self.last_from.entry((device, sender)).or_insert(0);
                            if n <= *last {
                                return Err(format!(
                                    "order broken on {device}: message {n} from {sender} after {last}"
                                ));
                            }
                            *last = n;
                        }
                        self.inbox.entry(device).or_default().push((conn, id));
                    }
                    ShardOutput::Ack { id, result, .. } => match result {
                        Ok(()) => {}
                        Err(refusal) => {
                            self.accepted.remove(&id);
                            self.refused.insert(id);
                            if refusal.code != ErrorCode::QueueFull {
                                return Err(format!("{id} refused with {}", refusal.code));
                            }
                        }
                    },
                    ShardOutput::Load { .. } => return Err("a load without a log".into()),
                    ShardOutput::Send { .. } => return Err("a notice nobody asked for".into()),
                    ShardOutput::Applied { .. } => return Err("no control change was asked".into()),
                    ShardOutput::Close { code, .. } => {
                        return Err(format!("a connection was closed with {code}"));
                    }
                }
            }
        }
        for shard in &self.shards {
            shard.audit()?;
            let bound = 2 * shard.stats().queued_frames as usize + 4096;
            if shard.expiry_entries() > bound {
                return Err(format!(
                    "expiry heap holds {} entries, bound {bound}",
                    shard.expiry_entries()
                ));
            }
            for (user, devices) in &self.users {
                for &d in devices {
                    let len = shard.queue_len(&user.device(d));
                    if len > self.limits.device_queue_depth_max as usize {
                        return Err(format!("queue of {} holds {len}", user.device(d)));
                    }
                }
            }
        }
        Ok(())
    }

    fn random_device(&self, rng: &mut Rng) -> DeviceAddress {
        let (user, devices) = &self.users[rng.below(self.users.len() as u64) as usize];
        user.device(devices[rng.below(devices.len() as u64) as usize])
    }

    fn step(&mut self, rng: &mut Rng) -> Result<(), String> {
        match rng.below(100) {
            0..=9 => {
                let device = self.random_device(rng);
                if let Some(conn) = self.online.remove(&device) {
                    self.inbox.remove(&device);
                    self.send_to_shard(
                        &device.user_address(),
                        ShardInput::DetachDevice { device, conn },
                    )?;
                } else {
                    let conn = self.conn();
                    self.online.insert(device, conn);
                    self.inbox.remove(&device);
                    self.send_to_shard(
                        &device.user_address(),
                        ShardInput::AttachDevice { device, conn },
                    )?;
                }
            }
            10..=12 => {
                // The proxy server of network 2 comes or goes; its devices' inboxes reset.
                if let Some(conn) = self.server.take() {
                    self.inbox
                        .retain(|d, _| d.network != NetworkId(2) || self.online.contains_key(d));
                    self.broadcast(ShardInput::DetachServer {
                        network: NetworkId(2),
                        conn,
                    })?;
                } else {
                    let conn = self.conn();
                    self.server = Some(conn);
                    self.broadcast(ShardInput::AttachServer {
                        network: NetworkId(2),
                        conn,
                    })?;
                }
            }
            13..=54 => {
                let sender = self.random_device(rng);
                let (recipient, _) = self.users[rng.below(self.users.len() as u64) as usize];
                let count = self.sent_count.entry(sender).or_insert(0);
                *count += 1;
                let n = *count;
                let id = MessageId(
                    (u128::from(sender.user.0 as u64) << 64)
                        | (u128::from(sender.device.0) << 32)
                        | n,
                );
                let ttl_seconds = if rng.chance(10) { 1 } else { 3600 };
                let frame = frame_for(id, sender, recipient, ttl_seconds);
                let expires = self.now_ms + u64::from(ttl_seconds) * 1000;
                self.accepted.insert(id, (recipient, expires));
                let routed = Routed {
                    sender,
                    recipient,
                    listed: None,
                    id,
                    ephemeral: false,
                    ttl_seconds,
                    frame,
                    reply_to: ConnId {
                        core: 9,
                        slot: 0,
                        generation: 0,
                    },
                };
                self.send_to_shard(&recipient, ShardInput::Envelope(routed.clone()))?;
                if rng.chance(10) && self.accepted.contains_key(&id) {
                    // A resend of the same id: acknowledged again, queued once.
                    self.send_to_shard(&recipient, ShardInput::Envelope(routed))?;
                }
            }
            55..=89 => {
                let device = self.random_device(rng);
                let pending = self.inbox.get(&device).map_or(0, Vec::len);
                if pending > 0 {
                    // Devices may acknowledge out of order.
                    let index = rng.below(pending as u64) as usize;
                    let (_, id) = self.inbox.get_mut(&device).unwrap().remove(index);
                    self.acked.entry(device).or_default().insert(id);
                    self.send_to_shard(
                        &device.user_address(),
                        ShardInput::DeviceAck { device, id },
                    )?;
                }
            }
            _ => {
                self.now_ms += rng.below(400);
                for s in 0..self.shards.len() {
                    self.shards[s].handle_timeout(self.now_ms);
                }
                self.drain()?;
            }
        }
        Ok(())
    }

    /// Every device comes online and acknowledges everything until nothing is left.
    fn settle(&mut self) -> Result<(), String> {
        let devices: Vec<DeviceAddress> = self
            .users
            .iter()
            .flat_map(|(u, ds)| ds.iter().map(|d| u.device(*d)))
            .collect();
        for device in &devices {
            if !self.online.contains_key(device) {
                let conn = self.conn();
                self.online.insert(*device, conn);
                self.inbox.remove(device);
                self.send_to_shard(
                    &device.user_address(),
                    ShardInput::AttachDevice {
                        device: *device,
                        conn,
                    },
                )?;
            }
        }
        for _ in 0..1_000_000 {
            let Some(device) = devices
                .iter()
                .find(|d| self.inbox.get(d).is_some_and(|i| !i.is_empty()))
                .copied()
            else {
                return Ok(());
            };
            let (_, id) = self.inbox.get_mut(&device).unwrap().remove(0);
            self.acked.entry(device).or_default().insert(id);
            self.send_to_shard(&device.user_address(), ShardInput::DeviceAck { device, id })?;
        }
        Err("did not settle".into())
    }
}

fn run(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let limits = RelayLimits {
        device_queue_depth_max: 40,
        device_deliveries_in_flight_max: 4,
        dedup_window_seconds: 3600,
        ..RelayLimits::default()
    };
    let mut world = World {
        now_ms: 1_000_000,
        limits,
        shards: (0..SHARDS).map(|_| Shard::new(limits)).collect(),
        users: Vec::new(),
        online: HashMap::new(),
        server: None,
        next_slot: 0,
        sent_count: HashMap::new(),
        accepted: HashMap::new(),
        refused: HashSet::new(),
        acked: HashMap::new(),
        inbox: HashMap::new(),
        last_from: HashMap::new(),
        received: HashMap::new(),
    };
    // Network 1's devices connect directly; network 2's are declared by its server.
    for network in [1, 2] {
        for u in 0..USERS_PER_NETWORK {
            let user = UserAddress::new(NetworkId(network), UserId(u128::from(network * 100 + u)));
            let devices: Vec<DeviceId> = (1..=1 + rng.below(3) as u32).map(DeviceId).collect();
            if network == 2 {
                let reply_to = world.conn();
                world.send_to_shard(
                    &user,
                    ShardInput::DeviceList {
                        request_id: MessageId(u128::from(u)),
                        user,
                        devices: devices.clone(),
                        reply_to,
                    },
                )?;
            } else {
                for &d in &devices {
                    let conn = world.conn();
                    world.send_to_shard(
                        &user,
                        ShardInput::AttachDevice {
                            device: user.device(d),
                            conn,
                        },
                    )?;
                    world.send_to_shard(
                        &user,
                        ShardInput::DetachDevice {
                            device: user.device(d),
                            conn,
                        },
                    )?;
                }
            }
            world.users.push((user, devices));
        }
    }
    let steps = 300 + rng.below(700);
    for _ in 0..steps {
        world.step(&mut rng)?;
    }
    world.settle()?;
    // Nothing acknowledged is lost: every accepted message reached every device of its
    // recipient, unless its TTL ran out first.
    for (id, (recipient, expires)) in &world.accepted {
        let devices = &world.users.iter().find(|(u, _)| u == recipient).unwrap().1;
        for &d in devices {
            let device = recipient.device(d);
            // Acknowledged by the device: a delivery lost with a dropped connection does not count.
            let got = world.acked.get(&device).is_some_and(|r| r.contains(id));
            if !got && *expires > world.now_ms {
                return Err(format!(
                    "{id}, accepted for {recipient}, never reached {device}"
                ));
            }
        }
    }
    for shard in &world.shards {
        if shard.stats().queued_frames != 0 {
            return Err(format!(
                "{} frames still queued after settling",
                shard.stats().queued_frames
            ));
        }
    }
    Ok(())
}

#[test]
fn seeded_schedules_keep_every_invariant() {
    devkit::sim::for_each_seed(200, run);
}
