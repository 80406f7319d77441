//! Tables every core and the control plane share: concurrent structures, not state machines.
//! The network and token table with the replay cache (`auth`), the TLS client verifier whose
//! CAs follow the partner registry (`client_ca`), and the interop rules the data plane checks
//! (`policy`). The control plane writes them; sessions read them through their context.

pub mod auth;
pub mod client_ca;
pub mod policy;
