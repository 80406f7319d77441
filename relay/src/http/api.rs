//! The control API's routes: each handler authenticates the caller from its client
//! certificate, parses the request into the control plane's types (every malformed input is
//! a `REQUEST_MALFORMED` with the field named), runs the operation on the blocking pool and
//! renders the result or the error as JSON. The routes and their answers are described in
//! `docs/openapi.json`, which `GET /v1/openapi.json` serves and a test checks against this
//! router.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use codec::{ErrorCode, NetworkId, UserAddress, UserId};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::body::{Devices, Hashes, Lookup};
use super::context::{Guard, HttpContext, Origin, Peer};
use super::sources;
use crate::control::discovery::{DiscoveryRequest, Match};
use crate::control::keys::{Claim, KeyUpload};
use crate::control::partners::{NewPartner, NewStatus, TrafficLimits};
use crate::control::requests::RequestState;
use crate::control::users::{Attestation, Enlistment, IdentifierChange};
use crate::control::{ApiError, ApiResult, Caller, ControlPlane, parse_user_id};

/// The OpenAPI document of this API, as committed in the repository.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// How often contact events from the data plane are stored.
const CONTACT_DRAIN_INTERVAL: Duration = Duration::from_millis(20);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {
            "code": self.code.as_u16(),
            "name": self.code.name(),
            "message": self.message,
        }});
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

pub fn router(context: HttpContext) -> Router {
    let body_max = context
        .control
        .as_ref()
        .map_or(1 << 20, |c| c.settings.api_body_bytes_max as usize);
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/partners", get(partners_list).post(partner_add))
        .route("/v1/partners/{id}", get(partner_show))
        .route("/v1/partners/{id}/status", post(partner_status))
        .route("/v1/partners/{id}/limits", put(partner_limits))
        .route(
            "/v1/users/{network}/{user}",
            put(user_enlist).get(user_show).delete(user_opt_out),
        )
        .route(
            "/v1/users/{network}/{user}/identifiers/change",
            post(user_identifier_change),
        )
        .route(
            "/v1/users/{network}/{user}/contact-book",
            put(user_contact_book),
        )
        .route("/v1/users/{network}/{user}/devices", put(user_devices))
        .route("/v1/users/{network}/{user}/locations", post(user_location))
        .route("/v1/requests", get(requests_list))
        .route("/v1/requests/{id}/accept", post(request_accept))
        .route("/v1/requests/{id}/refuse", post(request_refuse))
        .route("/v1/discovery/lookup", post(discovery_lookup))
        .route("/v1/discovery/bulk", post(discovery_bulk))
        .route(
            "/v1/keys/{network}/{user}/{device}",
            put(keys_upload).get(keys_show),
        )
        .route("/v1/keys/{network}/{user}/claim", post(keys_claim))
        .route("/v1/events", get(events_list))
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such endpoint; see /v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            let mut error =
                ApiError::malformed("this method is not allowed here; see /v1/openapi.json");
            error.status = 405;
            error
        })
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(context)
}

/// The reserved lane's routes (see `mod.rs`): `/healthz` and `/metrics`, and `HTTP_BUSY` for
/// anything else.
pub fn reserved_router(context: HttpContext) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(busy)
        .with_state(context)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn busy(request: axum::extract::Request) -> ApiError {
    if let Some(guard) = request.extensions().get::<Arc<Guard>>() {
        guard.metrics.busy();
    }
    let mut error = ApiError::new(
        ErrorCode::HttpBusy,
        "the HTTP port is at its connection limit; only /healthz and /metrics are answered now",
    );
    error.retry_after_s = Some(1);
    error
}

/// A request to a route that needs no certificate, within its source's budget
/// (`http.open_requests_per_source_per_min`); else `SOURCE_RATE_LIMITED`, and the connection
/// is closed after it: a client that pipelines thousands of requests would otherwise have
/// the relay write thousands of refusals.
struct OpenBudget;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for OpenBudget {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<OpenBudget, Response> {
        let (Some(Origin(source)), Some(guard)) = (
            parts.extensions.get::<Origin>().copied(),
            parts.extensions.get::<Arc<Guard>>(),
        ) else {
            return Ok(OpenBudget);
        };
        let taken = sources::lock(&guard.sources).take_open_request(source, Instant::now());
        match taken {
            Ok(()) => Ok(OpenBudget),
            Err(wait) => {
                guard.metrics.rate_limited();
                let seconds = u64::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
                let mut error = ApiError::new(
                    ErrorCode::SourceRateLimited,
                    format!(
                        "this address asked for documents that need no certificate too often; retry in {seconds} s"
                    ),
                );
                error.retry_after_s = Some(seconds);
                let mut response = error.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Err(response)
            }
        }
    }
}

