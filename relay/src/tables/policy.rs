//! The interop rules the data plane enforces on every envelope, receipt and signal that
//! crosses networks: partner status, enlistment (opt-in), the recipient's consent model, the
//! location rule and test-only partners. The control plane (`crate::control`) writes this
//! table; sessions read it before routing ([`Policy::check`] decides and writes nothing).
//! The one write from the data plane's side is [`Policy::record_contact`], which the IO shell
//! calls with the first contacts sessions report: the pair is marked (so the reply is let
//! through at once) and the event queued for the control plane to store. Traffic within one
//! network is not interop and passes untouched (principle 6: the rules bind partners and the
//! gatekeeper alike).
//!
//! The table is a set of concurrent maps (dashmap: sharded read-write locks) rather than
//! per-core copies: it is read once or twice per cross-network frame and written only by the
//! control plane, and a copy per core would multiply its memory by the core count.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How much of a network's rate may arrive at once.
const BURST: Duration = Duration::from_secs(1);

use codec::{ErrorCode, NetworkId, UserAddress};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use dashmap::DashMap;

/// The policy maps, with a seeded fast hasher (see the workspace `Cargo.toml`).
type Map<K, V> = DashMap<K, V, foldhash::fast::RandomState>;
use serde::{Deserialize, Serialize};

use super::caps::{CapDefaults, NetworkCaps};

/// A partner network's activation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartnerStatus {
    /// Connected for integration: reaches, and is reached by, test users only.
    Testing,
    Active,
    /// No traffic in either direction; sessions are refused.
    Suspended,
}

/// How a user may be reached from other networks: the four approaches BEREC lists
/// (BoR (24) 19, repeated in chapter 5 of the opinion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentModel {
    /// (i) Anyone may reach the user once it opted in.
    Everyone,
    /// (ii) Each first contact is a message request the user accepts or refuses.
    RequestAlways,
    /// (iii) A request only from people outside the user's contact book.
    RequestUnknown,
    /// (iv) A request whenever a network the user has not accepted yet makes first contact.
    RequestPerNetwork,
}

/// Who a recipient accepted: one user, or (under model iv) a whole network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Party {
    User(UserAddress),
    Network(NetworkId),
}

/// What the policy knows of one enlisted user.
#[derive(Debug, Clone)]
pub struct UserPolicy {
    /// Opted in and not opted out since.
    pub enlisted: bool,
    /// A test user: the only kind a network in `testing` reaches.
    pub test: bool,
    pub model: ConsentModel,
    /// Meets the location rule (always `true` when the rule is off).
    pub in_region: bool,
    /// When `in_region` lapses without a newer attestation; `None`: it does not.
    pub region_until_ms: Option<u64>,
    /// SHA-256 of the user's current visible identifiers (see `control::identifier`).
    pub identifiers: Vec<[u8; 32]>,
    /// SHA-256 of the identifiers in the user's contact book (model iii).
    pub contact_book: Arc<HashSet<[u8; 32]>>,
}

impl UserPolicy {
    /// An enlisted user in the region whom everyone may reach (benchmarks, tests).
    pub fn reachable_by_everyone() -> UserPolicy {
        UserPolicy {
            enlisted: true,
            test: false,
            model: ConsentModel::Everyone,
            in_region: true,
            region_until_ms: None,
            identifiers: Vec::new(),
            contact_book: Arc::default(),
        }
    }
}

/// What the data plane tells the control plane about contacts, to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactEvent {
    /// A first contact the consent model turned into a message request: the control plane
    /// records it and tells the recipient's network. `party` is `Party::Network` under
    /// model (iv), else the sending user.
    Requested {
        sender: UserAddress,
        recipient: UserAddress,
        party: Party,
    },
    /// `sender` reached `recipient` for the first time: from now on `sender` accepts
    /// `recipient` (whoever writes first consents to hear back).
    Wrote {
        sender: UserAddress,
        recipient: UserAddress,
    },
}

/// Bound of the contact-event channel to the control plane; past it the envelope is still
/// refused with `MESSAGE_REQUEST_PENDING` and the next attempt records the request.
const CONTACT_EVENTS_MAX: usize = 4096;

