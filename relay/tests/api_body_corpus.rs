//! Replays the control-API body fuzzer's seed corpus (`fuzz/corpus/api_body/seed-*`) through
//! the fuzz checks (`relay::http::body::check`), so every `cargo test` runs what the fuzzer
//! starts from; and checks that each `seed-valid-*` is read by at least one of the API's
//! body types (a seed that stopped parsing after a change of a request type is noticed).

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/api_body")
}

#[test]
fn the_seed_corpus_passes_the_fuzz_checks() {
    let mut seeds = std::fs::read_dir(corpus_dir())
        .expect("fuzz/corpus/api_body exists")
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("seed-"))
        })
        .collect::<Vec<_>>();
    seeds.sort();
    assert!(seeds.len() >= 15, "the corpus lost seeds: {seeds:?}");
    for path in &seeds {
        let bytes = std::fs::read(path).expect("a readable seed");
        relay::http::body::check(&bytes);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("seed-valid-") {
            assert!(
                relay::http::body::parse_any(&bytes) >= 1,
                "{name} is read by no request type"
            );
        }
    }
}
