//! What a shard charges its users' networks: a user or device added takes room under its
//! network's caps (`tables::caps`, shared by every shard, so a cap holds network-wide) and a
//! new user room under the shard's own `shard_users_max`; every device-set change takes one
//! from its network's rate. What leaves gives its room back. Replay charges nothing (the log
//! holds only what was admitted); [`Shard::share_caps`] counts what recovery rebuilt.

use std::collections::BTreeMap;
use std::sync::Arc;

use codec::{ErrorCode, NetworkId, UserAddress};

use super::Shard;
use super::interface::Refusal;
use crate::tables::caps::NetworkCaps;

/// The retry hint of `SHARD_USER_LIMIT`: room comes back only as users go.
const SHARD_FULL_RETRY_MS: u32 = 60_000;

impl Shard {
    /// Charges the caps a shard of a relay shares from now on (the relay's, in place of the
    /// shard's own), and counts the users and devices the shard holds already, typically
    /// those recovery rebuilt. Called before any connection is accepted.
    pub fn share_caps(&mut self, caps: Arc<NetworkCaps>) {
        self.caps = caps;
        self.count_users_into_caps();
    }

    /// Adds every user and device of the shard to the caps' figures, whatever the caps say.
    pub(super) fn count_users_into_caps(&self) {
        let mut per_network: BTreeMap<NetworkId, (u64, u64)> = BTreeMap::new();
        for (user, state) in &self.dir.users {
            let entry = per_network.entry(user.network).or_default();
            entry.0 += 1;
            entry.1 += state.devices.len() as u64;
        }
        for (network, (users, devices)) in per_network {
            self.caps.count_existing(network, users, devices);
        }
    }

