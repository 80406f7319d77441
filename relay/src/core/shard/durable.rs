//! The shard's durable bookkeeping: the records it appends to its log, the outputs held until
//! those records are stored, the accounting of what each segment still holds (every frame
//! enters and leaves a queue through [`Shard::entered_queue`] and [`Shard::left_queue`]),
//! spilling frames of offline devices out of memory and loading them back, and compaction.

use bytes::Bytes;
use codec::{DeviceAddress, UserAddress};

use super::Shard;
use super::interface::{Refusal, Routed, ShardOutput, ShardStats};
use super::state::{DeviceState, UserState};
use crate::core::DeviceSet;
use crate::core::log::{LogWrite, ShardLog};
use crate::core::queue::Queued;
use crate::core::wal::{self, Record, Target, Targets};

impl Shard {
    /// A frame joined a queue: counted, and its record counted live in its segment.
    pub(super) fn entered_queue(stats: &mut ShardStats, log: Option<&mut ShardLog>, item: &Queued) {
        stats.queued_frames += 1;
        stats.queued_bytes += item.bytes();
        if item.in_ram() {
            stats.ram_bytes += item.bytes();
        }
        if let Some(log) = log {
            log.add_live(item.segment, item.bytes());
            if !item.in_ram() {
                log.add_spilled(item.segment, 1);
            }
        }
    }

    /// A frame left its queue (acknowledged, expired, purged, its device removed, or a
    /// replayed record says so): the one place that forgets it. `removed_by` is the segment
    /// of the record that removes it, which must outlive the segment it refers to.
    pub(super) fn left_queue(
        stats: &mut ShardStats,
        log: Option<&mut ShardLog>,
        item: &Queued,
        removed_by: Option<u64>,
    ) {
        assert!(stats.queued_frames > 0 && stats.queued_bytes >= item.bytes());
        stats.queued_frames -= 1;
        stats.queued_bytes -= item.bytes();
        if item.in_ram() {
            assert!(stats.ram_bytes >= item.bytes());
            stats.ram_bytes -= item.bytes();
        }
        if let Some(log) = log {
            if !item.in_ram() {
                log.add_spilled(item.segment, -1);
            }
            log.remove_live(item.segment, item.bytes());
            if let Some(segment) = removed_by {
                log.add_ref(segment, item.segment);
            }
        }
    }

    /// A frame's record now lives in `segment` at `offset` (rewritten, or a rewritten copy
    /// replayed): the live count moves with it.
    pub(super) fn record_moved(log: &mut ShardLog, item: &mut Queued, segment: u64, offset: u64) {
        if item.segment == segment {
            return;
        }
        log.remove_live(item.segment, item.bytes());
        log.add_live(segment, item.bytes());
        if !item.in_ram() {
            log.add_spilled(item.segment, -1);
            log.add_spilled(segment, 1);
        }
        item.segment = segment;
        item.offset = offset;
    }

    pub(super) fn log_failed(&self) -> bool {
        self.log.as_ref().is_some_and(ShardLog::is_failed)
    }

    /// Sends an output now, or once the log has stored everything appended so far. Refusals
    /// go at once: they promise nothing that needs storing.
    pub(super) fn emit_when_stored(&mut self, output: ShardOutput) {
        let refused = matches!(
            output,
            ShardOutput::Ack { result: Err(_), .. } | ShardOutput::Applied { result: Err(_), .. }
        );
        match &self.log {
            Some(log) if !refused && log.committed() < log.appended() => {
                self.awaiting.push_back((log.appended(), output))
            }
            _ => self.out.push_back(output),
        }
    }

    /// Appends the enqueue record of a frame for every device; returns where the frame's
    /// bytes are (segment, offset) and the log position after the record, all 0 without a
    /// log.
    pub(super) fn log_enqueue(
        log: Option<&mut ShardLog>,
        now_ms: u64,
        expires_at_ms: u64,
        routed: &Routed,
        devices: &[DeviceState],
    ) -> (u64, u64, u64) {
        let Some(log) = log else { return (0, 0, 0) };
        let mut targets = Targets::new();
        for d in devices {
            let fits = targets.push(Target {
                device: d.id,
                seq: d.next_seq,
            });
            debug_assert!(fits, "more devices than a device set holds");
        }
        let record = Record::Enqueue {
            arrival_ms: now_ms,
            expires_at_ms,
            sender: routed.sender,
            id: routed.id,
            recipient: routed.recipient,
            targets,
            frame: &routed.frame,
        };
        let (segment, record_offset) = log.append_at(&record);
        let offset = record_offset + wal::enqueue_frame_offset(targets.len());
        (segment, offset, log.appended())
    }

    /// Appends a release (ack, purge or expiry) of `item`, which already left `device`'s queue.
    pub(super) fn log_release(&mut self, device: DeviceAddress, item: &Queued, expired: bool) {
        let segment = self.log.as_mut().map(|log| {
            log.append(&Record::Release {
                device,
                seq: item.seq,
                expired,
            })
        });
        Shard::left_queue(&mut self.stats, self.log.as_mut(), item, segment);
    }

