//! The simulated population: networks (the gatekeeper and N partners), their users, each
//! user's devices, which networks connect through servers ("proxy") and which through their
//! devices ("direct"), and which devices start offline. Pure data built from a seed; also
//! picks senders and recipients for each traffic class.
//!
//! Indexes are global and dense: users are numbered across all networks, devices across all
//! users, so the ledger and the connection tables are plain vectors.

use codec::{DeviceAddress, DeviceId, NetworkId, UserAddress, UserId};
use serde::Serialize;

use crate::rng::Rng;

/// The most devices loadgen gives one user; the ledger keeps one bit per device in `u8`
/// masks. (The relay's default `devices_per_user_max` is 5.)
pub const DEVICES_PER_USER_MAX: u8 = 8;

/// The gatekeeper's network id; partners follow from 2.
pub const GATEKEEPER: NetworkId = NetworkId(1);

/// User ids start here within each network (so a user id is never 0).
const USER_ID_BASE: u128 = 0x1_0000;

/// How a network's users reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// A few server sessions multiplex all of the network's users.
    Proxy,
    /// Each device holds its own session, authenticated with a device token.
    Direct,
}

/// The two traffic classes the parity verdict compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Gatekeeper user to gatekeeper user.
    FirstParty = 0,
    /// Gatekeeper user to partner user, or partner user to gatekeeper user.
    Interop = 1,
}

impl Class {
    pub const ALL: [Class; 2] = [Class::FirstParty, Class::Interop];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(index: u8) -> Option<Class> {
        match index {
            0 => Some(Class::FirstParty),
            1 => Some(Class::Interop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::FirstParty => "first_party",
            Class::Interop => "interop",
        }
    }
}

/// What to build.
#[derive(Debug, Clone, Serialize)]
pub struct PopulationSpec {
    /// Partner networks besides the gatekeeper.
    pub partners: u32,
    pub users_per_network: u32,
    /// Share of users with `devices_multi` devices; the others have one.
    pub multi_device_share: f64,
    pub devices_multi: u8,
    /// How many partners (the last ones) connect their devices directly.
    pub direct_partners: u32,
    /// Share of the devices of direct networks that start offline and come back later.
    pub offline_share: f64,
    /// Server sessions per proxy network.
    pub server_connections: u32,
    pub seed: u64,
}

/// One network of the population.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInfo {
    pub id: u32,
    pub name: String,
    pub gatekeeper: bool,
    pub architecture: Architecture,
    /// Global index of its first user.
    pub first_user: u32,
    pub users: u32,
}

/// The population, with the lookups traffic generation needs.
#[derive(Debug, Clone)]
pub struct Population {
    pub spec: PopulationSpec,
    pub networks: Vec<NetworkInfo>,
    user_network: Vec<u16>,
    user_devices: Vec<u8>,
    user_first_device: Vec<u32>,
    device_user: Vec<u32>,
    device_offline: Vec<bool>,
    gatekeeper_users: u32,
    partner_users: u32,
}

/// A sender device and a recipient user for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub class: Class,
    /// Global device index.
    pub sender: u32,
    /// Global user index.
    pub recipient: u32,
}

impl Population {
    pub fn build(spec: &PopulationSpec) -> Result<Population, String> {
        if spec.users_per_network < 2 {
            return Err("--users: at least 2 per network".into());
        }
        if spec.direct_partners > spec.partners {
            return Err("--direct-partners: at most --partners".into());
        }
        if !(1..=DEVICES_PER_USER_MAX).contains(&spec.devices_multi) {
            return Err(format!("--devices-multi: 1 to {DEVICES_PER_USER_MAX}"));
        }
        if spec.partners == 0 {
            return Err("--partners: at least 1 (interop needs a partner)".into());
        }
        let network_count = spec.partners + 1;
        if network_count > u32::from(u16::MAX) {
            return Err("--partners: too many".into());
        }
        let total_users = u64::from(network_count) * u64::from(spec.users_per_network);
        if total_users > u64::from(u32::MAX / u32::from(DEVICES_PER_USER_MAX)) {
            return Err("population too large".into());
        }
        let mut rng = Rng::new(spec.seed);
        let mut networks = Vec::new();
        let mut population = Population {
            spec: spec.clone(),
            networks: Vec::new(),
            user_network: Vec::new(),
            user_devices: Vec::new(),
            user_first_device: Vec::new(),
            device_user: Vec::new(),
            device_offline: Vec::new(),
            gatekeeper_users: spec.users_per_network,
            partner_users: spec.partners * spec.users_per_network,
        };
        for n in 0..network_count {
            let gatekeeper = n == 0;
            let direct = !gatekeeper && n > spec.partners - spec.direct_partners;
            let architecture = if direct {
                Architecture::Direct
            } else {
                Architecture::Proxy
            };
            let first_user = n * spec.users_per_network;
            networks.push(NetworkInfo {
                id: n + 1,
                name: if gatekeeper {
                    "gatekeeper".to_string()
                } else {
                    format!("partner-{}", n + 1)
                },
                gatekeeper,
                architecture,
                first_user,
                users: spec.users_per_network,
            });
            for _ in 0..spec.users_per_network {
                let user = u32::try_from(population.user_devices.len()).unwrap_or(u32::MAX);
                let devices = if rng.chance(spec.multi_device_share) {
                    spec.devices_multi
                } else {
                    1
                };
                population
                    .user_network
                    .push(u16::try_from(n).unwrap_or(u16::MAX));
                population.user_devices.push(devices);
                population
                    .user_first_device
                    .push(u32::try_from(population.device_user.len()).unwrap_or(u32::MAX));
                for _ in 0..devices {
                    population.device_user.push(user);
                    population
                        .device_offline
                        .push(direct && rng.chance(spec.offline_share));
                }
            }
        }
        population.networks = networks;
        Ok(population)
    }

