//! The worker pool: one thread per open connection, grown on demand up to `max_connections` and never shrunk,
//! so no thread is created per request once the pool is warm.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use super::conn::Conn;
use super::connection::serve_connection;
use super::server::Shared;

/// Worker threads are small: the request path has no deep recursion (serde_json stops at 128 levels).
const WORKER_STACK: usize = 512 << 10;

pub(super) struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
}

struct PoolState {
    queue: VecDeque<Conn>,
    idle: usize,
    workers: usize,
}

impl Pool {
    pub(super) fn new() -> Pool {
        Pool {
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                idle: 0,
                workers: 0,
            }),
            work: Condvar::new(),
        }
    }
}

/// Queues a connection for a worker, starting one if none is idle and the pool may grow.
pub(super) fn submit(shared: &Arc<Shared>, conn: Conn) {
    let mut pool = shared.pool.state.lock().unwrap_or_else(|e| e.into_inner());
    pool.queue.push_back(conn);
    if pool.idle < pool.queue.len() && pool.workers < shared.limits.max_connections {
        let worker = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("hookrunner-worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || work(&worker));
        match spawned {
            Ok(_) => pool.workers += 1,
            Err(e) => {
                // Out of threads (TasksMax, RLIMIT_NPROC), and no idle worker for this connection: it would
                // wait for another connection to end, however long that takes. Answered 503 now instead.
                if let Some(conn) = pool.queue.pop_back() {
                    drop(pool);
                    let line = super::server::reject_busy(
                        conn.stream,
                        shared,
                        &conn.remote,
                        "no thread to serve it",
                    );
                    log::error!("cannot start a worker thread: {e}; {line}");
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
    shared.pool.work.notify_one();
}

fn work(shared: &Shared) {
    loop {
        let conn = {
            let mut pool = shared.pool.state.lock().unwrap_or_else(|e| e.into_inner());
            pool.idle += 1;
            let mut pool = shared
                .pool
                .work
                .wait_while(pool, |p| p.queue.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            pool.idle -= 1;
            pool.queue.pop_front()
        };
        let Some(conn) = conn else { continue };
        // A bug must cost one connection, not a worker: the pool would shrink and the open count leak.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_connection(shared, conn)
        }));
        if outcome.is_err() {
            log::error!("a connection handler panicked; the connection was closed");
        }
        shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}
