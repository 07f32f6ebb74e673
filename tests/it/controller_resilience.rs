//! `runner controller` under what real clusters and real Kafka do: commands
//! read out of order, crash loops, evictions and disruptions, Pods the cluster
//! refuses, and the CRD's own validation in the apiserver. Pods run on kwok's
//! fake Node; tests write Pod status as a kubelet would.

use crate::common;
use std::time::Duration;

use crate::common::controller::{
    Bed, DenyPolicy, HangingWebhook, PodWatch, SCENARIO_WITHIN, Versions, controller_rules,
    dead_lettered, holds_slot, sample, worker_exited,
};
use crate::common::scenario::{now_ms, phase, pod_name, scenario_name, uuid};
use crate::common::wait_for;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use vap_runner::controller::crd::{Phase, Scenario};

const LIVE: &str = "rtsp://camera.example/stream";

/// The Ready condition's (status, reason).
fn ready(s: &Scenario) -> Option<(String, String)> {
    let c = s.status.as_ref()?.condition("Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// Waits for a worker Pod of `id` other than the one with `old_uid`, not being deleted.
async fn wait_new_pod(bed: &Bed, id: &str, old_uid: Option<&str>) -> Pod {
    wait_for(
        &format!("a new worker Pod for {id}"),
        SCENARIO_WITHIN,
        || async move {
            let pod = bed.pods().get_opt(&pod_name(id)).await.ok()??;
            (pod.metadata.uid.as_deref() != old_uid && pod.metadata.deletion_timestamp.is_none())
                .then_some(pod)
        },
    )
    .await
}

/// Waits until kwok has finished with the worker Pod of `id` (see
/// [`kwok_is_done`](common::controller::kwok_is_done)), then returns it.
async fn wait_running_pod(bed: &Bed, id: &str) -> Pod {
    bed.wait_kwok_done(&pod_name(id)).await
}

/// With MAX_WORKERS=1: deploys a live scenario and waits until it runs, then
/// a second one and waits until it is queued behind the first.
async fn one_running_one_queued(bed: &Bed) -> (String, String) {
    let (a, b) = (uuid(), uuid());
    bed.deploy(&a, LIVE).await;
    bed.wait_phase(&a, Phase::Running).await;
    bed.deploy(&b, LIVE).await;
    bed.wait_scenario(&b, "queued", |s| phase(s) == Some(Phase::Queued))
        .await;
    (a, b)
}

/// Ends a replacement with MAX_WORKERS=1: the scenario `queued` still waits
/// (the replaced worker kept its slot), and at no moment did more than one
/// Pod hold a slot.
async fn kept_its_slot(bed: &Bed, queued: &str, watch: PodWatch) {
    let s = bed.scenarios().get(&scenario_name(queued)).await.unwrap();
    assert_eq!(
        phase(&s),
        Some(Phase::Queued),
        "the replaced worker keeps its slot"
    );
    let max = watch.finish().await.most_holding_slots(|_| true);
    assert!(max <= 1, "saw {max} live worker Pods with MAX_WORKERS=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_record_time_whatever_order_they_are_read_in() {
    let bed = Bed::new("ctl-order").await;
    let clip = common::media("vtest.avi");
    let other = common::media("Megamind.avi");
    let id = uuid();
    let t0 = now_ms() - 60_000;

    // The undeploy is read before the (older) deploy it undoes.
    bed.undeploy_at(&id, t0 + 1_000).await;
    let mut controller = bed.start_controller(&[]);
    bed.wait_scenario(&id, "a stopped tombstone", |s| {
        phase(s) == Some(Phase::Stopped)
    })
    .await;
    bed.deploy_at(&id, &clip, t0).await;
    bed.wait_committed(&bed.deploy, 1, Duration::from_secs(60))
        .await;
    let s = bed.scenarios().get(&scenario_name(&id)).await.unwrap();
    assert_eq!(
        phase(&s),
        Some(Phase::Stopped),
        "an older deploy never runs"
    );
    assert_eq!(s.spec.run, 0);
    assert!(bed.pods().get_opt(&pod_name(&id)).await.unwrap().is_none());

    // A deploy newer than the stop runs the scenario again.
    bed.deploy_at(&id, &clip, t0 + 2_000).await;
    bed.wait_scenario(&id, "running again", |s| phase(s) == Some(Phase::Running))
        .await;
    let first = wait_running_pod(&bed, &id).await;

    // A replay older than what was applied changes nothing.
    bed.deploy_at(&id, &clip, t0 + 500).await;
    bed.wait_committed(&bed.deploy, 3, Duration::from_secs(60))
        .await;
    let s = bed.scenarios().get(&scenario_name(&id)).await.unwrap();
    assert_eq!((s.spec.run, phase(&s)), (1, Some(Phase::Running)));
    let same = bed.pods().get(&pod_name(&id)).await.unwrap();
    assert_eq!(same.uid(), first.uid(), "the worker was left alone");

    // A newer deploy with another camera replaces the worker.
    bed.deploy_at(&id, &other, t0 + 3_000).await;
    let replaced = wait_new_pod(&bed, &id, first.uid().as_deref()).await;
    assert_eq!(replaced.labels()["runner.vap.io/run"], "2");
    let s = bed
        .wait_scenario(&id, "running on the new camera", |s| {
            phase(s) == Some(Phase::Running) && s.status.as_ref().unwrap().observed_run == 2
        })
        .await;
    assert_eq!(s.spec.camera_url, other);
    controller.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_shows_then_fails_after_the_budget_and_frees_the_slot() {
    let bed = Bed::new("ctl-crash-loop").await;
    let mut controller =
        bed.start_controller(&[("MAX_WORKERS", "1"), ("WORKER_RESTART_LIMIT", "2")]);
    let (a, b) = one_running_one_queued(&bed).await;
    wait_running_pod(&bed, &a).await;

    let crashing = |restarts: i32| {
        json!({
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": "worker", "image": "vap-runner:test", "imageID": "", "ready": false,
                "restartCount": restarts,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}
            }]
        })
    };
    bed.set_pod_status(&pod_name(&a), crashing(1)).await;
    let s = bed
        .wait_scenario(&a, "not ready, crash-looping", |s| {
            ready(s) == Some(("False".into(), "CrashLoopBackOff".into()))
        })
        .await;
    let error = s.status.unwrap().last_error.unwrap_or_default();
    assert!(error.contains("exited with code 1"), "lastError: {error}");

    bed.set_pod_status(&pod_name(&a), crashing(2)).await;
    let s = bed
        .wait_scenario(&a, "failed after its restart budget", |s| {
            phase(s) == Some(Phase::Failed)
        })
        .await;
    assert_eq!(
        ready(&s),
        Some(("False".into(), "RestartLimitReached".into()))
    );
    bed.wait_scenario(&b, "started in the freed slot", |s| {
        phase(s) == Some(Phase::Running)
    })
    .await;
    controller.assert_running();
}

/// The verdict is written before its act. With status writes refused, a
/// worker past its restart budget keeps its Pod (deleting it first would
/// leave the Scenario `Running` with no Pod, and after a restart a fresh
/// budget); once writes are allowed again the Scenario is `Failed` first,
/// then its Pod goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_is_written_before_its_pod_is_deleted() {
    let bed = Bed::new("ctl-verdict").await;
    let identity = bed.identity("runner", controller_rules(&[])).await;
    let mut controller = bed.start_controller(&[("WORKER_RESTART_LIMIT", "1"), identity.env()]);
    let id = uuid();
    bed.deploy(&id, LIVE).await;
    let first = wait_running_pod(&bed, &id).await;
    bed.wait_phase(&id, Phase::Running).await;

    bed.set_rules(
        &identity,
        controller_rules(&[("scenarios/status", "patch")]),
    )
    .await;
    bed.wait_access(
        &identity,
        ("runner.vap.io", "scenarios/status", "patch"),
        false,
    )
    .await;
    // One restart, and the budget is one: the controller gives up.
    bed.set_pod_status(
        &pod_name(&id),
        json!({
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": "worker", "image": "vap-runner:test", "imageID": "", "ready": false,
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}
            }]
        }),
    )
    .await;
    const REFUSED: &str = "vap_controller_reconcile_errors_total{category=\"forbidden\"}";
    controller
        .wait_metric(REFUSED, SCENARIO_WITHIN, |v| v >= 2.0)
        .await;
    let pod = bed.pods().get_opt(&pod_name(&id)).await.unwrap();
    assert!(
        pod.as_ref()
            .is_some_and(|p| p.uid() == first.uid() && p.metadata.deletion_timestamp.is_none()),
        "the Pod was deleted before its verdict could be written: {pod:?}"
    );
    assert_eq!(bed.phase(&id).await, Some(Phase::Running));

    bed.set_rules(&identity, controller_rules(&[])).await;
    let s = bed.wait_phase(&id, Phase::Failed).await;
    assert_eq!(
        ready(&s),
        Some(("False".into(), "RestartLimitReached".into()))
    );
    wait_for(
        "the given-up worker's Pod to go",
        SCENARIO_WITHIN,
        || async {
            match bed.pods().get_opt(&pod_name(&id)).await {
                Ok(None) => Some(()),
                Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => Some(()),
                _ => None,
            }
        },
    )
    .await;
    controller.assert_running();
}

