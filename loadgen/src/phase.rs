//! One measured phase, whatever the target: the open-loop scheduler that decides at a fixed
//! rate who sends what to whom and hands each message to the connection of its sender, the
//! receiving side's checks (payload, duplicates, order, latency), the per-second timeline and
//! progress line, and the drain that waits until everything acknowledged has arrived.
//!
//! Latency runs from each message's *scheduled* time, `start + seq / rate`, not from when
//! loadgen got around to writing it: if the relay (or loadgen) stalls, the messages due during
//! the stall carry the stall in their latency, so coordinated omission cannot hide it.

use std::collections::HashMap;
use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use codec::{DeviceAddress, MessageId, UserAddress};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::ledger::{Arrival, Ledger, SlotInfo, Tally};
use crate::payload::{IdKind, IdSpace, PayloadHeader, SizeMix};
use crate::population::{Architecture, Class, Population};
use crate::rng::Rng;
use crate::stats::{Errors, Latencies, Recorder, Stats, TimelinePoint};

/// The traffic mix.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    /// Share of messages that are interop (the rest first party).
    pub interop_share: f64,
    /// Share of interop messages that go gatekeeper → partner (the rest partner → gatekeeper).
    pub outbound_share: f64,
    /// Share of messages preceded by a typing signal.
    pub typing_share: f64,
    pub sizes: SizeMix,
    pub ttl_seconds: u32,
}

/// The test-only fault switch of loadgen's receiving path: pretend every Nth envelope
/// delivery never arrived (it is still acknowledged to the relay, so the relay forgets it) or
/// arrived twice. 0 turns a fault off. Used to prove that the accounting catches both. Also
/// one of setup: a network key the relay does not know, to prove a refused enlistment fails
/// the run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Faults {
    pub drop_every: u64,
    pub duplicate_every: u64,
    /// Network 2's token key is replaced by one the relay does not know (after its config
    /// is written): its consents do not verify, so enlistment is refused.
    pub network_key_mismatch: bool,
}

/// What every task of a run shares.
#[derive(Debug)]
pub struct Ctx {
    pub population: Population,
    pub ids: IdSpace,
    /// Every `*_ns` of the run counts from here.
    pub epoch: Instant,
    pub traffic: Traffic,
    pub faults: Faults,
    /// Per device: when its current session started (ns since the epoch); a message due
    /// before that found the device offline and is a catch-up delivery.
    pub online_since_ns: Vec<AtomicU64>,
    pub progress: bool,
    pub seed: u64,
}

impl Ctx {
    pub fn new(population: Population, traffic: Traffic, faults: Faults, seed: u64) -> Ctx {
        let devices = population.devices() as usize;
        Ctx {
            population,
            ids: IdSpace::new(crate::rng::os_random_u64()),
            epoch: Instant::now(),
            traffic,
            faults,
            online_since_ns: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            progress: std::io::stderr().is_terminal(),
            seed,
        }
    }

    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    pub fn set_online(&self, device: u32) {
        if let Some(slot) = self.online_since_ns.get(device as usize) {
            // 0 means offline, so a session up at the epoch's first nanosecond counts as 1.
            slot.store(self.now_ns().max(1), Relaxed);
        }
    }
}

/// One phase's shared state.
#[derive(Debug)]
pub struct Phase {
    pub index: u32,
    pub ledger: Ledger,
    pub stats: Stats,
    pub start_ns: u64,
    pub rate: f64,
    /// Latest arrival of an envelope (ns since the epoch), for the throughput.
    pub last_delivery_ns: AtomicU64,
    deliveries_seen: AtomicU64,
}

impl Phase {
    /// When message `seq` was due.
    pub fn scheduled_ns(&self, seq: u64) -> u64 {
        self.start_ns + crate::rng::saturating_u64(seq as f64 * 1e9 / self.rate)
    }
}

