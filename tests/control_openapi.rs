//! `docs/openapi.json` against the relay it describes: the document the relay serves is the
//! committed one; its routes are the router's, both ways; its error codes are the registry's,
//! with the registry's HTTP statuses; and real answers of a running relay (a scripted happy
//! path and its hostile cases) have documented statuses and validate against the documented
//! schemas, checked by the `jsonschema` crate.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use client::control::{ApiResponse, ControlClient, user_hex};
use client::{ClientTls, UserAddress};
use codec::ErrorCode;
use common::control::{ControlRelay, Enlist, Who, hash_of, user_path};
use common::{GATEKEEPER, PARTNER, now_ms, user};
use relay::control::ApiError;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The document as committed.
const DOC: &str = include_str!("../docs/openapi.json");
/// The router's source, whose `.route(..)` calls the document must match.
const API_SOURCE: &str = include_str!("../relay/src/http/api.rs");
/// The control plane's sources: every error code they name must be in the document.
const CONTROL_SOURCES: [(&str, &str); 11] = [
    ("http/api.rs", API_SOURCE),
    (
        "control/discovery.rs",
        include_str!("../relay/src/control/discovery.rs"),
    ),
    (
        "control/events.rs",
        include_str!("../relay/src/control/events.rs"),
    ),
    (
        "control/identifier.rs",
        include_str!("../relay/src/control/identifier.rs"),
    ),
    (
        "control/keys.rs",
        include_str!("../relay/src/control/keys.rs"),
    ),
    (
        "control/location.rs",
        include_str!("../relay/src/control/location.rs"),
    ),
    (
        "control/partners.rs",
        include_str!("../relay/src/control/partners.rs"),
    ),
    (
        "control/ratelimit.rs",
        include_str!("../relay/src/control/ratelimit.rs"),
    ),
    (
        "control/requests.rs",
        include_str!("../relay/src/control/requests.rs"),
    ),
    (
        "control/store.rs",
        include_str!("../relay/src/control/store.rs"),
    ),
    (
        "control/users.rs",
        include_str!("../relay/src/control/users.rs"),
    ),
];

/// HTTP methods an OpenAPI path item may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Operations that need no certificate (and are served over plain HTTP too).
const OPEN: [&str; 3] = ["/metrics", "/healthz", "/v1/openapi.json"];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is JSON")
}

/// Every (method, path template) the document has, methods upper-case.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for (method, _) in item.as_object().expect("a path item is an object") {
            assert!(
                METHODS.contains(&method.as_str()),
                "{path}: {method:?} is not an HTTP method"
            );
            out.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    out
}

fn operation<'d>(doc: &'d Value, method: &str, template: &str) -> &'d Value {
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {template} is not documented");
    op
}

fn code_named(name: &str) -> Option<ErrorCode> {
    ErrorCode::ALL.iter().copied().find(|c| c.name() == name)
}

fn api_status(code: ErrorCode) -> u16 {
    ApiError::new(code, "").status
}

// ------------------------------------------------------------------------------------------
// The router's routes, from its source text.

/// The index just past the `)` that closes a call whose arguments start at `text[0]`, with
/// string literals skipped.
fn call_end(text: &str) -> usize {
    let mut depth = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced call in the router's source: {text:.80}")
}

/// The method-router calls (`get(..)`, `.post(..)`) at the top level of `text`.
fn method_calls(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut word = String::new();
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if c == '(' {
            if depth == 0 && !word.is_empty() {
                out.push(word.clone());
            }
            depth += 1;
        } else if c == ')' {
            depth = depth.saturating_sub(1);
        } else if c == '"' {
            in_string = true;
        }
        word.clear();
    }
    out
}

/// (METHOD, path) of every `.route(..)` in `router()`.
fn router_routes() -> BTreeSet<(String, String)> {
    let start = API_SOURCE
        .find("pub fn router(")
        .expect("api.rs has `pub fn router(`");
    let body = &API_SOURCE[start..];
    let body = &body[..body.find("\n}\n").expect("router() ends")];
    for unsupported in [".nest(", ".route_service(", ".merge(", ".nest_service("] {
        assert!(
            !body.contains(unsupported),
            "router() uses {unsupported}: teach this test to read it"
        );
    }
    let mut routes = BTreeSet::new();
    let mut rest = body;
    while let Some(at) = rest.find(".route(") {
        let args = &rest[at + ".route(".len()..];
        let end = call_end(args);
        let inside = &args[..end - 1];
        let open = inside.find('"').expect("a route's path is a literal");
        let close = open + 1 + inside[open + 1..].find('"').expect("closing quote");
        let path = &inside[open + 1..close];
        let methods = method_calls(&inside[close + 1..]);
        assert!(!methods.is_empty(), "route {path} has no method");
        for method in methods {
            assert!(
                METHODS.contains(&method.as_str()),
                "route {path}: `{method}(..)` is not a method router this test knows"
            );
            routes.insert((method.to_ascii_uppercase(), path.to_string()));
        }
        rest = &args[end..];
    }
    routes
}

// ------------------------------------------------------------------------------------------
// The document's schemas, validated by the `jsonschema` crate (JSON Schema 2020-12, the
// dialect of OpenAPI 3.1). The whole document is one registered resource and a schema is
// named by its place in it, so each `$ref` resolves against the document, as for any reader.

/// What the document is registered as; nothing is fetched (`offline`).
const DOC_URI: &str = "urn:article7:openapi";

/// The JSON Schema 2020-12 keywords the document may use: those the crate checks, and
/// annotations for readers. Any other would be ignored silently (OpenAPI 3.0's `nullable`, a
/// typo); `format` too, which 2020-12 only annotates with.
const SCHEMA_KEYWORDS: &str = "$ref $defs $comment type enum const properties required \
    additionalProperties patternProperties propertyNames minProperties maxProperties \
    dependentRequired dependentSchemas unevaluatedProperties items prefixItems contains \
    minContains maxContains minItems maxItems uniqueItems unevaluatedItems allOf anyOf oneOf not \
    if then else minimum maximum exclusiveMinimum exclusiveMaximum multipleOf minLength \
    maxLength pattern description title default examples deprecated contentEncoding";

struct Schemas {
    registry: jsonschema::Registry<'static>,
}

impl Schemas {
    fn new(doc: &Value) -> Schemas {
        let registry = jsonschema::Registry::new()
            .draft(jsonschema::Draft::Draft202012)
            .add(DOC_URI, doc.clone())
            .and_then(|builder| builder.prepare())
            .expect("the document registers as a JSON Schema resource");
        Schemas { registry }
    }

    /// The validator of the schema at `pointer` (a JSON pointer into the document).
    fn validator(&self, pointer: &str) -> jsonschema::Validator {
        // Path templates' braces and media types' spaces are not allowed in a URI fragment.
        let mut fragment = String::new();
        for byte in pointer.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&byte) {
                fragment.push(char::from(byte));
            } else {
                fragment.push_str(&format!("%{byte:02X}"));
            }
        }
        let schema = json!({"$ref": format!("{DOC_URI}#{fragment}")});
        jsonschema::draft202012::options()
            .offline()
            .with_registry(&self.registry)
            .build(&schema)
            .unwrap_or_else(|e| panic!("the schema at {pointer}: {e}"))
    }

    /// Why `value` does not validate against the schema at `pointer`: one line per error.
    fn errors(&self, pointer: &str, value: &Value) -> Vec<String> {
        self.validator(pointer)
            .iter_errors(value)
            .map(|e| format!("${}: {e}", e.instance_path()))
            .collect()
    }

    fn named(&self, name: &str, value: &Value) -> Vec<String> {
        self.errors(&format!("/components/schemas/{name}"), value)
    }
}

/// The JSON pointer of an operation in the document.
fn operation_pointer(method: &str, template: &str) -> String {
    let path = template.replace('~', "~0").replace('/', "~1");
    format!("/paths/{path}/{}", method.to_ascii_lowercase())
}

