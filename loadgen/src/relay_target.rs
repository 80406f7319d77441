//! Driving a relay with the client SDK: the server sessions of proxy networks (which declare
//! their users' devices with `DeviceList`), one session per device of direct networks
//! (device tokens; offline devices register, leave, and come back later), and per connection
//! a writer task and a reader task.
//!
//! The writer owns the SDK `Sender`: it writes envelopes, receipts, signals and acks, keeps
//! no more frames in flight than the relay's `frames_in_flight_max`, and writes refused
//! frames again after `retry_after_ms`. The reader owns the `Receiver`: it never blocks on a
//! write (so the relay can always drain to us), checks every delivery, and hands acks,
//! receipts and credits to its writer in one batch per read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{
    Ack, AckStatus, ClientError, ConnectOptions, Connection, ContentType, DeviceId, DeviceList,
    DeviceSelection, E2eProtocol, Envelope, ErrorCode, Event, Inbound, MessageId, Receipt,
    ReceiptKind, Receiver, Role, Sender, Signal, SignalKind, connect,
};
use devkit::now_ms;
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::JoinSet;

use crate::ledger::AckOutcome;
use crate::payload::{IdKind, PAYLOAD_BYTES_MAX, PayloadHeader};
use crate::phase::{Batch, Cmd, ConnTx, Ctx, Inbox, PhaseResult, PhaseSlot, PhaseSpec};
use crate::pki::Identities;
use crate::population::Architecture;
use crate::sessions::{Connector, Sessions, Tasks, server_session_of};
use crate::target::Target;

/// Sessions connecting at once during setup.
const CONNECT_CONCURRENCY: usize = 64;
/// Device lists in flight during setup (their acks are read before more are written).
const DEVICE_LIST_WINDOW: u32 = 512;
/// A refused frame is written again no sooner than this.
const RETRY_MIN: Duration = Duration::from_millis(2);
/// Token lifetime.
const TOKEN_LIFETIME_MS: u64 = 24 * 3600 * 1000;
/// A reader hands its batch to the writer at least this often (frames).
const READER_BATCH_MAX: usize = 256;

/// What setting up the population took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetupReport {
    pub server_sessions: u32,
    pub device_sessions: u32,
    pub offline_devices: u32,
    pub users_declared: u32,
    pub setup_s: f64,
}

/// Connections to a relay for the whole population, and the phases run over them.
pub struct Harness {
    sessions: Sessions<DeviceConnector>,
    pub setup: SetupReport,
}

/// Opens device sessions (a token each) and runs them with the client SDK.
struct DeviceConnector {
    addr: SocketAddr,
    identities: Arc<Identities>,
}

impl Connector for DeviceConnector {
    type Conn = Connection;

    async fn open_devices(
        &self,
        ctx: &Arc<Ctx>,
        devices: &[u32],
    ) -> Result<Vec<Connection>, String> {
        connect_devices(ctx, self.addr, &self.identities, devices).await
    }

    fn spawn(&self, ctx: &Arc<Ctx>, slot: &PhaseSlot, tasks: &Tasks, conn: Connection) -> ConnTx {
        spawn_session(ctx, slot, tasks, conn)
    }
}

fn agent() -> String {
    format!("loadgen/{}", env!("CARGO_PKG_VERSION"))
}

