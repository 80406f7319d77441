//! Message requests: a first contact the recipient's consent model holds back. The data
//! plane refuses the envelope with `MESSAGE_REQUEST_PENDING` (nothing is held, so nothing of
//! the sender waits in the recipient's queues and nothing of the recipient reaches the
//! sender) and reports the contact here; the recipient's network is told through its event
//! feed and answers with accept or refuse. A refusal is not reported to the sender: its
//! envelopes keep being refused as pending, so the sender learns nothing of the recipient.

use codec::{ErrorCode, UserAddress};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::events::{self, EventKind};
use super::store::{ACCEPTED_BY, REQUEST_INDEX, REQUESTS, StoreResult, Tx, USERS};
use super::user_record::{Accepted, UserRecord};
use super::{ApiError, ApiResult, Caller, ControlPlane, UserRef, caller_network, user_key};
use crate::tables::policy::{ContactEvent, Party};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Pending,
    Accepted,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRequest {
    pub id: u64,
    pub recipient: UserRef,
    pub sender: UserRef,
    /// What accepting admits: the sending user, or (model iv) its whole network.
    pub admits: Accepted,
    pub state: RequestState,
    pub created_at_ms: u64,
    pub decided_at_ms: Option<u64>,
}

/// Requests returned per call at most.
pub const REQUESTS_PAGE_MAX: usize = 1000;

/// Contact events stored per transaction at most.
const DRAIN_BATCH: usize = 1024;

/// Records that `user` accepts `accepted`, with the reverse index an opt-out of the accepted
/// user needs; nothing for a user that is not enlisted.
pub(super) fn add_acceptance(
    tx: &mut Tx<'_>,
    user: &UserAddress,
    accepted: Accepted,
) -> StoreResult<()> {
    let key = user_key(user);
    let Some(mut record) = tx.get::<UserRecord>(USERS, &key)? else {
        return Ok(());
    };
    if !record.enlisted || record.accepted.contains(&accepted) {
        return Ok(());
    }
    record.accepted.push(accepted);
    tx.put(USERS, &key, &record)?;
    if let Accepted::User(other) = accepted {
        tx.put(
            ACCEPTED_BY,
            &format!("{}|{key}", user_key(&other.address())),
            &(),
        )?;
    }
    Ok(())
}

