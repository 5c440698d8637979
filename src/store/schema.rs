//! The schema, versioned by `PRAGMA user_version`: migration N takes a database from version N to N+1.
//! A release only ever appends to [`MIGRATIONS`], so a database of any older version is brought forward at
//! start, and one written by a newer hookrunner is refused rather than misread.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use super::OpenError;
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
", "
    -- An id is never given twice. Without AUTOINCREMENT SQLite hands out the largest id plus one, so once
    -- the newest row was dropped (`deliveries drop`, or pruning the whole history) the next delivery got
    -- its id: a stale `deliveries drop 5` or `retry 5` then hit a newer, acknowledged delivery, and a
    -- repeat answered from a dedupe row still naming 5 named that newer delivery. SQLite cannot add
    -- AUTOINCREMENT to a table, so it is rebuilt (https://www.sqlite.org/lang_altertable.html#otheralter), with the same columns in the same
    -- order, every row under its id and the indexes as version 6 has them; `migrate` turns foreign keys off
    -- around it, or dropping the old table would delete every attempt with it. The ids already used and
    -- forgotten cannot be known; the largest one still named, by a row or by a dedupe row, is.
    CREATE TABLE deliveries_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
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
        payload_bytes INTEGER NOT NULL DEFAULT 0,
        run_started_at INTEGER,
        run_ms REAL,
        run_signal INTEGER,
        run_timed_out INTEGER,
        run_output TEXT
    );
    INSERT INTO deliveries_new (id, request_id, received_at, mode, sender, event, route_line, script,
        delivery_id, state, status, attempts, last_exit, max_attempts, retry_max_ms, timeout_ms, serial,
        due_at, finished_at, env, payload, payload_bytes, run_started_at, run_ms, run_signal,
        run_timed_out, run_output)
    SELECT id, request_id, received_at, mode, sender, event, route_line, script,
        delivery_id, state, status, attempts, last_exit, max_attempts, retry_max_ms, timeout_ms, serial,
        due_at, finished_at, env, payload, payload_bytes, run_started_at, run_ms, run_signal,
        run_timed_out, run_output
    FROM deliveries ORDER BY id;
    DELETE FROM sqlite_sequence WHERE name = 'deliveries_new';
    INSERT INTO sqlite_sequence (name, seq) SELECT 'deliveries_new',
        max((SELECT coalesce(max(id), 0) FROM deliveries), (SELECT coalesce(max(delivery), 0) FROM dedupe));
    DROP TABLE deliveries;
    ALTER TABLE deliveries_new RENAME TO deliveries;
    CREATE INDEX deliveries_received ON deliveries(received_at);
    CREATE INDEX deliveries_request ON deliveries(request_id);
    CREATE INDEX deliveries_async_open ON deliveries(mode, state) WHERE mode = 'async' AND state != 'done';
    CREATE INDEX deliveries_payload_kept ON deliveries(received_at)
        WHERE payload IS NOT NULL AND finished_at IS NOT NULL;
    CREATE INDEX deliveries_waiting ON deliveries(serial, id, due_at)
        WHERE mode = 'async' AND state IN ('queued', 'failed', 'running');
    CREATE INDEX deliveries_lanes ON deliveries(script, id)
        WHERE mode = 'async' AND serial AND state IN ('queued', 'failed');
", "
    -- The other routes' entries are read in the order they come due (a first attempt is due when it
    -- arrived), so a look at the queue stops at the first entry not due yet. Ordered by id, it walked the
    -- index entry of every entry waiting to retry at each look (at every accept and every finished run):
    -- 90,000 of them, a failing script's outage, and 20 accepts a second cost a fifth of a CPU.
    -- The index's condition names the two states that do not wait: with the three that do, SQLite built
    -- a temporary table for the list at every write of a row (to decide whether the row is in the index),
    -- a tenth of the store writer's work per delivery; a list of two is two comparisons.
    -- A waiting entry has always had a due time; one written without (version 1) is due when it arrived.
    UPDATE deliveries SET due_at = received_at
        WHERE due_at IS NULL AND mode = 'async' AND state NOT IN ('done', 'dead');
    DROP INDEX deliveries_waiting;
    CREATE INDEX deliveries_waiting ON deliveries(serial, due_at, id)
        WHERE mode = 'async' AND state NOT IN ('done', 'dead');
"];