impl Harness {
    /// Connects every session of the population and declares every proxied user's devices.
    pub async fn connect(
        ctx: Arc<Ctx>,
        addr: SocketAddr,
        identities: Arc<Identities>,
    ) -> Result<Harness, String> {
        let started = Instant::now();
        let population = &ctx.population;
        let per_network = population.spec.server_connections.max(1);
        let mut connections: Vec<Connection> = Vec::new();
        let mut sender_conn = vec![u32::MAX; population.devices() as usize];
        let mut setup = SetupReport::default();
        for network in &population.networks {
            if network.architecture != Architecture::Proxy {
                continue;
            }
            let tls = identities.server_tls(network.id)?;
            let role = if network.gatekeeper {
                Role::GatekeeperServer
            } else {
                Role::PartnerServer
            };
            let base = u32::try_from(connections.len()).unwrap_or(u32::MAX);
            for i in 0..per_network {
                let options = ConnectOptions::new(addr, tls.clone(), role)
                    .server_name(identities.server_name.clone())
                    .agent(agent());
                let mut connection = connect(options)
                    .await
                    .map_err(|e| format!("network {} server session: {e}", network.id))?;
                if i == 0 {
                    declare_devices(&ctx, &mut connection, network.first_user, network.users)
                        .await
                        .map_err(|e| format!("network {} device lists: {e}", network.id))?;
                    setup.users_declared += network.users;
                }
                connections.push(connection);
            }
            for user in network.first_user..network.first_user + network.users {
                for number in 1..=population.device_count(user) {
                    let device = population.device_index(user, number);
                    sender_conn[device as usize] = base + server_session_of(device, per_network);
                }
            }
        }
        setup.server_sessions = u32::try_from(connections.len()).unwrap_or(u32::MAX);
        // Direct devices: every one connects once so the relay knows it; the offline ones
        // leave again at once and come back during the first phase.
        let direct: Vec<u32> = population.direct_devices().collect();
        let device_sessions = connect_devices(&ctx, addr, &identities, &direct).await?;
        let mut offline = Vec::new();
        for (device, connection) in direct.iter().zip(device_sessions) {
            if population.is_offline(*device) {
                let mut connection = connection;
                let _ = connection.close().await;
                offline.push(*device);
                setup.offline_devices += 1;
            } else {
                sender_conn[*device as usize] =
                    u32::try_from(connections.len()).unwrap_or(u32::MAX);
                connections.push(connection);
                setup.device_sessions += 1;
            }
        }
        let connector = DeviceConnector { addr, identities };
        let sessions = Sessions::start(ctx, connector, connections, sender_conn, offline);
        setup.setup_s = started.elapsed().as_secs_f64();
        Ok(Harness { sessions, setup })
    }

    /// Closes every session.
    pub async fn close(self) {
        self.sessions.close().await;
    }
}

impl Target for Harness {
    async fn run_phase(&self, spec: &PhaseSpec, offline_return: Option<Duration>) -> PhaseResult {
        self.sessions.run_phase(spec, offline_return).await
    }
}

/// Sends the device list of every user in `first..first + count` and waits for the acks.
/// (The same sets as their enlistment declared, when loadgen enlisted them: a network's
/// server keeps declaring its users' devices in-band, as it would in production.)
async fn declare_devices(
    ctx: &Ctx,
    connection: &mut Connection,
    first: u32,
    count: u32,
) -> Result<(), String> {
    let e = |e: ClientError| e.to_string();
    let population = &ctx.population;
    let mut next = first;
    let end = first + count;
    while next < end {
        let window_end = (next + DEVICE_LIST_WINDOW).min(end);
        for user in next..window_end {
            let devices = population.device_numbers(user).map(DeviceId).collect();
            let list = DeviceList {
                request_id: MessageId(0xDE71_CE00_0000_0000_0000_0000_0000_0000 | u128::from(user)),
                user: population.user_address(user),
                devices,
            };
            connection.send_device_list(&list).await.map_err(e)?;
        }
        connection.flush().await.map_err(e)?;
        let mut acked = next;
        while acked < window_end {
            match connection.next_event().await.map_err(e)? {
                Event::Ack(Ack {
                    status: AckStatus::Accepted,
                    ..
                }) => acked += 1,
                Event::Ack(Ack {
                    status: AckStatus::Rejected { code, .. },
                    message_id,
                    ..
                }) => {
                    let name = ErrorCode::from_u16(code).map_or("unknown code", ErrorCode::name);
                    return Err(format!(
                        "device list {message_id} refused with {code} {name}"
                    ));
                }
                Event::Closed => return Err(ClientError::Closed.to_string()),
                _ => {}
            }
        }
        next = window_end;
    }
    Ok(())
}

