//! Delivery: an envelope or receipt accepted into every target device's queue (or refused
//! with a reason), signals to whoever is connected, the delivery window each device's queue
//! is written through, releases on the device's `Ack`, purges and TTL expiry.

use std::cmp::Reverse;
use std::collections::VecDeque;

use bytes::Bytes;
use codec::{DeviceAddress, ErrorCode, MessageId, UserAddress};

use super::Shard;
use super::interface::{AckOf, Refusal, Routed, ShardOutput, ShardStats};
use super::state::DeviceState;
use crate::core::queue::Queued;
use crate::limits::RelayLimits;

/// Stale expiry entries tolerated before compaction, beyond twice the queued frames.
const EXPIRY_SLACK: u64 = 4096;

impl Shard {
    fn refuse(&mut self, routed: &Routed, refusal: Refusal) {
        self.stats.refused += 1;
        self.out.push_back(ShardOutput::Ack {
            conn: routed.reply_to,
            of: AckOf::Routed,
            id: routed.id,
            address: routed.sender,
            result: Err(refusal),
        });
    }

    pub(super) fn enqueue(&mut self, now_ms: u64, routed: Routed) {
        if self.log_failed() {
            return self.refuse(&routed, Refusal::storage_unavailable());
        }
        let Some(state) = self
            .dir
            .users
            .get(&routed.recipient)
            .filter(|s| !s.devices.is_empty())
        else {
            return self.refuse(&routed, Refusal::new(ErrorCode::RecipientUnknown));
        };
        if self.dedup.contains(routed.sender, routed.id) {
            self.stats.duplicates += 1;
            // The first copy may not be stored yet: this ack waits for it too.
            return self.emit_when_stored(ShardOutput::Ack {
                conn: routed.reply_to,
                of: AckOf::Routed,
                id: routed.id,
                address: routed.sender,
                result: Ok(()),
            });
        }
        let current = state.device_set();
        if let Some(listed) = &routed.listed
            && !current.same_members(listed.as_slice())
        {
            let refusal = Refusal {
                current_devices: current,
                ..Refusal::new(ErrorCode::DeviceListStale)
            };
            return self.refuse(&routed, refusal);
        }
        if routed.ephemeral {
            self.deliver_ephemeral(routed.recipient, &routed.frame);
        } else {
            let frame_bytes = routed.frame.len() as u64;
            let fan_out = current.len() as u64;
            let depth_full = state
                .devices
                .iter()
                .any(|d| d.queue.len() >= self.limits.device_queue_depth_max as usize);
            // Without a log, everything queued is in memory: the memory budget bounds it too.
            let bytes_max = match self.log {
                Some(_) => self.limits.shard_queued_bytes_max,
                None => self
                    .limits
                    .shard_queued_bytes_max
                    .min(self.limits.shard_ram_bytes_max),
            };
            if depth_full || self.stats.queued_bytes + frame_bytes * fan_out > bytes_max {
                let refusal = Refusal {
                    retry_after_ms: 100,
                    ..Refusal::new(ErrorCode::QueueFull)
                };
                return self.refuse(&routed, refusal);
            }
            let ttl_seconds = routed.ttl_seconds.clamp(1, self.limits.ttl_seconds_max);
            let expires_at_ms = now_ms + u64::from(ttl_seconds) * 1000;
            self.queue_for_every_device(now_ms, expires_at_ms, &routed);
        }
        self.dedup.insert(now_ms, routed.sender, routed.id);
        self.stats.accepted += 1;
        self.compact_expiry();
        self.emit_when_stored(ShardOutput::Ack {
            conn: routed.reply_to,
            of: AckOf::Routed,
            id: routed.id,
            address: routed.sender,
            result: Ok(()),
        });
    }

    /// Appends the frame to the queue of each of the recipient's devices (one log record for
    /// all of them) and writes it to those within their window.
    fn queue_for_every_device(&mut self, now_ms: u64, expires_at_ms: u64, routed: &Routed) {
        let Some(state) = self.dir.users.get_mut(&routed.recipient) else {
            return;
        };
        let (segment, offset, lsn) = Shard::log_enqueue(
            self.log.as_mut(),
            now_ms,
            expires_at_ms,
            routed,
            &state.devices,
        );
        let len = u32::try_from(routed.frame.len()).unwrap_or(u32::MAX);
        for dev in &mut state.devices {
            let seq = dev.next_seq;
            dev.next_seq += 1;
            let item = Queued {
                seq,
                id: routed.id,
                sender: routed.sender,
                expires_at_ms,
                segment,
                offset,
                lsn,
                len,
                frame: Some(routed.frame.clone()),
                loading: false,
            };
            Shard::entered_queue(&mut self.stats, self.log.as_mut(), &item);
            dev.queue.push(item);
            self.expiry
                .push(Reverse((expires_at_ms, routed.recipient, dev.id, seq)));
            let address = routed.recipient.device(dev.id);
            Shard::pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
            if dev.bound.is_none() {
                self.dir.offline.insert(address);
            }
        }
        // No spilling here: these frames are not stored yet; the next commit spills.
    }

