//! The schema, versioned by `PRAGMA user_version`: migration N takes a database from version N to N+1.
//! A release only ever appends to [`MIGRATIONS`], so a database of any older version is brought forward at
//! start, and one written by a newer hookrunner is refused rather than misread.

use rusqlite::{Connection, TransactionBehavior};

/// Times are milliseconds since the epoch. `state` is one of `store::State`'s names; `mode` `sync` or
/// `async`. A queued entry is an async row whose state is `queued`, `failed` (waiting to retry) or `running`;
/// a sync row is `done` or `failed` from the start.
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
    -- A sync delivery runs once and is never retried: its one attempt is kept in its own row, so
    -- writing it costs one b-tree insert instead of three (the row, the attempt, its key). An
    -- async entry's attempts stay in `attempts`. NULL run_started_at: no attempt in the row.
    ALTER TABLE deliveries ADD COLUMN run_started_at INTEGER;
    ALTER TABLE deliveries ADD COLUMN run_ms REAL;
    ALTER TABLE deliveries ADD COLUMN run_signal INTEGER;
    ALTER TABLE deliveries ADD COLUMN run_timed_out INTEGER;
    ALTER TABLE deliveries ADD COLUMN run_output TEXT;
    UPDATE deliveries SET run_started_at = a.started_at, run_ms = a.duration_ms,
        run_signal = a.signal, run_timed_out = a.timed_out, run_output = a.output
        FROM attempts AS a WHERE a.delivery = deliveries.id AND a.n = 1 AND deliveries.mode = 'sync';
    DELETE FROM attempts WHERE delivery IN (SELECT id FROM deliveries WHERE mode = 'sync');
", "
    -- The metrics' counts of async entries by state (store::Backlog): only the entries not done, so a
    -- scrape reads what waits and what is dead, never the history; (mode, state) makes it a covering index.
    CREATE INDEX deliveries_async_open ON deliveries(mode, state) WHERE mode = 'async' AND state != 'done';
", "
    -- Pruning's payloads past keep_payloads: only the finished rows that still hold one, so the minute's
    -- prune reads what it drops, not every older row whose payload went long ago.
    CREATE INDEX deliveries_payload_kept ON deliveries(received_at)
        WHERE payload IS NOT NULL AND finished_at IS NOT NULL;
", "
    -- The dispatcher's look at the queue skips the entries not due yet (thousands in an outage, waiting
    -- to retry) in the index itself, without reading their rows.
    DROP INDEX deliveries_waiting;
    CREATE INDEX deliveries_waiting ON deliveries(id, due_at, serial)
        WHERE state IN ('queued', 'failed', 'running');
", "
    -- Only async entries wait: a sync request whose script failed leaves a `failed` row too, and those
    -- stayed in the waiting index for as long as the history keeps them (30 days by default), so every
    -- look at the queue walked all of them (an idle daemon with 300,000 of them spent a sixth of a CPU).
    -- The other routes' entries are read from the index's `serial = 0` part, so a serial backlog is not
    -- walked there either. A serial lane (its script) waits behind its first entry: the dispatcher reads
    -- that one alone, one search of the lanes index per lane, instead of every entry behind it (50,000
    -- behind a head waiting to retry cost a fifth of a CPU while idle, and draining them took time
    -- quadratic in their number).
    DROP INDEX deliveries_waiting;
    CREATE INDEX deliveries_waiting ON deliveries(serial, id, due_at)
        WHERE mode = 'async' AND state IN ('queued', 'failed', 'running');
    CREATE INDEX deliveries_lanes ON deliveries(script, id)
        WHERE mode = 'async' AND serial AND state IN ('queued', 'failed');
"];

/// Brings the database to the newest version, one transaction per step (a crash mid-way leaves the last
/// completed version). Several processes may open the file at once (the daemon, the CLI): the write lock
/// taken first serialises them, and each re-reads the version under it.
pub fn migrate(conn: &mut Connection) -> Result<(), String> {
    let newest = MIGRATIONS.len() as i64;
    // The common case, an up-to-date database, without taking the write lock at every start.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| format!("cannot read the schema version: {e}"))?;
    if version == newest {
        return Ok(());
    }
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

    #[test]
    fn a_version_1_database_keeps_its_rows_and_its_sync_attempts_move_into_them() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(MIGRATIONS[0]).expect("schema v1");
        conn.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO deliveries (id, request_id, received_at, mode, event, route_line, script,
                 state, status, attempts, last_exit)
             VALUES (1, 'r-1', 10, 'sync', 'A', 1, 'a.sh', 'failed', 500, 1, 3),
                    (2, 'r-2', 20, 'async', 'B', 2, 'b.sh', 'failed', 202, 2, 1);
             INSERT INTO attempts VALUES (1, 1, 11, 2.5, 3, NULL, 0, 'sync out'),
                                         (2, 1, 21, 1.0, 1, NULL, 0, 'first'),
                                         (2, 2, 22, 1.5, 1, NULL, 0, 'second');",
        )
        .expect("v1 rows");
        migrate(&mut conn).expect("migrated");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        let sync: (String, i64, f64, i64, String) = conn
            .query_row(
                "SELECT request_id, run_started_at, run_ms, run_timed_out, run_output
                 FROM deliveries WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .expect("sync row");
        assert_eq!(sync, ("r-1".into(), 11, 2.5, 0, "sync out".into()));
        let kept: Vec<(i64, i64, String)> = conn
            .prepare("SELECT delivery, n, output FROM attempts ORDER BY delivery, n")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .expect("attempts");
        assert_eq!(
            kept,
            [(2, 1, "first".into()), (2, 2, "second".into())],
            "an async entry's attempts stay where they were"
        );
        let async_run: Option<i64> = conn
            .query_row(
                "SELECT run_started_at FROM deliveries WHERE id = 2",
                [],
                |r| r.get(0),
            )
            .expect("async row");
        assert_eq!(async_run, None);
    }
}
