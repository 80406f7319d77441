//! The parts of the seeded world of `world_sim.rs`: the simulated disk, the relay driven as its
//! IO shell drives it, the clients, and the ledger that checks every step.

pub mod clients;
pub mod disk;
pub mod ledger;
pub mod relay;
