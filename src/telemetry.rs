//! Logging set-up: `LOG_LEVEL` chooses the filter, `LOG_FORMAT=json` gives one
//! JSON object per line. Logs go to standard error so a worker's standard
//! output can carry results.

use std::io::IsTerminal;

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
        .with_writer(std::io::stderr);
    // A second call (as in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// OpenCV's variable for FFmpeg's log level; `-8` is FFmpeg's `AV_LOG_QUIET`.
const FFMPEG_LOG_LEVEL_VAR: &str = "OPENCV_FFMPEG_LOGLEVEL";

/// FFmpeg, inside OpenCV, writes its own messages (damaged data in a stream,
/// protocol errors) straight to standard error as plain text. With JSON logs
/// they would break "one JSON object per line", so they are turned off, unless
/// the variable was set on purpose. Text logs keep them.
///
/// # Safety
///
/// Call before any other thread exists (it sets an environment variable).
pub unsafe fn quiet_ffmpeg_for(format: LogFormat) {
    if format == LogFormat::Json && std::env::var_os(FFMPEG_LOG_LEVEL_VAR).is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var(FFMPEG_LOG_LEVEL_VAR, "-8") };
    }
}
