//! Deterministic simulation of sessions, routing and shards together, with every frame on
//! the wire encoded and decoded: device sessions authenticated by tokens connect and
//! disconnect, a partner server session comes and goes, a gatekeeper server session sends,
//! devices acknowledge in random orders, time passes. After every run: nothing the relay
//! acknowledged is lost, nothing is delivered again after its device acknowledged it, order
//! per sender–recipient pair holds, no session sees an error it did not cause.
//!
//! A failure prints `SEED=n`; `A7_SEED=n cargo test -p relay --test session_sim` replays it.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{HashMap, HashSet};

use bytes::BytesMut;
use codec::*;
use relay::core::ConnId;
use relay::core::session::{Session, SessionContext, SessionEvent};
use relay::core::shard::Shard;
use relay::core::shard::interface::ShardOutput;
use relay::limits::RelayLimits;
use relay::tables::auth::{Auth, NetworkEntry};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

const SHARDS: u16 = 2;
const USERS: u32 = 5;
const GATEKEEPER_CERT: &[u8] = b"gatekeeper server certificate";
const PARTNER_CERT: &[u8] = b"partner server certificate";

use devkit::sim::SimRng as Rng;

/// One connection: the relay's session and what the client has read from it.
struct Conn {
    session: Session,
    /// Bytes the relay wrote to this connection, not yet read by the client.
    out: BytesMut,
    cert: Option<&'static [u8]>,
    open: bool,
}

struct World {
    now_ms: u64,
    limits: RelayLimits,
    auth: Auth,
    /// The interop rules are the control plane's subject (tests/control_*.rs); here off.
    policy: relay::tables::policy::Policy,
    key: Ed25519KeyPair,
    shards: Vec<Shard>,
    conns: HashMap<ConnId, Conn>,
    next_slot: u32,
    next_token: u128,
    gatekeeper: ConnId,
    partner_server: Option<ConnId>,
    devices: HashMap<DeviceAddress, ConnId>,
    next_message: u64,
    /// Message number → recipient user, for every envelope sent.
    sent_to: HashMap<u64, u32>,
    accepted: HashSet<u64>,
    /// Deliveries read by the client of each device and not yet acknowledged: (conn, n, id).
    inbox: HashMap<DeviceAddress, Vec<(ConnId, u64, MessageId)>>,
    acked: HashMap<DeviceAddress, HashSet<u64>>,
    first_seen: HashMap<DeviceAddress, Vec<u64>>,
}

fn partner_user(u: u32) -> UserAddress {
    UserAddress::new(NetworkId(2), UserId(0x200 + u128::from(u)))
}

fn all_devices() -> Vec<DeviceAddress> {
    (0..USERS)
        .flat_map(|u| [1, 2].map(|d| partner_user(u).device(DeviceId(d))))
        .collect()
}

impl World {
    fn new() -> World {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
        let auth = Auth::new(
            vec![
                NetworkEntry {
                    id: NetworkId(1),
                    name: "gatekeeper".into(),
                    server_roles: vec![Role::GatekeeperServer],
                    cert_sha256: vec![relay::pki::sha256(GATEKEEPER_CERT)],
                    token_public_key: None,
                    client_ca_der: Vec::new(),
                },
                NetworkEntry {
                    id: NetworkId(2),
                    name: "partner".into(),
                    server_roles: vec![Role::PartnerServer],
                    cert_sha256: vec![relay::pki::sha256(PARTNER_CERT)],
                    token_public_key: Some(public),
                    client_ca_der: Vec::new(),
                },
            ],
            100_000,
        )
        .unwrap();
        let limits = RelayLimits {
            device_deliveries_in_flight_max: 3,
            ..RelayLimits::default()
        };
        let gatekeeper = ConnId {
            core: 0,
            slot: 0,
            generation: 1,
        };
        World {
            now_ms: 1_800_000_000_000,
            limits,
            auth,
            policy: relay::tables::policy::Policy::new(false),
            key,
            shards: (0..SHARDS).map(|_| Shard::new(limits)).collect(),
            conns: HashMap::new(),
            next_slot: 1,
            next_token: 1,
            gatekeeper,
            partner_server: None,
            devices: HashMap::new(),
            next_message: 1,
            sent_to: HashMap::new(),
            accepted: HashSet::new(),
            inbox: HashMap::new(),
            acked: HashMap::new(),
            first_seen: HashMap::new(),
        }
    }

