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

use crate::host_policy::{self, HostPolicy, HostRefusal};

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
    /// Only for a scheme that may be shown (see [`redact`]).
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
    #[error(
        "camera URL {shown} is refused by the camera host policy: {reason}; see CAMERA_ALLOW_CIDRS / CAMERA_DENY_CIDRS"
    )]
    HostRefused { shown: String, reason: HostRefusal },
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
            CameraUrlError::HostRefused { .. } => "host_refused",
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
                // `http:/x`, `http:\\x` and the like parse differently in
                // different URL parsers; only the plain form is accepted.
                if !has_authority_form(raw, scheme) {
                    return Err(CameraUrlError::NotAUrl { shown: redact(raw) });
                }
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(CameraUrlError::MissingHost { shown: redact(raw) });
                }
                Ok(CameraSource::Network(url))
            }
            // `admin:pw@cam` parses with the scheme `admin`: a user name
            // where the scheme should be. Only a scheme that is one is named.
            _ => match shown_scheme(raw) {
                Some(scheme) => Err(CameraUrlError::SchemeNotAllowed {
                    scheme,
                    shown: redact(raw),
                }),
                None => Err(CameraUrlError::NotAUrl { shown: redact(raw) }),
            },
        }
    }

    /// Resolves symbolic links of a local file and checks again that it lies
    /// under the root and can be read. Network sources pass through.
    pub fn resolve(self, file_root: Option<&Path>) -> Result<CameraSource, CameraUrlError> {
        let CameraSource::File(path) = self else {
            return Ok(self);
        };
        let unreadable = |e: std::io::Error| CameraUrlError::Unreadable {
            path: redact(&path.display().to_string()),
            reason: e.to_string(),
        };
        let real = path.canonicalize().map_err(unreadable)?;
        std::fs::File::open(&real).map_err(unreadable)?;
        if let Some(root) = file_root {
            let real_root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
            if !real.starts_with(&real_root) {
                return Err(CameraUrlError::OutsideRoot {
                    path: redact(&path.display().to_string()),
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

    /// Applies the camera host policy to a network source after resolving
    /// its name here (blocking). A name that does not resolve passes: opening
    /// it fails anyway, and [`CameraSource::recheck_host`] runs before every
    /// open.
    pub fn check_host(&self, policy: &HostPolicy) -> Result<(), CameraUrlError> {
        let CameraSource::Network(url) = self else {
            return Ok(());
        };
        match policy.check_url_resolving(url) {
            Err(reason) if !reason.is_transient() => Err(CameraUrlError::HostRefused {
                shown: self.to_string(),
                reason,
            }),
            _ => Ok(()),
        }
    }

    /// The same check at ingest, with the asynchronous resolver and a bound
    /// on how long resolving may take.
    pub async fn check_host_at_ingest(
        &self,
        policy: &HostPolicy,
        timeout: std::time::Duration,
    ) -> Result<(), CameraUrlError> {
        let CameraSource::Network(url) = self else {
            return Ok(());
        };
        host_policy::check_url_at_ingest(policy, url, timeout)
            .await
            .map_err(|reason| CameraUrlError::HostRefused {
                shown: self.to_string(),
                reason,
            })
    }

    /// Checks the host again right before the capture backend opens it
    /// (with the policy the worker installed): the name may resolve to
    /// something else now. The error names the host and the rule.
    pub fn recheck_host(&self) -> Result<(), String> {
        match self {
            CameraSource::Network(url) => host_policy::recheck(url),
            CameraSource::File(_) => Ok(()),
        }
    }

    /// `text` (an error of the capture backend, a line FFmpeg logged) with
    /// this source's URL replaced by its redacted form, every other URL in it
    /// redacted ([`redact_urls`]: segment and key URLs FFmpeg resolved against
    /// the camera's carry its credentials, others may carry their own), and
    /// this source's user name, password and query — as given or
    /// percent-decoded — replaced by `***`.
    ///
    /// A user name or password shorter than [`MIN_LOOSE_SECRET`] characters
    /// is replaced only where it stands as user info (`user:pw@`): replacing
    /// `pw` or `1` wherever it occurs would garble every other word and
    /// number of the line and, by where the `***` fall, show the secret.
    pub fn scrub(&self, text: &str) -> String {
        let url = match self {
            CameraSource::Network(url) => url,
            CameraSource::File(path) => {
                let path = path.display().to_string();
                return redact_urls(&text.replace(&path, &redact(&path)));
            }
        };
        let mut scrubbed = redact_urls(&text.replace(url.as_str(), &self.to_string()));
        let decode = |s: &str| String::from_utf8_lossy(&percent_decode(s)).into_owned();
        let (user, password) = (url.username(), url.password());
        let mut secrets = Vec::new();
        for (user, password) in [
            (user.to_string(), password.map(str::to_string)),
            (decode(user), password.map(decode)),
        ] {
            match &password {
                Some(password) if !(user.is_empty() && password.is_empty()) => {
                    secrets.push(format!("{user}:{password}@"))
                }
                Some(_) => {}
                None if !user.is_empty() => secrets.push(format!("//{user}@")),
                None => {}
            }
            secrets.push(user);
            secrets.extend(password);
        }
        if let Some(query) = url.query() {
            secrets.push(query.to_string());
        }
        secrets.retain(|s| s.len() >= MIN_LOOSE_SECRET || s.ends_with('@'));
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in secrets {
            let masked = match secret.strip_prefix("//") {
                Some(_) => "//***@",
                None if secret.ends_with('@') => "***@",
                None => "***",
            };
            scrubbed = scrubbed.replace(&secret, masked);
        }
        scrubbed
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

    /// Where the source is, as errors may show it: `host:port` of a network
    /// camera (its own port or its scheme's), the redacted path of a file.
    pub fn endpoint(&self) -> String {
        match self {
            CameraSource::Network(url) => {
                let host = url.host().map(|h| h.to_string()).unwrap_or_default();
                match host_policy::url_port(url) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            }
            CameraSource::File(_) => self.to_string(),
        }
    }

    /// Why the source did not open, in the words status and logs show. A
    /// camera refusing the connection, one that never answers, one that
    /// resets it and one that sends something other than video all read the
    /// same, so the runner cannot be used to scan a network's ports; the
    /// backend's own `detail` is added only with `CAMERA_ERROR_DETAIL=true`
    /// (`show_detail`).
    pub fn not_opened(&self, detail: &str, show_detail: bool) -> String {
        let words = match self {
            CameraSource::Network(_) => {
                format!("camera unreachable or not a video at {}", self.endpoint())
            }
            CameraSource::File(_) => format!("{self} cannot be read as a video"),
        };
        if show_detail && !detail.is_empty() {
            format!("{words} ({})", self.scrub(detail))
        } else {
            words
        }
    }

    /// The value for OpenCV's `OPENCV_FFMPEG_CAPTURE_OPTIONS`: FFmpeg protocols
    /// limited to this source, no HTTP redirects (a redirect could lead to a
    /// host the camera host policy refuses; FFmpeg 5.1's `max_redirects`),
    /// and for RTSP the given transport.
    pub fn ffmpeg_capture_options(&self, rtsp: RtspTransport) -> String {
        let mut options = format!("protocol_whitelist;{}", self.ffmpeg_protocols());
        if let CameraSource::Network(url) = self
            && url.scheme().starts_with("http")
        {
            options.push_str("|max_redirects;0");
        }
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
            CameraSource::Network(url) => f.write_str(&redact(url.as_str())),
            CameraSource::File(path) => f.write_str(&redact(&path.display().to_string())),
        }
    }
}

impl fmt::Debug for CameraSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CameraSource({self})")
    }
}

fn check_file(path: PathBuf, file_root: Option<&Path>) -> Result<CameraSource, CameraUrlError> {
    let shown = redact(&path.display().to_string());
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

/// A raw camera URL in a `Debug` form: redacted, for the `Debug` of types
/// that hold one.
pub struct Redacted<'a>(pub &'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.0))
    }
}