/// The phase connection tasks should account to. Tasks keep a cached `Arc` and look here
/// only when a message names another phase.
#[derive(Debug, Default, Clone)]
pub struct PhaseSlot {
    current: Arc<RwLock<Option<Arc<Phase>>>>,
    /// The current phase's index (0: none), readable without the lock.
    index: Arc<AtomicU32>,
}

impl PhaseSlot {
    /// Whether `index` is the phase being run (writers drop work of finished phases).
    pub fn is_current(&self, index: u32) -> bool {
        self.index.load(Relaxed) == index
    }

    pub fn get(&self, index: u32) -> Option<Arc<Phase>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.as_ref().filter(|p| p.index == index).cloned()
    }

    pub fn current(&self) -> Option<Arc<Phase>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, phase: Option<Arc<Phase>>) {
        self.index
            .store(phase.as_ref().map_or(0, |p| p.index), Relaxed);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = phase;
    }

    /// The phase `index`, from `cache` when it is that one.
    pub fn lookup(&self, cache: &mut Option<Arc<Phase>>, index: u32) -> Option<Arc<Phase>> {
        if let Some(p) = cache.as_ref().filter(|p| p.index == index) {
            return Some(p.clone());
        }
        *cache = self.get(index);
        cache.clone()
    }
}

/// Work for a connection's writer.
#[derive(Debug)]
pub enum Cmd {
    /// Write envelope `seq` of `phase` (first time, or again after a retryable refusal).
    Envelope {
        phase: Arc<Phase>,
        seq: u64,
        typing: bool,
    },
    /// Write a receipt from recipient device `from` about envelope `seq`.
    Receipt {
        phase: Arc<Phase>,
        seq: u64,
        from: DeviceAddress,
        to: UserAddress,
        read: bool,
        first: bool,
    },
    /// Acknowledge a delivery to the relay.
    Ack {
        id: MessageId,
        device: DeviceAddress,
    },
    /// MQTT: acknowledge an incoming QoS 1 publish.
    PubAck(u16),
    /// Acks came back for this many of the writer's frames in flight.
    Credit(u32),
    /// Hand `cmd` back to the writer at `due`.
    Later { due: Instant, cmd: Box<Cmd> },
}

pub type Batch = Vec<Cmd>;
pub type ConnTx = UnboundedSender<Batch>;

/// A receiving task's checks: payload validity, duplicates (through the ledger), order per
/// sender and device, latency.
#[derive(Debug, Default)]
pub struct Inbox {
    pub recorder: Recorder,
    /// (sender device, receiving device) → the highest pair sequence number seen.
    order: HashMap<(u32, u32), u32>,
    phase_cache: Option<Arc<Phase>>,
}

/// What to do after an envelope arrived.
#[derive(Debug)]
pub struct ReceiptsDue {
    pub phase: Arc<Phase>,
    pub seq: u64,
    /// Global index of the original sender's device.
    pub sender: u32,
}