/// A verdict whose status write is refused is not taken as written: once
/// the refusal ends it is decided again from what the cluster holds. Here a
/// clip's Pod ends while status writes are denied and is then removed before
/// its verdict could land; the run, with no record of its end, gets a new
/// worker rather than waiting for a status change that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_that_could_not_be_written_is_decided_again() {
    let bed = Bed::new("ctl-unwritten").await;
    let identity = bed.identity("runner", controller_rules(&[])).await;
    let controller = bed.start_controller(&[identity.env()]);
    let id = uuid();
    bed.deploy(&id, &common::media("vtest.avi")).await;
    let first = wait_running_pod(&bed, &id).await;
    bed.wait_phase(&id, Phase::Running).await;

    let denied = ("runner.vap.io", "scenarios/status", "patch");
    bed.set_rules(
        &identity,
        controller_rules(&[("scenarios/status", "patch")]),
    )
    .await;
    bed.wait_access(&identity, denied, false).await;
    const REFUSED: &str = "vap_controller_reconcile_errors_total{category=\"forbidden\"}";
    bed.set_pod_status(&pod_name(&id), worker_exited(0)).await;
    controller
        .wait_metric(REFUSED, SCENARIO_WITHIN, |v| v >= 1.0)
        .await;
    // The ended Pod goes before its verdict was written.
    bed.pods()
        .delete(&pod_name(&id), &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the ended worker Pod");
    wait_for("the ended worker Pod to go", SCENARIO_WITHIN, || async {
        let pod = bed.pods().get_opt(&pod_name(&id)).await.ok()?;
        pod.is_none_or(|p| p.uid() != first.uid()).then_some(())
    })
    .await;
    assert_eq!(bed.phase(&id).await, Some(Phase::Running));

    bed.set_rules(&identity, controller_rules(&[])).await;
    wait_new_pod(&bed, &id, first.uid().as_deref()).await;
    bed.wait_scenario(&id, "starting or running again", |s| {
        matches!(phase(s), Some(Phase::Starting | Phase::Running))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_and_disrupted_pods_are_replaced_within_max_workers() {
    let bed = Bed::new("ctl-evict").await;
    let watch = PodWatch::start(bed.pods()).await;
    let mut controller = bed.start_controller(&[("MAX_WORKERS", "1")]);
    let (a, b) = one_running_one_queued(&bed).await;

    // Evicted for node pressure: the Pod ends Failed.
    let first = wait_running_pod(&bed, &a).await;
    bed.set_pod_status(
        &pod_name(&a),
        json!({"phase": "Failed", "reason": "Evicted",
               "message": "The node was low on resource: memory."}),
    )
    .await;
    // The replacement waits out a delay, shown in the status; no Pod starts
    // before it ends.
    let s = bed
        .wait_scenario(&a, "a replacement delay", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.replace_after.is_some())
        })
        .await;
    let not_before = s.status.unwrap().replace_after.unwrap();
    let second = wait_new_pod(&bed, &a, first.uid().as_deref()).await;
    let created = second.metadata.creation_timestamp.clone().unwrap().0;
    assert!(
        created.as_second() >= not_before.timestamp(),
        "the new Pod was created at {created}, before its delay ended at {not_before}"
    );
    let s = bed
        .wait_scenario(&a, "running again", |s| phase(s) == Some(Phase::Running))
        .await;
    assert_eq!(
        s.status.as_ref().map(|st| st.restart_count),
        Some(1),
        "a node-pressure eviction counts against the restart budget"
    );

    // Marked as a disruption target (beside the conditions the Pod has, as
    // the taint manager adds it), then deleted with a grace period at once:
    // whether the controller sees the mark or only the deletion, the Pod is
    // replaced, so one write does (kwok may rewrite the conditions).
    let third = wait_running_pod(&bed, &a).await;
    let mut conditions =
        serde_json::to_value(third.status.and_then(|s| s.conditions).unwrap_or_default()).unwrap();
    conditions.as_array_mut().unwrap().push(
        json!({"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
               "message": "Taint manager: deleting due to NoExecute taint"}),
    );
    bed.write_pod_status(&pod_name(&a), &json!({ "conditions": conditions }))
        .await;
    bed.pods()
        .delete(&pod_name(&a), &DeleteParams::default().grace_period(5))
        .await
        .unwrap();
    wait_new_pod(&bed, &a, second.uid().as_deref()).await;
    let s = bed
        .wait_scenario(&a, "running on its third Pod", |s| {
            phase(s) == Some(Phase::Running)
        })
        .await;
    assert_eq!(
        s.status.as_ref().map(|st| st.restart_count),
        Some(1),
        "a disruption (a drain, a node shutdown) is no restart"
    );
    kept_its_slot(&bed, &b, watch).await;
    controller.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_cluster_refuses_fails_its_scenario_and_the_queue_goes_on() {
    let bed = Bed::new("ctl-refused").await;
    let (bad, good) = (uuid(), uuid());
    // An in-apiserver admission policy that refuses the first scenario's Pod,
    // as a webhook or a policy engine would.
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe", "labels": {"runner.vap.io/scenario": bad}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}
    }))
    .unwrap();
    let _policy = DenyPolicy::new(
        &bed,
        ("", "pods"),
        &format!(
            "!has(object.metadata.labels) || object.metadata.labels.all(k, k != 'runner.vap.io/scenario' || object.metadata.labels[k] != '{bad}')"
        ),
        "this scenario is not allowed here",
        &bed.pods(),
        &probe,
    )
    .await;

    let mut controller = bed.start_controller(&[("MAX_WORKERS", "1")]);
    bed.deploy(&bad, LIVE).await;
    let s = bed
        .wait_scenario(&bad, "failed: its Pod is refused", |s| {
            phase(s) == Some(Phase::Failed)
        })
        .await;
    assert_eq!(ready(&s), Some(("False".into(), "PodRejected".into())));
    assert!(
        s.status
            .unwrap()
            .last_error
            .unwrap_or_default()
            .contains("not allowed here")
    );
    bed.deploy(&good, LIVE).await;
    bed.wait_scenario(&good, "running", |s| phase(s) == Some(Phase::Running))
        .await;
    controller.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_refuses_invalid_scenarios() {
    let bed = Bed::new("ctl-crd").await;
    let id = uuid();
    let scenario = |spec: serde_json::Value| -> Scenario {
        serde_json::from_value(json!({
            "apiVersion": "runner.vap.io/v1alpha1", "kind": "Scenario",
            "metadata": {"name": scenario_name(&id)}, "spec": spec
        }))
        .unwrap()
    };
    let valid = json!({"scenarioUuid": id, "workerId": id, "cameraUrl": LIVE});
    let cases = [
        (
            "a uuid that is not one",
            json!({"scenarioUuid": "x; rm -rf", "workerId": id, "cameraUrl": LIVE}),
        ),
        (
            "fps 0",
            json!({"scenarioUuid": id, "workerId": id, "cameraUrl": LIVE, "fps": 0}),
        ),
        (
            "negative fps",
            json!({"scenarioUuid": id, "workerId": id, "cameraUrl": LIVE, "fps": -2}),
        ),
        (
            "an unknown model",
            json!({"scenarioUuid": id, "workerId": id, "cameraUrl": LIVE, "model": "yolo9000"}),
        ),
    ];
    for (what, spec) in cases {
        let err = bed
            .scenarios()
            .create(&PostParams::default(), &scenario(spec))
            .await
            .expect_err(what);
        assert!(
            matches!(&err, kube::Error::Api(e) if e.code == 422),
            "{what}: {err}"
        );
    }
    bed.scenarios()
        .create(&PostParams::default(), &scenario(valid))
        .await
        .expect("a valid Scenario");
    let err = bed
        .scenarios()
        .patch(
            &scenario_name(&id),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scenarioUuid": uuid()}})),
        )
        .await
        .expect_err("scenarioUuid is immutable");
    assert!(err.to_string().contains("immutable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_clean_and_an_unchanged_scenario_is_not_rewritten() {
    let bed = Bed::new("ctl-status").await;
    // kwok's Pods run no worker, so no heartbeat comes: with beats due only
    // hourly, the Streaming condition does not turn HeartbeatsMissing (a
    // real change, and a write) while the writes are counted.
    let mut controller = bed.start_controller(&[("MAX_WORKERS", "1"), ("HEARTBEAT_SECS", "3600")]);
    let (a, b) = one_running_one_queued(&bed).await;
    bed.undeploy_at(&a, now_ms()).await;
    let s = bed
        .wait_scenario(&b, "running and ready", |s| {
            ready(s) == Some(("True".into(), "WorkerReady".into()))
        })
        .await;
    let status = serde_json::to_value(s.status.as_ref().unwrap()).unwrap();
    for stale in ["queuePosition", "lastError", "finishTime"] {
        assert!(status.get(stale).is_none(), "stale {stale} in {status}");
    }

    // Touched but unchanged, the Scenario is reconciled and its status not
    // written: the controller's own count of status writes stays put. (An
    // identical rewrite makes no watch event, so only the count shows it.)
    const WRITES: &str = "vap_controller_status_writes_total";
    const RECONCILED: &str = "vap_controller_reconciles_total{result=\"ok\"}";
    let touch = |i: usize| {
        let scenarios = bed.scenarios();
        let name = scenario_name(&b);
        async move {
            let patch = json!({"metadata": {"annotations": {"test/touch": i.to_string()}}});
            scenarios
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .expect("annotate the Scenario");
        }
    };
    let touched_and_reconciled = |i: usize| {
        let controller = &controller;
        async move {
            let before = controller.metric(RECONCILED).await;
            touch(i).await;
            controller
                .wait_metric(RECONCILED, SCENARIO_WITHIN, |n| n > before)
                .await;
        }
    };
    // The first touch also lets anything still due (the first scenario's
    // stop) be written before the count is taken.
    touched_and_reconciled(0).await;
    let writes = controller.metric(WRITES).await;
    for i in 1..=5 {
        touched_and_reconciled(i).await;
    }
    assert_eq!(
        controller.metric(WRITES).await,
        writes,
        "status written for a Scenario reconciled unchanged"
    );
    bed.undeploy_at(&b, now_ms()).await;
    bed.wait_phase(&b, Phase::Stopped).await;
    // The stop is a status write (counted just after the apiserver answers
    // it, so possibly a moment after the watch shows it).
    controller
        .wait_metric(WRITES, SCENARIO_WITHIN, |n| n > writes)
        .await;
    controller.assert_running();
}

/// A finished scenario is removed after FINISHED_TTL_SECS, and with it what
/// its commands were: its deploy read again after that (a rewound consumer
/// group, a new CONSUMER_GROUP reading from the start) is older than the
/// TTL for a scenario the runner does not know, and is dead-lettered as
/// `stale` instead of running the clip a second time. A new deploy runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_replayed_after_its_scenario_was_removed_is_dead_lettered_as_stale() {
    let bed = Bed::new("ctl-stale").await;
    let controller = bed.start_controller(&[("FINISHED_TTL_SECS", "3")]);
    let clip = common::media("vtest.avi");
    let id = uuid();
    let t0 = now_ms();
    bed.deploy_at(&id, &clip, t0).await;
    wait_running_pod(&bed, &id).await;
    bed.set_pod_status(&pod_name(&id), worker_exited(0)).await;
    bed.wait_phase(&id, Phase::Succeeded).await;
    wait_for(
        "the finished Scenario removed after its TTL",
        SCENARIO_WITHIN,
        || async {
            let gone = bed.scenarios().get_opt(&scenario_name(&id)).await.ok()?;
            gone.is_none().then_some(())
        },
    )
    .await;

    // The same record again, as a replay reads it: same payload, same stamp.
    bed.deploy_at(&id, &clip, t0).await;
    let letters = bed.read_topic(&bed.dlq, 1).await;
    assert_eq!(letters[0].header("reason"), "stale", "{letters:?}");
    let error = letters[0].header("error");
    assert!(
        error.contains(&id) && error.contains("FINISHED_TTL_SECS=3"),
        "{error}"
    );
    bed.wait_committed(&bed.deploy, 2, SCENARIO_WITHIN).await;
    assert!(
        bed.scenarios()
            .get_opt(&scenario_name(&id))
            .await
            .unwrap()
            .is_none(),
        "the replay ran the clip again"
    );
    assert_eq!(
        sample(&controller.metrics().await, &dead_lettered("stale")),
        1.0
    );

    // A deploy sent now is no replay: it runs the clip again.
    bed.deploy_at(&id, &clip, now_ms()).await;
    bed.wait_phase(&id, Phase::Running).await;
}

/// Creates the ResourceQuota "workers" with `hard` in the bed's namespace
/// and waits until the quota controller has counted (it admits nothing
/// before).
async fn counted_quota(
    bed: &Bed,
    hard: serde_json::Value,
) -> Api<k8s_openapi::api::core::v1::ResourceQuota> {
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(bed.client.clone(), &bed.namespace);
    let quota = serde_json::from_value(json!({
        "metadata": {"name": "workers"},
        "spec": {"hard": hard}
    }))
    .unwrap();
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("create the ResourceQuota");
    wait_for("the quota counted", SCENARIO_WITHIN, || async {
        let q = quotas.get("workers").await.ok()?;
        q.status?.used.is_some().then_some(())
    })
    .await;
    quotas
}

/// A namespace's ResourceQuota is met the same way wherever it bites: a
/// worker Pod it refuses waits, queued, and runs once another Pod is gone;
/// a Scenario it refuses is dead-lettered as `quota_exceeded`, and the
/// commands after it, an undeploy included, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_quota_queues_a_pod_and_dead_letters_a_scenario_and_ingest_goes_on() {
    let bed = Bed::new("ctl-quota").await;
    counted_quota(
        &bed,
        json!({"pods": "1", "count/scenarios.runner.vap.io": "2"}),
    )
    .await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "3")]);
    let (a, b, c) = (uuid(), uuid(), uuid());
    bed.deploy(&a, LIVE).await;
    bed.wait_phase(&a, Phase::Running).await;
    bed.deploy(&b, LIVE).await;
    let waiting = bed
        .wait_scenario(&b, "queued by the quota", |s| {
            phase(s) == Some(Phase::Queued)
                && ready(s).is_some_and(|(_, reason)| reason == "QuotaExceeded")
        })
        .await;
    let message = &waiting
        .status
        .as_ref()
        .unwrap()
        .condition("Admitted")
        .unwrap()
        .message;
    assert!(
        message.contains("ResourceQuota") && message.contains("exceeded quota"),
        "{message}"
    );
    assert_eq!(waiting.status.as_ref().unwrap().last_error, None);

    bed.deploy(&c, LIVE).await;
    let letters = bed.read_topic(&bed.dlq, 1).await;
    assert_eq!(letters[0].header("reason"), "quota_exceeded", "{letters:?}");
    let error = letters[0].header("error");
    assert!(
        error.contains("ResourceQuota") && error.contains("count/scenarios.runner.vap.io"),
        "{error}"
    );
    assert!(
        bed.scenarios()
            .get_opt(&scenario_name(&c))
            .await
            .unwrap()
            .is_none()
    );

    // The undeploy after the refused deploy is applied: its Pod goes, and
    // the queued scenario's Pod fits.
    bed.undeploy_at(&a, now_ms()).await;
    bed.wait_phase(&a, Phase::Stopped).await;
    bed.wait_phase(&b, Phase::Running).await;
    bed.wait_committed(&bed.deploy, 3, SCENARIO_WITHIN).await;
    bed.wait_committed(&bed.undeploy, 1, SCENARIO_WITHIN).await;
    let metrics = controller.metrics().await;
    assert_eq!(sample(&metrics, &dead_lettered("quota_exceeded")), 1.0);
    assert!(
        sample(
            &metrics,
            "vap_controller_reconcile_errors_total{category=\"quota_exceeded\"}"
        ) >= 1.0
    );
}

