//! `runner local` and its workers as a security boundary: a private state
//! directory, loopback cameras only where the operator chose them, workers
//! with a cleared environment and resource limits, FFmpeg's own log lines
//! scrubbed of camera credentials, and secrets kept out of `--help`, errors
//! and command lines.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::local::{LocalBed, TopicLog};
use crate::common::wait_for;

const A: &str = "550e8400-e29b-41d4-a716-44665544a001";
const B: &str = "550e8400-e29b-41d4-a716-44665544a002";

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn entry(uuid: &str, camera: &str) -> String {
    format!("- scenario_uuid: {uuid}\n  camera_url: \"{camera}\"\n")
}

/// `runner local` on a scenarios file, without Kafka.
fn local_on_file(state: &Path, file: &Path) -> std::process::Command {
    let mut cmd = common::runner();
    cmd.arg("local")
        .arg("--scenarios")
        .arg(file)
        .env("STATE_DIR", state)
        .env("VIDEO_FILE_ROOT", common::MEDIA_DIR)
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1");
    cmd
}

// ------------------------------------------------------------ a tiny HTTP server

/// An HTTP/1.1 server on 127.0.0.1 that answers `/live.m3u8` with `playlist`
/// and everything else with 404, and records the paths it was asked for.
struct Http {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Http {
    fn start(playlist: impl Fn(SocketAddr) -> String + Send + 'static) -> Http {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let playlist = playlist(addr);
        std::thread::spawn({
            let paths = paths.clone();
            move || {
                for stream in listener.incoming().flatten() {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut reader = BufReader::new(&stream);
                    let mut request = String::new();
                    let _ = reader.read_line(&mut request);
                    loop {
                        let mut header = String::new();
                        match reader.read_line(&mut header) {
                            Ok(n) if n > 2 => continue,
                            _ => break,
                        }
                    }
                    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
                    paths.lock().unwrap().push(path.clone());
                    let reply = if path == "/live.m3u8" {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.apple.mpegurl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{playlist}",
                            playlist.len()
                        )
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    };
                    let _ = (&stream).write_all(reply.as_bytes());
                }
            }
        });
        Http { addr, paths }
    }

    fn requests(&self) -> usize {
        self.paths.lock().unwrap().len()
    }
}

/// A live HLS playlist whose segments are relative to it (FFmpeg resolves
/// them against the camera URL, user info included) and all missing.
fn hls_playlist(_: SocketAddr) -> String {
    "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n\
     #EXTINF:2.0,\nseg0.ts\n#EXTINF:2.0,\nseg1.ts\n"
        .to_string()
}

// ------------------------------------------------------------------ item: state

#[test]
fn a_state_dir_open_to_others_is_refused_and_a_new_one_is_private() {
    let base = tempfile::tempdir().unwrap();
    let file = base.path().join("scenarios.yaml");
    std::fs::write(&file, entry(A, &common::media("vtest.avi"))).unwrap();

    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = local_on_file(&open, &file).output().expect("runner local");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let fix = format!("chmod 700 {}", open.display());
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&fix) && l.contains("0755")),
        "one line naming the directory, its mode and the fix: {stderr}"
    );
    assert!(
        !open.join("state.db").exists(),
        "nothing is written into a refused directory"
    );

    let state = base.path().join("state");
    let out = local_on_file(&state, &file)
        .args(["--exit-when-done", "--", "--sink", "stdout"])
        .output()
        .expect("runner local");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode_of(&state), 0o700);
    assert_eq!(mode_of(&state.join("state.db")), 0o600);
    let beats = state.join("heartbeats");
    let entries = std::fs::read_dir(&state)
        .unwrap()
        .chain(std::fs::read_dir(&beats).expect("the workers' heartbeat files"));
    for entry in entries {
        let path = entry.unwrap().path();
        assert_eq!(
            mode_of(&path) & 0o077,
            0,
            "{} is open to others",
            path.display()
        );
    }
}

// --------------------------------------------------- items: loopback, environment

