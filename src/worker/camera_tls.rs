//! Certificates of `https://` and `rtsps://` cameras.
//!
//! By default a worker trusts a camera only if its certificate chains to a
//! CA of the system's store or of `CAMERA_CA_FILE`, and names the camera's
//! host. Before each open the worker makes a TLS handshake with the camera
//! itself and checks both (a refusal is the open's error, so it shows in
//! the Scenario's status); for `https://` FFmpeg then checks the chain of
//! its own connection as well (`tls_verify`, `ca_file`). FFmpeg 5.1 cannot
//! be told to verify the TLS connection RTSP opens, nor any host name:
//! that is what the worker's own handshake covers.
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
    /// the chain of an `https://` camera's connection.
    pub fn ffmpeg_options(&self, source: &CameraSource) -> String {
        match (self, source) {
            (CameraTls::Verify { ca_file, .. }, CameraSource::Network(url))
                if url.scheme() == "https" =>
            {
                format!("|tls_verify;1|ca_file;{}", ca_file.display())
            }
            _ => String::new(),
        }
    }

    /// Makes a TLS handshake with an `https://` or `rtsps://` camera and
    /// checks its certificate and host name; `Ok` for other sources.
    pub fn check(&self, source: &CameraSource, timeout: Duration) -> Result<(), String> {
        let (CameraTls::Verify { config, .. }, CameraSource::Network(url)) = (self, source) else {
            return Ok(());
        };
        if !matches!(url.scheme(), "https" | "rtsps") {
            return Ok(());
        }
        handshake(url, config.clone(), timeout).map_err(|why| {
            format!(
                "the camera's TLS certificate is not trusted ({why}); give the CA that signed it as CAMERA_CA_FILE, or, for cameras with self-signed certificates, set CAMERA_TLS_VERIFY=false"
            )
        })
    }
}

fn handshake(
    url: &Url,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<(), String> {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_or_known_default()
        .unwrap_or(if url.scheme() == "rtsps" { 322 } else { 443 });
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a host name TLS can check: {e}"))?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
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
    fn only_https_gets_ffmpeg_options_and_off_gets_none() {
        let dir = tempfile::tempdir().unwrap();
        let https = CameraSource::Network(Url::parse("https://cam.example/a.mp4").unwrap());
        let rtsp = CameraSource::Network(Url::parse("rtsp://cam.example/a").unwrap());
        assert_eq!(CameraTls::Off.ffmpeg_options(&https), "");
        let Ok(tls) = CameraTls::new(None, true) else {
            return; // no system bundle on this machine: covered by the next test
        };
        assert!(
            tls.ffmpeg_options(&https)
                .starts_with("|tls_verify;1|ca_file;/")
        );
        assert_eq!(tls.ffmpeg_options(&rtsp), "");
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
}
