//! Storage URLs (`broker::storage_url::parse`, what `open` runs before it
//! opens anything). Checked: no panic, and a URL accepted names its backend
//! by its scheme.
//!
//! Input: the URL.

use broker::storage_url::{parse, Target};

pub fn check(data: &[u8]) {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    match parse(url) {
        Ok(Target::Memory) => assert!(url.starts_with("memory://")),
        Ok(Target::Sqlite(path, _)) => {
            assert!(url.starts_with("sqlite://"));
            assert!(!path.is_empty(), "{url:?}");
            assert!(!path.contains('?'), "parameters left in the path: {url:?}");
        }
        // The features are those of the crate that includes this file (the
        // broker's tests, or the fuzz crate, which builds the broker's defaults).
        #[cfg(feature = "redis")]
        Ok(Target::Redis) => assert!(url.starts_with("redis")),
        #[cfg(feature = "mongo")]
        Ok(Target::Mongo) => assert!(url.starts_with("mongodb")),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