impl Inbox {
    /// An envelope's payload reached device `device` (global index). Returns what receipts
    /// to send when this was its first arrival there.
    pub fn envelope(
        &mut self,
        ctx: &Ctx,
        slot: &PhaseSlot,
        device: u32,
        payload: &[u8],
    ) -> Option<ReceiptsDue> {
        let header = match PayloadHeader::read(payload) {
            Ok(h) => h,
            Err(_) => {
                if let Some(p) = slot.current() {
                    p.ledger.corrupt();
                }
                return None;
            }
        };
        let Some(phase) = slot.lookup(&mut self.phase_cache, header.phase) else {
            if let Some(p) = slot.current() {
                p.ledger.stray();
            }
            return None;
        };
        let n = phase.deliveries_seen.fetch_add(1, Relaxed) + 1;
        let faults = ctx.faults;
        if faults.drop_every > 0 && n % faults.drop_every == 0 {
            return None;
        }
        let repeats = if faults.duplicate_every > 0 && n % faults.duplicate_every == 0 {
            2
        } else {
            1
        };
        let number = ctx.population.device_number(device);
        let mut first = false;
        for _ in 0..repeats {
            match phase.ledger.delivered(header.seq, number) {
                Arrival::First => first = true,
                Arrival::Duplicate => {}
                Arrival::Unknown => return None,
            }
        }
        if !first {
            return None;
        }
        let now_ns = ctx.now_ns();
        phase.last_delivery_ns.fetch_max(now_ns, Relaxed);
        let latency_us = now_ns.saturating_sub(header.scheduled_ns) / 1000;
        let online_since = ctx
            .online_since_ns
            .get(device as usize)
            .map_or(0, |s| s.load(Relaxed));
        if online_since > header.scheduled_ns {
            self.recorder.record_catchup(latency_us);
        } else {
            let from_write_us = now_ns.saturating_sub(header.written_ns) / 1000;
            let population = &ctx.population;
            let is_direct = |device: u32| {
                population
                    .network_of_user(population.user_of_device(device))
                    .architecture
                    == Architecture::Direct
            };
            let direct = header.sender < population.devices()
                && (is_direct(header.sender) || is_direct(device));
            self.recorder
                .record(header.class, direct, latency_us, from_write_us);
        }
        let last = self.order.entry((header.sender, device)).or_insert(0);
        if header.pair_seq < *last {
            phase.ledger.reordered(header.class);
        } else {
            *last = header.pair_seq;
        }
        Some(ReceiptsDue {
            phase,
            seq: header.seq,
            sender: header.sender,
        })
    }

    /// A receipt `id` reached device number `to` of the original sender.
    pub fn receipt(&mut self, ctx: &Ctx, slot: &PhaseSlot, id: MessageId, to: u8) {
        let Some((
            index,
            IdKind::Receipt {
                seq,
                from_device,
                read,
            },
        )) = ctx.ids.parse(id)
        else {
            if let Some(p) = slot.current() {
                p.ledger.stray();
            }
            return;
        };
        match slot.lookup(&mut self.phase_cache, index) {
            Some(phase) => {
                phase.ledger.receipt_delivered(seq, from_device, read, to);
            }
            None => {
                if let Some(p) = slot.current() {
                    p.ledger.stray();
                }
            }
        }
    }

    /// Signals carry no phase: they count in the current one.
    pub fn signal(&mut self, slot: &PhaseSlot) {
        if let Some(p) = slot.current() {
            p.ledger.signal_received();
        }
    }

    /// Folds this task's latencies into its phase's statistics.
    pub fn fold(&mut self, slot: &PhaseSlot) {
        if !self.recorder.dirty {
            return;
        }
        let phase = self.phase_cache.clone().or_else(|| slot.current());
        match phase {
            Some(p) => p.stats.fold(&mut self.recorder),
            None => self.recorder.clear(),
        }
    }

    /// The phase with this index, cached.
    pub fn phase(&mut self, slot: &PhaseSlot, index: u32) -> Option<Arc<Phase>> {
        slot.lookup(&mut self.phase_cache, index)
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSpec {
    pub name: String,
    pub rate_per_s: f64,
    #[serde(skip)]
    pub duration: Duration,
    #[serde(skip)]
    pub drain: Duration,
}

/// What a phase showed.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub spec: PhaseSpec,
    pub tally: Tally,
    pub latencies: Latencies,
    pub errors: Errors,
    pub timeline: Vec<TimelinePoint>,
    /// Scheduling window plus drain, seconds.
    pub elapsed_s: f64,
    /// From the phase start to the last envelope arrival, seconds.
    pub active_s: f64,
    /// Everything due arrived before the drain timeout.
    pub settled: bool,
}

/// Who sends through which connection.
pub struct Routes<'a> {
    pub conns: &'a [ConnTx],
    /// Per device: the connection its messages are written to (`u32::MAX`: none).
    pub sender_conn: &'a [u32],
}

