//! The peer comparison: the same population and traffic against an MQTT broker (Mosquitto),
//! the kind of broker an operator might put at an interconnection point instead of the relay.
//!
//! Mapping: one topic per device (`a7/<network>/<user>/<device>`), QoS 1 and persistent
//! sessions (`clean session` off), which is MQTT's acknowledged, queued delivery. A proxy
//! network's server connections subscribe to its devices' topics (each device to one
//! connection, by hash, as the relay binds them); a direct network's devices each hold a
//! connection subscribed to their own topic; offline devices subscribe, leave and come back
//! to the messages their session queued. MQTT has no users, so the sender publishes an
//! envelope once per device of the recipient, and a receipt once per device of the original
//! sender; "accepted" means every PUBACK came back. Typing signals are QoS 0.
//!
//! [`packet`] is a minimal MQTT 3.1.1 packet codec (sans-IO, unit-tested); the rest is the IO.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use codec::{DeviceAddress, DeviceId, MessageId, NetworkId, UserAddress, UserId};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::JoinSet;

use crate::cli::RunArgs;
use crate::ledger::AckOutcome;
use crate::parity::ParityConfig;
use crate::payload::{HEADER_BYTES, PAYLOAD_BYTES_MAX, PayloadHeader};
use crate::phase::{Batch, Cmd, ConnTx, Ctx, Inbox, PhaseResult, PhaseSlot, PhaseSpec};
use crate::population::Architecture;
use crate::scenario::{Outcome, scenario};
use crate::sessions::{Connector, Sessions, Tasks, server_session_of};
use crate::target::Target;

/// Payload tags besides the envelope's `A7LG`.
const RECEIPT_MAGIC: &[u8; 4] = b"A7RC";
const SIGNAL_MAGIC: &[u8; 4] = b"A7SG";
/// Logical frames (an envelope to all devices, a receipt to all devices) in flight per
/// connection, as the relay's `frames_in_flight_max`.
const IN_FLIGHT_MAX: u32 = 4096;
/// Topics per SUBSCRIBE packet.
const SUBSCRIBE_BATCH: usize = 100;
const CONNECT_CONCURRENCY: usize = 64;
const READ_BUFFER: usize = 64 * 1024;

/// A minimal MQTT 3.1.1 codec: what loadgen sends and what a broker answers.
pub mod packet {
    use bytes::{BufMut, Bytes, BytesMut};