/// The environment and the limits of a live process, from `/proc`.
fn environ_of(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|b| *b == 0)
        .filter_map(|v| {
            let v = String::from_utf8_lossy(v);
            let (k, v) = v.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The soft limit of one resource in `/proc/PID/limits` (for example
/// "Max address space"), as written there.
fn limit_of(pid: u32, resource: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with(resource))
        .unwrap_or_else(|| panic!("{resource} in {limits}"));
    line[resource.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_deploys_get_no_loopback_camera_and_workers_a_cleared_limited_environment() {
    let bed = LocalBed::new("sec-local").await;
    let camera = Http::start(hls_playlist);
    let dlq = TopicLog::start(&bed.bootstrap, &bed.dlq);
    let mut local = bed.start(&[
        ("REALTIME", "true"),
        ("MOCK_SEED", "7"),
        // Nothing of the supervisor's own environment reaches a worker
        // unless it is a worker setting.
        ("AWS_SECRET_ACCESS_KEY", "Sup3rvisorOnly"),
        ("KUBECONFIG", "/root/.kube/config"),
        ("WORKER_MEMORY_LIMIT_MB", "2048"),
        ("WORKER_OPEN_FILES", "256"),
    ]);
    let loopback = format!("http://127.0.0.1:{}/live.m3u8", camera.addr.port());
    bed.deploy(A, &loopback).await;
    bed.deploy(B, &common::media("vtest.avi")).await;
    let worker = wait_for("B's worker", Duration::from_secs(60), || {
        local.assert_running();
        let found = bed.workers().into_iter().find(|(_, s)| s == B);
        async move { found }
    })
    .await;
    // Deploys are handled in order: A's was before B's.
    assert_eq!(dlq.all().len(), 1, "the loopback camera is dead-lettered");
    assert!(!bed.list().contains_key(A), "{:?}", bed.list());
    assert_eq!(camera.requests(), 0, "nothing fetched the loopback camera");
    let log = std::fs::read_to_string(&local.log_path).unwrap();
    assert!(log.contains("CAMERA_ALLOW_LOOPBACK=true"), "{log}");

    let env = environ_of(worker.0);
    assert_eq!(env["CAMERA_ALLOW_LOOPBACK"], "false", "{env:?}");
    assert_eq!(env["REALTIME"], "true", "worker settings are passed on");
    assert_eq!(env["MOCK_SEED"], "7");
    for leaked in [
        "AWS_SECRET_ACCESS_KEY",
        "KUBECONFIG",
        "STATE_DIR",
        "DEPLOY_TOPIC",
    ] {
        assert!(
            !env.contains_key(leaked),
            "{leaked} reached the worker: {env:?}"
        );
    }
    let settings: Vec<String> = vap_runner::cli::worker_variables();
    for name in env.keys() {
        assert!(
            settings.contains(name)
                || ["PATH", "RUST_LOG", "VAP_LOCAL_STATE_DIR"].contains(&name.as_str()),
            "{name} is no worker setting: {env:?}"
        );
    }
    assert_eq!(
        limit_of(worker.0, "Max address space"),
        (2048u64 << 20).to_string()
    );
    assert_eq!(limit_of(worker.0, "Max open files"), "256");
    assert_eq!(
        limit_of(worker.0, "Max cpu time"),
        "unlimited",
        "no CPU limit unless WORKER_CPU_SECONDS is set"
    );
    assert!(local.terminate().success(), "{}", local.log_tail());

    // Allowed explicitly, a loopback camera from Kafka runs.
    let mut local = bed.start(&[("CAMERA_ALLOW_LOOPBACK", "true")]);
    bed.deploy(A, &loopback).await;
    wait_for(
        "the loopback camera fetched",
        Duration::from_secs(60),
        || {
            local.assert_running();
            let n = camera.requests();
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    assert!(local.terminate().success(), "{}", local.log_tail());
}

// ------------------------------------------------------------ item: huge frames

/// Address space of each worker in the test: room for a worker reading a
/// 768×576 clip, not for a 16000×16000 frame decoded and converted to BGR.
const MEMORY_LIMIT_MB: &str = "1536";
/// What the failed worker's log says.
const MEMORY_REASON: &str = "could be decoded";

/// A Motion-JPEG file of two 16000×16000 frames of one colour: 3 MB that
/// decode to 384 MB of YUV per frame and 768 MB once converted to BGR.
fn huge_frames(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("huge.mjpeg");
    common::run_ok(
        std::process::Command::new("ffmpeg").args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=c=gray:s=16000x16000:r=1",
            "-frames:v",
            "2",
            "-c:v",
            "mjpeg",
            "-pix_fmt",
            "yuvj420p",
            "-q:v",
            "31",
            "-f",
            "mjpeg",
            path.to_str().unwrap(),
        ]),
        "ffmpeg makes the test clip (scripts/deps installs it)",
    );
    path
}

#[test]
fn a_worker_fed_huge_frames_fails_alone_under_its_memory_limit() {
    let base = tempfile::tempdir().unwrap();
    let videos = base.path().join("videos");
    std::fs::create_dir(&videos).unwrap();
    let huge = huge_frames(&videos);
    let clip = videos.join("vtest.avi");
    std::fs::copy(common::media("vtest.avi"), &clip).unwrap();
    let file = base.path().join("scenarios.yaml");
    std::fs::write(
        &file,
        entry(A, huge.to_str().unwrap()) + &entry(B, clip.to_str().unwrap()),
    )
    .unwrap();
    let state = base.path().join("state");
    let out_path = base.path().join("results.jsonl");
    let err_path = base.path().join("local.log");
    let mut local = Supervisor(
        state.clone(),
        local_on_file(&state, &file)
            .env("VIDEO_FILE_ROOT", &videos)
            .env("WORKER_MEMORY_LIMIT_MB", MEMORY_LIMIT_MB)
            .env("RESTART_BUDGET", "1")
            .env("RESTART_BACKOFF_MS", "100")
            .env("REALTIME", "true")
            .args(["--", "--sink", "stdout"])
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("runner local"),
    );
    let list = || {
        common::local::parse_list(&common::run_ok(
            common::runner()
                .args(["local", "list"])
                .env("STATE_DIR", &state),
            "the runner binary is built by cargo test",
        ))
    };
    let results_of_b = || {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(B))
            .count()
    };
    let started = Instant::now();
    let failed = loop {
        assert!(
            local.1.try_wait().unwrap().is_none(),
            "the supervisor ended: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        let rows = if state.join("state.db").exists() {
            list()
        } else {
            Default::default()
        };
        if rows.get(A).is_some_and(|r| r.phase == "Failed") {
            break rows;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "A did not fail: {rows:?}\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(failed[B].phase, "Running", "{failed:?}");
    // B keeps publishing after A failed.
    let before = results_of_b();
    std::thread::sleep(Duration::from_secs(3));
    assert!(results_of_b() > before, "B stopped publishing");
    let log = std::fs::read_to_string(&err_path).unwrap();
    let a_lines: Vec<&str> = log.lines().filter(|l| l.contains(A)).collect();
    assert!(
        a_lines.iter().any(|l| l.contains(MEMORY_REASON)),
        "A's log names the reason: {a_lines:#?}"
    );
}

/// A `runner local` on the state directory it names, killed (by its own
/// PID) with its workers when dropped, also when the test fails.
struct Supervisor(std::path::PathBuf, std::process::Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.1.kill();
        let _ = self.1.wait();
        let Ok(state) = self.0.canonicalize() else {
            return;
        };
        for (worker, _) in common::local::workers_of(&state) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &worker.to_string()])
                .status();
        }
    }
}

// ------------------------------------------------------- item: FFmpeg's own log

/// Runs `runner worker` once on `camera` (it cannot be opened: its segments
/// are missing) and returns its standard error. FFmpeg's lines on how its
/// connections went are logged only with CAMERA_ERROR_DETAIL.
fn worker_stderr(camera: &str, log_format: &str) -> String {
    let out = common::worker(A, camera)
        .env("CAMERA_ERROR_DETAIL", "true")
        .env("LOG_FORMAT", log_format)
        .env("CAMERA_ALLOW_LOOPBACK", "true")
        .env("MAX_RECONNECTS", "0")
        .env("OPEN_TIMEOUT_MS", "10000")
        .args(["--sink", "stdout"])
        .output()
        .expect("runner worker");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ffmpeg_log_lines_never_show_camera_credentials() {
    let camera = Http::start(hls_playlist);
    let port = camera.addr.port();
    for (password, shown) in [("S3cretPw", "***@"), ("pw", "***@")] {
        let url = format!("http://admin:{password}@127.0.0.1:{port}/live.m3u8");
        let quoted = format!("'http://{shown}127.0.0.1:{port}/seg0.ts'");
        let text = worker_stderr(&url, "text");
        let line = text
            .lines()
            .find(|l| l.contains("Error when loading first segment"))
            .unwrap_or_else(|| panic!("FFmpeg's line is relayed: {text}"));
        assert!(line.contains(&quoted) && line.contains("ffmpeg"), "{line}");
        assert!(!text.contains(&format!("admin:{password}@")), "{text}");

        let json = worker_stderr(&url, "json");
        let mut relayed = 0;
        for line in json.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["message"].as_str().unwrap_or_default();
            if message.contains("Error when loading first segment") {
                assert_eq!(v["target"], "ffmpeg", "{line}");
                assert!(message.contains(&quoted), "{line}");
                relayed += 1;
            }
        }
        assert!(relayed > 0, "FFmpeg's line is relayed as JSON: {json}");
        assert!(!json.contains(&format!("admin:{password}@")), "{json}");
    }
    assert!(
        camera.paths.lock().unwrap().iter().any(|p| p == "/seg0.ts"),
        "FFmpeg asked for the segment"
    );

    // What `runner local` relays (a scenarios file may name a loopback camera).
    let base = tempfile::tempdir().unwrap();
    let file = base.path().join("scenarios.yaml");
    let url = format!("http://admin:S3cretPw@127.0.0.1:{port}/live.m3u8");
    std::fs::write(&file, entry(A, &url)).unwrap();
    let out = local_on_file(&base.path().join("state"), &file)
        .env("RESTART_BUDGET", "0")
        .env("MAX_RECONNECTS", "0")
        .env("CAMERA_ERROR_DETAIL", "true")
        .args(["--exit-when-done", "--", "--sink", "stdout"])
        .output()
        .expect("runner local");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&format!("[scenario {A}]"))
                && l.contains(&format!("'http://***@127.0.0.1:{port}/seg0.ts'"))),
        "{stderr}"
    );
    assert!(!stderr.contains("S3cretPw"), "{stderr}");
}

