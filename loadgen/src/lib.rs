//! `loadgen`: drives an Article 7 Relay (or an MQTT broker, for comparison) with a realistic
//! population and traffic mix, and reports what an operator, a partner or an auditor needs to
//! check SLA parity between gatekeeper users and partner users.
//!
//! # Layout
//!
//! Sans-IO parts (plain data and functions, unit-tested): [`population`] (networks, users,
//! devices, who sends to whom), [`payload`] (what each message carries so the receiver can
//! check it; message ids), [`ledger`] (exact loss, duplicate and order accounting),
//! [`stats`] (HdrHistogram latencies, timeline, errors), [`parity`] (the verdict),
//! [`maxrate`] (the `--max` search), [`report`] and [`html`] (JSON and HTML output),
//! [`tune`] (tuning profiles), [`mqtt`]'s packet codec.
//!
//! IO shells: [`phase`] (the open-loop scheduler and drain), [`target`] (what phases run
//! against), [`sessions`] (what both targets share: session tasks, offline devices' comeback),
//! [`relay_target`] (client-SDK sessions), [`enlist`] (the population's enlistment through
//! the relay's control API), [`mqtt`] (the broker driver), [`scale`] (idle connections),
//! [`spawn`] (a relay process), [`hostile`] (a hostile crowd against the data port), [`pki`] (identities and relay config), [`scenario`] (the
//! phases of a run), [`run`] (the whole run, from the checked command line ([`cli`]) to the
//! reports).

pub mod cli;
pub mod enlist;
pub mod hostile;
pub mod html;
pub mod ledger;
pub mod machine;
pub mod maxrate;
pub mod mqtt;
pub mod parity;
pub mod payload;
pub mod phase;
pub mod pki;
pub mod population;
pub mod relay_target;
pub mod report;
pub mod rng;
pub mod run;
pub mod scale;
pub mod scenario;
pub mod sessions;
pub mod spawn;
pub mod stats;
pub mod target;
pub mod tune;
