//! The schema, versioned by `PRAGMA user_version`: migration N takes a database from version N to N+1.
//! A release only ever appends to [`MIGRATIONS`], so a database of any older version is brought forward at
//! start, and one written by a newer hookrunner is refused rather than misread.

use rusqlite::{Connection, TransactionBehavior};

/// Times are milliseconds since the epoch. `state` is one of `store::State`'s names; `mode` `sync` or
/// `async`. A queued entry is a row whose state is `queued`, `failed` (waiting to retry) or `running`.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        mode TEXT NOT NULL,
        sender TEXT,
        event TEXT NOT NULL,
        route_line INTEGER NOT NULL,
        script TEXT NOT NULL,
        delivery_id TEXT,
        state TEXT NOT NULL,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_exit INTEGER,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        retry_max_ms INTEGER NOT NULL DEFAULT 0,
        timeout_ms INTEGER NOT NULL DEFAULT 0,
        serial INTEGER NOT NULL DEFAULT 0,
        due_at INTEGER,
        finished_at INTEGER,
        env TEXT NOT NULL DEFAULT '[]',
        payload BLOB,
        payload_bytes INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX deliveries_waiting ON deliveries(id) WHERE state IN ('queued', 'failed', 'running');
    CREATE INDEX deliveries_received ON deliveries(received_at);
    CREATE INDEX deliveries_request ON deliveries(request_id);
    CREATE TABLE attempts (
        delivery INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        duration_ms REAL NOT NULL,
        exit_code INTEGER,
        signal INTEGER,
        timed_out INTEGER NOT NULL,
        output TEXT NOT NULL,
        PRIMARY KEY (delivery, n)
    );
    CREATE TABLE dedupe (
        key TEXT PRIMARY KEY,
        delivery INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        accepted_at INTEGER NOT NULL
    );
    CREATE INDEX dedupe_accepted ON dedupe(accepted_at);
", "
    -- The metrics' counts of async entries by state (store::Backlog): only the entries not done, so a
    -- scrape reads what waits and what is dead, never the history; (mode, state) makes it a covering index.
    CREATE INDEX deliveries_async_open ON deliveries(mode, state) WHERE mode = 'async' AND state != 'done';
"];

/// Brings the database to the newest version, one transaction per step (a crash mid-way leaves the last
/// completed version). Several processes may open the file at once (the daemon, the CLI): the write lock
/// taken first serialises them, and each re-reads the version under it.
pub fn migrate(conn: &mut Connection) -> Result<(), String> {
    let newest = MIGRATIONS.len() as i64;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| format!("cannot lock the database to migrate it: {e}"))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| format!("cannot read the schema version: {e}"))?;
        if version > newest {
            return Err(format!(
                "the database has schema version {version}, newer than this hookrunner knows ({newest}): \
                 run a newer hookrunner, or move the file aside"
            ));
        }
        if version == newest {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[version as usize])
            .map_err(|e| format!("migration to schema version {}: {e}", version + 1))?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(|e| format!("cannot set the schema version: {e}"))?;
        tx.commit()
            .map_err(|e| format!("migration to schema version {}: {e}", version + 1))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_a_newer_database() {
        let mut conn = Connection::open_in_memory().expect("open");
        migrate(&mut conn).expect("first migration");
        migrate(&mut conn).expect("a migrated database is left as it is");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        conn.pragma_update(None, "user_version", version + 1)
            .expect("set");
        let err = migrate(&mut conn).expect_err("newer refused");
        assert!(err.contains("newer than this hookrunner knows"), "{err}");
    }
}
