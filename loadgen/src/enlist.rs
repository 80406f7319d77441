//! Enlisting the population through the relay's control API before a run, so that the relay
//! can enforce the interop rules (`docs/protocol.md` §8.1) on every cross-network frame, as in
//! production: every user of every network is `PUT /v1/users/{network}/{user}` by its own
//! network (TLS with the network's server certificate, on the relay's HTTP port) with a
//! consent record signed by the network's token key (model `everyone`, discoverable), its
//! device set (the same one its network's `DeviceList` declares, see
//! [`Population::device_numbers`]) and a fresh location attestation in the EEA.
//!
//! A few requests run at once ([`CONCURRENCY`]): each is one commit of the relay's control
//! store. Refusals fail the run with the HTTP status and the relay's error body; only
//! `429`/`503` and transport failures are tried again, a few times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::ClientTls;
use client::control::{ApiResponse, ControlClient, sign_consent, user_hex};
use codec::UserAddress;
use devkit::now_ms;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::pki::Identities;
use crate::population::Population;

/// Enlistment requests in flight at once.
pub const CONCURRENCY: usize = 8;
/// How often one request is tried again after a `429`, a `503` or a transport failure.
const RETRIES_MAX: u32 = 5;
/// The first wait before a retry (doubled each time) when the relay names none.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// A progress line at most this often while enlisting (only long enlistments print one).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How every simulated user chose to be reached: by anyone, once opted in.
pub const CONSENT_MODEL: &str = "everyone";
/// Where every simulated user is, as its network attests it (in the EEA).
pub const COUNTRY: &str = "DE";

/// What enlisting the population did, for the report (`enlistment`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EnlistReport {
    /// Whether loadgen enlisted the whole population before the measured run.
    pub enlisted: bool,
    /// Why it did not, when it did not (`--no-enlist`, an MQTT target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The control API's address (the relay's HTTP port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    pub networks: u32,
    pub users: u32,
    pub devices: u32,
    /// Answered `201` (newly enlisted) and `200` (already enlisted; consent renewed).
    pub created: u32,
    pub renewed: u32,
    /// Requests tried again after a `429`, a `503` or a transport failure.
    pub retries: u32,
    pub concurrency: usize,
    pub consent_model: &'static str,
    pub duration_s: f64,
    pub users_per_s: f64,
}

impl EnlistReport {
    /// The population was not enlisted, for `reason`.
    pub fn skipped(reason: &str) -> EnlistReport {
        EnlistReport {
            skipped: Some(reason.to_string()),
            ..EnlistReport::default()
        }
    }

    /// For the report: every figure when enlisted, else `{"enlisted": false, "skipped": ..}`.
    pub fn to_json(&self) -> Value {
        if self.enlisted {
            serde_json::to_value(self).unwrap_or(Value::Null)
        } else {
            json!({ "enlisted": false, "skipped": self.skipped })
        }
    }
}

/// The API path of a user.
pub fn user_path(user: &UserAddress) -> String {
    format!("/v1/users/{}/{}", user.network.0, user_hex(user))
}

/// The body of `PUT /v1/users/{network}/{user}`: the opt-in at `now_ms` signed with the
/// network's token key, the device set, and an attestation that the user is in the EEA now.
pub fn enlistment_body(
    token_key_pkcs8: &[u8],
    user: &UserAddress,
    devices: &[u32],
    now_ms: u64,
) -> Result<Value, String> {
    let signature = sign_consent(token_key_pkcs8, user, now_ms, CONSENT_MODEL, true)
        .map_err(|e| format!("signing the consent of {user}: {e}"))?;
    Ok(json!({
        "consent": {
            "opted_in_at_ms": now_ms,
            "model": CONSENT_MODEL,
            "discoverable": true,
            "signature": signature,
        },
        "devices": devices,
        "location": {"country": COUNTRY, "observed_at_ms": now_ms},
    }))
}

/// Why an answer is not a success, with a hint where the cause is usually on loadgen's side.
fn refusal(user: &UserAddress, api: SocketAddr, response: &ApiResponse) -> String {
    let hint = match response.error_code() {
        Some(605) => format!(
            " (the token key the relay has registered for network {} is not the one loadgen \
             signs its consents with; with a relay started by hand: is --pki the PKI of its \
             configuration?)",
            user.network.0
        ),
        Some(602 | 203 | 202) => format!(
            " (the relay does not take loadgen's certificate for network {}'s server \
             certificate; with a relay started by hand: is --pki the PKI of its \
             configuration?)",
            user.network.0
        ),
        _ => String::new(),
    };
    format!(
        "enlisting user {user} through the control API at {api} failed: HTTP {} {}{hint}",
        response.status, response.body
    )
}

/// One user's enlistment, tried again on `429`, `503` and transport failures. Returns whether
/// the user was new (`201`) and how many retries it took.
async fn enlist_one(
    api: &ControlClient,
    addr: SocketAddr,
    token_key: &[u8],
    user: UserAddress,
    devices: Vec<u32>,
) -> Result<(bool, u32), String> {
    let path = user_path(&user);
    let mut retries = 0;
    loop {
        let body = enlistment_body(token_key, &user, &devices, now_ms())?;
        let wait = match api.put(&path, &body).await {
            Ok(response) if response.status == 201 => return Ok((true, retries)),
            Ok(response) if response.is_success() => return Ok((false, retries)),
            Ok(response) if matches!(response.status, 429 | 503) && retries < RETRIES_MAX => {
                match response.retry_after_s {
                    Some(s) => Duration::from_secs(s.min(10)),
                    None => RETRY_BACKOFF * 2u32.pow(retries),
                }
            }
            Ok(response) => return Err(refusal(&user, addr, &response)),
            Err(_) if retries < RETRIES_MAX => RETRY_BACKOFF * 2u32.pow(retries),
            Err(e) => {
                return Err(format!(
                    "enlisting user {user}: the control API at {addr} did not answer ({e}); is \
                     it the relay's HTTP port (--api)?"
                ));
            }
        };
        retries += 1;
        tokio::time::sleep(wait).await;
    }
}

