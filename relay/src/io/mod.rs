//! The IO shell: one thread per core, each running a tokio-uring runtime with its own
//! SO_REUSEPORT listener, its connections and its shard. Only this module touches sockets,
//! threads and the clock; `crate::core` gets the time as an argument.

pub mod admission;
pub mod conn;
pub mod inject;
pub mod shared;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod worker;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Notify;

use self::shared::Batch;
pub use self::shared::Shared;
use self::worker::Worker;
use crate::config::Config;
use crate::core::log::Durability;
use crate::core::shard::Shard;
use crate::metrics::{Connections, CoreMetrics};
use crate::tables::auth::Auth;
use crate::tables::policy::Policy;

pub use devkit::now_ms;

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    pub listen: SocketAddr,
    pub shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// The device-token journal (none at the `memory` level): stopped after the cores.
    pub tokens: Option<tokens::TokenJournal>,
}

impl Relay {
    /// Binds every core's listener, starts the cores, and returns once all accept; the
    /// network table and the policy are the configuration's, with no control plane.
    pub fn start(config: &Config) -> Result<Relay, String> {
        let (_, networks) = config.resolve_identities()?;
        let auth = Arc::new(Auth::new(networks, config.limits.token_ids_max as usize)?);
        let policy = Arc::new(Policy::new(config.interop.enforce));
        Relay::start_with(config, auth, policy)
    }

    /// [`Relay::start`] with the network table and policy a control plane keeps.
    pub fn start_with(
        config: &Config,
        auth: Arc<Auth>,
        policy: Arc<Policy>,
    ) -> Result<Relay, String> {
        let (tls_paths, _) = config.resolve_identities()?;
        let tls = tls::server_config(&tls_paths, &auth)?;
        policy
            .caps()
            .set_defaults(crate::tables::caps::CapDefaults::of(&config.limits));
        let cores = config.cores;
        let mut senders = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..cores {
            let (tx, rx) =
                crossbeam_channel::bounded(config.limits.cross_core_inbox_batches_max as usize);
            senders.push(tx);
            inboxes.push(rx);
        }
        if config.durability != Durability::Memory {
            store::check_layout(&config.data_dir, cores)?;
        }
        // Token ids seen before a restart are back before the first handshake.
        let journal = match config.durability {
            Durability::Memory => None,
            durability => Some(tokens::TokenJournal::open(
                &config.data_dir,
                &auth,
                durability == Durability::Fsync,
                config.limits.token_journal_pending_max,
                now_ms(),
            )?),
        };
        let shared = Arc::new(Shared {
            cores,
            limits: config.limits,
            durability: config.durability,
            data_dir: config.data_dir.clone(),
            auth,
            policy,
            tls,
            senders,
            notifies: (0..cores).map(|_| Arc::new(Notify::new())).collect(),
            control: (0..cores).map(|_| Arc::new(Notify::new())).collect(),
            metrics: (0..cores)
                .map(|_| Arc::new(CoreMetrics::default()))
                .collect(),
            connections: Connections::default(),
            stopping: AtomicBool::new(false),
            shards_open: tokio::sync::Barrier::new(usize::from(cores)),
            sources: admission::Sources::default(),
        });
        let first =
            bind_reuseport(config.listen).map_err(|e| format!("listen {}: {e}", config.listen))?;
        let listen = first.local_addr().map_err(|e| e.to_string())?;
        let mut listeners = vec![first];
        for _ in 1..cores {
            listeners.push(bind_reuseport(listen).map_err(|e| format!("listen {listen}: {e}"))?);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for (index, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let index = u16::try_from(index).map_err(|_| "too many cores".to_string())?;
            let thread = std::thread::Builder::new()
                .name(format!("relay-core-{index}"))
                .spawn(move || run_core(index, shared, listener, inbox, ready))
                .map_err(|e| format!("starting core {index}: {e}"))?;
            threads.push(thread);
        }
        drop(ready_tx);
        for _ in 0..cores {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| "a core failed to start (is io_uring available?)".to_string())??;
        }
        Ok(Relay {
            listen,
            shared,
            threads,
            tokens: journal,
        })
    }

    /// Stops accepting, tells every client, flushes what is pending, and joins the cores.
    pub fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        for control in &self.shared.control {
            control.notify_one();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
        if let Some(journal) = self.tokens {
            journal.stop();
        }
    }
}