/// Connects one session per device, a few at a time; returns them in the order given.
async fn connect_devices(
    ctx: &Arc<Ctx>,
    addr: SocketAddr,
    identities: &Arc<Identities>,
    devices: &[u32],
) -> Result<Vec<Connection>, String> {
    let tls = identities.device_tls()?;
    let mut sessions: Vec<Option<Connection>> = (0..devices.len()).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < devices.len() || !set.is_empty() {
        while next < devices.len() && set.len() < CONNECT_CONCURRENCY {
            let device = devices[next];
            let address = ctx.population.device_address(device);
            let network = identities.network(address.network.0)?;
            let token = client::mint_device_token(
                &network.token_key_pkcs8,
                address,
                now_ms() + TOKEN_LIFETIME_MS,
                u128::from(crate::rng::os_random_u64()) << 64
                    | u128::from(crate::rng::os_random_u64()),
            )
            .map_err(|e| e.to_string())?;
            let options = ConnectOptions::new(addr, tls.clone(), Role::Device)
                .server_name(identities.server_name.clone())
                .token(token)
                .agent(agent());
            let at = next;
            set.spawn(async move { (at, connect(options).await) });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            let (at, outcome) = joined.map_err(|e| e.to_string())?;
            let connection = outcome.map_err(|e| {
                format!(
                    "device {} session: {e}",
                    ctx.population.device_address(devices[at])
                )
            })?;
            sessions[at] = Some(connection);
        }
    }
    Ok(sessions.into_iter().flatten().collect())
}

/// Starts the writer and reader of one session; returns the writer's queue.
fn spawn_session(
    ctx: &Arc<Ctx>,
    slot: &PhaseSlot,
    tasks: &Tasks,
    connection: Connection,
) -> ConnTx {
    let in_flight_max = connection.welcome().limits.frames_in_flight_max.max(1);
    let (sender, receiver) = connection.into_split();
    let (tx, rx) = unbounded_channel();
    let writer = tokio::spawn(writer(ctx.clone(), slot.clone(), sender, rx, in_flight_max));
    let reader = tokio::spawn(reader(ctx.clone(), slot.clone(), receiver, tx.clone()));
    let mut tasks = tasks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tasks.push(writer);
    tasks.push(reader);
    tx
}

/// The writer's state between batches.
struct WriterState {
    slot: PhaseSlot,
    in_flight: u32,
    in_flight_max: u32,
    /// Envelopes and receipts waiting for room in flight.
    backlog: VecDeque<Cmd>,
    /// Refused frames, by when to write them again.
    later: BTreeMap<(Instant, u64), Cmd>,
    later_counter: u64,
    /// (sender device, recipient user) → the last pair sequence number written.
    pair_seq: HashMap<(u32, u32), u32>,
    payload: Vec<u8>,
}