/// Brings the database to the newest version, one transaction per step (a crash mid-way leaves the last
/// completed version). Several processes may open the file at once (the daemon, the CLI): the write lock
/// taken first serialises them, and each re-reads the version under it.
///
/// Foreign keys are off while the steps run: a step that rebuilds a table drops the old one, and with
/// them on that would delete every row that refers to it (`attempts`, by `ON DELETE CASCADE`). The pragma
/// is a no-op inside a transaction, so it is set around the steps, and each step is checked with
/// `PRAGMA foreign_key_check` before it commits instead. The connection's setting is put back after.
///
/// A step may rewrite every row (version 7 does: about 17 s for a 1.4 GB store with a million rows, and
/// it needs as much free space again until pruning gives it back), longer than systemd waits for a start
/// by default (90 s) on a large store: it would kill the daemon mid-step, the step would roll back, and
/// every restart would do the same. So while the steps run, systemd is asked for more time every
/// [`STILL_MIGRATING`].
pub fn migrate(conn: &mut Connection) -> Result<(), OpenError> {
    migrate_with(conn, &|| {
        crate::systemd::extend_start(STILL_MIGRATING + STILL_MIGRATING)
    })
}

/// How often `migrate` tells systemd it is still at work.
const STILL_MIGRATING: Duration = Duration::from_secs(10);

/// [`migrate`], calling `still_working` when the steps begin and every [`STILL_MIGRATING`] until they end.
fn migrate_with(conn: &mut Connection, still_working: &(dyn Fn() + Sync)) -> Result<(), OpenError> {
    let newest = MIGRATIONS.len() as i64;
    // The common case, an up-to-date database, without taking the write lock at every start.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| format!("cannot read the schema version: {e}"))?;
    if version == newest {
        return Ok(());
    }
    if version > newest {
        return Err(newer(version, newest));
    }
    if version > 0 {
        log::info!(
            "bringing the store from schema version {version} to {newest}; on a large store this takes a \
             while and as much free space again as the store takes"
        );
    }
    let foreign_keys: bool = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .map_err(|e| format!("cannot read the foreign keys setting: {e}"))?;
    conn.pragma_update(None, "foreign_keys", false)
        .map_err(|e| format!("cannot turn foreign keys off to migrate: {e}"))?;
    // Every transaction of `steps` has ended (committed, or rolled back when dropped): the pragma takes
    // effect.
    let (done, ended) = mpsc::channel::<()>();
    let migrated = std::thread::scope(|scope| {
        // Without the thread (none to be had), the steps still run: only the reminders are lost.
        let _ = std::thread::Builder::new().spawn_scoped(scope, move || {
            while let Err(RecvTimeoutError::Timeout) = {
                still_working();
                ended.recv_timeout(STILL_MIGRATING)
            } {}
        });
        let migrated = steps(conn, newest);
        drop(done);
        migrated
    });
    conn.pragma_update(None, "foreign_keys", foreign_keys)
        .map_err(|e| format!("cannot turn foreign keys back on after migrating: {e}"))?;
    migrated
}

/// What `check` can tell from the database file's header without opening it (opening creates `-shm` and
/// `-wal` files, which as another user than the daemon's would then stop it): a file that is no SQLite
/// database, or one whose schema a newer hookrunner made. `Ok` for a file not there or empty (a new
/// store) and one this user cannot read (the daemon's own check is at its start).
pub fn inspect(path: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    let mut header = Vec::with_capacity(100);
    match std::fs::File::open(path) {
        Ok(file) => {
            file.take(100)
                .read_to_end(&mut header)
                .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        }
        Err(_) => return Ok(()),
    }
    if header.is_empty() {
        return Ok(());
    }
    if header.len() < 100 || !header.starts_with(b"SQLite format 3\0") {
        return Err(format!(
            "{}: file is not a database (see the README on restoring the store)",
            path.display()
        ));
    }
    // The header's user version, big-endian at offset 60 (SQLite's file format, 1.3).
    let version = i64::from(i32::from_be_bytes([
        header[60], header[61], header[62], header[63],
    ]));
    let newest = MIGRATIONS.len() as i64;
    if version > newest {
        return Err(format!("{}: {}", path.display(), newer(version, newest)));
    }
    Ok(())
}

fn newer(version: i64, newest: i64) -> OpenError {
    OpenError::Newer(format!(
        "the database has schema version {version}, newer than this hookrunner knows ({newest}): run a \
         newer hookrunner, or move the file aside"
    ))
}