/// A network's rate of frames across networks: the generic cell rate algorithm on one atomic
/// (the theoretical arrival time), so every core charges the same budget without a lock.
/// Bursts of up to one second's worth pass.
#[derive(Debug)]
pub struct RateGate {
    interval_us: u64,
    burst_us: u64,
    /// Theoretical arrival time of the next frame, microseconds since the Unix epoch.
    tat_us: AtomicU64,
}

impl RateGate {
    pub fn new(per_second: u32) -> RateGate {
        let interval_us = 1_000_000 / u64::from(per_second.max(1));
        RateGate {
            interval_us,
            burst_us: BURST.as_secs() * 1_000_000,
            tat_us: AtomicU64::new(0),
        }
    }

    /// Takes one frame's worth at `now_ms`; `Err` is how long to wait, in milliseconds.
    pub fn take(&self, now_ms: u64) -> Result<(), u32> {
        let now = now_ms.saturating_mul(1000);
        let mut tat = self.tat_us.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval_us;
            if next - now > self.burst_us + self.interval_us {
                let wait_ms = (next - now - self.burst_us).div_ceil(1000);
                return Err(u32::try_from(wait_ms).unwrap_or(u32::MAX));
            }
            match self
                .tat_us
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

#[derive(Debug)]
pub struct Policy {
    /// `false` only in the lab (`interop.enforce = false`): data-plane benchmarks and
    /// protocol tests that do not enlist users.
    enforce: AtomicBool,
    networks: Map<NetworkId, PartnerStatus>,
    /// Networks with a traffic limit on what they send across networks.
    rates: Map<NetworkId, Arc<RateGate>>,
    users: Map<UserAddress, UserPolicy>,
    /// (recipient, party) pairs the recipient accepted, or that it contacted first.
    accepted: Map<(UserAddress, Party), ()>,
    /// Pairs with a request already sent to the control plane.
    requested: Map<(UserAddress, Party), ()>,
    /// The pairs of `accepted` and `requested` each user is part of, so that an opt-out
    /// forgets them without scanning the maps (entries of a pair already forgotten through
    /// its other user stay until this one goes: removing them again is harmless).
    pairs_of: Map<UserAddress, Vec<(UserAddress, Party)>>,
    contacts: Sender<ContactEvent>,
    contacts_rx: Receiver<ContactEvent>,
    /// Each network's caps on users, devices and device-set changes: per-network limits the
    /// control plane sets from partner records, like `rates`; the shards charge them.
    caps: Arc<NetworkCaps>,
}

/// What [`Policy::check`] decided for one cross-network frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub result: Result<(), ErrorCode>,
    /// A first contact for the shell to record ([`Policy::record_contact`]).
    pub contact: Option<ContactEvent>,
    /// The frame crossed networks with the rules enforced (for the `/metrics` counters).
    pub checked: bool,
}

impl Verdict {
    fn pass() -> Verdict {
        Verdict {
            result: Ok(()),
            contact: None,
            checked: false,
        }
    }
}

impl Policy {
    pub fn new(enforce: bool) -> Policy {
        let (tx, rx) = crossbeam_channel::bounded(CONTACT_EVENTS_MAX);
        Policy {
            enforce: AtomicBool::new(enforce),
            networks: Map::default(),
            rates: Map::default(),
            users: Map::default(),
            accepted: Map::default(),
            requested: Map::default(),
            pairs_of: Map::default(),
            contacts: tx,
            contacts_rx: rx,
            caps: Arc::new(NetworkCaps::new(CapDefaults::of(
                &crate::limits::RelayLimits::default(),
            ))),
        }
    }

    /// Each network's caps on users, devices and device-set changes (enforced whether or not
    /// the interop rules are: they bound the relay's memory, not who may talk to whom).
    pub fn caps(&self) -> &Arc<NetworkCaps> {
        &self.caps
    }

    pub fn enforced(&self) -> bool {
        self.enforce.load(Ordering::Relaxed)
    }

    pub fn set_network(&self, network: NetworkId, status: PartnerStatus) {
        self.networks.insert(network, status);
    }

    /// Forgets every network not in `known` (and its traffic limit).
    pub fn retain_networks(&self, known: &[NetworkId]) {
        self.networks.retain(|n, _| known.contains(n));
        self.rates.retain(|n, _| known.contains(n));
    }

