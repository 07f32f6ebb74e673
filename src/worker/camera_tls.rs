//! Certificates of `https://` and `rtsps://` cameras.
//!
//! By default a worker trusts a camera only if its certificate chains to a
//! CA of the system's store or of `CAMERA_CA_FILE`, and names the camera's
//! host. Two checks see to it, one per connection:
//!
//! - FFmpeg's, on the connection that carries the video: the worker gives
//!   it `tls_verify` and `ca_file` for both schemes. The project's FFmpeg
//!   build (scripts/opencv.d/ffmpeg-tls-verify.patch) checks the host name
//!   as well as the chain, and takes these options for rtsps, which FFmpeg
//!   5.1 itself cannot verify at all.
//! - The worker's own TLS handshake before each open, checking the same:
//!   FFmpeg's refusal reaches the worker only as "not opened", while this
//!   one says why (a refusal is the open's error, so it shows in the
//!   Scenario's status, with the fix).
//!
//! `CAMERA_TLS_VERIFY=false` turns all of it off for cameras with
//! self-signed certificates, for every camera of the runner: give such a
//! camera's certificate as `CAMERA_CA_FILE` instead where possible.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use url::Url;

use crate::camera_url::CameraSource;

/// Where the system's CA bundle usually is (Debian and Ubuntu first, as in the image).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// How a worker checks camera certificates.
#[derive(Clone)]
pub enum CameraTls {
    /// Certificates checked against the CAs of `ca_file`.
    Verify {
        ca_file: PathBuf,
        config: Arc<rustls::ClientConfig>,
    },
    /// `CAMERA_TLS_VERIFY=false`: nothing checked.
    Off,
}

impl std::fmt::Debug for CameraTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CameraTls::Verify { ca_file, .. } => write!(f, "verify against {}", ca_file.display()),
            CameraTls::Off => f.write_str("not verified (CAMERA_TLS_VERIFY=false)"),
        }
    }
}

impl CameraTls {
    /// The settings as given: `ca_file` (`CAMERA_CA_FILE`, else the
    /// system's bundle) read now, so a bad file stops start-up naming it.
    pub fn new(ca_file: Option<&Path>, verify: bool) -> Result<CameraTls, String> {
        if !verify {
            return Ok(CameraTls::Off);
        }
        let (ca_file, var) = match ca_file {
            Some(path) => (path.to_path_buf(), "CAMERA_CA_FILE"),
            None => (
                std::env::var_os("SSL_CERT_FILE")
                    .map(PathBuf::from)
                    .or_else(|| {
                        SYSTEM_BUNDLES
                            .iter()
                            .map(PathBuf::from)
                            .find(|p| p.exists())
                    })
                    .ok_or_else(|| {
                        "no system CA bundle found to check camera certificates against; set CAMERA_CA_FILE (or install ca-certificates)".to_string()
                    })?,
                "the system CA bundle",
            ),
        };
        let text = ca_file.display().to_string();
        if text.contains([';', '|']) {
            return Err(format!(
                "{var} {text:?} contains ';' or '|', which FFmpeg's options cannot carry; move the file"
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&ca_file)
            .map_err(|e| format!("{var} {text}: cannot read it: {e}"))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{var} {text}: not PEM certificates: {e}"))?;
            // A bundle may hold certificates webpki does not take; the rest count.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(format!("{var} {text} holds no CA certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS for cameras: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(CameraTls::Verify {
            ca_file,
            config: Arc::new(config),
        })
    }

    /// FFmpeg options (for `OPENCV_FFMPEG_CAPTURE_OPTIONS`) that make it check
    /// the certificate (chain and host name) of an `https://` or `rtsps://`
    /// camera's connection.
    pub fn ffmpeg_options(&self, source: &CameraSource) -> String {
        match (self, source) {
            (CameraTls::Verify { ca_file, .. }, CameraSource::Network(url))
                if matches!(url.scheme(), "https" | "rtsps") =>
            {
                format!("|tls_verify;1|ca_file;{}", ca_file.display())
            }
            _ => String::new(),
        }
    }

    /// Makes a TLS handshake with an `https://` or `rtsps://` camera and
    /// checks its certificate and host name; `Ok` for other sources.
    pub fn check(&self, source: &CameraSource, timeout: Duration) -> Result<(), TlsCheckError> {
        let (CameraTls::Verify { config, .. }, CameraSource::Network(url)) = (self, source) else {
            return Ok(());
        };
        if !matches!(url.scheme(), "https" | "rtsps") {
            return Ok(());
        }
        handshake(url, config.clone(), timeout)
    }
}

