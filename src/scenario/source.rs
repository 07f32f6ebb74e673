//! Whether a scenario's source ends on its own (a file or a clip) or runs for
//! ever (a live camera). A worker of a finite source that exits 0 is done; a
//! live camera's worker that exits 0 is restarted.

use crate::camera_url::VIDEO_EXTENSIONS;

/// Extensions that name a live stream when served over HTTP: an IP camera's
/// MJPEG stream, not a clip that ends.
const LIVE_OVER_HTTP: &[&str] = &["mjpeg", "mjpg"];

/// True for a local file (`/abs/path`, `file://…`) or an HTTP(S) URL whose
/// path ends in a video file extension (a clip); false for live streams
/// (`rtsp://`, `rtsps://`, `….mjpeg`/`….mjpg` over HTTP, any other HTTP URL). Works on redacted URLs too:
/// only the scheme and the path are read.
pub fn is_finite(camera_url: &str) -> bool {
    if camera_url.starts_with('/') {
        return true;
    }
    let Ok(url) = url::Url::parse(camera_url) else {
        return false;
    };
    match url.scheme() {
        "file" => true,
        "http" | "https" => url
            .path()
            .rsplit_once('.')
            .map(|(_, ext)| ext.to_ascii_lowercase())
            .is_some_and(|ext| {
                VIDEO_EXTENSIONS.contains(&ext.as_str()) && !LIVE_OVER_HTTP.contains(&ext.as_str())
            }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_clips_end_live_streams_do_not() {
        let cases = [
            ("/media/vtest.avi", true),
            ("file:///media/clip.mp4", true),
            ("http://clips.example/a/b/clip.MP4", true),
            ("https://user:pw@clips.example/clip.mkv?token=1", true),
            ("http://cam.example/mjpeg", false),
            ("http://cam.example/video.mjpeg", false),
            ("http://cam.example/live.MJPG", false),
            ("/media/recording.mjpeg", true),
            ("http://cam.example/video.cgi", false),
            ("rtsp://cam.example/stream.mp4", false),
            ("rtsps://cam.example/live", false),
            ("not a url", false),
        ];
        for (url, finite) in cases {
            assert_eq!(is_finite(url), finite, "{url}");
        }
    }
}
