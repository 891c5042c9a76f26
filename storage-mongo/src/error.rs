//! Errors: why a store could not be opened, how the driver's runtime errors
//! map onto the broker's [`StorageError`], and URIs made fit to print.

use std::time::Duration;

use broker_core::storage::StorageError;
use mongodb::error::{
    Error, ErrorKind, WriteFailure, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT,
};

/// Why [`MongoStore::open`](crate::MongoStore::open) failed. Every variant
/// names the server's URI, with any password replaced by `***`.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URI could not be parsed (or, for `mongodb+srv://`, resolved).
    #[error("invalid MongoDB URI {uri}: {reason}")]
    InvalidUri {
        /// The URI, password hidden.
        uri: String,
        /// Why, password hidden.
        reason: String,
    },
    /// The database name (from the URI path or the options) is not one
    /// MongoDB accepts.
    #[error("invalid MongoDB database name {name:?} for {uri}: {reason}")]
    InvalidDatabase {
        /// The URI, password hidden.
        uri: String,
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// No server answered within the server selection timeout, or the
    /// server refused the connection (authentication, TLS, ...).
    #[error("cannot reach MongoDB at {uri}: {}", describe(source))]
    Unreachable {
        /// The URI, password hidden.
        uri: String,
        /// The driver's error.
        source: Error,
    },
    /// The server did not answer within the operation timeout.
    #[error("MongoDB at {uri} did not answer within {after:?}")]
    Timeout {
        /// The URI, password hidden.
        uri: String,
        /// The timeout.
        after: Duration,
    },
    /// The server is a standalone `mongod`: the store writes each batch in
    /// a multi-document transaction, which needs a replica set (or a
    /// sharded cluster).
    #[error(
        "MongoDB at {uri} is a standalone server, but the store needs transactions, which need a \
         replica set: start mongod with --replSet NAME and run rs.initiate() once (a single \
         node is enough)"
    )]
    NotReplicaSet {
        /// The URI, password hidden.
        uri: String,
    },
    /// Another broker holds the database's lease (the `lease` module): it
    /// renewed it while this one waited.
    #[error(
        "MongoDB database {database:?} at {uri} is in use by another broker ({holder}), which \
         renews its lease (TTL {} ms); stop that broker first or use another database (the \
         lease of a broker that died is taken over after its TTL)",
        ttl.as_millis()
    )]
    Locked {
        /// The URI, password hidden.
        uri: String,
        /// The database.
        database: String,
        /// Who holds it.
        holder: Box<crate::lease::Holder>,
        /// The holder's lease TTL.
        ttl: Duration,
    },
    /// The collections or their indexes could not be created.
    #[error(
        "cannot create the collections and indexes of database {database:?} at {uri}: {source}"
    )]
    Setup {
        /// The URI, password hidden.
        uri: String,
        /// The database.
        database: String,
        /// The driver's error.
        source: Error,
    },
}

/// Server error codes of conditions that pass: the server is stepping down,
/// shutting down, out of disk, overloaded, or a concurrent transaction won.
const UNAVAILABLE_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    24,    // LockTimeout
    46,    // LockBusy
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    133,   // FailedToSatisfyReadPreference
    134,   // ReadConcernMajorityNotAvailableYet
    189,   // PrimarySteppedDown
    202,   // NetworkInterfaceExceededTimeLimit
    262,   // ExceededTimeLimit
    462,   // IngressRequestRateLimitExceeded
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    14031, // OutOfDiskSpace
];

/// Code of a duplicate key error.
pub(crate) const DUPLICATE_KEY: i32 = 11000;