impl ControlPlane {
    /// Stores what the data plane reported (accepted pairs and new requests), a batch per
    /// transaction; a batch that fails to commit is kept and tried again next time.
    pub fn drain_contact_events(&self, now_ms: u64) -> ApiResult<usize> {
        let mut handled = 0;
        loop {
            let mut batch = std::mem::take(
                &mut *self
                    .contact_retry
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            while batch.len() < DRAIN_BATCH {
                match self.policy.contact_events().try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return Ok(handled);
            }
            let _guard = self.lock();
            let stored = self.store.write(|tx| {
                for event in &batch {
                    match *event {
                        ContactEvent::Wrote { sender, recipient } => {
                            add_acceptance(tx, &sender, Accepted::User(UserRef::of(recipient)))?;
                        }
                        ContactEvent::Requested {
                            sender,
                            recipient,
                            party,
                        } => create_request(tx, sender, recipient, party, now_ms)?,
                    }
                }
                Ok::<_, ApiError>(())
            });
            if let Err(error) = stored {
                *self
                    .contact_retry
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = batch;
                return Err(error);
            }
            handled += batch.len();
        }
    }

    /// The requests addressed to the caller's users.
    /// The requests addressed to the caller's users with an id above `after`, in id order,
    /// at most `limit` (a page; the next starts after the last id).
    pub fn requests(
        &self,
        caller: Caller,
        state: Option<RequestState>,
        after: u64,
        limit: usize,
    ) -> ApiResult<Vec<MessageRequest>> {
        let network = caller_network(caller)?;
        let limit = limit.clamp(1, REQUESTS_PAGE_MAX);
        let prefix = format!("net|{:010}|", network.0);
        let reader = self.store.reader()?;
        let mut list = Vec::new();
        let mut start = format!("{prefix}{:020}", after.saturating_add(1));
        // Filtered by state after the index: read the index a page at a time.
        loop {
            let ids = self
                .store
                .scan_from::<u64>(REQUEST_INDEX, &start, &prefix, limit)?;
            let Some(&last) = ids.last() else {
                return Ok(list);
            };
            for id in &ids {
                if let Some(request) =
                    reader.get::<MessageRequest>(REQUESTS, &format!("{id:020}"))?
                    && state.is_none_or(|s| request.state == s)
                {
                    list.push(request);
                    if list.len() >= limit {
                        return Ok(list);
                    }
                }
            }
            if ids.len() < limit {
                return Ok(list);
            }
            start = format!("{prefix}{:020}", last.saturating_add(1));
        }
    }

    /// The recipient's network answers a request.
    pub fn decide_request(
        &self,
        caller: Caller,
        id: u64,
        accept: bool,
        now_ms: u64,
    ) -> ApiResult<MessageRequest> {
        let network = caller_network(caller)?;
        self.require_active(caller)?;
        let key = format!("{id:020}");
        let _guard = self.lock();
        let request = self.store.write(|tx| {
            let mut request: MessageRequest =
                tx.get(REQUESTS, &key)?.ok_or_else(ApiError::not_found)?;
            if request.recipient.network != network.0 {
                // Another network's request: as if it did not exist.
                return Err(ApiError::not_found());
            }
            let enlisted = tx
                .get::<UserRecord>(USERS, &user_key(&request.recipient.address()))?
                .is_some_and(|r| r.enlisted);
            if !enlisted {
                return Err(ApiError::not_found());
            }
            if request.state != RequestState::Pending {
                return Err(ApiError::new(
                    ErrorCode::RequestDecided,
                    format!("request {id} was already {:?}", request.state),
                ));
            }
            request.state = if accept {
                RequestState::Accepted
            } else {
                RequestState::Refused
            };
            request.decided_at_ms = Some(now_ms);
            tx.put(REQUESTS, &key, &request)?;
            if accept {
                add_acceptance(tx, &request.recipient.address(), request.admits)?;
                events::append(
                    tx,
                    now_ms,
                    EventKind::RequestAccepted,
                    request.sender.network,
                    json!({"request": id, "recipient": request.recipient, "sender": request.sender}),
                )?;
            }
            Ok(request)
        })?;
        if accept {
            self.policy
                .accept(request.recipient.address(), request.admits.party());
        }
        Ok(request)
    }
}

/// The index key of the request `recipient` got for `admits`.
fn pair_key(recipient: &UserAddress, admits: Accepted) -> String {
    let admits = match admits {
        Accepted::User(user) => format!("u:{}", user_key(&user.address())),
        Accepted::Network(network) => format!("n:{network}"),
    };
    format!("pair|{}|{admits}", user_key(recipient))
}

/// Records a request unless `recipient` already got one for what it would admit.
fn create_request(
    tx: &mut Tx<'_>,
    sender: UserAddress,
    recipient: UserAddress,
    party: Party,
    now_ms: u64,
) -> StoreResult<()> {
    let admits = Accepted::of(party);
    let pair = pair_key(&recipient, admits);
    // One request per (recipient, what it admits), whatever became of it.
    if tx.get::<u64>(REQUEST_INDEX, &pair)?.is_some() {
        return Ok(());
    }
    let id = tx.next("next_request")?;
    tx.put(REQUEST_INDEX, &pair, &id)?;
    tx.put(
        REQUEST_INDEX,
        &format!("net|{:010}|{id:020}", recipient.network.0),
        &id,
    )?;
    let request = MessageRequest {
        id,
        recipient: UserRef::of(recipient),
        sender: UserRef::of(sender),
        admits,
        state: RequestState::Pending,
        created_at_ms: now_ms,
        decided_at_ms: None,
    };
    tx.put(REQUESTS, &format!("{id:020}"), &request)?;
    events::append(
        tx,
        now_ms,
        EventKind::RequestCreated,
        recipient.network.0,
        json!({"request": id, "recipient": UserRef::of(recipient), "sender": UserRef::of(sender), "admits": admits}),
    )
}

/// Deletes every request addressed to `recipient` (it opted out), with their index entries.
pub(super) fn forget_requests_to(tx: &mut Tx<'_>, recipient: &UserAddress) -> StoreResult<()> {
    let prefix = format!("pair|{}|", user_key(recipient));
    for key in tx.keys(REQUEST_INDEX, &prefix, usize::MAX)? {
        if let Some(id) = tx.get::<u64>(REQUEST_INDEX, &key)? {
            tx.delete(REQUESTS, &format!("{id:020}"))?;
            tx.delete(
                REQUEST_INDEX,
                &format!("net|{:010}|{id:020}", recipient.network.0),
            )?;
        }
        tx.delete(REQUEST_INDEX, &key)?;
    }
    Ok(())
}
