//! The schema and its migrations, versioned with `PRAGMA user_version`.
//!
//! Each migration takes a database from version `n` to `n + 1` and runs in
//! the same transaction as the version bump, so a crash during a migration
//! leaves the previous version intact. A database from a newer version of
//! the broker is refused rather than guessed at.

use rusqlite::Connection;

/// Migration `i` brings a database from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema (see the crate documentation). `packets.message_id`
    // is not declared a foreign key on purpose: SQLite would then scan
    // `packets` on every body deletion; `messages.refs` keeps the link.
    "
    CREATE TABLE messages (
        id                  INTEGER PRIMARY KEY,
        topic               TEXT    NOT NULL,
        payload             BLOB    NOT NULL,
        qos                 INTEGER NOT NULL,
        retain              INTEGER NOT NULL,
        received_at_ms      INTEGER NOT NULL,
        expires_at_ms       INTEGER,
        payload_format_utf8 INTEGER,
        content_type        TEXT,
        response_topic      TEXT,
        correlation_data    BLOB,
        user_properties     TEXT,
        refs                INTEGER NOT NULL
    );
    CREATE TABLE packets (
        client           TEXT    NOT NULL,
        seq              INTEGER NOT NULL,
        message_id       INTEGER NOT NULL, -- messages.id, counted in messages.refs
        qos              INTEGER NOT NULL,
        retain           INTEGER NOT NULL,
        subscription_ids TEXT,
        share            TEXT,
        state            INTEGER NOT NULL,
        packet_id        INTEGER,
        PRIMARY KEY (client, seq)
    ) WITHOUT ROWID;
    CREATE TABLE incoming_qos2 (
        client    TEXT    NOT NULL,
        packet_id INTEGER NOT NULL,
        PRIMARY KEY (client, packet_id)
    ) WITHOUT ROWID;
    CREATE TABLE sessions (
        client             TEXT PRIMARY KEY,
        expiry_secs        INTEGER,
        disconnected_at_ms INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE subscriptions (
        client              TEXT    NOT NULL,
        filter              TEXT    NOT NULL,
        qos                 INTEGER NOT NULL,
        no_local            INTEGER NOT NULL,
        retain_as_published INTEGER NOT NULL,
        retain_handling     INTEGER NOT NULL,
        subscription_id     INTEGER,
        PRIMARY KEY (client, filter)
    ) WITHOUT ROWID;
    CREATE TABLE retained (
        topic               TEXT    PRIMARY KEY,
        id                  INTEGER NOT NULL,
        payload             BLOB    NOT NULL,
        qos                 INTEGER NOT NULL,
        retain              INTEGER NOT NULL,
        received_at_ms      INTEGER NOT NULL,
        expires_at_ms       INTEGER,
        payload_format_utf8 INTEGER,
        content_type        TEXT,
        response_topic      TEXT,
        correlation_data    BLOB,
        user_properties     TEXT
    );
    CREATE TABLE meta (
        key   TEXT    PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('last_message_id', 0);
    ",
    // 2: wills, kept from CONNECT until published or deleted.
    "
    CREATE TABLE wills (
        id                  INTEGER PRIMARY KEY, -- the will's message id
        topic               TEXT    NOT NULL,
        payload             BLOB    NOT NULL,
        qos                 INTEGER NOT NULL,
        retain              INTEGER NOT NULL,
        received_at_ms      INTEGER NOT NULL,
        expires_at_ms       INTEGER,
        payload_format_utf8 INTEGER,
        content_type        TEXT,
        response_topic      TEXT,
        correlation_data    BLOB,
        user_properties     TEXT,
        client              TEXT    NOT NULL,
        expiry_secs         INTEGER,
        delay_secs          INTEGER NOT NULL
    );
    ",
];

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Written by a newer broker: opening it could lose data.
    #[error("database schema version {found} is newer than this broker supports ({supported}); upgrade the broker")]
    Newer {
        /// The database's version.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
    /// SQLite refused a migration.
    #[error("migration to schema version {version} failed: {source}")]
    Migration {
        /// The version being reached.
        version: u32,
        /// Why.
        source: rusqlite::Error,
    },
    /// The version could not be read.
    #[error("cannot read the schema version: {0}")]
    Version(#[source] rusqlite::Error),
}

/// Bring `conn` to the newest version `migrations` describe; returns the
/// version it was at.
pub(crate) fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<u32, SchemaError> {
    let found: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(SchemaError::Version)?;
    let supported = migrations.len() as u32;
    if found > supported {
        return Err(SchemaError::Newer { found, supported });
    }
    for (i, sql) in migrations.iter().enumerate().skip(found as usize) {
        let version = i as u32 + 1;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step(conn).map_err(|source| SchemaError::Migration { version, source })?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A later version of the schema, as a future release would add it.
    const NEXT: &str = "CREATE INDEX packets_by_message ON packets (message_id);";

    #[test]
    fn an_older_database_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        {
            // A database of version 1, as the first release wrote it.
            let mut conn = Connection::open(&path).expect("open");
            assert_eq!(migrate(&mut conn, &MIGRATIONS[..1]).expect("v1"), 0);
            conn.execute("INSERT INTO sessions (client) VALUES ('kept')", [])
                .expect("insert");
        }
        let mut conn = Connection::open(&path).expect("reopen");
        let newer: Vec<&str> = MIGRATIONS.iter().copied().chain([NEXT]).collect();
        assert_eq!(migrate(&mut conn, &newer).expect("to the newest"), 1);
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, newer.len() as u32);
        let kept: String = conn
            .query_row("SELECT client FROM sessions", [], |r| r.get(0))
            .expect("row");
        assert_eq!(kept, "kept");
        // Version 2's table is there, empty.
        let wills: i64 = conn
            .query_row("SELECT count(*) FROM wills", [], |r| r.get(0))
            .expect("wills table");
        assert_eq!(wills, 0);
        // Opening again with the same schema changes nothing.
        assert_eq!(
            migrate(&mut conn, &newer).expect("no-op"),
            newer.len() as u32
        );
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", 99).expect("set");
        match migrate(&mut conn, MIGRATIONS) {
            Err(SchemaError::Newer {
                found: 99,
                supported,
            }) => {
                assert_eq!(supported, MIGRATIONS.len() as u32)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
