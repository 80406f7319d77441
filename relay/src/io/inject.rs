//! The control plane's way into the data plane: each request becomes a shard input sent
//! to the core that owns the user, through the same bounded inboxes the cores use.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use codec::{DeviceId, NetworkId, Notice, UserAddress};

use super::Shared;
use super::core::CoreMsg;
use crate::control::DataPlane;
use crate::core::shard::ShardInput;
use crate::core::{ConnId, shard_of};

/// A connection id no core has: where the acks of the control plane's own device lists go
/// (the control plane has already answered its caller).
const NOBODY: ConnId = ConnId {
    core: u16::MAX,
    slot: u32::MAX,
    generation: u32::MAX,
};

/// How long the control plane waits for a full inbox before giving up on one request.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct ShardInjector {
    /// Set once the cores run; until then there is no session to reach and no queue to
    /// change (recovery rebuilds queues from the log).
    shared: OnceLock<Arc<Shared>>,
}

impl ShardInjector {
    pub fn attach(&self, shared: Arc<Shared>) {
        let _ = self.shared.set(shared);
    }

    /// Hands `input` to the shard's core and waits until the core has handled it, so that
    /// what the control plane answers its caller is already true on the data plane.
    fn send(&self, shard: u16, input: ShardInput) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let index = usize::from(shard);
        let Some(sender) = shared.senders.get(index) else {
            return;
        };
        let (done, handled) = crossbeam_channel::bounded(1);
        let batch = vec![CoreMsg::Shard(input), CoreMsg::Barrier(done)];
        if sender.send_timeout(batch, SEND_TIMEOUT).is_err() {
            tracing::warn!(
                shard,
                "control plane: a core's inbox stayed full; request dropped"
            );
            return;
        }
        shared.notifies[index].notify_one();
        if handled.recv_timeout(SEND_TIMEOUT).is_err() {
            tracing::warn!(
                shard,
                "control plane: a core did not confirm a change in time"
            );
        }
    }

    fn shard_of(&self, user: &UserAddress) -> u16 {
        self.shared
            .get()
            .map_or(0, |shared| shard_of(user, shared.cores))
    }
}

fn encode_notice(notice: &Notice) -> Option<bytes::Bytes> {
    let mut out = BytesMut::new();
    codec::encode(&mut out, notice, &[]).ok()?;
    Some(out.freeze())
}

impl DataPlane for ShardInjector {
    fn set_devices(&self, user: UserAddress, devices: Vec<DeviceId>) {
        let request_id = codec::MessageId(crate::io::now_ms().into());
        self.send(
            self.shard_of(&user),
            ShardInput::DeviceList {
                request_id,
                user,
                devices,
                reply_to: NOBODY,
            },
        );
    }

    fn purge_interop(&self, user: UserAddress) {
        self.send(self.shard_of(&user), ShardInput::PurgeInterop { user });
    }

    fn notice_user(&self, user: UserAddress, notice: Notice) {
        if let Some(frame) = encode_notice(&notice) {
            self.send(self.shard_of(&user), ShardInput::NoticeUser { user, frame });
        }
    }

    fn notice_network(&self, network: NetworkId, notice: Notice, close: bool) {
        let Some(frame) = encode_notice(&notice) else {
            return;
        };
        // Every shard knows every server session: one tells them.
        self.send(
            0,
            ShardInput::NoticeNetwork {
                network,
                frame: frame.clone(),
                close,
            },
        );
        if close {
            // Direct device sessions are known to the shards of their users: all of them.
            let cores = self.shared.get().map_or(0, |shared| shared.cores);
            for shard in 0..cores {
                self.send(
                    shard,
                    ShardInput::CloseNetworkDevices {
                        network,
                        frame: frame.clone(),
                    },
                );
            }
        }
    }
}