    pub fn users(&self) -> u32 {
        u32::try_from(self.user_devices.len()).unwrap_or(u32::MAX)
    }

    pub fn devices(&self) -> u32 {
        u32::try_from(self.device_user.len()).unwrap_or(u32::MAX)
    }

    pub fn network_of_user(&self, user: u32) -> &NetworkInfo {
        &self.networks[usize::from(self.user_network[user as usize])]
    }

    pub fn network_index_of_user(&self, user: u32) -> usize {
        usize::from(self.user_network[user as usize])
    }

    pub fn device_count(&self, user: u32) -> u8 {
        self.user_devices[user as usize]
    }

    /// The user's device ids (1 to its device count): the set both its enlistment (control
    /// API) and its network's `DeviceList` declare, so the two never disagree.
    pub fn device_numbers(&self, user: u32) -> std::ops::RangeInclusive<u32> {
        1..=u32::from(self.device_count(user))
    }

    pub fn user_of_device(&self, device: u32) -> u32 {
        self.device_user[device as usize]
    }

    /// The device's id within its user (1 is the primary).
    pub fn device_number(&self, device: u32) -> u8 {
        let user = self.user_of_device(device);
        u8::try_from(device - self.user_first_device[user as usize] + 1).unwrap_or(u8::MAX)
    }

    /// Global index of device `number` (1-based) of `user`.
    pub fn device_index(&self, user: u32, number: u8) -> u32 {
        self.user_first_device[user as usize] + u32::from(number) - 1
    }

    pub fn is_offline(&self, device: u32) -> bool {
        self.device_offline[device as usize]
    }