    /// Appends `user`'s current device set; returns the segment it went to.
    pub(super) fn log_device_set(&mut self, user: UserAddress) -> Option<u64> {
        let log = self.log.as_mut()?;
        Some(Shard::append_device_set(
            log,
            user,
            self.dir.users.get_mut(&user),
        ))
    }

    /// Appends the device set of `user` (`state`: `None` when it has no devices left) and
    /// moves its accounting to the new record.
    fn append_device_set(
        log: &mut ShardLog,
        user: UserAddress,
        state: Option<&mut UserState>,
    ) -> u64 {
        let (devices, previous) = state.as_ref().map_or((DeviceSet::new(), None), |s| {
            (s.device_set(), s.device_set_segment)
        });
        let segment = log.append(&Record::DeviceSet { user, devices });
        if let Some(previous) = previous {
            log.add_ref(segment, previous);
        }
        let now_latest = (!devices.is_empty()).then_some(segment);
        log.move_device_set(previous, now_latest);
        if let Some(state) = state {
            state.device_set_segment = now_latest;
        }
        segment
    }

    /// Records appended since the last call, for the IO shell to write (and sync).
    pub fn take_log_write(&mut self) -> Option<LogWrite> {
        self.log.as_mut()?.take_write()
    }

    /// Everything up to `lsn` is stored: the outputs waiting for it go out.
    pub fn on_log_committed(&mut self, lsn: u64) {
        let Some(log) = self.log.as_mut() else { return };
        assert!(lsn <= log.appended(), "committed past the end of the log");
        log.on_committed(lsn);
        while self.awaiting.front().is_some_and(|(at, _)| *at <= lsn) {
            if let Some((_, output)) = self.awaiting.pop_front() {
                self.out.push_back(output);
            }
        }
        // Frames stored now may leave memory.
        self.spill();
    }

    /// A log write or sync failed: nothing waiting is acknowledged, and nothing more will be
    /// (`STORAGE_UNAVAILABLE`, retryable) until the relay restarts on a working disk.
    pub fn on_log_failed(&mut self) {
        let Some(log) = self.log.as_mut() else { return };
        log.on_failed();
        for (_, output) in self.awaiting.drain(..) {
            let refused = match output {
                ShardOutput::Ack {
                    conn,
                    of,
                    id,
                    address,
                    ..
                } => ShardOutput::Ack {
                    conn,
                    of,
                    id,
                    address,
                    result: Err(Refusal::storage_unavailable()),
                },
                ShardOutput::Applied { ticket, .. } => ShardOutput::Applied {
                    ticket,
                    result: Err(Refusal::storage_unavailable()),
                },
                other => other,
            };
            if matches!(refused, ShardOutput::Ack { .. }) {
                self.stats.refused += 1;
            }
            self.out.push_back(refused);
        }
    }

    /// Segments the IO shell may delete (everything in them is released or rewritten).
    pub fn take_log_deletions(&mut self) -> Vec<u64> {
        self.log
            .as_mut()
            .map(ShardLog::take_deletable)
            .unwrap_or_default()
    }

    /// Moves frames of offline devices out of memory (their bytes are in the log, committed)
    /// until the shard holds at most `shard_ram_bytes_max`. Devices that come back read them
    /// again, in order, as their deliveries need them.
    pub(super) fn spill(&mut self) {
        let Some(log) = self.log.as_mut() else { return };
        if self.stats.ram_bytes <= self.limits.shard_ram_bytes_max {
            return;
        }
        let committed = log.committed();
        let reloading = self.reloading;
        // In address order, not the hash set's: which frames leave memory (and so which
        // loads follow) depends on the inputs alone. The list is scratch kept between calls.
        let mut candidates = std::mem::take(&mut self.scratch.devices);
        candidates.clear();
        candidates.extend(self.dir.offline.iter().copied());
        candidates.sort_unstable();
        for &device in &candidates {
            if self.stats.ram_bytes <= self.limits.shard_ram_bytes_max {
                break;
            }
            let Some(dev) = self.dir.device_mut(&device).filter(|d| d.bound.is_none()) else {
                self.dir.offline.remove(&device);
                continue;
            };
            let mut kept = false;
            for item in dev.queue.iter_mut() {
                if item.frame.is_none() {
                    continue;
                }
                if item.lsn > committed || item.loading || Some(item.segment) == reloading {
                    kept = true;
                    continue;
                }
                item.frame = None;
                self.stats.ram_bytes -= item.bytes();
                self.stats.spilled += 1;
                log.add_spilled(item.segment, 1);
            }
            if !kept {
                self.dir.offline.remove(&device);
            }
        }
        self.scratch.devices = candidates;
    }

