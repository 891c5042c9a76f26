//! Inputs the `settings` and `storage_url` fuzz targets (`fuzz/`, run by
//! `scripts/fuzz`) found, replayed through the targets' own checks on every
//! `cargo test`, plus the committed seeds.

#[path = "../../fuzz/checks/settings.rs"]
mod settings;
#[path = "../../fuzz/checks/storage_url.rs"]
mod storage_url;

/// Every file of `fuzz/seeds/TARGET`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| std::fs::read(f.expect("entry").path()).expect("read seed"))
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn seeds_pass_their_checks() {
    for s in seeds("settings") {
        settings::check(&s);
    }
    for s in seeds("storage_url") {
        storage_url::check(&s);
    }
}

/// storage_url, crash-b3a8c6fa: `max_size_mb` times 2^20 overflowed u64 (a
/// panic in debug builds, a wrapped-around limit in release ones). Fixed in
/// `broker/src/storage_url.rs`: a checked multiplication and an error.
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_max_size_mb_overflow_is_an_error() {
    storage_url::check(b"sqlite://s?synchronous=full&max_size_mb=0018446744073709551615");
    let e = broker::storage_url::parse("sqlite://s?max_size_mb=17592186044416")
        .expect_err("2^44 MiB is 2^64 bytes");
    assert!(e.to_string().contains("max_size_mb"), "{e}");
    let ok = broker::storage_url::parse("sqlite://s?max_size_mb=17592186044415");
    assert!(ok.is_ok(), "{ok:?}");
}