// ------------------------------------------------- item: help, errors, scripts

#[test]
fn help_never_shows_a_camera_url_from_the_environment() {
    let url = "rtsp://admin:S3cretPw@cam.example.com/live";
    for args in [
        &["--help"][..],
        &["worker", "--help"],
        &["local", "--help"],
        &["controller", "--help"],
    ] {
        let out = common::runner()
            .args(args)
            .env("CAMERA_URL", url)
            .output()
            .expect("runner --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            !help.contains("S3cretPw") && !help.contains("admin"),
            "{args:?}: {help}"
        );
    }
    let out = common::runner()
        .args(["worker", "--help"])
        .env("CAMERA_URL", url)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("[env: CAMERA_URL]"));
}

#[test]
fn a_user_name_in_place_of_the_scheme_is_not_echoed() {
    let out = common::worker(A, "admin:S3cretPw@cam.example.com:554/live")
        .output()
        .expect("runner worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not a URL or an absolute path"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("admin") && !stderr.contains("S3cretPw"),
        "{stderr}"
    );
}

#[test]
fn the_migration_puts_no_camera_url_on_a_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let url = "rtsp://admin:S3cretPw@cam.example.com:554/live?channel=1";
    // A kubectl that records every command line and every standard input,
    // and answers as an apiserver with one Scenario without its Secret would.
    let kubectl = format!(
        r#"#!/bin/bash
printf 'ARGS %s\n' "$*" >> {calls}
case "$*" in
  *"get scenarios.runner.vap.io"*) echo scn-a ;;
  *"get secret"*) exit 1 ;;
  *".metadata.uid"*) printf uid-a ;;
  *".spec.cameraUrl"*) printf '%s' '{url}' ;;
  *"runner\.vap\.io/runner"*) printf vap-runner ;;
  *"create -f -"*) printf 'STDIN %s\n' "$(tr -d '\n')" >> {calls} ;;
