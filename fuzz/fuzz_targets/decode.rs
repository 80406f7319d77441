//! Feeds arbitrary bytes to both decoders and re-encodes what decodes; see codec::fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| codec::fuzzing::check(data));
