//! `runner worker` on live sources: an MJPEG camera over HTTP served by the test
//! itself, a real RTSP server (GStreamer's, tests/fixtures/rtsp_server.py), and
//! a private Kafka broker that is restarted while the worker publishes to it.
//! What is checked is what an operator would check: results at about VIDEO_FPS,
//! numbered 1, 2, 3… in order, reconnects after camera loss, a bounded exit when
//! the camera stays broken, a clean exit on SIGTERM, and nothing lost or
//! duplicated in Kafka across a broker restart.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::{http_get, metric, metric_value, wait_for};
use chrono::{DateTime, Utc};
use opencv::core::{Mat, Vector};
use opencv::prelude::*;
use opencv::{imgcodecs, videoio};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const SCENARIO: &str = "550e8400-e29b-41d4-a716-446655440000";
/// The exit code of a worker stopped by SIGTERM before its source ended (docs/architecture.md).
const STOPPED: i32 = 143;
/// Size of vtest.avi's frames, and so of every test camera's frames.
const WIDTH: i64 = 768;
const HEIGHT: i64 = 576;
const FPS: f64 = 2.0;
/// The system Python, which has Debian's GStreamer bindings (python3-gi).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
const RTSP_HINT: &str = "the RTSP test server needs Debian's python3-gi, gir1.2-gst-rtsp-server-1.0 and gstreamer1.0-plugins-{base,good,bad,ugly} (scripts/deps installs them)";

// ---------------------------------------------------------------- the worker

/// A running `runner worker` with the stdout sink (or Kafka): results are read
/// line by line as they arrive, standard error is kept for assertions and
/// failure messages. Killed (by its PID, through the handle) when dropped.
struct Worker {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    results: Vec<Value>,
    stderr: Arc<Mutex<String>>,
    /// Reads the worker's log to its end; awaited once the worker exited, so
    /// that its last lines are in `stderr`.
    stderr_read: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Worker {
    fn start(cmd: std::process::Command) -> Worker {
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start runner worker");
        let stdout = child.stdout.take().expect("worker stdout");
        let stderr_pipe = child.stderr.take().expect("worker stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_read = {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr_pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let mut text = stderr.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            })
        };
        Worker {
            child,
            lines,
            results: Vec::new(),
            stderr,
            stderr_read: Some(stderr_read),
            started: Instant::now(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The last lines of the worker's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = self.stderr();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- worker log (last {} lines) ---\n{}",
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// How many log lines contain `needle`.
    fn log_count(&self, needle: &str) -> usize {
        self.stderr().lines().filter(|l| l.contains(needle)).count()
    }

    /// Takes one stdout line, checks it is a result numbered next in order,
    /// stamped about now, and keeps it.
    fn accept_line(&mut self, line: &str) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
        let expected = self.results.len() as u64 + 1;
        assert_result_schema(&v, expected);
        let ts = timestamp(&v);
        let skew = (Utc::now() - ts).num_milliseconds();
        assert!(
            (-1_000..10_000).contains(&skew),
            "a live result's timestamp is when its frame was read; {ts} is {skew} ms before now: {v}"
        );
        self.results.push(v);
    }

    /// Reads results until `done(results)` holds; fails after `timeout`, or
    /// when the worker closes its output first.
    async fn wait_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.results) {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.accept_line(&line),
                Ok(None) => panic!(
                    "worker closed its output before {what} ({} results, exit {:?})\n{}",
                    self.results.len(),
                    self.child.try_wait().ok().flatten(),
                    self.log_tail()
                ),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what} ({} results so far)\n{}",
                    self.results.len(),
                    self.log_tail()
                ),
            }
        }
    }

    async fn wait_results(&mut self, n: usize, timeout: Duration) {
        self.wait_until(&format!("{n} results"), timeout, |r| r.len() >= n)
            .await;
    }

    /// Polls the log until `needle` appears in at least `count` lines.
    async fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_count(needle) < count {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {count} log lines with {needle:?}\n{}",
                self.log_tail()
            );
            // Keep reading results meanwhile so the worker never blocks on stdout.
            if let Ok(Some(line)) =
                tokio::time::timeout(Duration::from_millis(100), self.lines.recv()).await
            {
                self.accept_line(&line);
            }
        }
    }

    /// Sends SIGTERM to the worker's PID.
    fn sigterm(&self) {
        let pid = self.child.id().expect("worker still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// SIGTERM, then checks the worker exits within 20 s with the code of a
    /// stop before the source ended.
    async fn stop(&mut self) {
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(
            status.code(),
            Some(STOPPED),
            "SIGTERM must end the worker with exit {STOPPED}, got {status}\n{}",
            self.log_tail()
        );
    }

    /// Waits for the worker to exit, then reads the results it wrote last.
    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for worker"),
            Err(_) => panic!(
                "worker did not exit within {timeout:?} (running for {:?})\n{}",
                self.started.elapsed(),
                self.log_tail()
            ),
        };
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            self.accept_line(&line);
        }
        if let Some(read) = self.stderr_read.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        }
        status
    }
}

/// `runner worker` on a live camera with the stdout sink; no Kafka needed.
fn live_worker(camera: &str) -> std::process::Command {
    let mut cmd = common::worker(SCENARIO, camera);
    cmd.args(["--sink", "stdout", "--video-fps", "2"])
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1");
    cmd
}

fn assert_result_schema(v: &Value, frame_number: u64) {
    common::assert_result_schema(v, SCENARIO, frame_number, WIDTH, HEIGHT);
}