/// A deploy that arrives while its Scenario is being deleted (here held by
/// a finalizer, as a TTL delete is held by its Pod and Secrets) is not
/// written into the object on its way out: it waits, uncommitted, and once
/// the object is gone it creates the Scenario anew, which runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_into_a_scenario_being_deleted_runs_once_it_is_gone() {
    const HOLD: &str = "tests.vap.io/hold";
    const OTHER: &str = "rtsp://camera.example/other";
    let bed = Bed::new("ctl-deleting").await;
    let controller = bed.start_controller(&[]);
    let id = uuid();
    bed.deploy(&id, LIVE).await;
    let old = bed.wait_phase(&id, Phase::Running).await;
    bed.wait_committed(&bed.deploy, 1, SCENARIO_WITHIN).await;
    let name = scenario_name(&id);
    bed.scenarios()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [HOLD]}})),
        )
        .await
        .expect("hold the Scenario with a finalizer");
    bed.scenarios()
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the Scenario");

    let retries_before = controller
        .metric("vap_controller_kubernetes_retries_total")
        .await;
    bed.deploy(&id, OTHER).await;
    controller
        .wait_metric(
            "vap_controller_kubernetes_retries_total",
            SCENARIO_WITHIN,
            |n| n > retries_before,
        )
        .await;
    let held = bed.scenarios().get(&name).await.unwrap();
    assert_eq!(held.uid(), old.uid());
    assert_eq!(
        held.spec.camera_url, LIVE,
        "the deploy was written into a Scenario being deleted"
    );
    assert_eq!(
        bed.committed(&bed.deploy),
        1,
        "the waiting deploy was committed"
    );

    bed.scenarios()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("release the Scenario");
    let new = bed
        .wait_scenario(&id, "created anew and running", |s| {
            s.uid() != old.uid() && phase(s) == Some(Phase::Running)
        })
        .await;
    assert_eq!(new.spec.camera_url, OTHER);
    let pod = wait_running_pod(&bed, &id).await;
    assert_eq!(
        pod.owner_references()[0].uid,
        new.uid().unwrap(),
        "the worker Pod is the new Scenario's"
    );
    bed.wait_committed(&bed.deploy, 2, SCENARIO_WITHIN).await;
}