/// Stores the data plane's contact events and re-applies the location rule, forever.
pub async fn run_background(control: Arc<ControlPlane>) {
    let sweep_every = Duration::from_secs(u64::from(control.settings.location_sweep_s));
    let mut drain = tokio::time::interval(CONTACT_DRAIN_INTERVAL);
    let mut sweep = tokio::time::interval(sweep_every);
    loop {
        tokio::select! {
            _ = drain.tick() => {
                if !control.policy.contact_events().is_empty() {
                    let control = control.clone();
                    let _ = blocking(move || control.drain_contact_events(crate::io::now_ms())).await;
                }
            }
            _ = sweep.tick() => {
                let control = control.clone();
                let _ = blocking(move || {
                    let now = crate::io::now_ms();
                    control.location_sweep(now)?;
                    control.prune_events(now)
                })
                .await;
            }
        }
    }
}

async fn metrics(State(context): State<HttpContext>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        (context.render)(),
    )
        .into_response()
}

async fn openapi(_: OpenBudget) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Runs control-plane work (store commits) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            ErrorCode::Internal,
            "the request failed inside the relay",
        ))
    })
}

/// The control plane and the authenticated caller, or the error that says why not.
fn authenticate(context: &HttpContext, peer: Peer) -> ApiResult<(Arc<ControlPlane>, Caller)> {
    let control = context
        .control
        .clone()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "this relay runs no control plane"))?;
    let cert = match peer {
        Peer::Plain => {
            return Err(ApiError::new(
                ErrorCode::CertificateRequired,
                "the control API needs TLS with a client certificate",
            ));
        }
        Peer::Tls(None) => {
            return Err(ApiError::new(
                ErrorCode::CertificateRequired,
                "the control API needs a client certificate",
            ));
        }
        Peer::Tls(Some(cert)) => cert,
    };
    let caller = control.caller(&cert, crate::io::now_ms()).ok_or_else(|| {
        ApiError::new(
            ErrorCode::CertificateUnknown,
            "this client certificate is neither the operator's nor a registered network's",
        )
    })?;
    Ok((control, caller))
}

/// The control plane and the authenticated caller. An extractor from the request head, so a
/// stranger is refused before its body is read.
struct Authed(Arc<ControlPlane>, Caller);

impl axum::extract::FromRequestParts<HttpContext> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        context: &HttpContext,
    ) -> Result<Authed, ApiError> {
        let peer = parts
            .extensions
            .get::<Peer>()
            .cloned()
            .unwrap_or(Peer::Plain);
        let (control, caller) = authenticate(context, peer)?;
        Ok(Authed(control, caller))
    }
}

/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a JSON body, naming what is wrong (see `body.rs`).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    super::body::parse(bytes)
}

/// A body read up to the size limit.
struct Body(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Body, ApiError> {
        let Ok(read) =
            tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(request, state)).await
        else {
            let mut error = ApiError::malformed("the request body did not arrive in time");
            error.status = 408;
            return Err(error);
        };
        match read {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    ErrorCode::BodyTooLarge,
                    "the request body is larger than the API accepts",
                ))
            }
            Err(rejection) => Err(ApiError::malformed(rejection.body_text())),
        }
    }
}

/// Path parameters, with a malformed one (bad percent-encoding, say) answered as
/// `REQUEST_MALFORMED` in JSON like every other malformed input.
struct ApiPath<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ApiPath<T>, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::malformed(format!("path: {}", rejection.body_text())))
    }
}

fn parse_network(text: &str) -> ApiResult<NetworkId> {
    digits_only(text)
        .parse::<u32>()
        .map(NetworkId)
        .map_err(|_| ApiError::malformed(format!("network: {text:?} is not a network id")))
}