/// Shortest user name or password [`CameraSource::scrub`] replaces wherever
/// it occurs; shorter ones only where they stand as user info.
pub const MIN_LOOSE_SECRET: usize = 3;

/// Schemes shown in a URL that is not spelled `scheme://`: the camera
/// schemes and the FFmpeg protocols one could try. Any other word before the
/// first `:` may be a user name (`admin:pw@cam`) and is not shown.
const KNOWN_SCHEMES: &[&str] = &[
    "rtsp",
    "rtsps",
    "http",
    "https",
    "file",
    "ftp",
    "sftp",
    "gopher",
    "gophers",
    "data",
    "concat",
    "concatf",
    "subfile",
    "crypto",
    "pipe",
    "fd",
    "tcp",
    "udp",
    "udplite",
    "tls",
    "rtp",
    "srtp",
    "hls",
    "cache",
    "async",
    "tee",
    "unix",
    "rtmp",
    "rtmps",
    "rtmpt",
    "mmsh",
    "mmst",
    "srt",
    "rist",
    "smb",
    "sctp",
    "ipfs",
    "ipns",
    "md5",
    "ws",
    "wss",
    "javascript",
];

/// What a camera URL that cannot be shown safely becomes.
pub const UNPARSEABLE: &str = "<unparseable>";