/// Runs one phase: schedules `rate × duration` messages, then drains.
pub async fn run_phase(
    ctx: &Arc<Ctx>,
    slot: &PhaseSlot,
    routes: &Routes<'_>,
    spec: &PhaseSpec,
    index: u32,
) -> PhaseResult {
    let total = crate::rng::saturating_u64(
        (spec.rate_per_s * spec.duration.as_secs_f64())
            .round()
            .max(1.0),
    );
    let total = total.min(crate::payload::SEQ_MAX);
    let start_ns = ctx.now_ns() + 5_000_000;
    let phase = Arc::new(Phase {
        index,
        ledger: Ledger::with_reachability(
            usize::try_from(total).unwrap_or(usize::MAX),
            reachability(ctx),
        ),
        stats: Stats::default(),
        start_ns,
        rate: spec.rate_per_s,
        last_delivery_ns: AtomicU64::new(start_ns),
        deliveries_seen: AtomicU64::new(0),
    });
    slot.set(Some(phase.clone()));
    let ticker = tokio::spawn(timeline(ctx.clone(), phase.clone(), spec.clone(), total));
    let scheduler = {
        let (ctx, phase) = (ctx.clone(), phase.clone());
        let conns = routes.conns.to_vec();
        let sender_conn = routes.sender_conn.to_vec();
        tokio::task::spawn_blocking(move || schedule(&ctx, &phase, &conns, &sender_conn, total))
    };
    let _ = scheduler.await;
    // Drain until everything arrived, or nothing moved for `spec.drain` (then what is
    // missing is lost, not late), or the hard cap.
    let drain_start = Instant::now();
    let cap = Duration::from_secs(60).max(spec.duration * 2);
    let mut progress = phase.ledger.progress_mark();
    let mut progress_at = Instant::now();
    let settled = |phase: &Phase| phase.ledger.settled() && phase.ledger.missing() == 0;
    while !settled(&phase) && drain_start.elapsed() < cap {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mark = phase.ledger.progress_mark();
        if mark != progress {
            progress = mark;
            progress_at = Instant::now();
        } else if progress_at.elapsed() >= spec.drain {
            break;
        }
    }
    let settled = settled(&phase);
    let elapsed_s = (ctx.now_ns().saturating_sub(start_ns)) as f64 / 1e9;
    ticker.abort();
    let _ = ticker.await;
    let timeline = phase.stats.timeline();
    if ctx.progress {
        eprintln!();
    }
    // Give receiving tasks a moment to fold their last latencies.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let active_s = (phase
        .last_delivery_ns
        .load(Relaxed)
        .saturating_sub(start_ns)) as f64
        / 1e9;
    let result = PhaseResult {
        spec: spec.clone(),
        tally: phase.ledger.tally(),
        latencies: phase.stats.latencies(),
        errors: phase.stats.errors(),
        timeline,
        elapsed_s,
        active_s,
        settled,
    };
    slot.set(None);
    result
}

/// The scheduler wakes no more often than this: messages due within it go out together.
const SCHEDULE_GRANULARITY: Duration = Duration::from_micros(100);

