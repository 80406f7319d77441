//! Feeds arbitrary bytes to every control-API request-body reader; see relay::http::body::check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay::http::body::check(data));
