//! Errors: why a database could not be opened, and how SQLite's runtime
//! errors map onto the broker's [`StorageError`].

use std::path::PathBuf;

use broker_core::storage::StorageError;
use rusqlite::ErrorCode;

use crate::schema::SchemaError;

/// Why [`SqliteStore::open`](crate::SqliteStore::open) failed. Every variant
/// names the database file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory for the file could not be created.
    #[error("cannot create directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite could not open or set up the file (permissions, read-only
    /// directory, ...).
    #[error("cannot open database {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file exists but is not a SQLite database.
    #[error("{} is not a SQLite database", path.display())]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// Another process (most likely another broker) holds the database.
    #[error("database {} is locked by another process (is another broker running on it?)", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The schema could not be brought up to date.
    #[error("database {}: {source}", path.display())]
    Schema {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SchemaError,
    },
    /// The worker thread could not be started.
    #[error("cannot start the SQLite thread for {}: {source}", path.display())]
    Thread {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl OpenError {
    /// Classify an error SQLite raised while opening `path`.
    pub(crate) fn from_sqlite(path: &std::path::Path, e: rusqlite::Error) -> OpenError {
        let path = path.to_path_buf();
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => OpenError::NotADatabase { path },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => OpenError::Locked { path },
            _ => OpenError::Open { path, source: e },
        }
    }
}

/// A runtime SQLite error as the broker sees it: conditions that may pass
/// (disk full, locked, I/O) are `Unavailable`, damaged files `Corrupt`.
/// The SQLite error is kept as the source.
pub(crate) fn storage_error(e: rusqlite::Error) -> StorageError {
    let error = match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StorageError::unavailable("database or disk is full"),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StorageError::unavailable("the SQLite database is locked")
        }
        Some(ErrorCode::SystemIoFailure) => {
            StorageError::unavailable("I/O error on the SQLite database")
        }
        Some(ErrorCode::CannotOpen) => {
            StorageError::unavailable("SQLite cannot open the database file")
        }
        Some(ErrorCode::ReadOnly) => StorageError::unavailable("the SQLite database is read-only"),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StorageError::corrupt("the SQLite database file is damaged")
        }
        _ => match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => {
                StorageError::corrupt("a stored value does not fit its column")
            }
            _ => StorageError::backend("SQLite failed"),
        },
    };
    error.with_source(e)
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn the_sqlite_error_is_the_source() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        let e = storage_error(full);
        assert!(e.is_unavailable(), "{e:?}");
        assert!(e.message().contains("full"), "{e}");
        let source = e.source().expect("a source");
        let inner = source
            .downcast_ref::<rusqlite::Error>()
            .expect("SQLite's error");
        assert_eq!(inner.sqlite_error_code(), Some(ErrorCode::DiskFull));

        let corrupt = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            None,
        );
        assert!(storage_error(corrupt).is_corrupt());
        let other = storage_error(rusqlite::Error::QueryReturnedNoRows);
        assert_eq!(
            other.kind(),
            broker_core::storage::StorageErrorKind::Backend
        );
        assert!(other.source().is_some());
    }
}
