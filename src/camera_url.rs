//! Camera URLs are untrusted input. This module decides, without opening
//! anything, whether a string may be handed to the capture backend, and how to
//! show it without its credentials.
//!
//! Rules:
//! - network schemes are allow-listed: `rtsp`, `rtsps`, `http`, `https`;
//! - local files are `file:///abs/path` or `/abs/path`, must have a video
//!   extension and lie under the configured root (no `..`, no symlink escape);
//! - anything else — other schemes (`ftp:`, `concat:`, `subfile:`), relative
//!   paths, GStreamer pipeline descriptions, control characters — is refused.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use url::Url;

/// Longest camera URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Video file extensions accepted for local files.
pub const VIDEO_EXTENSIONS: &[&str] = &["mp4", "avi", "mkv", "mov", "m4v", "webm", "mjpeg"];

/// Network schemes accepted.
pub const NETWORK_SCHEMES: &[&str] = &["rtsp", "rtsps", "http", "https"];

/// A camera source that passed the policy.
#[derive(Clone, PartialEq, Eq)]
pub enum CameraSource {
    /// A live or remote stream.
    Network(Url),
    /// A local video file (absolute, under the configured root).
    File(PathBuf),
}

/// Why a camera URL was refused. Messages never contain credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CameraUrlError {
    #[error(
        "camera URL is empty; give rtsp://, rtsps://, http://, https://, file:///abs/path or /abs/path"
    )]
    Empty,
    #[error("camera URL is {len} characters long; at most {MAX_URL_LEN} are allowed")]
    TooLong { len: usize },
    #[error("camera URL {shown} contains whitespace or control characters; percent-encode them")]
    BadCharacters { shown: String },
    #[error(
        "camera URL {shown} is not a URL or an absolute path; give rtsp://, rtsps://, http://, https://, file:///abs/path or /abs/path"
    )]
    NotAUrl { shown: String },
    #[error(
        "camera URL scheme {scheme:?} is not allowed in {shown}; allowed are rtsp, rtsps, http, https and file"
    )]
    SchemeNotAllowed { scheme: String, shown: String },
    #[error("camera URL {shown} has no host; give scheme://host[:port]/path")]
    MissingHost { shown: String },
    #[error("file URL {shown} names a host; local files must be file:///abs/path")]
    FileHost { shown: String },
    #[error(
        "local file {path} is refused: set VIDEO_FILE_ROOT to a directory that contains it to allow local files"
    )]
    FilesDisabled { path: String },
    #[error(
        "local file {path} is outside VIDEO_FILE_ROOT={root}; move it under that directory or change VIDEO_FILE_ROOT"
    )]
    OutsideRoot { path: String, root: String },
    #[error(
        "local file {path} must not contain '..' or '.' components; give the plain absolute path"
    )]
    DotComponents { path: String },
    #[error("local file {path} does not look like a video; allowed extensions are {}", VIDEO_EXTENSIONS.join(", "))]
    NotAVideo { path: String },
    #[error("local file {path} does not exist or cannot be read: {reason}")]
    Unreadable { path: String, reason: String },
}

impl CameraUrlError {
    /// A short, fixed label for metrics and dead-letter headers.
    pub fn category(&self) -> &'static str {
        match self {
            CameraUrlError::Empty => "empty",
            CameraUrlError::TooLong { .. } => "too_long",
            CameraUrlError::BadCharacters { .. } => "bad_characters",
            CameraUrlError::NotAUrl { .. } => "not_a_url",
            CameraUrlError::SchemeNotAllowed { .. } => "scheme_not_allowed",
            CameraUrlError::MissingHost { .. } => "missing_host",
            CameraUrlError::FileHost { .. } => "file_host",
            CameraUrlError::FilesDisabled { .. } => "files_disabled",
            CameraUrlError::OutsideRoot { .. } => "outside_root",
            CameraUrlError::DotComponents { .. } => "dot_components",
            CameraUrlError::NotAVideo { .. } => "not_a_video",
            CameraUrlError::Unreadable { .. } => "unreadable",
        }
    }
}

