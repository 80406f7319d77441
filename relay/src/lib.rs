//! Article 7 Relay: the server.
//!
//! `core` holds the sans-IO state machines (session, shard, queues, the log); `tables` the
//! concurrent tables every core and the control plane share (auth, client CAs, policy); `io`
//! the thread-per-core shell that drives the cores over TLS sockets and the log's files;
//! `control` and `http` the interop control plane and its API; `config` and `pki` what
//! `relay serve` starts from; `metrics` what `/metrics` exports;
//! `log_inspect` what `relay log inspect` shows of a log.

pub mod config;
pub mod control;
pub mod core;
pub mod http;
pub mod io;
pub mod limits;
pub mod log_inspect;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod tables;
