//! What goes into a shard and what comes out of it: the inputs sessions and the control
//! plane send, the outputs the IO shell carries out, and the counters it keeps.

use bytes::Bytes;
use codec::{DeviceAddress, DeviceId, ErrorCode, MessageId, NetworkId, UserAddress};

use crate::core::{ConnId, DeviceSet};

/// An envelope or receipt on its way to the shard of its recipient.
#[derive(Debug, Clone)]
pub struct Routed {
    pub sender: DeviceAddress,
    pub recipient: UserAddress,
    /// `Some` for an explicit device list, which must equal the current set.
    pub listed: Option<DeviceSet>,
    pub id: MessageId,
    /// Delivered to bound devices only, never queued.
    pub ephemeral: bool,
    pub ttl_seconds: u32,
    /// The whole frame, as received.
    pub frame: Bytes,
    /// Where the relay's `Ack` goes.
    pub reply_to: ConnId,
}

/// Identifies one control-plane change, so that its outcome ([`ShardOutput::Applied`])
/// finds the caller waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// A change the control plane asks of the shard that owns a user (or of every shard).
#[derive(Debug, Clone)]
pub enum ControlChange {
    /// Replace the user's device set; devices removed lose their queues.
    SetDevices {
        user: UserAddress,
        devices: Vec<DeviceId>,
    },
    /// The user opted out: delete every queued frame that came from another network.
    PurgeInterop { user: UserAddress },
    /// Write `frame` (an encoded `Notice`) to the user's connected devices and to its
    /// network's server sessions.
    NoticeUser { user: UserAddress, frame: Bytes },
    /// Write `frame` to the network's server sessions (sent to one shard only: every shard
    /// knows them all); `close` ends those sessions after it.
    NoticeNetwork {
        network: NetworkId,
        frame: Bytes,
        close: bool,
    },
    /// The network is suspended: write `frame` to the direct device sessions of its users on
    /// this shard, then close them (sent to every shard).
    CloseNetworkDevices { network: NetworkId, frame: Bytes },
}

/// Work for a shard.
#[derive(Debug, Clone)]
pub enum ShardInput {
    Envelope(Routed),
    Receipt(Routed),
    Signal {
        recipient: UserAddress,
        frame: Bytes,
    },
    DeviceAck {
        device: DeviceAddress,
        id: MessageId,
    },
    /// A server session declares a user's device set (`DeviceList`).
    DeviceList {
        request_id: MessageId,
        user: UserAddress,
        devices: Vec<DeviceId>,
        reply_to: ConnId,
    },
    AttachDevice {
        device: DeviceAddress,
        conn: ConnId,
    },
    DetachDevice {
        device: DeviceAddress,
        conn: ConnId,
    },
    AttachServer {
        network: NetworkId,
        conn: ConnId,
    },
    DetachServer {
        network: NetworkId,
        conn: ConnId,
    },
    /// A change from the control plane; answered by [`ShardOutput::Applied`] once it holds
    /// (for a logged change, once its record is stored).
    Control {
        ticket: Ticket,
        change: ControlChange,
    },
}

/// Why the relay refused an envelope, receipt or device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub retry_after_ms: u32,
    /// Filled for `DEVICE_LIST_STALE`.
    pub current_devices: DeviceSet,
}

impl Refusal {
    pub fn new(code: ErrorCode) -> Refusal {
        Refusal {
            code,
            retry_after_ms: 0,
            current_devices: DeviceSet::new(),
        }
    }

    /// The log failed: nothing more is acknowledged until a restart on a working disk.
    pub fn storage_unavailable() -> Refusal {
        Refusal {
            retry_after_ms: 1000,
            ..Refusal::new(ErrorCode::StorageUnavailable)
        }
    }
}

/// What a relay `Ack` answers: a routed envelope or receipt (what a session's in-flight bound
/// counts), or a server's `DeviceList`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOf {
    Routed,
    DeviceList,
}

/// What the shard asks the IO shell to do.
#[derive(Debug, Clone)]
pub enum ShardOutput {
    /// Write a `Delivery` of `frame` for `device`.
    Deliver {
        conn: ConnId,
        device: DeviceAddress,
        seq: u64,
        ephemeral: bool,
        frame: Bytes,
    },
    /// Write the relay's `Ack` for `id` (sent by `address`).
    Ack {
        conn: ConnId,
        of: AckOf,
        id: MessageId,
        address: DeviceAddress,
        result: Result<(), Refusal>,
    },
    /// Close the connection with an error (e.g. a device past the user's device limit).
    Close { conn: ConnId, code: ErrorCode },
    /// Write an encoded frame of the relay's own (a `Notice`) as it is.
    Send { conn: ConnId, frame: Bytes },
    /// Read a spilled frame back from the log, then call `Shard::on_loaded`.
    Load {
        device: DeviceAddress,
        seq: u64,
        segment: u64,
        offset: u64,
        len: u32,
    },
    /// The control change with `ticket` holds (or could not be applied).
    Applied {
        ticket: Ticket,
        result: Result<(), Refusal>,
    },
}

impl ShardOutput {
    /// The connection the output is for; `None` for the shell's own work (loads, control
    /// answers).
    pub fn conn(&self) -> Option<ConnId> {
        match self {
            ShardOutput::Deliver { conn, .. }
            | ShardOutput::Ack { conn, .. }
            | ShardOutput::Close { conn, .. }
            | ShardOutput::Send { conn, .. } => Some(*conn),
            ShardOutput::Load { .. } | ShardOutput::Applied { .. } => None,
        }
    }
}

/// Counters a shard keeps for `/metrics` and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub delivered: u64,
    pub released: u64,
    pub expired: u64,
    pub deleted: u64,
    pub signals: u64,
    pub queued_frames: u64,
    pub queued_bytes: u64,
    /// Bytes of queued frames held in memory (the rest are only in the log).
    pub ram_bytes: u64,
    /// Frames moved out of memory (their bytes stay in the log), and read back.
    pub spilled: u64,
    pub loads: u64,
    /// Frames deleted because their recipient opted out of interop.
    pub purged: u64,
}