impl CameraSource {
    /// Applies the policy to `raw` without touching the file system.
    pub fn parse(raw: &str, file_root: Option<&Path>) -> Result<CameraSource, CameraUrlError> {
        if raw.is_empty() {
            return Err(CameraUrlError::Empty);
        }
        if raw.len() > MAX_URL_LEN {
            return Err(CameraUrlError::TooLong { len: raw.len() });
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CameraUrlError::BadCharacters { shown: redact(raw) });
        }
        if raw.starts_with('/') {
            return check_file(PathBuf::from(raw), file_root);
        }
        let url = Url::parse(raw).map_err(|_| CameraUrlError::NotAUrl { shown: redact(raw) })?;
        match url.scheme() {
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(CameraUrlError::FileHost { shown: redact(raw) });
                }
                let path = url
                    .to_file_path()
                    .map_err(|_| CameraUrlError::NotAUrl { shown: redact(raw) })?;
                check_file(path, file_root)
            }
            scheme if NETWORK_SCHEMES.contains(&scheme) => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(CameraUrlError::MissingHost { shown: redact(raw) });
                }
                Ok(CameraSource::Network(url))
            }
            scheme => Err(CameraUrlError::SchemeNotAllowed {
                scheme: scheme.to_string(),
                shown: redact(raw),
            }),
        }
    }

    /// Resolves symbolic links of a local file and checks again that it lies
    /// under the root and can be read. Network sources pass through.
    pub fn resolve(self, file_root: Option<&Path>) -> Result<CameraSource, CameraUrlError> {
        let CameraSource::File(path) = self else {
            return Ok(self);
        };
        let unreadable = |e: std::io::Error| CameraUrlError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let real = path.canonicalize().map_err(unreadable)?;
        std::fs::File::open(&real).map_err(unreadable)?;
        if let Some(root) = file_root {
            let real_root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
            if !real.starts_with(&real_root) {
                return Err(CameraUrlError::OutsideRoot {
                    path: path.display().to_string(),
                    root: root.display().to_string(),
                });
            }
        }
        Ok(CameraSource::File(real))
    }

    /// True for sources that never end (live cameras); files and progressive
    /// downloads over HTTP end, but HTTP is treated as live because MJPEG and
    /// HLS live streams are the common case there.
    pub fn is_live(&self) -> bool {
        matches!(self, CameraSource::Network(_))
    }

    /// What the capture backend is given.
    pub fn backend_target(&self) -> String {
        match self {
            CameraSource::Network(url) => url.as_str().to_string(),
            CameraSource::File(path) => path.display().to_string(),
        }
    }

    /// FFmpeg protocols this source needs, and no others.
    pub fn ffmpeg_protocols(&self) -> &'static str {
        match self {
            CameraSource::File(_) => "file",
            CameraSource::Network(url) => match url.scheme() {
                "rtsp" => "rtsp,rtp,udp,tcp",
                "rtsps" => "rtsp,rtsps,rtp,udp,tcp,tls",
                "http" => "http,tcp,crypto",
                _ => "https,http,tcp,tls,crypto",
            },
        }
    }

    /// True for `rtsp://` and `rtsps://` sources.
    pub fn is_rtsp(&self) -> bool {
        matches!(self, CameraSource::Network(url) if url.scheme().starts_with("rtsp"))
    }

    /// The value for OpenCV's `OPENCV_FFMPEG_CAPTURE_OPTIONS`: FFmpeg protocols
    /// limited to this source, and for RTSP the given transport.
    pub fn ffmpeg_capture_options(&self, rtsp: RtspTransport) -> String {
        let mut options = format!("protocol_whitelist;{}", self.ffmpeg_protocols());
        if self.is_rtsp() {
            options.push_str("|rtsp_transport;");
            options.push_str(rtsp.as_str());
        }
        options
    }
}

/// How RTSP carries the media (FFmpeg's `rtsp_transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtspTransport {
    /// RTP interleaved in the RTSP TCP connection.
    Tcp,
    /// RTP over UDP.
    Udp,
}

impl RtspTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
        }
    }
}

impl fmt::Display for CameraSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CameraSource::Network(url) => f.write_str(&redact_url(url)),
            CameraSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl fmt::Debug for CameraSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CameraSource({self})")
    }
}

fn check_file(path: PathBuf, file_root: Option<&Path>) -> Result<CameraSource, CameraUrlError> {
    let shown = path.display().to_string();
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(CameraUrlError::DotComponents { path: shown });
    }
    let Some(root) = file_root else {
        return Err(CameraUrlError::FilesDisabled { path: shown });
    };
    if !path.starts_with(root) || path == root {
        return Err(CameraUrlError::OutsideRoot {
            path: shown,
            root: root.display().to_string(),
        });
    }
    let is_video = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    if !is_video {
        return Err(CameraUrlError::NotAVideo { path: shown });
    }
    Ok(CameraSource::File(path))
}

/// Query keys whose values are treated as secrets.
const SECRET_KEYS: &[&str] = &[
    "pass",
    "pwd",
    "token",
    "secret",
    "key",
    "auth",
    "sig",
    "signature",
    "credential",
];

/// A camera URL with user, password and secret-looking query values replaced
/// by `***`. Strings that are not URLs are shown up to their first `@` only
/// when they contain one.
pub fn redact(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(url) => redact_url(&url),
        Err(_) => match raw.rfind('@') {
            Some(at) => match raw.find("://") {
                Some(sep) if sep < at => format!("{}://***@{}", &raw[..sep], &raw[at + 1..]),
                _ => format!("***@{}", &raw[at + 1..]),
            },
            None => raw.to_string(),
        },
    }
}

fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        let _ = shown.set_username("***");
        let _ = shown.set_password(None);
    }
    if shown.query().is_some() {
        let pairs: Vec<(String, String)> = shown
            .query_pairs()
            .map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                let secret = SECRET_KEYS.iter().any(|s| lower.contains(s));
                (
                    k.into_owned(),
                    if secret { "***".into() } else { v.into_owned() },
                )
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Option<&'static Path> {
        Some(Path::new("/videos"))
    }

    #[test]
    fn network_schemes_are_allowed() {
        for raw in [
            "rtsp://cam.example.com/stream",
            "rtsps://cam.example.com:322/a",
            "http://127.0.0.1:8080/mjpeg",
            "https://example.com/live.m3u8",
        ] {
            let source = CameraSource::parse(raw, None).unwrap();
            assert!(source.is_live(), "{raw}");
        }
    }

    #[test]
    fn other_schemes_and_non_urls_are_refused() {
        let cases = [
            ("ftp://example.com/a.mp4", "scheme_not_allowed"),
            ("concat:/videos/a.mp4|/etc/passwd", "scheme_not_allowed"),
            (
                "subfile:,,start,0,end,0,,:/videos/a.mp4",
                "scheme_not_allowed",
            ),
            ("gopher://x/", "scheme_not_allowed"),
            ("data:video/mp4;base64,AAAA", "scheme_not_allowed"),
            ("videotestsrc ! videoconvert ! appsink", "bad_characters"),
            ("videotestsrc!appsink", "not_a_url"),
            ("relative/path.mp4", "not_a_url"),
            ("", "empty"),
            ("rtsp://", "missing_host"),
            ("rtsp://cam/a\nb", "bad_characters"),
        ];
        for (raw, category) in cases {
            let err = CameraSource::parse(raw, root()).unwrap_err();
            assert_eq!(err.category(), category, "{raw}: {err}");
        }
        let long = format!("rtsp://h/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(
            CameraSource::parse(&long, None).unwrap_err().category(),
            "too_long"
        );
    }

    #[test]
    fn local_files_only_under_the_root() {
        assert_eq!(
            CameraSource::parse("/videos/cam1/a.mp4", root()).unwrap(),
            CameraSource::File("/videos/cam1/a.mp4".into())
        );
        assert_eq!(
            CameraSource::parse("file:///videos/a.AVI", root()).unwrap(),
            CameraSource::File("/videos/a.AVI".into())
        );
        let cases = [
            ("/etc/passwd.mp4", "outside_root"),
            ("/videos-other/a.mp4", "outside_root"),
            ("/videos/../etc/a.mp4", "dot_components"),
            ("/videos/a.txt", "not_a_video"),
            ("file://host/videos/a.mp4", "file_host"),
        ];
        for (raw, category) in cases {
            let err = CameraSource::parse(raw, root()).unwrap_err();
            assert_eq!(err.category(), category, "{raw}: {err}");
        }
        let err = CameraSource::parse("/videos/a.mp4", None).unwrap_err();
        assert_eq!(err.category(), "files_disabled");
        assert!(err.to_string().contains("VIDEO_FILE_ROOT"));
    }

    #[test]
    fn errors_name_the_value_and_the_rule() {
        let err = CameraSource::parse("ftp://example.com/a.mp4", None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("ftp://example.com/a.mp4") && text.contains("allowed are"),
            "{text}"
        );
    }

    #[test]
    fn credentials_never_show() {
        let raw = "rtsp://admin:hunter2@cam.example.com:554/live?token=abc&channel=1";
        let source = CameraSource::parse(raw, None).unwrap();
        let shown = source.to_string();
        assert!(!shown.contains("hunter2") && !shown.contains("admin") && !shown.contains("abc"));
        assert!(
            shown.contains("cam.example.com") && shown.contains("channel=1"),
            "{shown}"
        );
        // The backend still gets the real URL.
        assert!(source.backend_target().contains("hunter2"));

        let err =
            CameraSource::parse("ftp://bob:s3cret@files.example.com/a.mp4", None).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = CameraSource::parse("weird://bob:s3cret@h/a b", None).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn ffmpeg_protocols_follow_the_scheme() {
        let file = CameraSource::parse("/videos/a.mp4", root()).unwrap();
        assert_eq!(
            file.ffmpeg_capture_options(RtspTransport::Tcp),
            "protocol_whitelist;file"
        );
        let rtsp = CameraSource::parse("rtsp://cam/a", None).unwrap();
        assert_eq!(
            rtsp.ffmpeg_capture_options(RtspTransport::Tcp),
            "protocol_whitelist;rtsp,rtp,udp,tcp|rtsp_transport;tcp"
        );
        assert_eq!(
            rtsp.ffmpeg_capture_options(RtspTransport::Udp),
            "protocol_whitelist;rtsp,rtp,udp,tcp|rtsp_transport;udp"
        );
        let http = CameraSource::parse("http://cam/a", None).unwrap();
        assert!(!http.ffmpeg_protocols().contains("file"));
    }
}