fn steps(conn: &mut Connection, newest: i64) -> Result<(), OpenError> {
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| format!("cannot lock the database to migrate it: {e}"))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| format!("cannot read the schema version: {e}"))?;
        if version > newest {
            return Err(newer(version, newest));
        }
        if version == newest {
            return Ok(());
        }
        let step =
            |e: &dyn std::fmt::Display| format!("migration to schema version {}: {e}", version + 1);
        tx.execute_batch(MIGRATIONS[version as usize])
            .map_err(|e| step(&e))?;
        let dangling: Vec<(String, String)> = tx
            .prepare("PRAGMA foreign_key_check")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(2)?)))?.collect())
            .map_err(|e| step(&e))?;
        if let Some((table, parent)) = dangling.first() {
            return Err(step(&format!(
                "{} rows refer to rows that are not there (the first: a row of {table}, to {parent})",
                dangling.len()
            ))
            .into());
        }
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(|e| format!("cannot set the schema version: {e}"))?;
        tx.commit().map_err(|e| step(&e))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn systemd_is_told_while_the_steps_run_and_not_for_an_up_to_date_store() {
        let told = AtomicUsize::new(0);
        let tell = || {
            told.fetch_add(1, Ordering::SeqCst);
        };
        let mut conn = at_version(6);
        migrate_with(&mut conn, &tell).expect("migrate");
        assert_eq!(told.load(Ordering::SeqCst), 1, "once as the steps began");
        migrate_with(&mut conn, &tell).expect("up to date");
        assert_eq!(
            told.load(Ordering::SeqCst),
            1,
            "not for an up-to-date store"
        );
    }
    use rusqlite::types::Value;

    /// A database as `version` left it, with foreign keys on as the store's connections have them.
    fn at_version(version: usize) -> Connection {
        let conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "foreign_keys", true)
            .expect("foreign keys");
        for step in &MIGRATIONS[..version] {
            conn.execute_batch(step).expect("step");
        }
        conn.pragma_update(None, "user_version", version as i64)
            .expect("version");
        conn
    }

    fn all(conn: &Connection, sql: &str) -> Vec<Vec<Value>> {
        let mut statement = conn.prepare(sql).expect("prepare");
        let columns = statement.column_count();
        statement
            .query_map([], |r| (0..columns).map(|i| r.get(i)).collect())
            .and_then(|rows| rows.collect())
            .expect("rows")
    }

    /// The table's columns and its indexes, each index's SQL with its whitespace evened out.
    fn deliveries_schema(conn: &Connection) -> (Vec<Vec<Value>>, Vec<(String, String)>) {
        let indexes = all(
            conn,
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries'
             ORDER BY name",
        )
        .into_iter()
        .map(|row| match &row[..] {
            [Value::Text(name), Value::Text(sql)] => (
                name.clone(),
                sql.split_whitespace().collect::<Vec<_>>().join(" "),
            ),
            other => panic!("index {other:?}"),
        })
        .collect();
        (all(conn, "PRAGMA table_info(deliveries)"), indexes)
    }

    fn insert(conn: &Connection, request_id: &str) -> i64 {
        conn.execute(
            "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state, status)
             VALUES (?1, 1, 'async', 'E', 1, 'a.sh', 'queued', 202)",
            [request_id],
        )
        .expect("insert");
        conn.last_insert_rowid()
    }

    fn flag(conn: &Connection, pragma: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
            .expect(pragma)
    }

    #[test]
    fn a_version_6_database_keeps_every_row_id_attempt_and_index_and_its_ids_are_never_given_again()
    {
        let mut conn = at_version(6);
        // Row 3 was dropped, and so was 7, the newest, whose dedupe row is still there.
        conn.execute_batch(
            "INSERT INTO deliveries (id, request_id, received_at, mode, sender, event, route_line, script,
                 delivery_id, state, status, attempts, last_exit, max_attempts, due_at, payload,
                 payload_bytes, run_started_at, run_ms, run_signal, run_timed_out, run_output)
             VALUES (1, 'r-1', 10, 'sync', 'gh', 'A', 1, 'a.sh', NULL, 'failed', 500, 1, 3, 1, NULL,
                     NULL, 0, 11, 2.5, NULL, 0, 'sync out'),
                    (2, 'r-2', 20, 'async', NULL, 'B', 2, 'b.sh', 'd-2', 'failed', 202, 2, 1, 5, 99,
                     x'0102', 2, NULL, NULL, NULL, NULL, NULL),
                    (4, 'r-4', 40, 'async', NULL, 'B', 2, 'b.sh', 'd-4', 'queued', 202, 0, NULL, 5, 40,
                     x'03', 1, NULL, NULL, NULL, NULL, NULL);
             INSERT INTO attempts VALUES (2, 1, 21, 1.0, 1, NULL, 0, 'first'),
                                         (2, 2, 22, 1.5, 1, NULL, 0, 'second');
             INSERT INTO dedupe VALUES ('d-2', 2, 'r-2', 202, 20), ('d-7', 7, 'r-7', 202, 70);",
        )
        .expect("v6 rows");
        let contents = |conn: &Connection| {
            [
                "SELECT * FROM deliveries ORDER BY id",
                "SELECT * FROM attempts ORDER BY delivery, n",
                "SELECT * FROM dedupe ORDER BY key",
            ]
            .map(|sql| all(conn, sql))
        };
        let before = (contents(&conn), deliveries_schema(&conn));
        assert_eq!(before.1.1.len(), 6, "{:?}", before.1.1);

        migrate(&mut conn).expect("migrated");

        assert_eq!(flag(&conn, "user_version"), MIGRATIONS.len() as i64);
        assert_eq!(flag(&conn, "foreign_keys"), 1, "on again after migrating");
        // Every index as it was, but the waiting one, which version 8 orders by due time.
        let mut expected = before.clone();
        let newest = deliveries_schema(&at_version(MIGRATIONS.len())).1;
        for index in &mut expected.1.1 {
            if index.0 == "deliveries_waiting" {
                *index = newest
                    .iter()
                    .find(|(name, _)| name == "deliveries_waiting")
                    .expect("the waiting index")
                    .clone();
                assert!(index.1.contains("(serial, due_at, id)"), "{index:?}");
            }
        }
        assert_eq!((contents(&conn), deliveries_schema(&conn)), expected);
        let table: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'deliveries'",
                [],
                |r| r.get(0),
            )
            .expect("table");
        assert!(table.contains("AUTOINCREMENT"), "{table}");
        assert_eq!(
            insert(&conn, "r-8"),
            8,
            "above 7, still named by its dedupe row"
        );
        // The attempts still refer to the table: dropping their entry takes them with it.
        conn.execute("DELETE FROM deliveries WHERE id = 2", [])
            .expect("delete");
        assert!(all(&conn, "SELECT * FROM attempts").is_empty());
    }

    /// Version 8 reads the queue in the order entries come due, so every waiting entry needs a due time:
    /// one written without has the time it arrived; a finished row keeps none.
    #[test]
    fn a_version_7_entry_without_a_due_time_is_due_when_it_arrived() {
        let mut conn = at_version(7);
        conn.execute_batch(
            "INSERT INTO deliveries (id, request_id, received_at, mode, event, route_line, script, state,
                 status, due_at)
             VALUES (1, 'r-1', 10, 'async', 'E', 1, 'a.sh', 'queued', 202, NULL),
                    (2, 'r-2', 20, 'async', 'E', 1, 'a.sh', 'failed', 202, 99),
                    (3, 'r-3', 30, 'async', 'E', 1, 'a.sh', 'done', 202, NULL),
                    (4, 'r-4', 40, 'sync', 'E', 1, 'a.sh', 'failed', 500, NULL);",
        )
        .expect("v7 rows");
        migrate(&mut conn).expect("migrated");
        assert_eq!(
            all(&conn, "SELECT id, due_at FROM deliveries ORDER BY id"),
            [
                [Value::Integer(1), Value::Integer(10)],
                [Value::Integer(2), Value::Integer(99)],
                [Value::Integer(3), Value::Null],
                [Value::Integer(4), Value::Null],
            ]
        );
    }

    #[test]
    fn a_migration_that_would_leave_a_row_referring_to_nothing_is_refused() {
        let mut conn = at_version(6);
        conn.pragma_update(None, "foreign_keys", false)
            .expect("off");
        conn.execute_batch("INSERT INTO attempts VALUES (9, 1, 91, 1.0, 1, NULL, 0, 'orphan')")
            .expect("orphan");
        conn.pragma_update(None, "foreign_keys", true).expect("on");
        let err = migrate(&mut conn).expect_err("refused").to_string();
        assert!(
            err.contains("migration to schema version 7: 1 rows refer to rows that are not there"),
            "{err}"
        );
        assert_eq!(flag(&conn, "user_version"), 6, "the step rolled back");
        assert_eq!(flag(&conn, "foreign_keys"), 1, "on again after failing");
    }

    #[test]
    fn the_id_of_a_deleted_newest_row_is_not_given_again() {
        let mut conn = Connection::open_in_memory().expect("open");
        migrate(&mut conn).expect("migrated");
        for n in 1..=3 {
            insert(&conn, &format!("r-{n}"));
        }
        conn.execute("DELETE FROM deliveries WHERE id = 3", [])
            .expect("drop the newest");
        assert_eq!(insert(&conn, "r-4"), 4);
        conn.execute("DELETE FROM deliveries", [])
            .expect("prune everything");
        assert_eq!(insert(&conn, "r-5"), 5);
    }

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
        assert!(matches!(err, OpenError::Newer(_)), "{err}");
        assert!(
            err.to_string().contains("newer than this hookrunner knows"),
            "{err}"
        );
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
