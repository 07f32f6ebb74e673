//! A worker Pod's life on the real node: the controller (a process of the
//! test, as in the other controller tests) starts worker Pods that the bed's
//! kubelet runs as containers of the imported image; cameras are served from
//! this machine's node address (tests/fixtures/http_server.py), results go to
//! the bed's Kafka through its listener for Pods. What is checked is what the
//! kubelet does and kwok does not: a deleted Pod's last phase, restarts in
//! place, readiness from the worker's own probe, eviction.
//!
//! Needs the bed with its real node and Pod listener (`scripts/infra up`,
//! `eval "$(scripts/infra env)"`) and the image imported (`scripts/image import`).

use crate::common::controller::{Bed, ControllerProcess, PodChange, PodWatch, SCENARIO_WITHIN};
use crate::common::scenario::{phase, pod_name, uuid};
use crate::common::{free_ports, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, EvictParams, Patch, PatchParams};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vap_runner::controller::crd::{Phase, Scenario};

const HINT: &str = "bring the bed up with its real node and load its environment \
    (`scripts/infra up && eval \"$(scripts/infra env)\"`), then import the image \
    (`scripts/image import`)";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; {HINT}"))
}

/// A camera on the node address: the clip's first three seconds as JPEG
/// frames, served as the live MJPEG stream `/live.mjpg` on a fixed port, so it
/// can be stopped (an outage) and started again at the same URL.
struct Camera {
    frames: tempfile::TempDir,
    host: String,
    port: u16,
    server: Option<Child>,
}

impl Camera {
    fn start() -> Camera {
        let frames = tempfile::tempdir().expect("temp dir");
        let out = Command::new("ffmpeg")
            .args(["-loglevel", "error", "-i"])
            .arg(crate::common::media("vtest.avi"))
            .args(["-t", "3", "-vf", "fps=10"])
            .arg(frames.path().join("frame%03d.jpg"))
            .output()
            .expect("run ffmpeg (scripts/deps installs it)");
        assert!(out.status.success(), "ffmpeg: {out:?}");
        let [port] = free_ports::<1>();
        let mut camera = Camera {
            frames,
            host: env("VAP_NODE_IP"),
            port,
            server: None,
        };
        camera.resume();
        camera
    }

    fn url(&self) -> String {
        format!("http://{}:{}/live.mjpg", self.host, self.port)
    }

    /// The same camera hanging after ten frames, the connection kept open.
    fn stalling_url(&self) -> String {
        format!("http://{}:{}/stall.mjpg", self.host, self.port)
    }