    /// Sets (or, with 0, lifts) the network's limit of cross-network frames per second.
    pub fn set_rate(&self, network: NetworkId, per_second: u32) {
        if per_second == 0 {
            self.rates.remove(&network);
        } else {
            let unchanged = self
                .rates
                .get(&network)
                .is_some_and(|g| g.interval_us == 1_000_000 / u64::from(per_second));
            if !unchanged {
                self.rates
                    .insert(network, Arc::new(RateGate::new(per_second)));
            }
        }
    }

    /// Charges one cross-network frame to the sending network's limit; `Err` is the wait in
    /// milliseconds (`RATE_LIMITED`).
    pub fn admit(
        &self,
        sender: &UserAddress,
        recipient: &UserAddress,
        now_ms: u64,
    ) -> Result<(), u32> {
        if sender.network == recipient.network || !self.enforced() {
            return Ok(());
        }
        match self.rates.get(&sender.network) {
            Some(gate) => gate.take(now_ms),
            None => Ok(()),
        }
    }

    pub fn network_status(&self, network: NetworkId) -> Option<PartnerStatus> {
        self.networks.get(&network).map(|s| *s)
    }

    pub fn set_user(&self, user: UserAddress, policy: UserPolicy) {
        self.users.insert(user, policy);
    }

    pub fn user(&self, user: &UserAddress) -> Option<UserPolicy> {
        self.users.get(user).map(|p| p.clone())
    }

    pub fn remove_user(&self, user: &UserAddress) {
        self.users.remove(user);
        if let Some((_, pairs)) = self.pairs_of.remove(user) {
            for pair in pairs {
                self.accepted.remove(&pair);
                self.requested.remove(&pair);
            }
        }
    }

    /// Notes that `pair` involves its recipient and, for a user party, that user.
    fn index_pair(&self, pair: (UserAddress, Party)) {
        self.pairs_of.entry(pair.0).or_default().push(pair);
        if let Party::User(other) = pair.1 {
            self.pairs_of.entry(other).or_default().push(pair);
        }
    }

    pub fn update_user(&self, user: &UserAddress, change: impl FnOnce(&mut UserPolicy)) {
        if let Some(mut entry) = self.users.get_mut(user) {
            change(&mut entry);
        }
    }

    /// The users whose entry passes `pick` (read in place: nothing is copied but addresses).
    pub fn users_where(&self, pick: impl Fn(&UserPolicy) -> bool) -> Vec<UserAddress> {
        self.users
            .iter()
            .filter(|e| pick(e.value()))
            .map(|e| *e.key())
            .collect()
    }

    /// `recipient` accepts `party` (a request accepted, or `recipient` wrote first).
    pub fn accept(&self, recipient: UserAddress, party: Party) {
        if self.accepted.insert((recipient, party), ()).is_none() {
            self.index_pair((recipient, party));
        }
        self.requested.remove(&(recipient, party));
    }

    pub fn has_accepted(&self, recipient: &UserAddress, party: Party) -> bool {
        self.accepted.contains_key(&(*recipient, party))
    }

    /// Forgets that a request was sent, so the next attempt records a new one.
    pub fn forget_request(&self, recipient: UserAddress, party: Party) {
        self.requested.remove(&(recipient, party));
    }

    /// Contact events waiting for the control plane.
    pub fn contact_events(&self) -> &Receiver<ContactEvent> {
        &self.contacts_rx
    }

    /// Whether `sender` may reach `recipient` now, and the first contact this frame makes.
    /// A pure decision: nothing is recorded.
    pub fn check(&self, sender: &UserAddress, recipient: &UserAddress) -> Verdict {
        if sender.network == recipient.network || !self.enforced() {
            return Verdict::pass();
        }
        let (result, contact) = self.decide(sender, recipient);
        Verdict {
            result,
            contact,
            checked: true,
        }
    }

    /// What [`Policy::check`] answers (discovery uses it to tell "reach directly" from "a
    /// request first").
    pub fn peek(&self, sender: &UserAddress, recipient: &UserAddress) -> Result<(), ErrorCode> {
        self.check(sender, recipient).result
    }

