//! Feeds arbitrary bytes to the log's record scanner as one segment; see relay::core::wal_fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay::core::wal_fuzzing::check(data));