fn parse_user(network: &str, user: &str) -> ApiResult<UserAddress> {
    let network = parse_network(network)?;
    let user = parse_user_id(user)
        .ok_or_else(|| ApiError::malformed(format!("user: {user:?} is not 1 to 32 hex digits")))?;
    Ok(UserAddress {
        network,
        user: UserId(user),
    })
}

/// The decimal digits of the integer `text` spells (`42`, `42.0`, `4.2e1`: see
/// `body::integer_digits`), else a string no number parser accepts (`u32::from_str` takes a
/// leading `+`, which an API id must not have).
fn digits_only(text: &str) -> std::borrow::Cow<'_, str> {
    super::body::integer_digits(text).unwrap_or(std::borrow::Cow::Borrowed("-"))
}

fn parse_number<T: std::str::FromStr>(field: &str, text: &str) -> ApiResult<T> {
    digits_only(text)
        .parse()
        .map_err(|_| ApiError::malformed(format!("{field}: {text:?} is not a number in range")))
}

/// A page's `limit`: any integer the document allows (0 to 2^64 - 1), clamped by the
/// operation.
fn page_limit(text: &str) -> ApiResult<usize> {
    let limit: u64 = parse_number("limit", text)?;
    Ok(usize::try_from(limit).unwrap_or(usize::MAX))
}

async fn partners_list(Authed(control, caller): Authed) -> ApiResult<Response> {
    let list = blocking(move || control.partners(caller)).await?;
    Ok(Json(json!({"partners": list})).into_response())
}

async fn partner_add(Authed(control, caller): Authed, Body(bytes): Body) -> ApiResult<Response> {
    let new: NewPartner = body(&bytes)?;
    let partner = blocking(move || control.partner_add(caller, new, crate::io::now_ms())).await?;
    Ok((StatusCode::CREATED, Json(partner)).into_response())
}

async fn partner_show(
    Authed(control, caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let id: u32 = parse_number("id", &id)?;
    let partner = blocking(move || control.partner(caller, id)).await?;
    Ok(Json(partner).into_response())
}

async fn partner_status(
    Authed(control, caller): Authed,
    ApiPath(id): ApiPath<String>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let id: u32 = parse_number("id", &id)?;
    let change: NewStatus = body(&bytes)?;
    let partner =
        blocking(move || control.partner_set_status(caller, id, change, crate::io::now_ms()))
            .await?;
    Ok(Json(partner).into_response())
}

async fn partner_limits(
    Authed(control, caller): Authed,
    ApiPath(id): ApiPath<String>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let id: u32 = parse_number("id", &id)?;
    let limits: TrafficLimits = body(&bytes)?;
    let partner = blocking(move || control.partner_set_limits(caller, id, limits)).await?;
    Ok(Json(partner).into_response())
}

async fn user_enlist(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let request: Enlistment = body(&bytes)?;
    let (record, created) =
        blocking(move || control.enlist(caller, user, request, crate::io::now_ms())).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)).into_response())
}

async fn user_show(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let record = blocking(move || control.user(caller, user)).await?;
    Ok(Json(record).into_response())
}

async fn user_opt_out(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let record = blocking(move || control.opt_out(caller, user, crate::io::now_ms())).await?;
    Ok(Json(record).into_response())
}

async fn user_identifier_change(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let change: IdentifierChange = body(&bytes)?;
    let record =
        blocking(move || control.change_identifier(caller, user, change, crate::io::now_ms()))
            .await?;
    Ok(Json(record).into_response())
}

async fn user_contact_book(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let Hashes { hashes } = body(&bytes)?;
    let count = blocking(move || control.set_contact_book(caller, user, hashes)).await?;
    Ok(Json(json!({"contacts": count})).into_response())
}

async fn user_devices(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let Devices { devices } = body(&bytes)?;
    let record = blocking(move || control.set_devices(caller, user, devices)).await?;
    Ok(Json(record).into_response())
}

async fn user_location(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let attestation: Attestation = body(&bytes)?;
    let record =
        blocking(move || control.attest_location(caller, user, attestation, crate::io::now_ms()))
            .await?;
    Ok(Json(record).into_response())
}