esac
"#,
        calls = calls.display()
    );
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("kubectl"), kubectl).unwrap();
    std::fs::set_permissions(bin.join("kubectl"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = common::run_ok(
        std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/migrate-camera-secrets"
        ))
        .arg("video")
        .env("PATH", path),
        "the script needs bash",
    );
    assert!(out.contains("1 Scenario(s) migrated"), "{out}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    for line in calls.lines().filter(|l| l.starts_with("ARGS")) {
        assert!(
            !line.contains("S3cretPw") && !line.contains("admin"),
            "{line}"
        );
    }
    let secret: serde_json::Value = serde_json::from_str(
        calls
            .lines()
            .find_map(|l| l.strip_prefix("STDIN "))
            .unwrap_or_else(|| panic!("a Secret on standard input: {calls}")),
    )
    .unwrap_or_else(|e| panic!("{e}: {calls}"));
    let data = secret["data"]["CAMERA_URL"].as_str().unwrap();
    let decoded = common::run_ok(
        std::process::Command::new("bash").args(["-c", &format!("printf %s {data} | base64 -d")]),
        "base64 is part of coreutils",
    );
    assert_eq!(decoded, url);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-a");
}

// ------------------------------------- item: a camera that does not open

/// Three cameras that do not open for different reasons: nothing listens
/// (refused), a server that accepts and never answers (the time-out of a
/// black hole), and one that answers something other than video.
struct DeadCameras {
    refused: String,
    silent: String,
    not_video: String,
    _servers: Vec<std::thread::JoinHandle<()>>,
}