    /// Writes an ephemeral frame to each of the user's connected devices; nothing is queued.
    fn deliver_ephemeral(&mut self, recipient: UserAddress, frame: &Bytes) -> u64 {
        let Some(state) = self.dir.users.get(&recipient) else {
            return 0;
        };
        let mut written = 0;
        for dev in &state.devices {
            if let Some(conn) = dev.bound {
                self.out.push_back(ShardOutput::Deliver {
                    conn,
                    device: recipient.device(dev.id),
                    seq: 0,
                    ephemeral: true,
                    frame: frame.clone(),
                });
                written += 1;
            }
        }
        written
    }

    pub(super) fn signal(&mut self, recipient: UserAddress, frame: Bytes) {
        self.stats.signals += self.deliver_ephemeral(recipient, &frame);
    }

    /// The device acknowledged `id`: it leaves the queue and the next frame may go.
    pub(super) fn release(&mut self, device: DeviceAddress, id: MessageId) {
        let Some(dev) = self.dir.device_mut(&device) else {
            return;
        };
        let Some(item) = dev.queue.remove_id(id) else {
            return;
        };
        self.stats.released += 1;
        Shard::pump(dev, device, &self.limits, &mut self.out, &mut self.stats);
        self.log_release(device, &item, false);
    }

    /// Deletes (and logs the release of) every queued frame for `user` whose sender is on
    /// another network: what opting out of interop removes.
    pub(super) fn purge_interop(&mut self, user: UserAddress) {
        let doomed: Vec<(DeviceAddress, MessageId)> = self
            .dir
            .users
            .get(&user)
            .map(|state| {
                state
                    .devices
                    .iter()
                    .flat_map(|dev| {
                        dev.queue
                            .iter()
                            .filter(|item| item.sender.network != user.network)
                            .map(move |item| (user.device(dev.id), item.id))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (device, id) in doomed {
            self.stats.purged += 1;
            self.release(device, id);
        }
    }

    /// Removes every queued frame whose TTL ran out by `now_ms`.
    pub(super) fn expire(&mut self, now_ms: u64) {
        while let Some(&Reverse((at, user, device, seq))) = self.expiry.peek() {
            if at > now_ms {
                break;
            }
            self.expiry.pop();
            let address = user.device(device);
            let Some(dev) = self.dir.device_mut(&address) else {
                continue;
            };
            // The entry may be stale: its frame released, and its seq given again to a new
            // frame (a device removed and added back starts again at 1). Only a frame whose
            // own TTL ran out goes.
            let ran_out = dev
                .queue
                .find_seq_mut(seq)
                .is_some_and(|item| item.expires_at_ms <= now_ms);
            if !ran_out {
                continue;
            }
            if let Some(item) = dev.queue.remove_seq(seq) {
                self.stats.expired += 1;
                Shard::pump(dev, address, &self.limits, &mut self.out, &mut self.stats);
                self.log_release(address, &item, true);
            }
        }
    }

    /// The expiry heap keeps an entry per queued frame and learns of releases lazily; when
    /// stale entries outnumber live ones it drops them, so its size stays within twice the
    /// frames actually queued (plus a constant), however long the TTLs.
    fn compact_expiry(&mut self) {
        if self.expiry.len() as u64 <= 2 * self.stats.queued_frames + EXPIRY_SLACK {
            return;
        }
        let dir = &self.dir;
        self.expiry.retain(|Reverse((_, user, device, seq))| {
            dir.device(&user.device(*device))
                .is_some_and(|d| d.queue.contains_seq(*seq))
        });
    }

    /// Writes queued frames to the device's connection up to its in-flight window; a spilled
    /// frame in the window is asked back from the log first.
    pub(super) fn pump(
        dev: &mut DeviceState,
        address: DeviceAddress,
        limits: &RelayLimits,
        out: &mut VecDeque<ShardOutput>,
        stats: &mut ShardStats,
    ) {
        let Some(conn) = dev.bound else { return };
        let window = limits.device_deliveries_in_flight_max as usize;
        while dev.queue.cursor() < window {
            let cursor = dev.queue.cursor();
            let Some(item) = dev.queue.get(cursor) else {
                break;
            };
            let Some(frame) = &item.frame else {
                // Spilled: read back what the window needs, in order; deliveries resume from
                // here when the first of them is loaded.
                for index in cursor..window {
                    let Some(item) = dev.queue.get_mut(index) else {
                        break;
                    };
                    if item.frame.is_none() && !item.loading {
                        item.loading = true;
                        out.push_back(ShardOutput::Load {
                            device: address,
                            seq: item.seq,
                            segment: item.segment,
                            offset: item.offset,
                            len: item.len,
                        });
                    }
                }
                break;
            };
            out.push_back(ShardOutput::Deliver {
                conn,
                device: address,
                seq: item.seq,
                ephemeral: false,
                frame: frame.clone(),
            });
            stats.delivered += 1;
            dev.queue.advance();
        }
        debug_assert!(dev.queue.cursor() <= window.min(dev.queue.len()));
    }
}