async fn writer(
    ctx: Arc<Ctx>,
    slot: PhaseSlot,
    mut sender: Sender,
    mut rx: UnboundedReceiver<Batch>,
    in_flight_max: u32,
) {
    let mut state = WriterState {
        slot,
        in_flight: 0,
        in_flight_max,
        backlog: VecDeque::new(),
        later: BTreeMap::new(),
        later_counter: 0,
        pair_seq: HashMap::new(),
        payload: vec![0x5A; PAYLOAD_BYTES_MAX],
    };
    loop {
        let next_later = state.later.keys().next().map(|(due, _)| *due);
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    if take_batch(&ctx, &mut sender, &mut state, batch).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            () = sleep_until_opt(next_later) => {}
        }
        // Whatever else is queued, in the same write.
        let mut failed = false;
        while let Ok(batch) = rx.try_recv() {
            if take_batch(&ctx, &mut sender, &mut state, batch)
                .await
                .is_err()
            {
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
        let now = Instant::now();
        while let Some(entry) = state.later.first_entry() {
            if entry.key().0 > now {
                break;
            }
            state.backlog.push_back(entry.remove());
        }
        if write_backlog(&ctx, &mut sender, &mut state).await.is_err() {
            break;
        }
        if sender.flush().await.is_err() {
            break;
        }
    }
    let _ = sender.close().await;
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

async fn take_batch(
    ctx: &Ctx,
    sender: &mut Sender,
    state: &mut WriterState,
    batch: Batch,
) -> Result<(), ClientError> {
    for cmd in batch {
        match cmd {
            Cmd::Ack { id, device } => sender.ack(id, device).await?,
            Cmd::Credit(n) => state.in_flight = state.in_flight.saturating_sub(n),
            Cmd::Later { due, cmd } => {
                state.later_counter += 1;
                state.later.insert((due, state.later_counter), *cmd);
            }
            Cmd::Envelope {
                ref phase,
                seq,
                typing,
            } if typing => {
                if let Some(info) = phase.ledger.info(seq) {
                    let population = &ctx.population;
                    let signal = Signal {
                        sender: population.device_address(info.sender),
                        recipient: population.user_address(info.recipient),
                        kind: SignalKind::TypingStarted,
                        timestamp_ms: now_ms(),
                    };
                    sender.send_signal(&signal).await?;
                    phase.ledger.signal_sent();
                }
                state.backlog.push_back(cmd);
            }
            Cmd::Envelope { .. } | Cmd::Receipt { .. } => state.backlog.push_back(cmd),
            Cmd::PubAck(_) => {}
        }
    }
    write_backlog(ctx, sender, state).await
}

/// Writes envelopes and receipts while there is room in flight.
async fn write_backlog(
    ctx: &Ctx,
    sender: &mut Sender,
    state: &mut WriterState,
) -> Result<(), ClientError> {
    while state.in_flight < state.in_flight_max {
        let Some(cmd) = state.backlog.pop_front() else {
            break;
        };
        match cmd {
            Cmd::Envelope { phase, seq, .. } => {
                // Work of a finished phase is dropped: its ledger is closed.
                let Some(info) = phase
                    .ledger
                    .info(seq)
                    .filter(|_| state.slot.is_current(phase.index))
                else {
                    continue;
                };
                let population = &ctx.population;
                let pair = state
                    .pair_seq
                    .entry((info.sender, info.recipient))
                    .or_insert(0);
                *pair += 1;
                let size =
                    (info.size as usize).clamp(crate::payload::HEADER_BYTES, PAYLOAD_BYTES_MAX);
                let header = PayloadHeader {
                    phase: phase.index,
                    seq,
                    scheduled_ns: phase.scheduled_ns(seq),
                    written_ns: ctx.now_ns(),
                    sender: info.sender,
                    pair_seq: *pair,
                    total_len: u32::try_from(size).unwrap_or(0),
                    class: info.class,
                };
                header.write(&mut state.payload[..size]);
                let envelope = Envelope {
                    message_id: ctx.ids.envelope(phase.index, seq),
                    sender: population.device_address(info.sender),
                    recipient: population.user_address(info.recipient),
                    devices: DeviceSelection::All,
                    content_type: if size > 512 {
                        ContentType::Media
                    } else {
                        ContentType::Text
                    },
                    e2e_protocol: E2eProtocol::Signal,
                    timestamp_ms: now_ms(),
                    ttl_seconds: ctx.traffic.ttl_seconds,
                    flags: 0,
                };
                // Recorded before the write: the relay's ack may come back (to the reader)
                // before this task runs again.
                phase.ledger.written(seq);
                sender
                    .send_envelope(&envelope, &state.payload[..size])
                    .await?;
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
                let receipt = Receipt {
                    receipt_id: ctx.ids.receipt(
                        phase.index,
                        seq,
                        u8::try_from(from.device.0).unwrap_or(0),
                        read,
                    ),
                    kind: if read {
                        ReceiptKind::Read
                    } else {
                        ReceiptKind::Delivered
                    },
                    sender: from,
                    recipient: to,
                    message_ids: vec![ctx.ids.envelope(phase.index, seq)],
                    timestamp_ms: now_ms(),
                };
                phase.ledger.receipt_written(first);
                sender.send_receipt(&receipt).await?;
                state.in_flight += 1;
            }
            other => state.backlog.push_front(other),
        }
    }
    Ok(())
}

async fn reader(ctx: Arc<Ctx>, slot: PhaseSlot, mut receiver: Receiver, tx: ConnTx) {
    let mut inbox = Inbox::default();
    let mut out: Batch = Vec::new();
    let mut credits: u32 = 0;
    loop {
        let event = match receiver.next_event().await {
            Ok(event) => event,
            Err(ClientError::Closed) => break,
            Err(error) => {
                let fatal = matches!(
                    error,
                    ClientError::Io(_) | ClientError::Tls(_) | ClientError::CertificateRejected(_)
                );
                if let Some(p) = slot.current() {
                    p.stats
                        .error_other(format!("receive: {}", error_kind(&error)));
                }
                if fatal || matches!(&error, ClientError::Codec(e) if e.is_framing()) {
                    break;
                }
                continue;
            }
        };
        match event {
            Event::Ack(ack) => {
                if let Some(cmd) = on_ack(&ctx, &slot, &mut inbox, &ack) {
                    out.push(cmd);
                }
                if ctx.ids.parse(ack.message_id).is_some() {
                    credits += 1;
                }
            }
            Event::Delivery {
                device,
                ephemeral,
                inner,
                ..
            } => {
                if !ephemeral && let Some(id) = inner.ack_id() {
                    out.push(Cmd::Ack { id, device });
                }
                let Some(device_index) = ctx.population.device_index_of(&device) else {
                    if let Some(p) = slot.current() {
                        p.ledger.stray();
                    }
                    continue;
                };
                match inner {
                    Inbound::Envelope { header, payload } => {
                        if let Some(due) = inbox.envelope(&ctx, &slot, device_index, &payload) {
                            let to = header.sender.user_address();
                            due.phase.ledger.receipt_generated();
                            out.push(Cmd::Receipt {
                                phase: due.phase.clone(),
                                seq: due.seq,
                                from: device,
                                to,
                                read: false,
                                first: true,
                            });
                            if device.device == DeviceId(1) {
                                due.phase.ledger.receipt_generated();
                                out.push(Cmd::Receipt {
                                    phase: due.phase,
                                    seq: due.seq,
                                    from: device,
                                    to,
                                    read: true,
                                    first: true,
                                });
                            }
                        }
                    }
                    Inbound::Receipt(receipt) => {
                        let to = u8::try_from(device.device.0).unwrap_or(0);
                        inbox.receipt(&ctx, &slot, receipt.receipt_id, to);
                    }
                    Inbound::Signal(_) => inbox.signal(&slot),
                }
            }
            Event::Error(error) => {
                if let Some(p) = slot.current() {
                    p.stats.error_code(error.code);
                }
                if error.fatal {
                    // The relay closes next; the reader sees Closed.
                }
            }
            // Loadgen asks for no feature, so the relay sends it no KeepAlive.
            Event::Notice(_) | Event::KeepAlive(_) => {}
            Event::Closed => break,
        }
        if receiver.buffered_len() == 0 || out.len() >= READER_BATCH_MAX {
            if credits > 0 {
                out.push(Cmd::Credit(credits));
                credits = 0;
            }
            if !out.is_empty() && tx.send(std::mem::take(&mut out)).is_err() {
                break;
            }
            inbox.fold(&slot);
        }
    }
    inbox.fold(&slot);
}

fn error_kind(error: &ClientError) -> String {
    match error {
        ClientError::Io(e) => format!("io {:?}", e.kind()),
        ClientError::Tls(_) => "tls".into(),
        ClientError::Codec(e) => format!("codec {}", e.code().as_u16()),
        other => other.to_string(),
    }
}

/// The relay's answer to one of our envelopes or receipts; returns a retry when it was
/// refused with a retryable code.
fn on_ack(ctx: &Ctx, slot: &PhaseSlot, inbox: &mut Inbox, ack: &Ack) -> Option<Cmd> {
    let (index, kind) = ctx.ids.parse(ack.message_id)?;
    let Some(phase) = inbox.phase(slot, index) else {
        if let Some(p) = slot.current() {
            p.ledger.stray();
        }
        return None;
    };
    let (outcome, retry_after_ms) = match &ack.status {
        AckStatus::Accepted => (AckOutcome::Accepted, 0),
        AckStatus::Rejected {
            code,
            retry_after_ms,
            ..
        } => {
            phase.stats.error_code(*code);
            let retryable = ErrorCode::from_u16(*code)
                .map_or((400..600).contains(code), ErrorCode::is_retryable);
            if retryable {
                (AckOutcome::Retry(*code), *retry_after_ms)
            } else {
                (AckOutcome::Rejected(*code), 0)
            }
        }
    };
    let due = Instant::now() + RETRY_MIN.max(Duration::from_millis(u64::from(retry_after_ms)));
    match kind {
        IdKind::Envelope { seq } => {
            phase.ledger.acked(seq, outcome);
            matches!(outcome, AckOutcome::Retry(_)).then(|| Cmd::Later {
                due,
                cmd: Box::new(Cmd::Envelope {
                    phase: phase.clone(),
                    seq,
                    typing: false,
                }),
            })
        }
        IdKind::Receipt {
            seq,
            from_device,
            read,
        } => {
            phase.ledger.receipt_acked(seq, from_device, read, outcome);
            let info = phase.ledger.info(seq)?;
            let to = ctx.population.device_address(info.sender).user_address();
            matches!(outcome, AckOutcome::Retry(_)).then(|| Cmd::Later {
                due,
                cmd: Box::new(Cmd::Receipt {
                    phase: phase.clone(),
                    seq,
                    from: ack.address,
                    to,
                    read,
                    first: false,
                }),
            })
        }
    }
}