    pub fn offline_devices(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.devices()).filter(|&d| self.device_offline[d as usize])
    }

    pub fn user_address(&self, user: u32) -> UserAddress {
        let network = self.network_of_user(user);
        let local = user - network.first_user;
        UserAddress::new(
            NetworkId(network.id),
            UserId(USER_ID_BASE + u128::from(local)),
        )
    }

    pub fn device_address(&self, device: u32) -> DeviceAddress {
        let user = self.user_of_device(device);
        self.user_address(user)
            .device(DeviceId(u32::from(self.device_number(device))))
    }

    /// The global user index of an address, if it belongs to this population.
    pub fn user_index(&self, address: &UserAddress) -> Option<u32> {
        let network = self
            .networks
            .get(address.network.0.checked_sub(1)? as usize)?;
        let local = address.user.0.checked_sub(USER_ID_BASE)?;
        let local = u32::try_from(local).ok().filter(|&l| l < network.users)?;
        Some(network.first_user + local)
    }

    /// The global device index of an address, if it belongs to this population.
    pub fn device_index_of(&self, address: &DeviceAddress) -> Option<u32> {
        let user = self.user_index(&address.user_address())?;
        let number = u8::try_from(address.device.0).ok()?;
        (1..=self.device_count(user))
            .contains(&number)
            .then(|| self.device_index(user, number))
    }

    /// Devices whose own sessions loadgen holds (direct networks), online or not.
    pub fn direct_devices(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.devices()).filter(|&d| {
            self.network_of_user(self.user_of_device(d)).architecture == Architecture::Direct
        })
    }

    /// Picks the class by `interop_share`, then a sender device and a recipient user. For
    /// interop, `outbound_share` of the messages go gatekeeper to partner, the rest partner to
    /// gatekeeper. Senders are devices that are online (every device of a proxy network
    /// is reachable through its server).
    pub fn pick(&self, rng: &mut Rng, interop_share: f64, outbound_share: f64) -> Pick {
        let class = if rng.chance(interop_share) {
            Class::Interop
        } else {
            Class::FirstParty
        };
        let (sender_user, recipient) = match class {
            Class::FirstParty => {
                let sender = self.random_sending_user(rng, false);
                let mut recipient = rng.below_u32(self.gatekeeper_users);
                if recipient == sender {
                    recipient = (recipient + 1) % self.gatekeeper_users;
                }
                (sender, recipient)
            }
            Class::Interop if rng.chance(outbound_share) => (
                self.random_sending_user(rng, false),
                self.gatekeeper_users + rng.below_u32(self.partner_users),
            ),
            Class::Interop => (
                self.random_sending_user(rng, true),
                rng.below_u32(self.gatekeeper_users),
            ),
        };
        let sender = self.random_online_device(rng, sender_user);
        Pick {
            class,
            sender,
            recipient,
        }
    }

    /// A user with at least one online device, of the gatekeeper or of a partner.
    fn random_sending_user(&self, rng: &mut Rng, partner: bool) -> u32 {
        loop {
            let user = if partner {
                self.gatekeeper_users + rng.below_u32(self.partner_users)
            } else {
                rng.below_u32(self.gatekeeper_users)
            };
            let first = self.user_first_device[user as usize];
            let count = u32::from(self.user_devices[user as usize]);
            if (first..first + count).any(|d| !self.device_offline[d as usize]) {
                return user;
            }
        }
    }

    fn random_online_device(&self, rng: &mut Rng, user: u32) -> u32 {
        let first = self.user_first_device[user as usize];
        let count = u32::from(self.user_devices[user as usize]);
        loop {
            let device = first + rng.below_u32(count);
            if !self.device_offline[device as usize] {
                return device;
            }
        }
    }

    /// Summary for the report.
    pub fn summary(&self) -> serde_json::Value {
        let offline = self.offline_devices().count();
        let direct = self.direct_devices().count();
        serde_json::json!({
            "networks": self.networks,
            "users": self.users(),
            "devices": self.devices(),
            "direct_devices": direct,
            "offline_devices": offline,
            "users_with_multiple_devices": self.user_devices.iter().filter(|&&d| d > 1).count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PopulationSpec {
        PopulationSpec {
            partners: 2,
            users_per_network: 100,
            multi_device_share: 0.3,
            devices_multi: 5,
            direct_partners: 1,
            offline_share: 0.2,
            server_connections: 2,
            seed: 42,
        }
    }

    #[test]
    fn networks_users_and_devices_line_up() {
        let p = Population::build(&spec()).unwrap();
        assert_eq!(p.networks.len(), 3);
        assert_eq!(p.networks[0].architecture, Architecture::Proxy);
        assert_eq!(p.networks[1].architecture, Architecture::Proxy);
        assert_eq!(p.networks[2].architecture, Architecture::Direct);
        assert_eq!(p.users(), 300);
        let multi = (0..p.users()).filter(|&u| p.device_count(u) == 5).count();
        assert!((50..130).contains(&multi), "{multi}");
        for device in 0..p.devices() {
            let address = p.device_address(device);
            assert_eq!(p.device_index_of(&address), Some(device));
            let user = p.user_of_device(device);
            assert_eq!(p.user_index(&address.user_address()), Some(user));
            // Only devices of the direct network are ever offline.
            if p.is_offline(device) {
                assert_eq!(p.network_of_user(user).architecture, Architecture::Direct);
            }
        }
        assert!(p.offline_devices().count() > 0);
        let stranger = UserAddress::new(NetworkId(9), UserId(USER_ID_BASE));
        assert_eq!(p.user_index(&stranger), None);
    }

    #[test]
    fn picks_respect_the_classes() {
        let p = Population::build(&spec()).unwrap();
        let mut rng = Rng::new(1);
        let (mut first_party, mut outbound, mut inbound) = (0, 0, 0);
        for _ in 0..10_000 {
            let pick = p.pick(&mut rng, 0.5, 0.5);
            assert!(!p.is_offline(pick.sender));
            let from_gk = p.network_of_user(p.user_of_device(pick.sender)).gatekeeper;
            let to_gk = p.network_of_user(pick.recipient).gatekeeper;
            match pick.class {
                Class::FirstParty => {
                    assert!(from_gk && to_gk);
                    assert_ne!(p.user_of_device(pick.sender), pick.recipient);
                    first_party += 1;
                }
                Class::Interop => {
                    assert!(from_gk != to_gk);
                    if from_gk {
                        outbound += 1;
                    } else {
                        inbound += 1;
                    }
                }
            }
        }
        assert!((4500..5500).contains(&first_party), "{first_party}");
        assert!((2000..3000).contains(&outbound), "{outbound}");
        assert!((2000..3000).contains(&inbound), "{inbound}");
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec();
        s.direct_partners = 3;
        assert!(Population::build(&s).is_err());
        let mut s = spec();
        s.devices_multi = 9;
        assert!(Population::build(&s).is_err());
        let mut s = spec();
        s.partners = 0;
        s.direct_partners = 0;
        assert!(Population::build(&s).is_err());
    }
}
