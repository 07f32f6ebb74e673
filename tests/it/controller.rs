//! `runner controller` against the real broker and the real kube-apiserver
//! (Pods run on kwok's fake Node; no container runs, so tests finish Pods by
//! writing their status as a kubelet would).

use crate::common;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::controller::{
    Bed, ControllerProcess, DenyPolicy, Versions, assert_nothing_counted, auto_commit_interval,
    controller_rules, dead_lettered, ingested, sample, sample_or_zero,
};
use crate::common::scenario::{now_ms, pod_name, scenario_name, uuid};
use crate::common::wait_for;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use vap_runner::controller::crd::{Phase, Scenario, ScenarioSpec};

/// How long the controller may take for one step on the shared test bed
/// (parallel test runs on two cores): generous, since only a failure waits
/// this long.
const WITHIN: Duration = Duration::from_secs(180);

const WORKER_ID: &str = "11223344-5566-7788-99aa-bbccddeeeff0";
const ENQUEUED_AT: &str = "runner.vap.io/enqueued-at";

fn enqueued_at(s: &Scenario) -> Option<String> {
    s.annotations().get(ENQUEUED_AT).cloned()
}

/// The names of the objects `api` lists.
async fn names<K>(api: &Api<K>) -> BTreeSet<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = api.list(&ListParams::default()).await.expect("list");
    list.items.iter().map(|o| o.name_any()).collect()
}

/// Waits until the controller's /metrics show `queued` Scenarios waiting and
/// `live` worker Pods holding a slot.
async fn wait_slots(controller: &ControllerProcess, queued: f64, live: f64) {
    let timeout = WITHIN;
    controller
        .wait_metric("vap_controller_queue_length", timeout, |n| n == queued)
        .await;
    controller
        .wait_metric("vap_controller_live_workers", timeout, |n| n == live)
        .await;
}

/// Polls `check` for `period` and panics, naming `what`, the first time it
/// does not hold: something that must not happen within a bounded window.
async fn holds_for<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = std::time::Instant::now() + period;
    while std::time::Instant::now() < end {
        if let Err(broken) = check().await {
            panic!("{what}: {broken}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_give_one_scenario_and_one_pod() {
    let bed = Bed::new("ctl-dup").await;
    let scenarios = Versions::start(bed.scenarios(), watcher::Config::default()).await;
    let mut controller = bed.start_controller(&[]);
    let id = uuid();
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    for _ in 0..100 {
        bed.deploy(&id, &camera).await;
    }
    bed.wait_committed(&bed.deploy, 100, WITHIN).await;
    bed.wait_phase(&id, Phase::Running).await;
    controller.assert_running();
    let list = bed.scenarios().list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let pods = bed.pods().list(&ListParams::default()).await.unwrap();
    assert_eq!(pods.items.len(), 1);
    assert_eq!(pods.items[0].name_any(), pod_name(&id));
    let scn = &list.items[0];
    assert_eq!(
        scn.status.as_ref().unwrap().pod_name.as_deref(),
        Some(pod_name(&id).as_str())
    );
    assert_eq!(scn.spec.worker_id, WORKER_ID);
    assert_eq!(pods.items[0].labels()["runner.vap.io/worker-id"], WORKER_ID);

    // Each copy is a newer record of the same request: it records its stamp
    // and nothing else. One Scenario was created, one Pod, one run, and its
    // place in the queue never moved.
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &ingested("deploy", "created")), 1.0);
    assert_eq!(sample(&metrics, &ingested("deploy", "refreshed")), 99.0);
    assert_eq!(sample(&metrics, "vap_controller_pods_created_total"), 1.0);
    let versions = scenarios.seen();
    assert!(!versions.is_empty());
    let places: BTreeSet<Option<String>> = versions.iter().map(enqueued_at).collect();
    assert_eq!(places.len(), 1, "enqueued-at changed: {places:?}");
    assert!(places.iter().all(Option::is_some), "enqueued-at is set");
    assert!(
        versions.iter().all(|s| s.spec.run == 1),
        "a copy started a new run"
    );

    // The same records read again (the consumer group rewound, as an
    // operator replaying the topic would): every one is a duplicate and the
    // Scenario is not written at all.
    assert!(controller.terminate().success());
    let before = bed.scenarios().get(&scenario_name(&id)).await.unwrap();
    let pod_before = bed.pods().get(&pod_name(&id)).await.unwrap();
    bed.rewind(&bed.deploy).await;
    let replayed = bed.start_controller(&[]);
    bed.wait_committed(&bed.deploy, 100, WITHIN).await;
    let metrics = replayed.metrics().await;
    assert_eq!(
        sample(&metrics, &ingested("deploy", "duplicate")),
        100.0,
        "every record read again is a duplicate"
    );
    assert_eq!(
        sample_or_zero(&metrics, &ingested("deploy", "created")),
        0.0
    );
    assert_eq!(
        sample_or_zero(&metrics, &ingested("deploy", "refreshed")),
        0.0
    );
    assert_eq!(sample(&metrics, "vap_controller_pods_created_total"), 0.0);
    let after = bed.scenarios().get(&scenario_name(&id)).await.unwrap();
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(
        serde_json::to_value(&after.spec).unwrap(),
        serde_json::to_value(&before.spec).unwrap()
    );
    assert_eq!(enqueued_at(&after), enqueued_at(&before));
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "nothing rewrote the Scenario"
    );
    let pod_after = bed.pods().get(&pod_name(&id)).await.unwrap();
    assert_eq!(pod_after.metadata.uid, pod_before.metadata.uid);
    assert_eq!(bed.phase(&id).await, Some(Phase::Running));
}

