//! Admission in `runner controller`, against the real broker and the real
//! kube-apiserver: MAX_WORKERS is reached and never exceeded, the queue is
//! first come first served (also while workers end, fail, are deleted and
//! undeployed at once), and two runners in one namespace keep to their own
//! quota, Lease, consumer group and objects.
//!
//! Every test watches the namespace's Pods from before its first deploy, so
//! no Pod goes unseen. Pods run on kwok's fake Node, which moves them to
//! Running; tests end them by writing Pod status as a kubelet would.

use crate::common;
use std::collections::{HashMap, HashSet};

use crate::common::controller::{
    Bed, PodChange, PodHistory, PodWatch, SCENARIO_WITHIN, holds_slot, kwok_is_done, worker_exited,
};
use crate::common::scenario::{now_ms, phase, pod_name, scenario_name, uuid};
use crate::common::wait_for;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use vap_runner::controller::crd::{Phase, Scenario};

const LABEL_RUNNER: &str = "runner.vap.io/runner";
const ENQUEUED_AT: &str = "runner.vap.io/enqueued-at";

/// The `Admitted` condition's (status, reason).
fn admitted(s: &Scenario) -> Option<(String, String)> {
    let c = s.status.as_ref()?.condition("Admitted")?;
    Some((c.status.clone(), c.reason.clone()))
}

fn holds_or_takes_a_slot(s: &Scenario) -> bool {
    matches!(phase(s), Some(Phase::Starting | Phase::Running))
}

/// The bed's Scenarios by scenario UUID, and its Pods by name.
async fn snapshot(bed: &Bed) -> Option<(HashMap<String, Scenario>, HashMap<String, Pod>)> {
    let scenarios = bed.scenarios().list(&ListParams::default()).await.ok()?;
    let pods = bed.pods().list(&ListParams::default()).await.ok()?;
    Some((
        scenarios
            .items
            .into_iter()
            .map(|s| (s.spec.scenario_uuid.clone(), s))
            .collect(),
        pods.items.into_iter().map(|p| (p.name_any(), p)).collect(),
    ))
}

/// Checks that `queue` (scenario UUIDs in arrival order) waits as a user sees
/// it: each Queued, not admitted (`WaitingForSlot`), without a Pod, and in
/// the order of the moment ingest wrote them (`runner.vap.io/enqueued-at`).
fn assert_queued_in_order(
    scenarios: &HashMap<String, Scenario>,
    pods: &HashMap<String, Pod>,
    queue: &[String],
) {
    for id in queue {
        let s = &scenarios[id];
        assert_eq!(phase(s), Some(Phase::Queued), "{id} waits");
        assert_eq!(
            admitted(s),
            Some(("False".into(), "WaitingForSlot".into())),
            "{id} waits for a slot"
        );
        assert!(
            !pods.contains_key(&pod_name(id)),
            "{id} waits without a Pod"
        );
    }
    let mut by_enqueued: Vec<&String> = queue.iter().collect();
    by_enqueued.sort_by_key(|id| scenarios[*id].annotations()[ENQUEUED_AT].clone());
    assert_eq!(
        by_enqueued,
        queue.iter().collect::<Vec<_>>(),
        "the queue is in arrival order"
    );
}

/// Checks first come, first served on the watched Pods: whenever the first
/// Pod of a scenario appears, the Pods holding a slot (of those `mine` picks)
/// plus the scenarios that arrived before it and still wait number at most
/// `max_workers`. So no scenario ever took a slot that an older one waited
/// for; several slots freed at once go to the oldest, in any order.
///
/// `arrival` is the scenario UUIDs in Kafka order. An older scenario waits
/// when it has no Pod: not started yet, or its Pod deleted and not yet
/// replaced. Those in `undeployed` never wait (they may be stopped before
/// they start, or their Pod goes for good).
fn assert_first_come_first_served(
    history: &PodHistory,
    arrival: &[String],
    undeployed: &HashSet<String>,
    max_workers: usize,
    mine: impl Fn(&Pod) -> bool,
) {
    let place: HashMap<String, usize> = arrival
        .iter()
        .enumerate()
        .map(|(i, id)| (pod_name(id), i))
        .collect();
    let mut started: HashSet<String> = HashSet::new();
    let mut order: Vec<usize> = Vec::new();
    history.replay(|change, pods| {
        let PodChange::Applied(pod) = change else {
            return;
        };
        let name = pod.name_any();
        let Some(&i) = place.get(&name) else {
            return;
        };
        if !started.insert(name) {
            return;
        }
        order.push(i);
        let present: HashSet<String> = pods.values().map(|p| p.name_any()).collect();
        let holding = pods.values().filter(|p| mine(p) && holds_slot(p)).count();
        let older_waiting: Vec<usize> = (0..i)
            .filter(|&j| !undeployed.contains(&arrival[j]) && !present.contains(&pod_name(&arrival[j])))
            .collect();
        assert!(
            holding + older_waiting.len() <= max_workers,
            "scenario #{i} started while #{older_waiting:?} (older) waited and {holding} Pods held slots; starts so far, by arrival: {order:?}"
        );
    });
}

