//! What must hold of a shard after every turn, checked against its state in full: the
//! counters are the sum of the queues, every cursor is inside its queue and window, an
//! unbound device writes nothing, and the log's accounting is what the queues point at. The
//! IO shell runs [`Shard::audit`] after every turn in debug builds; the simulations after
//! every step.

use std::collections::BTreeMap;

use super::Shard;

impl Shard {
    /// Checks every invariant of the shard; `Err` says the first that does not hold.
    pub fn audit(&self) -> Result<(), String> {
        self.audit_queues()?;
        self.audit_log()
    }

    fn audit_queues(&self) -> Result<(), String> {
        let window = self.limits.device_deliveries_in_flight_max as usize;
        let (mut frames, mut bytes, mut ram) = (0u64, 0u64, 0u64);
        for (user, state) in &self.dir.users {
            if state.devices.is_empty() {
                return Err(format!("{user} is kept with no device"));
            }
            for dev in &state.devices {
                let device = user.device(dev.id);
                let queue = &dev.queue;
                if queue.cursor() > queue.len() || queue.cursor() > window {
                    return Err(format!(
                        "{device}: cursor {} past its queue ({}) or window ({window})",
                        queue.cursor(),
                        queue.len()
                    ));
                }
                if dev.bound.is_none() && queue.cursor() != 0 {
                    return Err(format!("{device}: unbound with frames in flight"));
                }
                let mut previous = 0;
                for item in queue.iter() {
                    if item.seq <= previous || item.seq >= dev.next_seq {
                        return Err(format!("{device}: seq {} out of order", item.seq));
                    }
                    previous = item.seq;
                    frames += 1;
                    bytes += item.bytes();
                    if item.in_ram() {
                        ram += item.bytes();
                    }
                }
                if queue.bytes() != queue.iter().map(|q| q.bytes()).sum::<u64>() {
                    return Err(format!("{device}: queue bytes miscounted"));
                }
            }
        }
        let stats = &self.stats;
        if (frames, bytes, ram) != (stats.queued_frames, stats.queued_bytes, stats.ram_bytes) {
            return Err(format!(
                "counters say {} frames, {} bytes, {} in memory; queues hold {frames}, {bytes}, {ram}",
                stats.queued_frames, stats.queued_bytes, stats.ram_bytes
            ));
        }
        Ok(())
    }

    /// Checks the log's bookkeeping against the queues: every queued frame's segment exists,
    /// and each segment's live and spilled counts are the frames that point at it.
    pub fn audit_log(&self) -> Result<(), String> {
        let Some(log) = &self.log else { return Ok(()) };
        let mut live: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (device, queue) in self.dir.queues() {
            for item in queue.iter() {
                if !log.segments().contains_key(&item.segment) {
                    return Err(format!(
                        "{device} seq {} points at segment {}, which is gone",
                        item.seq, item.segment
                    ));
                }
                let counts = live.entry(item.segment).or_default();
                counts.0 += 1;
                if !item.in_ram() {
                    counts.1 += 1;
                }
            }
        }
        for (id, stats) in log.segments() {
            let (frames, spilled) = live.get(id).copied().unwrap_or_default();
            if stats.live_frames != frames || stats.spilled != spilled {
                return Err(format!(
                    "segment {id}: counts {} live, {} spilled; queues hold {frames} and {spilled}",
                    stats.live_frames, stats.spilled
                ));
            }
        }
        if log.committed() > log.appended() {
            return Err("committed past the end of the log".into());
        }
        if let Some((at, _)) = self.awaiting.front()
            && *at <= log.committed()
        {
            return Err(format!("an output waits for {at}, already committed"));
        }
        Ok(())
    }
}