/// Enlists every user of `population` (every network, with its devices) through the control
/// API at `api`, `concurrency` requests at once; prints a summary line to stderr.
pub async fn enlist(
    population: &Population,
    identities: &Identities,
    api: SocketAddr,
    concurrency: usize,
) -> Result<EnlistReport, String> {
    let started = Instant::now();
    // One client (the network's server certificate) and token key per network.
    let mut networks: Vec<(ControlClient, Arc<[u8]>)> = Vec::new();
    for network in &population.networks {
        let identity = identities.network(network.id)?;
        let tls: ClientTls = identities.server_tls(network.id).map_err(|e| {
            format!(
                "enlisting network {}'s users needs its server certificate: {e}",
                network.id
            )
        })?;
        let client = ControlClient::new(api, tls, &identities.server_name)
            .map_err(|e| format!("control API client for network {}: {e}", network.id))?;
        networks.push((client, Arc::from(identity.token_key_pkcs8.as_slice())));
    }
    let networks = Arc::new(networks);
    let total = population.users();
    let mut report = EnlistReport {
        enlisted: true,
        api: Some(api),
        networks: u32::try_from(population.networks.len()).unwrap_or(u32::MAX),
        users: total,
        devices: population.devices(),
        concurrency: concurrency.max(1),
        consent_model: CONSENT_MODEL,
        ..EnlistReport::default()
    };
    let mut set = JoinSet::new();
    let mut next = 0;
    let mut done = 0u32;
    let mut last_progress = Instant::now();
    while next < total || !set.is_empty() {
        while next < total && set.len() < report.concurrency {
            let user = population.user_address(next);
            let devices: Vec<u32> = population.device_numbers(next).collect();
            let networks = networks.clone();
            let index = population.network_index_of_user(next);
            set.spawn(async move {
                let (client, key) = &networks[index];
                enlist_one(client, api, key, user, devices).await
            });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        // An error drops `set`, which aborts the requests still in flight.
        let (created, retries) = joined.map_err(|e| format!("enlistment task: {e}"))??;
        if created {
            report.created += 1;
        } else {
            report.renewed += 1;
        }
        report.retries += retries;
        done += 1;
        if last_progress.elapsed() >= PROGRESS_EVERY && done < total {
            last_progress = Instant::now();
            eprintln!(
                "loadgen: enlisting: {done} of {total} users after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    report.duration_s = started.elapsed().as_secs_f64();
    report.users_per_s = f64::from(total) / report.duration_s.max(1e-9);
    eprintln!(
        "loadgen: enlisted {total} users ({} devices, {} networks; {} new, {} renewed) through \
         the control API at {api} in {:.1} s ({:.0} users/s, {} at once)",
        report.devices,
        report.networks,
        report.created,
        report.renewed,
        report.duration_s,
        report.users_per_s,
        report.concurrency
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::PopulationSpec;
    use codec::{NetworkId, UserId};

    #[test]
    fn the_body_carries_the_signed_consent_the_device_set_and_a_location() {
        let key = client::generate_network_key();
        let user = UserAddress::new(NetworkId(3), UserId(0x1_0005));
        let at = 1_700_000_000_000;
        let body = enlistment_body(&key, &user, &[1, 2, 3], at).unwrap();
        assert_eq!(body["devices"], json!([1, 2, 3]));
        assert_eq!(body["consent"]["model"], "everyone");
        assert_eq!(body["consent"]["discoverable"], true);
        assert_eq!(body["consent"]["opted_in_at_ms"], at);
        assert_eq!(body["location"]["country"], "DE");
        assert_eq!(body["location"]["observed_at_ms"], at);
        assert_eq!(
            user_path(&user),
            "/v1/users/3/00000000000000000000000000010005"
        );
        // Signed with this network's key, over this user and time (the relay checks it
        // against the key registered for the network; tests/spawn.rs has the refusal).
        let signature = body["consent"]["signature"].as_str().unwrap();
        assert_eq!(
            signature,
            sign_consent(&key, &user, at, "everyone", true).unwrap()
        );
        let other_key = client::generate_network_key();
        assert_ne!(
            signature,
            sign_consent(&other_key, &user, at, "everyone", true).unwrap()
        );
        let other_user = UserAddress::new(NetworkId(3), UserId(0x1_0006));
        assert_ne!(
            signature,
            sign_consent(&key, &other_user, at, "everyone", true).unwrap()
        );
        assert!(enlistment_body(b"not a key", &user, &[1], at).is_err());
    }

    #[test]
    fn every_user_is_enlisted_with_the_devices_its_device_list_declares() {
        let population = Population::build(&PopulationSpec {
            partners: 2,
            users_per_network: 50,
            multi_device_share: 0.3,
            devices_multi: 5,
            direct_partners: 1,
            offline_share: 0.2,
            server_connections: 1,
            seed: 7,
        })
        .unwrap();
        let mut devices = 0;
        for user in 0..population.users() {
            let numbers: Vec<u32> = population.device_numbers(user).collect();
            assert_eq!(numbers.len(), usize::from(population.device_count(user)));
            assert_eq!(numbers.first(), Some(&1));
            // Offline devices are part of the set: they come back during the run.
            for &n in &numbers {
                let device = population.device_index(user, u8::try_from(n).unwrap());
                assert_eq!(population.user_of_device(device), user);
            }
            devices += numbers.len();
        }
        assert_eq!(devices, population.devices() as usize);
    }
}
