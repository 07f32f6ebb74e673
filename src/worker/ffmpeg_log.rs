//! FFmpeg and OpenCV write their own messages straight to file descriptor 2
//! from C and C++ (FFmpeg's default log callback; the opencv crate does not
//! let a program install another). Those messages quote URLs — an HLS
//! playlist's segments and keys, resolved against the camera's URL with its
//! `user:password@` — so the worker points descriptor 2 at a pipe, and a
//! thread of its own reads the pipe line by line, scrubs each line of the
//! camera's credentials and of every URL's secrets
//! ([`CameraSource::scrub`]), and logs it as an event of target `ffmpeg`: in
//! the log format of every other line, on the original standard error.
//!
//! A pipe catches everything native code writes there (FFmpeg, OpenCV's own
//! warnings, a Rust panic message) without depending on how a library logs,
//! and needs no unsafe call into FFmpeg's variadic logging interface.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::camera_url::CameraSource;

/// Longest line relayed; a longer one is replaced by a note of its length,
/// since cutting it could cut a secret in two and let half of it through.
pub const MAX_LINE: usize = 16 * 1024;

/// The relay of descriptor 2. Dropping it points descriptor 2 back at the
/// original standard error and waits until every line written before was
/// relayed.
pub struct StderrRelay {
    original: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// FFmpeg's contexts that report on network connections.
const NETWORK_CONTEXTS: &[&str] = &[
    "tcp", "udp", "tls", "http", "https", "rtsp", "rtp", "hls", "crypto",
];

/// Words of a connection's fate, wherever a line has them.
const CONNECTION_WORDS: &[&str] = &[
    "refused",
    "timed out",
    "timeout",
    "reset by peer",
    "no route to host",
    "unreachable",
    "invalid data found",
    "immediate exit requested",
    "end of file",
    "broken pipe",
    "server returned",
];

/// OpenCV's own warnings about opening a capture: when one is written
/// tells how long the open took, and so how it failed.
const OPENCV_OPEN_WARNINGS: &[&str] = &["global cap.cpp:", "global cap_ffmpeg_impl.hpp:"];

/// Whether a line of FFmpeg's or OpenCV's says how a network connection or
/// an open went (refused, timed out, reset, what the server answered):
/// without `CAMERA_ERROR_DETAIL` such lines are not relayed, since they
/// (and when they come) would tell whoever reads the log (`runner local`
/// relays it) what listens on a port.
pub fn tells_connection_fate(text: &str) -> bool {
    if OPENCV_OPEN_WARNINGS.iter().any(|w| text.contains(w)) {
        return true;
    }
    let context = text
        .trim_start()
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(" @ "))
        .map(|(name, _)| name);
    if context.is_some_and(|c| NETWORK_CONTEXTS.contains(&c)) {
        return true;
    }
    let lower = text.to_ascii_lowercase();
    CONNECTION_WORDS.iter().any(|w| lower.contains(w))
}

/// What the relay logs for one line of native output: `None` for a blank
/// line, and without `detail` (`CAMERA_ERROR_DETAIL`) for a line that says
/// how a network connection went.
pub fn relayed_line(source: &CameraSource, raw: &[u8], detail: bool) -> Option<String> {
    if raw.len() > MAX_LINE {
        return Some(too_long(raw.len()));
    }
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() || (!detail && tells_connection_fate(text)) {
        return None;
    }
    Some(source.scrub(text))
}

impl StderrRelay {
    /// Moves standard error to a new descriptor (where the log goes from now
    /// on) and points descriptor 2 at the relay's pipe.
    pub fn start(source: CameraSource, detail: bool) -> std::io::Result<StderrRelay> {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) fills the array with two new descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned here alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl(2) duplicates descriptor 2 to a new close-on-exec one.
        let original = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
        if original < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `original` is the new descriptor fcntl returned.
        let original = unsafe { OwnedFd::from_raw_fd(original) };
        crate::telemetry::log_to(original.as_raw_fd());
        let thread = std::thread::Builder::new()
            .name("ffmpeg-log".into())
            .spawn(move || relay(File::from(read), &source, detail))?;
        // SAFETY: dup2(2) points descriptor 2 at the pipe; `write` stays
        // owned and is closed when this function returns.
        if unsafe { libc::dup2(write.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            let e = std::io::Error::last_os_error();
            crate::telemetry::log_to(libc::STDERR_FILENO);
            return Err(e);
        }
        Ok(StderrRelay {
            original,
            thread: Some(thread),
        })
    }
}