    /// A packet from the broker.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Packet {
        ConnAck {
            session_present: bool,
            code: u8,
        },
        Publish {
            qos: u8,
            pkid: u16,
            topic: String,
            payload: Bytes,
        },
        PubAck {
            pkid: u16,
        },
        SubAck {
            pkid: u16,
            codes: Vec<u8>,
        },
        PingResp,
        /// A packet type loadgen does not use.
        Other {
            kind: u8,
        },
    }

    /// Why bytes are not a packet.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum DecodeError {
        BadLength,
        Malformed(&'static str),
    }

    fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
        loop {
            let mut byte = u8::try_from(len % 128).unwrap_or(0);
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.put_u8(byte);
            if len == 0 {
                break;
            }
        }
    }

    fn put_str(out: &mut BytesMut, s: &str) {
        out.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
        out.put_slice(s.as_bytes());
    }

    /// CONNECT, protocol level 4, no credentials.
    pub fn connect(out: &mut BytesMut, client_id: &str, clean_session: bool, keep_alive_s: u16) {
        let body = 10 + 2 + client_id.len();
        out.put_u8(0x10);
        put_remaining_length(out, body);
        put_str(out, "MQTT");
        out.put_u8(4);
        out.put_u8(if clean_session { 0x02 } else { 0x00 });
        out.put_u16(keep_alive_s);
        put_str(out, client_id);
    }

    /// SUBSCRIBE to `topics`, all at `qos`.
    pub fn subscribe(out: &mut BytesMut, pkid: u16, topics: &[String], qos: u8) {
        let body = 2 + topics.iter().map(|t| 2 + t.len() + 1).sum::<usize>();
        out.put_u8(0x82);
        put_remaining_length(out, body);
        out.put_u16(pkid);
        for t in topics {
            put_str(out, t);
            out.put_u8(qos);
        }
    }

    /// PUBLISH; `pkid` only for QoS 1.
    pub fn publish(out: &mut BytesMut, topic: &str, pkid: Option<u16>, payload: &[u8]) {
        let body = 2 + topic.len() + if pkid.is_some() { 2 } else { 0 } + payload.len();
        out.put_u8(if pkid.is_some() { 0x32 } else { 0x30 });
        put_remaining_length(out, body);
        put_str(out, topic);
        if let Some(pkid) = pkid {
            out.put_u16(pkid);
        }
        out.put_slice(payload);
    }

    pub fn puback(out: &mut BytesMut, pkid: u16) {
        out.put_slice(&[0x40, 0x02]);
        out.put_u16(pkid);
    }

    pub fn disconnect(out: &mut BytesMut) {
        out.put_slice(&[0xE0, 0x00]);
    }

    /// The next whole packet at the front of `buf`, removed from it; `None` until one is
    /// complete.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let mut len = 0usize;
        let mut multiplier = 1usize;
        let mut at = 1;
        loop {
            let Some(&byte) = buf.get(at) else {
                return Ok(None);
            };
            len += usize::from(byte & 0x7F) * multiplier;
            at += 1;
            if byte & 0x80 == 0 {
                break;
            }
            multiplier *= 128;
            if at > 4 {
                return Err(DecodeError::BadLength);
            }
        }
        if buf.len() < at + len {
            return Ok(None);
        }
        let header = buf[0];
        let mut packet = buf.split_to(at + len).freeze();
        let body = packet.split_off(at);
        let u16_at = |b: &Bytes, i: usize| -> Result<u16, DecodeError> {
            match (b.get(i), b.get(i + 1)) {
                (Some(&h), Some(&l)) => Ok(u16::from_be_bytes([h, l])),
                _ => Err(DecodeError::Malformed("short packet")),
            }
        };
        Ok(Some(match header >> 4 {
            2 => Packet::ConnAck {
                session_present: body.first().is_some_and(|b| b & 1 == 1),
                code: *body.get(1).ok_or(DecodeError::Malformed("connack"))?,
            },
            3 => {
                let qos = (header >> 1) & 3;
                let topic_len = usize::from(u16_at(&body, 0)?);
                let topic_end = 2 + topic_len;
                let topic = body
                    .get(2..topic_end)
                    .ok_or(DecodeError::Malformed("publish topic"))?;
                let topic = String::from_utf8(topic.to_vec())
                    .map_err(|_| DecodeError::Malformed("topic utf-8"))?;
                let (pkid, start) = if qos > 0 {
                    (u16_at(&body, topic_end)?, topic_end + 2)
                } else {
                    (0, topic_end)
                };
                if start > body.len() {
                    return Err(DecodeError::Malformed("publish"));
                }
                Packet::Publish {
                    qos,
                    pkid,
                    topic,
                    payload: body.slice(start..),
                }
            }
            4 => Packet::PubAck {
                pkid: u16_at(&body, 0)?,
            },
            9 => Packet::SubAck {
                pkid: u16_at(&body, 0)?,
                codes: body.get(2..).map(<[u8]>::to_vec).unwrap_or_default(),
            },
            13 => Packet::PingResp,
            kind => Packet::Other { kind },
        }))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_publish_round_trips() {
            let mut out = BytesMut::new();
            let payload = vec![7u8; 300];
            publish(&mut out, "a7/1/2/3", Some(42), &payload);
            // Remaining length 2 + 8 + 2 + 300 = 312: two bytes of varint.
            assert_eq!(&out[..3], &[0x32, 0xB8, 0x02]);
            let mut partial = out.split_to(100);
            assert_eq!(decode(&mut partial), Ok(None));
            partial.unsplit(out);
            let packet = decode(&mut partial).unwrap().unwrap();
            assert_eq!(
                packet,
                Packet::Publish {
                    qos: 1,
                    pkid: 42,
                    topic: "a7/1/2/3".into(),
                    payload: payload.into(),
                }
            );
            assert!(partial.is_empty());
        }

        #[test]
        fn broker_answers_decode() {
            let mut buf = BytesMut::from(
                &[
                    0x20, 0x02, 0x01, 0x00, 0x40, 0x02, 0x01, 0x02, 0x90, 0x04, 0x00, 0x07, 0x01,
                    0x80, 0xD0, 0x00,
                ][..],
            );
            assert_eq!(
                decode(&mut buf),
                Ok(Some(Packet::ConnAck {
                    session_present: true,
                    code: 0
                }))
            );
            assert_eq!(decode(&mut buf), Ok(Some(Packet::PubAck { pkid: 0x0102 })));
            assert_eq!(
                decode(&mut buf),
                Ok(Some(Packet::SubAck {
                    pkid: 7,
                    codes: vec![1, 0x80]
                }))
            );
            assert_eq!(decode(&mut buf), Ok(Some(Packet::PingResp)));
            assert_eq!(decode(&mut buf), Ok(None));
            let mut bad = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
            assert_eq!(decode(&mut bad), Err(DecodeError::BadLength));
        }

        #[test]
        fn connect_and_subscribe_have_the_right_lengths() {
            let mut out = BytesMut::new();
            connect(&mut out, "abc", false, 0);
            assert_eq!(out[1] as usize, out.len() - 2);
            assert_eq!(&out[2..8], &[0, 4, b'M', b'Q', b'T', b'T']);
            assert_eq!(out[9], 0x00, "clean session off");
            let mut sub = BytesMut::new();
            subscribe(&mut sub, 1, &["a".into(), "bb".into()], 1);
            assert_eq!(sub[0], 0x82);
            assert_eq!(sub[1] as usize, sub.len() - 2);
        }
    }
}