    /// Charges a change of `user`'s device set from `old` devices (`None`: a user the shard
    /// does not hold) to `new`: one change from its network's rate, then room for a new user
    /// or new devices, or room given back. A refused change charges no room.
    // A `Refusal` carries a device set inline (no allocation); this path is rare.
    #[allow(clippy::result_large_err)]
    pub(super) fn charge_device_set(
        &mut self,
        now_ms: u64,
        user: UserAddress,
        old: Option<usize>,
        new: usize,
    ) -> Result<(), Refusal> {
        let network = user.network;
        self.caps
            .take_change(network, now_ms)
            .map_err(|wait_ms| Refusal {
                retry_after_ms: wait_ms,
                ..Refusal::new(ErrorCode::DeviceSetRateLimited)
            })?;
        let new = new as u64;
        match old.map(|n| n as u64) {
            None if new == 0 => Ok(()),
            None => {
                if self.dir.users.len() as u64 >= self.limits.shard_users_max {
                    self.caps.note_shard_full();
                    return Err(Refusal {
                        retry_after_ms: SHARD_FULL_RETRY_MS,
                        ..Refusal::new(ErrorCode::ShardUserLimit)
                    });
                }
                self.caps.admit(network, 1, new).map_err(Refusal::new)
            }
            Some(old) if new == 0 => {
                self.caps.release(network, 1, old);
                Ok(())
            }
            Some(old) if new > old => self.caps.admit(network, 0, new - old).map_err(Refusal::new),
            Some(old) => {
                self.caps.release(network, 0, old - new);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use codec::{DeviceId, ErrorCode, MessageId, NetworkId, UserAddress, UserId};

    use crate::core::ConnId;
    use crate::core::shard::Shard;
    use crate::core::shard::interface::{AckOf, ShardInput, ShardOutput};
    use crate::limits::RelayLimits;
    use crate::tables::caps::{CapDefaults, NetworkCaps};

    const PARTNER: NetworkId = NetworkId(2);

    fn conn(slot: u32) -> ConnId {
        ConnId {
            core: 0,
            slot,
            generation: 1,
        }
    }

    fn declare(shard: &mut Shard, now_ms: u64, user: u128, devices: &[u32]) -> Option<ErrorCode> {
        declare_logged(shard, &mut Segments::default(), now_ms, user, devices)
    }

    /// [`declare`] on a shard with a log, whose writes go to `store` (and are committed, so
    /// that the ack comes out).
    fn declare_logged(
        shard: &mut Shard,
        store: &mut Segments,
        now_ms: u64,
        user: u128,
        devices: &[u32],
    ) -> Option<ErrorCode> {
        shard.handle(
            now_ms,
            ShardInput::DeviceList {
                request_id: MessageId(user),
                user: UserAddress::new(PARTNER, UserId(user)),
                devices: devices.iter().map(|&d| DeviceId(d)).collect(),
                reply_to: conn(1),
            },
        );
        while let Some(write) = shard.take_log_write() {
            for (segment, bytes) in &write.chunks {
                store
                    .0
                    .entry(*segment)
                    .or_default()
                    .extend_from_slice(bytes);
            }
            shard.on_log_committed(write.lsn);
        }
        let mut answer = None;
        while let Some(output) = shard.poll_output() {
            if let ShardOutput::Ack {
                of: AckOf::DeviceList,
                result,
                ..
            } = output
            {
                answer = Some(result.err().map(|r| r.code));
            }
        }
        answer.expect("an ack for the device list")
    }

    /// Two shards of one relay share the network's caps: together they admit exactly
    /// `users_max` users and `devices_max` devices; a user that goes makes room; a device
    /// session past the cap is closed with the code.
    #[test]
    fn shards_admit_a_network_up_to_its_caps_together() {
        let limits = RelayLimits {
            network_users_max: 5,
            network_devices_max: 8,
            ..RelayLimits::default()
        };
        let caps = Arc::new(NetworkCaps::new(CapDefaults::of(&limits)));
        let mut shards = [Shard::new(limits), Shard::new(limits)];
        for shard in &mut shards {
            shard.share_caps(caps.clone());
        }
        let mut admitted = 0;
        for user in 0..20u128 {
            let shard = &mut shards[(user % 2) as usize];
            match declare(shard, 0, user, &[1]) {
                None => admitted += 1,
                Some(code) => assert_eq!(code, ErrorCode::NetworkUserLimit),
            }
        }
        assert_eq!(admitted, 5);
        // Devices: three more fit under eight, the fourth does not.
        assert_eq!(declare(&mut shards[0], 0, 0, &[1, 2, 3]), None);
        assert_eq!(declare(&mut shards[1], 0, 1, &[1, 2]), None);
        assert_eq!(
            declare(&mut shards[0], 0, 2, &[1, 2]),
            Some(ErrorCode::NetworkDeviceLimit)
        );
        // A user removed gives its user and devices back: one new user fits again, and a
        // device session of another, past the cap, is closed with the code.
        assert_eq!(declare(&mut shards[0], 0, 0, &[]), None);
        for user in [201u128, 301] {
            let device = UserAddress::new(PARTNER, UserId(user)).device(DeviceId(1));
            shards[1].handle(
                0,
                ShardInput::AttachDevice {
                    device,
                    conn: conn(9),
                },
            );
        }
        let closes: Vec<ErrorCode> = std::iter::from_fn(|| shards[1].poll_output())
            .filter_map(|o| match o {
                ShardOutput::Close { code, .. } => Some(code),
                _ => None,
            })
            .collect();
        assert_eq!(closes, [ErrorCode::NetworkUserLimit]);
        let figures = caps.figures();
        assert_eq!((figures[0].users, figures[0].devices), (5, 6));
        for shard in &shards {
            shard.audit().expect("the shard's invariants");
        }
    }

    /// Segments in memory, for a shard's log and its recovery.
    #[derive(Default)]
    struct Segments(std::collections::BTreeMap<u64, Vec<u8>>);

    impl crate::core::shard::recovery::SegmentStore for Segments {
        fn list(&mut self) -> std::io::Result<Vec<u64>> {
            Ok(self.0.keys().copied().collect())
        }
        fn read(&mut self, id: u64) -> std::io::Result<bytes::Bytes> {
            Ok(bytes::Bytes::from(
                self.0.get(&id).cloned().unwrap_or_default(),
            ))
        }
        fn truncate(&mut self, id: u64, len: u64) -> std::io::Result<()> {
            if let Some(segment) = self.0.get_mut(&id) {
                segment.truncate(usize::try_from(len).unwrap_or(usize::MAX));
            }
            Ok(())
        }
        fn append_durably(&mut self, id: u64, bytes: &[u8]) -> std::io::Result<()> {
            self.0.entry(id).or_default().extend_from_slice(bytes);
            Ok(())
        }
        fn remove(&mut self, id: u64) -> std::io::Result<()> {
            self.0.remove(&id);
            Ok(())
        }
        fn quarantine(&mut self, id: u64) -> std::io::Result<()> {
            self.0.remove(&id);
            Ok(())
        }
    }

    /// A shard recovered from its log counts every user it rebuilt into the relay's caps,
    /// past the cap or not (nothing admitted is lost), and admits no more until one goes.
    #[test]
    fn recovery_counts_the_users_it_rebuilt_and_admits_none_past_the_cap() {
        let limits = RelayLimits {
            network_users_max: 3,
            ..RelayLimits::default()
        };
        let mut shard = Shard::with_log(limits, crate::core::log::ShardLog::new(1, 1 << 20));
        let mut store = Segments::default();
        for user in 0..3u128 {
            assert_eq!(
                declare_logged(&mut shard, &mut store, 0, user, &[1, 2]),
                None
            );
        }
        assert_eq!(
            declare_logged(&mut shard, &mut store, 0, 3, &[1]),
            Some(ErrorCode::NetworkUserLimit)
        );
        // Restarted with a lower cap: the three stay, and count.
        let lower = RelayLimits {
            network_users_max: 2,
            ..limits
        };
        let (mut recovered, report) =
            Shard::recover(lower, 1 << 20, &mut store, 1).expect("recovered");
        assert_eq!(report.records, 3);
        let caps = Arc::new(NetworkCaps::new(CapDefaults::of(&lower)));
        recovered.share_caps(caps.clone());
        let figures = caps.figures();
        assert_eq!((figures[0].users, figures[0].devices), (3, 6));
        assert_eq!(
            declare(&mut recovered, 1, 4, &[1]),
            Some(ErrorCode::NetworkUserLimit)
        );
        assert_eq!(declare(&mut recovered, 1, 0, &[]), None);
        assert_eq!(declare(&mut recovered, 1, 1, &[]), None);
        assert_eq!(declare(&mut recovered, 1, 4, &[1]), None);
        assert_eq!(caps.figures()[0].users, 2);
        recovered.audit().expect("the shard's invariants");
    }

    /// Device-set changes pass at the network's rate (a second's worth at once), then are
    /// refused with a retry hint until time passes; the shard's own user bound holds too.
    #[test]
    fn device_set_changes_are_rate_limited_and_a_shard_holds_at_most_its_users() {
        let limits = RelayLimits {
            network_device_set_changes_per_s: 10,
            shard_users_max: 8,
            ..RelayLimits::default()
        };
        let mut shard = Shard::new(limits);
        let refused: Vec<Option<ErrorCode>> = (0..12u128)
            .map(|u| declare(&mut shard, 0, u, &[1]))
            .collect();
        assert_eq!(refused.iter().filter(|r| r.is_none()).count(), 8);
        assert_eq!(
            refused[8..],
            [
                Some(ErrorCode::ShardUserLimit),
                Some(ErrorCode::ShardUserLimit),
                Some(ErrorCode::ShardUserLimit),
                Some(ErrorCode::DeviceSetRateLimited),
            ]
        );
        assert_eq!(
            declare(&mut shard, 0, 0, &[1, 2]),
            Some(ErrorCode::DeviceSetRateLimited)
        );
        assert_eq!(declare(&mut shard, 1000, 0, &[1, 2]), None);
        shard.audit().expect("the shard's invariants");
    }
}
