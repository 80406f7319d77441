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
use super::store::{REQUEST_INDEX, REQUESTS, USERS};
use super::users::{Accepted, UserRecord};
use super::{ApiError, ApiResult, Caller, ControlPlane, UserRef, caller_network, user_key};
use crate::core::policy::{ContactEvent, Party};

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

impl ControlPlane {
    /// Stores what the data plane reported: accepted pairs and new requests.
    pub fn drain_contact_events(&self, now_ms: u64) -> ApiResult<usize> {
        let mut handled = 0;
        while let Ok(event) = self.policy.contact_events().try_recv() {
            handled += 1;
            match event {
                ContactEvent::Wrote { sender, recipient } => {
                    self.remember_accepted(sender, Party::User(recipient))?;
                }
                ContactEvent::Requested {
                    sender,
                    recipient,
                    party,
                } => self.create_request(sender, recipient, party, now_ms)?,
            }
        }
        Ok(handled)
    }

    fn remember_accepted(&self, user: UserAddress, party: Party) -> ApiResult<()> {
        let key = user_key(&user);
        let _guard = self.lock();
        self.store.write(|tx| {
            if let Some(mut record) = tx.get::<UserRecord>(USERS, &key)? {
                let accepted = Accepted::of(party);
                if record.enlisted && !record.accepted.contains(&accepted) {
                    record.accepted.push(accepted);
                    tx.put(USERS, &key, &record)?;
                }
            }
            Ok::<_, ApiError>(())
        })
    }

    fn create_request(
        &self,
        sender: UserAddress,
        recipient: UserAddress,
        party: Party,
        now_ms: u64,
    ) -> ApiResult<()> {
        let admits = Accepted::of(party);
        let pair = pair_key(&recipient, admits);
        let _guard = self.lock();
        self.store.write(|tx| {
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
                Some(recipient.network.0),
                None,
                json!({"request": id, "recipient": UserRef::of(recipient), "sender": UserRef::of(sender), "admits": admits}),
            )?;
            Ok::<_, ApiError>(())
        })
    }

    /// The requests addressed to the caller's users.
    pub fn requests(
        &self,
        caller: Caller,
        state: Option<RequestState>,
    ) -> ApiResult<Vec<MessageRequest>> {
        let network = caller_network(caller)?;
        let ids = self
            .store
            .scan::<u64>(REQUEST_INDEX, &format!("net|{:010}|", network.0))?;
        let mut list = Vec::with_capacity(ids.len());
        for (_, id) in ids {
            if let Some(request) = self
                .store
                .get::<MessageRequest>(REQUESTS, &format!("{id:020}"))?
                && state.is_none_or(|s| request.state == s)
            {
                list.push(request);
            }
        }
        Ok(list)
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
        let key = format!("{id:020}");
        let _guard = self.lock();
        let request = self.store.write(|tx| {
            let mut request: MessageRequest =
                tx.get(REQUESTS, &key)?.ok_or_else(ApiError::not_found)?;
            if request.recipient.network != network.0 {
                // Another network's request: as if it did not exist.
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
                let user_key = user_key(&request.recipient.address());
                if let Some(mut record) = tx.get::<UserRecord>(USERS, &user_key)?
                    && !record.accepted.contains(&request.admits)
                {
                    record.accepted.push(request.admits);
                    tx.put(USERS, &user_key, &record)?;
                }
                events::append(
                    tx,
                    now_ms,
                    EventKind::RequestAccepted,
                    Some(request.sender.network),
                    None,
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