/// Every schema keyword under `schema` (a schema object), with where it is.
fn schema_keywords(schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
    let Some(object) = schema.as_object() else {
        return;
    };
    for (keyword, arg) in object {
        out.push((keyword.clone(), at.to_string()));
        let at = format!("{at}/{keyword}");
        match (keyword.as_str(), arg) {
            (
                "properties" | "patternProperties" | "$defs" | "dependentSchemas",
                Value::Object(subs),
            ) => {
                for (name, sub) in subs {
                    schema_keywords(sub, &format!("{at}/{name}"), out);
                }
            }
            ("allOf" | "anyOf" | "oneOf" | "prefixItems", Value::Array(subs)) => {
                for (i, sub) in subs.iter().enumerate() {
                    schema_keywords(sub, &format!("{at}/{i}"), out);
                }
            }
            (
                "items"
                | "additionalProperties"
                | "unevaluatedProperties"
                | "unevaluatedItems"
                | "contains"
                | "propertyNames"
                | "not"
                | "if"
                | "then"
                | "else",
                sub,
            ) => schema_keywords(sub, &at, out),
            _ => {}
        }
    }
}

/// Every schema of the document: the named ones and each `schema` of a parameter, body or
/// header, with their pointers.
fn document_schemas<'v>(value: &'v Value, at: &str, out: &mut Vec<(String, &'v Value)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                if key == "schema" || at == "/components/schemas" {
                    out.push((here, v));
                } else {
                    document_schemas(v, &here, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                document_schemas(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Every `$ref` anywhere in `value`.
fn refs<'v>(value: &'v Value, out: &mut Vec<&'v str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

// ------------------------------------------------------------------------------------------
// Raw HTTP, to see the bytes (plain and over TLS).

struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
) -> RawAnswer {
    let request = format!("{method} {path} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write the request");
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut chunk).await.expect("read the answer");
        assert!(n > 0, "the connection closed inside the answer's head");
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(bytes[..head_end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = bytes[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse::<usize>().expect("a numeric content-length"));
    loop {
        if length.is_some_and(|l| body.len() >= l) {
            break;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawAnswer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = bytes
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size_text = std::str::from_utf8(&bytes[..line_end]).expect("ASCII chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        let data = line_end + 2;
        out.extend_from_slice(&bytes[data..data + size]);
        bytes = &bytes[data + size + 2..];
    }
}

async fn plain(addr: SocketAddr, method: &str, path: &str) -> RawAnswer {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP port");
    raw_exchange(stream, method, path).await
}

async fn over_tls(addr: SocketAddr, tls: &ClientTls, method: &str, path: &str) -> RawAnswer {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP port");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a server name");
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls.config()))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    raw_exchange(stream, method, path).await
}

// ------------------------------------------------------------------------------------------
// Calls checked against the document.

enum Body {
    None,
    /// JSON the document's request schema must accept.
    Conforming(Value),
    /// JSON the document's request schema must reject.
    Nonconforming(Value),
    /// Bytes as they are (not JSON, or too many).
    Raw(Bytes),
}

struct Checker<'d> {
    doc: &'d Value,
    schemas: Schemas,
    /// (METHOD, template) → the statuses seen.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl<'d> Checker<'d> {
    fn new(doc: &'d Value) -> Checker<'d> {
        Checker {
            doc,
            schemas: Schemas::new(doc),
            seen: BTreeMap::new(),
        }
    }

    /// The documented template a concrete path matches (literal segments win over
    /// parameters, as in the router).
    fn template(&self, method: &str, path: &str) -> String {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        let mut best: Option<(usize, String)> = None;
        for (m, template) in documented(self.doc) {
            if m != method {
                continue;
            }
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut literals = 0;
            let matches = parts.iter().zip(&segments).all(|(p, s)| {
                if p.starts_with('{') && p.ends_with('}') {
                    !s.is_empty()
                } else {
                    literals += 1;
                    p == s
                }
            });
            if matches && best.as_ref().is_none_or(|(l, _)| literals > *l) {
                best = Some((literals, template));
            }
        }
        best.map(|(_, t)| t)
            .unwrap_or_else(|| panic!("{method} {path} matches no documented operation"))
    }

    /// Checks an answer against the operation's documented responses.
    fn check_answer(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        body: &Value,
        retry_after_s: Option<u64>,
    ) {
        let template = self.template(method, path);
        let op = operation(self.doc, method, &template);
        let what = format!("{method} {path} answered {status} {body}");
        let Some(documented) = op["responses"].get(status.to_string()) else {
            let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
            panic!("{what}: status not documented (documented: {statuses:?})");
        };
        let content = documented["content"]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: the documented response has no content"));
        if content.contains_key("application/json") {
            let schema = format!(
                "{}/responses/{status}/content/application~1json/schema",
                operation_pointer(method, &template)
            );
            let errors = self.schemas.errors(&schema, body);
            assert!(
                errors.is_empty(),
                "{what}: the body does not validate:\n  {}",
                errors.join("\n  ")
            );
        }
        if status >= 400 {
            let number = body.pointer("/error/code").and_then(Value::as_u64);
            let code = number
                .and_then(|n| u16::try_from(n).ok())
                .and_then(ErrorCode::from_u16)
                .unwrap_or_else(|| panic!("{what}: no registered error code"));
            assert_eq!(
                body.pointer("/error/name").and_then(Value::as_str),
                Some(code.name()),
                "{what}: the name is not the code's"
            );
            let listed: Vec<&str> = op["x-error-codes"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert!(
                listed.contains(&code.name()),
                "{what}: {} is not in the operation's x-error-codes {listed:?}",
                code.name()
            );
            let description = documented["description"].as_str().unwrap_or("");
            assert!(
                description.contains(code.name()),
                "{what}: the {status} response does not describe {}",
                code.name()
            );
            if status != 405 {
                assert_eq!(api_status(code), status, "{what}: not the code's status");
            }
            if status == 429 {
                assert!(retry_after_s.is_some(), "{what}: 429 without Retry-After");
                assert!(
                    documented["headers"].get("Retry-After").is_some(),
                    "{what}: 429 documented without Retry-After"
                );
            }
        }
        self.seen
            .entry((method.to_string(), template))
            .or_default()
            .insert(status);
    }

    fn check_request(&self, method: &str, path: &str, body: &Body) {
        let template = self.template(method, path);
        let op = operation(self.doc, method, &template);
        let body_schema = "/requestBody/content/application~1json/schema";
        let schema = op
            .pointer(body_schema)
            .map(|_| format!("{}{body_schema}", operation_pointer(method, &template)));
        match (body, schema) {
            (Body::Conforming(value), Some(schema)) => {
                let errors = self.schemas.errors(&schema, value);
                assert!(
                    errors.is_empty(),
                    "{method} {path}: the request {value} does not validate against the documented body:\n  {}",
                    errors.join("\n  ")
                );
            }
            (Body::Nonconforming(value), Some(schema)) => assert!(
                !self.schemas.errors(&schema, value).is_empty(),
                "{method} {path}: the documented body accepts {value}, which the test sends as invalid"
            ),
            (Body::Conforming(_) | Body::Nonconforming(_), None) => {
                panic!("{method} {path}: a body is sent, none is documented")
            }
            (Body::None | Body::Raw(_), _) => {}
        }
    }

    async fn send(
        &mut self,
        api: &ControlClient,
        method: &str,
        path: &str,
        body: Body,
    ) -> ApiResponse {
        self.check_request(method, path, &body);
        let response = match &body {
            Body::None => api.call(method, path, None).await,
            Body::Conforming(v) | Body::Nonconforming(v) => api.call(method, path, Some(v)).await,
            Body::Raw(bytes) => api.call_raw(method, path, bytes.clone()).await,
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        self.check_answer(
            method,
            path,
            response.status,
            &response.body,
            response.retry_after_s,
        );
        response
    }

    /// Sends a conforming request (or none) and asserts the status.
    async fn expect(
        &mut self,
        api: &ControlClient,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
    ) -> Value {
        let body = body.map_or(Body::None, Body::Conforming);
        let response = self.send(api, method, path, body).await;
        assert_eq!(
            response.status, status,
            "{method} {path}: expected {status}, got {}",
            response.body
        );
        response.body
    }

    /// Sends a request and asserts the error code.
    async fn expect_error(
        &mut self,
        api: &ControlClient,
        method: &str,
        path: &str,
        body: Body,
        code: ErrorCode,
    ) -> ApiResponse {
        let response = self.send(api, method, path, body).await;
        assert_eq!(
            response.error_code(),
            Some(code.as_u16()),
            "{method} {path}: expected {}, got HTTP {} {}",
            code.name(),
            response.status,
            response.body
        );
        response
    }
}

// ------------------------------------------------------------------------------------------
// Helpers for the scripted path.

fn random_bytes<const N: usize>() -> [u8; N] {
    ring::rand::generate(&ring::rand::SystemRandom::new())
        .expect("system random number generator")
        .expose()
}

fn random_hex32() -> String {
    devkit::hex::hex(&random_bytes::<32>())
}

fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

fn signed_prekey(id: u32) -> Value {
    json!({"id": id, "key": b64(&random_bytes::<32>()), "signature": b64(&random_bytes::<64>())})
}

fn key_upload() -> Value {
    json!({
        "identity_key": b64(&random_bytes::<32>()),
        "signed_prekey": signed_prekey(1),
        "last_resort_prekey": signed_prekey(2),
        "one_time_prekeys": [{"id": 1, "key": b64(&random_bytes::<32>())}],
        "key_packages": [b64(b"a KeyPackage, as far as the relay can tell")],
        "last_resort_key_package": b64(b"the last-resort KeyPackage"),
    })
}

/// A CA of a partner's own and a client certificate it issued: (CA PEM, client TLS).
fn own_ca(relay: &ControlRelay) -> (String, ClientTls) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "openapi partner CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("a self-signed CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("a client key");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("client parameters");
    leaf.distinguished_name
        .push(DnType::CommonName, "openapi partner server");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).expect("a client certificate");
    let relay_ca = std::fs::read(relay.pki("ca.pem")).expect("the relay's CA");
    let tls = ClientTls::from_pem(
        &relay_ca,
        Some((cert.pem().as_bytes(), key.serialize_pem().as_bytes())),
    )
    .expect("client TLS");
    (ca_cert.pem(), tls)
}

fn keys_path(user: &UserAddress, device: &str) -> String {
    format!("/v1/keys/{}/{}/{device}", user.network.0, user_hex(user))
}

fn array<'v>(value: &'v Value, field: &str) -> &'v Vec<Value> {
    value[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is an array in {value}"))
}

// ------------------------------------------------------------------------------------------
// a. The served document.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_committed_one() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert_eq!(relay::http::api::OPENAPI, DOC, "the relay embeds the file");

    let relay = ControlRelay::start("openapi-served");
    let plain_answer = plain(relay.http, "GET", "/v1/openapi.json").await;
    assert_eq!(plain_answer.status, 200, "plain HTTP serves the document");
    assert_eq!(
        plain_answer.header("content-type"),
        Some("application/json")
    );
    assert!(
        plain_answer.body == DOC.as_bytes(),
        "the document served over plain HTTP ({} bytes) is not the committed one ({} bytes)",
        plain_answer.body.len(),
        DOC.len()
    );
    for stem in [None, Some("operator"), Some("partner")] {
        let tls = relay.tls(stem);
        let answer = over_tls(relay.http, &tls, "GET", "/v1/openapi.json").await;
        assert_eq!(answer.status, 200, "TLS ({stem:?}) serves the document");
        assert!(
            answer.body == DOC.as_bytes(),
            "the document served over TLS ({stem:?}) is not the committed one"
        );
    }
    for who in [Who::Operator, Who::Gatekeeper, Who::Anonymous] {
        let response = relay
            .api(who)
            .get("/v1/openapi.json")
            .await
            .expect("GET /v1/openapi.json");
        assert_eq!(response.status, 200);
        assert_eq!(response.body, doc, "{who:?}: the parsed document differs");
    }
}

