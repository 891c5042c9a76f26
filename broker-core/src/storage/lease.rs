//! What the store leases of the server backends share: who holds a lease,
//! as operators read it, and a token no other opener shares.
//!
//! A backend that one broker at a time may write (Redis, MongoDB) keeps a
//! lease with a token and a time to live; this module knows nothing of how
//! or where, only what a refusal tells the operator.

use std::time::{SystemTime, UNIX_EPOCH};

/// Who holds a store's lease, as shown in errors and logs.
///
/// ```
/// use broker_core::storage::lease::Holder;
/// let h = Holder::new("db-1", "42", Some(0));
/// assert_eq!(h.to_string(), "host db-1, pid 42, since 1970-01-01 00:00:00 UTC");
/// assert_eq!(Holder::new("", "", None).to_string(), "host ?, pid ?, since ?");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Host name of the holder, or `?`.
    pub host: String,
    /// Process id of the holder on that host, or `?`.
    pub pid: String,
    /// When it took the lease (UTC), or `?`.
    pub since: String,
}

impl Holder {
    /// A holder from what the store recorded; empty or missing parts read `?`.
    pub fn new(host: impl Into<String>, pid: impl Into<String>, since_ms: Option<u64>) -> Holder {
        let or_unknown = |s: String| if s.is_empty() { "?".to_owned() } else { s };
        Holder {
            host: or_unknown(host.into()),
            pid: or_unknown(pid.into()),
            since: since_ms.map_or_else(|| "?".to_owned(), format_utc_ms),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host {}, pid {}, since {}",
            self.host, self.pid, self.since
        )
    }
}

/// A token no other open of any process shares: host, pid, time and
/// randomness from the standard library's hasher keys.
pub fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}/{}/{nanos:x}/{random:016x}",
        host_name(),
        std::process::id()
    )
}

/// This machine's host name, for operators reading who holds a lease.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc_ms(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(new_token(), new_token());
    }
}
