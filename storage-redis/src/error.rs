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
    /// Redis may evict keys when it is full (`maxmemory` set with a policy
    /// other than `noeviction`): queued messages would vanish silently.
    #[error(
        "Redis at {url} evicts keys when full (maxmemory {maxmemory}, maxmemory-policy \
         {policy}): queued messages would be lost; set maxmemory-policy noeviction \
         (writes then fail with an error the broker reports) or maxmemory 0"
    )]
    Evicting {
        /// The URL, password hidden.
        url: String,
        /// The `maxmemory` setting, in bytes.
        maxmemory: String,
        /// The `maxmemory-policy` setting.
        policy: String,
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
         this broker reads version {LAYOUT_VERSION} (and upgrades version 1)"
    )]
    Layout {
        /// The URL, password hidden.
        url: String,
        /// The key prefix.
        prefix: String,
        /// The version found in `{prefix}layout`.
        found: String,
    },
    /// The prefix is in layout 1 and its upgrade to the current layout
    /// failed part way; it resumes at the next open (see the `upgrade`
    /// module), and no broker of an earlier version opens it meanwhile.
    #[error(
        "the keys under prefix `{prefix}` at {url} could not be upgraded to layout version \
         {LAYOUT_VERSION}: {source}; the upgrade resumes where it stopped at the next start"
    )]
    Upgrade {
        /// The URL, password hidden.
        url: String,
        /// The key prefix.
        prefix: String,
        /// Why.
        source: StorageError,
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
/// under our keys are `Corrupt`. The Redis error is kept as the source.
pub(crate) fn storage_error(e: RedisError) -> StorageError {
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
    let error = if transient && e.is_io_error() {
        StorageError::unavailable("no connection to Redis")
    } else if transient {
        StorageError::unavailable("Redis cannot serve the command now")
    } else if e.kind() == ErrorKind::TypeError || e.code() == Some("WRONGTYPE") {
        StorageError::corrupt("unexpected value in Redis")
    } else {
        StorageError::backend("Redis refused the command")
    };
    error.with_source(e)
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use broker_core::storage::StorageErrorKind;

    use super::*;

    fn kind(e: RedisError) -> StorageErrorKind {
        storage_error(e).kind()
    }

    #[test]
    fn classification() {
        use StorageErrorKind::{Backend, Corrupt, Unavailable};
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(kind(io), Unavailable);
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(kind(timeout), Unavailable);
        let loading = RedisError::from((ErrorKind::BusyLoadingError, "loading"));
        assert_eq!(kind(loading), Unavailable);
        let oom = redis::make_extension_error("OOM".into(), Some("maxmemory".into()));
        assert_eq!(kind(oom), Unavailable);
        let wrongtype = redis::make_extension_error("WRONGTYPE".into(), None);
        assert_eq!(kind(wrongtype), Corrupt);
        let other = RedisError::from((ErrorKind::ResponseError, "syntax"));
        assert_eq!(kind(other), Backend);
    }

    #[test]
    fn the_redis_error_is_the_source() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = storage_error(io);
        assert_eq!(e.to_string(), "storage unavailable: no connection to Redis");
        let source = e.source().expect("a source");
        let inner = source
            .downcast_ref::<RedisError>()
            .expect("the Redis error");
        assert!(inner.is_io_error());
    }
}
