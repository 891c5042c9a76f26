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
pub(crate) fn storage_error(e: rusqlite::Error) -> StorageError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => {
            StorageError::Unavailable(format!("database or disk is full: {e}"))
        }
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly,
        ) => StorageError::Unavailable(e.to_string()),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StorageError::Corrupt(e.to_string())
        }
        _ => match e {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StorageError::Corrupt(e.to_string()),
            e => StorageError::Backend(e.to_string()),
        },
    }
}