    fn open(
        &mut self,
        id: ConnId,
        cert: Option<&'static [u8]>,
        hello: Hello,
    ) -> Result<(), String> {
        self.conns.insert(
            id,
            Conn {
                session: Session::new(id, u64::from(id.slot), self.now_ms),
                out: BytesMut::new(),
                cert,
                open: true,
            },
        );
        self.send(id, &hello, &[])?;
        Ok(())
    }

    fn new_conn_id(&mut self) -> ConnId {
        self.next_slot += 1;
        ConnId {
            core: (self.next_slot % 2) as u16,
            slot: self.next_slot,
            generation: 1,
        }
    }

    /// A client writes one frame on `conn`; the relay handles it and everything it causes.
    fn send<H: Encode>(&mut self, conn: ConnId, header: &H, payload: &[u8]) -> Result<(), String> {
        let frame = Frame::from_bytes(encode_to_bytes(header, payload).unwrap()).unwrap();
        let mut events = Vec::new();
        {
            let c = self.conns.get_mut(&conn).ok_or("no such connection")?;
            let cx = SessionContext {
                now_ms: self.now_ms,
                auth: &self.auth,
                policy: &self.policy,
                peer_cert: c.cert,
                limits: &self.limits,
                shards: SHARDS,
            };
            c.session.handle_frame(&cx, &frame);
            c.session.poll_transmit(&mut c.out);
            while let Some(event) = c.session.poll_event() {
                events.push(event);
            }
        }
        self.dispatch(conn, events)
    }

    fn dispatch(&mut self, conn: ConnId, events: Vec<SessionEvent>) -> Result<(), String> {
        for event in events {
            match event {
                SessionEvent::Route { shard, input } => {
                    self.shards[usize::from(shard)].handle(self.now_ms, input)
                }
                SessionEvent::Broadcast(input) => {
                    for shard in &mut self.shards {
                        shard.handle(self.now_ms, input.clone());
                    }
                }
                SessionEvent::PolicyChecked { .. } | SessionEvent::KeepAliveSent => {}
                SessionEvent::DeadlinePassed(deadline) => {
                    return Err(format!("{conn:?} passed its {deadline:?} deadline"));
                }
                SessionEvent::Contact(contact) => self.policy.record_contact(contact),
                SessionEvent::Refused(code) => return Err(format!("{conn:?} was refused: {code}")),
                SessionEvent::Close => return Err(format!("{conn:?} was closed")),
            }
        }
        self.drain_shards()
    }

    fn drain_shards(&mut self) -> Result<(), String> {
        for s in 0..self.shards.len() {
            while let Some(output) = self.shards[s].poll_output() {
                let target = match &output {
                    ShardOutput::Deliver { conn, .. }
                    | ShardOutput::Ack { conn, .. }
                    | ShardOutput::Close { conn, .. } => *conn,
                    ShardOutput::Load { .. } => return Err("a load without a log".into()),
                    ShardOutput::Send { .. } => return Err("a notice nobody asked for".into()),
                    ShardOutput::Applied { .. } => return Err("no control change was asked".into()),
                };
                let Some(c) = self.conns.get_mut(&target).filter(|c| c.open) else {
                    continue;
                };
                match output {
                    ShardOutput::Deliver {
                        device,
                        seq,
                        ephemeral,
                        frame,
                        ..
                    } => {
                        let flags = if ephemeral {
                            delivery_flags::EPHEMERAL
                        } else {
                            0
                        };
                        encode_head(&mut c.out, &Delivery { device, seq, flags }, frame.len())
                            .unwrap();
                        c.out.extend_from_slice(&frame);
                    }
                    ShardOutput::Ack {
                        of,
                        id,
                        address,
                        result,
                        ..
                    } => {
                        c.session.handle_relay_ack(of, id, address, result);
                        c.session.poll_transmit(&mut c.out);
                    }
                    ShardOutput::Load { .. }
                    | ShardOutput::Send { .. }
                    | ShardOutput::Applied { .. } => {
                        return Err("unexpected shard output".into());
                    }
                    ShardOutput::Close { code, .. } => {
                        c.session.handle_relay_close(code);
                        c.session.poll_transmit(&mut c.out);
                        return Err(format!("{target:?} closed by the relay: {code}"));
                    }
                }
            }
        }
        for shard in &self.shards {
            shard.audit()?;
        }
        self.read_all()
    }

