//! Storage URLs: which backend, where. Each backend is a Cargo feature of this crate.

use std::sync::Arc;

use anyhow::bail;
use broker_core::storage::Storage;
use storage_memory::MemoryStore;

/// Backends known by scheme, with the Cargo feature that provides each.
const SCHEMES: &[(&str, &str)] = &[
    ("memory", "(always built in)"),
    ("sqlite", "sqlite"),
    ("redis", "redis"),
    ("mongodb", "mongo"),
];

/// Open the storage named by `url`.
pub async fn open(url: &str) -> anyhow::Result<Storage> {
    let Some((scheme, _rest)) = url.split_once("://") else {
        bail!("storage URL `{url}` has no scheme (expected e.g. `memory://`)");
    };
    match scheme {
        "memory" => Ok(Storage::from_backend(Arc::new(MemoryStore::new()))),
        other => match SCHEMES.iter().find(|(s, _)| *s == other) {
            Some((_, feature)) => bail!(
                "storage scheme `{other}://` needs the `{feature}` Cargo feature of the `broker` crate, \
                 which this binary was built without (cargo build -p broker --features {feature})"
            ),
            None => {
                let known: Vec<String> = SCHEMES.iter().map(|(s, _)| format!("{s}://")).collect();
                bail!(
                    "unknown storage URL scheme `{other}://` (known: {})",
                    known.join(", ")
                )
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_name_the_feature_or_the_known_schemes() {
        let e = open("sqlite://x.db")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("`sqlite` Cargo feature"), "{e}");
        let e = open("foo://x")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown storage URL scheme `foo://`"), "{e}");
        assert!(e.contains("memory://"), "{e}");
        let e = open("nothing")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no scheme"), "{e}");
        assert!(open("memory://").await.is_ok());
    }
}
