//! One seeded world, in the manner of TigerBeetle's VOPR: the whole relay core — sessions
//! speaking real encoded frames, shards with their durable logs on simulated disks, two or
//! three cores exchanging bounded batches — with its clients, a clock, and faults, all chosen
//! by one seed.
//!
//! The world (see `support/`): a gatekeeper server and a partner server (certificate
//! sessions, up to two connections each) and partner devices (token sessions) send envelopes
//! and receipts, declare device sets, send signals, read what the relay writes (some late,
//! some in pieces) and acknowledge deliveries in any order. The relay is driven as its IO shell
//! drives it: reads, inbox turns, flushes, the committer (write, then fdatasync), the loader
//! and the timer, each a step the seed schedules. Faults the seed picks: failing writes and
//! syncs (the shard then refuses with `STORAGE_UNAVAILABLE` until a restart), crashes that
//! lose what was not synced and may tear the last record (every shard recovers from its disk;
//! sessions are gone; clients reconnect and resend what was not accepted, same ids),
//! connections that drop mid-stream, tiny inboxes, tiny batches, slow readers, late `Hello`s,
//! long pauses that fire TTLs and `Hello` deadlines.
//!
//! After every step every shard's `audit()` holds and the ledger (`support/ledger.rs`) has
//! seen no rule broken; at the end the faults are healed, everything drains, and every
//! accepted message has reached every device it was queued for.
//!
//! A failure prints `SEED=n`; `A7_SEED=n cargo test -p relay --test world_sim` replays it
//! exactly (`A7_TRACE=1` prints each step, `A7_TRACE=2` every shard input and output and every
//! log write too); `A7_SEEDS=10000 cargo test -p relay --test world_sim --release` runs more.
//! A run's simulated time (a minute or two) stays well inside the relay's dedup window.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::collections::BTreeMap;

use bytes::Bytes;
use codec::{
    ContentType, DeviceId, DeviceSelection, DeviceToken, E2eProtocol, Envelope, ErrorCode, Hello,
    Role, Signal, SignalKind, UserAddress, UserId, device_token_signed_bytes, encode_to_bytes,
};
use devkit::sim::{SimRng, for_each_seed};
use relay::core::shard_of;
use relay::limits::RelayLimits;
use relay::tables::auth::{Auth, NetworkEntry};
use ring::signature::{Ed25519KeyPair, KeyPair};

use support::clients::{Client, GATEKEEPER, GATEKEEPER_CERT, PARTNER, PARTNER_CERT, Who, encode};
use support::disk::DiskFaults;
use support::ledger::Counts;
use support::relay::{Relay, ShellCounts};

/// Seeds `cargo test` runs.
const DEFAULT_SEEDS: u64 = 200;
const START_MS: u64 = 1_800_000_000_000;
const GATEKEEPER_USERS: u32 = 2;
const PARTNER_USERS: u32 = 4;
/// Device sets the partner declares for its users over a run.
const DEVICE_SETS: [&[u32]; 4] = [&[1, 2], &[1, 2, 3], &[1, 3], &[2]];
/// The sessions' bound on frames awaiting the relay's answer (`frames_in_flight_max`); clients
/// keep to it on each connection, but now and then overshoot and are refused.
const FRAMES_IN_FLIGHT: u32 = 6;
/// Rounds the final drain may take (each 20 ms of the clock), and the relay's turns in each.
const SETTLE_ROUNDS: u32 = 3000;
const RELAY_TURNS_PER_ROUND: u32 = 4;

fn gatekeeper_user(n: u32) -> UserAddress {
    UserAddress::new(GATEKEEPER, UserId(0x100 + u128::from(n)))
}

fn partner_user(n: u32) -> UserAddress {
    UserAddress::new(PARTNER, UserId(0x200 + u128::from(n)))
}

/// A user of the partner's that has no devices: envelopes to it are refused.
fn stranger() -> UserAddress {
    partner_user(99)
}