    /// Every client reads what the relay wrote to it.
    fn read_all(&mut self) -> Result<(), String> {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let bytes = {
                let c = self.conns.get_mut(&id).unwrap();
                c.out.split().freeze()
            };
            let mut decoder = FrameDecoder::with_capacity(0);
            decoder.extend_from_slice(&bytes);
            while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
                let view = frame.decode().map_err(|e| e.to_string())?;
                match view.header {
                    HeaderRef::Welcome(_) => {}
                    HeaderRef::Ack(ack) => {
                        let n = (ack.message_id.get().0 & 0xFFFF_FFFF) as u64;
                        match &ack.status {
                            rkyv::Archived::<AckStatus>::Accepted => {
                                if ack.address.get().network == NetworkId(1) {
                                    self.accepted.insert(n);
                                }
                            }
                            rkyv::Archived::<AckStatus>::Rejected { code, .. } => {
                                return Err(format!(
                                    "{id:?}: message {n} rejected with {}",
                                    code.to_native()
                                ));
                            }
                        }
                    }
                    HeaderRef::Delivery(d) => {
                        let device = d.device.get();
                        let inner = view
                            .delivery_inner()
                            .map_err(|e| e.to_string())?
                            .ok_or("empty delivery")?;
                        let HeaderRef::Envelope(e) = inner.header else {
                            return Err("not an envelope".into());
                        };
                        let message = e.message_id.get();
                        let n = (message.0 & 0xFFFF_FFFF) as u64;
                        if self.acked.get(&device).is_some_and(|a| a.contains(&n)) {
                            return Err(format!(
                                "message {n} delivered to {device} after it acknowledged it"
                            ));
                        }
                        let seen = self.first_seen.entry(device).or_default();
                        if !seen.contains(&n) {
                            if seen.last().is_some_and(|&last| last > n) {
                                return Err(format!(
                                    "order broken on {device}: {n} after {seen:?}"
                                ));
                            }
                            seen.push(n);
                        }
                        self.inbox.entry(device).or_default().push((id, n, message));
                    }
                    HeaderRef::Error(e) => {
                        return Err(format!(
                            "{id:?} got error {}: {}",
                            e.code.to_native(),
                            e.reason.as_str()
                        ));
                    }
                    other => return Err(format!("{id:?} got an unexpected {:?}", other.kind())),
                }
            }
        }
        Ok(())
    }

    fn connect_device(&mut self, device: DeviceAddress) -> Result<(), String> {
        let token_id = self.next_token;
        self.next_token += 1;
        let expires_at_ms = self.now_ms + 3_600_000;
        let signed = device_token_signed_bytes(device, expires_at_ms, token_id);
        let signature: [u8; 64] = self.key.sign(&signed).as_ref().try_into().unwrap();
        let token = DeviceToken {
            device,
            expires_at_ms,
            token_id,
            signature,
        };
        let hello = Hello {
            version_min: 1,
            version_max: 1,
            role: Role::Device,
            features: 0,
            agent: "sim".into(),
            token: Some(token),
        };
        let id = self.new_conn_id();
        self.devices.insert(device, id);
        self.inbox.remove(&device);
        self.open(id, None, hello)
    }

    fn close(&mut self, id: ConnId) -> Result<(), String> {
        let mut events = Vec::new();
        if let Some(c) = self.conns.get_mut(&id) {
            c.session.handle_close(SHARDS);
            while let Some(event) = c.session.poll_event() {
                events.push(event);
            }
            c.open = false;
        }
        self.dispatch(id, events)?;
        self.conns.remove(&id);
        // What a closed connection had not acknowledged is gone with it.
        for pending in self.inbox.values_mut() {
            pending.retain(|(conn, _, _)| *conn != id);
        }
        Ok(())
    }

    fn server_hello(role: Role) -> Hello {
        Hello {
            version_min: 1,
            version_max: 1,
            role,
            features: 0,
            agent: "sim".into(),
            token: None,
        }
    }

    fn step(&mut self, rng: &mut Rng) -> Result<(), String> {
        let devices = all_devices();
        match rng.below(100) {
            0..=11 => {
                let device = devices[rng.below(devices.len() as u64) as usize];
                match self.devices.remove(&device) {
                    Some(conn) => self.close(conn)?,
                    None => self.connect_device(device)?,
                }
            }
            12..=14 => match self.partner_server.take() {
                Some(conn) => self.close(conn)?,
                None => {
                    let id = self.new_conn_id();
                    self.partner_server = Some(id);
                    self.open(
                        id,
                        Some(PARTNER_CERT),
                        Self::server_hello(Role::PartnerServer),
                    )?;
                }
            },
            15..=54 => {
                let n = self.next_message;
                self.next_message += 1;
                let u = rng.below(u64::from(USERS)) as u32;
                self.sent_to.insert(n, u);
                let envelope = Envelope {
                    message_id: MessageId(u128::from(n) | (7 << 64)),
                    sender: DeviceAddress::new(NetworkId(1), UserId(1), DeviceId(1)),
                    recipient: partner_user(u),
                    devices: DeviceSelection::All,
                    content_type: ContentType::Text,
                    e2e_protocol: E2eProtocol::Signal,
                    timestamp_ms: self.now_ms,
                    ttl_seconds: 3600,
                    flags: 0,
                };
                self.send(self.gatekeeper, &envelope, &n.to_le_bytes())?;
            }
            55..=94 => {
                let device = devices[rng.below(devices.len() as u64) as usize];
                let pending = self.inbox.get(&device).map_or(0, Vec::len);
                if pending > 0 {
                    let index = rng.below(pending as u64) as usize;
                    let (conn, n, id) = self.inbox.get_mut(&device).unwrap().remove(index);
                    self.acked.entry(device).or_default().insert(n);
                    let ack = Ack {
                        message_id: id,
                        address: device,
                        status: AckStatus::Accepted,
                    };
                    self.send(conn, &ack, &[])?;
                }
            }
            _ => {
                self.now_ms += rng.below(500);
                for shard in &mut self.shards {
                    shard.handle_timeout(self.now_ms);
                }
                self.drain_shards()?;
            }
        }
        Ok(())
    }

    fn settle(&mut self) -> Result<(), String> {
        for device in all_devices() {
            if !self.devices.contains_key(&device) {
                self.connect_device(device)?;
            }
        }
        for _ in 0..100_000 {
            let Some(device) = all_devices()
                .into_iter()
                .find(|d| self.inbox.get(d).is_some_and(|i| !i.is_empty()))
            else {
                return Ok(());
            };
            let (conn, n, id) = self.inbox.get_mut(&device).unwrap().remove(0);
            self.acked.entry(device).or_default().insert(n);
            self.send(
                conn,
                &Ack {
                    message_id: id,
                    address: device,
                    status: AckStatus::Accepted,
                },
                &[],
            )?;
        }
        Err("did not settle".into())
    }
}