/// Query parameters whose values are shown; every other value is `***`.
/// Only parameters that select a stream, never ones that authenticate.
const VISIBLE_QUERY_KEYS: &[&str] = &[
    "channel",
    "subtype",
    "stream",
    "streamtype",
    "unicast",
    "proto",
    "profile",
    "resolution",
    "fps",
    "codec",
    "camera",
    "cam",
    "track",
    "trackid",
    "transport",
    "format",
    "audio",
    "video",
    "mode",
    "quality",
    "width",
    "height",
    "bitrate",
];

/// The one way a camera URL is shown — in logs, errors, dead-letter headers,
/// Scenario specs and status. It keeps only what cannot carry a secret:
///
/// - the scheme, and the host and port when the string is a well-formed
///   `scheme://[userinfo@]host[:port]/path` URL (any userinfo becomes `***@`);
/// - path segments made only of unreserved characters (`A-Z a-z 0-9 - . _ ~`),
///   other segments become `***` (so `/user=admin&password=x` never shows);
/// - query parameter names; values only for stream selectors such as
///   `channel` or `subtype`, all other values (and bare entries) become `***`;
/// - a fragment becomes `#***`.
///
/// Anything else — a string that is not a URL, a URL without `//` or host
/// (`rtsp:/admin:secret@cam`, `rtsp:admin:secret@cam`), backslashes, odd
/// host characters — is shown as `scheme:<unparseable>` or `<unparseable>`.
/// Absolute local paths are shown segment by segment as above.
pub fn redact(raw: &str) -> String {
    if raw.starts_with('/') {
        return redact_path(raw);
    }
    let Some(scheme) = shown_scheme(raw) else {
        return UNPARSEABLE.to_string();
    };
    let unparseable = || format!("{scheme}:{UNPARSEABLE}");
    if !has_authority_form(raw, &scheme) {
        return unparseable();
    }
    let Ok(url) = Url::parse(raw) else {
        return unparseable();
    };
    if url.scheme() == "file" {
        return match url.host_str() {
            None | Some("") | Some("localhost") => format!("file://{}", redact_path(url.path())),
            Some(_) => unparseable(),
        };
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return unparseable();
    };
    let mut shown = format!("{scheme}://");
    if !url.username().is_empty() || url.password().is_some() {
        shown.push_str("***@");
    }
    if host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._:[]".contains(c))
    {
        shown.push_str(host);
    } else {
        shown.push_str("***");
    }
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(&redact_path(url.path()));
    if let Some(query) = url.query() {
        shown.push('?');
        shown.push_str(&redact_query(query));
    }
    if url.fragment().is_some() {
        shown.push_str("#***");
    }
    shown
}

/// The lower-cased scheme of `raw` when it starts with one (`rtsp:`).
fn scheme_of(raw: &str) -> Option<String> {
    let (scheme, _) = raw.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && scheme.len() <= 16;
    valid.then(|| scheme.to_ascii_lowercase())
}

/// The scheme of `raw` when it may be shown: spelled `scheme://`, or one of
/// [`KNOWN_SCHEMES`].
fn shown_scheme(raw: &str) -> Option<String> {
    let scheme = scheme_of(raw)?;
    let spelled_as_scheme = raw
        .get(scheme.len()..)
        .is_some_and(|rest| rest.starts_with("://"));
    (spelled_as_scheme || KNOWN_SCHEMES.contains(&scheme.as_str())).then_some(scheme)
}