/// A reconcile planned from a Scenario cache that has not seen the
/// scenario's undeploy yet (a lagging watch) starts no worker for it: the
/// verdict (Starting) is written guarded by the resourceVersion it was
/// planned from before the Pod is created, and that write is refused as
/// stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_on_a_stale_scenario_starts_no_worker_after_its_undeploy() {
    use common::lagging_watch::LaggingWatch;
    let bed = Bed::new("ctl-lagging").await;
    let lagging = LaggingWatch::start("scenarios").await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "1"), lagging.env()]);
    let (clip, live) = (uuid(), uuid());
    bed.deploy(&clip, &common::media("vtest.avi")).await;
    wait_running_pod(&bed, &clip).await;
    bed.deploy(&live, LIVE).await;
    bed.wait_scenario(&live, "queued", |s| phase(s) == Some(Phase::Queued))
        .await;

    let past = undeploy_past_the_cache(&bed, &controller, &lagging, &live).await;
    // The clip ends: its slot is free, and the queued scenario is planned
    // from its stale copy, which still wants a worker.
    bed.set_pod_status(&pod_name(&clip), worker_exited(0)).await;
    no_worker_after_the_undeploy(&bed, &controller, &lagging, &live, past).await;
    bed.wait_phase(&clip, Phase::Succeeded).await;
}

/// What [`undeploy_past_the_cache`] leaves: a watch of the Pods from then on
/// and the status conflicts counted until then.
struct PastTheCache {
    pods: PodWatch,
    conflicts: f64,
}

const CONFLICTS: &str = "vap_controller_status_conflicts_total";

/// Holds the controller's Scenario cache back (`lagging`) and undeploys
/// `id`: the apiserver has the undeploy, the cache does not.
async fn undeploy_past_the_cache(
    bed: &Bed,
    controller: &common::controller::ControllerProcess,
    lagging: &common::lagging_watch::LaggingWatch,
    id: &str,
) -> PastTheCache {
    lagging.hold();
    bed.undeploy_at(id, now_ms()).await;
    wait_for("the undeploy to be written", SCENARIO_WITHIN, || async {
        let s = bed.scenarios().get(&scenario_name(id)).await.ok()?;
        s.spec.is_stopped().then_some(())
    })
    .await;
    PastTheCache {
        pods: PodWatch::start(bed.pods()).await,
        conflicts: controller.metric(CONFLICTS).await,
    }
}

/// Waits until the controller acted on `id` from its stale copy (a worker
/// Pod, or a status write refused as stale), lets the cache catch up, and
/// checks that `id` stopped and never had a worker Pod.
async fn no_worker_after_the_undeploy(
    bed: &Bed,
    controller: &common::controller::ControllerProcess,
    lagging: &common::lagging_watch::LaggingWatch,
    id: &str,
    past: PastTheCache,
) {
    let pod = pod_name(id);
    wait_for(
        "the controller to act on the stale copy",
        SCENARIO_WITHIN,
        || async {
            let created = bed.pods().get_opt(&pod).await.ok()?.is_some();
            let refused = controller.metric(CONFLICTS).await > past.conflicts;
            (created || refused).then_some(())
        },
    )
    .await;
    lagging.release();
    bed.wait_phase(id, Phase::Stopped).await;
    let history = past.pods.finish().await;
    assert!(
        history.uids_of(&pod).is_empty(),
        "a worker Pod was created for {id} after its undeploy was written"
    );
}

