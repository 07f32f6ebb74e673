//! Heartbeats and stream health: a real worker's `results` and heartbeats
//! checked against the JSON Schemas in `schemas/`, a gap in results read
//! from the beats alone, and the controller folding a real worker's beats
//! into the Scenario's `status.stream` and `Streaming` condition (declared
//! targets included), against the real broker and apiserver.

use std::process::{Command, Stdio};

use serde_json::Value;
use vap_runner::controller::crd::{Phase, Scenario};

use crate::common;
use crate::common::controller::Bed;
use crate::common::scenario::{pod_name, scenario_name, uuid};

const SCENARIO: &str = "550e8400-e29b-41d4-a716-446655440000";

fn schema(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    jsonschema::validator_for(&value).unwrap_or_else(|e| panic!("{path} is no JSON Schema: {e}"))
}

fn assert_valid(validator: &jsonschema::Validator, v: &Value, what: &str) {
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what} breaks its schema: {errors:?}\n{v}"
    );
}

#[tokio::test]
async fn every_message_a_worker_publishes_matches_its_schema_and_beats_count_every_result() {
    let bootstrap = common::kafka_bootstrap();
    let results = common::unique_name("results-schema");
    let beats = common::unique_name("heartbeats-schema");
    let _topics = common::TempTopics {
        bootstrap: bootstrap.clone(),
        topics: vec![results.clone(), beats.clone()],
        groups: Vec::new(),
    };
    common::run_ok(
        common::worker(SCENARIO, &common::media("vtest.avi"))
            .env("VIDEO_FILE_ROOT", common::MEDIA_DIR)
            .env("VIDEO_FPS", "2")
            .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
            .env("RESULTS_TOPIC", &results)
            .env("HEARTBEAT_TOPIC", &beats)
            .env("HEARTBEAT_SECS", "1")
            .env("MODEL", "hog")
            .stdin(Stdio::null()),
        "the worker is built with the tests",
    );

    let result_schema = schema("result.schema.json");
    let values = common::read_results(&bootstrap, &results, SCENARIO, 159).await;
    for v in &values {
        assert_valid(&result_schema, v, "a result");
    }
    assert!(
        values
            .iter()
            .any(|v| v["detections"].as_array().is_some_and(|d| !d.is_empty())),
        "HOG finds people in vtest.avi, so detections are checked too"
    );

    let beat_schema = schema("heartbeat.schema.json");
    let count = common::messages_in(&bootstrap, &beats).expect("the heartbeat topic");
    let beats = common::read_results(&bootstrap, &beats, SCENARIO, count).await;
    for b in &beats {
        assert_valid(&beat_schema, b, "a heartbeat");
    }
    // A consumer's account: beats numbered 1, 2, 3… with no gap, the
    // results each one reports adding up to every result published, the
    // last beat `ended` and naming the last frame.
    let seqs: Vec<u64> = beats.iter().map(|b| b["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=count as u64).collect::<Vec<_>>());
    let frames: u64 = beats.iter().map(|b| b["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames, 159, "the beats account for every result: {beats:?}");
    let last = beats.last().unwrap();
    assert_eq!(last["state"], "ended");
    assert_eq!(last["frame_number"], 159);
    assert!(
        beats.iter().any(
            |b| b["inference_p95_ms"].as_f64().is_some_and(|ms| ms > 0.0)
                && b["decode_p95_ms"].as_f64().is_some_and(|ms| ms > 0.0)
        ),
        "decode and inference times are measured: {beats:?}"
    );
}

/// A deploy of the vtest clip for `id` with the given target fields.
fn deploy_with(id: &str, target: Value) -> Vec<u8> {
    let mut body: Value =
        serde_json::from_slice(&common::deploy_body(id, &common::media("vtest.avi"))).unwrap();
    body.as_object_mut()
        .unwrap()
        .extend(target.as_object().unwrap().clone());
    body.to_string().into_bytes()
}

fn streaming(s: &Scenario) -> Option<(String, String, String)> {
    let c = s.status.as_ref()?.condition("Streaming")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

struct Worker(std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_shows_a_real_workers_health_and_its_target() {
    let bed = Bed::new("health").await;
    let controller = bed.start_controller(&[
        ("VIDEO_FPS", "2"),
        ("HEARTBEAT_SECS", "1"),
        ("STREAM_STATUS_SECS", "2"),
    ]);
    let id = uuid();
    // Wants 50 fps from a 10 fps camera.
    let body = deploy_with(
        &id,
        serde_json::json!({"target_fps": 50, "max_frame_age_secs": 30}),
    );
    bed.send(&bed.deploy, Some(&id), &body).await;
    let s = bed.wait_phase(&id, Phase::Running).await;
    let target = s.spec.target.clone().expect("the target is in the spec");
    assert_eq!(
        (target.fps, target.max_frame_age_seconds),
        (Some(50.0), Some(30.0))
    );

    // The Pod's own command and environment (HEARTBEAT_TOPIC included),
    // run here as the kubelet would, at the clip's own pace.
    let pod = bed.pods().get(&pod_name(&id)).await.unwrap();
    let log = std::fs::File::create(bed.logs.path().join("worker.log")).unwrap();
    let mut cmd = bed.pod_command(&pod).await;
    cmd.env("REALTIME", "true")
        .stdout(Stdio::null())
        .stderr(log);
    let mut worker = Worker(cmd.spawn().expect("start the worker"));

    let s = bed
        .wait_scenario(
            &id,
            "streaming, below its target because of the camera",
            |s| {
                let stream = s.status.as_ref().and_then(|st| st.stream.as_ref());
                stream.is_some_and(|st| st.state == "streaming" && st.fps > 0.0)
                    && streaming(s).is_some_and(|(v, r, _)| v == "False" && r == "CameraTooSlow")
            },
        )
        .await;
    let stream = s.status.as_ref().unwrap().stream.clone().unwrap();
    assert!(stream.last_frame_time.is_some(), "{stream:?}");
    assert!(
        stream.camera_fps > 5.0,
        "vtest.avi is a 10 fps clip: {stream:?}"
    );
    let (_, _, words) = streaming(&s).unwrap();
    assert!(
        words.contains("target 50 fps") && words.contains("the camera delivers only"),
        "{words}"
    );

    // kubectl shows the figures.
    let table = common::run_ok(
        Command::new("kubectl").args([
            "get",
            "scenarios",
            "-n",
            &bed.namespace,
            &scenario_name(&id),
        ]),
        "kubectl is on PATH after `eval \"$(scripts/infra env)\"`",
    );
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("FPS") && header.contains("LAST FRAME"),
        "{table}"
    );

    // A target it meets: the condition turns True.
    let patch = serde_json::json!({"spec": {"target": {"fps": 1.5}}});
    bed.scenarios()
        .patch(
            &scenario_name(&id),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("patch the target");
    bed.wait_scenario(&id, "streaming, meeting its target", |s| {
        streaming(s).is_some_and(|(v, r, _)| v == "True" && r == "Streaming")
    })
    .await;

    // A worker that goes silent (killed, no last beat) shows within three beats.
    worker.0.kill().expect("kill the worker");
    let _ = worker.0.wait();
    let s = bed
        .wait_scenario(&id, "heartbeats missing", |s| {
            streaming(s).is_some_and(|(v, r, _)| v == "False" && r == "HeartbeatsMissing")
        })
        .await;
    assert_eq!(
        s.status.as_ref().unwrap().phase,
        Some(Phase::Running),
        "kwok's Pod still runs: the silence shows in the condition, not the phase"
    );
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_target_is_dead_lettered_with_its_reason() {
    let bed = Bed::new("health-dlq").await;
    let _controller = bed.start_controller(&[]);
    let bad = uuid();
    bed.send(
        &bed.deploy,
        Some(&bad),
        &deploy_with(&bad, serde_json::json!({"target_fps": -2})),
    )
    .await;
    let good = uuid();
    bed.send(
        &bed.deploy,
        Some(&good),
        &deploy_with(&good, serde_json::json!({"max_frame_age_secs": 5})),
    )
    .await;
    let letters = bed.read_topic(&bed.dlq, 1).await;
    assert_eq!(letters[0].header("reason"), "bad_target");
    assert_eq!(
        letters[0].header("error"),
        "field \"target_fps\" is -2; give a number greater than 0 and at most 240, or leave it out"
    );
    let s = bed.wait_phase(&good, Phase::Running).await;
    assert_eq!(
        s.spec.target.and_then(|t| t.max_frame_age_seconds),
        Some(5.0)
    );
    assert!(
        bed.scenarios()
            .get_opt(&scenario_name(&bad))
            .await
            .unwrap()
            .is_none(),
        "the refused deploy wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_local_list_shows_each_workers_health() {
    let bed = common::local::LocalBed::new("local-health").await;
    let mut local = bed.start(&[("REALTIME", "true"), ("HEARTBEAT_SECS", "1")]);
    let id = uuid();
    bed.deploy(&id, &common::media("vtest.avi")).await;
    let row = common::wait_for(
        "runner local list shows the worker streaming",
        std::time::Duration::from_secs(120),
        || {
            let row = bed.list().get(&id).cloned();
            async move { row.filter(|r| r.state == "streaming" && r.fps.is_some_and(|f| f > 0.0)) }
        },
    )
    .await;
    assert!(row.last_frame.ends_with('s'), "{row:?}");
    // The same beats reach Kafka.
    let beats = common::wait_for(
        "heartbeats on the bed's topic",
        std::time::Duration::from_secs(60),
        || async { common::messages_in(&bed.bootstrap, &bed.heartbeats).filter(|n| *n > 0) },
    )
    .await;
    assert!(beats > 0);
    assert!(local.terminate().success(), "{}", local.log_tail());
}