/// Waits for Pods kwok has finished with (see [`kwok_is_done`]) that `pick`
/// chooses, and returns them.
async fn wait_running(bed: &Bed, what: &str, pick: impl Fn(&Pod) -> bool) -> Vec<Pod> {
    let pick = &pick;
    wait_for(what, SCENARIO_WITHIN, || async move {
        let pods = bed.pods().list(&ListParams::default()).await.ok()?;
        let running: Vec<Pod> = pods
            .items
            .into_iter()
            .filter(|p| kwok_is_done(p) && pick(p))
            .collect();
        (!running.is_empty()).then_some(running)
    })
    .await
}

/// Ends the worker of `ending` once kwok runs it (its clip ends) and waits
/// for the Pod of `next`, which is to take the slot it frees.
async fn hand_over(bed: &Bed, ending: &str, next: &str) -> Pod {
    let pod = pod_name(ending);
    wait_running(bed, &format!("the worker of {ending} to run"), |p| {
        p.name_any() == pod
    })
    .await;
    bed.set_pod_status(&pod, worker_exited(0)).await;
    wait_for(
        &format!("{next} to start in the slot {ending} freed"),
        SCENARIO_WITHIN,
        || async { bed.pods().get_opt(&pod_name(next)).await.ok()? },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_workers_is_reached_never_exceeded_and_the_queue_is_fifo() {
    let bed = Bed::new("ctl-max").await;
    let watch = PodWatch::start(bed.pods()).await;
    let mut controller = bed.start_controller(&[("MAX_WORKERS", "2")]);
    let _explain = bed.explain_failure(&[&controller]);
    let clip = common::media("vtest.avi");
    let ids: Vec<String> = (0..6).map(|_| uuid()).collect();
    for id in &ids {
        bed.deploy(id, &clip).await;
    }
    bed.wait_committed(&bed.deploy, 6, SCENARIO_WITHIN).await;

    // The first two take both slots; the other four wait in arrival order.
    let (scenarios, pods) = wait_for(
        "two scenarios admitted and four queued",
        SCENARIO_WITHIN,
        || async {
            let (scenarios, pods) = snapshot(&bed).await?;
            let started = scenarios
                .values()
                .filter(|s| holds_or_takes_a_slot(s))
                .count();
            let queued = scenarios
                .values()
                .filter(|s| phase(s) == Some(Phase::Queued))
                .count();
            (started == 2 && queued == 4).then_some((scenarios, pods))
        },
    )
    .await;
    for id in &ids[..2] {
        assert_eq!(
            admitted(&scenarios[id]),
            Some(("True".into(), "SlotHeld".into())),
            "{id} holds a slot"
        );
    }
    assert_queued_in_order(&scenarios, &pods, &ids[2..]);

    // One worker ends at a time: the head of the queue, and only it, takes
    // the slot.
    for next in 2..ids.len() {
        let running = wait_running(&bed, "a worker running", |_| true).await;
        bed.set_pod_status(&running[0].name_any(), worker_exited(0))
            .await;
        wait_for(
            &format!("scenario #{next}, the head of the queue, to start"),
            SCENARIO_WITHIN,
            || async { bed.pods().get_opt(&pod_name(&ids[next])).await.ok()? },
        )
        .await;
        let (scenarios, pods) = snapshot(&bed).await.expect("list the bed");
        assert_queued_in_order(&scenarios, &pods, &ids[next + 1..]);
    }
    for _ in 0..2 {
        let running = wait_running(&bed, "a worker running", |_| true).await;
        bed.set_pod_status(&running[0].name_any(), worker_exited(0))
            .await;
    }
    wait_for("all six scenarios to succeed", SCENARIO_WITHIN, || async {
        let (scenarios, _) = snapshot(&bed).await?;
        let done = ids
            .iter()
            .all(|id| scenarios.get(id).and_then(phase) == Some(Phase::Succeeded));
        done.then_some(())
    })
    .await;
    controller.assert_running();

    let history = watch.finish().await;
    let most = history.most_holding_slots(|_| true);
    assert_eq!(most, 2, "live worker Pods at the peak with MAX_WORKERS=2");
    let expected: Vec<String> = ids.iter().map(|id| pod_name(id)).collect();
    let started = history.first_seen();
    // The first two are admitted together (in either order); the others one
    // slot at a time, so in exactly the order they arrived.
    let first: HashSet<&String> = started[..2].iter().collect();
    assert_eq!(first, expected[..2].iter().collect(), "{started:?}");
    assert_eq!(
        started[2..],
        expected[2..],
        "queued scenarios start in arrival order"
    );
    assert_first_come_first_served(&history, &ids, &HashSet::new(), 2, |_| true);
}

/// Changes an annotation of the Scenario of `id`, as `kubectl annotate` would.
async fn touch(bed: &Bed, id: &str, n: usize) {
    let patch = serde_json::json!({"metadata": {"annotations": {"test/touch": n.to_string()}}});
    bed.scenarios()
        .patch(
            &scenario_name(id),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("annotate a Scenario");
}

/// What the test does to a scenario's worker once kwok runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// The clip ends: exit 0, Succeeded.
    Ends,
    /// The worker exits 1: Failed.
    Fails,
    /// Its Pod is deleted (as a drain would) and replaced; the new one ends.
    Deleted,
    /// A `to_undeploy` stops it while it runs.
    UndeployedRunning,
    /// A `to_undeploy` stops it while it waits.
    UndeployedQueued,
}

impl Fate {
    fn phase(self) -> Phase {
        match self {
            Fate::Ends | Fate::Deleted => Phase::Succeeded,
            Fate::Fails => Phase::Failed,
            Fate::UndeployedRunning | Fate::UndeployedQueued => Phase::Stopped,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_holds_while_workers_end_fail_are_deleted_and_undeployed_at_once() {
    const MAX: usize = 3;
    let bed = Bed::new("ctl-adm-race").await;
    let watch = PodWatch::start(bed.pods()).await;
    let mut controller = bed.start_controller(&[("MAX_WORKERS", "3")]);
    let _explain = bed.explain_failure(&[&controller]);
    let clip = common::media("vtest.avi");
    let ids: Vec<String> = (0..30).map(|_| uuid()).collect();
    let fates: Vec<Fate> = (0..ids.len())
        .map(|i| match i {
            0 => Fate::UndeployedRunning,
            12 | 25 => Fate::UndeployedQueued,
            _ => [
                Fate::Ends,
                Fate::Fails,
                Fate::Deleted,
                Fate::UndeployedRunning,
            ][i % 4],
        })
        .collect();
    let fate: HashMap<String, Fate> = ids.iter().cloned().zip(fates.iter().copied()).collect();
    for id in &ids {
        bed.deploy(id, &clip).await;
    }
    bed.wait_committed(&bed.deploy, 30, SCENARIO_WITHIN).await;
    wait_for(
        "three scenarios admitted and 27 queued",
        SCENARIO_WITHIN,
        || async {
            let (scenarios, pods) = snapshot(&bed).await?;
            let started: HashSet<&String> = scenarios
                .iter()
                .filter(|(_, s)| holds_or_takes_a_slot(s))
                .map(|(id, _)| id)
                .collect();
            let queued = scenarios
                .values()
                .filter(|s| phase(s) == Some(Phase::Queued))
                .count();
            (started == ids[..MAX].iter().collect() && queued == 27 && pods.len() == MAX)
                .then_some(())
        },
    )
    .await;

    // Two that wait are undeployed: they never start.
    for id in [&ids[12], &ids[25]] {
        bed.undeploy_at(id, now_ms()).await;
    }
    for id in [&ids[12], &ids[25]] {
        wait_for(&format!("queued {id} to stop"), SCENARIO_WITHIN, || async {
            (bed.phase(id).await? == Phase::Stopped).then_some(())
        })
        .await;
    }
    // Undeploying a running one admits the head of the queue, and only it.
    bed.undeploy_at(&ids[0], now_ms()).await;
    wait_for(
        "#3, the head of the queue, to start",
        SCENARIO_WITHIN,
        || async { bed.pods().get_opt(&pod_name(&ids[3])).await.ok()? },
    )
    .await;
    let (scenarios, pods) = snapshot(&bed).await.expect("list the bed");
    assert_eq!(phase(&scenarios[&ids[0]]), Some(Phase::Stopped));
    let queue: Vec<String> = ids[4..]
        .iter()
        .filter(|id| fate[*id] != Fate::UndeployedQueued)
        .cloned()
        .collect();
    assert_queued_in_order(&scenarios, &pods, &queue);

    // Then everything at once: every worker kwok runs meets its fate
    // together with the others that run, while something else (a user's
    // `kubectl annotate`) touches every Scenario, so that queued ones are
    // reconciled just as slots free; until every scenario is done.
    let mut acted: HashSet<String> = HashSet::new();
    let mut undeployed: HashSet<String> =
        [&ids[0], &ids[12], &ids[25]].into_iter().cloned().collect();
    let mut deleted: HashSet<String> = HashSet::new();
    let started = std::time::Instant::now();
    loop {
        // Liveness: each round some worker runs, or every scenario is done.
        let running = wait_for(
            "a worker to run, or every scenario done",
            SCENARIO_WITHIN,
            || {
                let acted = &acted;
                let (bed, ids, fate) = (&bed, &ids, &fate);
                async move {
                    let (scenarios, pods) = snapshot(bed).await?;
                    let done = ids
                        .iter()
                        .all(|id| scenarios.get(id).and_then(phase) == Some(fate[id].phase()));
                    let running: Vec<Pod> = pods
                        .into_values()
                        .filter(|p| {
                            kwok_is_done(p) && !acted.contains(&p.uid().unwrap_or_default())
                        })
                        .collect();
                    (done || !running.is_empty()).then_some(running)
                }
            },
        )
        .await;
        if running.is_empty() {
            break;
        }
        let mut moves = Vec::new();
        for pod in &running {
            acted.insert(pod.uid().unwrap_or_default());
            let id = pod.labels()["runner.vap.io/scenario"].clone();
            let name = pod.name_any();
            let bed = &bed;
            let step = match fate[&id] {
                Fate::Deleted if deleted.insert(id.clone()) => 0,
                Fate::Ends | Fate::Deleted => 1,
                Fate::Fails => 2,
                Fate::UndeployedRunning => {
                    undeployed.insert(id.clone());
                    3
                }
                Fate::UndeployedQueued => panic!("{id} was undeployed while queued, yet it runs"),
            };
            moves.push(async move {
                match step {
                    0 => {
                        // At once (grace period 0): kwok ends a gracefully
                        // deleted Pod with a delete of its own by name, with
                        // no uid precondition, which can land on the
                        // successor of the same name. A graceful delete on a
                        // real kubelet is real_node_life's.
                        bed.pods()
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await
                            .expect("delete a worker Pod");
                    }
                    1 => bed.set_pod_status(&name, worker_exited(0)).await,
                    2 => bed.set_pod_status(&name, worker_exited(1)).await,
                    _ => bed.undeploy_at(&id, now_ms()).await,
                }
            });
        }
        let touches = ids.iter().map(|id| touch(&bed, id, acted.len()));
        futures::future::join(
            futures::future::join_all(moves),
            futures::future::join_all(touches),
        )
        .await;
    }
    let elapsed = started.elapsed();
    controller.assert_running();

    let (scenarios, _) = snapshot(&bed).await.expect("list the bed");
    for (id, s) in &scenarios {
        assert_eq!(phase(s), Some(fate[id].phase()), "{id} ({:?})", fate[id]);
        if fate[id] == Fate::Deleted {
            assert_eq!(
                s.status.as_ref().unwrap().restart_count,
                0,
                "a deleted Pod is replaced without counting a restart"
            );
        }
        if fate[id] == Fate::Fails {
            let error = s.status.as_ref().unwrap().last_error.clone();
            assert!(
                error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("exited with code 1"),
                "{id}: lastError {error:?}"
            );
        }
    }
    let history = watch.finish().await;
    assert_eq!(
        history.most_holding_slots(|_| true),
        MAX,
        "live worker Pods at the peak with MAX_WORKERS=3"
    );
    let expected: Vec<String> = ids
        .iter()
        .filter(|id| fate[*id] != Fate::UndeployedQueued)
        .map(|id| pod_name(id))
        .collect();
    let mut seen = history.first_seen();
    assert_first_come_first_served(&history, &ids, &undeployed, MAX, |_| true);
    seen.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        seen, expected_sorted,
        "every scenario but the two undeployed while queued started"
    );
    // The deleted Pod and one replacement ran. kwok deletes Pods by name
    // with no uid precondition, so a delete of its own meant for the Pod the
    // test deleted can land on the replacement before it runs; the
    // controller then rightly replaces that one too. What must never be is
    // a second replacement that runs.
    for id in ids.iter().filter(|id| fate[*id] == Fate::Deleted) {
        let name = pod_name(id);
        assert_eq!(
            history.uids_that_ran(&name).len(),
            2,
            "{id}: its deleted Pod was replaced by one that ran (Pods seen: {:?})",
            history.uids_of(&name)
        );
    }
    eprintln!("30 scenarios through 3 slots in {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_in_one_namespace_keep_to_their_own() {
    let bed = Bed::new("ctl-two").await;
    let watch = PodWatch::start(bed.pods()).await;
    // Runner A: the bed's topics and group, one slot. Runner B: its own
    // topics and group, two slots.
    let b = bed.runner_topics("runner-b").await;
    let mut runner_a = bed.start_controller(&[
        ("RUNNER_NAME", "runner-a"),
        ("POD_NAME", "replica-a"),
        ("MAX_WORKERS", "1"),
    ]);
    let mut env_b = b.env();
    env_b.extend([("POD_NAME", "replica-b"), ("MAX_WORKERS", "2")]);
    let mut runner_b = bed.start_controller(&env_b);
    let _explain = bed.explain_failure(&[&runner_a, &runner_b]);
    let runner_of = |p: &Pod| p.labels().get(LABEL_RUNNER).cloned().unwrap_or_default();
    let clip = common::media("vtest.avi");
    let other_clip = common::media("Megamind.avi");

    let (a1, a2) = (uuid(), uuid());
    let (shared, b2, b3) = (uuid(), uuid(), uuid());
    for id in [&a1, &a2] {
        bed.deploy(id, &clip).await;
    }
    for id in [&shared, &b2, &b3] {
        bed.send(&b.deploy, Some(id), &common::deploy_body(id, &clip))
            .await;
    }
    // Each fills its own quota: A runs one and queues one, B runs two and
    // queues one.
    let (scenarios, pods) = wait_for(
        "A: 1 running, 1 queued; B: 2 running, 1 queued",
        SCENARIO_WITHIN,
        || async {
            let (scenarios, pods) = snapshot(&bed).await?;
            let state: Vec<Option<Phase>> = [&a1, &a2, &shared, &b2, &b3]
                .iter()
                .map(|id| scenarios.get(*id).and_then(phase))
                .collect();
            let started = |p: &Option<Phase>| matches!(p, Some(Phase::Starting | Phase::Running));
            let queued = |p: &Option<Phase>| *p == Some(Phase::Queued);
            (started(&state[0])
                && queued(&state[1])
                && started(&state[2])
                && started(&state[3])
                && queued(&state[4])
                && pods.len() == 3)
                .then_some((scenarios, pods))
        },
    )
    .await;
    for (ids, runner) in [([&a1, &a2], "runner-a"), ([&shared, &b2], "runner-b")] {
        for id in ids {
            assert_eq!(scenarios[id].labels()[LABEL_RUNNER], runner, "{id}");
        }
        assert_eq!(runner_of(&pods[&pod_name(ids[0])]), runner);
    }
    assert_queued_in_order(&scenarios, &pods, std::slice::from_ref(&a2));
    assert_queued_in_order(&scenarios, &pods, std::slice::from_ref(&b3));

    // Each holds its own Lease: both lead at once.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(bed.client.clone(), &bed.namespace);
    for (lease, holder) in [
        ("runner-a-leader", "replica-a"),
        ("runner-b-leader", "replica-b"),
    ] {
        let spec = leases
            .get(lease)
            .await
            .expect(lease)
            .spec
            .unwrap_or_default();
        assert_eq!(spec.holder_identity.as_deref(), Some(holder), "{lease}");
    }

    // A's commands for a scenario that B owns change nothing: a newer deploy
    // with another camera, then an undeploy, through A's topics.
    let owned = bed.scenarios().get(&scenario_name(&shared)).await.unwrap();
    let owned_pod = bed.pods().get(&pod_name(&shared)).await.unwrap();
    bed.send(
        &bed.deploy,
        Some(&shared),
        &common::deploy_body(&shared, &other_clip),
    )
    .await;
    bed.undeploy_at(&shared, now_ms()).await;
    bed.wait_committed(&bed.deploy, 3, SCENARIO_WITHIN).await;
    bed.wait_committed(&bed.undeploy, 1, SCENARIO_WITHIN).await;
    let after = bed.scenarios().get(&scenario_name(&shared)).await.unwrap();
    assert_eq!(after.labels()[LABEL_RUNNER], "runner-b");
    assert_eq!(after.spec, owned.spec, "runner A left B's Scenario alone");
    assert!(holds_or_takes_a_slot(&after), "{:?}", phase(&after));
    let pod = bed.pods().get(&pod_name(&shared)).await.unwrap();
    assert_eq!(pod.uid(), owned_pod.uid(), "B's worker was left alone");
    assert_eq!(
        bed.phase(&a2).await,
        Some(Phase::Queued),
        "A's queue is as it was"
    );

    // A slot B frees goes to B's queue, not to A's.
    hand_over(&bed, &b2, &b3).await;
    assert_eq!(
        bed.phase(&a2).await,
        Some(Phase::Queued),
        "A's queue still waits"
    );

    // A slot A frees goes to A's queue.
    let a2_pod = hand_over(&bed, &a1, &a2).await;
    assert_eq!(runner_of(&a2_pod), "runner-a");

    // Each runner's consumer group read its own topics.
    assert_eq!(bed.committed_by(&bed.group, &bed.deploy), 3);
    wait_for(
        "B's group to commit its three deploys",
        SCENARIO_WITHIN,
        || async { (bed.committed_by(&b.group, &b.deploy) == 3).then_some(()) },
    )
    .await;
    assert_eq!(bed.committed_by(&b.group, &bed.deploy), 0);
    assert_eq!(bed.committed_by(&bed.group, &b.deploy), 0);
    runner_a.assert_running();
    runner_b.assert_running();

    let history = watch.finish().await;
    for (runner, max) in [("runner-a", 1), ("runner-b", 2)] {
        assert_eq!(
            history.most_holding_slots(|p| runner_of(p) == runner),
            max,
            "live worker Pods of {runner} at the peak"
        );
    }
    let arrival_a = [a1.clone(), a2.clone()];
    let arrival_b = [shared.clone(), b2.clone(), b3.clone()];
    assert_first_come_first_served(&history, &arrival_a, &HashSet::new(), 1, |p| {
        runner_of(p) == "runner-a"
    });
    assert_first_come_first_served(&history, &arrival_b, &HashSet::new(), 2, |p| {
        runner_of(p) == "runner-b"
    });
}

/// A worker Pod whose create hangs (behind an admission webhook that does
/// not answer) holds up no other scenario's admission: the other's Pod is
/// created while the first create is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_create_that_hangs_holds_up_no_other_admission() {
    const CAMERA: &str = "rtsp://camera.example/stream";
    let bed = Bed::new("adm-slow-create").await;
    let (slow, other) = (uuid(), uuid());
    let webhook = common::controller::HangingWebhook::for_labels(
        &bed,
        ("", "pods"),
        serde_json::json!({ "runner.vap.io/scenario": slow }),
    )
    .await;
    let mut controller = bed.start_controller(&[("MAX_WORKERS", "2")]);
    bed.deploy(&slow, CAMERA).await;
    wait_for(
        "the first Pod create to be held by the webhook",
        SCENARIO_WITHIN,
        || async { (webhook.taken() > 0).then_some(()) },
    )
    .await;
    let ended = webhook.ended();
    bed.deploy(&other, CAMERA).await;
    wait_for("the other scenario's Pod", SCENARIO_WITHIN, || async {
        bed.pods()
            .get_opt(&pod_name(&other))
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    assert_eq!(
        webhook.ended(),
        ended,
        "the other Pod waited until the held create ended"
    );
    drop(webhook);
    for id in [&slow, &other] {
        bed.wait_phase(id, Phase::Running).await;
    }
    controller.assert_running();
}