/// `text` with every URL in it — `scheme://` up to a space, a quote, `<`,
/// `>` or a backslash, without trailing punctuation — replaced by its
/// redacted form ([`redact`]). For text that may quote URLs the runner did
/// not give (FFmpeg's log lines name the segments and keys of a playlist).
pub fn redact_urls(text: &str) -> String {
    let is_scheme_char = |c: char| c.is_ascii_alphanumeric() || "+-.".contains(c);
    let ends_token = |c: char| c.is_whitespace() || c.is_control() || "'\"`<>\\".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = rest[..at]
            .char_indices()
            .rev()
            .find(|(_, c)| !is_scheme_char(*c))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let after = at + 3;
        if start == at {
            // `://` without a scheme before it.
            out.push_str(&rest[..after]);
            rest = &rest[after..];
            continue;
        }
        let end = rest[after..]
            .find(ends_token)
            .map_or(rest.len(), |i| after + i);
        let token = rest[start..end].trim_end_matches(|c: char| ".,;:!?)]}".contains(c));
        let end = start + token.len();
        out.push_str(&rest[..start]);
        out.push_str(&redact(token));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// True when `raw` is spelled `scheme://…` with nothing that parsers read
/// differently (backslashes, whitespace, control characters).
fn has_authority_form(raw: &str, scheme: &str) -> bool {
    raw.get(scheme.len()..scheme.len() + 3) == Some("://")
        && !raw
            .chars()
            .any(|c| c == '\\' || c.is_whitespace() || c.is_control())
}

/// `%XX` sequences turned into their bytes; everything else kept.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn is_unreserved(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
}