    /// Starts the server (again) and waits until it listens.
    fn resume(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/http_server.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg("--dir")
            .arg(self.frames.path())
            .args(["--host", &self.host, "--port", &self.port.to_string()])
            .args(["--fps", "10"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/fixtures/http_server.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the server's first line");
        assert!(line.starts_with("READY "), "camera server said {line:?}");
        self.server = Some(child);
    }

    /// Stops the server (by its PID): the camera is down.
    fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A controller whose worker Pods go to the real node with the imported image
/// and reach Kafka and the cameras at the node address.
fn controller(bed: &Bed, extra: &[(&str, &str)]) -> ControllerProcess {
    let bootstrap = env("VAP_KAFKA_POD_BOOTSTRAP");
    let image = std::env::var("VAP_IMAGE").unwrap_or_else(|_| "vap-runner:dev".to_string());
    let allow = format!("{}/32", env("VAP_NODE_IP"));
    let mut all = vec![
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
        ("WORKER_IMAGE", image.as_str()),
        ("WORKER_IMAGE_PULL_POLICY", "Never"),
        ("WORKER_NODE_SELECTOR", r#"{"vap.io/node":"real"}"#),
        (
            "WORKER_TOLERATIONS",
            r#"[{"key":"vap.io/node","operator":"Equal","value":"real","effect":"NoSchedule"}]"#,
        ),
        ("CAMERA_ALLOW_CIDRS", allow.as_str()),
        ("VIDEO_FPS", "2"),
    ];
    all.extend_from_slice(extra);
    bed.start_controller(&all)
}

fn ready(s: &Scenario) -> bool {
    s.status
        .as_ref()
        .and_then(|st| st.condition("Ready"))
        .is_some_and(|c| c.status == "True")
}

fn restarts(s: &Scenario) -> i32 {
    s.status.as_ref().map_or(0, |st| st.restart_count)
}

async fn wait_running_and_ready(bed: &Bed, id: &str) -> Scenario {
    bed.wait_scenario(id, "Running and Ready", |s| {
        phase(s) == Some(Phase::Running) && ready(s)
    })
    .await
}

/// Waits until the worker Pod of `id` satisfies `check` (`what` says what
/// that means) and returns it.
async fn wait_pod(bed: &Bed, id: &str, what: &str, check: impl Fn(&Pod) -> bool) -> Pod {
    let (pods, name, check) = (bed.pods(), pod_name(id), &check);
    wait_for(&format!("{name}: {what}"), SCENARIO_WITHIN, || {
        let (pods, name) = (pods.clone(), name.clone());
        async move {
            let pod = pods.get_opt(&name).await.ok()??;
            check(&pod).then_some(pod)
        }
    })
    .await
}

fn restart_count(pod: &Pod) -> i64 {
    container(pod)["restartCount"].as_i64().unwrap_or(0)
}

fn container(pod: &Pod) -> Value {
    serde_json::to_value(pod).expect("Pod as JSON")["status"]["containerStatuses"][0].clone()
}

/// The phases `scenario_events` holds for the scenario, in order.
async fn phases_published(bed: &Bed, id: &str) -> Vec<String> {
    let n = bed.messages_in(&bed.events) as usize;
    bed.read_topic(&bed.events, n)
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter(|e| e["scenario_uuid"] == id)
        .map(|e| e["phase"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `kubectl delete pod` of a live worker: the kubelet stops the container and
/// writes the phase it ended with before the Pod goes. The controller starts
/// a new Pod; the Scenario is never Failed nor Succeeded, no restart counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_worker_pod_is_replaced_and_its_scenario_keeps_running() {
    let bed = Bed::new("rn-delete").await;
    let camera = Camera::start();
    let mut ctl = controller(&bed, &[]);
    let id = uuid();
    bed.deploy(&id, &camera.url()).await;
    wait_running_and_ready(&bed, &id).await;
    let first = bed.pods().get(&pod_name(&id)).await.expect("worker Pod");
    let first_uid = first.metadata.uid.clone();

    bed.pods()
        .delete(&pod_name(&id), &DeleteParams::default())
        .await
        .expect("delete the worker Pod");
    let second = wait_pod(&bed, &id, "a new Pod, its worker ready", |pod| {
        pod.metadata.uid != first_uid && container(pod)["ready"] == true
    })
    .await;
    assert_eq!(
        second.spec.as_ref().and_then(|s| s.node_name.clone()),
        Some(env("VAP_NODE_NAME")),
        "the new worker runs on the real node"
    );
    let s = wait_running_and_ready(&bed, &id).await;
    assert_replaced_not_ended(&bed, &id, &s, &mut ctl).await;
    drop(camera);
}

/// A worker that cannot stop when its Pod is deleted (its capture loop is
/// stuck in a read) is killed after the grace period; the kubelet then writes
/// `Failed` with exit code 137 on the Pod before it goes. The deletion ended
/// it, not a fault: the Pod is replaced, the Scenario is never Failed and no
/// restart is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_worker_killed_after_the_grace_period_is_replaced_not_failed() {
    let bed = Bed::new("rn-grace").await;
    let camera = Camera::start();
    let watch = PodWatch::start(bed.pods()).await;
    let mut ctl = controller(
        &bed,
        &[("WATCHDOG_SECS", "600"), ("READ_TIMEOUT_MS", "600000")],
    );
    let id = uuid();
    bed.deploy(&id, &camera.stalling_url()).await;
    let first = wait_pod(&bed, &id, "its worker running", |pod| {
        container(pod)["state"]["running"].is_object()
    })
    .await;
    bed.pods()
        .delete(&pod_name(&id), &DeleteParams::default())
        .await
        .expect("delete the worker Pod");
    wait_pod(&bed, &id, "a new Pod, its worker running", |pod| {
        pod.metadata.uid != first.metadata.uid && container(pod)["state"]["running"].is_object()
    })
    .await;
    let history = watch.finish().await;
    let ended: Vec<Value> = history
        .changes
        .iter()
        .filter_map(|c| match c {
            PodChange::Applied(p) if p.metadata.uid == first.metadata.uid => Some(p),
            _ => None,
        })
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        .map(|p| container(p)["state"]["terminated"].clone())
        .collect();
    assert!(
        ended.iter().any(|t| t["exitCode"] == 137),
        "the kubelet wrote Failed with exit code 137 on the deleted Pod: {ended:?}"
    );
    let s = bed
        .wait_scenario(&id, "Starting or Running", |s| {
            matches!(phase(s), Some(Phase::Starting | Phase::Running))
        })
        .await;
    assert_replaced_not_ended(&bed, &id, &s, &mut ctl).await;
}

/// What a deleted worker Pod must leave behind: no restart counted, no
/// `Failed` or `Succeeded` ever published for the scenario, the controller
/// still running.
async fn assert_replaced_not_ended(bed: &Bed, id: &str, s: &Scenario, ctl: &mut ControllerProcess) {
    assert_eq!(restarts(s), 0, "a deleted Pod is no restart: {s:?}");
    let phases = phases_published(bed, id).await;
    assert!(
        !phases.iter().any(|p| p == "Failed" || p == "Succeeded"),
        "the scenario never ended: {phases:?}\n{}",
        ctl.log_tail()
    );
    ctl.assert_running();
}

/// A camera outage: the worker's /readyz fails, so the kubelet marks the Pod
/// not Ready and the Scenario shows it; /healthz stays good, so the container
/// is not restarted. The camera back at the same URL: Ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_outage_makes_the_worker_unready_without_restarting_it() {
    let bed = Bed::new("rn-outage").await;
    let mut camera = Camera::start();
    let mut ctl = controller(&bed, &[]);
    let id = uuid();
    bed.deploy(&id, &camera.url()).await;
    wait_running_and_ready(&bed, &id).await;

    camera.stop();
    let name = pod_name(&id);
    let unready = wait_pod(&bed, &id, "not Ready", |pod| {
        container(pod)["ready"] == false
    })
    .await;
    bed.wait_scenario(&id, "Running, not Ready", |s| {
        phase(s) == Some(Phase::Running) && !ready(s)
    })
    .await;
    // The liveness probe fails a container after 3 × 10 s: through a window
    // longer than that, the container keeps running the same process.
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(40) {
        let pod = bed.pods().get(&name).await.expect("worker Pod");
        assert_eq!(
            restart_count(&pod),
            0,
            "a camera outage restarted the worker: {}",
            container(&pod)
        );
        assert_eq!(
            pod.metadata.uid, unready.metadata.uid,
            "the Pod was replaced"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    camera.resume();
    let s = wait_running_and_ready(&bed, &id).await;
    assert_eq!(restarts(&s), 0, "an outage is no restart: {s:?}");
    let pod = bed.pods().get(&name).await.expect("worker Pod");
    assert_eq!(restart_count(&pod), 0);
    report_peak_memory(&pod);
    ctl.assert_running();
}

/// Prints the worker container's peak memory, read from the node's memory
/// cgroup (v1, the kubelet's cgroupfs layout), beside the chart's default
/// request and limit; the limit must hold it, or the kubelet would kill it.
fn report_peak_memory(pod: &Pod) {
    let uid = pod.metadata.uid.as_deref().expect("uid");
    let id = container(pod)["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("containerd://"))
        .expect("a containerd container id")
        .to_string();
    let path = ["burstable", "besteffort", ""]
        .iter()
        .map(|class| {
            Path::new("/sys/fs/cgroup/memory/kubepods")
                .join(class)
                .join(format!("pod{uid}"))
                .join(&id)
                .join("memory.max_usage_in_bytes")
        })
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no memory cgroup for container {id} of Pod {uid}"));
    let bytes: u64 = std::fs::read_to_string(&path)
        .expect("read the cgroup")
        .trim()
        .parse()
        .expect("a byte count");
    let mib = bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "worker container peak memory: {mib:.1} MiB (chart defaults: request 96Mi, limit 384Mi; mock detector, live MJPEG 768x576 at VIDEO_FPS=2)"
    );
    assert!(
        mib < 384.0,
        "the worker's peak {mib:.1} MiB exceeds the chart's default limit"
    );
}

/// A capture loop stuck in a read (a camera that hangs with the connection
/// open, and a read timeout longer than the watchdog) fails the worker's
/// /healthz; the kubelet's liveness probe restarts the container in place and
/// the Scenario counts the restart. The controller passes WATCHDOG_SECS and
/// READ_TIMEOUT_MS on to its workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_capture_loop_is_restarted_by_the_liveness_probe() {
    let bed = Bed::new("rn-stuck").await;
    let camera = Camera::start();
    let mut ctl = controller(
        &bed,
        &[("WATCHDOG_SECS", "2"), ("READ_TIMEOUT_MS", "600000")],
    );
    let id = uuid();
    bed.deploy(&id, &camera.stalling_url()).await;
    let first = wait_pod(&bed, &id, "its container created", |pod| {
        container(pod)["containerID"].is_string()
    })
    .await;
    let env = serde_json::to_value(first.spec.as_ref().expect("spec")).expect("JSON")["containers"]
        [0]["env"]
        .clone();
    assert!(
        env.as_array().is_some_and(|e| e
            .iter()
            .any(|v| v["name"] == "WATCHDOG_SECS" && v["value"] == "2")),
        "WATCHDOG_SECS is passed on to the worker: {env}"
    );
    let restarted = wait_pod(&bed, &id, "restarted by the liveness probe", |pod| {
        restart_count(pod) >= 1
    })
    .await;
    assert_eq!(
        restarted.metadata.uid, first.metadata.uid,
        "restarted in place, same Pod"
    );
    let events = kubectl_events(&bed.namespace, &pod_name(&id));
    assert!(
        events.contains("Liveness probe failed: HTTP probe failed with statuscode: 503")
            && events.contains("failed liveness probe, will be restarted"),
        "the kubelet names the failed liveness probe:\n{events}"
    );
    let s = bed
        .wait_scenario(&id, "the restart counted", |s| restarts(s) >= 1)
        .await;
    assert_ne!(
        phase(&s),
        Some(Phase::Failed),
        "one restart is within the limit"
    );
    ctl.assert_running();
}

/// The events of one object, as `kubectl get events` shows them.
fn kubectl_events(namespace: &str, name: &str) -> String {
    let out = Command::new("kubectl")
        .args(["-n", namespace, "get", "events", "--field-selector"])
        .arg(format!("involvedObject.name={name}"))
        .args(["-o", "custom-columns=REASON:.reason,MESSAGE:.message"])
        .output()
        .expect("run kubectl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A worker that exits 1 (its detector cannot start: MODEL_DIR has no model)
/// is restarted in place by the kubelet (`restartPolicy: OnFailure`, the same
/// Pod); after WORKER_RESTART_LIMIT restarts the Scenario is Failed with the
/// reason, its slot frees and the queued scenario (whose spec names the mock
/// detector, which needs no model) starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_1_is_restarted_in_place_until_the_limit() {
    let bed = Bed::new("rn-crash").await;
    let camera = Camera::start();
    let mut ctl = controller(
        &bed,
        &[
            ("MAX_WORKERS", "1"),
            ("WORKER_RESTART_LIMIT", "1"),
            ("MODEL", "yolo"),
            ("MODEL_DIR", "/nonexistent/models"),
        ],
    );
    let crashing = uuid();
    let queued = uuid();
    bed.deploy(&crashing, &camera.url()).await;
    bed.wait_scenario(&crashing, "holding the slot", |s| {
        s.status.as_ref().is_some_and(|st| st.pod_name.is_some())
    })
    .await;
    bed.deploy(&queued, &camera.url()).await;
    bed.wait_phase(&queued, Phase::Queued).await;
    bed.scenarios()
        .patch(
            &crate::common::scenario::scenario_name(&queued),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"model": "mock"}})),
        )
        .await
        .expect("name the mock detector in the queued scenario");

    let first_uid = bed
        .pods()
        .get(&pod_name(&crashing))
        .await
        .expect("worker Pod")
        .metadata
        .uid;
    let restarted = wait_pod(&bed, &crashing, "restarted by the kubelet", |pod| {
        restart_count(pod) >= 1
    })
    .await;
    assert_eq!(
        restarted.metadata.uid, first_uid,
        "restarted in place, same Pod"
    );
    assert_eq!(
        container(&restarted)["lastState"]["terminated"]["exitCode"],
        1,
        "{}",
        container(&restarted)
    );

    let failed = bed.wait_phase(&crashing, Phase::Failed).await;
    let error = failed
        .status
        .as_ref()
        .and_then(|s| s.last_error.clone())
        .unwrap_or_default();
    assert!(
        error.contains("WORKER_RESTART_LIMIT") && error.contains("worker exited with code 1"),
        "the reason names the limit and the exit code: {error:?}"
    );
    // The slot is free: the queued scenario runs on the real node.
    wait_running_and_ready(&bed, &queued).await;
    ctl.assert_running();
}

/// Evicting running workers (what `kubectl drain` does to each Pod) replaces
/// them; at no time do more than MAX_WORKERS worker Pods hold a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_workers_are_replaced_within_max_workers() {
    let bed = Bed::new("rn-evict").await;
    let camera = Camera::start();
    let mut ctl = controller(&bed, &[("MAX_WORKERS", "2")]);
    let ids = [uuid(), uuid(), uuid()];
    for id in &ids {
        bed.deploy(id, &camera.url()).await;
    }
    let watch = PodWatch::start(bed.pods()).await;
    for id in &ids[..2] {
        wait_running_and_ready(&bed, id).await;
    }
    bed.wait_phase(&ids[2], Phase::Queued).await;

    let mut before = Vec::new();
    for id in &ids[..2] {
        let pod = bed.pods().get(&pod_name(id)).await.expect("worker Pod");
        before.push(pod.metadata.uid.clone());
        bed.pods()
            .evict(&pod_name(id), &EvictParams::default())
            .await
            .expect("evict the worker Pod");
    }
    for (id, old) in ids[..2].iter().zip(&before) {
        wait_pod(&bed, id, "evicted and replaced, its worker ready", |pod| {
            pod.metadata.uid != *old && container(pod)["ready"] == true
        })
        .await;
        let s = wait_running_and_ready(&bed, id).await;
        assert_eq!(restarts(&s), 0, "an eviction is no restart: {s:?}");
    }
    assert_eq!(bed.phase(&ids[2]).await, Some(Phase::Queued));
    let history = watch.finish().await;
    let most = history.most_holding_slots(|_| true);
    assert!(
        most <= 2,
        "{most} worker Pods held a slot at once (MAX_WORKERS=2)"
    );
    ctl.assert_running();
}
