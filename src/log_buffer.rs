//! The log writer: stderr, with access-log lines batched per worker thread.
//!
//! The access log has one line per request, and a `write` system call per line adds to a
//! small request's cost. On a worker thread, access lines collect in a thread-local buffer.
//! One call writes it out when the worker's event loop runs out of work (Tokio's
//! `on_thread_park`) or when it passes [`FLUSH_BYTES`]. It is also written before any other
//! log line from that thread and when the worker stops. Under load, one write then carries
//! the lines of a whole round of the event loop. An idle gateway writes each line as soon as
//! its request ends.
//!
//! NOTE: lines still in a buffer are lost if the process dies without stopping its workers
//! (a panic that aborts, SIGKILL). A drain after SIGTERM or SIGINT writes them all.
//!
//! Every other event, and every event on a thread that is not a worker, goes to stderr at
//! once.

use std::cell::RefCell;
use std::io::Write;

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// Target of the access-log events (see `telemetry`).
pub const ACCESS_TARGET: &str = "access";

/// Buffered bytes that trigger a write even while the event loop is busy.
const FLUSH_BYTES: usize = 16 << 10;

thread_local! {
    /// Access lines not yet written; `None` on threads that do not batch.
    static BUFFER: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Turns batching on for the calling thread. Worker threads call this once at start.
pub fn batch_this_thread() {
    BUFFER.with(|buffer| *buffer.borrow_mut() = Some(Vec::with_capacity(FLUSH_BYTES)));
}

/// Writes the calling thread's batched lines to stderr.
pub fn flush_this_thread() {
    BUFFER.with(|buffer| {
        if let Some(pending) = buffer.borrow_mut().as_mut() {
            write_stderr(pending);
            pending.clear();
        }
    });
}

fn write_stderr(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // A log line that cannot be written has nowhere else to go.
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// The `MakeWriter` for the tracing subscriber.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

/// The writer for one event. The fmt layer formats an event into one buffer and writes it
/// with one `write_all`, so each `write` here carries whole lines.
pub struct EventWriter {
    batch: bool,
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { batch: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        EventWriter { batch: meta.target() == ACCESS_TARGET }
    }
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let batched = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            let Some(pending) = buffer.as_mut() else {
                return false;
            };
            if self.batch {
                pending.extend_from_slice(bytes);
                if pending.len() >= FLUSH_BYTES {
                    write_stderr(pending);
                    pending.clear();
                }
                return true;
            }
            // Keeps this thread's lines in order: earlier access lines go out first.
            write_stderr(pending);
            pending.clear();
            false
        });
        if !batched {
            write_stderr(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Option<usize> {
        BUFFER.with(|buffer| buffer.borrow().as_ref().map(Vec::len))
    }

    #[test]
    fn batched_lines_wait_for_flush() {
        std::thread::spawn(|| {
            batch_this_thread();
            EventWriter { batch: true }.write_all(b"line\n").unwrap();
            assert_eq!(pending(), Some(5));
            flush_this_thread();
            assert_eq!(pending(), Some(0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_events_flush_the_batch_first() {
        std::thread::spawn(|| {
            batch_this_thread();
            EventWriter { batch: true }.write_all(b"access\n").unwrap();
            LogWriter.make_writer().write_all(b"other\n").unwrap();
            assert_eq!(pending(), Some(0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn full_batch_is_written() {
        std::thread::spawn(|| {
            batch_this_thread();
            let line = vec![b'x'; FLUSH_BYTES / 2];
            EventWriter { batch: true }.write_all(&line).unwrap();
            assert_eq!(pending(), Some(FLUSH_BYTES / 2));
            EventWriter { batch: true }.write_all(&line).unwrap();
            assert_eq!(pending(), Some(0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn threads_without_batching_write_at_once() {
        std::thread::spawn(|| {
            EventWriter { batch: true }.write_all(b"access\n").unwrap();
            assert_eq!(pending(), None);
        })
        .join()
        .unwrap();
    }
}
