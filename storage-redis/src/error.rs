//! Errors: why a store could not be opened, and how Redis errors map onto
//! the broker's [`StorageError`].

use std::time::Duration;

use broker_core::storage::StorageError;
use redis::{ErrorKind, RedisError};

use crate::lease::Holder;
use crate::LAYOUT_VERSION;

/// Why [`RedisStore::open`](crate::RedisStore::open) failed. Every variant
/// names the URL, with its password hidden.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL or one of its parameters is not valid.
    #[error("invalid Redis storage URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password hidden.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis could not be reached, or refused the connection (refused,
    /// unknown host, authentication, unknown database).
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// Why.
        source: RedisError,
    },
    /// No connection, or no answer, within the configured timeout.
    #[error("no answer from Redis at {url} within {} ms", timeout.as_millis())]
    Timeout {
        /// The URL, password hidden.
        url: String,
        /// The time waited.
        timeout: Duration,
    },
    /// Connected, but a command the store runs at open failed.
    #[error("Redis at {url} refused a command at open: {source}")]
    Setup {
        /// The URL, password hidden.
        url: String,
        /// Why.
        source: RedisError,
    },
    /// The keys under the prefix were written in a layout this version
    /// does not read.
    #[error(
        "the keys under prefix `{prefix}` at {url} are in layout version {found}, \
         this broker reads version {LAYOUT_VERSION}"
    )]
    Layout {
        /// The URL, password hidden.
        url: String,
        /// The key prefix.
        prefix: String,
        /// The version found in `{prefix}layout`.
        found: String,
    },
    /// Another broker holds the prefix's lease (see the `lease` module):
    /// it renewed it while this one waited, or it never expires.
    #[error(
        "the Redis prefix `{prefix}` at {url} is in use by another broker ({holder}{}); \
         stop that broker first or use another prefix (the lease of a broker that died \
         expires within its TTL, and is waited for at start)",
        match expires_in { Some(d) => format!(", lease expires in {} ms unless renewed", d.as_millis()), None => String::from(", lease without expiry") }
    )]
    Locked {
        /// The URL, password hidden.
        url: String,
        /// The key prefix.
        prefix: String,
        /// Who holds it.
        holder: Box<Holder>,
        /// How long its lease had left at the last look.
        expires_in: Option<Duration>,
    },
}

/// The error code a write script fails with when this process no longer
/// owns the prefix.
pub(crate) const LEASE_LOST: &str = "LEASELOST";

/// Server error codes that mean "not now" rather than "never".
const TRANSIENT_CODES: &[&str] = &[
    "OOM",
    "MISCONF",
    "BUSY",
    "NOAUTH",
    "NOPERM",
    "WRONGPASS",
    "NOREPLICAS",
];

/// A Redis error as the broker sees it: lost connections, timeouts and
/// conditions that may pass (loading, out of memory, persistence failing,
/// read-only replica) are `Unavailable`; values of the wrong type or shape
/// under our keys are `Corrupt`.
pub(crate) fn storage_error(e: &RedisError) -> StorageError {
    let transient = e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::BusyLoadingError
                | ErrorKind::TryAgain
                | ErrorKind::ClusterDown
                | ErrorKind::MasterDown
                | ErrorKind::ReadOnly
                | ErrorKind::AuthenticationFailed
        )
        || e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c));
    if transient {
        return StorageError::Unavailable(format!("Redis: {e}"));
    }
    if e.kind() == ErrorKind::TypeError || e.code() == Some("WRONGTYPE") {
        return StorageError::Corrupt(format!("unexpected value in Redis: {e}"));
    }
    StorageError::Backend(format!("Redis: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(storage_error(&io), StorageError::Unavailable(_)));
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(
            storage_error(&timeout),
            StorageError::Unavailable(_)
        ));
        let loading = RedisError::from((ErrorKind::BusyLoadingError, "loading"));
        assert!(matches!(
            storage_error(&loading),
            StorageError::Unavailable(_)
        ));
        let oom = redis::make_extension_error("OOM".into(), Some("maxmemory".into()));
        assert!(matches!(storage_error(&oom), StorageError::Unavailable(_)));
        let wrongtype = redis::make_extension_error("WRONGTYPE".into(), None);
        assert!(matches!(
            storage_error(&wrongtype),
            StorageError::Corrupt(_)
        ));
        let other = RedisError::from((ErrorKind::ResponseError, "syntax"));
        assert!(matches!(storage_error(&other), StorageError::Backend(_)));
    }
}