/// The same for a scenario a ResourceQuota keeps queued: each try of its Pod
/// first checks, with a write of the unchanged status guarded by the
/// resourceVersion, that the Scenario is still the one planned from, so a
/// try planned from a stale copy after its undeploy creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_retry_on_a_stale_scenario_starts_no_worker_after_its_undeploy() {
    use common::lagging_watch::LaggingWatch;
    let bed = Bed::new("ctl-lagging-quota").await;
    let quotas = counted_quota(&bed, json!({"pods": "1"})).await;
    let lagging = LaggingWatch::start("scenarios").await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "3"), lagging.env()]);
    let (running, queued) = (uuid(), uuid());
    bed.deploy(&running, LIVE).await;
    bed.wait_phase(&running, Phase::Running).await;
    bed.deploy(&queued, LIVE).await;
    bed.wait_scenario(&queued, "queued by the quota", |s| {
        phase(s) == Some(Phase::Queued)
            && ready(s).is_some_and(|(_, reason)| reason == "QuotaExceeded")
    })
    .await;

    let past = undeploy_past_the_cache(&bed, &controller, &lagging, &queued).await;
    // Room for the queued Pod: its next try is planned from the stale copy.
    quotas
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hard": {"pods": "2"}}})),
        )
        .await
        .expect("raise the ResourceQuota");
    no_worker_after_the_undeploy(&bed, &controller, &lagging, &queued, past).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_and_its_standby_never_act_at_once() {
    let bed = Bed::new("ctl-leader").await;
    let watch = PodWatch::start(bed.pods()).await;
    let settings = [("MAX_WORKERS", "3"), ("LEASE_DURATION_SECS", "4")];
    let mut leader = bed.start_controller(&settings);
    let first = uuid();
    bed.deploy(&first, LIVE).await;
    bed.wait_scenario(&first, "running", |s| phase(s) == Some(Phase::Running))
        .await;
    let mut standby = bed.start_controller(&settings);

    // The leader freezes (as in a long pause or a hung node) while a burst
    // arrives: the standby takes over after a whole lease of silence.
    leader.signal("STOP");
    let burst: Vec<String> = (0..6).map(|_| uuid()).collect();
    for id in &burst {
        bed.deploy(id, LIVE).await;
    }
    wait_for(
        "the standby to fill every slot",
        SCENARIO_WITHIN,
        || async {
            let pods = bed.pods().list(&Default::default()).await.ok()?;
            (pods.items.iter().filter(|p| holds_slot(p)).count() == 3).then_some(())
        },
    )
    .await;

    // The old leader wakes up: its leadership lapsed long ago by its own
    // clock, so it must not act, and it exits.
    leader.signal("CONT");
    wait_for("the old leader to exit", Duration::from_secs(60), || {
        let ended = leader.exited();
        async move { ended }
    })
    .await;

    // Slots free one by one; the standby keeps the limit.
    for id in std::iter::once(&first).chain(&burst[..2]) {
        bed.undeploy_at(id, now_ms()).await;
    }
    wait_for("three more scenarios to start", SCENARIO_WITHIN, || async {
        let list = bed.scenarios().list(&Default::default()).await.ok()?;
        let started = list
            .items
            .iter()
            .filter(|s| matches!(phase(s), Some(Phase::Running | Phase::Starting)))
            .count();
        (started == 3).then_some(())
    })
    .await;
    let max = watch.finish().await.most_holding_slots(|_| true);
    assert!(max <= 3, "saw {max} live worker Pods with MAX_WORKERS=3");
    standby.assert_running();
}

/// A Node of this test's own (no kwok annotation, a taint of its own so no
/// other test's Pods land there), deleted when dropped.
struct OwnNode {
    name: String,
    nodes: Api<Node>,
}

impl OwnNode {
    const TAINT: &str = "vap-runner-tests/own-node";