impl DeadCameras {
    fn start() -> DeadCameras {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = format!(
            "http://127.0.0.1:{}/cam",
            closed.local_addr().unwrap().port()
        );
        drop(closed);
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_url = format!(
            "http://127.0.0.1:{}/cam",
            silent.local_addr().unwrap().port()
        );
        let garbage = TcpListener::bind("127.0.0.1:0").unwrap();
        let not_video = format!(
            "http://127.0.0.1:{}/cam",
            garbage.local_addr().unwrap().port()
        );
        let servers = vec![
            std::thread::spawn(move || {
                // Holds every connection open, unanswered, until the test ends.
                let mut held = Vec::new();
                for conn in silent.incoming().flatten() {
                    held.push(conn);
                }
            }),
            std::thread::spawn(move || {
                for mut conn in garbage.incoming().flatten() {
                    let mut request = [0u8; 1024];
                    let _ = std::io::Read::read(&mut conn, &mut request);
                    let _ = conn.write_all(
                        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nthis is not a video at all\n",
                    );
                }
            }),
        ];
        DeadCameras {
            refused,
            silent: silent_url,
            not_video,
            _servers: servers,
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.refused, &self.silent, &self.not_video]
    }
}

/// What tells a refused connection from a timed-out or reset one, or from
/// a server that is not a camera.
const CONNECTION_WORDS: &[&str] = &[
    "refused",
    "timed out",
    "timeout",
    "reset",
    "Invalid data",
    "End of file",
    "Connection to",
    "prematurely",
    // OpenCV's warning on a failed open: when it comes tells how it failed.
    "capture by name",
];

