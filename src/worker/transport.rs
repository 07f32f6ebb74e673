//! Which RTSP transport each open tries (`RTSP_TRANSPORT`), and handing the
//! choice (with the frames the decoder skips, `DECODE_SKIP`) to FFmpeg
//! through OpenCV's `OPENCV_FFMPEG_CAPTURE_OPTIONS`, the only way OpenCV
//! passes options to FFmpeg.

use crate::camera_url::{CameraSource, RtspTransport};
use crate::worker::decode_skip::Discard;

/// How a worker carries RTSP media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RtspTransportMode {
    /// RTP interleaved in the RTSP TCP connection.
    Tcp,
    /// RTP over UDP.
    Udp,
    /// TCP first; UDP when the server refuses TCP transport.
    Auto,
}

/// The transports to try, in order, for one open. `auto` starts with the one
/// that worked last (TCP before any worked) and falls back to the other, so a
/// server that refuses TCP (`461 Unsupported transport`, or a plain 400) is
/// read over UDP, and one open attempt costs one connection once known.
pub fn attempt_order(
    mode: RtspTransportMode,
    worked_last: Option<RtspTransport>,
) -> Vec<RtspTransport> {
    use RtspTransport::{Tcp, Udp};
    match mode {
        RtspTransportMode::Tcp => vec![Tcp],
        RtspTransportMode::Udp => vec![Udp],
        RtspTransportMode::Auto => match worked_last {
            Some(Udp) => vec![Udp, Tcp],
            _ => vec![Tcp, Udp],
        },
    }
}

/// The transport of the first open, set before any thread starts.
pub fn initial(mode: RtspTransportMode) -> RtspTransport {
    attempt_order(mode, None)[0]
}

const OPTIONS_VAR: &str = "OPENCV_FFMPEG_CAPTURE_OPTIONS";

/// Sets the FFmpeg options for `source` with transport `rtsp`, its decoder
/// leaving out `discard`.
///
/// # Safety
///
/// Before any other thread exists: always. Later: only when the variable was
/// already set before any thread started (by this function), and only from
/// the one thread that opens captures. Replacing the value of an existing
/// variable makes glibc swap one pointer in `environ` and keep the old string
/// alive, so a `getenv` racing in another thread reads the old or the new
/// value, never freed memory; OpenCV reads the variable only when opening a
/// capture, which happens on the calling thread.
pub unsafe fn apply(source: &CameraSource, rtsp: RtspTransport, discard: Discard) {
    let options = source.ffmpeg_capture_options(rtsp)
        + &super::camera_tls::installed().ffmpeg_options(source)
        + "|avdiscard;"
        + discard.avdiscard();
    if std::env::var(OPTIONS_VAR).ok().as_deref() != Some(options.as_str()) {
        // SAFETY: the caller upholds the contract above.
        unsafe { std::env::set_var(OPTIONS_VAR, options) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RtspTransport::{Tcp, Udp};

    #[test]
    fn fixed_modes_try_one_transport() {
        assert_eq!(attempt_order(RtspTransportMode::Tcp, Some(Udp)), [Tcp]);
        assert_eq!(attempt_order(RtspTransportMode::Udp, None), [Udp]);
    }

    #[test]
    fn auto_tries_tcp_first_until_udp_is_what_works() {
        assert_eq!(attempt_order(RtspTransportMode::Auto, None), [Tcp, Udp]);
        assert_eq!(
            attempt_order(RtspTransportMode::Auto, Some(Tcp)),
            [Tcp, Udp]
        );
        assert_eq!(
            attempt_order(RtspTransportMode::Auto, Some(Udp)),
            [Udp, Tcp]
        );
        assert_eq!(initial(RtspTransportMode::Auto), Tcp);
        assert_eq!(initial(RtspTransportMode::Udp), Udp);
    }
}