    fn decide(
        &self,
        sender: &UserAddress,
        recipient: &UserAddress,
    ) -> (Result<(), ErrorCode>, Option<ContactEvent>) {
        // A network the registry does not know (removed from the configuration, say)
        // neither sends nor receives across networks.
        let (Some(sender_network), Some(recipient_network)) = (
            self.network_status(sender.network),
            self.network_status(recipient.network),
        ) else {
            return (Err(ErrorCode::NetworkUnknown), None);
        };
        if sender_network == PartnerStatus::Suspended
            || recipient_network == PartnerStatus::Suspended
        {
            return (Err(ErrorCode::PartnerSuspended), None);
        }
        let Some(from) = self.users.get(sender).filter(|p| p.enlisted) else {
            return (Err(ErrorCode::SenderNotEnlisted), None);
        };
        if !from.in_region {
            return (Err(ErrorCode::SenderOutsideRegion), None);
        }
        let Some(to) = self.users.get(recipient).filter(|p| p.enlisted) else {
            return (Err(ErrorCode::RecipientNotEnlisted), None);
        };
        // Where the recipient is, is for those it accepted: checked after its consent, so a
        // sender it has not accepted learns nothing of it but "pending".
        let to_in_region = to.in_region;
        if (sender_network == PartnerStatus::Testing && !to.test)
            || (recipient_network == PartnerStatus::Testing && !from.test)
        {
            return (Err(ErrorCode::PartnerTesting), None);
        }
        let user = Party::User(*sender);
        let party = match to.model {
            ConsentModel::Everyone => None,
            ConsentModel::RequestAlways => Some(user),
            ConsentModel::RequestUnknown => {
                let known = from.identifiers.iter().any(|h| to.contact_book.contains(h));
                (!known).then_some(user)
            }
            ConsentModel::RequestPerNetwork => Some(Party::Network(sender.network)),
        };
        drop((from, to));
        let allowed = match party {
            None => true,
            Some(party) => {
                self.has_accepted(recipient, user) || self.has_accepted(recipient, party)
            }
        };
        match party {
            Some(party) if !allowed => {
                let first = !self.requested.contains_key(&(*recipient, party));
                let contact = first.then_some(ContactEvent::Requested {
                    sender: *sender,
                    recipient: *recipient,
                    party,
                });
                (Err(ErrorCode::MessageRequestPending), contact)
            }
            _ if !to_in_region => (Err(ErrorCode::RecipientOutsideRegion), None),
            _ => {
                let first = !self.has_accepted(sender, Party::User(*recipient));
                let contact = first.then_some(ContactEvent::Wrote {
                    sender: *sender,
                    recipient: *recipient,
                });
                (Ok(()), contact)
            }
        }
    }

    /// Records a first contact a session reported: the pair is marked and the event queued
    /// for the control plane. With the queue full nothing is marked, and the next frame of the
    /// pair reports it again.
    pub fn record_contact(&self, event: ContactEvent) {
        match event {
            ContactEvent::Wrote { sender, recipient } => self.wrote(sender, recipient),
            ContactEvent::Requested {
                sender,
                recipient,
                party,
            } => self.request(sender, recipient, party),
        }
    }

    /// Records once that `sender` reached `recipient`: `sender` now accepts `recipient`.
    fn wrote(&self, sender: UserAddress, recipient: UserAddress) {
        let key = (sender, Party::User(recipient));
        if self.accepted.contains_key(&key) {
            return;
        }
        // Marked only once the control plane will store it: with the channel full, the next
        // frame of the pair tries again.
        if self
            .contacts
            .try_send(ContactEvent::Wrote { sender, recipient })
            .is_ok()
            && self.accepted.insert(key, ()).is_none()
        {
            self.index_pair(key);
        }
    }