async fn requests_list(
    Authed(control, caller): Authed,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let state = match query.get("state").map(String::as_str) {
        None => None,
        Some("pending") => Some(RequestState::Pending),
        Some("accepted") => Some(RequestState::Accepted),
        Some("refused") => Some(RequestState::Refused),
        Some(other) => {
            return Err(ApiError::malformed(format!(
                "state: {other:?} is not pending, accepted or refused"
            )));
        }
    };
    let after: u64 = match query.get("after") {
        Some(text) => parse_number("after", text)?,
        None => 0,
    };
    let limit = match query.get("limit") {
        Some(text) => page_limit(text)?,
        None => crate::control::requests::REQUESTS_PAGE_MAX,
    };
    let list = blocking(move || control.requests(caller, state, after, limit)).await?;
    Ok(Json(json!({"requests": list})).into_response())
}

async fn decide(
    control: Arc<ControlPlane>,
    caller: Caller,
    id: String,
    accept: bool,
) -> ApiResult<Response> {
    let id: u64 = parse_number("id", &id)?;
    let request =
        blocking(move || control.decide_request(caller, id, accept, crate::io::now_ms())).await?;
    Ok(Json(request).into_response())
}

async fn request_accept(
    Authed(control, caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    decide(control, caller, id, true).await
}

async fn request_refuse(
    Authed(control, caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    decide(control, caller, id, false).await
}

async fn discovery_lookup(
    Authed(control, caller): Authed,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let lookup: Lookup = body(&bytes)?;
    if devkit::hex::parse_hex32(&lookup.identifier_hash.to_ascii_lowercase()).is_none() {
        return Err(ApiError::malformed(format!(
            "identifier_hash: {:?} is not 64 hex digits (SHA-256)",
            lookup.identifier_hash
        )));
    }
    let request = DiscoveryRequest {
        requester: lookup.requester,
        identifier_hashes: vec![lookup.identifier_hash],
    };
    let matches: Vec<Match> =
        blocking(move || control.discover(caller, request, crate::io::now_ms())).await?;
    match matches.into_iter().next() {
        Some(found) => Ok(Json(found).into_response()),
        None => Err(ApiError::not_found()),
    }
}

async fn discovery_bulk(Authed(control, caller): Authed, Body(bytes): Body) -> ApiResult<Response> {
    let request: DiscoveryRequest = body(&bytes)?;
    let matches = blocking(move || control.discover(caller, request, crate::io::now_ms())).await?;
    Ok(Json(json!({"matches": matches})).into_response())
}

async fn keys_upload(
    Authed(control, caller): Authed,
    ApiPath((network, user, device)): ApiPath<(String, String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let device: u32 = parse_number("device", &device)?;
    let upload: KeyUpload = body(&bytes)?;
    let keys = blocking(move || control.upload_keys(caller, user, device, upload)).await?;
    Ok(Json(keys).into_response())
}

async fn keys_show(
    Authed(control, caller): Authed,
    ApiPath((network, user, device)): ApiPath<(String, String, String)>,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let device: u32 = parse_number("device", &device)?;
    let keys = blocking(move || control.device_keys(caller, user, device)).await?;
    Ok(Json(keys).into_response())
}

async fn keys_claim(
    Authed(control, caller): Authed,
    ApiPath((network, user)): ApiPath<(String, String)>,
    Body(bytes): Body,
) -> ApiResult<Response> {
    let user = parse_user(&network, &user)?;
    let claim: Claim = body(&bytes)?;
    let bundles =
        blocking(move || control.claim_keys(caller, user, claim, crate::io::now_ms())).await?;
    Ok(Json(json!({"bundles": bundles})).into_response())
}

async fn events_list(
    Authed(control, caller): Authed,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let after: u64 = match query.get("after") {
        Some(text) => parse_number("after", text)?,
        None => 0,
    };
    let limit = match query.get("limit") {
        Some(text) => page_limit(text)?,
        None => crate::control::events::EVENTS_PAGE_MAX,
    };
    let events = blocking(move || control.events(caller, after, limit)).await?;
    Ok(Json(json!({"events": events})).into_response())
}