fn timestamp(v: &Value) -> DateTime<Utc> {
    let ts = v["timestamp"].as_str().expect("timestamp string");
    DateTime::parse_from_rfc3339(ts)
        .unwrap_or_else(|e| panic!("timestamp {ts} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// Results come at VIDEO_FPS: the median gap between the capture times of
/// consecutive results is 1 / VIDEO_FPS, within a quarter (a halved or doubled
/// rate is far outside; the median is not moved by a pause of a loaded
/// machine).
fn assert_about_video_fps(results: &[Value]) {
    assert!(results.len() >= 4, "too few results to judge the rate");
    let mut gaps: Vec<f64> = results
        .windows(2)
        .map(|w| (timestamp(&w[1]) - timestamp(&w[0])).num_milliseconds() as f64 / 1000.0)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    let nominal = 1.0 / FPS;
    assert!(
        (nominal * 0.75..=nominal * 1.25).contains(&median),
        "the median gap between results is {median:.3} s of capture time; at VIDEO_FPS={FPS} it is {nominal:.3} s (gaps: {gaps:?})"
    );
}

// ---------------------------------------------------------------- small helpers

/// Scrapes the worker's `/metrics` at `addr`.
async fn scrape(addr: &str) -> String {
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    text
}

/// Runs Debian's ffmpeg; fails with a clear message when it is missing.
fn ffmpeg(args: &[&str]) {
    common::run_ok(
        std::process::Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args(args),
        "install Debian's ffmpeg (scripts/deps does)",
    );
}

// ---------------------------------------------------------------- an MJPEG camera

/// The first 50 frames of vtest.avi as JPEG images (5 s at 10 fps).
fn vtest_jpegs() -> Arc<Vec<Vec<u8>>> {
    static JPEGS: OnceLock<Arc<Vec<Vec<u8>>>> = OnceLock::new();
    JPEGS
        .get_or_init(|| {
            let path = common::media("vtest.avi");
            let mut capture = videoio::VideoCapture::from_file(&path, videoio::CAP_FFMPEG)
                .expect("open vtest.avi");
            let mut frame = Mat::default();
            let mut jpegs = Vec::new();
            while jpegs.len() < 50 && capture.read(&mut frame).expect("read vtest.avi") {
                let mut jpeg = Vector::<u8>::new();
                imgcodecs::imencode(".jpg", &frame, &mut jpeg, &Vector::new()).expect("encode");
                jpegs.push(jpeg.to_vec());
            }
            assert_eq!(jpegs.len(), 50, "frames read from {path}");
            Arc::new(jpegs)
        })
        .clone()
}

/// What each connection to the MJPEG camera does after its first frames.
#[derive(Debug, Clone, Copy)]
enum Connection {
    /// Streams until the client goes away.
    Endless,
    /// Closes the connection after this many frames.
    CloseAfter(usize),
    /// Sends this many frames, then nothing more, keeping the connection open.
    StallAfter(usize),
    /// Accepts the connection and never answers, as a blackholed camera.
    Silent,
}

/// An HTTP MJPEG camera (`multipart/x-mixed-replace`, 10 fps) on 127.0.0.1.
struct MjpegCamera {
    url: String,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl MjpegCamera {
    async fn start(each: Connection) -> MjpegCamera {
        MjpegCamera::start_with(each, each).await
    }

    /// A camera whose first connection does `first` and every later one `rest`.
    async fn start_with(first: Connection, rest: Connection) -> MjpegCamera {
        let frames = vtest_jpegs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/stream", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                // Dropped (aborting every connection) when the camera is.
                let mut connections = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let each = match accepted.fetch_add(1, Ordering::SeqCst) {
                        0 => first,
                        _ => rest,
                    };
                    connections.spawn(serve_mjpeg(stream, frames.clone(), each));
                }
            })
        };
        MjpegCamera {
            url,
            accepted,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for MjpegCamera {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_mjpeg(
    mut stream: TcpStream,
    frames: Arc<Vec<Vec<u8>>>,
    each: Connection,
) -> std::io::Result<()> {
    if let Connection::Silent = each {
        std::future::pending::<()>().await;
    }
    let mut request = Vec::new();
    let mut buf = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    if !request.starts_with(b"GET /stream ") {
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\n\
              Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\
              Cache-Control: no-cache\r\n\
              Connection: close\r\n\r\n",
        )
        .await?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for (sent, jpeg) in frames.iter().cycle().enumerate() {
        match each {
            Connection::CloseAfter(n) if sent == n => return Ok(()),
            Connection::StallAfter(n) if sent == n => std::future::pending::<()>().await,
            _ => {}
        }
        tick.tick().await;
        let header = format!(
            "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            jpeg.len()
        );
        stream.write_all(header.as_bytes()).await?;
        stream.write_all(jpeg).await?;
        stream.write_all(b"\r\n").await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- an RTSP camera

/// GStreamer's RTSP server (tests/fixtures/rtsp_server.py) playing an H.264
/// clip in real time. Killed (by its PID, through the handle) when dropped.
struct RtspCamera {
    child: tokio::process::Child,
    url: String,
    log: PathBuf,
}

impl RtspCamera {
    async fn start(port: u16, clip: &Path, log: &Path) -> RtspCamera {
        RtspCamera::start_offering(port, clip, log, "any").await
    }

    /// A server that offers only `transport` (`udp`, `tcp` or `any`).
    async fn start_offering(port: u16, clip: &Path, log: &Path, transport: &str) -> RtspCamera {
        RtspCamera::start_with(port, clip, log, transport, None).await
    }

    /// An RTSPS server (rtsps://127.0.0.1:<port>/stream) with `pki`'s
    /// certificate for 127.0.0.1.
    async fn start_tls(port: u16, clip: &Path, log: &Path, pki: &TestPki) -> RtspCamera {
        RtspCamera::start_with(port, clip, log, "any", Some(pki)).await
    }

    async fn start_with(
        port: u16,
        clip: &Path,
        log: &Path,
        transport: &str,
        tls: Option<&TestPki>,
    ) -> RtspCamera {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rtsp_server.py");
        let mut server = tokio::process::Command::new(SYSTEM_PYTHON);
        server
            .arg(script)
            .args(["--port", &port.to_string(), "--transport", transport]);
        if let Some(pki) = tls {
            server
                .arg("--tls-cert")
                .arg(pki.path("server.crt"))
                .arg("--tls-key")
                .arg(pki.path("server.key"));
        }
        server.arg("--file").arg(clip);
        let (child, url) = start_fixture(server, log, RTSP_HINT).await;
        RtspCamera {
            child,
            url,
            log: log.to_path_buf(),
        }
    }

    /// Kills the server process (SIGKILL to its PID) and reaps it.
    async fn kill(mut self) {
        self.child.kill().await.unwrap_or_else(|e| {
            panic!(
                "cannot stop the RTSP test server: {e}; log {}",
                self.log.display()
            )
        });
    }
}

/// Starts a test server from tests/fixtures (standard error appended to
/// `log`) and waits for its `READY <url>` line; returns the process (killed
/// when dropped) and the URL. Fails with its log and `hint` when it does not
/// come up.
async fn start_fixture(
    mut cmd: tokio::process::Command,
    log: &Path,
    hint: &str,
) -> (tokio::process::Child, String) {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("test server log");
    let program = format!("{:?}", cmd.as_std());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; {hint}"));
    let stdout = child.stdout.take().expect("test server stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    match ready {
        Ok(Ok(Some(line))) if line.starts_with("READY ") => {
            let url = line["READY ".len()..].to_string();
            (child, url)
        }
        other => {
            let _ = child.kill().await;
            panic!(
                "{program} did not come up ({other:?}); its log:\n{}\n{hint}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

// ---------------------------------------------------------------- a web server

/// A static web server with byte ranges (tests/fixtures/http_server.py)
/// serving one directory. Killed (by its PID, through the handle) when dropped.
struct WebServer {
    _child: tokio::process::Child,
    url: String,
}

impl WebServer {
    async fn start(dir: &Path, log: &Path) -> WebServer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/http_server.py");
        let mut server = tokio::process::Command::new(SYSTEM_PYTHON);
        server.arg(script).arg("--dir").arg(dir);
        let (child, url) =
            start_fixture(server, log, "it needs only Python's standard library").await;
        WebServer { _child: child, url }
    }
}

/// `seconds` of vtest.avi as H.264 in MP4 (a keyframe every second), what
/// cameras and recorders produce.
fn h264_clip(dir: &Path, name: &str, seconds: u32) -> PathBuf {
    let clip = dir.join(name);
    ffmpeg(&[
        "-i",
        &common::media("vtest.avi"),
        "-t",
        &seconds.to_string(),
        "-an",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-g",
        "10",
        "-pix_fmt",
        "yuv420p",
        clip.to_str().unwrap(),
    ]);
    clip
}

// ---------------------------------------------------------------- a TLS front

/// A CA and a server certificate for 127.0.0.1 signed by it (`ca.crt`,
/// `server.crt`, `server.key`), made with openssl; more of each on demand.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> TestPki {
        let pki = TestPki {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        pki.ca("ca");
        pki.issue("ca", "server", "IP:127.0.0.1");
        pki
    }

    fn openssl(&self, args: &[&str]) {
        common::run_ok(
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(self.dir.path()),
            "the camera TLS tests need openssl",
        );
    }

    /// A self-signed CA: `<name>.crt` and `<name>.key`.
    fn ca(&self, name: &str) {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=camera test CA {name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
        ]);
    }

    /// A server certificate signed by CA `ca` for `san` (an openssl
    /// subjectAltName value): `<name>.crt` and `<name>.key`.
    fn issue(&self, ca: &str, name: &str, san: &str) {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=camera",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        std::fs::write(
            self.path(&ext),
            format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A TLS server configuration with certificate `<name>.crt` and key `<name>.key`.
    fn server_config(&self, name: &str) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.path(&format!("{name}.crt")))
                .expect("certificate file")
                .map(|c| c.expect("certificate"))
                .collect();
        let key =
            PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).expect("key file");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        Arc::new(config)
    }
}

/// Serves `https://127.0.0.1:<port>/…` in front of a plain HTTP camera, with
/// the certificate of `pki`: each TLS connection is relayed to `backend`.
struct TlsFront {
    url_base: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TlsFront {
    fn start(pki: &TestPki, backend: &str) -> TlsFront {
        let config = pki.server_config("server");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url_base = format!("https://{}", listener.local_addr().unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backend = backend.to_string();
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (config, backend, stop) =
                                (config.clone(), backend.clone(), stop.clone());
                            std::thread::spawn(move || relay_tls(client, config, &backend, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        TlsFront { url_base, stop }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One TLS connection: the request goes to `backend`, its answer comes back.
fn relay_tls(
    client: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    backend: &str,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, client);
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return, // a refused handshake ends here
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let Ok(mut upstream) = std::net::TcpStream::connect(backend) else {
        return;
    };
    if upstream.write_all(&request).is_err() {
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        match upstream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tls.write_all(&buf[..n]).is_err() || tls.flush().is_err() {
                    return;
                }
            }
        }
    }
}

/// A man in the middle before a plain camera (`backend`, host:port): the
/// first TLS connection, the worker's own certificate check, gets the real
/// camera's certificate (`pki`'s `server`); every later one, FFmpeg's that
/// carries the video, gets `pki`'s certificate `later`. Each connection is
/// relayed both ways. Stops when dropped.
struct MitmFront {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MitmFront {
    async fn start(pki: &TestPki, later: &str, backend: &str) -> MitmFront {
        let first = tokio_rustls::TlsAcceptor::from(pki.server_config("server"));
        let later = tokio_rustls::TlsAcceptor::from(pki.server_config(later));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let backend = backend.to_string();
        let task = tokio::spawn(async move {
            let mut relays = JoinSet::new();
            let mut acceptor = &first;
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor_now, backend) = (acceptor.clone(), backend.clone());
                acceptor = &later;
                relays.spawn(async move {
                    let Ok(mut tls) = acceptor_now.accept(client).await else {
                        return; // a refused certificate ends here
                    };
                    if let Ok(mut upstream) = TcpStream::connect(&backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                    }
                });
            }
        });
        MitmFront { addr, task }
    }
}

impl Drop for MitmFront {
    fn drop(&mut self) {
        // Aborting the task drops its JoinSet, which aborts the relays.
        self.task.abort();
    }
}

// ---------------------------------------------------------------- a private Kafka broker

/// A Kafka broker of its own for one test (scripts/infra.d/kafka with its own
/// run dir and ports), brought down when dropped, also on panic.
struct PrivateKafka {
    run: tempfile::TempDir,
    port: u16,
    controller_port: u16,
}

impl PrivateKafka {
    fn script(&self, command: &str) -> std::process::Output {
        std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/infra.d/kafka"
        ))
        .arg(command)
        .env("VAP_RUN", self.run.path())
        .env("VAP_KAFKA_PORT", self.port.to_string())
        .env("VAP_KAFKA_POD_ADDRESS", "off")
        .env(
            "VAP_KAFKA_CONTROLLER_PORT",
            self.controller_port.to_string(),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/infra.d/kafka {command}: {e}"))
    }

    fn start() -> PrivateKafka {
        let [port, controller_port] = common::free_ports::<2>();
        let kafka = PrivateKafka {
            run: tempfile::tempdir().expect("temp dir"),
            port,
            controller_port,
        };
        kafka.up();
        kafka
    }

    fn up(&self) {
        let out = self.script("up");
        assert!(
            out.status.success(),
            "Kafka is missing: the private broker did not start on {}: {}",
            self.bootstrap(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker process (SIGKILL to the PID in its pid file), as a
    /// crash would, and waits until its port is closed. Its data stays.
    fn kill(&self) {
        let pidfile = self.run.path().join("kafka/kafka.pid");
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
        let pid = pid.trim();
        let status = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -KILL {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.bootstrap()).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the killed broker (pid {pid}) still accepts connections"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn consumer(&self) -> StreamConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", common::unique_name("live-reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer")
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        let out = self.script("down");
        if !out.status.success() {
            eprintln!(
                "private Kafka broker on {} did not come down: {}",
                self.bootstrap(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mjpeg_camera_gives_results_at_video_fps_and_sigterm_stops_it() {
    let camera = MjpegCamera::start(Connection::Endless).await;
    let mut worker = Worker::start(live_worker(&camera.url));

    worker.wait_results(6, Duration::from_secs(30)).await;
    assert_about_video_fps(&worker.results[1..6]);

    worker.sigterm();
    let status = worker.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(STOPPED),
        "SIGTERM ends a live worker with exit {STOPPED} (stopped, not finished), got {status}\n{}",
        worker.log_tail()
    );
    assert!(worker.stderr().contains("SIGTERM received"));
    assert!(
        worker
            .stderr()
            .contains("stopped on request before the source ended")
    );
    assert!(worker.results.len() >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_camera_ends_the_worker_after_max_reconnects() {
    // Each connection delivers 2 frames (0.2 s), then stalls.
    const READ_TIMEOUT: Duration = Duration::from_millis(1000);
    const OPEN_TIMEOUT: Duration = Duration::from_millis(1000);
    const RECONNECT_MAX: Duration = Duration::from_millis(200);
    const ATTEMPTS: u32 = 3; // the first connection and MAX_RECONNECTS=2 more
    let camera = MjpegCamera::start(Connection::StallAfter(2)).await;
    let mut cmd = live_worker(&camera.url);
    let ms = |d: Duration| d.as_millis().to_string();
    cmd.args(["--read-timeout-ms", &ms(READ_TIMEOUT)])
        .args(["--open-timeout-ms", &ms(OPEN_TIMEOUT)])
        .args(["--max-reconnects", &(ATTEMPTS - 1).to_string()])
        .args(["--reconnect-base-ms", "100"])
        .args(["--reconnect-max-ms", &ms(RECONNECT_MAX)]);
    let mut worker = Worker::start(cmd);

    // Each stall is noticed after READ_TIMEOUT_MS, and no attempt takes longer
    // than opening, two frames and READ_TIMEOUT_MS, plus its backoff; 5 s of
    // slack for starting the process on a loaded machine.
    let least = READ_TIMEOUT * ATTEMPTS;
    let most = (OPEN_TIMEOUT + Duration::from_millis(200) + READ_TIMEOUT + RECONNECT_MAX)
        * ATTEMPTS
        + Duration::from_secs(5);
    let status = worker.wait_exit(most).await;
    let took = worker.started.elapsed();
    assert!(
        took >= least,
        "each stall is judged after READ_TIMEOUT_MS; {ATTEMPTS} stalls ended in {took:?}\n{}",
        worker.log_tail()
    );
    let log = worker.stderr();
    assert!(
        !status.success(),
        "a camera that keeps stalling must end the worker with an error\n{log}"
    );
    assert!(
        log.contains("gave up on camera") && log.contains("after 2 reconnect attempts"),
        "the worker says it gave up after MAX_RECONNECTS attempts:\n{log}"
    );
    assert_eq!(
        worker.log_count("reconnecting"),
        2,
        "each reconnect attempt is logged:\n{log}"
    );
    assert_eq!(
        camera.connections(),
        3,
        "one connection plus two reconnects"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_camera_is_reopened_and_results_continue() {
    // Every connection ends after 2 s of frames; the next one works again.
    let camera = MjpegCamera::start(Connection::CloseAfter(20)).await;
    let [metrics_port] = common::free_ports::<1>();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut cmd = live_worker(&camera.url);
    cmd.args([
        "--metrics-addr",
        &metrics_addr,
        "--reconnect-base-ms",
        "200",
        "--reconnect-max-ms",
        "1000",
    ]);
    let mut worker = Worker::start(cmd);

    worker.wait_results(2, Duration::from_secs(30)).await;
    let first = worker.results.len();
    let accepted = camera.accepted.clone();
    common::wait_for(
        "the worker to reconnect to the camera",
        Duration::from_secs(30),
        || {
            let accepted = accepted.clone();
            async move { (accepted.load(Ordering::SeqCst) >= 2).then_some(()) }
        },
    )
    .await;
    // Frames read after the second connection was accepted can only come from it.
    let reconnected_at = Utc::now();
    worker
        .wait_until(
            "3 results from the reopened stream",
            Duration::from_secs(30),
            |r| r.iter().filter(|v| timestamp(v) > reconnected_at).count() >= 3,
        )
        .await;
    assert!(worker.results.len() >= first + 3);
    assert!(worker.log_count("camera lost; reconnecting") >= 1);

    let (status, text) = http_get(&metrics_addr, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    let reconnects = metric(&text, "vap_worker_reconnects_total");
    let processed = metric(&text, "vap_worker_frames_processed_total");
    assert!(
        reconnects >= 1.0,
        "vap_worker_reconnects_total {reconnects}"
    );
    assert!(
        processed >= worker.results.len() as f64,
        "vap_worker_frames_processed_total {processed} < {} results seen",
        worker.results.len()
    );
    for probe in ["/healthz", "/readyz"] {
        let (status, body) = http_get(&metrics_addr, probe).await;
        assert_eq!(status, 200, "{probe}: {body}");
    }

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_camera_restart_is_survived() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = h264_clip(dir.path(), "vtest.mp4", 40);
    let log = dir.path().join("rtsp_server.log");
    let [port] = common::free_ports::<1>();
    let server = RtspCamera::start(port, &clip, &log).await;

    let mut cmd = live_worker(&server.url);
    cmd.args(["--reconnect-base-ms", "200", "--reconnect-max-ms", "1000"]);
    let mut worker = Worker::start(cmd);
    worker.wait_results(6, Duration::from_secs(45)).await;
    assert_about_video_fps(&worker.results[1..6]);

    server.kill().await;
    worker
        .wait_log("camera lost; reconnecting", 1, Duration::from_secs(30))
        .await;

    let server = RtspCamera::start(port, &clip, &log).await;
    let restarted_at = Utc::now();
    worker
        .wait_until(
            "5 results after the RTSP server came back",
            Duration::from_secs(45),
            |r| r.iter().filter(|v| timestamp(v) > restarted_at).count() >= 5,
        )
        .await;
    let resumed: Vec<Value> = worker
        .results
        .iter()
        .filter(|v| timestamp(v) > restarted_at)
        .cloned()
        .collect();
    assert_about_video_fps(&resumed[1..]);
    assert!(worker.log_count("camera opened") >= 2);

    worker.stop().await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_restart_loses_and_duplicates_no_result() {
    let clips = tempfile::tempdir().expect("temp dir");
    // 30 s of vtest.avi (300 frames at 10 fps): 60 results at VIDEO_FPS=2.
    let clip = clips.path().join("vtest30.avi");
    ffmpeg(&[
        "-i",
        &common::media("vtest.avi"),
        "-t",
        "30",
        "-c",
        "copy",
        clip.to_str().unwrap(),
    ]);
    const EXPECTED: i64 = 60;

    let kafka = PrivateKafka::start();
    let topic = common::unique_name("results-live");
    let mut cmd = common::worker(SCENARIO, clip.to_str().unwrap());
    cmd.args([
        "--video-fps",
        "2",
        "--realtime",
        "--mock-seed",
        "11",
        // Enough to wait out a broker restart that outlasts the clip.
        "--flush-timeout-ms",
        "90000",
    ])
    .env("VIDEO_FILE_ROOT", clips.path())
    .env("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap())
    .env("RESULTS_TOPIC", &topic);
    let mut worker = Worker::start(cmd);

    {
        let mut stored = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stored < 5 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for 5 results in {topic} ({stored} so far)\n{}",
                worker.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            stored = common::messages_in(&kafka.bootstrap(), &topic).unwrap_or(0);
        }
    }
    assert!(
        worker.child.try_wait().expect("worker status").is_none(),
        "the worker must still be running when the broker goes away\n{}",
        worker.log_tail()
    );
    kafka.kill();
    kafka.up();

    let status = worker.wait_exit(Duration::from_secs(100)).await;
    assert!(
        status.success(),
        "the worker rides out a broker restart and exits 0 at the end of the clip, got {status}\n{}",
        worker.log_tail()
    );

    let consumer = kafka.consumer();
    assert_eq!(
        common::messages_in(&kafka.bootstrap(), &topic),
        Some(EXPECTED),
        "messages in {topic}: no result lost or duplicated"
    );
    consumer.subscribe(&[&topic]).unwrap();
    for expected in 1..=EXPECTED as u64 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message within 30 s")
            .unwrap();
        assert_eq!(msg.key(), Some(SCENARIO.as_bytes()));
        let v: Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        assert_result_schema(&v, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_server_that_offers_only_udp_is_read_with_auto_transport() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = h264_clip(dir.path(), "vtest.mp4", 40);
    let log = dir.path().join("rtsp_server.log");
    let [port] = common::free_ports::<1>();
    let server = RtspCamera::start_offering(port, &clip, &log, "udp").await;

    // RTSP_TRANSPORT=tcp cannot read it, and says so instead of hanging.
    let mut cmd = live_worker(&server.url);
    cmd.args(["--rtsp-transport", "tcp", "--max-reconnects", "1"])
        .args(["--reconnect-base-ms", "100", "--reconnect-max-ms", "200"]);
    let mut tcp_only = Worker::start(cmd);
    let status = tcp_only.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "{}", tcp_only.log_tail());
    assert!(tcp_only.results.is_empty());
    assert!(
        tcp_only.stderr().contains("over TCP"),
        "the error names the transport tried\n{}",
        tcp_only.log_tail()
    );

    // The default, auto, falls back to UDP and says which it uses.
    let mut worker = Worker::start(live_worker(&server.url));
    worker.wait_results(6, Duration::from_secs(60)).await;
    assert_about_video_fps(&worker.results[1..6]);
    assert!(
        worker.log_count("RTSP over TCP failed; using UDP") == 1,
        "{}",
        worker.log_tail()
    );
    worker.stop().await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_server_that_offers_both_is_read_over_tcp() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = h264_clip(dir.path(), "vtest.mp4", 40);
    let log = dir.path().join("rtsp_server.log");
    let [port] = common::free_ports::<1>();
    let server = RtspCamera::start(port, &clip, &log).await;
    for (mode, expected) in [("auto", "tcp"), ("udp", "udp")] {
        let mut cmd = live_worker(&server.url);
        cmd.args(["--rtsp-transport", mode]);
        let mut worker = Worker::start(cmd);
        worker.wait_results(3, Duration::from_secs(60)).await;
        let opened: Vec<String> = worker
            .stderr()
            .lines()
            .filter(|l| l.contains("camera opened"))
            .map(str::to_string)
            .collect();
        assert!(
            opened.len() == 1 && opened[0].contains(&format!("transport=\"{expected}\"")),
            "RTSP_TRANSPORT={mode} reads over {expected}: {opened:?}"
        );
        assert_eq!(
            worker.log_count("failed; using"),
            0,
            "{}",
            worker.log_tail()
        );
        worker.stop().await;
    }
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clip_is_read_as_a_file_and_ends_with_exit_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    // 20 s at 10 fps: 40 results at VIDEO_FPS=2, by media time.
    h264_clip(&www, "clip.mp4", 20);
    let server = WebServer::start(&www, &dir.path().join("http.log")).await;

    let mut worker = Worker::start(live_worker(&format!("{}clip.mp4", server.url)));
    let status = worker.wait_exit(Duration::from_secs(120)).await;
    assert!(
        status.success(),
        "a finite clip ends with exit 0\n{}",
        worker.log_tail()
    );
    assert_eq!(worker.results.len(), 40, "{}", worker.log_tail());
    assert_eq!(worker.log_count("camera opened"), 1, "never reopened");
    assert_eq!(worker.log_count("reconnecting"), 0, "{}", worker.log_tail());
    assert!(worker.stderr().contains("end of file reached"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_hls_over_http_stays_live() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = h264_clip(dir.path(), "vtest.mp4", 20);
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    // A live playlist (no end marker): FFmpeg keeps publishing 1 s segments.
    let mut publisher = tokio::process::Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-stream_loop",
            "-1",
            "-i",
        ])
        .arg(&clip)
        .args([
            "-c",
            "copy",
            "-f",
            "hls",
            "-hls_time",
            "1",
            "-hls_list_size",
            "5",
        ])
        .args(["-hls_flags", "delete_segments"])
        .arg(www.join("live.m3u8"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run ffmpeg (scripts/deps installs it)");
    let playlist = www.join("live.m3u8");
    common::wait_for("the live playlist", Duration::from_secs(30), || {
        let ready = std::fs::read_to_string(&playlist)
            .map(|t| t.matches(".ts").count() >= 3)
            .unwrap_or(false);
        async move { ready.then_some(()) }
    })
    .await;
    let server = WebServer::start(&www, &dir.path().join("http.log")).await;

    let mut worker = Worker::start(live_worker(&format!("{}live.m3u8", server.url)));
    worker.wait_results(6, Duration::from_secs(60)).await;
    // Live: sampled by the wall clock, so never faster than VIDEO_FPS (HLS
    // delivers a segment's frames at once, so results may come slower).
    let span = (timestamp(&worker.results[5]) - timestamp(&worker.results[1])).num_milliseconds();
    assert!(
        span as f64 >= 4.0 / FPS * 1000.0 * 0.9,
        "5 results of a live playlist span {span} ms of capture time; a file read as fast as possible would be far quicker"
    );
    assert!(
        worker
            .stderr()
            .lines()
            .any(|l| l.contains("camera opened") && l.contains("finite=false")),
        "{}",
        worker.log_tail()
    );
    worker.stop().await;
    publisher.kill().await.expect("stop ffmpeg");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_outage_fails_readiness_not_liveness() {
    let camera = MjpegCamera::start(Connection::Endless).await;
    let url = camera.url.clone();
    let [metrics_port] = common::free_ports::<1>();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut cmd = live_worker(&url);
    cmd.args(["--metrics-addr", &metrics_addr, "--watchdog-secs", "1"])
        .args(["--reconnect-base-ms", "200", "--reconnect-max-ms", "400"])
        .args(["--read-timeout-ms", "1000", "--open-timeout-ms", "1000"]);
    let mut worker = Worker::start(cmd);
    worker.wait_results(2, Duration::from_secs(30)).await;
    for probe in ["/healthz", "/readyz"] {
        let (status, body) = http_get(&metrics_addr, probe).await;
        assert_eq!(status, 200, "{probe} while the camera delivers: {body}");
    }

    // The camera goes away for longer than WATCHDOG_SECS.
    drop(camera);
    worker
        .wait_log("camera lost; reconnecting", 5, Duration::from_secs(60))
        .await;
    let (status, body) = http_get(&metrics_addr, "/readyz").await;
    assert_eq!(status, 503, "/readyz reports the outage: {body}");
    assert!(body.contains("camera not open"), "{body}");
    let (status, body) = http_get(&metrics_addr, "/healthz").await;
    assert_eq!(
        status, 200,
        "a worker that keeps reconnecting is alive, however long the camera is down: {body}"
    );

    worker.stop().await;
}

/// `127.0.0.1:<free port>` for a worker's METRICS_ADDR.
fn metrics_addr() -> String {
    let [port] = common::free_ports::<1>();
    format!("127.0.0.1:{port}")
}

/// Waits until `topic` holds at least `n` records.
async fn wait_records(bootstrap: &str, topic: &str, n: i64, worker: &Worker) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = common::messages_in(bootstrap, topic).unwrap_or(0);
        if stored >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} results in {topic} ({stored} so far)\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `runner worker` on a live camera publishing to `topic` on `bootstrap`.
fn kafka_worker(
    camera: &str,
    bootstrap: &str,
    topic: &str,
    metrics: &str,
) -> std::process::Command {
    let mut cmd = common::worker(SCENARIO, camera);
    cmd.args(["--video-fps", "2", "--metrics-addr", metrics])
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("RESULTS_TOPIC", topic);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_frames_read_processed_and_dropped() {
    let camera = MjpegCamera::start(Connection::Endless).await;
    let addr = metrics_addr();
    let mut cmd = live_worker(&camera.url);
    cmd.args(["--metrics-addr", &addr]);
    let mut worker = Worker::start(cmd);
    worker.wait_results(3, Duration::from_secs(30)).await;
    let before = scrape(&addr).await;
    worker.wait_results(8, Duration::from_secs(30)).await;
    let after = scrape(&addr).await;

    // Series that have not counted anything yet may be absent.
    let count = |text: &str, series: &str| metric_value(text, series).unwrap_or(0.0);
    const READ: &str = "vap_worker_frames_read_total";
    const PROCESSED: &str = "vap_worker_frames_processed_total";
    const SAMPLING: &str = r#"vap_worker_frames_dropped_total{reason="sampling"}"#;
    const STALE: &str = r#"vap_worker_frames_dropped_total{reason="stale"}"#;
    const CORRUPT: &str = "vap_worker_frames_corrupt_total";
    for series in [READ, PROCESSED, SAMPLING] {
        assert!(
            count(&after, series) > count(&before, series),
            "{series} must grow while the camera delivers: {} then {}\n{after}",
            count(&before, series),
            count(&after, series)
        );
    }
    let read = |t: &str| metric(t, READ);
    let processed = |t: &str| metric(t, PROCESSED);
    let sampling = |t: &str| count(t, SAMPLING);
    let stale = |t: &str| count(t, STALE);
    let corrupt = |t: &str| metric(t, CORRUPT);
    assert!(
        processed(&after) >= 5.0,
        "5 results came between the scrapes\n{after}"
    );
    // Every frame read is processed, dropped or corrupt; at most two are on
    // their way (one waiting for the detector, one in it).
    let accounted = processed(&after) + sampling(&after) + stale(&after) + corrupt(&after);
    assert!(
        (0.0..=2.0).contains(&(read(&after) - accounted)),
        "frames read {} against {accounted} processed, dropped or corrupt\n{after}",
        read(&after)
    );
    // The camera sends 10 frames per second, VIDEO_FPS is 2: about 4 in 5 are
    // dropped by sampling.
    let share = sampling(&after) / read(&after);
    assert!(
        (0.72..=0.88).contains(&share),
        "{share:.2} of frames read were dropped by sampling; at 10 fps and VIDEO_FPS=2 expect about 0.8\n{after}"
    );
    assert!(metric(&after, "vap_worker_results_published_total") >= processed(&before));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_kafka_up_delivers_every_processed_frame() {
    let bootstrap = common::kafka_bootstrap();
    let topic = common::unique_name("results-sigterm");
    let _topics = common::TempTopics {
        bootstrap: bootstrap.clone(),
        topics: vec![topic.clone()],
        groups: Vec::new(),
    };
    let camera = MjpegCamera::start(Connection::Endless).await;
    let addr = metrics_addr();
    let mut worker = Worker::start(kafka_worker(&camera.url, &bootstrap, &topic, &addr));
    wait_records(&bootstrap, &topic, 4, &worker).await;

    let scraped = metric(&scrape(&addr).await, "vap_worker_frames_processed_total");
    worker.stop().await;
    let log = worker.stderr();
    let processed = common::worker_stopped_count(&log, "processed");
    assert!(
        processed as f64 >= scraped,
        "`worker stopped` says {processed} processed; /metrics said {scraped} before SIGTERM\n{log}"
    );
    assert_eq!(
        common::worker_stopped_count(&log, "published"),
        processed,
        "Kafka acknowledged every processed frame before the exit\n{log}"
    );
    assert_eq!(common::worker_stopped_count(&log, "publish_failures"), 0);
    let results = common::read_results(&bootstrap, &topic, SCENARIO, processed as i64).await;
    for (i, v) in results.iter().enumerate() {
        assert_result_schema(v, i as u64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_kafka_down_exits_1_after_flush_timeout() {
    const FLUSH_TIMEOUT: Duration = Duration::from_millis(2000);
    let kafka = PrivateKafka::start();
    let topic = common::unique_name("results-down");
    let camera = MjpegCamera::start(Connection::Endless).await;
    let addr = metrics_addr();
    let mut cmd = kafka_worker(&camera.url, &kafka.bootstrap(), &topic, &addr);
    cmd.args(["--flush-timeout-ms", &FLUSH_TIMEOUT.as_millis().to_string()]);
    let mut worker = Worker::start(cmd);
    wait_records(&kafka.bootstrap(), &topic, 2, &worker).await;

    kafka.kill();
    // Results processed after the broker went away wait in the producer.
    let processed = || async { metric(&scrape(&addr).await, "vap_worker_frames_processed_total") };
    let at_kill = processed().await;
    while processed().await < at_kill + 2.0 {
        assert!(
            worker.started.elapsed() < Duration::from_secs(120),
            "the worker processes no frames while Kafka is down\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let asked = Instant::now();
    worker.sigterm();
    let status = worker
        .wait_exit(FLUSH_TIMEOUT + Duration::from_secs(10))
        .await;
    let took = asked.elapsed();
    assert!(
        took >= FLUSH_TIMEOUT && took <= FLUSH_TIMEOUT + Duration::from_millis(1500),
        "with Kafka down the worker waits FLUSH_TIMEOUT_MS for its results, then exits: it took {took:?}\n{}",
        worker.log_tail()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "results lost on shutdown make the exit code 1\n{}",
        worker.log_tail()
    );
    assert!(
        worker.stderr().contains("results were still undelivered"),
        "the worker says results were lost\n{}",
        worker.log_tail()
    );
}

/// Before each reopen the worker resolves the camera's host again and checks
/// it against the host policy: a name that led to the camera at start and now
/// leads to the cloud metadata address (a rebinding DNS answer) is refused
/// and named, and no connection is made. The worker gets a private
/// /etc/hosts in a mount namespace of its own, which the test rewrites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_host_is_checked_again_before_each_reopen() {
    let camera = MjpegCamera::start_with(Connection::CloseAfter(100), Connection::Endless).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 camera.rebind.test\n").expect("write hosts");
    let url = camera.url.replace("127.0.0.1", "camera.rebind.test");
    let mut cmd = live_worker(&url);
    cmd.args(["--reconnect-base-ms", "200", "--reconnect-max-ms", "400"]);
    let mut worker = Worker::start(with_private_hosts(&cmd, &hosts));
    worker.wait_results(2, Duration::from_secs(30)).await;
    assert_eq!(
        camera.connections(),
        1,
        "the first connection lasts 10 s\n{}",
        worker.log_tail()
    );

    // Rewritten in place: the worker's /etc/hosts is a bind mount of this file.
    std::fs::write(&hosts, "169.254.169.254 camera.rebind.test\n").expect("rewrite hosts");
    worker
        .wait_log(
            "host camera.rebind.test resolves to 169.254.169.254, a cloud metadata address",
            1,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        camera.connections(),
        1,
        "nothing is opened after the refusal\n{}",
        worker.log_tail()
    );
    drop(worker);
}

/// `cmd` run with `hosts` as its /etc/hosts, in a mount namespace of its own
/// (`unshare`, as root); the environment and arguments are `cmd`'s.
fn with_private_hosts(cmd: &std::process::Command, hosts: &Path) -> std::process::Command {
    let mut wrapped = std::process::Command::new("unshare");
    wrapped
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
        .arg(hosts)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_clear();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            wrapped.env(key, value);
        }
    }
    wrapped
}

/// A capture loop stuck in one read for longer than WATCHDOG_SECS (here the
/// read timeout is far longer than the watchdog, so nothing frees it) is what
/// liveness is for: `/healthz` turns 503 and says why, so the kubelet
/// restarts the container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_loop_stuck_in_a_read_fails_liveness() {
    let camera = MjpegCamera::start(Connection::StallAfter(2)).await;
    let addr = metrics_addr();
    let mut cmd = live_worker(&camera.url);
    cmd.args(["--metrics-addr", &addr, "--watchdog-secs", "1"])
        .args(["--read-timeout-ms", "600000"]);
    let mut worker = Worker::start(cmd);
    worker.wait_results(1, Duration::from_secs(30)).await;
    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!(status, 200, "/healthz while frames arrive: {body}");
    let body = wait_for("/healthz to fail", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move {
            let (status, body) = http_get(&addr, "/healthz").await;
            (status == 503).then_some(body)
        }
    })
    .await;
    assert!(
        body.contains("the capture loop has made no progress") && body.contains("WATCHDOG_SECS=1"),
        "/healthz names the stuck loop and the setting: {body}"
    );
    // A stuck worker is the kubelet's to kill; dropping it kills it by PID.
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_camera_fails_readiness_not_liveness() {
    const WATCHDOG: Duration = Duration::from_secs(2);
    // The first connection stalls after 2 frames; later ones are never answered.
    let camera = MjpegCamera::start_with(Connection::StallAfter(2), Connection::Silent).await;
    let addr = metrics_addr();
    let mut cmd = live_worker(&camera.url);
    cmd.args(["--metrics-addr", &addr])
        .args(["--watchdog-secs", &WATCHDOG.as_secs().to_string()])
        .args(["--read-timeout-ms", "1000", "--open-timeout-ms", "1000"])
        .args(["--reconnect-base-ms", "200", "--reconnect-max-ms", "400"]);
    let mut worker = Worker::start(cmd);
    worker.wait_results(1, Duration::from_secs(30)).await;
    let stalled = Instant::now();

    // Within READ_TIMEOUT_MS (and some slack) the stall shows on /readyz.
    let deadline = stalled + Duration::from_secs(5);
    loop {
        let (status, body) = http_get(&addr, "/readyz").await;
        if status == 503 {
            assert!(body.contains("camera not open"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} 5 s after the camera stalled: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // For three watchdog periods the camera stays stalled: not ready, alive.
    while stalled.elapsed() < WATCHDOG * 3 {
        let (status, body) = http_get(&addr, "/healthz").await;
        assert_eq!(
            status,
            200,
            "a worker waiting on a stalled camera is alive: {body}\n{}",
            worker.log_tail()
        );
        let (status, body) = http_get(&addr, "/readyz").await;
        assert_eq!(status, 503, "/readyz while the camera is stalled: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = http_get(&addr, "/readyz").await;
    assert!(
        body.contains("last frame"),
        "/readyz says since when no frame arrived: {body}"
    );
    let since = metric(&scrape(&addr).await, "vap_worker_seconds_since_last_frame");
    assert!(
        since >= (WATCHDOG * 3).as_secs_f64() - 1.0,
        "vap_worker_seconds_since_last_frame {since}"
    );
    assert!(worker.log_count("camera lost; reconnecting") >= 2);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_timeout_bounds_a_camera_that_never_answers() {
    const OPEN_TIMEOUT: Duration = Duration::from_millis(1500);
    let camera = MjpegCamera::start(Connection::Silent).await;
    let mut cmd = live_worker(&camera.url);
    cmd.args(["--open-timeout-ms", &OPEN_TIMEOUT.as_millis().to_string()])
        .args(["--max-reconnects", "1"])
        .args(["--reconnect-base-ms", "100", "--reconnect-max-ms", "100"]);
    let mut worker = Worker::start(cmd);
    // Two opens, each given up after OPEN_TIMEOUT_MS; 4 s of slack for
    // starting the process on a loaded machine.
    let status = worker
        .wait_exit(OPEN_TIMEOUT * 2 + Duration::from_secs(4))
        .await;
    let took = worker.started.elapsed();
    assert!(!status.success(), "{}", worker.log_tail());
    assert!(
        took >= OPEN_TIMEOUT * 2,
        "two opens that each wait OPEN_TIMEOUT_MS took only {took:?}\n{}",
        worker.log_tail()
    );
    assert_eq!(camera.connections(), 2, "{}", worker.log_tail());
    assert_eq!(worker.log_count("camera lost; reconnecting"), 1);
    assert!(
        worker.stderr().contains("gave up on camera"),
        "{}",
        worker.log_tail()
    );
    assert!(worker.results.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cameras_with_an_untrusted_certificate_are_refused_and_work_with_their_ca() {
    let camera = MjpegCamera::start(Connection::Endless).await;
    let pki = TestPki::new();
    let backend = camera.url.trim_start_matches("http://");
    let front = TlsFront::start(&pki, backend.split('/').next().unwrap());
    let url = format!("{}/stream", front.url_base);
    let ca = pki.path("ca.crt");

    // By default the system's store decides, which does not know this CA.
    let log = refused_camera(&url, None).await;
    assert!(
        log.contains("TLS certificate is not trusted")
            && log.contains("CAMERA_CA_FILE")
            && log.contains("CAMERA_TLS_VERIFY=false"),
        "the worker says why and what to set:\n{log}"
    );
    // A certificate for another host name is refused even with its CA.
    refused_camera(&url.replace("127.0.0.1", "localhost"), Some(&ca)).await;

    // With the camera's CA given, it is read; so it is with the documented
    // opt-out and no CA.
    read_camera(&url, &[("CAMERA_CA_FILE", ca.to_str().unwrap())]).await;
    read_camera(&url, &[("CAMERA_TLS_VERIFY", "false")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsps_cameras_are_read_only_with_a_trusted_certificate_for_their_host() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = h264_clip(dir.path(), "vtest.mp4", 40);
    let log = dir.path().join("rtsp_server.log");
    let pki = TestPki::new();
    let ca = pki.path("ca.crt");
    let [port] = common::free_ports::<1>();
    let camera = RtspCamera::start_tls(port, &clip, &log, &pki).await;
    assert!(
        camera.url.starts_with("rtsps://127.0.0.1:"),
        "{}",
        camera.url
    );

    // By default the system's store decides, which does not know this CA.
    let refusal = refused_camera(&camera.url, None).await;
    assert!(
        refusal.contains("CAMERA_CA_FILE") && refusal.contains("CAMERA_TLS_VERIFY=false"),
        "the worker says why and what to set:\n{refusal}"
    );
    // A certificate for another host name is refused even with its CA.
    refused_camera(&camera.url.replace("127.0.0.1", "localhost"), Some(&ca)).await;

    read_camera(&camera.url, &[("CAMERA_CA_FILE", ca.to_str().unwrap())]).await;
    read_camera(&camera.url, &[("CAMERA_TLS_VERIFY", "false")]).await;
    camera.kill().await;
}

/// FFmpeg's own check, on the connection that carries the video: a man in
/// the middle shows the worker's handshake the camera's real certificate and
/// FFmpeg another one. The worker's check passes; FFmpeg must refuse a
/// certificate from another CA (rtsps: FFmpeg 5.1 does not verify it at
/// all) and one from the camera's CA for another host (https and rtsps:
/// FFmpeg 5.1 checks no host name), and read through the same relay when it
/// gets the real certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_verifies_the_certificate_of_the_connection_that_carries_the_video() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = h264_clip(dir.path(), "vtest.mp4", 40);
    let log = dir.path().join("rtsp_server.log");
    let pki = TestPki::new();
    pki.ca("other-ca");
    pki.issue("other-ca", "other-ca-server", "IP:127.0.0.1");
    pki.issue("ca", "other-host", "DNS:other-camera.invalid");
    let ca = pki.path("ca.crt");
    let with_ca = [("CAMERA_CA_FILE", ca.to_str().unwrap())];
    let [port] = common::free_ports::<1>();
    let rtsp = RtspCamera::start(port, &clip, &log).await;
    let rtsp_backend = format!("127.0.0.1:{port}");
    let mjpeg = MjpegCamera::start(Connection::Endless).await;
    let mjpeg_backend = mjpeg.url.trim_start_matches("http://");
    let mjpeg_backend = mjpeg_backend.split('/').next().unwrap();
    let not_opened = "camera unreachable or not a video";

    for later in ["other-ca-server", "other-host"] {
        let front = MitmFront::start(&pki, later, &rtsp_backend).await;
        let url = format!("rtsps://{}/stream", front.addr);
        unread_camera(&url, Some(&ca), not_opened).await;
    }
    let front = MitmFront::start(&pki, "other-host", mjpeg_backend).await;
    unread_camera(
        &format!("https://{}/stream", front.addr),
        Some(&ca),
        not_opened,
    )
    .await;

    // The relay itself is sound: with the real certificate both are read.
    let front = MitmFront::start(&pki, "server", &rtsp_backend).await;
    read_camera(&format!("rtsps://{}/stream", front.addr), &with_ca).await;
    let front = MitmFront::start(&pki, "server", mjpeg_backend).await;
    read_camera(&format!("https://{}/stream", front.addr), &with_ca).await;
    rtsp.kill().await;
}

/// Runs a worker on `url` (with `ca` as CAMERA_CA_FILE) that must refuse the
/// camera's certificate before reading a frame; returns its log.
async fn refused_camera(url: &str, ca: Option<&Path>) -> String {
    unread_camera(url, ca, "TLS certificate is not trusted").await
}

/// Runs a worker on `url` (with `ca` as CAMERA_CA_FILE) that must give up
/// on the camera without a frame, saying `why`; returns its log.
async fn unread_camera(url: &str, ca: Option<&Path>, why: &str) -> String {
    let mut cmd = live_worker(url);
    cmd.args(["--max-reconnects", "0", "--open-timeout-ms", "3000"]);
    if let Some(ca) = ca {
        cmd.env("CAMERA_CA_FILE", ca);
    }
    let mut worker = Worker::start(cmd);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let log = worker.stderr();
    assert!(
        !status.success() && log.contains(why),
        "{url} must not be read ({why}):\n{log}"
    );
    assert!(worker.results.is_empty(), "no frame of an untrusted camera");
    log
}

/// Runs a worker on `url` with `env` set until it published 3 results.
async fn read_camera(url: &str, env: &[(&str, &str)]) {
    let mut cmd = live_worker(url);
    cmd.envs(env.iter().copied());
    let mut worker = Worker::start(cmd);
    worker.wait_results(3, Duration::from_secs(45)).await;
    worker.stop().await;
}