    async fn new(client: &kube::Client) -> OwnNode {
        let name = common::unique_name("vap-test-node");
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {Self::TAINT: name}},
            "spec": {"taints": [{"key": Self::TAINT, "value": name, "effect": "NoSchedule"}]}
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
        let now = chrono::Utc::now().to_rfc3339();
        let resources = json!({"cpu": "8", "memory": "16Gi", "pods": "110"});
        // Ready, as its kubelet would report.
        nodes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "capacity": resources, "allocatable": resources,
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                    "message": "test node", "lastHeartbeatTime": now,
                                    "lastTransitionTime": now}]}})),
            )
            .await
            .unwrap();
        OwnNode { name, nodes }
    }

    fn selector(&self) -> String {
        json!({ Self::TAINT: self.name }).to_string()
    }

    fn toleration(&self) -> String {
        json!([{"key": Self::TAINT, "operator": "Exists", "effect": "NoSchedule"}]).to_string()
    }

    async fn lose(&self) {
        self.nodes
            .delete(&self.name, &DeleteParams::default())
            .await
            .unwrap();
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        let name = self.name.clone();
        common::controller::cleanup(move || async move {
            if let Ok(client) = kube::Client::try_default().await {
                let _ = Api::<Node>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_on_a_lost_node_is_replaced_within_max_workers() {
    let bed = Bed::new("ctl-node").await;
    let node = OwnNode::new(&bed.client).await;
    let watch = PodWatch::start(bed.pods()).await;
    let (selector, toleration) = (node.selector(), node.toleration());
    let mut controller = bed.start_controller(&[
        ("MAX_WORKERS", "1"),
        ("WORKER_NODE_SELECTOR", &selector),
        ("WORKER_TOLERATIONS", &toleration),
    ]);
    let (a, b) = (uuid(), uuid());
    bed.deploy(&a, LIVE).await;
    let first = wait_for(
        "the Pod to be bound to the test node",
        SCENARIO_WITHIN,
        || async {
            let pod = bed.pods().get_opt(&pod_name(&a)).await.ok()??;
            (pod.spec.as_ref()?.node_name.as_deref() == Some(node.name.as_str())).then_some(pod)
        },
    )
    .await;
    // A Node of the test's own: no kwok, the test is its kubelet.
    bed.write_pod_status(&pod_name(&a), &running_and_ready())
        .await;
    bed.wait_scenario(&a, "running on the test node", |s| {
        phase(s) == Some(Phase::Running)
    })
    .await;
    bed.deploy(&b, LIVE).await;
    bed.wait_scenario(&b, "queued", |s| phase(s) == Some(Phase::Queued))
        .await;

    // The node is lost; the cluster's Pod garbage collector removes the Pods
    // bound to it, and the scenario gets a new Pod in its own slot.
    node.lose().await;
    wait_new_pod(&bed, &a, first.uid().as_deref()).await;
    kept_its_slot(&bed, &b, watch).await;
    controller.assert_running();
}

/// Pod status of a running, ready worker, as a kubelet writes it.
fn running_and_ready() -> serde_json::Value {
    json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{
            "name": "worker", "image": "vap-runner:test", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_releases_its_lease() {
    use k8s_openapi::api::coordination::v1::Lease;
    let bed = Bed::new("ctl-release").await;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let holder = || async {
        let lease = leases.get_opt(LEASE).await.ok()??;
        lease.spec?.holder_identity
    };
    // Every version of the Lease, in order, from before the leader starts.
    let recorder = Versions::start(
        leases.clone(),
        watcher::Config::default().fields(&format!("metadata.name={LEASE}")),
    )
    .await;
    let versions = || -> Vec<_> {
        recorder
            .seen()
            .into_iter()
            .map(|l| l.spec.unwrap_or_default())
            .collect()
    };

    let mut leader = bed.start_controller(&[("POD_NAME", "replica-a")]);
    wait_for("replica-a to lead", SCENARIO_WITHIN, || async {
        (holder().await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let mut standby = bed.start_controller(&[("POD_NAME", "replica-b")]);
    // A standby is ready (a rolling update waits for that) and says it
    // does not lead.
    wait_for("the standby to be ready", SCENARIO_WITHIN, || async {
        let addr = standby.metrics_addr().await;
        (common::http_get(&addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(standby.metric("vap_controller_leader").await, 0.0);
    assert_eq!(leader.metric("vap_controller_leader").await, 1.0);
    assert!(leader.terminate().success(), "a clean exit on SIGTERM");
    wait_for("replica-b to lead", SCENARIO_WITHIN, || async {
        (holder().await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    standby.assert_running();
    // The watch delivers the take-over a moment after a read shows it.
    wait_for(
        "the Lease watch to see replica-b's take-over",
        SCENARIO_WITHIN,
        || {
            let seen = versions()
                .iter()
                .any(|l| l.holder_identity.as_deref() == Some("replica-b"));
            async move { seen.then_some(()) }
        },
    )
    .await;

    // Released on the way out, so that nobody has to wait for it to expire:
    // replica-a's last write (docs/architecture.md: the holder releases the Lease on
    // SIGTERM) leaves the same Lease with no holder and no renewal, and
    // replica-b takes it from there.
    let versions = versions();
    let taken = versions
        .iter()
        .position(|l| l.holder_identity.as_deref() == Some("replica-b"))
        .expect("replica-b's take-over was watched");
    let before = taken
        .checked_sub(1)
        .map(|i| &versions[i])
        .expect("a version of the Lease before replica-b's");
    assert!(
        before.holder_identity.is_none()
            && before.renew_time.is_none()
            && before.acquire_time.is_none(),
        "the Lease replica-b took over was not released: {before:?}\nall versions: {versions:?}"
    );
    assert!(
        versions[..taken - 1]
            .iter()
            .any(|l| l.holder_identity.as_deref() == Some("replica-a")),
        "replica-a held it before: {versions:?}"
    );
}

/// A leader stopped before its Scenario cache has listed (here the list is
/// held back; in life a stop right after start, or a slow apiserver) has
/// no reconcile in flight: it exits at once and releases its Lease, rather
/// than waiting out the drain and leaving the Lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_before_its_cache_listed_releases_its_lease() {
    use common::lagging_watch::LaggingWatch;
    use k8s_openapi::api::coordination::v1::Lease;
    let bed = Bed::new("ctl-early-stop").await;
    let lagging = LaggingWatch::start("scenarios").await;
    lagging.hold();
    let mut leader = bed.start_controller(&[("POD_NAME", "replica-a"), lagging.env()]);
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let holder = || async {
        let lease = leases.get_opt(LEASE).await.ok()??;
        Some(lease.spec?.holder_identity)
    };
    wait_for("replica-a to lead", SCENARIO_WITHIN, || async {
        (holder().await? == Some("replica-a".to_string())).then_some(())
    })
    .await;
    wait_logged(&leader, "controller running", &bed.namespace).await;
    assert!(leader.terminate().success(), "a clean exit on SIGTERM");
    let log = leader.log();
    assert!(
        !log.contains("did not stop within"),
        "the stop waited out the drain:\n{}",
        leader.log_tail()
    );
    assert_eq!(holder().await, Some(None), "the Lease was released");
}

/// A release the apiserver refuses (here an admission policy; in life a slow
/// or overloaded apiserver) is tried again, and lands once the refusal ends:
/// the standby does not wait for the Lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_release_is_refused_tries_it_again() {
    use k8s_openapi::api::coordination::v1::Lease;
    let bed = Bed::new("ctl-rerelease").await;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.namespace);
    // A release writes the Lease without a holder.
    let policy = DenyPolicy::install(
        &bed,
        ("coordination.k8s.io", "leases"),
        "UPDATE",
        "has(object.spec.holderIdentity)",
        "the release is held back",
    )
    .await;
    let probe: Lease = serde_json::from_value(json!({
        "metadata": {"name": "release-probe"},
        "spec": {"holderIdentity": "probe"}
    }))
    .unwrap();
    let mut released = leases
        .create(&PostParams::default(), &probe)
        .await
        .expect("create the probe Lease");
    released.spec.get_or_insert_default().holder_identity = None;
    wait_for(
        "the admission policy to act",
        Duration::from_secs(60),
        || {
            let (leases, released) = (leases.clone(), released.clone());
            async move {
                let dry = PostParams {
                    dry_run: true,
                    ..Default::default()
                };
                match leases.replace("release-probe", &dry, &released).await {
                    Err(kube::Error::Api(e)) if e.message.contains("held back") => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;

    // Tried again for a third of the Lease's 60 s.
    let mut leader =
        bed.start_controller(&[("LEASE_DURATION_SECS", "60"), ("POD_NAME", "replica-a")]);
    stamp_when_held_by(&bed, "replica-a").await;
    // Stopped once ingest is running (it has written a Scenario), so that
    // the release follows at once.
    let id = uuid();
    bed.deploy(&id, LIVE).await;
    bed.wait_scenario(&id, "written", |_| true).await;
    leader.signal("TERM");
    wait_for(
        "the leader's release to be refused",
        SCENARIO_WITHIN,
        || {
            let log = leader.log();
            async move { log.contains("cannot release the Lease").then_some(()) }
        },
    )
    .await;
    assert!(
        leader
            .log()
            .contains("cannot release the Lease yet; retrying"),
        "a refused release was given up at once:\n{}",
        leader.log_tail()
    );
    drop(policy);
    wait_for("the old leader to exit", SCENARIO_WITHIN, || {
        let ended = leader.exited();
        async move { ended }
    })
    .await;
    assert!(
        leader.log().contains("Lease released"),
        "{}",
        leader.log_tail()
    );
    let spec = leases.get(LEASE).await.unwrap().spec.unwrap_or_default();
    assert!(spec.holder_identity.is_none(), "not released: {spec:?}");
}

/// The leader Lease of the bed's runner as `holder` in term `transitions`
/// (`None`: released), written as the holder would.
async fn set_lease(bed: &Bed, holder: Option<&str>, transitions: i32) {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": LEASE},
        "spec": {"holderIdentity": holder, "leaseTransitions": transitions, "leaseDurationSeconds": 15}
    }))
    .unwrap();
    leases
        .patch(
            LEASE,
            &PatchParams::apply("vap-runner-tests").force(),
            &Patch::Apply(&lease),
        )
        .await
        .expect("write the Lease");
}

const LEASE: &str = "vap-runner-leader";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_policy_admits_only_the_current_holders_stamp() {
    use common::fencing::{Fencing, client_as, stamped_secret};
    use k8s_openapi::api::core::v1::Secret;
    let bed = Bed::new("ctl-fence-policy").await;
    let identity = bed.identity("runner", controller_rules(&[])).await;
    let _fencing = Fencing::install(&bed, &identity).await;
    let as_runner = client_as(&identity.kubeconfig).await;
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(as_runner.clone(), &bed.namespace);
    let pods: Api<Pod> = Api::namespaced(as_runner.clone(), &bed.namespace);
    let pod = |stamp: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "worker-fence", "labels": {"runner.vap.io/runner": "vap-runner"},
                         "annotations": {"runner.vap.io/leader": stamp}},
            "spec": {"containers": [{"name": "worker", "image": "vap-runner:test"}]}
        }))
        .unwrap()
    };
    set_lease(&bed, Some("replica-a"), 3).await;
    // A Scenario of the runner (written by the test, which is not fenced).
    let id = uuid();
    let scenario: Scenario = serde_json::from_value(json!({
        "metadata": {"name": scenario_name(&id), "labels": {"runner.vap.io/runner": "vap-runner"}},
        "spec": {"scenarioUuid": id, "workerId": uuid(), "cameraUrl": LIVE, "run": 1}
    }))
    .unwrap();
    // (Refused to everyone until the policy has seen the Lease.)
    wait_for("the Scenario to be created", SCENARIO_WITHIN, || async {
        bed.scenarios()
            .create(&PostParams::default(), &scenario)
            .await
            .ok()
    })
    .await;
    let scenarios: Api<Scenario> = Api::namespaced(as_runner, &bed.namespace);
    let status_write = |stamp: &str| {
        let scenarios = scenarios.clone();
        let patch = json!({"status": {"writer": stamp, "observedRun": 1}});
        let name = scenario_name(&id);
        async move {
            scenarios
                .patch_status(
                    &name,
                    &PatchParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &Patch::Merge(patch),
                )
                .await
                .map(|_| ())
        }
    };
    // Every kind of write the runner makes, with a stamp.
    let writes = |stamp: String| {
        let (secrets, pods, dry) = (secrets.clone(), pods.clone(), dry.clone());
        let status = status_write(&stamp);
        async move {
            vec![
                secrets
                    .create(&dry, &stamped_secret("scn-fence-camera", &stamp))
                    .await
                    .map(|_| ()),
                pods.create(&dry, &pod(&stamp)).await.map(|_| ()),
                status.await,
            ]
        }
    };

    // The policy reads its parameter from a cache: the first answer that
    // admits the current stamp shows it has seen this Lease.
    wait_for("the policy to see replica-a/3", SCENARIO_WITHIN, || async {
        writes("replica-a/3".into())
            .await
            .iter()
            .all(Result::is_ok)
            .then_some(())
    })
    .await;
    for (what, refused) in ["secret", "pod", "status"]
        .iter()
        .zip(writes("replica-a/2".into()).await)
    {
        let e = refused.expect_err(&format!("a {what} write stamped replica-a/2 is refused"));
        assert!(Fencing::refused(&e), "{what}: {e}");
        let words = e.to_string();
        assert!(
            words.contains("replica-a/2") && words.contains("replica-a/3"),
            "the refusal names the stamp and the holder: {words}"
        );
        assert_eq!(
            vap_runner::controller::refusal::classify(&e),
            vap_runner::controller::refusal::Refusal::Fenced,
            "{words}"
        );
    }
    for (what, refused) in ["secret", "pod", "status"]
        .iter()
        .zip(writes(String::new()).await)
    {
        assert!(
            refused.as_ref().is_err_and(Fencing::refused),
            "an unstamped {what} write is refused: {refused:?}"
        );
    }
    // Not the runner's objects, or not its identity: not fenced.
    let mut unlabelled = stamped_secret("other-secret", "replica-a/2");
    unlabelled.metadata.labels = None;
    secrets
        .create(&dry, &unlabelled)
        .await
        .expect("another object");
    let admin: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.namespace);
    admin
        .create(&dry, &stamped_secret("admin-secret", "replica-a/2"))
        .await
        .expect("another user");

    // A take-over: the old term's stamp is refused from then on; released,
    // every stamp is.
    set_lease(&bed, Some("replica-b"), 4).await;
    wait_for("the policy to see replica-b/4", SCENARIO_WITHIN, || async {
        let old = writes("replica-a/3".into()).await;
        let new = writes("replica-b/4".into()).await;
        (old.iter().all(|r| r.as_ref().is_err_and(Fencing::refused))
            && new.iter().all(Result::is_ok))
        .then_some(())
    })
    .await;
    set_lease(&bed, None, 4).await;
    wait_for(
        "the policy to see the Lease released",
        SCENARIO_WITHIN,
        || async {
            let writes = writes("replica-b/4".into()).await;
            writes
                .iter()
                .all(|r| r.as_ref().is_err_and(Fencing::refused))
                .then_some(())
        },
    )
    .await;
}

/// Waits until `controller` has logged a line with `what` about `name`.
async fn wait_logged(controller: &common::controller::ControllerProcess, what: &str, name: &str) {
    wait_for(
        &format!("the log to show {what} {name}"),
        SCENARIO_WITHIN,
        || {
            let log = controller.log();
            async move {
                log.lines()
                    .any(|l| l.contains(what) && l.contains(name))
                    .then_some(())
            }
        },
    )
    .await;
}

/// The Scenario's `status.writer`.
fn writer(s: &Scenario) -> Option<&str> {
    s.status.as_ref()?.writer.as_deref()
}

/// The stamp of the bed's leader Lease's current holder, once `holder` holds it.
async fn stamp_when_held_by(bed: &Bed, holder: &str) -> String {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.namespace);
    wait_for(
        &format!("{holder} to hold the Lease"),
        SCENARIO_WITHIN,
        || async {
            let spec = leases.get_opt(LEASE).await.ok()??.spec?;
            (spec.holder_identity.as_deref() == Some(holder))
                .then(|| format!("{holder}/{}", spec.lease_transitions.unwrap_or(0)))
        },
    )
    .await
}

/// A leader cut off from the apiserver (its requests wait in a relay, as in
/// a partition) and paused (SIGSTOP) past its Lease, with a worker Pod
/// creation and a Scenario creation in flight: once the standby holds the
/// Lease, the relay lets them through and the leader resumes. The fencing
/// policy refuses every write it makes; the new leader goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_and_cut_off_leader_gets_every_write_refused() {
    use common::fencing::{Fencing, HoldingProxy, stamp_of};
    let bed = Bed::new("ctl-fenced").await;
    let identity = bed.identity("runner", controller_rules(&[])).await;
    let _fencing = Fencing::install(&bed, &identity).await;
    let proxy = HoldingProxy::start().await;
    let relayed = proxy.kubeconfig(&identity.kubeconfig);
    let (kubeconfig, direct) = identity.env();
    let settings = [("MAX_WORKERS", "1"), ("LEASE_DURATION_SECS", "6")];
    let mut leader = bed.start_controller(
        &[
            &settings[..],
            &[
                ("POD_NAME", "replica-a"),
                (kubeconfig, relayed.to_str().unwrap()),
            ],
        ]
        .concat(),
    );
    let old = stamp_when_held_by(&bed, "replica-a").await;
    let camera = "rtsp://viewer:s3cret@camera.example/stream";
    let first = uuid();
    bed.deploy(&first, camera).await;
    let running = bed.wait_phase(&first, Phase::Running).await;
    assert_eq!(writer(&running), Some(old.as_str()));
    let first_pod = wait_running_pod(&bed, &first).await;
    assert_eq!(stamp_of(&first_pod.metadata), Some(old.as_str()));
    let mut standby = bed.start_controller(
        &[
            &settings[..],
            &[("POD_NAME", "replica-b"), (kubeconfig, direct)],
        ]
        .concat(),
    );
    wait_for("the standby to be ready", SCENARIO_WITHIN, || async {
        let addr = standby.metrics_addr().await;
        (common::http_get(&addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let pods = PodWatch::start(bed.pods()).await;
    let scenarios = Versions::start(bed.scenarios(), watcher::Config::default()).await;

    // Cut off: what the leader sends waits in the relay. Its worker Pod
    // goes, so it creates another; a deploy arrives, so it creates a
    // Scenario. Both requests are on their way when it freezes.
    proxy.hold();
    bed.pods()
        .delete(
            &pod_name(&first),
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let second = uuid();
    bed.deploy(&second, camera).await;
    wait_logged(&leader, "creating the worker Pod", &pod_name(&first)).await;
    wait_logged(&leader, "creating the Scenario", &scenario_name(&second)).await;
    leader.signal("STOP");
    // Meanwhile the first scenario is stopped by hand: the next leader
    // wants no Pod for it.
    bed.scenarios()
        .patch(
            &scenario_name(&first),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stopped": true}})),
        )
        .await
        .unwrap();
    let new = stamp_when_held_by(&bed, "replica-b").await;
    bed.wait_scenario(&first, "written by the new leader", |s| {
        writer(s) == Some(new.as_str())
    })
    .await;

    // The old leader's requests arrive, and it wakes up.
    proxy.release();
    leader.signal("CONT");
    wait_for("the old leader to exit", SCENARIO_WITHIN, || {
        let ended = leader.exited();
        async move { ended }
    })
    .await;

    // The new leader applies the deploy and runs it: its Scenario, Secret,
    // Pod and status carry the new leader's stamp.
    let s = bed
        .wait_scenario(&second, "running under the new leader", |s| {
            phase(s) == Some(Phase::Running) && writer(s) == Some(new.as_str())
        })
        .await;
    assert_eq!(stamp_of(&s.metadata), Some(new.as_str()));
    let pod = bed.pods().get(&pod_name(&second)).await.unwrap();
    assert_eq!(stamp_of(&pod.metadata), Some(new.as_str()));
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(bed.client.clone(), &bed.namespace);
    let secret = secrets
        .get(&vap_runner::controller::names::secret_name(&second, 1))
        .await
        .expect("the camera Secret of the new scenario");
    assert_eq!(stamp_of(&secret.metadata), Some(new.as_str()));
    standby.assert_running();

    // Nothing the old leader sent landed: no Pod and no Scenario version
    // of its stamp appeared after it was cut off, and nothing was dead-lettered.
    let late_pods: Vec<String> = pods
        .finish()
        .await
        .changes
        .iter()
        .filter_map(|c| match c {
            common::controller::PodChange::Applied(p) => Some(p),
            common::controller::PodChange::Deleted(_) => None,
        })
        .filter(|p| p.metadata.uid != first_pod.metadata.uid)
        .filter(|p| stamp_of(&p.metadata) == Some(old.as_str()))
        .map(|p| p.name_any())
        .collect();
    assert!(late_pods.is_empty(), "the old leader created {late_pods:?}");
    let versions = scenarios.seen();
    let old_stamp = |s: &Scenario| {
        stamp_of(&s.metadata) == Some(old.as_str()) || writer(s) == Some(old.as_str())
    };
    let of = |id: &str| -> Vec<&Scenario> {
        versions
            .iter()
            .filter(|s| s.spec.scenario_uuid == id)
            .collect()
    };
    assert!(
        !of(&second).into_iter().any(old_stamp),
        "the old leader wrote the new scenario: {:?}",
        of(&second)
    );
    // The first scenario's status, written by the old leader before, never
    // shows it again once the new leader wrote it.
    let first_versions = of(&first);
    let taken = first_versions
        .iter()
        .position(|s| writer(s) == Some(new.as_str()))
        .expect("the new leader's status write was watched");
    assert!(
        !first_versions[taken..]
            .iter()
            .any(|s| writer(s) == Some(old.as_str())),
        "the old leader wrote the first scenario's status after the take-over: {first_versions:?}"
    );
    assert_eq!(bed.messages_in(&bed.dlq), 0, "nothing is dead-lettered");
    let log = leader.log();
    assert!(
        log.contains("(fenced)") && log.contains(&old) && log.contains(&new),
        "the old leader logs its refused writes, naming its stamp and the holder's:\n{}",
        leader.log_tail()
    );
}

/// Waits until the controller's `/healthz` answers `code` with a body that
/// contains `says`, and returns the body.
async fn wait_healthz(
    controller: &common::controller::ControllerProcess,
    code: u16,
    says: &str,
) -> String {
    wait_probe(controller, "/healthz", code, says).await
}

/// Waits until the controller's probe at `path` answers `code` with a body
/// that contains `says`, and returns the body.
async fn wait_probe(
    controller: &common::controller::ControllerProcess,
    path: &str,
    code: u16,
    says: &str,
) -> String {
    let addr = controller.metrics_addr().await;
    wait_for(
        &format!("{path} to answer {code} with {says:?}"),
        SCENARIO_WITHIN,
        || {
            let addr = addr.clone();
            async move {
                let (status, body) = common::http_get(&addr, path).await;
                (status == code && body.contains(says)).then_some(body)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_ingest_or_a_reconcile_is_stuck_and_recovers() {
    let bed = Bed::new("ctl-stuck").await;
    let id = uuid();
    // A webhook that never answers holds every write of a Scenario, also the
    // dry run that checks the CRD at start-up: the controller waits, not ready.
    let webhook = HangingWebhook::new(&bed, ("runner.vap.io", "scenarios")).await;
    let mut controller = bed.start_controller(&[("CONTROLLER_WATCHDOG_SECS", "5")]);
    wait_probe(&controller, "/readyz", 503, "checking the Scenario CRD").await;
    wait_for("the CRD check to be retried", SCENARIO_WITHIN, || {
        let log = controller.log_tail();
        async move {
            log.contains("cannot check the Scenario CRD yet")
                .then_some(())
        }
    })
    .await;
    controller.assert_running();
    drop(webhook);
    wait_probe(&controller, "/readyz", 200, "ok").await;

    // Ingest's write of a Scenario held.
    let webhook = HangingWebhook::new(&bed, ("runner.vap.io", "scenarios")).await;
    bed.deploy(&id, LIVE).await;
    let body = wait_healthz(&controller, 503, "storing a command has been running").await;
    assert!(
        body.contains("(CONTROLLER_WATCHDOG_SECS)"),
        "the probe names the setting: {body}"
    );
    drop(webhook);
    wait_healthz(&controller, 200, "ok").await;
    bed.wait_scenario(&id, "written once the webhook is gone", |_| true)
        .await;

    // Now one on Pods holds the reconcile that creates the worker.
    let other = uuid();
    let webhook = HangingWebhook::new(&bed, ("", "pods")).await;
    bed.deploy(&other, LIVE).await;
    wait_healthz(&controller, 503, "a reconcile has been running").await;
    drop(webhook);
    wait_healthz(&controller, 200, "ok").await;
    // Nothing was lost: both scenarios get their worker.
    for id in [&id, &other] {
        bed.wait_phase(id, Phase::Running).await;
    }
    common::controller::assert_nothing_counted(
        &controller.metrics().await,
        "vap_controller_dead_lettered_total",
    );
}

/// SIGTERM while the leader's worker Pod creation hangs (behind an admission
/// webhook that never answers, until the apiserver gives up on it): the
/// leader keeps its Lease until that write has ended, then releases it, and
/// the standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_keeps_its_lease_while_a_write_is_in_flight() {
    use k8s_openapi::api::coordination::v1::Lease;
    let bed = Bed::new("ctl-drain").await;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let lease = Versions::start(
        leases,
        watcher::Config::default().fields(&format!("metadata.name={LEASE}")),
    )
    .await;
    let settings = [("LEASE_DURATION_SECS", "6")];
    let mut leader = bed.start_controller(&[&settings[..], &[("POD_NAME", "replica-a")]].concat());
    stamp_when_held_by(&bed, "replica-a").await;
    let mut standby = bed.start_controller(&[&settings[..], &[("POD_NAME", "replica-b")]].concat());

    let _webhook = HangingWebhook::new(&bed, ("", "pods")).await;
    // In effect once a Pod creation (a dry run) hangs.
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hang-probe"},
        "spec": {"containers": [{"name": "c", "image": "vap-runner:test"}]}
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for(
        "the webhook to hold Pod creations",
        SCENARIO_WITHIN,
        || async {
            tokio::time::timeout(Duration::from_secs(3), bed.pods().create(&dry, &probe))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let id = uuid();
    bed.deploy(&id, LIVE).await;
    wait_logged(&leader, "creating the worker Pod", &pod_name(&id)).await;
    leader.signal("TERM");
    wait_for("the old leader to exit", SCENARIO_WITHIN, || {
        let ended = leader.exited();
        async move { ended }
    })
    .await;
    // Released only after the write ended (refused once the apiserver gave
    // up on the webhook); or, when it outlasts the shutdown's wait, not at
    // all: the Lease is left to expire.
    let log = leader.log();
    let released = lease
        .seen()
        .iter()
        .any(|l| l.spec.as_ref().is_some_and(|s| s.holder_identity.is_none()));
    match (
        log.find("failed calling webhook"),
        log.find("Lease released"),
    ) {
        (Some(ended), Some(released_at)) => assert!(
            ended < released_at && released,
            "the Lease was released while a write was in flight:\n{}",
            leader.log_tail()
        ),
        (_, None) => assert!(
            !released && log.contains("the Lease is left to expire"),
            "{}",
            leader.log_tail()
        ),
        (None, Some(_)) => panic!(
            "the Lease was released while a write was in flight:\n{}",
            leader.log_tail()
        ),
    }
    stamp_when_held_by(&bed, "replica-b").await;
    standby.assert_running();
}