fn run(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut w = World::new();
    w.open(
        w.gatekeeper,
        Some(GATEKEEPER_CERT),
        World::server_hello(Role::GatekeeperServer),
    )?;
    // The partner's server declares its users' devices once, then leaves.
    let declarer = w.new_conn_id();
    w.open(
        declarer,
        Some(PARTNER_CERT),
        World::server_hello(Role::PartnerServer),
    )?;
    for u in 0..USERS {
        let list = DeviceList {
            request_id: MessageId(u128::from(u) | (9 << 64)),
            user: partner_user(u),
            devices: vec![DeviceId(1), DeviceId(2)],
        };
        w.send(declarer, &list, &[])?;
    }
    w.close(declarer)?;
    for _ in 0..(200 + rng.below(400)) {
        w.step(&mut rng)?;
    }
    w.settle()?;
    for &n in &w.accepted {
        let user = partner_user(w.sent_to[&n]);
        for device in [1, 2].map(|d| user.device(DeviceId(d))) {
            if !w.acked.get(&device).is_some_and(|a| a.contains(&n)) {
                return Err(format!(
                    "message {n} was acknowledged by the relay and never reached {device}"
                ));
            }
        }
    }
    if w.accepted.is_empty() {
        return Err("nothing was accepted".into());
    }
    Ok(())
}

#[test]
fn seeded_sessions_keep_every_invariant() {
    devkit::sim::for_each_seed(60, run);
}
