//! The event feed: how networks learn what concerns them (a message request for one of
//! their users, a request accepted, a user delisted elsewhere, a user's location standing
//! changed, one-time keys running out, their own status). A network reads it with
//! `GET /v1/events?after=N`, in order, and keeps the last sequence it handled.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::store::{EVENTS, StoreResult, Tx};
use super::{ApiResult, Caller, ControlPlane};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// To the recipient's network: a first contact waits for the user's answer.
    RequestCreated,
    /// To the sender's network: the recipient accepted; envelopes now pass.
    RequestAccepted,
    /// To every other network: the user opted out; forget its devices and keys.
    UserDelisted,
    /// To the user's network: the user no longer meets the location rule, or again does.
    LocationChanged,
    /// To the device's network: one-time prekeys or KeyPackages are low or gone.
    KeysLow,
    /// To the partner: its status changed.
    PartnerStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    /// The network it is for.
    pub audience: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<u32>,
    pub at_ms: u64,
    pub data: Value,
}

/// Events returned per call at most.
pub const EVENTS_PAGE_MAX: usize = 1000;

/// The store key of an event: its network first, so that a network's feed is one range.
fn event_key(audience: u32, seq: u64) -> String {
    format!("{audience:010}|{seq:020}")
}

/// Appends an event for `audience` in the caller's transaction.
pub fn append(
    tx: &mut Tx<'_>,
    now_ms: u64,
    kind: EventKind,
    audience: u32,
    data: Value,
) -> StoreResult<()> {
    let seq = tx.next("next_event")?;
    let event = Event {
        seq,
        kind,
        audience: Some(audience),
        except: None,
        at_ms: now_ms,
        data,
    };
    tx.put(EVENTS, &event_key(audience, seq), &event)
}

/// Events deleted per pruning transaction.
const PRUNE_BATCH: usize = 10_000;

impl ControlPlane {
    /// Deletes the events older than the retention period; returns how many went.
    pub fn prune_events(&self, now_ms: u64) -> ApiResult<usize> {
        let cutoff = now_ms.saturating_sub(
            u64::from(self.settings.events_retention_days) * super::location::DAY_MS,
        );
        let mut pruned = 0;
        // Each network's feed is a range in time order: prune from its start.
        let networks = self.partner_ids()?;
        for network in networks {
            let prefix = format!("{network:010}|");
            loop {
                let batch = self.store.write(|tx| {
                    let mut gone = 0;
                    for key in tx.keys(EVENTS, &prefix, PRUNE_BATCH)? {
                        match tx.get::<Event>(EVENTS, &key)? {
                            Some(event) if event.at_ms < cutoff => {
                                tx.delete(EVENTS, &key)?;
                                gone += 1;
                            }
                            _ => break,
                        }
                    }
                    Ok::<usize, super::ApiError>(gone)
                })?;
                pruned += batch;
                if batch < PRUNE_BATCH {
                    break;
                }
            }
        }
        Ok(pruned)
    }

    /// The caller's events after `after`, at most `limit`.
    pub fn events(&self, caller: Caller, after: u64, limit: usize) -> ApiResult<Vec<Event>> {
        let network = super::caller_network(caller)?.0;
        let limit = limit.clamp(1, EVENTS_PAGE_MAX);
        Ok(self.store.scan_from::<Event>(
            EVENTS,
            &event_key(network, after.saturating_add(1)),
            &format!("{network:010}|"),
            limit,
        )?)
    }
}
