//! Properties of the parsers of untrusted input. The fuzz targets check them
//! on every generated input and `tests/it/fuzz_corpus.rs` on the stored corpus;
//! each function panics when a property does not hold.
//!
//! - Nothing panics.
//! - A secret (user name, password, fragment, a credential-looking query
//!   value) never shows in the redacted URL, in a refusal or in the Display
//!   of an accepted source. To avoid confusing a secret with a word of an
//!   error message, the check plants a marker in the secret's place first.
//! - What the redaction cannot parse shows as `<unparseable>` only.
//! - For an accepted network URL, FFmpeg's URL splitting finds the same host
//!   as the one the host policy checks, and a host literal FFmpeg would
//!   connect to is one the policy accepts.
//! - A line FFmpeg could log about a camera — quoting its URL, a segment or
//!   key URL resolved against it, its bare user info, or a URL with other
//!   credentials — never shows a secret once scrubbed; a line that has no
//!   URL and none of the camera's secrets comes out unchanged.

use std::net::IpAddr;
use std::path::Path;

use url::Url;

use crate::camera_url::{CameraSource, UNPARSEABLE, redact, redact_urls};
use crate::host_policy::{HostPolicy, Mode};
use crate::messages::{DeployRequest, UndeployRequest};

const ROOT: &str = "/videos";
const MARKER: &str = "Qz7SecretMarker";
const SECRET_KEYS: &[&str] = &[
    "pass", "pwd", "token", "key", "auth", "sig", "jwt", "session", "secret",
];

/// Camera URL validation, redaction and the host policy on one string.
pub fn camera_url(raw: &str) {
    let shown = redact(raw);
    if !raw.starts_with('/') && Url::parse(raw).is_err() {
        assert!(
            shown == UNPARSEABLE || shown.ends_with(&format!(":{UNPARSEABLE}")),
            "redact({raw:?}) = {shown:?}, but an unparseable URL shows as <unparseable> only"
        );
    }
    let marked = with_marker(raw);
    for candidate in [Some(raw.to_string()), marked.clone()]
        .into_iter()
        .flatten()
    {
        check_source(&candidate, marked.as_deref() == Some(candidate.as_str()));
    }
}

fn check_source(raw: &str, marked: bool) {
    let leaks = |text: &str| marked && text.contains(MARKER);
    let shown = redact(raw);
    assert!(!leaks(&shown), "redact({raw:?}) = {shown:?} shows a secret");
    let source = match CameraSource::parse(raw, Some(Path::new(ROOT))) {
        Err(e) => {
            let text = e.to_string();
            assert!(!leaks(&text), "refusal of {raw:?} shows a secret: {text}");
            return;
        }
        Ok(source) => source,
    };
    let text = source.to_string();
    assert!(!leaks(&text), "{raw:?} displays as {text:?}, with a secret");
    let scrubbed = source.scrub(&format!("cannot open {}", source.backend_target()));
    assert!(!leaks(&scrubbed), "{raw:?} scrubbed to {scrubbed:?}");
    let CameraSource::Network(url) = &source else {
        return;
    };
    let target = source.backend_target();
    let checked = normalize(url.host_str().unwrap_or_default());
    let opened = normalize(&ffmpeg_host(&target));
    assert_eq!(
        opened, checked,
        "FFmpeg would connect to {opened:?} but the policy checks {checked:?} ({raw:?})"
    );
    let policy = HostPolicy::defaults(Mode::Kubernetes);
    if policy.check(&checked, &[]).is_ok()
        && let Ok(ip) = opened.parse::<IpAddr>()
    {
        assert!(
            policy.check(&ip.to_string(), &[]).is_ok(),
            "{raw:?} passed the policy but FFmpeg would connect to {ip}"
        );
    }
}

/// FFmpeg's own log lines through the scrubber. `data` is a camera URL, a
/// newline, and a line FFmpeg could print, in which `{url}` stands for a URL
/// derived from the camera's (the line is used as it is when it has none).
pub fn ffmpeg_log(data: &str) {
    let (raw, template) = data.split_once('\n').unwrap_or((data, "{url}"));
    let _ = redact_urls(template);
    let root = Some(Path::new(ROOT));
    if let Ok(source) = CameraSource::parse(raw, root) {
        let scrubbed = source.scrub(template);
        if !template.contains("://") && !holds_a_secret(&source, template) {
            assert_eq!(
                scrubbed, template,
                "a line without URLs or secrets was changed ({raw:?})"
            );
        }
    }
    if template.contains(MARKER) {
        return; // the marker must come from the camera URL's secrets only
    }
    let Some(marked) = with_marker(raw) else {
        return;
    };
    let Ok(source) = CameraSource::parse(&marked, root) else {
        return;
    };
    let CameraSource::Network(url) = &source else {
        return;
    };
    let mut quoted = vec![
        source.backend_target(),
        format!("http://other:{MARKER}@segments.example/s/seg0.ts"),
        format!("https://cdn.example/s/seg0.ts?token={MARKER}"),
    ];
    quoted.extend(
        ["seg0.ts", "/keys/k.bin", "../up/seg1.ts?channel=1"]
            .iter()
            .filter_map(|r| url.join(r).ok())
            .map(String::from),
    );
    let userinfo = format!("{}:{}@", url.username(), url.password().unwrap_or_default());
    quoted.push(format!("{userinfo}{}", url.host_str().unwrap_or_default()));
    for quote in quoted {
        let line = if template.contains("{url}") {
            template.replace("{url}", &quote)
        } else {
            format!("{template} '{quote}'")
        };
        let scrubbed = source.scrub(&line);
        assert!(
            !scrubbed.contains(MARKER),
            "{marked:?}: {line:?} scrubbed to {scrubbed:?}"
        );
    }
}