/// What the seed chose: the world's shape and its faults.
#[derive(Debug, Clone, Copy)]
struct Plan {
    cores: u16,
    steps: u32,
    limits: RelayLimits,
    segment_bytes_max: u64,
    disk: DiskFaults,
    /// Per thousand steps: the relay crashes; a connection drops.
    crashes: u64,
    drops: u64,
    /// Percent of connections that read late, and that say `Hello` late.
    slow_readers: u64,
    late_hellos: u64,
}

impl Plan {
    fn of(rng: &mut SimRng) -> Plan {
        let pick =
            |rng: &mut SimRng, options: &[u64]| options[rng.below(options.len() as u64) as usize];
        let spill = rng.chance(40);
        let limits = RelayLimits {
            device_deliveries_in_flight_max: 1 + rng.below(4) as u32,
            frames_in_flight_max: FRAMES_IN_FLIGHT,
            device_queue_depth_max: 10 + rng.below(30) as u32,
            connection_pending_bytes_max: pick(rng, &[1024, 2048, 8192]) as u32,
            cross_core_batch_max: pick(rng, &[1, 2, 4, 1024]) as u32,
            cross_core_inbox_batches_max: pick(rng, &[1, 2, 8, 1024]) as u32,
            shard_ram_bytes_max: if spill {
                1024 + rng.below(4096)
            } else {
                1 << 30
            },
            ..RelayLimits::default()
        };
        let disk_faults = rng.chance(35);
        Plan {
            cores: 2 + rng.below(2) as u16,
            steps: 400 + rng.below(500) as u32,
            limits,
            segment_bytes_max: pick(rng, &[1024, 2048, 8192]),
            disk: DiskFaults {
                write_fails: if disk_faults { 1 + rng.below(4) } else { 0 },
                sync_fails: if disk_faults { 1 + rng.below(4) } else { 0 },
            },
            crashes: pick(rng, &[0, 3, 8]),
            drops: pick(rng, &[0, 10, 30]),
            slow_readers: pick(rng, &[0, 0, 30]),
            late_hellos: pick(rng, &[0, 5]),
        }
    }
}

