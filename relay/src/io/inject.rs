//! The control plane's way into the data plane: each change becomes a control input for the
//! shard that owns the user, sent through the same bounded inboxes the cores use, and the
//! caller waits for the shard's answer ([`ShardOutput::Applied`], sent once the change holds
//! and, for a logged change, once its record is stored).
//!
//! A change either holds or was never applied: if no core takes it before
//! `CONTROL_TAKE_TIMEOUT`, the control plane abandons it, and a core that gets to it later
//! finds it abandoned and skips it ([`ControlReply`]).
//!
//! [`ShardOutput::Applied`]: crate::core::shard::interface::ShardOutput::Applied

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use codec::{DeviceId, ErrorCode, NetworkId, Notice, UserAddress};
use crossbeam_channel::RecvTimeoutError;

use super::shared::{ControlReply, Shared, WorkerMsg};
use crate::control::{ApiError, ApiResult, DataPlane};
use crate::core::shard::interface::{ControlChange, Ticket};
use crate::core::shard_of;
use crate::limits::{CONTROL_COMMIT_TIMEOUT, CONTROL_TAKE_TIMEOUT};

#[derive(Debug, Default)]
pub struct ShardInjector {
    /// Set once the cores run; until then there is no session to reach and no queue to
    /// change (recovery rebuilds queues from the log).
    shared: OnceLock<Arc<Shared>>,
    next_ticket: AtomicU64,
}

fn unavailable(shard: u16, why: &str) -> ApiError {
    tracing::warn!(shard, "control plane: {why}");
    ApiError::new(
        ErrorCode::DataPlaneUnavailable,
        format!("the data plane (core {shard}) {why}; nothing was changed, retry later"),
    )
}

impl ShardInjector {
    pub fn attach(&self, shared: Arc<Shared>) {
        let _ = self.shared.set(shared);
    }

    /// Hands `change` to the shard's core and waits until it holds there, so that what the
    /// control plane answers its caller is already true on the data plane.
    fn send(&self, shard: u16, change: ControlChange) -> ApiResult<()> {
        let Some(shared) = self.shared.get() else {
            return Ok(());
        };
        let index = usize::from(shard);
        let Some(sender) = shared.senders.get(index) else {
            return Err(unavailable(shard, "does not exist"));
        };
        let ticket = Ticket(self.next_ticket.fetch_add(1, Ordering::Relaxed));
        let (answer, answered) = crossbeam_channel::bounded(1);
        let reply = Arc::new(ControlReply::new(answer));
        let batch = vec![WorkerMsg::Control {
            ticket,
            change,
            reply: reply.clone(),
        }];
        if sender.send_timeout(batch, CONTROL_TAKE_TIMEOUT).is_err() {
            return Err(unavailable(shard, "kept its inbox full"));
        }
        shared.notifies[index].notify_one();
        let result = match answered.recv_timeout(CONTROL_TAKE_TIMEOUT) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) if reply.abandon() => {
                return Err(unavailable(shard, "did not take the change in time"));
            }
            // Taken: the change holds in memory; wait for its record to be stored.
            Err(RecvTimeoutError::Timeout) => match answered.recv_timeout(CONTROL_COMMIT_TIMEOUT) {
                Ok(result) => result,
                Err(_) => {
                    // The one answer that is not "all or nothing": the shard holds the change
                    // in memory and stores it unless its disk fails (then the shard refuses
                    // everything until a restart recovers the state before the change).
                    tracing::error!(
                        shard,
                        "control plane: a core took a change but did not confirm it stored in {CONTROL_COMMIT_TIMEOUT:?}"
                    );
                    return Err(ApiError::new(
                        ErrorCode::DataPlaneUnavailable,
                        format!(
                            "the data plane (core {shard}) took the change but has not confirmed it stored; \
                             the control record was not changed; retry later"
                        ),
                    ));
                }
            },
            Err(RecvTimeoutError::Disconnected) => {
                return Err(unavailable(shard, "stopped"));
            }
        };
        result.map_err(|refusal| {
            let message = format!(
                "the data plane (core {shard}) refused the change: {}",
                refusal.code.name()
            );
            match refusal.code {
                ErrorCode::StorageUnavailable => ApiError::new(refusal.code, message),
                ErrorCode::DeviceLimit => ApiError::new(refusal.code, message),
                // The caps per network and per shard (`tables::caps`), with their hint.
                ErrorCode::NetworkUserLimit
                | ErrorCode::NetworkDeviceLimit
                | ErrorCode::DeviceSetRateLimited
                | ErrorCode::ShardUserLimit => {
                    let mut error = ApiError::new(refusal.code, message);
                    if refusal.retry_after_ms > 0 {
                        error.retry_after_s =
                            Some(u64::from(refusal.retry_after_ms).div_ceil(1000));
                    }
                    error
                }
                _ => ApiError::new(ErrorCode::DataPlaneUnavailable, message),
            }
        })
    }

    fn shard_of(&self, user: &UserAddress) -> u16 {
        self.shared
            .get()
            .map_or(0, |shared| shard_of(user, shared.cores))
    }
}

fn encode_notice(notice: &Notice) -> ApiResult<bytes::Bytes> {
    let mut out = BytesMut::new();
    codec::encode(&mut out, notice, &[])
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("encoding a notice: {e}")))?;
    Ok(out.freeze())
}

impl DataPlane for ShardInjector {
    fn set_devices(&self, user: UserAddress, devices: Vec<DeviceId>) -> ApiResult<()> {
        let shard = self.shard_of(&user);
        self.send(shard, ControlChange::SetDevices { user, devices })
    }

    fn purge_interop(&self, user: UserAddress) -> ApiResult<()> {
        let shard = self.shard_of(&user);
        self.send(shard, ControlChange::PurgeInterop { user })
    }

    fn notice_user(&self, user: UserAddress, notice: Notice) -> ApiResult<()> {
        let frame = encode_notice(&notice)?;
        let shard = self.shard_of(&user);
        self.send(shard, ControlChange::NoticeUser { user, frame })
    }

    fn notice_network(&self, network: NetworkId, notice: Notice, close: bool) -> ApiResult<()> {
        let frame = encode_notice(&notice)?;
        // Every shard knows every server session: one tells them.
        self.send(
            0,
            ControlChange::NoticeNetwork {
                network,
                frame: frame.clone(),
                close,
            },
        )?;
        if close {
            // Direct device sessions are known to the shards of their users: all of them.
            let cores = self.shared.get().map_or(0, |shared| shared.cores);
            for shard in 0..cores {
                self.send(
                    shard,
                    ControlChange::CloseNetworkDevices {
                        network,
                        frame: frame.clone(),
                    },
                )?;
            }
        }
        Ok(())
    }
}
