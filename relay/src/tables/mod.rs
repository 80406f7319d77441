//! Tables every core and the control plane share: concurrent structures, not state machines.
//! The network and token table with the replay cache (`auth`), the TLS client verifier whose
//! CAs follow the partner registry (`client_ca`), and the interop rules the data plane checks
//! (`policy`), which holds each network's caps on users, devices and device-set changes
//! (`caps`). The control plane writes them; sessions read them through their context, and the
//! shards charge the caps.

pub mod auth;
pub mod caps;
pub mod client_ca;
pub mod policy;