struct World {
    plan: Plan,
    relay: Relay,
    clients: Vec<Client>,
    /// The partner's device-token key.
    token_key: Ed25519KeyPair,
    next_token: u128,
    step: u32,
    trace: bool,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = SimRng::new(seed);
        let plan = Plan::of(&mut rng);
        let token_key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a key");
        let public: [u8; 32] = token_key
            .public_key()
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let network = |id, name: &str, role, cert, key| NetworkEntry {
            id,
            name: name.into(),
            server_roles: vec![role],
            cert_sha256: vec![relay::pki::sha256(cert)],
            token_public_key: key,
            client_ca_der: Vec::new(),
        };
        let auth = Auth::new(
            vec![
                network(
                    GATEKEEPER,
                    "gatekeeper",
                    Role::GatekeeperServer,
                    GATEKEEPER_CERT,
                    None,
                ),
                network(
                    PARTNER,
                    "partner",
                    Role::PartnerServer,
                    PARTNER_CERT,
                    Some(public),
                ),
            ],
            1_000_000,
        )
        .expect("the networks");
        let relay = Relay::new(
            plan.limits,
            plan.segment_bytes_max,
            plan.cores,
            auth,
            rng,
            START_MS,
        );
        let mut clients = vec![Client::new(Who::Gatekeeper), Client::new(Who::Partner)];
        for user in 0..PARTNER_USERS {
            for device in [1, 3] {
                let address = partner_user(user).device(DeviceId(device));
                clients.push(Client::new(Who::Device(address)));
            }
        }
        World {
            plan,
            relay,
            clients,
            token_key,
            next_token: 1,
            step: 0,
            trace: std::env::var_os("A7_TRACE").is_some(),
        }
    }

    /// In `0..n`, from the seed.
    fn below(&mut self, n: u64) -> u64 {
        self.relay.rng.below(n)
    }

    /// True `percent` times in 100, from the seed.
    fn chance(&mut self, percent: u64) -> bool {
        self.relay.rng.chance(percent)
    }

    fn note(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!(
                "[{} +{}ms] {}",
                self.step,
                self.relay.now_ms - START_MS,
                what()
            );
        }
    }

    /// The relay is up and every device set is declared; then the seed's faults begin.
    fn bootstrap(&mut self) -> Result<(), String> {
        for user in 0..GATEKEEPER_USERS {
            let id = self.relay.ledger.next_id();
            self.clients[0].declare(id, gatekeeper_user(user), &[1]);
        }
        for user in 0..PARTNER_USERS {
            let id = self.relay.ledger.next_id();
            self.clients[1].declare(id, partner_user(user), DEVICE_SETS[0]);
        }
        self.settle(false)?;
        self.relay.set_disk_faults(self.plan.disk);
        Ok(())
    }

    fn hello(&mut self, who: Who) -> Bytes {
        let (role, token) = match who {
            Who::Gatekeeper => (Role::GatekeeperServer, None),
            Who::Partner => (Role::PartnerServer, None),
            Who::Device(device) => {
                let token_id = self.next_token;
                self.next_token += 1;
                let expires_at_ms = self.relay.now_ms + 3_600_000;
                let signed = device_token_signed_bytes(device, expires_at_ms, token_id);
                let signature = self
                    .token_key
                    .sign(&signed)
                    .as_ref()
                    .try_into()
                    .expect("64");
                let token = DeviceToken {
                    device,
                    expires_at_ms,
                    token_id,
                    signature,
                };
                (Role::Device, Some(token))
            }
        };
        encode(&Hello {
            version_min: 1,
            version_max: 1,
            role,
            features: 0,
            agent: "world".into(),
            token,
        })
    }

    fn connect(&mut self, client: usize, hello_now: bool, slow: bool) {
        let who = self.clients[client].who;
        let hello = self.hello(who);
        let core = self.below(u64::from(self.plan.cores)) as u16;
        self.note(|| format!("{who:?} connects to core {core} (slow: {slow})"));
        let World { relay, clients, .. } = self;
        clients[client].connect(relay, core, hello, hello_now, slow);
    }

    /// A client makes a new envelope, to be sent with the next sends.
    fn new_envelope(&mut self, client: usize) {
        let who = self.clients[client].who;
        let g = self.below(u64::from(GATEKEEPER_USERS)) as u32;
        let p = self.below(u64::from(PARTNER_USERS)) as u32;
        let (sender, recipient) = match who {
            Who::Gatekeeper => {
                let sender = gatekeeper_user(g).device(DeviceId(1));
                let recipient = match self.below(20) {
                    0 => stranger(),
                    1..=2 => gatekeeper_user((g + 1) % GATEKEEPER_USERS),
                    _ => partner_user(p),
                };
                (sender, recipient)
            }
            Who::Partner => {
                let device = 1 + self.below(2) as u32;
                (partner_user(p).device(DeviceId(device)), gatekeeper_user(g))
            }
            Who::Device(own) => {
                let recipient = if self.chance(70) {
                    gatekeeper_user(g)
                } else {
                    partner_user(p)
                };
                (own, recipient)
            }
        };
        let ttl_seconds = if self.chance(20) {
            2 + self.below(30) as u32
        } else {
            3600
        };
        // Now and then the sender lists the devices it encrypted for: the set the shard had
        // when last seen, which may change before the envelope gets there.
        let known = self.relay.ledger.devices_of(&recipient);
        let devices = if !known.is_empty() && self.chance(10) {
            DeviceSelection::Listed(known)
        } else {
            DeviceSelection::All
        };
        let id = self.relay.ledger.next_id();
        let envelope = Envelope {
            message_id: id,
            sender,
            recipient,
            devices,
            content_type: ContentType::Text,
            e2e_protocol: E2eProtocol::Signal,
            timestamp_ms: self.relay.now_ms,
            ttl_seconds,
            flags: 0,
        };
        let payload_len = 16 + self.below(200) as usize;
        let mut payload = id.0.to_le_bytes().to_vec();
        payload.resize(payload_len, 0xA7);
        let frame = encode_to_bytes(&envelope, &payload).expect("an envelope within limits");
        self.note(|| format!("{who:?}: {id} from {sender} to {recipient}, ttl {ttl_seconds}"));
        self.relay.ledger.sent(id, sender, recipient, ttl_seconds);
        self.clients[client].queue_routed(id, frame);
    }

    fn random_client(&mut self) -> usize {
        self.below(self.clients.len() as u64) as usize
    }

    fn max_conns(who: Who) -> usize {
        match who {
            Who::Gatekeeper | Who::Partner => 2,
            Who::Device(_) => 1,
        }
    }

    /// One step of the seed's schedule.
    fn step(&mut self) -> Result<(), String> {
        self.step += 1;
        let roll = self.below(1000);
        match roll {
            0..=399 => self.relay_turn(),
            400..=519 => {
                // Senders: mostly the gatekeeper; devices only while connected.
                let client = match self.below(10) {
                    0..=4 => 0,
                    5..=6 => 1,
                    _ => self.random_client(),
                };
                let connected = !self.clients[client].conns.is_empty();
                if client < 2 || connected {
                    self.new_envelope(client);
                }
            }
            520..=619 => {
                let client = self.random_client();
                let window = if self.chance(10) {
                    FRAMES_IN_FLIGHT as usize + 3
                } else {
                    FRAMES_IN_FLIGHT as usize
                };
                let World { relay, clients, .. } = self;
                clients[client].send(relay, window);
            }
            620..=779 => self.client_reads(),
            780..=859 => {
                let client = self.random_client();
                let count = 1 + self.below(4) as usize;
                let World { relay, clients, .. } = self;
                clients[client].ack(relay, count);
            }
            860..=909 => self.connections(),
            910..=959 => {
                let pause = if self.chance(5) {
                    5_000 + self.below(15_000)
                } else {
                    self.below(1_500)
                };
                self.relay.now_ms += pause;
                self.note(|| format!("{pause} ms pass"));
            }
            960..=969 => self.change_devices(),
            _ => self.signal(),
        }
        self.faults()?;
        self.check()
    }

    fn relay_turn(&mut self) {
        if !self.relay.is_up() {
            return;
        }
        let core = self.below(u64::from(self.plan.cores)) as u16;
        match self.below(20) {
            0..=7 => {
                let readable = self.relay.readable();
                if !readable.is_empty() {
                    let conn = readable[self.below(readable.len() as u64) as usize];
                    self.relay.read_turn(conn, false);
                }
            }
            8..=11 => self.relay.inbox_turn(core),
            12 => self.relay.flush_turn(core),
            13..=15 => self.relay.commit_turn(core),
            16 => self.relay.load_turn(core),
            _ => self.relay.timer_turn(core),
        }
    }

    fn client_reads(&mut self) {
        let client = self.random_client();
        let conns = self.clients[client].conns.len();
        if conns == 0 {
            return;
        }
        let index = self.below(conns as u64) as usize;
        if self.clients[client].conns[index].slow && !self.chance(3) {
            return;
        }
        let max = if self.chance(30) {
            1 + self.below(600) as usize
        } else {
            usize::MAX
        };
        let World { relay, clients, .. } = self;
        clients[client].read(relay, index, max);
    }

    /// Clients connect, say a late `Hello`, or leave.
    fn connections(&mut self) {
        let client = self.random_client();
        let who = self.clients[client].who;
        if self.clients[client].conns.len() < Self::max_conns(who) && self.relay.is_up() {
            let hello_now = !self.chance(self.plan.late_hellos);
            let slow = self.chance(self.plan.slow_readers);
            self.connect(client, hello_now, slow);
        } else if self.chance(30) {
            // The client goes away cleanly: what it wrote is read first.
            self.note(|| format!("{who:?} leaves"));
            let World { relay, clients, .. } = self;
            clients[client].drop_conn(relay, 0, true);
        } else {
            let World { relay, clients, .. } = self;
            clients[client].write_hellos(relay);
        }
    }

    /// The partner declares a new device set for one of its users (one change at a time).
    fn change_devices(&mut self) {
        if self.clients[1].declaring() {
            return;
        }
        let user = partner_user(self.below(u64::from(PARTNER_USERS)) as u32);
        let set = DEVICE_SETS[self.below(DEVICE_SETS.len() as u64) as usize];
        let id = self.relay.ledger.next_id();
        self.note(|| format!("the partner declares {user} has devices {set:?}"));
        self.clients[1].declare(id, user, set);
    }

    /// A connected device signals someone (never queued, never acknowledged).
    fn signal(&mut self) {
        let client = 2 + self.below(self.clients.len() as u64 - 2) as usize;
        let Who::Device(sender) = self.clients[client].who else {
            return;
        };
        let recipient = if self.chance(50) {
            gatekeeper_user(self.below(u64::from(GATEKEEPER_USERS)) as u32)
        } else {
            partner_user(self.below(u64::from(PARTNER_USERS)) as u32)
        };
        let signal = Signal {
            sender,
            recipient,
            kind: SignalKind::TypingStarted,
            timestamp_ms: self.relay.now_ms,
        };
        let frame = encode(&signal);
        let World { relay, clients, .. } = self;
        clients[client].send_once(relay, &frame);
    }

    /// The seed's faults for this step.
    fn faults(&mut self) -> Result<(), String> {
        if self.below(1000) < self.plan.drops {
            let client = self.random_client();
            let conns = self.clients[client].conns.len();
            if conns > 0 {
                let index = self.below(conns as u64) as usize;
                let relay_reads_first = self.chance(50);
                let who = self.clients[client].who;
                self.note(|| format!("a connection of {who:?} drops"));
                let World { relay, clients, .. } = self;
                clients[client].drop_conn(relay, index, relay_reads_first);
            }
        }
        let crash = self.below(1000) < self.plan.crashes;
        // After a storage failure the operator restarts the relay, sooner or later.
        let restart = self.relay.storage_failed() && self.chance(3);
        if crash || restart {
            self.crash_and_restart()?;
        }
        Ok(())
    }

    fn crash_and_restart(&mut self) -> Result<(), String> {
        self.note(|| "the relay crashes".into());
        self.relay.crash();
        for client in &mut self.clients {
            client.lose_all();
        }
        self.relay.now_ms += self.below(3_000);
        self.relay.restart()?;
        self.note(|| "the relay is back".into());
        self.check()
    }

    /// Every shard's invariants, and every rule the ledger follows.
    fn check(&mut self) -> Result<(), String> {
        self.relay.audit()?;
        match self.relay.ledger.take_violation() {
            Some(broken) => Err(broken),
            None => Ok(()),
        }
    }

    /// Heals every fault and runs until nothing moves: every client connected (reading
    /// everything at once), every frame answered, every delivery acknowledged, every log
    /// record stored. With `empty`, every queue must end empty too.
    fn settle(&mut self, empty: bool) -> Result<(), String> {
        self.relay.set_disk_faults(DiskFaults::default());
        if self.relay.storage_failed() {
            self.crash_and_restart()?;
        }
        for client in &mut self.clients {
            for conn in &mut client.conns {
                conn.slow = false;
            }
        }
        for round in 0..SETTLE_ROUNDS {
            for client in 0..self.clients.len() {
                let c = &self.clients[client];
                let server = matches!(c.who, Who::Gatekeeper | Who::Partner);
                if c.conns.is_empty() && (server || c.pending() > 0) {
                    self.connect(client, true, false);
                }
                let World { relay, clients, .. } = self;
                let c = &mut clients[client];
                c.write_hellos(relay);
                c.send(relay, FRAMES_IN_FLIGHT as usize);
                c.read_all(relay);
                c.ack(relay, usize::MAX);
            }
            // The relay turns faster than the clients retry; the cores take turns first.
            let cores = self.plan.cores;
            for turn in 0..RELAY_TURNS_PER_ROUND {
                let first = (round + turn) % u32::from(cores);
                let order = (0..cores).map(|c| (c + first as u16) % cores);
                for core in order.clone() {
                    self.relay.flush_turn(core);
                }
                for conn in self.relay.readable() {
                    self.relay.read_turn(conn, true);
                }
                for core in order {
                    self.relay.inbox_turn(core);
                    self.relay.flush_turn(core);
                    self.relay.commit_turn(core);
                    self.relay.load_turn(core);
                }
            }
            for core in 0..cores {
                self.relay.timer_turn(core);
            }
            self.relay.now_ms += 20;
            self.check()?;
            if self.quiet(empty).is_none() {
                return Ok(());
            }
        }
        Err(format!(
            "the world did not settle: {} (the relay's connections: {})",
            self.quiet(empty).unwrap_or_default(),
            self.relay.describe()
        ))
    }

    /// What still moves; `None` when nothing does.
    fn quiet(&self, empty: bool) -> Option<String> {
        for client in &self.clients {
            if client.pending() > 0 || client.has_unsent() {
                return Some(client.describe());
            }
        }
        if let Some(busy) = self.relay.busy() {
            return Some(busy);
        }
        if empty {
            for device in self.relay.ledger.devices() {
                let index = shard_of(&device.user_address(), self.plan.cores);
                let queued = self.relay.shard(index).map_or(0, |s| s.queue_len(&device));
                if queued > 0 {
                    return Some(format!("{device} still has {queued} frames queued"));
                }
            }
        }
        None
    }

    fn counts(&self) -> Counts {
        self.relay.ledger.counts
    }
}