    /// Whether a load asked for earlier is still wanted: the frame may have been released
    /// (and its segment deleted) since.
    pub fn wants_load(&self, device: &DeviceAddress, seq: u64) -> bool {
        self.dir.device(device).is_some_and(|d| {
            d.queue
                .iter()
                .take_while(|item| item.seq <= seq)
                .any(|item| item.seq == seq && item.frame.is_none() && item.loading)
        })
    }

    /// A frame read back from the log (`None`: the read failed).
    pub fn on_loaded(&mut self, device: DeviceAddress, seq: u64, frame: Option<Bytes>) {
        let Some(dev) = self.dir.device_mut(&device) else {
            return;
        };
        let Some(item) = dev.queue.find_seq_mut(seq) else {
            return;
        };
        match frame {
            Some(frame) if item.frame.is_none() => {
                item.loading = false;
                item.frame = Some(frame);
                self.stats.ram_bytes += item.bytes();
                self.stats.loads += 1;
                if let Some(log) = self.log.as_mut() {
                    log.add_spilled(item.segment, -1);
                }
            }
            Some(_) => item.loading = false,
            None => {
                // Left marked as loading: this device stalls rather than retrying a bad
                // read forever; the shard stops acknowledging (STORAGE_UNAVAILABLE).
                self.on_log_failed();
                return;
            }
        }
        Shard::pump(dev, device, &self.limits, &mut self.out, &mut self.stats);
        if dev.bound.is_none() {
            self.dir.offline.insert(device);
        }
    }

    /// The timer's log work: compaction, spilling, deleting dead segments.
    pub(super) fn housekeep_log(&mut self, now_ms: u64) {
        self.compact_log(now_ms);
        self.spill();
        if let Some(log) = self.log.as_mut() {
            log.collect_dead();
        }
    }

    /// Rewrites the oldest mostly-dead segment: its live records go to the head of the log,
    /// and the segment is deleted once they are stored.
    pub fn compact_log(&mut self, now_ms: u64) {
        let Some(log) = self.log.as_ref() else { return };
        let Some(segment) = log.rewrite_candidate() else {
            return;
        };
        let spilled = log.segments().get(&segment).map_or(0, |s| s.spilled);
        if spilled == 0 {
            self.reloading = None;
            self.rewrite_segment(segment, now_ms);
            return;
        }
        // Its live frames are mostly on disk only: read them back first (memory goes over
        // budget by at most a quarter of a segment); the rewrite follows on a later tick.
        self.reloading = Some(segment);
        let users = self.users_in_order();
        for user in &users {
            let Some(state) = self.dir.users.get_mut(user) else {
                continue;
            };
            for dev in &mut state.devices {
                for item in dev.queue.iter_mut() {
                    if item.segment == segment && item.frame.is_none() && !item.loading {
                        item.loading = true;
                        self.out.push_back(ShardOutput::Load {
                            device: user.device(dev.id),
                            seq: item.seq,
                            segment,
                            offset: item.offset,
                            len: item.len,
                        });
                    }
                }
            }
        }
        self.scratch.users = users;
    }

    /// The shard's users in address order (not the hash map's), so that what is done to them
    /// in turn depends on the shard's inputs alone; hand the list back to `scratch.users`, so
    /// that walking in order allocates only when the shard grew.
    fn users_in_order(&mut self) -> Vec<UserAddress> {
        let mut users = std::mem::take(&mut self.scratch.users);
        users.clear();
        users.extend(self.dir.users.keys().copied());
        users.sort_unstable();
        users
    }

    /// Re-appends every live record of `segment` at the head of the log; the segment is
    /// deleted once they are stored.
    pub fn rewrite_segment(&mut self, segment: u64, now_ms: u64) {
        if self.log.is_none() {
            return;
        }
        let users = self.users_in_order();
        let Some(log) = self.log.as_mut() else { return };
        for user in &users {
            let Some(state) = self.dir.users.get_mut(user) else {
                continue;
            };
            for dev in &mut state.devices {
                for item in dev.queue.iter_mut() {
                    // Segments with spilled frames are never chosen (see `rewrite_candidate`)
                    // and recovery reloads a damaged segment's frames before rewriting it.
                    if item.segment != segment {
                        continue;
                    }
                    let Some(frame) = item.frame.clone() else {
                        continue;
                    };
                    let record = Record::Enqueue {
                        arrival_ms: now_ms,
                        expires_at_ms: item.expires_at_ms,
                        sender: item.sender,
                        id: item.id,
                        recipient: *user,
                        targets: Targets::one(Target {
                            device: dev.id,
                            seq: item.seq,
                        }),
                        frame: &frame,
                    };
                    let (moved_to, record_offset) = log.append_at(&record);
                    let offset = record_offset + wal::enqueue_frame_offset(1);
                    Shard::record_moved(log, item, moved_to, offset);
                    item.lsn = log.appended();
                }
            }
            if let Some(state) = self.dir.users.get_mut(user)
                && state.device_set_segment == Some(segment)
            {
                Shard::append_device_set(log, *user, Some(state));
            }
        }
        log.retire(segment);
        self.scratch.users = users;
    }
}