#[test]
fn the_document_is_well_formed() {
    let doc = doc();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for reference in all {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {reference}"));
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {reference}");
    }
    // Every schema uses only keywords the validator knows, and compiles (which checks it
    // against the 2020-12 meta-schema).
    let schemas = Schemas::new(&doc);
    let mut found = Vec::new();
    document_schemas(&doc, "", &mut found);
    assert!(found.len() > 50, "{} schemas found", found.len());
    for (pointer, schema) in found {
        let mut keywords = Vec::new();
        schema_keywords(schema, &pointer, &mut keywords);
        for (keyword, at) in keywords {
            assert!(
                SCHEMA_KEYWORDS.split_whitespace().any(|k| k == keyword),
                "{at}: the validator does not know the keyword {keyword:?}"
            );
        }
        schemas.validator(&pointer);
    }
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("components.securitySchemes");
    assert!(!schemes.is_empty());
    for (name, scheme) in schemes {
        assert_eq!(scheme["type"], "mutualTLS", "security scheme {name}");
    }
    let mut operation_ids = BTreeSet::new();
    for (method, template) in documented(&doc) {
        let op = operation(&doc, &method, &template);
        let what = format!("{method} {template}");
        assert!(
            operation_ids.insert(
                op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: operationId"))
            ),
            "{what}: operationId used twice"
        );
        // Security: mutual TLS everywhere but the three open operations.
        let security = op["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no per-operation security"));
        if OPEN.contains(&template.as_str()) {
            assert!(security.is_empty(), "{what} needs no certificate");
        } else {
            assert!(!security.is_empty(), "{what} needs a certificate");
            for requirement in security {
                for (scheme, _) in requirement.as_object().expect("a security requirement") {
                    assert!(
                        schemes.contains_key(scheme),
                        "{what}: unknown scheme {scheme}"
                    );
                }
            }
        }
        // Path parameters: each one in the template declared, and only those.
        let in_template: BTreeSet<&str> = template
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let mut declared = BTreeSet::new();
        for parameter in op["parameters"].as_array().map_or(&[][..], Vec::as_slice) {
            let parameter = match parameter.get("$ref").and_then(Value::as_str) {
                Some(r) => r
                    .strip_prefix('#')
                    .and_then(|pointer| doc.pointer(pointer))
                    .unwrap_or_else(|| panic!("{what}: dangling $ref {r}")),
                None => parameter,
            };
            if parameter["in"] == "path" {
                assert_eq!(
                    parameter["required"], true,
                    "{what}: path parameters are required"
                );
                declared.insert(parameter["name"].as_str().expect("a parameter name"));
            }
        }
        assert_eq!(in_template, declared, "{what}: path parameters");
        // Responses: a success, and every error one with the shared Error schema.
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success response"
        );
        for (status, response) in responses {
            assert!(
                response["description"].is_string(),
                "{what} {status}: description"
            );
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response.pointer("/content/application~1json/schema/$ref"),
                    Some(&json!("#/components/schemas/Error")),
                    "{what} {status}: errors use the Error schema"
                );
            }
        }
    }
    // What the description must explain.
    let description = doc["info"]["description"]
        .as_str()
        .expect("info.description");
    for needle in [
        "SHA-256",
        "type:normal-value",
        "low entropy",
        "rate-limited",
        "a7-consent-v1",
        "opted_in_at_ms",
        "Retry-After",
        "mutual TLS",
    ] {
        assert!(
            description.contains(needle),
            "info.description lacks {needle:?}"
        );
    }
}

#[test]
fn documented_limits_are_the_code_s() {
    let doc = doc();
    let at = |schema: &str, pointer: &str| {
        doc["components"]["schemas"][schema]
            .pointer(pointer)
            .cloned()
            .unwrap_or_else(|| panic!("{schema}{pointer} is documented"))
    };
    let devices_max = json!(codec::limits::RECIPIENT_DEVICES_MAX);
    assert_eq!(at("Devices", "/properties/devices/maxItems"), devices_max);
    assert_eq!(
        at("Enlistment", "/properties/devices/maxItems"),
        devices_max
    );
    assert_eq!(
        at("Enlistment", "/properties/identifiers/maxItems"),
        json!(relay::control::users::IDENTIFIERS_PER_USER_MAX)
    );
    assert_eq!(
        at("ContactBook", "/properties/hashes/maxItems"),
        json!(relay::control::users::CONTACT_BOOK_MAX)
    );
    for field in ["one_time_prekeys", "key_packages"] {
        assert_eq!(
            at("KeyUpload", &format!("/properties/{field}/maxItems")),
            json!(relay::control::keys::UPLOAD_KEYS_MAX),
            "KeyUpload.{field}"
        );
    }
    let page = doc["components"]["parameters"]["Limit"]["description"]
        .as_str()
        .expect("the limit parameter is described");
    assert!(
        page.contains(&relay::control::events::EVENTS_PAGE_MAX.to_string()),
        "the event page size: {page}"
    );
}