/// The core's shard: empty at the memory level, else rebuilt from its log directory.
fn open_shard(index: u16, shared: &Shared) -> Result<(Shard, Option<store::ShardDir>), String> {
    if shared.durability == Durability::Memory {
        let mut shard = Shard::new(shared.limits);
        shard.share_caps(shared.policy.caps().clone());
        return Ok((shard, None));
    }
    let mut dir = store::ShardDir::new(&shared.data_dir, index);
    let started = std::time::Instant::now();
    let (shard, report) = Shard::recover(
        shared.limits,
        shared.limits.log_segment_bytes_max,
        &mut dir,
        now_ms(),
    )
    .map_err(|e| format!("recovering shard {index} from {}: {e}", dir.dir.display()))?;
    let elapsed = started.elapsed();
    let rate = report.records as f64 / elapsed.as_secs_f64().max(1e-9);
    tracing::info!(
        shard = index,
        "recovered {} queued frames from {} records in {} segments ({} bytes) in {:.3} s ({rate:.0} records/s); {} expired while down",
        report.restored_frames,
        report.records,
        report.segments,
        report.bytes,
        elapsed.as_secs_f64(),
        report.expired
    );
    for (segment, offset) in &report.torn_tails {
        tracing::warn!(
            shard = index,
            "segment {segment}: torn record at offset {offset} cut off (a write interrupted by a crash)"
        );
    }
    log_damage(index, &dir, &report);
    let m = &shared.metrics[usize::from(index)];
    m.recovered_frames
        .store(report.restored_frames, Ordering::Relaxed);
    m.log_quarantined_segments
        .store(dir.quarantined_count(), Ordering::Relaxed);
    let damaged = &report.damaged;
    m.log_damaged_bytes.store(
        damaged.iter().map(|d| d.lost_bytes()).sum(),
        Ordering::Relaxed,
    );
    m.log_rescued_frames
        .store(damaged.iter().map(|d| d.frames).sum(), Ordering::Relaxed);
    let mut shard = shard;
    shard.share_caps(shared.policy.caps().clone());
    Ok((shard, Some(dir)))
}

/// One error line per damaged segment, with what it held and where it is now.
fn log_damage(
    index: u16,
    dir: &store::ShardDir,
    report: &crate::core::shard::recovery::RecoveryReport,
) {
    for damaged in &report.damaged {
        let ranges: Vec<String> = damaged
            .ranges
            .iter()
            .map(|r| {
                let after = if r.resumed {
                    format!("read on from {}", r.end)
                } else {
                    "nothing after it could be read".to_string()
                };
                format!(
                    "{} at offset {} ({} bytes lost, {after})",
                    r.what,
                    r.offset,
                    r.end - r.offset
                )
            })
            .collect();
        tracing::error!(
            shard = index,
            "segment {}: {}; {} bytes, {} intact records holding {} queued frames, rescued and stored again ({} bytes); segment moved to {}; `relay log inspect` shows its records",
            damaged.segment,
            ranges.join("; "),
            damaged.bytes,
            damaged.records,
            damaged.frames,
            report.rescued_bytes,
            dir.quarantine_dir()
                .join(format!("{:020}.log", damaged.segment))
                .display(),
        );
    }
    if !report.rewritten.is_empty() {
        tracing::warn!(
            shard = index,
            "segments {:?} held frames a damaged segment had released: their live records were stored again and they were deleted",
            report.rewritten
        );
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// How long stopping waits for connections to flush before the core exits anyway.
const STOP_GRACE: Duration = Duration::from_secs(3);

fn run_core(
    index: u16,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    inbox: crossbeam_channel::Receiver<Batch>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio_uring::start(async move {
            let (shard, log_dir) = match open_shard(index, &shared) {
                Ok(opened) => opened,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let core = Rc::new(Worker::new(index, shared.clone(), inbox, shard, log_dir));
            tokio_uring::spawn(core.clone().run_committer());
            tokio_uring::spawn(core.clone().run_loader());
            let listener = tokio_uring::net::TcpListener::from_std(listener);
            tokio_uring::spawn(core.clone().run_inbox());
            tokio_uring::spawn(core.clone().run_timers());
            tokio_uring::spawn(core.clone().run_flusher());
            let _ = ready.send(Ok(()));
            shared.shards_open.wait().await;
            let control = shared.control[usize::from(index)].clone();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            if let Some(admitted) = core.admit(peer.ip()) {
                                tokio_uring::spawn(conn::serve(core.clone(), stream, admitted));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(core = index, "accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                    () = control.notified() => {
                        if shared.stopping.load(Ordering::Acquire) {
                            break;
                        }
                    }
                }
            }
            drop(listener);
            let conns = core.conns.borrow().all();
            for conn in conns {
                conn.shut_down(&core);
            }
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while !core.conns.borrow().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }));
    if started.is_err() {
        tracing::error!(core = index, "core stopped by a panic");
    }
}