/// True when `e` says the server cannot be reached or cannot serve now, so
/// that retrying later may work.
pub(crate) fn is_unavailable(e: &Error) -> bool {
    if e.contains_label(TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
        || e.contains_label(RETRYABLE_WRITE_ERROR)
    {
        return true;
    }
    match &*e.kind {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => true,
        ErrorKind::Command(c) => UNAVAILABLE_CODES.contains(&c.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        ErrorKind::Write(WriteFailure::WriteError(w)) => UNAVAILABLE_CODES.contains(&w.code),
        ErrorKind::InsertMany(i) => {
            i.write_concern_error.is_some()
                || i.write_errors
                    .iter()
                    .flatten()
                    .any(|w| UNAVAILABLE_CODES.contains(&w.code))
        }
        _ => false,
    }
}

/// True when `e` is a duplicate key error (of a single or bulk write).
pub(crate) fn is_duplicate_key(e: &Error) -> bool {
    match &*e.kind {
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(i) => i
            .write_errors
            .iter()
            .flatten()
            .any(|w| w.code == DUPLICATE_KEY),
        _ => false,
    }
}

/// True when waiting for the server again is pointless within one
/// operation: the driver already waited its whole server selection timeout.
pub(crate) fn is_server_selection(e: &Error) -> bool {
    matches!(&*e.kind, ErrorKind::ServerSelection { .. })
}

/// The gist of a driver error, without the driver's bookkeeping (labels,
/// sources, raw server responses) that its `Display` adds.
pub(crate) fn describe(e: &Error) -> String {
    match &*e.kind {
        ErrorKind::ServerSelection { message, .. } => message.clone(),
        ErrorKind::Io(io) => format!("I/O error: {io}"),
        ErrorKind::ConnectionPoolCleared { message, .. } => message.clone(),
        ErrorKind::Command(c) => format!("{} ({}): {}", c.code_name, c.code, c.message),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            format!("write error {}: {}", w.code, w.message)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("write concern error {}: {}", w.code, w.message)
        }
        ErrorKind::InsertMany(i) => match (&i.write_errors, &i.write_concern_error) {
            (Some(errors), _) if !errors.is_empty() => {
                format!("write error {}: {}", errors[0].code, errors[0].message)
            }
            (_, Some(w)) => format!("write concern error {}: {}", w.code, w.message),
            _ => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// A runtime driver error as the broker sees it: conditions that may pass
/// are `Unavailable`, documents the driver cannot decode `Corrupt`, the
/// rest `Backend`. The message carries the gist ([`describe`]), the driver's
/// error itself is the source.
pub(crate) fn storage_error(e: Error) -> StorageError {
    let message = format!("MongoDB: {}", describe(&e));
    let error = if is_unavailable(&e) {
        StorageError::unavailable(message)
    } else if matches!(&*e.kind, ErrorKind::BsonDeserialization(_)) {
        StorageError::corrupt(message)
    } else {
        StorageError::backend(message)
    };
    error.with_source(e)
}

/// Query parameters whose values are secrets.
const SECRET_PARAMETERS: &[&str] = &["tlscertificatekeyfilepassword", "authmechanismproperties"];

/// `uri` fit to print: the password of its user info and the values of
/// secret parameters replaced by `***`.
pub(crate) fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, hosts)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{hosts}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _))
                        if SECRET_PARAMETERS.contains(&k.to_ascii_lowercase().as_str()) =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The secrets [`redact_uri`] hides, so that messages quoting parts of the
/// URI can be cleaned too.
pub(crate) fn uri_secrets(uri: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let Some((_, rest)) = uri.split_once("://") else {
        return secrets;
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if let Some((user_info, _)) = authority.rsplit_once('@') {
        if let Some((_, password)) = user_info.split_once(':') {
            secrets.push(password.to_owned());
        }
    }
    if let Some((_, query)) = tail.split_once('?') {
        for p in query.split('&') {
            if let Some((k, v)) = p.split_once('=') {
                if SECRET_PARAMETERS.contains(&k.to_ascii_lowercase().as_str()) {
                    secrets.push(v.to_owned());
                }
            }
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `message` with every secret of `uri` replaced by `***`.
pub(crate) fn scrub(message: &str, uri: &str) -> String {
    let mut message = message.to_owned();
    for secret in uri_secrets(uri) {
        message = message.replace(&secret, "***");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_secret_parameters() {
        assert_eq!(
            redact_uri("mongodb://127.0.0.1:27017/?directConnection=true"),
            "mongodb://127.0.0.1:27017/?directConnection=true"
        );
        assert_eq!(
            redact_uri("mongodb://bob:s3cr%40t@h1:1,h2:2/db?authSource=admin"),
            "mongodb://bob:***@h1:1,h2:2/db?authSource=admin"
        );
        assert_eq!(
            redact_uri("mongodb+srv://bob@cluster.example/db"),
            "mongodb+srv://bob@cluster.example/db"
        );
        assert_eq!(
            redact_uri("mongodb://h/?tls=true&tlsCertificateKeyFilePassword=pw&w=1"),
            "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=***&w=1"
        );
        assert_eq!(redact_uri("not a uri"), "not a uri");
    }

    #[test]
    fn scrubs_secrets_from_messages() {
        let uri = "mongodb://bob:hunter2@h/db?authMechanismProperties=AWS_SESSION_TOKEN:tok";
        assert_eq!(
            scrub("failed: hunter2 and AWS_SESSION_TOKEN:tok", uri),
            "failed: *** and ***"
        );
        assert_eq!(scrub("nothing secret", "mongodb://h/"), "nothing secret");
    }
}