/// A worker slot the platform's policy refuses Scenarios for.
const REFUSED_WORKER: &str = "99999999-5566-7788-99aa-bbccddeeeff0";
const POLICY_MESSAGE: &str = "this worker slot is retired";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_the_dlq_and_valid_ones_go_on() {
    let bed = Bed::new("ctl-dlq").await;
    let refused = uuid();
    let probe = Scenario::new(
        "scn-policy-probe",
        ScenarioSpec {
            scenario_uuid: refused.clone(),
            worker_id: REFUSED_WORKER.into(),
            camera_url: String::new(),
            fps: None,
            model: None,
            target: None,
            stopped: false,
            applied: Default::default(),
            run: 1,
        },
    );
    let _policy = DenyPolicy::new(
        &bed,
        ("runner.vap.io", "scenarios"),
        &format!("object.spec.workerId != '{REFUSED_WORKER}'"),
        POLICY_MESSAGE,
        &bed.scenarios(),
        &probe,
    )
    .await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "10")]);
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
    // Where each dead letter must come from: (topic, offset) → (value, reason).
    let mut expected: BTreeMap<(String, i64), (Vec<u8>, &str)> = BTreeMap::new();
    let mut offset = 0;
    let mut valid = Vec::new();
    for (i, (payload, reason)) in corpus.iter().enumerate() {
        bed.send(&bed.deploy, Some("bad"), payload).await;
        expected.insert((bed.deploy.clone(), offset), (payload.clone(), reason));
        offset += 1;
        if i % 5 == 0 {
            let id = uuid();
            bed.deploy(&id, &camera).await;
            offset += 1;
            valid.push(id);
        }
    }
    // A request that parses but the API server refuses: here a policy of
    // the platform's refuses one worker slot's Scenarios.
    bed.deploy_as(&refused, REFUSED_WORKER, &camera).await;
    expected.insert(
        (bed.deploy.clone(), offset),
        (
            common::deploy_body_as(&refused, REFUSED_WORKER, &camera),
            "rejected_by_kubernetes",
        ),
    );
    let deploys = offset + 1;
    let undeploy_corpus: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "empty"),
        (b"stop it".to_vec(), "not_json"),
        (b"[]".to_vec(), "not_object"),
        (b"{}".to_vec(), "missing_field"),
        (br#"{"scenario_uuid": 7}"#.to_vec(), "wrong_type"),
        (br#"{"scenario_uuid": "nope"}"#.to_vec(), "bad_uuid"),
    ];
    for (offset, (payload, reason)) in (0..).zip(&undeploy_corpus) {
        bed.send(&bed.undeploy, Some("bad"), payload).await;
        expected.insert((bed.undeploy.clone(), offset), (payload.clone(), reason));
    }

    let letters = bed.read_topic(&bed.dlq, expected.len()).await;
    let mut seen = BTreeSet::new();
    for letter in &letters {
        let topic = letter.header("source_topic").to_string();
        assert_eq!(letter.header("source_partition"), "0");
        let offset: i64 = letter.header("source_offset").parse().expect("an offset");
        let (payload, reason) = expected
            .get(&(topic.clone(), offset))
            .unwrap_or_else(|| panic!("dead letter from {topic}@{offset} was valid: {letter:?}"));
        assert_eq!(&letter.payload, payload, "DLQ keeps the original value");
        assert_eq!(
            letter.header("reason"),
            *reason,
            "reason for {}",
            String::from_utf8_lossy(payload)
        );
        assert!(!letter.header("error").is_empty(), "error header");
        assert!(
            seen.insert((topic, offset)),
            "dead-lettered twice: {letter:?}"
        );
    }
    let refused_letter = letters
        .iter()
        .find(|l| l.header("reason") == "rejected_by_kubernetes")
        .unwrap();
    assert!(
        refused_letter.header("error").contains(POLICY_MESSAGE),
        "the API server's refusal is quoted: {refused_letter:?}"
    );
    assert_eq!(refused_letter.key.as_deref(), Some(refused.as_bytes()));

    // Everything was handled; valid work around the bad went on, and the
    // only Scenarios are the valid ones.
    bed.wait_committed(&bed.deploy, deploys, WITHIN).await;
    bed.wait_committed(&bed.undeploy, undeploy_corpus.len() as i64, WITHIN)
        .await;
    for id in &valid {
        bed.wait_phase(id, Phase::Running).await;
    }
    assert_eq!(
        names(&bed.scenarios()).await,
        valid.iter().map(|id| scenario_name(id)).collect(),
        "no Scenario for an invalid or refused message"
    );
    assert_eq!(bed.messages_in(&bed.dlq), expected.len() as i64);

    controller
        .wait_metric("vap_controller_live_workers", WITHIN, |n| {
            n == valid.len() as f64
        })
        .await;
    let metrics = controller.metrics().await;
    let mut per_reason: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, reason) in expected.values() {
        *per_reason.entry(reason).or_default() += 1.0;
    }
    for (reason, n) in &per_reason {
        assert_eq!(sample(&metrics, &dead_lettered(reason)), *n, "{reason}");
    }
    assert_eq!(
        sample(&metrics, &ingested("deploy", "dead_lettered")),
        (corpus.len() + 1) as f64
    );
    assert_eq!(
        sample(&metrics, &ingested("undeploy", "dead_lettered")),
        undeploy_corpus.len() as f64
    );
    assert_eq!(
        sample(&metrics, &ingested("deploy", "created")),
        valid.len() as f64
    );
    assert!(
        sample(&metrics, "vap_controller_reconciles_total{result=\"ok\"}") >= valid.len() as f64
    );
}