/// `text` with `camera`'s host:port replaced by `<camera>`.
fn without_endpoint(text: &str, camera: &str) -> String {
    let endpoint = camera
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap();
    text.replace(endpoint, "<camera>")
}

/// The worker's last ERROR line about `camera`, and how long it ran.
fn failed_worker(camera: &str, detail: bool) -> (String, String, Duration) {
    let started = Instant::now();
    let out = common::worker(A, camera)
        .env("CAMERA_ALLOW_LOOPBACK", "true")
        .env("CAMERA_ERROR_DETAIL", detail.to_string())
        .env("MAX_RECONNECTS", "0")
        .env("OPEN_TIMEOUT_MS", "2000")
        .args(["--sink", "stdout"])
        .output()
        .expect("runner worker");
    let took = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let error = stderr
        .lines()
        .rfind(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    let error = error.split_once("ERROR").unwrap().1.to_string();
    (without_endpoint(&error, camera), stderr, took)
}

#[test]
fn a_camera_that_does_not_open_reads_the_same_whatever_the_cause() {
    let cameras = DeadCameras::start();
    let mut errors = std::collections::BTreeSet::new();
    for camera in cameras.all() {
        let (error, stderr, took) = failed_worker(camera, false);
        assert!(
            error.contains("camera unreachable or not a video at <camera>"),
            "{camera}: {error}"
        );
        for word in CONNECTION_WORDS {
            assert!(
                !stderr.contains(word),
                "{camera}: the log tells what answered ({word}):\n{stderr}"
            );
        }
        // Each failure takes OPEN_TIMEOUT_MS, a refused connection too.
        assert!(
            took >= Duration::from_secs(2),
            "{camera} failed in {took:?}"
        );
        errors.insert(error);
    }
    assert_eq!(errors.len(), 1, "{errors:#?}");

    // With CAMERA_ERROR_DETAIL the cause is said, and at once.
    let (error, _, took) = failed_worker(&cameras.refused, true);
    assert!(error.contains("refused"), "{error}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // What `runner local` relays and records reads the same for each.
    let base = tempfile::tempdir().unwrap();
    let file = base.path().join("scenarios.yaml");
    let uuids = [A, B, "550e8400-e29b-41d4-a716-44665544a003"];
    let entries: String = uuids
        .iter()
        .zip(cameras.all())
        .map(|(uuid, camera)| entry(uuid, camera))
        .collect();
    std::fs::write(&file, entries).unwrap();
    let state = base.path().join("state");
    let out = local_on_file(&state, &file)
        .env("RESTART_BUDGET", "0")
        .env("MAX_RECONNECTS", "0")
        .env("OPEN_TIMEOUT_MS", "2000")
        .args(["--exit-when-done", "--", "--sink", "stdout"])
        .output()
        .expect("runner local");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut words = std::collections::BTreeSet::new();
    for (uuid, camera) in uuids.iter().zip(cameras.all()) {
        let lines: Vec<String> = stderr
            .lines()
            .filter(|l| l.contains(uuid))
            .map(|l| without_endpoint(l, camera))
            .collect();
        for word in CONNECTION_WORDS {
            assert!(
                !lines.iter().any(|l| l.contains(word)),
                "{camera}: runner local relays what answered ({word}):\n{lines:#?}"
            );
        }
        let error = lines
            .iter()
            .find_map(|l| {
                l.split_once("camera unreachable")
                    .map(|(_, rest)| rest.to_string())
            })
            .unwrap_or_else(|| panic!("{camera}: no error relayed:\n{lines:#?}"));
        words.insert(error);
    }
    assert_eq!(words.len(), 1, "{words:#?}");
    let rows = common::local::parse_list(&common::run_ok(
        common::runner()
            .args(["local", "list"])
            .env("STATE_DIR", &state),
        "the runner binary is built by cargo test",
    ));
    for uuid in uuids {
        assert_eq!(rows[uuid].phase, "Failed", "{rows:?}");
    }
}