use self::packet as mqtt;

/// The topic of a device.
pub fn topic(device: &DeviceAddress) -> String {
    format!(
        "a7/{}/{}/{}",
        device.network.0, device.user.0, device.device.0
    )
}

/// The device a topic names.
pub fn parse_topic(topic: &str) -> Option<DeviceAddress> {
    let mut parts = topic.strip_prefix("a7/")?.split('/');
    let network = parts.next()?.parse().ok()?;
    let user = parts.next()?.parse().ok()?;
    let device = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(DeviceAddress::new(
        NetworkId(network),
        UserId(user),
        DeviceId(device),
    ))
}

/// A connection being set up.
struct MqttConn {
    stream: TcpStream,
    buf: BytesMut,
}

async fn read_packet(conn: &mut MqttConn) -> Result<mqtt::Packet, String> {
    loop {
        if let Some(p) = mqtt::decode(&mut conn.buf).map_err(|e| format!("{e:?}"))? {
            return Ok(p);
        }
        if conn.buf.capacity() - conn.buf.len() < 4096 {
            conn.buf.reserve(READ_BUFFER);
        }
        let n = conn
            .stream
            .read_buf(&mut conn.buf)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the broker closed the connection".into());
        }
    }
}

/// Connects with a persistent session and subscribes to `topics` (QoS 1).
async fn open(addr: SocketAddr, client_id: &str, topics: &[String]) -> Result<MqttConn, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut conn = MqttConn {
        stream,
        buf: BytesMut::with_capacity(READ_BUFFER),
    };
    let mut out = BytesMut::new();
    mqtt::connect(&mut out, client_id, false, 0);
    conn.stream
        .write_all(&out)
        .await
        .map_err(|e| e.to_string())?;
    match read_packet(&mut conn).await? {
        // A returning device's session still has its subscription; the messages queued for
        // it may follow at once and stay in the buffer for the reader.
        mqtt::Packet::ConnAck {
            code: 0,
            session_present: true,
        } => return Ok(conn),
        mqtt::Packet::ConnAck { code: 0, .. } => {}
        other => return Err(format!("CONNECT refused: {other:?}")),
    }
    for (i, chunk) in topics.chunks(SUBSCRIBE_BATCH).enumerate() {
        let mut out = BytesMut::new();
        let pkid = u16::try_from(i % 60_000 + 1).unwrap_or(1);
        mqtt::subscribe(&mut out, pkid, chunk, 1);
        conn.stream
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match read_packet(&mut conn).await? {
                mqtt::Packet::SubAck { codes, .. } => {
                    if codes.iter().any(|&c| c > 2) {
                        return Err(format!("SUBSCRIBE refused: {codes:?}"));
                    }
                    break;
                }
                // Nothing is published to a new session before it subscribed.
                mqtt::Packet::Publish { .. } => return Err("publish before SUBACK".into()),
                _ => {}
            }
        }
    }
    Ok(conn)
}

