//! Article 7 Relay: the server.
//!
//! `core` holds the sans-IO state machines (session, shard, queues, auth, the log); `io` the
//! thread-per-core shell that drives them over TLS sockets and the log's files; `config` and
//! `pki` what `relay serve` starts from; `metrics` and `http` what `/metrics` exports.

pub mod config;
pub mod control;
pub mod core;
pub mod http;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod tables;
