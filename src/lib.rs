//! Test and bench host crate.