/// The MQTT counterpart of the relay harness.
pub struct MqttHarness {
    sessions: Sessions<DeviceConnector>,
    setup: Value,
}

/// Opens a device's persistent session (subscribed to its topic) and runs it.
struct DeviceConnector {
    addr: SocketAddr,
    /// Makes this run's client ids its own.
    run_tag: String,
}

impl Connector for DeviceConnector {
    type Conn = MqttConn;

    async fn open_devices(&self, ctx: &Arc<Ctx>, devices: &[u32]) -> Result<Vec<MqttConn>, String> {
        open_devices(ctx, self.addr, &self.run_tag, devices).await
    }

    fn spawn(&self, ctx: &Arc<Ctx>, slot: &PhaseSlot, tasks: &Tasks, conn: MqttConn) -> ConnTx {
        spawn_conn(ctx, slot, tasks, conn)
    }
}

impl MqttHarness {
    pub async fn connect(ctx: Arc<Ctx>, addr: SocketAddr) -> Result<MqttHarness, String> {
        let started = Instant::now();
        let population = &ctx.population;
        let run_tag = format!("{:08x}", crate::rng::os_random_u64() & 0xFFFF_FFFF);
        let per_network = population.spec.server_connections.max(1);
        let mut conns_setup: Vec<MqttConn> = Vec::new();
        let mut sender_conn = vec![u32::MAX; population.devices() as usize];
        for network in &population.networks {
            if network.architecture != Architecture::Proxy {
                continue;
            }
            let base = u32::try_from(conns_setup.len()).unwrap_or(u32::MAX);
            let mut topics: Vec<Vec<String>> = (0..per_network).map(|_| Vec::new()).collect();
            for user in network.first_user..network.first_user + network.users {
                for number in 1..=population.device_count(user) {
                    let device = population.device_index(user, number);
                    let i = server_session_of(device, per_network);
                    sender_conn[device as usize] = base + i;
                    topics[i as usize].push(topic(&population.device_address(device)));
                }
            }
            for (i, topics) in topics.iter().enumerate() {
                let id = format!("lg{run_tag}-s{}-{i}", network.id);
                conns_setup.push(open(addr, &id, topics).await?);
            }
        }
        let server_sessions = conns_setup.len();
        let direct: Vec<u32> = population.direct_devices().collect();
        let sessions = open_devices(&ctx, addr, &run_tag, &direct).await?;
        let mut offline = Vec::new();
        for (device, conn) in direct.iter().zip(sessions) {
            if population.is_offline(*device) {
                let mut conn = conn;
                let mut out = BytesMut::new();
                mqtt::disconnect(&mut out);
                let _ = conn.stream.write_all(&out).await;
                offline.push(*device);
            } else {
                sender_conn[*device as usize] =
                    u32::try_from(conns_setup.len()).unwrap_or(u32::MAX);
                conns_setup.push(conn);
            }
        }
        let offline_devices = offline.len();
        let connector = DeviceConnector { addr, run_tag };
        let sessions = Sessions::start(ctx, connector, conns_setup, sender_conn, offline);
        let setup = serde_json::json!({
            "server_sessions": server_sessions,
            "device_sessions": direct.len() - offline_devices,
            "offline_devices": offline_devices,
            "setup_s": started.elapsed().as_secs_f64(),
        });
        Ok(MqttHarness { sessions, setup })
    }