// ------------------------------------------------------------------------------------------
// b. Routes, both ways.

#[test]
fn the_router_and_the_document_have_the_same_routes() {
    let routes = router_routes();
    assert!(
        routes.contains(&("GET".to_string(), "/healthz".to_string()))
            && routes.contains(&(
                "DELETE".to_string(),
                "/v1/users/{network}/{user}".to_string()
            )),
        "the route scanner reads the router: {routes:?}"
    );
    let documented = documented(&doc());
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routes).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes without documentation: {undocumented:?}; documented but not routed: {unrouted:?}"
    );
}

#[test]
fn the_route_scanner_reads_chained_methods_and_closures() {
    let text = r#", put(a).get(|| async { "x(\")" }).delete(b::c(d))"#;
    assert_eq!(method_calls(text), ["put", "get", "delete"]);
    let args = r#""/p/{x}", get(f(g)))  .route("#;
    assert_eq!(&args[..call_end(args)], r#""/p/{x}", get(f(g)))"#);
}

fn is_fallback(response: &ApiResponse) -> bool {
    response.status == 404
        && response
            .body
            .pointer("/error/message")
            .and_then(Value::as_str)
            .is_some_and(|m| m.starts_with("no such endpoint"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served() {
    let doc = doc();
    let relay = ControlRelay::start("openapi-routes");
    let operator = relay.api(Who::Operator);
    // The two answers a route the router lacks would get, to know they are told apart.
    let missing = operator.get("/v1/no-such-thing").await.expect("call");
    assert!(is_fallback(&missing), "the fallback: {}", missing.body);
    let wrong_method = operator
        .call("PATCH", "/v1/partners", None)
        .await
        .expect("call");
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.body);

    let values = [
        ("{network}", "2"),
        ("{user}", "1"),
        ("{device}", "1"),
        ("{id}", "1"),
    ];
    for (method, template) in documented(&doc) {
        let mut path = template.clone();
        for (name, value) in values {
            path = path.replace(name, value);
        }
        assert!(
            !path.contains('{'),
            "{template}: a parameter this test lacks"
        );
        let op = operation(&doc, &method, &template);
        let body = op.get("requestBody").map(|_| json!({}));
        let response = operator
            .call(&method, &path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(
            !is_fallback(&response) && response.status != 405,
            "{method} {path} (documented as {template}) is not served: HTTP {} {}",
            response.status,
            response.body
        );
        assert!(
            op["responses"].get(response.status.to_string()).is_some(),
            "{method} {path}: HTTP {} is not documented ({})",
            response.status,
            response.body
        );
    }
}

// ------------------------------------------------------------------------------------------
// c. Error codes.

#[test]
fn error_codes_are_the_registry_s() {
    let doc = doc();
    let table = doc["x-error-codes"]
        .as_object()
        .expect("a top-level x-error-codes table");
    for (name, entry) in table {
        let code = code_named(name).unwrap_or_else(|| panic!("{name} is not a registered code"));
        assert_eq!(entry["code"], json!(code.as_u16()), "{name}: number");
        assert_eq!(
            entry["http_status"],
            json!(api_status(code)),
            "{name}: HTTP status (ApiError::new)"
        );
        assert!(
            entry["meaning"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: meaning"
        );
    }
    let required = (202_u16..=203)
        .chain(305..=311)
        .chain([401, 500, 501])
        .chain(600..=613);
    for number in required {
        let code = ErrorCode::from_u16(number).expect("a registered code");
        assert!(
            table.contains_key(code.name()),
            "{} is not in the table",
            code.name()
        );
    }

    let mut used = BTreeSet::new();
    for (method, template) in documented(&doc) {
        let op = operation(&doc, &method, &template);
        let what = format!("{method} {template}");
        let listed = op["x-error-codes"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no x-error-codes"));
        let mut names = BTreeSet::new();
        let mut statuses = BTreeSet::new();
        for name in listed {
            let name = name.as_str().expect("a code name");
            let code = code_named(name)
                .unwrap_or_else(|| panic!("{what}: {name} is not in codec::ErrorCode::ALL"));
            assert!(
                table.contains_key(name),
                "{what}: {name} is not in the table"
            );
            assert!(names.insert(name), "{what}: {name} listed twice");
            used.insert(name.to_string());
            let status = api_status(code);
            statuses.insert(status);
            let response = &op["responses"][status.to_string()];
            assert!(
                response["description"]
                    .as_str()
                    .is_some_and(|d| d.contains(name)),
                "{what}: {name} (HTTP {status}) is not described under {status}"
            );
        }
        for status in op["responses"].as_object().expect("responses").keys() {
            let status: u16 = status.parse().expect("a numeric status");
            if status >= 400 {
                assert!(
                    statuses.contains(&status),
                    "{what}: HTTP {status} is documented but no listed code has it"
                );
            }
        }
        if template.starts_with("/v1/") && !OPEN.contains(&template.as_str()) {
            for name in [
                "CERTIFICATE_REQUIRED",
                "CERTIFICATE_UNKNOWN",
                "STORAGE_UNAVAILABLE",
                "INTERNAL",
            ] {
                assert!(names.contains(name), "{what}: {name} missing");
            }
        }
        if op.get("requestBody").is_some() {
            for name in ["REQUEST_MALFORMED", "BODY_TOO_LARGE"] {
                assert!(names.contains(name), "{what}: {name} missing");
            }
        }
        if template.contains('{') {
            assert!(
                names.contains("REQUEST_MALFORMED"),
                "{what}: path parameters are parsed"
            );
        }
    }
    // The table lists what the operations use, and RECIPIENT_NOT_ENLISTED, which the API
    // deliberately never answers (a claim for a user not enlisted is NOT_FOUND).
    let unused: Vec<&String> = table.keys().filter(|n| !used.contains(*n)).collect();
    assert_eq!(
        unused,
        ["RECIPIENT_NOT_ENLISTED"],
        "table entries no operation lists"
    );

    // Every code the control plane's sources name is in the table.
    for (file, source) in CONTROL_SOURCES {
        for code in ErrorCode::ALL {
            let token = format!("ErrorCode::{code:?}");
            let named = source.match_indices(&token).any(|(at, _)| {
                !source[at + token.len()..].starts_with(|c: char| c.is_alphanumeric())
            });
            if named {
                assert!(
                    table.contains_key(code.name()),
                    "{file} names {token}, which the document's table lacks"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// d. Answers validate against the document.

#[test]
fn the_validator_rejects_what_it_should() {
    let doc = doc();
    let schemas = Schemas::new(&doc);
    let error = json!({"error": {"code": 600, "name": "REQUEST_MALFORMED", "message": "body: x"}});
    assert!(schemas.named("Error", &error).is_empty());
    assert!(
        !schemas
            .named(
                "Error",
                &json!({"error": {"code": 600, "name": "REQUEST_MALFORMED"}})
            )
            .is_empty()
    );
    assert!(
        !schemas
            .named(
                "Error",
                &json!({"error": {"code": "600", "name": "X", "message": "m"}})
            )
            .is_empty()
    );
    let mut extra = error.clone();
    extra["more"] = json!(1);
    assert!(
        !schemas.named("Error", &extra).is_empty(),
        "additionalProperties"
    );
    let user = json!({"network": 2, "user": "000000000000000000000000000000ab"});
    assert!(schemas.named("UserRef", &user).is_empty());
    assert!(
        !schemas
            .named("UserRef", &json!({"network": 2, "user": "ab"}))
            .is_empty(),
        "pattern"
    );
    assert!(
        !schemas
            .named("UserRef", &json!({"network": -1, "user": user["user"]}))
            .is_empty(),
        "minimum"
    );
    assert!(
        !schemas
            .named(
                "UserRef",
                &json!({"network": 4_294_967_296_u64, "user": user["user"]})
            )
            .is_empty(),
        "maximum"
    );
    assert!(
        !schemas.named("Architecture", &json!("sideways")).is_empty(),
        "enum"
    );
    assert!(schemas.named("Accepted", &json!({"network": 3})).is_empty());
    assert!(schemas.named("Accepted", &json!({"user": user})).is_empty());
    assert!(
        !schemas
            .named("Accepted", &json!({"network": 3, "user": user}))
            .is_empty(),
        "oneOf"
    );
    let prekey = json!({"id": 1, "key": "AAAA"});
    let signed = json!({"id": 1, "key": "AAAA", "signature": "BBBB"});
    let bundle = |prekey: &Value| json!({"device": 1, "last_resort": false, "prekey": prekey});
    assert!(schemas.named("Bundle", &bundle(&prekey)).is_empty());
    assert!(schemas.named("Bundle", &bundle(&signed)).is_empty());
    assert!(
        !schemas
            .named("Bundle", &bundle(&json!({"id": 1})))
            .is_empty()
    );
    assert!(
        !schemas
            .named(
                "Attestation",
                &json!({"country": "de", "observed_at_ms": 1})
            )
            .is_empty()
    );
    assert!(
        !schemas
            .named("Devices", &json!({"devices": [1, 1]}))
            .is_empty(),
        "uniqueItems"
    );
    assert!(schemas.named("Event", &json!({"seq": 1, "kind": "user_delisted", "audience": null, "except": 2, "at_ms": 5, "data": {}})).is_empty());
    assert!(
        !schemas
            .named(
                "Event",
                &json!({"seq": 1, "kind": "user_delisted", "at_ms": 5, "data": {}})
            )
            .is_empty(),
        "required"
    );
    // A response schema inside `paths`, by the same pointer `Checker` takes: the template's
    // braces are escaped in the URI and its `$ref` resolves in the document.
    let (method, template) = documented(&doc)
        .into_iter()
        .find(|(m, t)| t.contains('{') && operation(&doc, m, t)["responses"].get("404").is_some())
        .expect("a templated path that answers 404");
    let schema = format!(
        "{}/responses/404/content/application~1json/schema",
        operation_pointer(&method, &template)
    );
    assert!(schemas.errors(&schema, &error).is_empty(), "{schema}");
    let errors = schemas.errors(
        &schema,
        &json!({"error": {"code": 600, "name": 7, "message": "m"}}),
    );
    assert!(
        errors.len() == 1 && errors[0].starts_with("$/error/name: "),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_validate_against_the_document() {
    let doc = doc();
    let mut check = Checker::new(&doc);
    let relay = ControlRelay::start("openapi-answers");
    let operator = relay.api(Who::Operator);
    let gatekeeper = relay.api(Who::Gatekeeper);
    let partner = relay.api(Who::Partner);
    let anonymous = relay.api(Who::Anonymous);

    // The open operations.
    for path in OPEN {
        check.expect(&operator, "GET", path, None, 200).await;
        let answer = plain(relay.http, "GET", path).await;
        check.check_answer("GET", path, answer.status, &answer.json(), None);
        assert_eq!(answer.status, 200, "{path} over plain HTTP");
    }
    assert_eq!(plain(relay.http, "GET", "/healthz").await.body, b"ok\n");

    // Authentication.
    let answer = plain(relay.http, "GET", "/v1/partners").await;
    check.check_answer("GET", "/v1/partners", answer.status, &answer.json(), None);
    assert_eq!(answer.json()["error"]["name"], "CERTIFICATE_REQUIRED");
    check
        .expect_error(
            &anonymous,
            "GET",
            "/v1/partners",
            Body::None,
            ErrorCode::CertificateRequired,
        )
        .await;
    check
        .expect_error(
            &anonymous,
            "GET",
            "/v1/events",
            Body::None,
            ErrorCode::CertificateRequired,
        )
        .await;
    let pki = relay::pki::DevPki::ensure(&relay.dir).expect("the dev PKI");
    let (cert, key) = pki
        .issue_client("stranger")
        .expect("issue a client certificate");
    let ca = std::fs::read(relay.pki("ca.pem")).expect("the CA");
    let stranger = ControlClient::new(
        relay.http,
        ClientTls::from_pem(&ca, Some((cert.as_bytes(), key.as_bytes()))).expect("TLS"),
        "localhost",
    )
    .expect("a client");
    check
        .expect_error(
            &stranger,
            "GET",
            "/v1/partners",
            Body::None,
            ErrorCode::CertificateUnknown,
        )
        .await;
    check
        .expect_error(
            &stranger,
            "POST",
            "/v1/discovery/bulk",
            Body::Conforming(json!({"requester": "1", "identifier_hashes": []})),
            ErrorCode::CertificateUnknown,
        )
        .await;

    // The partner registry.
    let list = check
        .expect(&operator, "GET", "/v1/partners", None, 200)
        .await;
    assert_eq!(array(&list, "partners").len(), 2);
    check
        .expect_error(
            &partner,
            "GET",
            "/v1/partners",
            Body::None,
            ErrorCode::OperatorRequired,
        )
        .await;
    let new_partner = json!({
        "id": 7,
        "name": "openapi partner",
        "cert_sha256": [random_hex32()],
        "token_public_key": null,
        "architecture": "proxy",
        "reason": "integration starts",
    });
    let added = check
        .expect(
            &operator,
            "POST",
            "/v1/partners",
            Some(new_partner.clone()),
            201,
        )
        .await;
    assert_eq!(
        (added["id"].clone(), added["status"].clone()),
        (json!(7), json!("testing"))
    );
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners",
            Body::Conforming(new_partner.clone()),
            ErrorCode::AlreadyExists,
        )
        .await;
    check
        .expect_error(
            &partner,
            "POST",
            "/v1/partners",
            Body::Conforming(new_partner),
            ErrorCode::OperatorRequired,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners",
            Body::Raw(Bytes::from_static(b"{\"id\": 8, not json")),
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners",
            Body::Nonconforming(json!({"id": 8, "name": "n", "cert_sha256": [random_hex32()], "architecture": "proxy", "reason": "r", "colour": "blue"})),
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners",
            Body::Nonconforming(json!({"id": 8, "name": "n", "cert_sha256": [], "architecture": "sideways", "reason": "r"})),
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners",
            // Blank: the document's `pattern` refuses it too.
            Body::Nonconforming(json!({"id": 8, "name": "n", "cert_sha256": [random_hex32()], "architecture": "proxy", "reason": " "})),
            ErrorCode::GroundRequired,
        )
        .await;
    check
        .expect(&operator, "GET", "/v1/partners/7", None, 200)
        .await;
    check
        .expect(&partner, "GET", "/v1/partners/2", None, 200)
        .await;
    check
        .expect_error(
            &partner,
            "GET",
            "/v1/partners/1",
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &operator,
            "GET",
            "/v1/partners/99",
            Body::None,
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &operator,
            "GET",
            "/v1/partners/seven",
            Body::None,
            ErrorCode::RequestMalformed,
        )
        .await;
    let active = check
        .expect(
            &operator,
            "POST",
            "/v1/partners/7/status",
            Some(json!({"status": "active", "reason": "integration done"})),
            200,
        )
        .await;
    assert_eq!(active["status"], "active");
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners/7/status",
            Body::Nonconforming(json!({"status": "suspended", "reason": "abuse"})),
            ErrorCode::GroundRequired,
        )
        .await;
    let suspended = check
        .expect(
            &operator,
            "POST",
            "/v1/partners/7/status",
            Some(json!({"status": "suspended", "reason": "abuse", "ground": "security"})),
            200,
        )
        .await;
    assert_eq!(array(&suspended, "history").len(), 3);
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners/99/status",
            Body::Conforming(json!({"status": "active", "reason": "r"})),
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &partner,
            "POST",
            "/v1/partners/2/status",
            Body::Conforming(json!({"status": "active", "reason": "r"})),
            ErrorCode::OperatorRequired,
        )
        .await;

    // The operator changes a network's limits and caps (issue 11: caps per network).
    let limited = check
        .expect(
            &operator,
            "PUT",
            "/v1/partners/7/limits",
            Some(json!({"users_max": 1000, "device_set_changes_per_s": 50})),
            200,
        )
        .await;
    assert_eq!(limited["limits"]["users_max"], 1000);
    check
        .expect_error(
            &operator,
            "PUT",
            "/v1/partners/7/limits",
            Body::Nonconforming(json!({"users_max": 0})),
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "PUT",
            "/v1/partners/99/limits",
            Body::Conforming(json!({})),
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &partner,
            "PUT",
            "/v1/partners/2/limits",
            Body::Conforming(json!({})),
            ErrorCode::OperatorRequired,
        )
        .await;

    // A partner registered by its CA: any certificate the CA issued speaks for it.
    let (ca_pem, ca_tls) = own_ca(&relay);
    let by_ca = check
        .expect(
            &operator,
            "POST",
            "/v1/partners",
            Some(json!({"id": 8, "name": "partner by CA", "ca_pem": ca_pem, "architecture": "proxy", "status": "active", "limits": {"messages_per_s": 100}, "reason": "registered by its CA"})),
            201,
        )
        .await;
    assert_eq!(by_ca["ca_pem"], json!(ca_pem));
    let eight = ControlClient::new(relay.http, ca_tls, "localhost").expect("a client");
    let shown = check
        .expect(&eight, "GET", "/v1/partners/8", None, 200)
        .await;
    assert_eq!(shown["limits"]["messages_per_s"], 100);
    check
        .expect_error(
            &eight,
            "GET",
            "/v1/partners/2",
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/partners",
            Body::Conforming(json!({"id": 9, "name": "n", "ca_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "architecture": "proxy", "reason": "r"})),
            ErrorCode::RequestMalformed,
        )
        .await;

    // Users: enlistment, the harness's way and by hand.
    let alice = user(PARTNER, 0xa11ce);
    let bob = user(GATEKEEPER, 0xb0b);
    let carol = user(PARTNER, 0xca201);
    let dave = user(PARTNER, 0xda7e);
    let erin = user(GATEKEEPER, 0xe217);
    let alice_path = user_path(&alice);
    let enlisted = relay
        .try_enlist(
            &alice,
            &Enlist {
                identifiers: vec![("phone", "+491701234567".into())],
                ..Enlist::default()
            },
        )
        .await;
    check.check_answer("PUT", &alice_path, enlisted.status, &enlisted.body, None);
    assert_eq!(enlisted.status, 201, "{}", enlisted.body);
    let re_enlistment = json!({
        "consent": relay.consent(&alice, "everyone", true),
        "identifiers": [{"type": "phone", "value": "+49 170 1234567"}],
        "devices": [1],
        "test": false,
        "location": {"country": "DE", "observed_at_ms": now_ms()},
    });
    let record = check
        .expect(
            &partner,
            "PUT",
            &alice_path,
            Some(re_enlistment.clone()),
            200,
        )
        .await;
    assert_eq!(record["enlisted"], true);
    check
        .expect_error(
            &operator,
            "PUT",
            &alice_path,
            Body::Conforming(re_enlistment.clone()),
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "PUT",
            &alice_path,
            Body::Conforming(re_enlistment.clone()),
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &partner,
            "PUT",
            &alice_path,
            Body::Conforming(json!({"devices": [1]})),
            ErrorCode::ConsentRequired,
        )
        .await;
    let mut forged = re_enlistment.clone();
    forged["consent"]["discoverable"] = json!(false);
    check
        .expect_error(
            &partner,
            "PUT",
            &alice_path,
            Body::Conforming(forged),
            ErrorCode::ConsentInvalid,
        )
        .await;
    let mut bad_phone = re_enlistment.clone();
    bad_phone["identifiers"] = json!([{"type": "phone", "value": "0170 1234567"}]);
    check
        .expect_error(
            &partner,
            "PUT",
            &alice_path,
            Body::Conforming(bad_phone),
            ErrorCode::IdentifierInvalid,
        )
        .await;
    let mut unknown_field = re_enlistment.clone();
    unknown_field["consent"]["note"] = json!("x");
    check
        .expect_error(
            &partner,
            "PUT",
            &alice_path,
            Body::Nonconforming(unknown_field),
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &partner,
            "PUT",
            "/v1/users/2/not-hex",
            Body::Conforming(re_enlistment),
            ErrorCode::RequestMalformed,
        )
        .await;
    relay
        .enlist(
            &bob,
            &Enlist {
                identifiers: vec![("username", "bob_gk".into())],
                ..Enlist::default()
            },
        )
        .await;
    let carol_enlisted = relay
        .try_enlist(
            &carol,
            &Enlist {
                model: "request_always",
                identifiers: vec![("phone", "+491701234567".into())],
                ..Enlist::default()
            },
        )
        .await;
    check.check_answer(
        "PUT",
        &user_path(&carol),
        carol_enlisted.status,
        &carol_enlisted.body,
        None,
    );
    assert_eq!(
        carol_enlisted.error_code(),
        Some(ErrorCode::IdentifierTaken.as_u16())
    );
    for (who, model) in [
        (&carol, "request_always"),
        (&dave, "request_always"),
        (&erin, "everyone"),
    ] {
        relay
            .enlist(
                who,
                &Enlist {
                    model,
                    ..Enlist::default()
                },
            )
            .await;
    }

    check.expect(&partner, "GET", &alice_path, None, 200).await;
    check
        .expect_error(
            &gatekeeper,
            "GET",
            &alice_path,
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &partner,
            "GET",
            &user_path(&user(PARTNER, 0xdead)),
            Body::None,
            ErrorCode::NotFound,
        )
        .await;
    let located = check
        .expect(
            &partner,
            "POST",
            &format!("{alice_path}/locations"),
            Some(json!({"country": "FR", "observed_at_ms": now_ms()})),
            200,
        )
        .await;
    assert_eq!(located["in_region"], true);
    check
        .expect_error(
            &partner,
            "POST",
            &format!("{alice_path}/locations"),
            Body::Nonconforming(json!({"country": "fr", "observed_at_ms": now_ms()})),
            ErrorCode::RequestMalformed,
        )
        .await;
    let devices = check
        .expect(
            &partner,
            "PUT",
            &format!("{alice_path}/devices"),
            Some(json!({"devices": [1, 2]})),
            200,
        )
        .await;
    assert_eq!(devices["devices"], json!([1, 2]));
    check
        .expect_error(
            &partner,
            "PUT",
            &format!("{alice_path}/devices"),
            Body::Nonconforming(json!({"devices": [3, 3]})),
            ErrorCode::RequestMalformed,
        )
        .await;
    let book = check
        .expect(
            &partner,
            "PUT",
            &format!("{alice_path}/contact-book"),
            Some(json!({"hashes": [hash_of("username", "bob_gk"), hash_of("username", "bob_gk")]})),
            200,
        )
        .await;
    assert_eq!(book, json!({"contacts": 1}));
    check
        .expect_error(
            &partner,
            "PUT",
            &format!("{}/contact-book", user_path(&user(PARTNER, 0xdead))),
            Body::Conforming(json!({"hashes": []})),
            ErrorCode::NotFound,
        )
        .await;
    let changed = check
        .expect(
            &partner,
            "POST",
            &format!("{alice_path}/identifiers/change"),
            Some(json!({"old": {"type": "phone", "value": "+491701234567"}, "new": {"type": "phone", "value": "+491709999999"}})),
            200,
        )
        .await;
    assert_eq!(changed["identifiers"][0]["value"], "+491709999999");
    check
        .expect_error(
            &partner,
            "POST",
            &format!("{alice_path}/identifiers/change"),
            Body::Conforming(json!({"old": {"type": "phone", "value": "+491701234567"}, "new": {"type": "username", "value": "x"}})),
            ErrorCode::IdentifierInvalid,
        )
        .await;
    // Identifiers are per network: another user of network 2 holds `frank_p2`.
    relay
        .enlist(
            &user(PARTNER, 0xf4a4c),
            &Enlist {
                identifiers: vec![("username", "frank_p2".into())],
                ..Enlist::default()
            },
        )
        .await;
    check
        .expect_error(
            &partner,
            "POST",
            &format!("{alice_path}/identifiers/change"),
            Body::Conforming(json!({"old": {"type": "phone", "value": "+491709999999"}, "new": {"type": "username", "value": "frank_p2"}})),
            ErrorCode::IdentifierTaken,
        )
        .await;

    // Discovery, on behalf of bob (gatekeeper).
    let new_hash = hash_of("phone", "+491709999999");
    let old_hash = hash_of("phone", "+491701234567");
    let bob_hex = user_hex(&bob);
    let found = check
        .expect(
            &gatekeeper,
            "POST",
            "/v1/discovery/lookup",
            Some(json!({"requester": bob_hex, "identifier_hash": new_hash})),
            200,
        )
        .await;
    assert_eq!(
        (found["contact"].clone(), found["devices"].clone()),
        (json!("direct"), json!([1, 2]))
    );
    let moved = check
        .expect(
            &gatekeeper,
            "POST",
            "/v1/discovery/lookup",
            Some(json!({"requester": bob_hex, "identifier_hash": old_hash})),
            200,
        )
        .await;
    assert_eq!(
        moved["moved_to"]["value"], "+491709999999",
        "a contact learns the new identifier"
    );
    check
        .expect_error(
            &gatekeeper,
            "POST",
            "/v1/discovery/lookup",
            Body::Conforming(json!({"requester": bob_hex, "identifier_hash": random_hex32()})),
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "POST",
            "/v1/discovery/lookup",
            Body::Conforming(json!({"requester": "abc", "identifier_hash": new_hash})),
            ErrorCode::SenderNotEnlisted,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            "/v1/discovery/lookup",
            Body::Conforming(json!({"requester": bob_hex, "identifier_hash": new_hash})),
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "POST",
            "/v1/discovery/lookup",
            Body::Nonconforming(json!({"requester": bob_hex, "identifier_hash": "00"})),
            ErrorCode::RequestMalformed,
        )
        .await;
    relay
        .enlist(
            &carol,
            &Enlist {
                model: "request_always",
                identifiers: vec![("email", "carol@example.org".into())],
                ..Enlist::default()
            },
        )
        .await;
    let matches = check
        .expect(
            &gatekeeper,
            "POST",
            "/v1/discovery/bulk",
            Some(json!({"requester": bob_hex, "identifier_hashes": [new_hash, old_hash, random_hex32(), hash_of("email", "carol@example.org")]})),
            200,
        )
        .await;
    let contacts: Vec<&Value> = array(&matches, "matches")
        .iter()
        .map(|m| &m["contact"])
        .collect();
    assert_eq!(
        contacts,
        [&json!("direct"), &json!("direct"), &json!("request")]
    );
    let too_many: Vec<String> = (0..1001).map(|_| random_hex32()).collect();
    check
        .expect_error(
            &gatekeeper,
            "POST",
            "/v1/discovery/bulk",
            Body::Nonconforming(json!({"requester": bob_hex, "identifier_hashes": too_many})),
            ErrorCode::DiscoveryBatchTooLarge,
        )
        .await;
    let erin_hex = user_hex(&erin);
    let mut limited = None;
    for _ in 0..6 {
        let batch: Vec<String> = (0..1000).map(|_| random_hex32()).collect();
        let response = check
            .send(
                &gatekeeper,
                "POST",
                "/v1/discovery/bulk",
                Body::Conforming(json!({"requester": erin_hex, "identifier_hashes": batch})),
            )
            .await;
        if response.status != 200 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("the per-user daily discovery limit (5000) is reached");
    assert_eq!(limited.error_code(), Some(ErrorCode::RateLimited.as_u16()));
    assert!(limited.retry_after_s.is_some_and(|s| s > 0));

    // Keys.
    let alice_keys = keys_path(&alice, "1");
    let stored = check
        .expect(&partner, "PUT", &alice_keys, Some(key_upload()), 200)
        .await;
    assert_eq!(
        (
            stored["one_time_prekeys"].clone(),
            stored["key_packages"].clone()
        ),
        (json!(1), json!(1))
    );
    check.expect(&partner, "GET", &alice_keys, None, 200).await;
    check
        .expect_error(
            &partner,
            "GET",
            &keys_path(&alice, "9"),
            Body::None,
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &partner,
            "PUT",
            &keys_path(&alice, "9"),
            Body::Conforming(key_upload()),
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &partner,
            "PUT",
            &alice_keys,
            Body::Conforming(json!({"identity_key": "not base64!"})),
            ErrorCode::KeysInvalid,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "PUT",
            &alice_keys,
            Body::Conforming(json!({})),
            ErrorCode::ForeignResource,
        )
        .await;
    check
        .expect_error(
            &partner,
            "GET",
            &keys_path(&alice, "-1"),
            Body::None,
            ErrorCode::RequestMalformed,
        )
        .await;
    let claim = |protocol: &str| json!({"requester": bob_hex, "protocol": protocol});
    let alice_claim = keys_path(&alice, "claim");
    let signal = check
        .expect(
            &gatekeeper,
            "POST",
            &alice_claim,
            Some(claim("signal")),
            200,
        )
        .await;
    let bundles = array(&signal, "bundles");
    assert_eq!(bundles.len(), 1, "only device 1 has keys: {signal}");
    assert_eq!(bundles[0]["last_resort"], false);
    let last_resort = check
        .expect(
            &gatekeeper,
            "POST",
            &alice_claim,
            Some(claim("signal")),
            200,
        )
        .await;
    assert_eq!(last_resort["bundles"][0]["last_resort"], true);
    assert!(last_resort["bundles"][0]["prekey"]["signature"].is_string());
    let mls = check
        .expect(&gatekeeper, "POST", &alice_claim, Some(claim("mls")), 200)
        .await;
    assert!(mls["bundles"][0]["key_package"].is_string());
    check
        .expect_error(
            &gatekeeper,
            "POST",
            &alice_claim,
            Body::Nonconforming(json!({"requester": bob_hex, "protocol": "pgp"})),
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "POST",
            &keys_path(&user(PARTNER, 0xdead), "claim"),
            Body::Conforming(claim("signal")),
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "POST",
            &alice_claim,
            Body::Conforming(json!({"requester": "abc", "protocol": "signal"})),
            ErrorCode::SenderNotEnlisted,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            &alice_claim,
            Body::Conforming(claim("signal")),
            ErrorCode::ForeignResource,
        )
        .await;

    // Message requests: a claim is a first contact.
    check
        .expect_error(
            &gatekeeper,
            "POST",
            &keys_path(&carol, "claim"),
            Body::Conforming(claim("signal")),
            ErrorCode::MessageRequestPending,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "POST",
            &keys_path(&dave, "claim"),
            Body::Conforming(claim("signal")),
            ErrorCode::MessageRequestPending,
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let pending = loop {
        let list = check
            .expect(&partner, "GET", "/v1/requests?state=pending", None, 200)
            .await;
        if array(&list, "requests").len() == 2 {
            break list;
        }
        assert!(Instant::now() < deadline, "two requests recorded: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let id_of = |who: &UserAddress| {
        array(&pending, "requests")
            .iter()
            .find(|r| r["recipient"]["user"] == json!(user_hex(who)))
            .and_then(|r| r["id"].as_u64())
            .unwrap_or_else(|| panic!("a request for {who}: {pending}"))
    };
    let (carol_request, dave_request) = (id_of(&carol), id_of(&dave));
    let accepted = check
        .expect(
            &partner,
            "POST",
            &format!("/v1/requests/{carol_request}/accept"),
            None,
            200,
        )
        .await;
    assert_eq!(accepted["state"], "accepted");
    check
        .expect_error(
            &partner,
            "POST",
            &format!("/v1/requests/{carol_request}/refuse"),
            Body::None,
            ErrorCode::RequestDecided,
        )
        .await;
    let refused = check
        .expect(
            &partner,
            "POST",
            &format!("/v1/requests/{dave_request}/refuse"),
            None,
            200,
        )
        .await;
    assert_eq!(refused["state"], "refused");
    check
        .expect_error(
            &gatekeeper,
            "POST",
            &format!("/v1/requests/{dave_request}/accept"),
            Body::None,
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &partner,
            "POST",
            "/v1/requests/x/accept",
            Body::None,
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "POST",
            &format!("/v1/requests/{dave_request}/accept"),
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;
    let all = check
        .expect(&partner, "GET", "/v1/requests", None, 200)
        .await;
    assert_eq!(array(&all, "requests").len(), 2);
    check
        .expect(&gatekeeper, "GET", "/v1/requests?state=accepted", None, 200)
        .await;
    check
        .expect_error(
            &partner,
            "GET",
            "/v1/requests?state=maybe",
            Body::None,
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "GET",
            "/v1/requests",
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;
    let now_direct = check
        .expect(
            &gatekeeper,
            "POST",
            &keys_path(&carol, "claim"),
            Some(claim("signal")),
            200,
        )
        .await;
    assert_eq!(
        array(&now_direct, "bundles").len(),
        0,
        "carol uploaded no keys"
    );

    // Opting out.
    let out = check
        .expect(&partner, "DELETE", &alice_path, None, 200)
        .await;
    assert_eq!(out["enlisted"], false);
    check
        .expect_error(
            &partner,
            "DELETE",
            &alice_path,
            Body::None,
            ErrorCode::NotFound,
        )
        .await;
    check
        .expect_error(
            &gatekeeper,
            "DELETE",
            &alice_path,
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;
    let after = check.expect(&partner, "GET", &alice_path, None, 200).await;
    assert_eq!(
        (after["enlisted"].clone(), after["identifiers"].clone()),
        (json!(false), json!([]))
    );

    // The event feeds.
    let partner_events = check.expect(&partner, "GET", "/v1/events", None, 200).await;
    let kinds = |events: &Value| -> BTreeSet<String> {
        array(events, "events")
            .iter()
            .filter_map(|e| e["kind"].as_str().map(str::to_string))
            .collect()
    };
    let partner_kinds = kinds(&partner_events);
    for kind in ["request_created", "keys_low"] {
        assert!(
            partner_kinds.contains(kind),
            "{kind} for the partner: {partner_events}"
        );
    }
    let gatekeeper_events = check
        .expect(
            &gatekeeper,
            "GET",
            "/v1/events?after=0&limit=100",
            None,
            200,
        )
        .await;
    let gatekeeper_kinds = kinds(&gatekeeper_events);
    for kind in ["request_accepted", "user_delisted"] {
        assert!(
            gatekeeper_kinds.contains(kind),
            "{kind} for the gatekeeper: {gatekeeper_events}"
        );
    }
    let last = array(&gatekeeper_events, "events")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .expect("events have a seq");
    let rest = check
        .expect(
            &gatekeeper,
            "GET",
            &format!("/v1/events?after={last}"),
            None,
            200,
        )
        .await;
    assert!(
        array(&rest, "events").is_empty(),
        "nothing after the last: {rest}"
    );
    check
        .expect_error(
            &partner,
            "GET",
            "/v1/events?after=soon",
            Body::None,
            ErrorCode::RequestMalformed,
        )
        .await;
    check
        .expect_error(
            &operator,
            "GET",
            "/v1/events",
            Body::None,
            ErrorCode::ForeignResource,
        )
        .await;

    // The method fallback: a documented path, an undocumented method.
    let wrong = operator
        .call("PUT", "/v1/partners", Some(&json!({})))
        .await
        .expect("call");
    assert_eq!(wrong.status, 405, "{}", wrong.body);
    assert!(
        Schemas::new(&doc).named("Error", &wrong.body).is_empty(),
        "{}",
        wrong.body
    );

    // Every documented operation was exercised, each with a success.
    for (method, template) in documented(&doc) {
        let statuses = check
            .seen
            .get(&(method.clone(), template.clone()))
            .unwrap_or_else(|| panic!("{method} {template} was not exercised"));
        assert!(
            statuses.iter().any(|s| (200..300).contains(s)),
            "{method} {template}: no success seen ({statuses:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_as_documented() {
    let doc = doc();
    let mut check = Checker::new(&doc);
    let relay = ControlRelay::start_configured("openapi-body", |config| {
        config.interop.api_body_bytes_max = 1024;
    });
    let big = Bytes::from(json!({"hashes": vec![random_hex32(); 64]}).to_string());
    for (who, path) in [
        (Who::Partner, "/v1/users/2/1/contact-book"),
        (Who::Operator, "/v1/partners"),
        (Who::Gatekeeper, "/v1/discovery/bulk"),
    ] {
        let method = if path.ends_with("contact-book") {
            "PUT"
        } else {
            "POST"
        };
        check
            .expect_error(
                &relay.api(who),
                method,
                path,
                Body::Raw(big.clone()),
                ErrorCode::BodyTooLarge,
            )
            .await;
    }
    // A stranger is refused before its body is read.
    check
        .expect_error(
            &relay.api(Who::Anonymous),
            "POST",
            "/v1/discovery/bulk",
            Body::Raw(big.clone()),
            ErrorCode::CertificateRequired,
        )
        .await;
}

/// What schemathesis found (issue 11): a `limit` past every integer type and integers
/// written as floats. The document bounds every integer parameter, a number past the bound
/// is `REQUEST_MALFORMED`, and `65596.0` in a body is the integer 65596 (JSON Schema says
/// so, and so the document).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_integers_are_read_as_the_document_says() {
    let doc = doc();
    for (template, name) in [("/v1/requests", "limit"), ("/v1/events", "limit")] {
        let op = operation(&doc, "GET", template);
        let parameter = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| match p["$ref"].as_str() {
                Some(reference) => {
                    &doc["components"]["parameters"][reference.rsplit('/').next().unwrap()]
                }
                None => p,
            })
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("GET {template}: no {name}"));
        assert_eq!(
            parameter["schema"]["maximum"],
            json!(u64::MAX),
            "GET {template}: {name}'s maximum"
        );
    }
    let relay = ControlRelay::start("openapi-integers");
    let api = relay.api(Who::Gatekeeper);
    let answer = api
        .get("/v1/requests?limit=18446744073709551615")
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = api
        .get("/v1/requests?limit=45672664837548220416")
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.error_code()),
        (400, Some(600)),
        "{answer:?}"
    );
    let answer = api
        .get("/v1/events?limit=45672664837548220416")
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.error_code()),
        (400, Some(600)),
        "{answer:?}"
    );
    // So in a path: the partner 2 is `2.0` and `2e0` too.
    let operator = relay.api(Who::Operator);
    for path in ["/v1/partners/2.0", "/v1/partners/2e0"] {
        let answer = operator.get(path).await.unwrap();
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
    }
    let answer = operator.get("/v1/partners/2.5").await.unwrap();
    assert_eq!(
        (answer.status, answer.error_code()),
        (400, Some(600)),
        "{answer:?}"
    );
    // A device list with integers written as floats reaches the control plane (this user is
    // not enlisted: NOT_FOUND, not REQUEST_MALFORMED).
    let path = format!("{}/devices", user_path(&user(GATEKEEPER, 0x7007)));
    let answer = api
        .call_raw(
            "PUT",
            &path,
            Bytes::from_static(br#"{"devices": [65596.0, 2]}"#),
        )
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.error_code()),
        (404, Some(603)),
        "{answer:?}"
    );
    let answer = api
        .call_raw("PUT", &path, Bytes::from_static(br#"{"devices": [1.5]}"#))
        .await
        .unwrap();
    assert_eq!(
        (answer.status, answer.error_code()),
        (400, Some(600)),
        "{answer:?}"
    );
}