/// A deploy its producer stamped far in the future would win over every
/// undeploy of its scenario until that time: it is dead-lettered as
/// `stamped_ahead`, naming the setting and the fix, and nothing runs. One
/// stamped within MAX_CLOCK_SKEW_SECS is taken as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_stamped_ahead_of_the_clock_is_dead_lettered() {
    let bed = Bed::new("ctl-ahead").await;
    let controller = bed.start_controller(&[("MAX_CLOCK_SKEW_SECS", "60")]);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let forged = uuid();
    bed.deploy_at(&forged, &camera, now_ms() + 3_600_000).await;
    let skewed = uuid();
    bed.deploy_at(&skewed, &camera, now_ms() + 20_000).await;

    let letters = bed.read_topic(&bed.dlq, 1).await;
    assert_eq!(letters[0].header("reason"), "stamped_ahead", "{letters:?}");
    assert_eq!(letters[0].key.as_deref(), Some(forged.as_bytes()));
    let error = letters[0].header("error");
    assert!(
        error.contains("MAX_CLOCK_SKEW_SECS=60") && error.contains("LogAppendTime"),
        "the error names the setting and the fix: {error}"
    );
    bed.wait_phase(&skewed, Phase::Running).await;
    bed.wait_committed(&bed.deploy, 2, WITHIN).await;
    assert_eq!(bed.messages_in(&bed.dlq), 1);
    assert!(
        bed.scenarios()
            .get_opt(&scenario_name(&forged))
            .await
            .expect("read Scenarios")
            .is_none(),
        "no Scenario for the forged deploy"
    );
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &dead_lettered("stamped_ahead")), 1.0);
    assert_eq!(sample(&metrics, &ingested("deploy", "created")), 1.0);
}

