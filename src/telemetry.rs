//! Logging set-up: `LOG_LEVEL` chooses the filter, `LOG_FORMAT=json` gives one
//! JSON object per line. Logs go to standard error so a worker's standard
//! output can carry results.

use std::io::IsTerminal;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

/// Installs the global subscriber. `RUST_LOG`, when set, refines the filter
/// per module (for example `RUST_LOG=kube=debug`).
pub fn init(level: LogLevel, format: LogFormat) {
    let mut filter = EnvFilter::new(level.directive());
    if let Ok(extra) = std::env::var("RUST_LOG") {
        for directive in extra.split(',').filter_map(|d| d.parse().ok()) {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (standard error closed, as for a
        // worker whose supervisor died) is dropped; reporting that on the same
        // broken standard error would panic and end the process.
        .log_internal_errors(false)
        .with_writer(|| LogWriter);
    // A second call (as in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The descriptor log lines are written to: standard error, or where it was
/// moved when the worker pointed descriptor 2 at its relay of FFmpeg's lines
/// ([`crate::worker::ffmpeg_log`]).
static LOG_FD: AtomicI32 = AtomicI32::new(libc::STDERR_FILENO);

/// Sends the log lines to `fd` from now on.
pub fn log_to(fd: RawFd) {
    LOG_FD.store(fd, Ordering::SeqCst);
}

/// Writes each formatted log line, whole, to [`LOG_FD`].
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let fd = LOG_FD.load(Ordering::SeqCst);
        // SAFETY: write(2) reads `buf.len()` bytes from a live slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// OpenCV's variables that replace FFmpeg's logger with one that prints to
/// standard output.
const FFMPEG_LOG_VARS: &[&str] = &["OPENCV_FFMPEG_LOGLEVEL", "OPENCV_FFMPEG_DEBUG"];

/// FFmpeg, inside OpenCV, writes its own messages (damaged data in a stream,
/// a playlist's segment that cannot be loaded) as plain text. With
/// `OPENCV_FFMPEG_LOGLEVEL` or `OPENCV_FFMPEG_DEBUG` set, OpenCV prints them
/// to standard output — among a worker's results, and past the scrubbing of
/// credentials — so both are removed: FFmpeg then logs its errors to
/// standard error, where the worker relays them as log events.
///
/// # Safety
///
/// Call before any other thread exists (it changes the environment).
pub unsafe fn keep_ffmpeg_on_stderr() {
    for var in FFMPEG_LOG_VARS {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::remove_var(var) };
    }
}
