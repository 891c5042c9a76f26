//! Settings of a [`RedisStore`](crate::RedisStore) and the storage URL they
//! can be given in.

use std::time::Duration;

use crate::error::OpenError;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "mqtt:";

/// Settings of a [`RedisStore`](crate::RedisStore).
///
/// The storage URL's query parameters override them (see
/// [`RedisOptions::from_url`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Put before every key the store uses (default `mqtt:`), so that
    /// several brokers, or a broker and other applications, can share one
    /// Redis database. Never empty.
    pub prefix: String,
    /// Longest wait for one connection attempt, at open and on every
    /// reconnection (default 5 s).
    pub connection_timeout: Duration,
    /// Longest any storage operation may take, waiting for a reconnection
    /// included (default 5 s). Past it the operation fails with
    /// [`StorageError::Unavailable`](broker_core::storage::StorageError::Unavailable).
    pub response_timeout: Duration,
    /// TTL of the lease that keeps a second broker off the prefix (default
    /// 10 s, at least 100 ms), renewed every third of it. A broker killed
    /// without closing blocks the prefix that long: the next start waits
    /// for it to expire. See the `lease` module.
    pub lease_ttl: Duration,
}

/// Shortest lease TTL accepted: renewals every third of it must fit in
/// the time a round trip takes.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(100);

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: DEFAULT_PREFIX.to_owned(),
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// Query parameters this crate reads; the others listed in
/// [`PASSED_THROUGH`] go to the Redis client.
const KNOWN: &str = "prefix, timeout_ms, connect_timeout_ms, lease_ms, protocol";

/// Query parameters the Redis client itself understands.
const PASSED_THROUGH: &[&str] = &["protocol"];

impl RedisOptions {
    /// The options a storage URL gives: the defaults, overridden by its
    /// query parameters.
    ///
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?PARAMS]` (also
    /// `rediss://`, `redis+unix://`, as the `redis` crate reads them), with
    /// these parameters:
    /// - `prefix=STR`: the key prefix (percent-encoded if need be), default `mqtt:`;
    /// - `timeout_ms=N`: [`response_timeout`](Self::response_timeout);
    /// - `connect_timeout_ms=N`: [`connection_timeout`](Self::connection_timeout);
    /// - `lease_ms=N`: [`lease_ttl`](Self::lease_ttl);
    /// - `protocol=resp2|resp3`: passed to the Redis client.
    ///
    /// ```
    /// use std::time::Duration;
    /// use storage_redis::RedisOptions;
    ///
    /// let o = RedisOptions::from_url("redis://127.0.0.1:6379/2?prefix=site1:&timeout_ms=2000")?;
    /// assert_eq!(o.prefix, "site1:");
    /// assert_eq!(o.response_timeout, Duration::from_secs(2));
    /// assert!(RedisOptions::from_url("redis://h/?cache=big").is_err());
    /// # Ok::<(), storage_redis::OpenError>(())
    /// ```
    pub fn from_url(url: &str) -> Result<RedisOptions, OpenError> {
        split_url(url, RedisOptions::default()).map(|(_, options)| options)
    }
}

/// Apply the query parameters of `url` over `options`; also give the URL
/// the Redis client is to connect to (this crate's parameters removed).
pub(crate) fn split_url(
    url: &str,
    mut options: RedisOptions,
) -> Result<(String, RedisOptions), OpenError> {
    let invalid = |reason: String| OpenError::InvalidUrl {
        url: redact(url),
        reason,
    };
    let (base, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = base.split_once('?').unwrap_or((base, ""));
    let mut passed = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("parameter `{pair}` has no value")))?;
        let decoded = percent_decode(value)
            .ok_or_else(|| invalid(format!("parameter `{key}`: bad percent-encoding")))?;
        let millis = |what: &str| -> Result<Duration, OpenError> {
            match decoded.parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
                _ => Err(invalid(format!(
                    "{what} `{decoded}` is not a positive number of milliseconds"
                ))),
            }
        };
        match key {
            "prefix" => options.prefix = decoded,
            "timeout_ms" => options.response_timeout = millis(key)?,
            "connect_timeout_ms" => options.connection_timeout = millis(key)?,
            "lease_ms" => options.lease_ttl = millis(key)?,
            k if PASSED_THROUGH.contains(&k) => passed.push(pair),
            other => {
                return Err(invalid(format!(
                    "unknown parameter `{other}` (known: {KNOWN})"
                )))
            }
        }
    }
    if options.prefix.is_empty() {
        return Err(invalid("the key prefix is empty".into()));
    }
    if options.response_timeout.is_zero() || options.connection_timeout.is_zero() {
        return Err(invalid("timeouts must be positive".into()));
    }
    if options.lease_ttl < MIN_LEASE_TTL {
        return Err(invalid(format!(
            "lease_ms must be at least {} ms",
            MIN_LEASE_TTL.as_millis()
        )));
    }
    let mut connect = base.to_owned();
    if !passed.is_empty() {
        connect.push('?');
        connect.push_str(&passed.join("&"));
    }
    if let Some(f) = fragment {
        connect.push('#');
        connect.push_str(f);
    }
    Ok((connect, options))
}

/// Decode `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `url` with its password replaced by `***`, for messages and logs.
///
/// ```
/// use storage_redis::redact;
/// assert_eq!(redact("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
/// assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
/// ```
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let hidden = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{hidden}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_override_and_are_removed() {
        let (connect, o) = split_url(
            "redis://u:p@h:1/3?prefix=a%3Ab%20c:&timeout_ms=250&protocol=resp3&connect_timeout_ms=9&lease_ms=1500",
            RedisOptions::default(),
        )
        .expect("valid");
        assert_eq!(connect, "redis://u:p@h:1/3?protocol=resp3");
        assert_eq!(o.prefix, "a:b c:");
        assert_eq!(o.response_timeout, Duration::from_millis(250));
        assert_eq!(o.connection_timeout, Duration::from_millis(9));
        assert_eq!(o.lease_ttl, Duration::from_millis(1500));

        let (connect, o) = split_url("redis://h/", RedisOptions::default()).expect("valid");
        assert_eq!(
            (connect.as_str(), o),
            ("redis://h/", RedisOptions::default())
        );
    }

    #[test]
    fn bad_parameters_are_named_without_the_password() {
        for (url, want) in [
            ("redis://u:pw@h/?cache=1", "unknown parameter `cache`"),
            ("redis://u:pw@h/?prefix=", "prefix is empty"),
            ("redis://u:pw@h/?timeout_ms=0", "timeout_ms `0`"),
            ("redis://u:pw@h/?timeout_ms=soon", "timeout_ms `soon`"),
            ("redis://u:pw@h/?prefix", "has no value"),
            ("redis://u:pw@h/?prefix=%zz", "percent-encoding"),
            ("redis://u:pw@h/?lease_ms=50", "at least 100 ms"),
        ] {
            let e = split_url(url, RedisOptions::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{url}: {e}");
            assert!(e.contains("redis://u:***@h/"), "{url}: {e}");
            assert!(!e.contains("pw"), "{url}: {e}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("redis://:pw@h/0"), "redis://:***@h/0");
        assert_eq!(redact("redis://pw@h/0"), "redis://***@h/0");
        assert_eq!(redact("redis://h/0?prefix=a@b"), "redis://h/0?prefix=a@b");
        assert_eq!(redact("redis://u:p@ss@h"), "redis://u:***@h");
        assert_eq!(redact("not a url"), "not a url");
    }
}