/// MAX_QUEUED bounds what a flood of distinct scenarios can queue: with one
/// slot and two places, the fourth and fifth of five deploys are
/// dead-lettered as `queue_full` and leave no Scenario; a replay of an
/// admitted one is no new scenario and passes; a stop makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_past_max_queued_is_dead_lettered_as_queue_full() {
    let bed = Bed::new("ctl-qfull").await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "1"), ("MAX_QUEUED", "2")]);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let ids: Vec<String> = (0..5).map(|_| uuid()).collect();
    let at = now_ms();
    for (i, id) in ids.iter().enumerate() {
        bed.deploy_at(id, &camera, at + i as i64).await;
    }
    bed.wait_committed(&bed.deploy, 5, WITHIN).await;

    let letters = bed.read_topic(&bed.dlq, 2).await;
    let refused: BTreeSet<String> = letters
        .iter()
        .map(|l| String::from_utf8_lossy(l.key.as_deref().unwrap_or_default()).to_string())
        .collect();
    for letter in &letters {
        assert_eq!(letter.header("reason"), "queue_full", "{letters:?}");
        assert!(
            letter.header("error").contains("MAX_QUEUED=2"),
            "the error names the setting: {}",
            letter.header("error")
        );
    }
    let stored = names(&bed.scenarios()).await;
    let admitted: Vec<&String> = ids
        .iter()
        .filter(|id| stored.contains(&scenario_name(id)))
        .collect();
    assert_eq!(admitted.len(), 3, "one runs and two wait: {stored:?}");
    assert!(
        admitted.iter().all(|id| !refused.contains(*id)) && refused.len() == 2,
        "each deploy is either stored or refused: {refused:?}, {admitted:?}"
    );
    wait_slots(&controller, 2.0, 1.0).await;
    assert_eq!(bed.messages_in(&bed.dlq), 2);
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &dead_lettered("queue_full")), 2.0);
    assert_eq!(sample(&metrics, &ingested("deploy", "created")), 3.0);

    // A replay of an admitted deploy is not a new scenario: it passes.
    let first = admitted[0];
    let first_at = at + ids.iter().position(|id| id == first).unwrap() as i64;
    bed.deploy_at(first, &camera, first_at).await;
    bed.wait_committed(&bed.deploy, 6, WITHIN).await;
    assert_eq!(bed.messages_in(&bed.dlq), 2);

    // A stop makes room: a refused scenario deployed again is stored.
    let mut waiting = None;
    for id in &admitted {
        if bed.phase(id).await == Some(Phase::Queued) {
            waiting = Some(*id);
        }
    }
    let waiting = waiting.expect("a waiting scenario");
    bed.undeploy_at(waiting, now_ms()).await;
    bed.wait_phase(waiting, Phase::Stopped).await;
    let again = refused.iter().next().unwrap();
    bed.deploy_at(again, &camera, now_ms()).await;
    bed.wait_phase(again, Phase::Queued).await;
    assert_eq!(bed.messages_in(&bed.dlq), 2);
    assert_eq!(controller.metric(&dead_lettered("queue_full")).await, 2.0);
}

/// A UDP socket on port 53 of a loopback address of its own that never
/// answers: a resolver pointed at it waits for its whole timeout.
struct SilentNameServer {
    _socket: std::net::UdpSocket,
    resolv_conf: std::path::PathBuf,
}