/// True when `text` holds the camera's user name, password or query, as
/// given or percent-decoded, of any length (so a change may be expected).
fn holds_a_secret(source: &CameraSource, text: &str) -> bool {
    let CameraSource::Network(url) = source else {
        return false;
    };
    let decoded = |s: &str| {
        url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    [
        Some(url.username().to_string()),
        url.password().map(str::to_string),
        url.query().map(str::to_string),
    ]
    .into_iter()
    .flatten()
    .flat_map(|s| [decoded(&s), s])
    .any(|s| !s.is_empty() && text.contains(&s))
}

/// `to_deploy` and `to_undeploy` parsing on one message value.
pub fn requests(data: &[u8]) {
    let _ = UndeployRequest::parse(Some(data));
    let root = Some(Path::new(ROOT));
    match DeployRequest::parse(Some(data), root) {
        Ok(req) => assert!(
            CameraSource::parse(&req.camera_url, root).is_ok(),
            "an accepted to_deploy carries a camera URL the policy refuses: {:?}",
            req.camera_url
        ),
        Err(e) => {
            let _ = e.category();
        }
    }
    // The same message with a marker in the camera URL's secrets: the
    // refusal must not show it.
    let contains_marker = data.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    if contains_marker {
        return; // the marker must come from the camera URL's secrets only
    }
    let Some(marked) = map
        .get("camera_url")
        .and_then(|v| v.as_str())
        .and_then(with_marker)
    else {
        return;
    };
    map.insert("camera_url".into(), marked.into());
    let payload = serde_json::to_vec(&map).unwrap_or_default();
    if let Err(e) = DeployRequest::parse(Some(&payload), root) {
        let text = e.to_string();
        assert!(!text.contains(MARKER), "refusal shows a secret: {text}");
    }
}

/// `raw` with its first secret replaced by [`MARKER`], when the marker then
/// sits in a secret's place only (user name, password, fragment or the value
/// of a credential-looking query parameter).
pub fn with_marker(raw: &str) -> Option<String> {
    let url = Url::parse(raw).ok()?;
    let secret = [
        url.password().map(str::to_string),
        Some(url.username().to_string()),
        url.fragment().map(str::to_string),
        url.query().and_then(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| is_secret_key(k))
                .map(|(_, v)| v.to_string())
        }),
    ]
    .into_iter()
    .flatten()
    .find(|s| !s.is_empty() && !MARKER.contains(s.as_str()))?;
    let marked = raw.replacen(&secret, MARKER, 1);
    let parsed = Url::parse(&marked).ok()?;
    let in_secret_place = parsed.password().is_some_and(|p| p.contains(MARKER))
        || parsed.username().contains(MARKER)
        || parsed.fragment().is_some_and(|f| f.contains(MARKER))
        || parsed.query().is_some_and(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .any(|(k, v)| is_secret_key(k) && v.contains(MARKER))
        });
    let elsewhere = format!(
        "{}{}{}{}",
        parsed.scheme(),
        parsed.host_str().unwrap_or_default(),
        parsed.path(),
        parsed
            .query()
            .map(|q| q
                .split('&')
                .map(|pair| pair.split_once('=').map_or(pair, |(k, _)| k))
                .collect::<String>())
            .unwrap_or_default()
    );
    (in_secret_place && !elsewhere.contains(MARKER)).then_some(marked)
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "p" || SECRET_KEYS.iter().any(|s| key.contains(s))
}

fn normalize(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// The host FFmpeg's `av_url_split` (libavformat/utils.c, FFmpeg 5.1) finds
/// in a URL: after `scheme://`, up to the first `/`, `?` or `#`, after the
/// last `@`, without brackets or port.
pub fn ffmpeg_host(url: &str) -> String {
    let Some((_, rest)) = url.split_once(':') else {
        return String::new();
    };
    let Some(rest) = rest.strip_prefix("//") else {
        return String::new();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(inner) = host.strip_prefix('[')
        && let Some(close) = inner.find(']')
    {
        return inner[..close].to_string();
    }
    host.split(':').next().unwrap_or_default().to_string()
}
