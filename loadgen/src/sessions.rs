//! What the relay and MQTT harnesses share once their sessions are open: the writers'
//! queues and the reader and writer tasks, the phase counter, and the offline devices'
//! comeback during a phase. A [`Connector`] is the protocol's part: opening a device's
//! session and starting its tasks.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::phase::{ConnTx, Ctx, PhaseResult, PhaseSlot, PhaseSpec, Routes, run_phase};
use crate::rng::mix64;

/// Offline devices come back spread over this share of the phase's duration.
const OFFLINE_RETURN_SPREAD: f64 = 0.25;

/// The reader and writer tasks of every session.
pub type Tasks = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// How one protocol opens device sessions and runs them.
pub trait Connector: Send + Sync + 'static {
    type Conn: Send + 'static;

    /// One session per device, in the order given.
    fn open_devices(
        &self,
        ctx: &Arc<Ctx>,
        devices: &[u32],
    ) -> impl Future<Output = Result<Vec<Self::Conn>, String>> + Send;

    /// Starts a session's writer and reader; returns the writer's queue.
    fn spawn(&self, ctx: &Arc<Ctx>, slot: &PhaseSlot, tasks: &Tasks, conn: Self::Conn) -> ConnTx;
}

/// Which of a proxy network's `per_network` server sessions carries `device`'s traffic: by
/// hash, as the relay spreads devices over them.
pub fn server_session_of(device: u32, per_network: u32) -> u32 {
    u32::try_from(mix64(u64::from(device)) % u64::from(per_network)).unwrap_or(0)
}

/// The running sessions of a population.
pub struct Sessions<C: Connector> {
    ctx: Arc<Ctx>,
    slot: PhaseSlot,
    connector: Arc<C>,
    conns: Vec<ConnTx>,
    sender_conn: Vec<u32>,
    tasks: Tasks,
    offline: Mutex<Vec<u32>>,
    next_phase: AtomicU32,
}

impl<C: Connector> Sessions<C> {
    /// Marks the devices online that are, and starts the tasks of `conns`.
    /// `sender_conn[device]` is the index in `conns` of the session that sends for `device`;
    /// the `offline` devices come back during the first phase that asks for it.
    pub fn start(
        ctx: Arc<Ctx>,
        connector: C,
        conns: Vec<C::Conn>,
        sender_conn: Vec<u32>,
        offline: Vec<u32>,
    ) -> Sessions<C> {
        let population = &ctx.population;
        for device in 0..population.devices() {
            if !population.is_offline(device) {
                ctx.set_online(device);
            }
        }
        let slot = PhaseSlot::default();
        let tasks = Tasks::default();
        let conns = conns
            .into_iter()
            .map(|conn| connector.spawn(&ctx, &slot, &tasks, conn))
            .collect();
        Sessions {
            ctx,
            slot,
            connector: Arc::new(connector),
            conns,
            sender_conn,
            tasks,
            offline: Mutex::new(offline),
            next_phase: AtomicU32::new(1),
        }
    }

    /// Runs one phase. With `offline_return`, the offline devices reconnect that long after
    /// the phase starts (once per run).
    pub async fn run_phase(
        &self,
        spec: &PhaseSpec,
        offline_return: Option<Duration>,
    ) -> PhaseResult {
        let index = self.next_phase.fetch_add(1, Ordering::Relaxed);
        let returning = match offline_return {
            Some(_) => {
                std::mem::take(&mut *self.offline.lock().unwrap_or_else(PoisonError::into_inner))
            }
            None => Vec::new(),
        };
        let comeback = (!returning.is_empty()).then(|| {
            tokio::spawn(comeback(
                self.ctx.clone(),
                self.slot.clone(),
                self.tasks.clone(),
                self.connector.clone(),
                returning,
                offline_return.unwrap_or_default(),
                spec.duration.mul_f64(OFFLINE_RETURN_SPREAD),
            ))
        });
        let routes = Routes {
            conns: &self.conns,
            sender_conn: &self.sender_conn,
        };
        let result = run_phase(&self.ctx, &self.slot, &routes, spec, index).await;
        if let Some(handle) = comeback {
            let _ = handle.await;
        }
        result
    }

    /// Closes every session: the writers see their queues close, and whatever still runs
    /// after a grace period is aborted.
    pub async fn close(self) {
        drop(self.conns);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            task.abort();
        }
    }
}

/// Brings `devices` back one by one from `delay` on, spread over `spread`, as devices do; all
/// at once would be a reconnect storm, another scenario.
async fn comeback<C: Connector>(
    ctx: Arc<Ctx>,
    slot: PhaseSlot,
    tasks: Tasks,
    connector: Arc<C>,
    devices: Vec<u32>,
    delay: Duration,
    spread: Duration,
) {
    let start = Instant::now() + delay;
    let count = u32::try_from(devices.len()).unwrap_or(u32::MAX).max(1);
    for (i, &device) in devices.iter().enumerate() {
        let at = start + spread * u32::try_from(i).unwrap_or(0) / count;
        tokio::time::sleep_until(at.into()).await;
        match connector.open_devices(&ctx, &[device]).await {
            Ok(sessions) => {
                for conn in sessions {
                    ctx.set_online(device);
                    let _ = connector.spawn(&ctx, &slot, &tasks, conn);
                }
            }
            Err(e) => {
                if let Some(p) = slot.current() {
                    p.stats
                        .error_other(format!("offline device reconnect: {e}"));
                }
            }
        }
    }
}
