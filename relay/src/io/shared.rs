//! What the cores share and what they send each other: the read-only configuration and
//! tables, each core's bounded inbox of batches ([`WorkerMsg`]), wake-ups and counters, and
//! the reply slot a control-plane change carries ([`ControlReply`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crossbeam_channel::Sender;
use rustls::ServerConfig;
use tokio::sync::Notify;

use crate::core::log::Durability;
use crate::core::shard::interface::{ControlChange, Refusal, ShardInput, ShardOutput, Ticket};
use crate::limits::RelayLimits;
use crate::metrics::{Connections, CoreMetrics};
use crate::tables::auth::Auth;
use crate::tables::policy::Policy;

/// What every core shares: read-only configuration, the inboxes of the others, counters.
#[derive(Debug)]
pub struct Shared {
    pub cores: u16,
    pub limits: RelayLimits,
    pub durability: Durability,
    pub data_dir: std::path::PathBuf,
    pub auth: Arc<Auth>,
    pub policy: Arc<Policy>,
    pub tls: Arc<ServerConfig>,
    pub senders: Vec<Sender<Batch>>,
    /// Wakes a core's inbox task.
    pub notifies: Vec<Arc<Notify>>,
    /// Wakes a core's accept loop (to stop it).
    pub control: Vec<Arc<Notify>>,
    pub metrics: Vec<Arc<CoreMetrics>>,
    pub connections: Connections,
    pub stopping: AtomicBool,
    /// Every core waits here, once its shard is open and counted in the caps per network,
    /// before it accepts a connection: until every shard has counted the users it recovered,
    /// a network's figures are short and a new user could take it past its cap.
    pub shards_open: tokio::sync::Barrier,
    /// Unauthenticated connections per source address, every core's together.
    pub sources: super::admission::Sources,
}

/// Work one core hands another.
#[derive(Debug)]
pub enum WorkerMsg {
    Shard(ShardInput),
    Conn(ShardOutput),
    /// A control-plane change for this core's shard, and who waits for its outcome.
    Control {
        ticket: Ticket,
        change: ControlChange,
        reply: Arc<ControlReply>,
    },
    /// Answered once everything before it in this core's inbox has been handled (its outputs
    /// handed on, or, while another core's inbox is full, waiting in the outgoing batches for
    /// the flusher): tests and tools use it to know a core has caught up.
    Barrier(crossbeam_channel::Sender<()>),
    /// Fault injection for tests: the core says it stopped (`entered`), then its thread waits
    /// until `release` is signalled or dropped: a stalled core, as a hung disk or a bug makes.
    Hold {
        entered: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    },
}

pub type Batch = Vec<WorkerMsg>;

const PENDING: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// The control plane's side of one change: where its outcome goes, and whether anyone still
/// waits for it. Exactly one of [`ControlReply::take`] (the core) and
/// [`ControlReply::abandon`] (the control plane, on its deadline) wins, so a change the
/// control plane reported as not applied is never applied later.
#[derive(Debug)]
pub struct ControlReply {
    state: AtomicU8,
    answer: crossbeam_channel::Sender<Result<(), Refusal>>,
}

impl ControlReply {
    pub fn new(answer: crossbeam_channel::Sender<Result<(), Refusal>>) -> ControlReply {
        ControlReply {
            state: AtomicU8::new(PENDING),
            answer,
        }
    }

    /// The core takes the change; `false`: the control plane gave up, apply nothing.
    pub fn take(&self) -> bool {
        self.state
            .compare_exchange(PENDING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The control plane gives up; `false`: the core took the change already.
    pub fn abandon(&self) -> bool {
        self.state
            .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn answer(&self, result: Result<(), Refusal>) {
        let _ = self.answer.try_send(result);
    }
}