impl Drop for StderrRelay {
    fn drop(&mut self) {
        // Closing the pipe's last writer ends the relay once it has read
        // everything; log lines go to descriptor 2 again.
        // SAFETY: dup2(2) on two descriptors this process holds.
        unsafe { libc::dup2(self.original.as_raw_fd(), libc::STDERR_FILENO) };
        crate::telemetry::log_to(libc::STDERR_FILENO);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn relay(pipe: File, source: &CameraSource, detail: bool) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        // At most one byte past MAX_LINE is kept, so a long line is known
        // as one without holding it whole.
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut length = line.len();
        if !line.ends_with(b"\n") && line.len() > MAX_LINE {
            length += skip_rest_of_line(&mut reader);
        }
        let shown = if length > MAX_LINE {
            Some(too_long(length))
        } else {
            relayed_line(source, &line, detail)
        };
        if let Some(text) = shown {
            tracing::warn!(target: "ffmpeg", "{text}");
        }
    }
}

fn too_long(length: usize) -> String {
    format!("(a line of {length} bytes, longer than {MAX_LINE}, not shown)")
}

/// Reads up to and including the next newline; returns how many bytes.
fn skip_rest_of_line(reader: &mut impl BufRead) -> usize {
    let mut skipped = 0;
    loop {
        let (done, used) = match reader.fill_buf() {
            Ok([]) | Err(_) => return skipped,
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(used);
        skipped += used;
        if done {
            return skipped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_scrubbed_and_blank_ones_dropped() {
        let source =
            CameraSource::parse("http://admin:pw@cam.example/live/index.m3u8", None).unwrap();
        let line = b"[hls @ 0x55d0c0a1b2c0] Error when loading first segment 'http://admin:pw@cam.example/live/seg0.ts'\n";
        assert_eq!(
            relayed_line(&source, line, true).as_deref(),
            Some(
                "[hls @ 0x55d0c0a1b2c0] Error when loading first segment 'http://***@cam.example/live/seg0.ts'"
            )
        );
        assert_eq!(relayed_line(&source, b"  \r\n", true), None);
        let long = vec![b'a'; MAX_LINE + 1];
        let note = relayed_line(&source, &long, false).unwrap();
        assert!(note.contains("not shown"), "{note}");
    }

    #[test]
    fn lines_on_a_connections_fate_need_camera_error_detail() {
        let source = CameraSource::parse("rtsp://admin:pw@10.1.2.3:8554/a", None).unwrap();
        for line in [
            "[tcp @ 0x5581] Connection to tcp://10.1.2.3:8554?timeout=0 failed: Connection refused",
            "[tcp @ 0x5581] Connection to tcp://10.1.2.3:8554 failed: Connection timed out",
            "[rtsp @ 0x5581] method DESCRIBE failed: 404 Not Found",
            "[http @ 0x5581] HTTP error 403 Forbidden",
            "[tls @ 0x5581] Error in the pull function.",
            "rtsp://admin:pw@10.1.2.3:8554/a: Invalid data found when processing input",
            "[ WARN:0@5.001] global cap_ffmpeg_impl.hpp:453 _opencv_ffmpeg_interrupt_callback Stream timeout triggered after 5000 ms",
            "[ WARN:0@0.070] global cap.cpp:204 open VIDEOIO(FFMPEG): backend is generally available but can't be used to capture by name",
            "[http @ 0x7f7b50002080] Stream ends prematurely at 27, should be 18446744073709551615",
        ] {
            assert!(tells_connection_fate(line), "{line}");
            assert_eq!(
                relayed_line(&source, line.as_bytes(), false),
                None,
                "{line}"
            );
            let shown = relayed_line(&source, line.as_bytes(), true).unwrap();
            assert!(!shown.contains("admin:pw"), "{shown}");
        }
        let decoding = "[h264 @ 0x5581] error while decoding MB 3 7, bytestream -5";
        assert!(!tells_connection_fate(decoding));
        assert_eq!(
            relayed_line(&source, decoding.as_bytes(), false).as_deref(),
            Some(decoding)
        );
    }
}