fn run(seed: u64, totals: &mut Totals) -> Result<(), String> {
    let mut world = World::new(seed);
    world.note(|| format!("plan: {:?}", world.plan));
    world.bootstrap()?;
    for _ in 0..world.plan.steps {
        world.step()?;
    }
    world.step += 1;
    world.settle(true)?;
    let now_ms = world.relay.now_ms;
    world.relay.ledger.check_all_arrived(now_ms);
    world.check()?;
    let counts = world.counts();
    if counts.promised == 0 || counts.first_reads == 0 {
        return Err(format!("the world did nothing: {counts:?}"));
    }
    totals.add(&world);
    world.note(|| format!("done: {counts:?}"));
    Ok(())
}

/// What all seeds did, printed at the end (`--nocapture` shows it).
#[derive(Debug, Default)]
struct Totals {
    seeds: u64,
    counts: Counts,
    shell: ShellCounts,
    failed_writes: u64,
    failed_syncs: u64,
    /// Refusals clients read, by error code.
    refusals: BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, world: &World) {
        let c = world.relay.ledger.counts;
        let t = &mut self.counts;
        self.seeds += 1;
        t.queued += c.queued;
        t.promised += c.promised;
        t.confirmed += c.confirmed;
        t.duplicates += c.duplicates;
        t.refused_by_shard += c.refused_by_shard;
        t.delivered += c.delivered;
        t.first_reads += c.first_reads;
        t.releases += c.releases;
        t.crashes += c.crashes;
        t.forgotten += c.forgotten;
        let s = world.relay.seen;
        let u = &mut self.shell;
        u.torn_tails += s.torn_tails;
        u.slow_consumer_closes += s.slow_consumer_closes;
        u.hello_timeouts += s.hello_timeouts;
        u.inbox_full += s.inbox_full;
        u.loads += s.loads;
        for disk in &world.relay.disks {
            self.failed_writes += disk.failed_writes;
            self.failed_syncs += disk.failed_syncs;
        }
        for (&code, &n) in &world.relay.ledger.refusals {
            let name = ErrorCode::from_u16(code).map_or("?", ErrorCode::name);
            *self.refusals.entry(name.to_string()).or_default() += n;
        }
    }
}

#[test]
fn the_world_keeps_every_promise() {
    let mut totals = Totals::default();
    for_each_seed(DEFAULT_SEEDS, |seed| run(seed, &mut totals));
    eprintln!("world: {totals:?}");
}
