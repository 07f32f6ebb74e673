//! `runner controller` against the real broker and the real kube-apiserver
//! (Pods run on kwok's fake Node; no container runs, so tests finish Pods by
//! writing their status as a kubelet would).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::controller::Bed;
use common::wait_for;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use vap_runner::controller::crd::Phase;

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn scenario_name(uuid: &str) -> String {
    format!("scn-{uuid}")
}

fn pod_name(uuid: &str) -> String {
    format!("worker-{uuid}")
}

async fn phase_of(bed: &Bed, uuid: &str) -> Option<Phase> {
    bed.scenarios()
        .get_opt(&scenario_name(uuid))
        .await
        .ok()??
        .status?
        .phase
}

async fn wait_phase(bed: &Bed, uuid: &str, phase: Phase, timeout: Duration) {
    wait_for(
        &format!("scenario {uuid} to be {phase:?}"),
        timeout,
        || async move { (phase_of(bed, uuid).await == Some(phase)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn duplicates_give_one_scenario_and_one_pod() {
    let bed = Bed::new("ctl-dup").await;
    let mut controller = bed.start_controller(&[]);
    let id = uuid();
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    for _ in 0..100 {
        bed.deploy(&id, &camera).await;
    }
    bed.wait_committed(&bed.deploy, 100, Duration::from_secs(60))
        .await;
    wait_phase(&bed, &id, Phase::Running, Duration::from_secs(60)).await;
    controller.assert_running();
    let scenarios = bed.scenarios().list(&ListParams::default()).await.unwrap();
    assert_eq!(scenarios.items.len(), 1);
    let pods = bed.pods().list(&ListParams::default()).await.unwrap();
    assert_eq!(pods.items.len(), 1);
    assert_eq!(pods.items[0].name_any(), pod_name(&id));
    let scn = &scenarios.items[0];
    assert_eq!(
        scn.status.as_ref().unwrap().pod_name.as_deref(),
        Some(pod_name(&id).as_str())
    );
    assert_eq!(scn.spec.worker_id, "11223344-5566-7788-99aa-bbccddeeeff0");
    assert_eq!(
        pods.items[0].labels()["runner.vap.io/worker-id"],
        "11223344-5566-7788-99aa-bbccddeeeff0"
    );
}

#[tokio::test]
async fn malformed_messages_go_to_the_dlq_and_valid_ones_go_on() {
    let bed = Bed::new("ctl-dlq").await;
    let _controller = bed.start_controller(&[("MAX_WORKERS", "10")]);
    let w = "11223344-5566-7788-99aa-bbccddeeeff0";
    let s = "550e8400-e29b-41d4-a716-446655440000";
    let big = format!(
        r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":"rtsp://h/{}"}}"#,
        "a".repeat(20_000)
    );
    let corpus: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "empty"),
        (b"not json".to_vec(), "not_json"),
        (b"{\"worker_id\":".to_vec(), "not_json"),
        (vec![0xff, 0xfe, 0x00], "not_json"),
        (b"[]".to_vec(), "not_object"),
        (b"42".to_vec(), "not_object"),
        (b"null".to_vec(), "not_object"),
        (format!(r#"{{"scenario_uuid":"{s}","camera_url":"rtsp://h/a"}}"#).into_bytes(), "missing_field"),
        (format!(r#"{{"worker_id":"{w}","camera_url":"rtsp://h/a"}}"#).into_bytes(), "missing_field"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}"}}"#).into_bytes(), "missing_field"),
        (format!(r#"{{"worker_id":1,"scenario_uuid":"{s}","camera_url":"rtsp://h/a"}}"#).into_bytes(), "wrong_type"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":["x"],"camera_url":"rtsp://h/a"}}"#).into_bytes(), "wrong_type"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":{{}}}}"#).into_bytes(), "wrong_type"),
        (format!(r#"{{"worker_id":"nope","scenario_uuid":"{s}","camera_url":"rtsp://h/a"}}"#).into_bytes(), "bad_uuid"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"550e8400-e29b-41d4-a716-44665544000g","camera_url":"rtsp://h/a"}}"#).into_bytes(), "bad_uuid"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":"ftp://h/a.mp4"}}"#).into_bytes(), "camera_url"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":"concat:/a.mp4|/b.mp4"}}"#).into_bytes(), "camera_url"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":"/etc/passwd"}}"#).into_bytes(), "camera_url"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":"videotestsrc ! appsink"}}"#).into_bytes(), "camera_url"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":"{}/../../../etc/x.avi"}}"#, common::MEDIA_DIR).into_bytes(), "camera_url"),
        (format!(r#"{{"worker_id":"{w}","scenario_uuid":"{s}","camera_url":""}}"#).into_bytes(), "camera_url"),
        (big.into_bytes(), "oversized"),
    ];
    assert!(corpus.len() >= 20);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let mut valid = Vec::new();
    for (i, (payload, _)) in corpus.iter().enumerate() {
        bed.send(&bed.deploy, Some("bad"), payload).await;
        if i % 5 == 0 {
            let id = uuid();
            bed.deploy(&id, &camera).await;
            valid.push(id);
        }
    }
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bed.bootstrap)
        .set("group.id", common::unique_name("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&bed.dlq]).unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < corpus.len() {
        let msg = tokio::time::timeout(Duration::from_secs(60), reader.recv())
            .await
            .expect("a dead-lettered message within 60 s")
            .unwrap();
        let headers = msg.headers().expect("headers");
        let reason = headers
            .iter()
            .find(|h| h.key == "reason")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).to_string())
            .expect("reason header");
        assert!(headers.iter().any(|h| h.key == "error"), "error header");
        reasons.push((
            msg.payload().map(|p| p.to_vec()).unwrap_or_default(),
            reason,
        ));
    }
    for ((payload, expected), (got_payload, got_reason)) in corpus.iter().zip(&reasons) {
        assert_eq!(payload, got_payload, "DLQ keeps the original value");
        assert_eq!(
            expected,
            got_reason,
            "reason for {}",
            String::from_utf8_lossy(payload)
        );
    }
    for id in &valid {
        wait_phase(&bed, id, Phase::Running, Duration::from_secs(60)).await;
    }
}

#[tokio::test]
async fn undeploy_stops_and_a_replayed_deploy_is_ignored() {
    let bed = Bed::new("ctl-undeploy").await;
    let _controller = bed.start_controller(&[]);
    let id = uuid();
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let deployed_at = chrono::Utc::now().timestamp_millis();
    bed.deploy_at(&id, &camera, deployed_at).await;
    wait_phase(&bed, &id, Phase::Running, Duration::from_secs(60)).await;
    bed.undeploy_at(&id, deployed_at + 1).await;
    wait_phase(&bed, &id, Phase::Stopped, Duration::from_secs(60)).await;
    wait_for(
        "the worker Pod to be gone",
        Duration::from_secs(60),
        || async {
            match bed.pods().get_opt(&pod_name(&id)).await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    // A replay of the original request (its record's own timestamp) changes nothing.
    bed.deploy_at(&id, &camera, deployed_at).await;
    bed.wait_committed(&bed.deploy, 2, Duration::from_secs(60))
        .await;
    assert_eq!(phase_of(&bed, &id).await, Some(Phase::Stopped));
    assert!(bed.pods().get_opt(&pod_name(&id)).await.unwrap().is_none());
}

#[tokio::test]
async fn sigkill_mid_burst_loses_nothing_and_duplicates_nothing() {
    let bed = Bed::new("ctl-crash").await;
    let mut controller = bed.start_controller(&[("MAX_WORKERS", "100")]);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let ids: Vec<String> = (0..60).map(|_| uuid()).collect();
    for id in &ids[..30] {
        bed.deploy(id, &camera).await;
    }
    // Kill it as soon as it is part-way through.
    wait_for(
        "some scenarios to exist",
        Duration::from_secs(60),
        || async {
            let n = bed
                .scenarios()
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .len();
            (n >= 5).then_some(())
        },
    )
    .await;
    controller.kill9();
    for id in &ids[30..] {
        bed.deploy(id, &camera).await;
    }
    let _restarted = bed.start_controller(&[("MAX_WORKERS", "100")]);
    bed.wait_committed(&bed.deploy, 60, Duration::from_secs(120))
        .await;
    for id in &ids {
        wait_phase(&bed, id, Phase::Running, Duration::from_secs(120)).await;
    }
    let scenarios = bed.scenarios().list(&ListParams::default()).await.unwrap();
    assert_eq!(scenarios.items.len(), 60);
    let pods = bed.pods().list(&ListParams::default()).await.unwrap();
    let names: BTreeSet<String> = pods.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(pods.items.len(), 60, "one Pod per scenario");
    assert_eq!(names, ids.iter().map(|id| pod_name(id)).collect());
}

#[tokio::test]
async fn deleted_pods_are_recreated_and_deleted_scenarios_take_their_pod() {
    let bed = Bed::new("ctl-delete").await;
    let _controller = bed.start_controller(&[]);
    let id = uuid();
    bed.deploy(&id, &format!("{}/vtest.avi", common::MEDIA_DIR))
        .await;
    wait_phase(&bed, &id, Phase::Running, Duration::from_secs(60)).await;
    let first_uid = bed.pods().get(&pod_name(&id)).await.unwrap().metadata.uid;
    bed.pods()
        .delete(&pod_name(&id), &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_for(
        "the worker Pod to be recreated",
        Duration::from_secs(60),
        || async {
            let pod = bed.pods().get_opt(&pod_name(&id)).await.ok()??;
            (pod.metadata.uid != first_uid && pod.metadata.deletion_timestamp.is_none())
                .then_some(())
        },
    )
    .await;
    bed.scenarios()
        .delete(&scenario_name(&id), &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the worker Pod to go with its Scenario",
        Duration::from_secs(90),
        || async {
            match bed.pods().get_opt(&pod_name(&id)).await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_pod_spec_written_by_the_controller_runs_as_a_real_worker() {
    let bed = Bed::new("ctl-e2e").await;
    let _controller = bed.start_controller(&[("VIDEO_FPS", "1")]);
    let id = uuid();
    bed.deploy(&id, &format!("{}/vtest.avi", common::MEDIA_DIR))
        .await;
    wait_phase(&bed, &id, Phase::Running, Duration::from_secs(60)).await;
    let pod = bed.pods().get(&pod_name(&id)).await.unwrap();
    let mut cmd = bed.pod_command(&pod).await;
    let output = cmd.output().expect("run the Pod's command");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bed.bootstrap)
        .set("group.id", common::unique_name("e2e-reader"))
        .create()
        .unwrap();
    let (low, high) = consumer
        .fetch_watermarks(&bed.results, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        high - low,
        80,
        "vtest.avi (79.5 s) at VIDEO_FPS=1 gives 80 results"
    );
}
