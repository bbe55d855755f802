//! Connection workers: one thread per worker, each running its own current-thread Tokio
//! runtime. The accept loop hands every new connection to one worker, and all of that
//! connection's work (TLS, HTTP, the upstream request and its pooled upstream connection)
//! then stays on that thread.
//!
//! Tokio's multi-thread scheduler moves tasks between threads and wakes parked threads
//! with a futex call, once or twice per request at registry rates. A connection that never
//! leaves its thread costs no such wake-ups, which is how nginx's worker processes run.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::watch;

use crate::log_buffer;

thread_local! {
    /// Index of the worker that runs on this thread; 0 on every other thread.
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Returns the index of the worker whose thread calls this, or 0 outside a worker thread.
/// Per-worker resources such as upstream connection pools are picked by it.
pub fn current_worker() -> usize {
    WORKER_INDEX.with(Cell::get)
}

/// Returns the number of CPUs this process may run on, the default worker count.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// The running worker threads.
pub struct Workers {
    handles: Vec<Handle>,
    /// Open connections per worker, so that new ones go to the least busy worker.
    connections: Arc<[AtomicUsize]>,
    next: AtomicUsize,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` worker threads, each with a current-thread runtime with I/O and
    /// timers enabled.
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let count = count.max(1);
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            // Batched access-log lines go out whenever the event loop runs out of work.
            let runtime = Builder::new_current_thread()
                .enable_all()
                .on_thread_park(log_buffer::flush_this_thread)
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    WORKER_INDEX.with(|cell| cell.set(index));
                    log_buffer::batch_this_thread();
                    runtime.block_on(async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                    // Dropping the runtime drops the tasks still on it: connections that
                    // outlived the drain period. Their access lines are the last ones.
                    drop(runtime);
                    log_buffer::flush_this_thread();
                })?;
            threads.push(thread);
        }
        let connections = (0..count).map(|_| AtomicUsize::new(0)).collect();
        Ok(Workers { handles, connections, next: AtomicUsize::new(0), stop, threads })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs one connection's future on the worker with the fewest open connections. Ties
    /// go round-robin, so that an idle gateway spreads its first connections.
    pub fn spawn_connection<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let count = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let index = (0..count)
            .map(|offset| (start + offset) % count)
            .min_by_key(|&index| self.connections[index].load(Ordering::Relaxed))
            .expect("at least one worker");
        let guard = OpenConnection { connections: self.connections.clone(), index };
        guard.connections[index].fetch_add(1, Ordering::Relaxed);
        self.handles[index].spawn(async move {
            let _guard = guard;
            connection.await;
        });
    }

    /// Stops every worker and waits for its thread to end. Tasks still running on a
    /// worker are dropped.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// Counts one connection against its worker until dropped.
struct OpenConnection {
    connections: Arc<[AtomicUsize]>,
    index: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.connections[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn connections_spread_over_workers() {
        let workers = Workers::start(2).unwrap();
        let (report, reports) = mpsc::channel();
        let (release, _) = tokio::sync::broadcast::channel::<()>(1);
        for _ in 0..4 {
            let report = report.clone();
            let mut released = release.subscribe();
            workers.spawn_connection(async move {
                report.send(current_worker()).unwrap();
                let _ = released.recv().await;
            });
        }
        let mut seen: Vec<usize> = (0..4).map(|_| reports.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, [0, 0, 1, 1]);
        release.send(()).unwrap();
        workers.stop();
    }

    #[test]
    fn ended_connections_free_their_worker() {
        let workers = Workers::start(2).unwrap();
        let (report, reports) = mpsc::channel();
        for _ in 0..3 {
            let report = report.clone();
            workers.spawn_connection(async move {
                report.send(current_worker()).unwrap();
            });
            reports.recv().unwrap();
            // Let the finished task drop its guard before the next pick.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(workers.connections.iter().all(|open| open.load(Ordering::Relaxed) == 0));
        workers.stop();
    }
}