/// Why a camera's TLS handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCheckError {
    /// The camera could not be reached, or what answered did not complete a
    /// TLS handshake (refused, timed out, reset, not TLS): the cause, which
    /// only `CAMERA_ERROR_DETAIL=true` shows.
    Unreachable(String),
    /// The camera answered with a certificate that is not trusted or does
    /// not name it: the whole error, with the fix.
    Untrusted(String),
}

impl TlsCheckError {
    fn untrusted(why: impl std::fmt::Display) -> TlsCheckError {
        TlsCheckError::Untrusted(format!(
            "the camera's TLS certificate is not trusted ({why}); give the CA that signed it as CAMERA_CA_FILE, or, for cameras with self-signed certificates, set CAMERA_TLS_VERIFY=false"
        ))
    }

    /// A failed handshake step: only a refused certificate is a TLS
    /// failure; anything else is a camera that cannot be reached or does
    /// not speak TLS.
    fn of_io(e: &std::io::Error) -> TlsCheckError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(
                tls @ (rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::InvalidCertRevocationList(_)),
            ) => TlsCheckError::untrusted(tls),
            _ => TlsCheckError::Unreachable(e.to_string()),
        }
    }
}

fn handshake(
    url: &Url,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<(), TlsCheckError> {
    let unreachable = TlsCheckError::Unreachable;
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = crate::host_policy::url_port(url).unwrap_or(443);
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        TlsCheckError::untrusted(format!("{host} is not a host name TLS can check: {e}"))
    })?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| unreachable(format!("{host} has no address")))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| unreachable(format!("cannot connect to {host}:{port}: {e}")))?;
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| TlsCheckError::untrusted(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| TlsCheckError::of_io(&e))?;
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(())
}

static INSTALLED: OnceLock<CameraTls> = OnceLock::new();

/// Makes `tls` the settings [`installed`] returns. Later calls change nothing.
pub fn install(tls: CameraTls) {
    let _ = INSTALLED.set(tls);
}

/// The settings the worker started with (verification against the system's
/// store if none were installed).
pub fn installed() -> &'static CameraTls {
    INSTALLED.get_or_init(|| CameraTls::new(None, true).unwrap_or(CameraTls::Off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tls_schemes_get_ffmpeg_options_and_off_gets_none() {
        let dir = tempfile::tempdir().unwrap();
        let https = CameraSource::Network(Url::parse("https://cam.example/a.mp4").unwrap());
        let rtsps = CameraSource::Network(Url::parse("rtsps://cam.example/a").unwrap());
        let rtsp = CameraSource::Network(Url::parse("rtsp://cam.example/a").unwrap());
        let http = CameraSource::Network(Url::parse("http://cam.example/a.mp4").unwrap());
        assert_eq!(CameraTls::Off.ffmpeg_options(&https), "");
        assert_eq!(CameraTls::Off.ffmpeg_options(&rtsps), "");
        let Ok(tls) = CameraTls::new(None, true) else {
            return; // no system bundle on this machine: covered by the next test
        };
        for source in [&https, &rtsps] {
            assert!(
                tls.ffmpeg_options(source)
                    .starts_with("|tls_verify;1|ca_file;/"),
                "{source}"
            );
        }
        assert_eq!(tls.ffmpeg_options(&rtsp), "");
        assert_eq!(tls.ffmpeg_options(&http), "");
        assert!(tls.check(&rtsp, Duration::from_secs(1)).is_ok());
        let bad = dir.path().join("ca.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let err = CameraTls::new(Some(&bad), true).unwrap_err();
        assert!(
            err.contains("CAMERA_CA_FILE") && err.contains("no CA"),
            "{err}"
        );
        let err = CameraTls::new(Some(&dir.path().join("missing.pem")), true).unwrap_err();
        assert!(
            err.contains("CAMERA_CA_FILE") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn only_a_refused_certificate_is_a_tls_failure() {
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        // Nothing listens on a port just freed: refused, not untrusted.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let url = Url::parse(&format!("rtsps://127.0.0.1:{port}/a")).unwrap();
        assert!(matches!(
            handshake(&url, config.clone(), Duration::from_secs(2)),
            Err(TlsCheckError::Unreachable(_))
        ));
        // A server that is not TLS: unreachable or not a video, not untrusted.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = plain.accept().unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"RTSP/1.0 400 Bad Request\r\n\r\n");
        });
        let url = Url::parse(&format!("rtsps://{addr}/a")).unwrap();
        assert!(matches!(
            handshake(&url, config, Duration::from_secs(2)),
            Err(TlsCheckError::Unreachable(_))
        ));
        server.join().unwrap();
        let words = TlsCheckError::of_io(&std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(
            matches!(&words, TlsCheckError::Untrusted(w) if w.contains("not trusted") && w.contains("CAMERA_CA_FILE")),
            "{words:?}"
        );
    }
}
