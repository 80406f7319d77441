//! Identifiers: networks, users, devices, messages, and the addresses built from them.
//!
//! A user id is the internal 128-bit identifier the data plane routes on; it is never a phone
//! number or any other user-visible identifier.

use core::fmt;

use rkyv::{Archive, Deserialize, Serialize};

/// A messaging network: the gatekeeper, or one partner. Assigned by the relay's operator.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct NetworkId(pub u32);

/// A user's internal identifier, unique within its network.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct UserId(pub u128);

/// One device of a user (device 1 is conventionally the primary).
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct DeviceId(pub u32);

/// A message id, chosen by the sender (random 128 bits); the key for idempotent resends.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct MessageId(pub u128);

/// A user, with the network that hosts it.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct UserAddress {
    pub network: NetworkId,
    pub user: UserId,
}

/// One device of one user of one network.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct DeviceAddress {
    pub network: NetworkId,
    pub user: UserId,
    pub device: DeviceId,
}

impl DeviceAddress {
    pub const fn new(network: NetworkId, user: UserId, device: DeviceId) -> Self {
        Self {
            network,
            user,
            device,
        }
    }

    /// The user this device belongs to.
    pub const fn user_address(&self) -> UserAddress {
        UserAddress {
            network: self.network,
            user: self.user,
        }
    }
}

impl UserAddress {
    pub const fn new(network: NetworkId, user: UserId) -> Self {
        Self { network, user }
    }

    pub const fn device(&self, device: DeviceId) -> DeviceAddress {
        DeviceAddress {
            network: self.network,
            user: self.user,
            device,
        }
    }
}

// Archived ids are little-endian, unaligned integers; these read them back into native ids
// without a copy of anything larger than the id itself.
impl ArchivedNetworkId {
    pub fn get(&self) -> NetworkId {
        NetworkId(self.0.to_native())
    }
}

impl ArchivedUserId {
    pub fn get(&self) -> UserId {
        UserId(self.0.to_native())
    }
}

impl ArchivedDeviceId {
    pub fn get(&self) -> DeviceId {
        DeviceId(self.0.to_native())
    }
}

impl ArchivedMessageId {
    pub fn get(&self) -> MessageId {
        MessageId(self.0.to_native())
    }
}

impl ArchivedUserAddress {
    pub fn get(&self) -> UserAddress {
        UserAddress {
            network: self.network.get(),
            user: self.user.get(),
        }
    }
}

impl ArchivedDeviceAddress {
    pub fn get(&self) -> DeviceAddress {
        DeviceAddress {
            network: self.network.get(),
            user: self.user.get(),
            device: self.device.get(),
        }
    }
}

/// Debug prints the same short form as Display: ids show up in logs and test failures.
macro_rules! debug_as_display {
    ($($t:ty),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    )*};
}

debug_as_display!(
    NetworkId,
    UserId,
    DeviceId,
    MessageId,
    UserAddress,
    DeviceAddress
);

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "u{:032x}", self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m{:032x}", self.0)
    }
}

impl fmt::Display for UserAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.user)
    }
}

impl fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.user, self.device)
    }
}