fn redact_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if is_unreserved(segment) {
                segment
            } else {
                "***"
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if is_unreserved(key) && !key.is_empty() && key.len() <= 32 => {
                let visible = VISIBLE_QUERY_KEYS.contains(&key.to_ascii_lowercase().as_str())
                    && value.len() <= 32
                    && is_unreserved(value);
                format!("{key}={}", if visible { value } else { "***" })
            }
            _ if pair.is_empty() => String::new(),
            _ => "***".to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
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
        // MAX_URL_LEN characters are accepted, one more is not.
        let longest = format!("rtsp://h/{}", "a".repeat(MAX_URL_LEN - "rtsp://h/".len()));
        assert!(CameraSource::parse(&longest, None).is_ok());
        let long = format!("{longest}a");
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
        // `localhost` names this machine: the same as no host.
        let local = CameraSource::parse("file://localhost/videos/a.mp4", root()).unwrap();
        assert_eq!(local, CameraSource::File("/videos/a.mp4".into()));
        assert!(!local.is_live(), "a file ends");
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

    /// Credential-bearing spellings (tests/fixtures/credential-urls.json):
    /// none of their secrets may show in what the runner prints (the
    /// redacted form, a refusal, a scrubbed backend message).
    fn credential_spellings() -> (String, Vec<String>) {
        let table: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/credential-urls.json")).unwrap();
        let urls = table["urls"].as_array().unwrap();
        (
            table["secret"].as_str().unwrap().to_string(),
            urls.iter()
                .map(|u| u.as_str().unwrap().to_string())
                .collect(),
        )
    }

    #[test]
    fn no_credential_spelling_leaks() {
        let (secret, spellings) = credential_spellings();
        assert!(spellings.len() >= 30);
        let policy = HostPolicy::defaults(host_policy::Mode::Kubernetes);
        for raw in &spellings {
            let shown = redact(raw);
            assert!(!shown.contains(secret.as_str()), "{raw} shown as {shown}");
            match CameraSource::parse(raw, root()) {
                Err(err) => assert!(!err.to_string().contains(secret.as_str()), "{raw}: {err}"),
                Ok(source) => {
                    let text = source.to_string();
                    assert!(!text.contains(secret.as_str()), "{raw} displayed as {text}");
                    let backend = format!("could not open {}: 401", source.backend_target());
                    let scrubbed = source.scrub(&backend);
                    assert!(!scrubbed.contains(secret.as_str()), "{raw}: {scrubbed}");
                    if let CameraSource::Network(url) = &source
                        && let Err(reason) = policy.check(url.host_str().unwrap_or_default(), &[])
                    {
                        let shown = source.to_string();
                        let err = CameraUrlError::HostRefused { shown, reason };
                        assert!(!err.to_string().contains(secret.as_str()), "{raw}: {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn redaction_keeps_what_is_safe_to_show() {
        let cases = [
            (
                "rtsp://admin:pw@cam.example.com:554/Streaming/Channels/101",
                "rtsp://***@cam.example.com:554/Streaming/Channels/101",
            ),
            (
                "rtsp://cam/live?channel=1&subtype=0&token=abc",
                "rtsp://cam/live?channel=1&subtype=0&token=***",
            ),
            ("https://cam/a.m3u8#frag", "https://cam/a.m3u8#***"),
            ("rtsp://[fd00::5]:8554/a", "rtsp://[fd00::5]:8554/a"),
            (
                "rtsp://cam:554/user=admin&password=x&channel=1",
                "rtsp://cam:554/***",
            ),
            ("rtsp:/admin:pw@cam", "rtsp:<unparseable>"),
            ("rtsp:admin:pw@cam", "rtsp:<unparseable>"),
            // A user name where the scheme should be is not shown as one.
            ("admin:pw@cam", "<unparseable>"),
            ("admin:pw@cam.example.com:554/live", "<unparseable>"),
            ("concat:/videos/a.mp4|/etc/passwd", "concat:<unparseable>"),
            ("http:/admin:pw@cam", "http:<unparseable>"),
            ("videotestsrc ! appsink", "<unparseable>"),
            // Any userinfo is marked, a user name or a password alone too.
            ("rtsp://admin@cam/a", "rtsp://***@cam/a"),
            ("rtsp://:pw@cam/a", "rtsp://***@cam/a"),
            // Names are shown only when plain; bare entries are hidden,
            // empty ones kept.
            (
                "rtsp://cam/a?channel=1&&token&a:b=1&=x",
                "rtsp://cam/a?channel=1&&***&***&***",
            ),
            // Characters URL parsers read differently.
            ("rtsp://admin:pw@cam/a\\b", "rtsp:<unparseable>"),
            ("rtsp://admin:pw@cam/a b", "rtsp:<unparseable>"),
            ("rtsp://admin:pw@cam/a\u{7f}b", "rtsp:<unparseable>"),
            // Only a well-formed scheme is shown.
            ("1rtsp://admin:pw@cam/a", "<unparseable>"),
            ("rt$p://admin:pw@cam/a", "<unparseable>"),
            ("/videos/cam1/a.mp4", "/videos/cam1/a.mp4"),
            ("file:///videos/a.mp4", "file:///videos/a.mp4"),
            ("ftp://example.com/a.mp4", "ftp://example.com/a.mp4"),
        ];
        for (raw, shown) in cases {
            assert_eq!(redact(raw), shown, "{raw}");
        }
    }

    #[test]
    fn network_urls_must_be_spelled_plainly() {
        for raw in [
            "http:/cam/a",
            "http:cam/a",
            "http:\\\\cam\\a",
            "rtsp:/cam/a",
        ] {
            let err = CameraSource::parse(raw, None).unwrap_err();
            assert!(
                matches!(err.category(), "not_a_url" | "missing_host"),
                "{raw}: {err}"
            );
        }
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
        let rtsps = CameraSource::parse("rtsps://cam/a", None).unwrap();
        let protocols: Vec<&str> = rtsps.ffmpeg_protocols().split(',').collect();
        assert!(
            protocols.contains(&"rtsps") && protocols.contains(&"tls"),
            "{protocols:?}"
        );
        assert!(
            !protocols.iter().any(|p| p.starts_with("http")),
            "{protocols:?}"
        );
        let http = CameraSource::parse("http://cam/a", None).unwrap();
        assert!(!http.ffmpeg_protocols().contains("file"));
        assert_eq!(
            http.ffmpeg_capture_options(RtspTransport::Tcp),
            "protocol_whitelist;http,tcp,crypto|max_redirects;0"
        );
    }

    #[test]
    fn scrub_hides_the_credentials_and_keeps_the_rest() {
        let source =
            CameraSource::parse("rtsp://admin:hunter%32@cam.example/live?token=abc123", None)
                .unwrap();
        let text = format!(
            "could not open {}: 401 for admin with hunter2 (hunter%32), token=abc123",
            source.backend_target()
        );
        let scrubbed = source.scrub(&text);
        assert!(
            scrubbed.starts_with(&format!("could not open {source}: 401 for ")),
            "{scrubbed}"
        );
        for secret in ["admin", "hunter", "abc123"] {
            assert!(!scrubbed.contains(secret), "{secret} in {scrubbed}");
        }
        let file = CameraSource::File("/videos/pw=x/a.mp4".into());
        assert_eq!(
            file.scrub("cannot read /videos/pw=x/a.mp4: denied"),
            "cannot read /videos/***/a.mp4: denied"
        );
    }

    #[test]
    fn a_user_name_in_the_scheme_place_is_never_shown() {
        for raw in [
            "admin:pw@cam",
            "admin:S3cretPw@cam.example.com:554/live",
            "operator7:x@10.0.0.5",
        ] {
            let err = CameraSource::parse(raw, root()).unwrap_err();
            let text = err.to_string();
            let user = raw.split(':').next().unwrap();
            assert_eq!(err.category(), "not_a_url", "{raw}: {text}");
            assert!(
                !text.contains(user) && text.contains("give rtsp://"),
                "{raw}: {text}"
            );
        }
        // A scheme that is one is still named.
        let err = CameraSource::parse("concat:/videos/a.mp4|/etc/passwd", root()).unwrap_err();
        assert_eq!(err.category(), "scheme_not_allowed");
        assert!(err.to_string().contains("concat:"), "{err}");
    }

    #[test]
    fn short_credentials_are_scrubbed_where_they_stand_as_user_info() {
        let source = CameraSource::parse("http://u:1@cam.example/live/index.m3u8", None).unwrap();
        let line = "[hls @ 0x55d1] segment 1 of playlist 1: Error when loading first segment \
                    'http://u:1@cam.example/live/seg1.ts' (u:1@cam.example)";
        assert_eq!(
            source.scrub(line),
            "[hls @ 0x55d1] segment 1 of playlist 1: Error when loading first segment \
             'http://***@cam.example/live/seg1.ts' (***@cam.example)"
        );
        let source = CameraSource::parse("rtsp://pw@cam.example/a", None).unwrap();
        assert_eq!(
            source.scrub("pwned: rtsp://pw@cam.example/b failed (//pw@cam.example)"),
            "pwned: rtsp://***@cam.example/b failed (//***@cam.example)"
        );
    }

    #[test]
    fn every_url_in_a_line_is_redacted() {
        let cases = [
            (
                "[hls @ 0x5581] Unable to open key file http://k:Key0Pw@keys.example/k.bin",
                "[hls @ 0x5581] Unable to open key file http://***@keys.example/k.bin",
            ),
            (
                "Error when loading first segment 'https://cdn.example/s/seg0.ts?sig=Abc123'",
                "Error when loading first segment 'https://cdn.example/s/seg0.ts?sig=***'",
            ),
            (
                "Connection to tcp://10.0.0.5:554?timeout=0: refused.",
                "Connection to tcp://10.0.0.5:554?timeout=***: refused.",
            ),
            ("(rtsp://a:b@cam/x), then", "(rtsp://***@cam/x), then"),
            ("no host: a://, ://x", "no host: a:<unparseable>, ://x"),
            ("ünïcödé ✓ http://u:p@h/ä", "ünïcödé ✓ http://***@h/***"),
        ];
        for (line, want) in cases {
            assert_eq!(redact_urls(line), want, "{line}");
        }
        let plain = "[mjpeg @ 0x55d1] error count: 64, 100% done";
        assert_eq!(redact_urls(plain), plain);
    }

    #[test]
    fn debug_shows_the_redacted_url() {
        let source = CameraSource::parse("rtsp://admin:hunter2@cam.example/live", None).unwrap();
        assert_eq!(
            format!("{source:?}"),
            "CameraSource(rtsp://***@cam.example/live)"
        );
    }

    /// A real file root with a clip in it, a clip outside it, and links
    /// from inside the root to both.
    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("videos");
        let outside = base.join("private");
        for d in [root.join("cam1"), outside.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(root.join("cam1/a.mp4"), b"clip").unwrap();
        std::fs::write(outside.join("b.mp4"), b"secret").unwrap();
        std::os::unix::fs::symlink(outside.join("b.mp4"), root.join("escape.mp4")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("shared")).unwrap();
        std::os::unix::fs::symlink(root.join("cam1/a.mp4"), root.join("alias.mp4")).unwrap();
        Tree {
            _dir: dir,
            root,
            outside,
        }
    }

    fn open(raw: &str, root: &Path) -> Result<CameraSource, CameraUrlError> {
        CameraSource::parse(raw, Some(root))?.resolve(Some(root))
    }

    #[test]
    fn a_file_under_the_root_resolves_to_its_real_path() {
        let t = tree();
        let clip = t.root.join("cam1/a.mp4");
        let want = CameraSource::File(clip.clone());
        assert_eq!(open(&clip.display().to_string(), &t.root), Ok(want.clone()));
        assert_eq!(
            open(&format!("file://{}", clip.display()), &t.root),
            Ok(want.clone())
        );
        // A link that stays under the root is followed.
        let alias = t.root.join("alias.mp4").display().to_string();
        assert_eq!(open(&alias, &t.root), Ok(want.clone()));
        // A root given through a link holds the files of the directory it names.
        let linked_root = t.outside.join("videos-link");
        std::os::unix::fs::symlink(&t.root, &linked_root).unwrap();
        let via_link = linked_root.join("cam1/a.mp4").display().to_string();
        assert_eq!(open(&via_link, &linked_root), Ok(want));
    }

    #[test]
    fn links_out_of_the_root_are_refused() {
        let t = tree();
        for inside in ["escape.mp4", "shared/b.mp4"] {
            let raw = t.root.join(inside).display().to_string();
            // The spelling is under the root; only resolving shows where it leads.
            assert!(CameraSource::parse(&raw, Some(&t.root)).is_ok(), "{raw}");
            let err = open(&raw, &t.root).unwrap_err();
            assert_eq!(err.category(), "outside_root", "{raw}: {err}");
        }
    }

    #[test]
    fn dot_dot_never_leaves_the_root() {
        let t = tree();
        let root = t.root.display();
        // The file exists: the refusal is about the spelling, not the file.
        let raw = format!("{root}/cam1/../../private/b.mp4");
        let err = open(&raw, &t.root).unwrap_err();
        assert_eq!(err.category(), "dot_components", "{err}");
        // A file URL's `..` is folded by URL parsing; what is left is checked.
        let err = open(&format!("file://{root}/../private/b.mp4"), &t.root).unwrap_err();
        assert_eq!(err.category(), "outside_root", "{err}");
    }

    #[test]
    fn missing_files_and_the_root_itself_are_refused() {
        let t = tree();
        let missing = t.root.join("cam1/none.mp4").display().to_string();
        assert_eq!(
            open(&missing, &t.root).unwrap_err().category(),
            "unreadable"
        );
        let root = t.root.display().to_string();
        assert_eq!(open(&root, &t.root).unwrap_err().category(), "outside_root");
    }

    #[test]
    fn network_sources_resolve_to_themselves() {
        let source = CameraSource::parse("rtsp://cam.example/live", None).unwrap();
        assert_eq!(source.clone().resolve(None), Ok(source));
    }

    #[test]
    fn a_camera_that_did_not_open_reads_the_same_whatever_the_cause() {
        let cam = CameraSource::parse("rtsp://admin:pw@10.1.2.3/live", None).unwrap();
        let causes = [
            "Connection refused",
            "Connection timed out",
            "Connection reset by peer",
            "Invalid data found when processing input",
            "",
        ];
        let words: std::collections::BTreeSet<String> =
            causes.iter().map(|c| cam.not_opened(c, false)).collect();
        assert_eq!(
            words.into_iter().collect::<Vec<_>>(),
            vec!["camera unreachable or not a video at 10.1.2.3:554".to_string()]
        );
        // With CAMERA_ERROR_DETAIL the cause follows, scrubbed.
        assert_eq!(
            cam.not_opened("rtsp://admin:pw@10.1.2.3/live: Connection refused", true),
            "camera unreachable or not a video at 10.1.2.3:554 (rtsp://***@10.1.2.3/live: Connection refused)"
        );
        for (raw, endpoint) in [
            ("https://cam.example/a.mp4", "cam.example:443"),
            ("http://cam.example:8080/a", "cam.example:8080"),
            ("rtsps://[fd00::9]/a", "[fd00::9]:322"),
        ] {
            let source = CameraSource::parse(raw, None).unwrap();
            assert_eq!(source.endpoint(), endpoint);
            assert!(source.not_opened("refused", false).ends_with(endpoint));
        }
    }
}