    pub async fn close(self) {
        self.sessions.close().await;
    }
}

impl Target for MqttHarness {
    async fn run_phase(&self, spec: &PhaseSpec, offline_return: Option<Duration>) -> PhaseResult {
        self.sessions.run_phase(spec, offline_return).await
    }
}

async fn open_devices(
    ctx: &Arc<Ctx>,
    addr: SocketAddr,
    run_tag: &str,
    devices: &[u32],
) -> Result<Vec<MqttConn>, String> {
    let mut out: Vec<Option<MqttConn>> = (0..devices.len()).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < devices.len() || !set.is_empty() {
        while next < devices.len() && set.len() < CONNECT_CONCURRENCY {
            let device = devices[next];
            let id = format!("lg{run_tag}-d{device}");
            let topics = vec![topic(&ctx.population.device_address(device))];
            let at = next;
            set.spawn(async move { (at, open(addr, &id, &topics).await) });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            let (at, conn) = joined.map_err(|e| e.to_string())?;
            out[at] = Some(conn?);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

fn spawn_conn(ctx: &Arc<Ctx>, slot: &PhaseSlot, tasks: &Tasks, conn: MqttConn) -> ConnTx {
    let (read, write) = conn.stream.into_split();
    let (tx, rx) = unbounded_channel();
    let writer = tokio::spawn(writer(ctx.clone(), slot.clone(), write, rx));
    let reader = tokio::spawn(reader(
        ctx.clone(),
        slot.clone(),
        read,
        conn.buf,
        tx.clone(),
    ));
    let mut tasks = tasks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tasks.push(writer);
    tasks.push(reader);
    tx
}

/// What a publish is part of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Logical {
    Envelope {
        phase: u32,
        seq: u64,
    },
    Receipt {
        phase: u32,
        seq: u64,
        from: u8,
        read: bool,
    },
}

struct WriterState {
    slot: PhaseSlot,
    out: BytesMut,
    next_pkid: u16,
    /// pkid → the logical frame it belongs to.
    pending: HashMap<u16, (Logical, Arc<crate::phase::Phase>)>,
    /// Logical frame → PUBACKs still to come.
    remaining: HashMap<Logical, u8>,
    in_flight: u32,
    backlog: std::collections::VecDeque<Cmd>,
    pair_seq: HashMap<(u32, u32), u32>,
    payload: Vec<u8>,
}

impl WriterState {
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.pending.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

async fn writer(
    ctx: Arc<Ctx>,
    slot: PhaseSlot,
    mut write: OwnedWriteHalf,
    mut rx: UnboundedReceiver<Batch>,
) {
    let mut state = WriterState {
        slot,
        out: BytesMut::with_capacity(READ_BUFFER),
        next_pkid: 0,
        pending: HashMap::new(),
        remaining: HashMap::new(),
        in_flight: 0,
        backlog: std::collections::VecDeque::new(),
        pair_seq: HashMap::new(),
        payload: vec![0x5A; PAYLOAD_BYTES_MAX],
    };
    while let Some(batch) = rx.recv().await {
        take(&ctx, &mut state, batch);
        while let Ok(batch) = rx.try_recv() {
            take(&ctx, &mut state, batch);
            if state.out.len() > 256 * 1024 {
                break;
            }
        }
        publish_backlog(&ctx, &mut state);
        if !state.out.is_empty() {
            if write.write_all(&state.out).await.is_err() {
                break;
            }
            state.out.clear();
        }
    }
    let mut out = BytesMut::new();
    mqtt::disconnect(&mut out);
    let _ = write.write_all(&out).await;
}

fn take(ctx: &Ctx, state: &mut WriterState, batch: Batch) {
    for cmd in batch {
        match cmd {
            Cmd::PubAck(pkid) => mqtt::puback(&mut state.out, pkid),
            Cmd::Credit(pkid) => {
                // For MQTT the reader passes PUBACKs as credits carrying the pkid.
                let pkid = u16::try_from(pkid).unwrap_or(0);
                if let Some((logical, phase)) = state.pending.remove(&pkid) {
                    let done = match state.remaining.get_mut(&logical) {
                        Some(left) => {
                            *left -= 1;
                            *left == 0
                        }
                        None => false,
                    };
                    if done {
                        state.remaining.remove(&logical);
                        state.in_flight = state.in_flight.saturating_sub(1);
                        match logical {
                            Logical::Envelope { seq, .. } => {
                                phase.ledger.acked(seq, AckOutcome::Accepted)
                            }
                            Logical::Receipt {
                                seq, from, read, ..
                            } => {
                                phase
                                    .ledger
                                    .receipt_acked(seq, from, read, AckOutcome::Accepted);
                            }
                        }
                    }
                }
            }
            Cmd::Envelope {
                ref phase,
                seq,
                typing,
            } if typing => {
                if let Some(info) = phase.ledger.info(seq) {
                    let population = &ctx.population;
                    for number in 1..=info.recipient_devices {
                        let device = population
                            .device_address(population.device_index(info.recipient, number));
                        mqtt::publish(&mut state.out, &topic(&device), None, SIGNAL_MAGIC);
                    }
                    phase.ledger.signal_sent();
                }
                state.backlog.push_back(cmd);
            }
            Cmd::Envelope { .. } | Cmd::Receipt { .. } => state.backlog.push_back(cmd),
            Cmd::Ack { .. } | Cmd::Later { .. } => {}
        }
    }
}

fn publish_backlog(ctx: &Ctx, state: &mut WriterState) {
    let population = &ctx.population;
    while state.in_flight < IN_FLIGHT_MAX {
        let Some(cmd) = state.backlog.pop_front() else {
            break;
        };
        match cmd {
            Cmd::Envelope { phase, seq, .. } => {
                let Some(info) = phase
                    .ledger
                    .info(seq)
                    .filter(|_| state.slot.is_current(phase.index))
                else {
                    continue;
                };
                let pair = state
                    .pair_seq
                    .entry((info.sender, info.recipient))
                    .or_insert(0);
                *pair += 1;
                let size = (info.size as usize).clamp(HEADER_BYTES, PAYLOAD_BYTES_MAX);
                PayloadHeader {
                    phase: phase.index,
                    seq,
                    scheduled_ns: phase.scheduled_ns(seq),
                    written_ns: ctx.now_ns(),
                    sender: info.sender,
                    pair_seq: *pair,
                    total_len: u32::try_from(size).unwrap_or(0),
                    class: info.class,
                }
                .write(&mut state.payload[..size]);
                let logical = Logical::Envelope {
                    phase: phase.index,
                    seq,
                };
                phase.ledger.written(seq);
                for number in 1..=info.recipient_devices {
                    let device =
                        population.device_address(population.device_index(info.recipient, number));
                    let pkid = state.pkid();
                    mqtt::publish(
                        &mut state.out,
                        &topic(&device),
                        Some(pkid),
                        &state.payload[..size],
                    );
                    state.pending.insert(pkid, (logical.clone(), phase.clone()));
                }
                state.remaining.insert(logical, info.recipient_devices);
                state.in_flight += 1;
            }
            Cmd::Receipt {
                phase,
                seq,
                from,
                to,
                read,
                first,
            } => {
                if !state.slot.is_current(phase.index) {
                    continue;
                }
                let Some(user) = population.user_index(&to) else {
                    continue;
                };
                let from_number = u8::try_from(from.device.0).unwrap_or(0);
                let id = ctx.ids.receipt(phase.index, seq, from_number, read);
                let mut body = [0u8; 20];
                body[..4].copy_from_slice(RECEIPT_MAGIC);
                body[4..].copy_from_slice(&id.0.to_le_bytes());
                let logical = Logical::Receipt {
                    phase: phase.index,
                    seq,
                    from: from_number,
                    read,
                };
                phase.ledger.receipt_written(first);
                let devices = population.device_count(user);
                for number in 1..=devices {
                    let device = population.device_address(population.device_index(user, number));
                    let pkid = state.pkid();
                    mqtt::publish(&mut state.out, &topic(&device), Some(pkid), &body);
                    state.pending.insert(pkid, (logical.clone(), phase.clone()));
                }
                state.remaining.insert(logical, devices);
                state.in_flight += 1;
            }
            other => state.backlog.push_front(other),
        }
    }
}

async fn reader(
    ctx: Arc<Ctx>,
    slot: PhaseSlot,
    mut read: OwnedReadHalf,
    mut buf: BytesMut,
    tx: ConnTx,
) {
    let mut inbox = Inbox::default();
    let mut out: Batch = Vec::new();
    loop {
        loop {
            let packet = match mqtt::decode(&mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    if let Some(p) = slot.current() {
                        p.stats.error_other(format!("mqtt decode: {e:?}"));
                    }
                    return;
                }
            };
            match packet {
                mqtt::Packet::PubAck { pkid } => out.push(Cmd::Credit(u32::from(pkid))),
                mqtt::Packet::Publish {
                    qos,
                    pkid,
                    topic,
                    payload,
                } => {
                    if qos > 0 {
                        out.push(Cmd::PubAck(pkid));
                    }
                    on_publish(&ctx, &slot, &mut inbox, &topic, &payload, &mut out);
                }
                _ => {}
            }
        }
        if !out.is_empty() && tx.send(std::mem::take(&mut out)).is_err() {
            break;
        }
        inbox.fold(&slot);
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_BUFFER);
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    inbox.fold(&slot);
}

fn on_publish(
    ctx: &Ctx,
    slot: &PhaseSlot,
    inbox: &mut Inbox,
    topic: &str,
    payload: &[u8],
    out: &mut Batch,
) {
    let Some(address) = parse_topic(topic) else {
        return;
    };
    let Some(device) = ctx.population.device_index_of(&address) else {
        return;
    };
    match payload.get(..4) {
        Some(m) if m == SIGNAL_MAGIC => inbox.signal(slot),
        Some(m) if m == RECEIPT_MAGIC && payload.len() == 20 => {
            let mut id = [0u8; 16];
            id.copy_from_slice(&payload[4..20]);
            let to = u8::try_from(address.device.0).unwrap_or(0);
            inbox.receipt(ctx, slot, MessageId(u128::from_le_bytes(id)), to);
        }
        _ => {
            if let Some(due) = inbox.envelope(ctx, slot, device, payload) {
                let sender = ctx.population.device_address(due.sender);
                let to: UserAddress = sender.user_address();
                due.phase.ledger.receipt_generated();
                out.push(Cmd::Receipt {
                    phase: due.phase.clone(),
                    seq: due.seq,
                    from: address,
                    to,
                    read: false,
                    first: true,
                });
                if address.device == DeviceId(1) {
                    due.phase.ledger.receipt_generated();
                    out.push(Cmd::Receipt {
                        phase: due.phase,
                        seq: due.seq,
                        from: address,
                        to,
                        read: true,
                        first: true,
                    });
                }
            }
        }
    }
}

/// Runs the scenario against a broker.
pub(crate) async fn run(
    args: &RunArgs,
    ctx: Arc<Ctx>,
    addr: SocketAddr,
    parity: &ParityConfig,
) -> Result<Outcome, String> {
    if args.idle_conns > 0 {
        return Err("--idle-conns is for relay targets".into());
    }
    let harness = MqttHarness::connect(ctx, addr).await?;
    let setup = harness.setup.clone();
    let mut outcome = scenario(&harness, args, parity).await;
    outcome.setup = setup;
    outcome.relay = serde_json::json!({ "mqtt_broker": addr });
    harness.close().await;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let d = DeviceAddress::new(NetworkId(3), UserId(65_537), DeviceId(5));
        assert_eq!(topic(&d), "a7/3/65537/5");
        assert_eq!(parse_topic(&topic(&d)), Some(d));
        assert_eq!(parse_topic("a7/3/x/5"), None);
        assert_eq!(parse_topic("a7/3/1/5/6"), None);
        assert_eq!(parse_topic("b/3/1/5"), None);
    }
}