impl SilentNameServer {
    fn start(dir: &std::path::Path) -> SilentNameServer {
        let (a, b) = (rand_byte(), rand_byte());
        let addr = format!("127.53.{a}.{}", b.max(1));
        let socket = std::net::UdpSocket::bind(format!("{addr}:53")).expect("bind port 53");
        let resolv_conf = dir.join("resolv.conf");
        std::fs::write(
            &resolv_conf,
            format!("nameserver {addr}\noptions timeout:30 attempts:1\n"),
        )
        .expect("write resolv.conf");
        SilentNameServer {
            _socket: socket,
            resolv_conf,
        }
    }

    /// A command prefix that runs its arguments in a mount namespace of
    /// their own whose /etc/resolv.conf names this server.
    fn wrapper(&self) -> Vec<String> {
        let mount = format!(
            "mount --bind {} /etc/resolv.conf && exec \"$@\"",
            self.resolv_conf.display()
        );
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([mount, "sh".to_string()])
        .collect()
    }
}

fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

/// Ingest handles commands of different scenarios side by side: a camera
/// name whose look-up hangs (the name server never answers; ingest gives it
/// two seconds) holds up only its own scenario. The three deploys read after
/// it are stored first; the newer deploy of the slow scenario, read right
/// after the slow one, is still applied after it (it replaces the camera
/// rather than being overtaken by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_camera_name_holds_up_only_its_own_scenario() {
    let bed = Bed::new("ctl-slowdns").await;
    let dns = SilentNameServer::start(bed.logs.path());
    let wrapper = dns.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let controller = bed.start_controller_under(&wrapper, &[]);
    let log = Versions::start(bed.scenarios(), watcher::Config::default()).await;
    let slow = uuid();
    let fast: Vec<String> = (0..3).map(|_| uuid()).collect();
    let clip = format!("{}/vtest.avi", common::MEDIA_DIR);
    let at = now_ms();
    bed.deploy_at(&slow, "rtsp://camera.slow-dns.test/stream", at)
        .await;
    bed.deploy_at(&slow, &clip, at + 1).await;
    for id in &fast {
        bed.deploy_at(id, &clip, at + 2).await;
    }
    bed.wait_committed(&bed.deploy, 5, WITHIN).await;

    // Read after the slow deploy, the newer one was applied after it.
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &ingested("deploy", "created")), 4.0);
    assert_eq!(sample(&metrics, &ingested("deploy", "replaced")), 1.0);
    assert_eq!(
        sample_or_zero(&metrics, &ingested("deploy", "overtaken")),
        0.0
    );
    let scenario = bed.scenarios().get(&scenario_name(&slow)).await.unwrap();
    assert_eq!(
        (scenario.spec.run, scenario.spec.camera_url.as_str()),
        (2, clip.as_str())
    );

    let order = log.first_seen();
    let slow_at = order
        .iter()
        .position(|n| *n == scenario_name(&slow))
        .expect("the slow scenario was written");
    for id in &fast {
        let fast_at = order.iter().position(|n| *n == scenario_name(id));
        assert!(
            fast_at.is_some_and(|f| f < slow_at),
            "{id} was stored before the slow scenario: {order:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeploy_stops_frees_the_slot_and_a_replayed_deploy_is_ignored() {
    let bed = Bed::new("ctl-undeploy").await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "1")]);
    let (id, next) = (uuid(), uuid());
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let deployed_at = chrono::Utc::now().timestamp_millis();
    bed.deploy_at(&id, &camera, deployed_at).await;
    bed.wait_phase(&id, Phase::Running).await;
    bed.deploy(&next, &camera).await;
    bed.wait_phase(&next, Phase::Queued).await;
    wait_slots(&controller, 1.0, 1.0).await;

    bed.undeploy_at(&id, deployed_at + 1).await;
    bed.wait_phase(&id, Phase::Stopped).await;
    wait_for("the worker Pod to be gone", WITHIN, || async {
        match bed.pods().get_opt(&pod_name(&id)).await {
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;
    // Its slot is free: the scenario that waited starts.
    bed.wait_phase(&next, Phase::Running).await;
    wait_slots(&controller, 0.0, 1.0).await;
    assert_eq!(
        controller.metric(&ingested("undeploy", "stopped")).await,
        1.0
    );

    // A replay of the original request (its record's own timestamp) changes
    // nothing: watched from before it is sent until two auto-commit
    // intervals after its offset is committed, the scenario never changes
    // and no worker Pod of it appears.
    let stopped = bed.scenarios().get(&scenario_name(&id)).await.unwrap();
    let pod_field = format!("metadata.name={}", pod_name(&id));
    let scenario_field = format!("metadata.name={}", scenario_name(&id));
    let pods = watcher(bed.pods(), watcher::Config::default().fields(&pod_field))
        .default_backoff()
        .applied_objects()
        .filter_map(|pod| async move {
            let pod = pod.ok()?;
            Some(format!("a worker Pod appeared: {:?}", pod.status))
        });
    let scenario_changes = watcher(
        bed.scenarios(),
        watcher::Config::default().fields(&scenario_field),
    )
    .default_backoff()
    .applied_objects()
    .filter_map(|scn| {
        let generation = stopped.metadata.generation;
        async move {
            let s = scn.ok()?;
            let phase = s.status.as_ref().and_then(|st| st.phase);
            let unchanged = s.metadata.generation == generation && phase == Some(Phase::Stopped);
            (!unchanged).then(|| format!("the Scenario was revived: {phase:?}, {:?}", s.spec))
        }
    });
    let mut revivals = futures::stream::select(pods.boxed(), scenario_changes.boxed());
    let replay = async {
        bed.deploy_at(&id, &camera, deployed_at).await;
        bed.wait_committed(&bed.deploy, 3, WITHIN).await;
    };
    tokio::select! {
        revived = revivals.next() => panic!("{revived:?}"),
        () = replay => {}
    }
    if let Ok(revived) = tokio::time::timeout(2 * auto_commit_interval(), revivals.next()).await {
        panic!("{revived:?}");
    }
    assert_eq!(bed.phase(&id).await, Some(Phase::Stopped));
    assert!(bed.pods().get_opt(&pod_name(&id)).await.unwrap().is_none());
    assert_eq!(bed.phase(&next).await, Some(Phase::Running));
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &ingested("deploy", "overtaken")), 1.0);
    assert_eq!(sample(&metrics, "vap_controller_live_workers"), 1.0);
    assert_eq!(sample(&metrics, "vap_controller_pods_created_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_nothing_and_duplicates_nothing() {
    let bed = Bed::new("ctl-crash").await;
    let identity = bed.identity("runner", controller_rules(&[])).await;
    let settings = [("MAX_WORKERS", "100"), identity.env()];
    let mut controller = bed.start_controller(&settings);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let ids: Vec<String> = (0..60).map(|_| uuid()).collect();
    for id in &ids[..20] {
        bed.deploy(id, &camera).await;
    }
    bed.wait_committed(&bed.deploy, 20, WITHIN).await;

    // From here the controller's identity may write Scenarios but not their
    // camera Secrets: ingest writes the 21st Scenario and stays on its
    // message, after the write and before the offset.
    bed.set_rules(&identity, controller_rules(&[("secrets", "create")]))
        .await;
    bed.wait_access(&identity, ("", "secrets", "create"), false)
        .await;
    for id in &ids[20..40] {
        bed.deploy(id, &camera).await;
    }
    let stuck = scenario_name(&ids[20]);
    wait_for(
        "the 21st Scenario written and its Secret refused",
        WITHIN,
        || async {
            let written = bed.scenarios().get_opt(&stuck).await.ok()??;
            let retries = controller
                .metric("vap_controller_kubernetes_retries_total")
                .await;
            (retries > 0.0).then_some(written)
        },
    )
    .await;
    // Longer than an auto-commit interval: its offset is never committed
    // and ingest does not move past it.
    let next = scenario_name(&ids[21]);
    holds_for(
        "the offset of a message whose effect is not complete",
        2 * auto_commit_interval(),
        || async {
            let committed = bed.committed(&bed.deploy);
            if committed != 20 {
                return Err(format!("{committed} offsets committed"));
            }
            match bed.scenarios().get_opt(&next).await {
                Ok(None) => Ok(()),
                other => Err(format!("ingest moved past it: {other:?}")),
            }
        },
    )
    .await;
    let generation = bed
        .scenarios()
        .get(&stuck)
        .await
        .unwrap()
        .metadata
        .generation;
    controller.kill9();

    bed.set_rules(&identity, controller_rules(&[])).await;
    bed.wait_access(&identity, ("", "secrets", "create"), true)
        .await;
    for id in &ids[40..] {
        bed.deploy(id, &camera).await;
    }
    let restarted = bed.start_controller(&settings);
    bed.wait_committed(&bed.deploy, 60, WITHIN).await;
    for id in &ids {
        bed.wait_phase(id, Phase::Running).await;
    }
    let scenario_names: BTreeSet<String> = ids.iter().map(|id| scenario_name(id)).collect();
    assert_eq!(names(&bed.scenarios()).await, scenario_names);
    let pod_names: BTreeSet<String> = ids.iter().map(|id| pod_name(id)).collect();
    assert_eq!(names(&bed.pods()).await, pod_names, "one Pod per scenario");

    // The message read again whose Scenario was written before the kill
    // only adds the missing Secret; the 39 whose write had not happened are
    // created, once each.
    let metrics = restarted.metrics().await;
    assert_eq!(
        sample(&metrics, &ingested("deploy", "duplicate")),
        1.0,
        "the message whose Scenario was written before the kill"
    );
    assert_eq!(
        sample(&metrics, &ingested("deploy", "created")),
        39.0,
        "the messages whose write had not happened"
    );
    assert_eq!(
        sample_or_zero(&metrics, &ingested("deploy", "refreshed")),
        0.0
    );
    let after = bed.scenarios().get(&stuck).await.unwrap();
    assert_eq!(after.metadata.generation, generation, "rewritten");
    let secrets: BTreeSet<String> = names(&Api::<Secret>::namespaced(
        bed.client.clone(),
        &bed.namespace,
    ))
    .await
    .into_iter()
    .filter(|name| name.starts_with("scn-"))
    .collect();
    assert_eq!(
        secrets,
        ids.iter().map(|id| format!("scn-{id}-camera")).collect(),
        "every scenario's camera Secret, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_api_unavailable_ingest_never_moves_past_a_message() {
    let bed = Bed::new("ctl-noapi").await;
    let denied = ("runner.vap.io", "scenarios", "create");
    let identity = bed
        .identity("runner", controller_rules(&[("scenarios", "create")]))
        .await;
    bed.wait_access(&identity, denied, false).await;
    let scenarios = Versions::start(bed.scenarios(), watcher::Config::default()).await;
    let controller = bed.start_controller(&[identity.env()]);
    let camera = format!("{}/vtest.avi", common::MEDIA_DIR);
    let ids: Vec<String> = (0..3).map(|_| uuid()).collect();
    for id in &ids {
        bed.deploy(id, &camera).await;
    }
    controller
        .wait_metric("vap_controller_kubernetes_retries_total", WITHIN, |n| {
            n > 0.0
        })
        .await;
    holds_for(
        "ingest while it cannot write Scenarios",
        2 * auto_commit_interval(),
        || async {
            if let Some(n) = bed.committed_offset(&bed.deploy) {
                return Err(format!("offset {n} committed"));
            }
            let written = scenarios.first_seen();
            if !written.is_empty() {
                return Err(format!("Scenarios appeared: {written:?}"));
            }
            match bed.messages_in(&bed.dlq) {
                0 => Ok(()),
                n => Err(format!("{n} messages dead-lettered")),
            }
        },
    )
    .await;
    let metrics = controller.metrics().await;
    assert_nothing_counted(&metrics, "vap_controller_dead_lettered_total");
    assert_nothing_counted(&metrics, "vap_controller_ingested_total");

    bed.set_rules(&identity, controller_rules(&[])).await;
    bed.wait_access(&identity, denied, true).await;
    bed.wait_committed(&bed.deploy, 3, WITHIN).await;
    for id in &ids {
        bed.wait_phase(id, Phase::Running).await;
    }
    assert_eq!(
        scenarios.first_seen(),
        ids.iter().map(|id| scenario_name(id)).collect::<Vec<_>>(),
        "written in the order they were sent"
    );
    controller
        .wait_metric("vap_controller_live_workers", WITHIN, |n| n == 3.0)
        .await;
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &ingested("deploy", "created")), 3.0);
    assert!(sample(&metrics, "vap_controller_kubernetes_retries_total") > 0.0);
    assert!(sample(&metrics, "vap_controller_reconciles_total{result=\"ok\"}") > 0.0);
    assert_eq!(bed.messages_in(&bed.dlq), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pods_are_recreated_and_deleted_scenarios_take_their_pod() {
    let bed = Bed::new("ctl-delete").await;
    let _controller = bed.start_controller(&[]);
    let id = uuid();
    bed.deploy(&id, &format!("{}/vtest.avi", common::MEDIA_DIR))
        .await;
    bed.wait_phase(&id, Phase::Running).await;
    let first_uid = bed.pods().get(&pod_name(&id)).await.unwrap().metadata.uid;
    bed.pods()
        .delete(&pod_name(&id), &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_for("the worker Pod to be recreated", WITHIN, || async {
        let pod = bed.pods().get_opt(&pod_name(&id)).await.ok()??;
        (pod.metadata.uid != first_uid && pod.metadata.deletion_timestamp.is_none()).then_some(())
    })
    .await;
    bed.scenarios()
        .delete(&scenario_name(&id), &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the worker Pod to go with its Scenario", WITHIN, || async {
        match bed.pods().get_opt(&pod_name(&id)).await {
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_spec_written_by_the_controller_runs_as_a_real_worker() {
    let bed = Bed::new("ctl-e2e").await;
    let _controller = bed.start_controller(&[("VIDEO_FPS", "1")]);
    let id = uuid();
    bed.deploy(&id, &format!("{}/vtest.avi", common::MEDIA_DIR))
        .await;
    bed.wait_phase(&id, Phase::Running).await;
    let pod = bed.pods().get(&pod_name(&id)).await.unwrap();
    // The bed's broker also answers at the worker's default address
    // (localhost:9092), so the run alone would not show the setting missing.
    let env = pod.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter().any(|e| e.name == "KAFKA_BOOTSTRAP_SERVERS"
            && e.value.as_deref() == Some(bed.bootstrap.as_str())),
        "the Pod carries the controller's KAFKA_BOOTSTRAP_SERVERS: {env:?}"
    );
    let mut cmd = bed.pod_command(&pod).await;
    let output = cmd.output().expect("run the Pod's command");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    assert_eq!(
        bed.messages_in(&bed.results),
        80,
        "vtest.avi (79.5 s) at VIDEO_FPS=1 gives 80 results"
    );
}

/// The start-up check reads the Scenario's status schema as the real API
/// server publishes it: with this release's CRD it finds every status field
/// (the controller starts), and the same document without `status.writer`,
/// as an older CRD publishes it, is judged stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_status_schema_is_judged_against_the_controllers_own() {
    use vap_runner::controller::crd::{published_schema_path, status_fields_missing};
    let client = common::kube_client().await;
    common::controller::ensure_crd(&client).await;
    // Published a few seconds after the CRD is established.
    let document = wait_for("the Scenario schema to be published", WITHIN, || {
        let client = client.clone();
        async move {
            let request = http::Request::get(published_schema_path())
                .body(Vec::new())
                .unwrap();
            client.request::<serde_json::Value>(request).await.ok()
        }
    })
    .await;
    assert_eq!(status_fields_missing(&document), Some(vec![]));

    let mut older = document.clone();
    let schemas = older["components"]["schemas"].as_object_mut().unwrap();
    let scenario = schemas
        .iter_mut()
        .find(|(key, _)| key.ends_with(".Scenario"))
        .map(|(_, schema)| schema)
        .expect("the document holds the Scenario schema");
    scenario["properties"]["status"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("writer")
        .expect("the published status has writer");
    assert_eq!(
        status_fields_missing(&older),
        Some(vec!["writer".to_string()])
    );
}