    /// Hands a first contact to the control plane once per (recipient, party).
    fn request(&self, sender: UserAddress, recipient: UserAddress, party: Party) {
        if self.requested.insert((recipient, party), ()).is_some() {
            return;
        }
        self.index_pair((recipient, party));
        // The one who asks accepts the one asked.
        self.wrote(sender, recipient);
        let event = ContactEvent::Requested {
            sender,
            recipient,
            party,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.contacts.try_send(event)
        {
            self.requested.remove(&(recipient, party));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codec::UserId;

    fn user(network: u32, id: u128) -> UserAddress {
        UserAddress {
            network: NetworkId(network),
            user: UserId(id),
        }
    }

    fn enlisted(model: ConsentModel) -> UserPolicy {
        UserPolicy {
            model,
            ..UserPolicy::reachable_by_everyone()
        }
    }

    /// What a session and its shell do with one frame: decide, then record the contact.
    fn check(
        policy: &Policy,
        sender: &UserAddress,
        recipient: &UserAddress,
    ) -> Result<(), ErrorCode> {
        let verdict = policy.check(sender, recipient);
        if let Some(contact) = verdict.contact {
            policy.record_contact(contact);
        }
        verdict.result
    }

    /// An enforcing policy with networks 1 and 2 active.
    fn policy() -> Policy {
        let policy = Policy::new(true);
        policy.set_network(NetworkId(1), PartnerStatus::Active);
        policy.set_network(NetworkId(2), PartnerStatus::Active);
        policy
    }

    #[test]
    fn same_network_traffic_is_not_interop() {
        let policy = policy();
        assert_eq!(check(&policy, &user(1, 1), &user(1, 2)), Ok(()));
        assert_eq!(
            check(&policy, &user(1, 1), &user(2, 2)),
            Err(ErrorCode::SenderNotEnlisted)
        );
    }

    #[test]
    fn each_rule_has_its_code() {
        let policy = policy();
        let (a, b) = (user(1, 1), user(2, 2));
        policy.set_user(a, enlisted(ConsentModel::Everyone));
        assert_eq!(check(&policy, &a, &b), Err(ErrorCode::RecipientNotEnlisted));
        policy.set_user(b, enlisted(ConsentModel::Everyone));
        assert_eq!(check(&policy, &a, &b), Ok(()));
        policy.update_user(&b, |p| p.in_region = false);
        assert_eq!(
            check(&policy, &a, &b),
            Err(ErrorCode::RecipientOutsideRegion)
        );
        assert_eq!(check(&policy, &b, &a), Err(ErrorCode::SenderOutsideRegion));
        policy.update_user(&b, |p| p.in_region = true);
        policy.set_network(NetworkId(2), PartnerStatus::Testing);
        assert_eq!(check(&policy, &a, &b), Err(ErrorCode::PartnerTesting));
        policy.update_user(&a, |p| p.test = true);
        assert_eq!(check(&policy, &a, &b), Ok(()));
        policy.set_network(NetworkId(2), PartnerStatus::Suspended);
        assert_eq!(check(&policy, &a, &b), Err(ErrorCode::PartnerSuspended));
        assert_eq!(check(&policy, &b, &a), Err(ErrorCode::PartnerSuspended));
    }

    #[test]
    fn a_request_is_recorded_once_and_acceptance_opens_both_ways() {
        let policy = policy();
        let (a, b) = (user(1, 1), user(2, 2));
        policy.set_user(a, enlisted(ConsentModel::RequestAlways));
        policy.set_user(b, enlisted(ConsentModel::RequestAlways));
        assert_eq!(
            check(&policy, &a, &b),
            Err(ErrorCode::MessageRequestPending)
        );
        assert_eq!(
            check(&policy, &a, &b),
            Err(ErrorCode::MessageRequestPending)
        );
        let events: Vec<ContactEvent> = policy.contact_events().try_iter().collect();
        assert_eq!(
            events,
            [
                ContactEvent::Wrote {
                    sender: a,
                    recipient: b
                },
                ContactEvent::Requested {
                    sender: a,
                    recipient: b,
                    party: Party::User(a)
                }
            ]
        );
        policy.accept(b, Party::User(a));
        assert_eq!(check(&policy, &a, &b), Ok(()));
        assert_eq!(check(&policy, &b, &a), Ok(()));
    }

    #[test]
    fn contact_book_and_per_network_models() {
        let policy = policy();
        let (a, b, c) = (user(1, 1), user(2, 2), user(1, 3));
        let mut from = enlisted(ConsentModel::Everyone);
        from.identifiers = vec![[7; 32]];
        policy.set_user(a, from);
        policy.set_user(c, enlisted(ConsentModel::Everyone));
        let mut to = enlisted(ConsentModel::RequestUnknown);
        to.contact_book = Arc::new([[7; 32]].into_iter().collect());
        policy.set_user(b, to);
        assert_eq!(check(&policy, &a, &b), Ok(()));
        assert_eq!(
            check(&policy, &c, &b),
            Err(ErrorCode::MessageRequestPending)
        );
        policy.update_user(&b, |p| p.model = ConsentModel::RequestPerNetwork);
        assert_eq!(
            check(&policy, &a, &b),
            Err(ErrorCode::MessageRequestPending)
        );
        assert!(policy.contact_events().try_iter().any(|e| e
            == ContactEvent::Requested {
                sender: a,
                recipient: b,
                party: Party::Network(NetworkId(1))
            }));
        policy.accept(b, Party::Network(NetworkId(1)));
        assert_eq!(check(&policy, &a, &b), Ok(()));
        assert_eq!(check(&policy, &c, &b), Ok(()));
    }

    #[test]
    fn a_rate_gate_passes_a_second_of_burst_then_the_rate() {
        let gate = RateGate::new(10);
        let now = 1_000_000;
        let passed = (0..30).filter(|_| gate.take(now).is_ok()).count();
        assert_eq!(passed, 11);
        assert!(gate.take(now).unwrap_err() >= 100);
        assert!(gate.take(now + 200).is_ok());
        let policy = policy();
        policy.set_rate(NetworkId(2), 1);
        assert!(policy.admit(&user(2, 1), &user(1, 1), now).is_ok());
        assert!(policy.admit(&user(2, 1), &user(1, 1), now).is_ok());
        assert!(policy.admit(&user(2, 1), &user(1, 1), now).is_err());
        assert!(policy.admit(&user(2, 1), &user(2, 2), now).is_ok());
        policy.set_rate(NetworkId(2), 0);
        assert!(policy.admit(&user(2, 1), &user(1, 1), now).is_ok());
    }

    #[test]
    fn an_unknown_network_neither_sends_nor_receives() {
        let policy = policy();
        policy.set_user(user(1, 1), enlisted(ConsentModel::Everyone));
        policy.set_user(user(3, 3), enlisted(ConsentModel::Everyone));
        assert_eq!(
            check(&policy, &user(1, 1), &user(3, 3)),
            Err(ErrorCode::NetworkUnknown)
        );
        assert_eq!(
            check(&policy, &user(3, 3), &user(1, 1)),
            Err(ErrorCode::NetworkUnknown)
        );
        policy.retain_networks(&[NetworkId(1)]);
        assert_eq!(
            check(&policy, &user(1, 1), &user(2, 2)),
            Err(ErrorCode::NetworkUnknown)
        );
    }

    #[test]
    fn removing_a_user_forgets_its_pairs_both_ways() {
        let policy = policy();
        let (a, b, c) = (user(1, 1), user(2, 2), user(1, 3));
        for u in [a, b, c] {
            policy.set_user(u, enlisted(ConsentModel::RequestAlways));
        }
        policy.accept(a, Party::User(b));
        policy.accept(b, Party::User(a));
        policy.accept(a, Party::User(c));
        assert_eq!(
            check(&policy, &c, &b),
            Err(ErrorCode::MessageRequestPending)
        );
        policy.remove_user(&b);
        assert!(!policy.has_accepted(&a, Party::User(b)));
        assert!(!policy.has_accepted(&b, Party::User(a)));
        assert!(policy.has_accepted(&a, Party::User(c)));
        // b's pending request from c is forgotten too: a new one would be recorded.
        policy.set_user(b, enlisted(ConsentModel::RequestAlways));
        let _ = policy.contact_events().try_iter().count();
        assert_eq!(
            check(&policy, &c, &b),
            Err(ErrorCode::MessageRequestPending)
        );
        assert!(policy.contact_events().try_iter().any(|e| matches!(
            e,
            ContactEvent::Requested { recipient, .. } if recipient == b
        )));
    }

    #[test]
    fn off_in_the_lab() {
        let policy = Policy::new(false);
        assert_eq!(check(&policy, &user(1, 1), &user(2, 2)), Ok(()));
    }
}