/// Hands every message to its sender's connection at its scheduled time. Runs on a thread
/// of its own: tokio's timer has a 1 ms resolution, which would add up to a millisecond of
/// loadgen-made latency to every message.
fn schedule(ctx: &Arc<Ctx>, phase: &Arc<Phase>, conns: &[ConnTx], sender_conn: &[u32], total: u64) {
    let mut rng = Rng::new(ctx.seed ^ (u64::from(phase.index) << 32) ^ 0x5EED);
    let traffic = &ctx.traffic;
    let population = &ctx.population;
    let mut batches: Vec<Batch> = (0..conns.len()).map(|_| Vec::new()).collect();
    let mut next: u64 = 0;
    sleep_until_ns(ctx, phase.start_ns);
    while next < total {
        let elapsed = ctx.now_ns().saturating_sub(phase.start_ns) as f64;
        let due = (crate::rng::saturating_u64(elapsed * phase.rate / 1e9) + 1).min(total);
        while next < due {
            let pick = population.pick(&mut rng, traffic.interop_share, traffic.outbound_share);
            let sender_user = population.user_of_device(pick.sender);
            let info = SlotInfo {
                class: pick.class,
                sender: pick.sender,
                sender_user,
                recipient: pick.recipient,
                recipient_devices: population.device_count(pick.recipient),
                sender_devices: population.device_count(sender_user),
                size: traffic.sizes.draw(&mut rng),
            };
            phase.ledger.schedule(next, info);
            let conn = sender_conn
                .get(pick.sender as usize)
                .copied()
                .unwrap_or(u32::MAX);
            if let Some(batch) = batches.get_mut(conn as usize) {
                batch.push(Cmd::Envelope {
                    phase: phase.clone(),
                    seq: next,
                    typing: rng.chance(traffic.typing_share),
                });
            }
            next += 1;
        }
        for (conn, batch) in batches.iter_mut().enumerate() {
            if !batch.is_empty() {
                let _ = conns[conn].send(std::mem::take(batch));
            }
        }
        if next < total {
            let wake = phase.scheduled_ns(next);
            let earliest =
                ctx.now_ns() + u64::try_from(SCHEDULE_GRANULARITY.as_nanos()).unwrap_or(0);
            sleep_until_ns(ctx, wake.max(earliest));
        }
    }
}

fn sleep_until_ns(ctx: &Ctx, ns: u64) {
    let now = ctx.now_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

/// A device is reachable once its session is up (proxied devices always are).
fn reachability(ctx: &Arc<Ctx>) -> crate::ledger::Reachable {
    let ctx = ctx.clone();
    Box::new(move |user, device| {
        let index = ctx.population.device_index(user, device) as usize;
        ctx.online_since_ns
            .get(index)
            .is_some_and(|s| s.load(Relaxed) != 0)
    })
}

/// Every second: a timeline point (kept in the phase's stats, so aborting this task loses
/// none) and, on a terminal, the progress line.
async fn timeline(ctx: Arc<Ctx>, phase: Arc<Phase>, spec: PhaseSpec, total: u64) {
    let mut last_deliveries = 0;
    let mut last_ns = phase.start_ns;
    let mut tick = tokio::time::interval_at(
        ctx.instant_at(phase.start_ns + 1_000_000_000).into(),
        Duration::from_secs(1),
    );
    loop {
        tick.tick().await;
        let now_ns = ctx.now_ns();
        let deliveries = phase.ledger.deliveries();
        let (p99_us, _) = phase.stats.take_interval();
        let errors = phase.stats.errors().total();
        let dt = (now_ns - last_ns) as f64 / 1e9;
        let point = TimelinePoint {
            t_s: ((now_ns - phase.start_ns) as f64 / 1e9 * 10.0).round() / 10.0,
            sent: phase.ledger.sent(),
            deliveries,
            deliveries_per_s: ((deliveries - last_deliveries) as f64 / dt).round(),
            p99_us,
            errors,
        };
        phase.stats.push_point(point);
        if ctx.progress {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r[{}] {:>6.1}s  rate {:>8.0}/s  scheduled {:>9}/{}  delivered {:>10}  p99 {:>8}  errors {:<6}",
                spec.name,
                point.t_s,
                spec.rate_per_s,
                phase.ledger.scheduled(),
                total,
                deliveries,
                format_us(p99_us),
                errors
            );
            let _ = err.flush();
        }
        last_deliveries = deliveries;
        last_ns = now_ns;
    }
}

/// `1234` → `1.23ms`, for people.
pub fn format_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}us")
    }
}

/// The class of a message by its payload (for tests and tools).
pub fn class_of(payload: &[u8]) -> Option<Class> {
    PayloadHeader::read(payload).ok().map(|h| h.class)
}
