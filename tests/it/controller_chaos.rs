//! Chaos for `runner controller`: replicas behind the chart's fencing policy
//! with a short Lease (LEASE_DURATION_SECS=4), MAX_WORKERS=3, while scenarios
//! come and go (live cameras, and clips whose worker Pods the test ends with
//! exit 0 or 1 as a kubelet would: Pods run on kwok's fake Node), a seeded
//! random sequence of steps kills the leader (SIGKILL), pauses it past its
//! Lease (SIGSTOP, then SIGCONT), denies the controllers status writes, Pod
//! or Scenario creations for a while (RBAC), and replays every command (the
//! replicas start again on a fresh consumer group, which reads from the
//! start of both topics).
//!
//! After every step, and at every Pod change a watch reports, it checks that
//! at most MAX_WORKERS worker Pods hold a slot, that no scenario has two, and
//! that no worker Pod of a scenario is created after its undeploy was
//! written. When the faults stop and the controllers settle, every Scenario
//! must be honest: an undeployed one Stopped (or removed after
//! FINISHED_TTL_SECS) with no Pod; a clip the test ended Succeeded (exit 0)
//! or Failed (exit 1), or removed; every other one Running on a running Pod
//! or Queued without one, MAX_WORKERS of them Running (or all, if fewer),
//! in FIFO order (no Queued one joined the queue before a Running one). The
//! dead-letter topic may hold only replays of deploys whose Scenario had
//! existed and was removed (reason `stale`), counted apart.
//!
//! A failure names the seed, the step and what was seen. Settings:
//! `CHAOS_SEED` (default: from the clock; printed), `CHAOS_STEPS` (default
//! 36, two to three minutes), `CHAOS_SCENARIOS` (default 50). A seed repeats
//! the random draws; what a step acts on may depend on the cluster's timing
//! (which Pods run), so a repeated run is alike, not identical. A run of
//! about 30 minutes (`scripts/chaos 800` does the same, bringing the bed up
//! when it is not running):
//!
//! ```text
//! CHAOS_STEPS=800 cargo test --locked --test it -- --exact --nocapture \
//!   controller_chaos::leader_kills_pauses_denials_and_replays_never_break_max_workers_or_honest_phases
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use vap_runner::controller::crd::{Phase, Scenario};

use crate::common;
use crate::common::chaos::{PodLedger, Rng, rv};
use crate::common::controller::{
    Bed, ControllerProcess, Identity, Versions, controller_rules, kwok_is_done, worker_exited,
};
use crate::common::fencing::{Fencing, RUNNER};
use crate::common::scenario::{now_ms, phase, pod_name, uuid};
use crate::common::wait_for;

const MAX_WORKERS: usize = 3;
const LEASE_SECS: &str = "4";
/// Longer than a deploy usually waits in ingest under the faults (a
/// failover waits out the dead consumer's session, a denied write is retried
/// with up to 30 s between attempts): a first deploy read later than this
/// is dead-lettered as stale, and counted apart.
const TTL_SECS: &str = "45";
/// The consumer's group session as an operator with a 4 s Lease would set
/// it: a killed or paused leader's consumer stays a member of the group
/// until its session times out, and no one else may read meanwhile; with
/// librdkafka's default (45 s) each leader fault held ingest that long.
const KAFKA_PROPERTIES: &str = "session.timeout.ms=6000\nheartbeat.interval.ms=2000";
const LIVE: &str = "rtsp://camera.example/stream";
/// The longest the test keeps a write denied.
const DENY_AT_MOST: Duration = Duration::from_secs(12);
/// How long the controllers get to settle once the faults stop.
const SETTLE_WITHIN: Duration = Duration::from_secs(180);

/// When ingest queued `scenario`: the annotation it writes (RFC 3339).
fn enqueued_at(scenario: &Scenario) -> chrono::DateTime<chrono::FixedOffset> {
    let raw = kube::ResourceExt::annotations(scenario)
        .get("runner.vap.io/enqueued-at")
        .unwrap_or_else(|| {
            panic!(
                "{} has no enqueued-at annotation",
                scenario.metadata.name.as_deref().unwrap_or("?")
            )
        });
    chrono::DateTime::parse_from_rfc3339(raw).unwrap_or_else(|e| panic!("enqueued-at {raw}: {e}"))
}

/// A setting from the environment, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// The first of `problems`, one a line, and how many more there are.
fn shown(problems: &[String]) -> String {
    let mut text = problems[..problems.len().min(12)].join("\n");
    if problems.len() > 12 {
        text += &format!("\n… and {} more", problems.len() - 12);
    }
    text
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Live,
    Clip,
}

/// One scenario of the run, as the test sent it.
struct Planned {
    id: String,
    source: Source,
    /// The record stamp of its deploy, once sent.
    deployed: Option<i64>,
    /// The record stamp of its undeploy, once sent.
    undeployed: Option<i64>,
    /// The exit code the test gave its worker (a clip), once it took.
    ended: Option<i32>,
    /// Its deploy was dead-lettered as stale, read only after
    /// FINISHED_TTL_SECS: the runner never took it.
    lost: bool,
}

/// A running `runner controller` replica.
struct Replica {
    name: String,
    process: ControllerProcess,
}

/// Writes the test denies the controllers for a while: (resource, verb).
const DENIALS: [(&str, &str); 3] = [
    ("scenarios/status", "patch"),
    ("pods", "create"),
    ("scenarios", "create"),
];

fn api_group(resource: &str) -> &'static str {
    if resource.starts_with("scenarios") {
        "runner.vap.io"
    } else {
        ""
    }
}

/// The run. Its fields drop in order: the replicas (which show their logs'
/// tails when the test fails) before the bed that holds those logs.
struct Chaos {
    seed: u64,
    rng: Rng,
    scenarios: Vec<Planned>,
    replicas: Vec<Replica>,
    replicas_started: usize,
    /// The consumer group the replicas start with (a fresh one replays).
    group: String,
    rewinds: usize,
    denied: Option<((&'static str, &'static str), Instant)>,
    ledger: PodLedger,
    versions: Versions<Scenario>,
    /// The steps done, for the failure message.
    done: Vec<String>,
    /// Replicas that exited on their own (not paused, killed or stopped),
    /// or did not stop on SIGTERM within the grace period.
    exits: Vec<String>,
    /// Every replica's name and log file.
    logs: Vec<(String, std::path::PathBuf)>,
    started: Instant,
    identity: Identity,
    _fencing: Fencing,
    bed: Bed,
}

impl Chaos {
    async fn new(seed: u64, count: usize) -> Chaos {
        let bed = Bed::new("ctl-chaos").await;
        let identity = bed.identity("runner", controller_rules(&[])).await;
        let fencing = Fencing::install(&bed, &identity).await;
        let ledger = PodLedger::start(bed.pods(), MAX_WORKERS).await;
        let versions = Versions::start(bed.scenarios(), Default::default()).await;
        let mut rng = Rng::new(seed);
        let scenarios = (0..count)
            .map(|_| Planned {
                id: uuid(),
                source: if rng.below(5) < 2 {
                    Source::Clip
                } else {
                    Source::Live
                },
                deployed: None,
                undeployed: None,
                ended: None,
                lost: false,
            })
            .collect();
        let group = bed.group.clone();
        let mut chaos = Chaos {
            bed,
            identity,
            _fencing: fencing,
            seed,
            rng,
            scenarios,
            replicas: Vec::new(),
            replicas_started: 0,
            group,
            rewinds: 0,
            denied: None,
            ledger,
            versions,
            done: Vec::new(),
            exits: Vec::new(),
            logs: Vec::new(),
            started: Instant::now(),
        };
        chaos.start_replica();
        chaos.start_replica();
        chaos
    }

    /// Fails naming the seed, the step and the steps before it; every
    /// replica's whole log is kept (the bed's go with it).
    fn fail(&self, what: &str) -> ! {
        let last: Vec<&String> = self.done.iter().rev().take(12).rev().collect();
        let kept = std::env::temp_dir().join(format!("chaos-{}-logs", self.seed));
        let _ = std::fs::create_dir_all(&kept);
        for (name, log) in &self.logs {
            let _ = std::fs::copy(log, kept.join(format!("{name}.log")));
        }
        panic!(
            "chaos seed {seed} (repeat with CHAOS_SEED={seed}), step {n} `{step}`: {what}\n\
             the replicas' logs are kept in {kept}; the steps up to it: {last:#?}",
            kept = kept.display(),
            seed = self.seed,
            n = self.done.len(),
            step = self.done.last().map(String::as_str).unwrap_or("setting up"),
        )
    }

    fn start_replica(&mut self) {
        self.replicas_started += 1;
        let name = format!("replica-{}", self.replicas_started);
        let (kubeconfig, path) = self.identity.env();
        let process = self.bed.start_controller(&[
            (kubeconfig, path),
            ("POD_NAME", &name),
            ("CONSUMER_GROUP", &self.group),
            ("MAX_WORKERS", &MAX_WORKERS.to_string()),
            ("LEASE_DURATION_SECS", LEASE_SECS),
            ("FINISHED_TTL_SECS", TTL_SECS),
            ("KAFKA_PROPERTIES", KAFKA_PROPERTIES),
            ("LOG_LEVEL", "info"),
        ]);
        self.logs.push((name.clone(), process.log_path.clone()));
        self.replicas.push(Replica { name, process });
    }

    /// Keeps two replicas running, as a Deployment's ReplicaSet would: one
    /// that exited is replaced (a leader that lost its Lease exits so that a
    /// fresh start can compete again).
    fn keep_two(&mut self) {
        let mut kept = Vec::new();
        for mut r in std::mem::take(&mut self.replicas) {
            match r.process.exited() {
                Some(status) => self.exits.push(format!(
                    "{} exited with {status} after step {}: {}",
                    r.name,
                    self.done.len(),
                    r.process.log_tail().lines().last().unwrap_or_default()
                )),
                None => kept.push(r),
            }
        }
        self.replicas = kept;
        while self.replicas.len() < 2 {
            self.start_replica();
        }
    }

    /// The replica holding the leader Lease, once a running one other than
    /// `except` holds it.
    async fn leader(&self, except: Option<&str>) -> usize {
        let leases: Api<Lease> = Api::namespaced(self.bed.client.clone(), &self.bed.namespace);
        let lease = format!("{RUNNER}-leader");
        let names: Vec<String> = self
            .replicas
            .iter()
            .map(|r| r.name.clone())
            .filter(|n| Some(n.as_str()) != except)
            .collect();
        let (leases, lease, names) = (&leases, &lease, &names);
        let holder = wait_for(
            &format!(
                "one of {names:?} to hold the leader Lease (chaos seed {}, after step {})",
                self.seed,
                self.done.len()
            ),
            Duration::from_secs(120),
            || async move {
                let holder = leases.get_opt(lease).await.ok()??.spec?.holder_identity?;
                names.contains(&holder).then_some(holder)
            },
        )
        .await;
        self.replicas
            .iter()
            .position(|r| r.name == holder)
            .expect("the holder is a replica")
    }

    /// Notes a step: printed, and named by what goes wrong from now on.
    fn step(&mut self, what: String) {
        println!(
            "chaos step {} at {:.0?}: {what}",
            self.done.len() + 1,
            self.started.elapsed()
        );
        self.ledger
            .doing(&format!("step {} `{what}`", self.done.len() + 1));
        self.done.push(what);
    }

    /// Deploys the next `n` scenarios not deployed yet.
    async fn deploy(&mut self, n: usize) {
        let next: Vec<usize> = (0..self.scenarios.len())
            .filter(|&i| self.scenarios[i].deployed.is_none())
            .take(n)
            .collect();
        let named: Vec<String> = next
            .iter()
            .map(|&i| format!("{:?} {}", self.scenarios[i].source, self.scenarios[i].id))
            .collect();
        self.step(format!("deploy {named:?}"));
        let clip = common::media("vtest.avi");
        for i in next {
            let at = now_ms();
            let s = &mut self.scenarios[i];
            let camera = match s.source {
                Source::Live => LIVE,
                Source::Clip => &clip,
            };
            self.bed.deploy_at(&s.id, camera, at).await;
            s.deployed = Some(at);
        }
    }

    fn undeployable(&self) -> Vec<usize> {
        (0..self.scenarios.len())
            .filter(|&i| {
                let s = &self.scenarios[i];
                s.deployed.is_some() && s.undeployed.is_none()
            })
            .collect()
    }

    /// Undeploys a scenario: one whose worker runs (its slot goes to the
    /// next in line) as often as any other.
    async fn undeploy(&mut self) {
        let running = self.ledger.with_pod();
        let any = self.undeployable();
        let with_pod: Vec<usize> = any
            .iter()
            .copied()
            .filter(|&i| running.contains(&self.scenarios[i].id))
            .collect();
        let from = if self.rng.below(2) == 0 && !with_pod.is_empty() {
            with_pod
        } else {
            any
        };
        let Some(i) = self.rng.pick(&from) else {
            return;
        };
        self.step(format!("undeploy {}", self.scenarios[i].id));
        let at = now_ms();
        self.bed.undeploy_at(&self.scenarios[i].id, at).await;
        self.scenarios[i].undeployed = Some(at);
    }

    /// Running clips the test may end.
    fn endable(&self) -> Vec<usize> {
        let running = self.ledger.running();
        (0..self.scenarios.len())
            .filter(|&i| {
                let s = &self.scenarios[i];
                s.source == Source::Clip
                    && s.undeployed.is_none()
                    && s.ended.is_none()
                    && running.contains_key(&s.id)
            })
            .collect()
    }

    /// Ends the worker of a running clip with exit 0 or 1, as its kubelet
    /// would write it.
    async fn end_clip(&mut self) {
        let code = self.rng.below(2) as i32;
        let Some(i) = self.rng.pick(&self.endable()) else {
            return;
        };
        let id = self.scenarios[i].id.clone();
        self.step(format!("end the worker of clip {id} with exit {code}"));
        let Some(uid) = self.ledger.running().get(&id).cloned() else {
            return;
        };
        self.bed
            .set_pod_status(&pod_name(&id), worker_exited(code))
            .await;
        // It counts only if it was that Pod that ended (not one gone meanwhile).
        let pod = self.bed.pods().get_opt(&pod_name(&id)).await.ok().flatten();
        let ended = if code == 0 { "Succeeded" } else { "Failed" };
        let took = pod.is_some_and(|p| {
            p.metadata.uid.as_deref() == Some(uid.as_str())
                && p.status.and_then(|s| s.phase).as_deref() == Some(ended)
        });
        if took {
            self.scenarios[i].ended = Some(code);
        }
    }

    async fn kill_leader(&mut self) {
        let i = self.leader(None).await;
        let mut r = self.replicas.remove(i);
        self.step(format!("SIGKILL the leader {}", r.name));
        r.process.kill9();
        self.start_replica();
    }

    /// SIGSTOP the leader until the standby has taken over (after a whole
    /// Lease of silence), then SIGCONT: its leadership lapsed by its own
    /// clock, so it must not act, and it exits.
    async fn pause_leader(&mut self) {
        let i = self.leader(None).await;
        let name = self.replicas[i].name.clone();
        self.step(format!(
            "SIGSTOP the leader {name} past its Lease, then SIGCONT"
        ));
        self.replicas[i].process.signal("STOP");
        self.leader(Some(&name)).await;
        // Frozen a while longer as the new leader acts: time passes under
        // the fault (nothing is judged by this wait).
        let longer = Duration::from_millis(500 * self.rng.below(6) as u64);
        tokio::time::sleep(longer).await;
        let i = self
            .replicas
            .iter()
            .position(|r| r.name == name)
            .expect("the paused replica");
        let mut r = self.replicas.remove(i);
        r.process.signal("CONT");
        let what = format!(
            "the paused leader {name} to exit after SIGCONT, another replica holding the Lease \
             (chaos seed {}, step {})",
            self.seed,
            self.done.len()
        );
        wait_for(&what, Duration::from_secs(60), || {
            let ended = r.process.exited();
            async move { ended }
        })
        .await;
        self.start_replica();
    }

    /// Denies the controllers one kind of write, or allows it again.
    async fn toggle_denial(&mut self) {
        match self.denied.take() {
            Some(((resource, verb), _)) => {
                self.step(format!("allow {verb} {resource} again"));
                self.bed
                    .set_rules(&self.identity, controller_rules(&[]))
                    .await;
                let access = (api_group(resource), resource, verb);
                self.bed.wait_access(&self.identity, access, true).await;
            }
            None => {
                let (resource, verb) = self.rng.pick(&DENIALS).expect("denials");
                self.step(format!("deny {verb} {resource} (RBAC)"));
                self.bed
                    .set_rules(&self.identity, controller_rules(&[(resource, verb)]))
                    .await;
                let access = (api_group(resource), resource, verb);
                self.bed.wait_access(&self.identity, access, false).await;
                self.denied = Some(((resource, verb), Instant::now()));
            }
        }
    }

    /// Every command read again: the replicas stop (SIGTERM) and start on a
    /// consumer group of their own, which reads both topics from the start,
    /// as after an operator rewound the group.
    async fn replay(&mut self) {
        self.rewinds += 1;
        self.group = format!("{}-replay-{}", self.bed.group, self.rewinds);
        self.step(format!(
            "replay every command: the replicas start again on consumer group {}",
            self.group
        ));
        // Stopped as the kubelet stops a Pod: SIGTERM, and SIGKILL after the
        // chart's terminationGracePeriodSeconds (30).
        for mut r in std::mem::take(&mut self.replicas) {
            if r.process.exited().is_some() {
                continue;
            }
            r.process.signal("TERM");
            let until = Instant::now() + Duration::from_secs(30);
            while r.process.exited().is_none() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if r.process.exited().is_none() {
                let last = r.process.log_tail();
                let last = last.lines().last().unwrap_or_default().to_string();
                r.process.kill9();
                self.exits.push(format!(
                    "{} did not stop within 30 s of SIGTERM (step {}), SIGKILLed as the kubelet would; its last line: {last}",
                    r.name,
                    self.done.len()
                ));
            }
        }
        self.start_replica();
        self.start_replica();
    }

    /// Lets the leader read what was sent (its group commits up to the end
    /// of both topics), for at most a while: faults do not wait for it.
    async fn let_ingest_catch_up(&mut self) {
        self.step("let ingest catch up".into());
        let topics = [self.bed.deploy.clone(), self.bed.undeploy.clone()];
        let ends: Vec<i64> = topics.iter().map(|t| self.bed.messages_in(t)).collect();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let caught_up = topics
                .iter()
                .zip(&ends)
                .all(|(t, end)| self.bed.committed_by(&self.group, t) >= *end);
            if caught_up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!("chaos: ingest has not caught up within 30 s; going on");
    }

    /// One step drawn at random; `left` steps are left (this one included).
    async fn random_step(&mut self, left: usize) {
        #[derive(Clone, Copy)]
        enum Kind {
            Deploy,
            Undeploy,
            EndClip,
            Kill,
            Pause,
            Deny,
            Replay,
            CatchUp,
        }
        let waiting = self
            .scenarios
            .iter()
            .filter(|s| s.deployed.is_none())
            .count();
        // The weights depend on the test's own record only, so that a seed
        // draws the same kinds of steps; a clip to end depends on the
        // cluster, and with none running the step lets ingest catch up.
        // Deploys come as often as it takes to deploy every scenario over
        // the run (a deploy step sends one or two): a long run has them
        // come and go all along.
        let undeploys = if self.undeployable().is_empty() {
            0
        } else {
            12
        };
        let rest = [
            (undeploys, Kind::Undeploy),
            (12, Kind::EndClip),
            (7, Kind::Kill),
            (7, Kind::Pause),
            (10, Kind::Deny),
            (4, Kind::Replay),
            (10, Kind::CatchUp),
        ];
        let others = rest.iter().map(|(w, _)| *w).sum::<usize>() as f64;
        let needed = (waiting as f64 / 1.5 / left as f64).min(0.9);
        let deploys = match waiting {
            0 => 0,
            _ => ((others * needed / (1.0 - needed)).ceil() as usize).clamp(3, 30),
        };
        let mut choices = vec![(deploys, Kind::Deploy)];
        choices.extend(rest);
        let mut roll = self.rng.below(choices.iter().map(|(w, _)| w).sum());
        let mut kind = choices
            .iter()
            .find(|(w, _)| {
                let hit = roll < *w;
                roll = roll.saturating_sub(*w);
                hit
            })
            .map(|(_, k)| *k)
            .expect("a step");
        if matches!(kind, Kind::EndClip) && self.endable().is_empty() {
            kind = Kind::CatchUp;
        }
        match kind {
            Kind::Deploy => {
                // Enough per deploy step that every scenario is deployed
                // within the run (deploys are about a third of the steps).
                let due = waiting.div_ceil((left * 3 / 10).max(1));
                let n = due.max(1 + self.rng.below(2)).min(waiting);
                self.deploy(n).await;
            }
            Kind::Undeploy => self.undeploy().await,
            Kind::EndClip => self.end_clip().await,
            Kind::Kill => self.kill_leader().await,
            Kind::Pause => self.pause_leader().await,
            Kind::Deny => self.toggle_denial().await,
            Kind::Replay => self.replay().await,
            Kind::CatchUp => self.let_ingest_catch_up().await,
        }
    }

    /// Worker Pods created after their scenario's undeploy was written: the
    /// first Scenario version that shows it stopped against the Pod's
    /// creation, both resourceVersions of the one etcd.
    fn pods_after_undeploy(&self) -> Vec<String> {
        let mut stopped: BTreeMap<String, u64> = BTreeMap::new();
        for s in self.versions.seen() {
            if s.spec.is_stopped() {
                let at = stopped
                    .entry(s.spec.scenario_uuid.clone())
                    .or_insert(u64::MAX);
                *at = (*at).min(rv(&s.metadata));
            }
        }
        self.ledger
            .pods()
            .values()
            .filter_map(|seen| {
                let at = *stopped.get(&seen.scenario)?;
                let created = seen.created_rv?;
                (created > at).then(|| {
                    format!(
                        "a worker Pod of scenario {} was created (resourceVersion {created}) after \
                         its undeploy was written (resourceVersion {at})",
                        seen.scenario
                    )
                })
            })
            .collect()
    }

    /// The scenarios that have had a Scenario at some time.
    fn existed(&self) -> BTreeSet<String> {
        self.versions
            .seen()
            .into_iter()
            .map(|s| s.spec.scenario_uuid)
            .collect()
    }

    /// Sorts the dead-letter topic: a deploy read again (a replay, or
    /// delivered again after a crash) after its Scenario was removed (reason
    /// `stale`, the scenario known before) is expected, and
    /// so is a first deploy read only after FINISHED_TTL_SECS (ingest stalled
    /// that long: by the runner's rule it cannot be told from a replay); that
    /// scenario is noted as never deployed. Returns what should not be there,
    /// and how many of each expected kind there are.
    async fn sort_dead_letters(&mut self) -> (Vec<String>, usize, usize) {
        let n = usize::try_from(self.bed.messages_in(&self.bed.dlq)).unwrap_or(0);
        if n == 0 {
            return (Vec::new(), 0, 0);
        }
        let existed = self.existed();
        let ttl_ms = TTL_SECS.parse::<i64>().expect("TTL_SECS") * 1000;
        let (mut wrong, mut replays, mut late) = (Vec::new(), 0, 0);
        for letter in self.bed.read_topic(&self.bed.dlq, n).await {
            let header = |key: &str| letter.headers.get(key).cloned().unwrap_or_default();
            let (reason, error) = (header("reason"), header("error"));
            let payload = String::from_utf8_lossy(&letter.payload).into_owned();
            // The command's scenario_uuid, if it has one.
            let scenario = serde_json::from_str::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| v["scenario_uuid"].as_str().map(str::to_string))
                .unwrap_or_default();
            let planned = self.scenarios.iter_mut().find(|s| s.id == scenario);
            // The record's timestamp is when the runner dead-lettered it.
            let waited = planned
                .as_ref()
                .and_then(|s| s.deployed)
                .map(|at| letter.timestamp_ms - at);
            if reason == "stale" && existed.contains(&scenario) {
                replays += 1;
            } else if reason == "stale"
                && !existed.contains(&scenario)
                && waited.is_some_and(|ms| ms > ttl_ms)
            {
                late += 1;
                if let Some(s) = planned {
                    s.lost = true;
                }
            } else {
                wrong.push(format!(
                    "dead-lettered ({reason}) {waited:?} ms after it was sent: {payload} ({error})"
                ));
            }
        }
        (wrong, replays, late)
    }

    /// The checks after every step.
    async fn check(&mut self) {
        let mut problems = self.ledger.violations();
        problems.extend(self.pods_after_undeploy());
        problems.extend(self.sort_dead_letters().await.0);
        if !problems.is_empty() {
            self.fail(&shown(&problems));
        }
    }

    /// What is not honest now (see the module's words).
    async fn dishonest(&self) -> Vec<String> {
        let Ok(scenarios) = self.bed.scenarios().list(&Default::default()).await else {
            return vec!["cannot list the Scenarios".into()];
        };
        let Ok(pods) = self.bed.pods().list(&Default::default()).await else {
            return vec!["cannot list the Pods".into()];
        };
        let scenarios: BTreeMap<String, Scenario> = scenarios
            .items
            .into_iter()
            .map(|s| (s.spec.scenario_uuid.clone(), s))
            .collect();
        let pods: BTreeMap<String, _> = pods
            .items
            .into_iter()
            .map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                (name.trim_start_matches("worker-").to_string(), p)
            })
            .collect();
        let mut problems = Vec::new();
        let (mut running, mut queued) = (Vec::new(), Vec::new());
        let mut wanting = 0;
        for s in &self.scenarios {
            let scenario = scenarios.get(&s.id);
            let now = scenario.and_then(phase);
            let pod = pods.get(&s.id);
            let said = format!("scenario {} ({:?})", s.id, s.source);
            if s.undeployed.is_some() {
                if scenario.is_some() && now != Some(Phase::Stopped) {
                    problems.push(format!("{said} was undeployed, and is {now:?}"));
                }
                if pod.is_some() {
                    problems.push(format!("{said} was undeployed, and has a worker Pod"));
                }
            } else if s.lost {
                if scenario.is_some() || pod.is_some() {
                    problems.push(format!(
                        "{said} was never taken (its deploy was dead-lettered), and is {now:?}"
                    ));
                }
            } else if let Some(code) = s.ended {
                let want = if code == 0 {
                    Phase::Succeeded
                } else {
                    Phase::Failed
                };
                if scenario.is_some() && now != Some(want) {
                    problems.push(format!("{said} exited {code}, and is {now:?}"));
                }
                if pod.is_some_and(common::controller::holds_slot) {
                    problems.push(format!("{said} exited {code}, and has a live worker Pod"));
                }
            } else if let Some(scenario) = scenario {
                wanting += 1;
                match now {
                    Some(Phase::Running) if pod.is_some_and(kwok_is_done) => {
                        running.push((enqueued_at(scenario), s.id.clone()))
                    }
                    Some(Phase::Queued) if pod.is_none() => {
                        queued.push((enqueued_at(scenario), s.id.clone()))
                    }
                    _ => problems.push(format!(
                        "{said} is {now:?} with {}",
                        match pod {
                            Some(p) => format!(
                                "a Pod {:?}",
                                p.status.as_ref().and_then(|s| s.phase.clone())
                            ),
                            None => "no Pod".into(),
                        }
                    )),
                }
            } else if s.deployed.is_some() {
                problems.push(format!("{said} was deployed, and has no Scenario"));
            }
        }
        if running.len() != wanting.min(MAX_WORKERS) {
            problems.push(format!(
                "{} of {wanting} wanting a worker run (MAX_WORKERS={MAX_WORKERS})",
                running.len()
            ));
        }
        if let (Some(last), Some(first)) = (running.iter().max(), queued.iter().min())
            && last > first
        {
            problems.push(format!(
                "not FIFO: {} queued at {} waits while {} queued at {} runs",
                first.1, first.0, last.1, last.0
            ));
        }
        let known: BTreeSet<&str> = self.scenarios.iter().map(|s| s.id.as_str()).collect();
        for id in scenarios.keys().filter(|id| !known.contains(id.as_str())) {
            problems.push(format!("a Scenario {id} the test never deployed"));
        }
        problems
    }

    /// Stops the faults, deploys what is left, and waits until every
    /// Scenario is honest; then checks the dead-letter topic. Returns how
    /// many replayed deploys, and how many first deploys read too late, were
    /// dead-lettered as stale.
    async fn settle(&mut self) -> (usize, usize) {
        if self.denied.is_some() {
            self.toggle_denial().await;
        }
        let waiting = self
            .scenarios
            .iter()
            .filter(|s| s.deployed.is_none())
            .count();
        if waiting > 0 {
            self.deploy(waiting).await;
        }
        self.step("the faults stop; wait for every Scenario to be honest".into());
        let until = Instant::now() + SETTLE_WITHIN;
        loop {
            self.keep_two();
            // A deploy dead-lettered meanwhile changes what is honest.
            let mut problems = self.sort_dead_letters().await.0;
            if !problems.is_empty() {
                self.fail(&shown(&problems));
            }
            problems = self.dishonest().await;
            if problems.is_empty() {
                break;
            }
            if Instant::now() > until {
                self.fail(&format!(
                    "not honest {SETTLE_WITHIN:?} after the faults stopped:\n{}",
                    shown(&problems)
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.check().await;
        let (_, replays, late) = self.sort_dead_letters().await;
        (replays, late)
    }
}

/// The chaos run (see the module's words).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_pauses_denials_and_replays_never_break_max_workers_or_honest_phases() {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let seed = setting("CHAOS_SEED", clock % 1_000_000);
    let steps = setting("CHAOS_STEPS", 36) as usize;
    let count = setting("CHAOS_SCENARIOS", 50) as usize;
    println!("chaos seed {seed}: {steps} steps, {count} scenarios");
    let started = Instant::now();
    let mut chaos = Chaos::new(seed, count).await;
    for k in 0..steps {
        chaos.keep_two();
        let overdue = chaos
            .denied
            .is_some_and(|(_, since)| since.elapsed() > DENY_AT_MOST);
        if overdue {
            chaos.toggle_denial().await;
        } else {
            chaos.random_step(steps - k).await;
        }
        chaos.check().await;
    }
    let (replays, late) = chaos.settle().await;
    let now: BTreeSet<String> = chaos
        .bed
        .scenarios()
        .list(&Default::default())
        .await
        .expect("list the Scenarios")
        .items
        .into_iter()
        .map(|s| s.spec.scenario_uuid)
        .collect();
    let removed = chaos.existed().difference(&now).count();
    println!(
        "chaos seed {seed}: {} steps in {:?}; at most {} worker Pods held a slot at once; \
         {} replicas started, {} rewinds, {removed} Scenarios removed after FINISHED_TTL_SECS, \
         {replays} replayed deploys dead-lettered as stale, {late} first deploys read only after \
         FINISHED_TTL_SECS (dead-lettered as stale); replicas that exited on their own or \
         would not stop: {:#?}",
        chaos.done.len(),
        started.elapsed(),
        chaos.ledger.most_holding(),
        chaos.replicas_started,
        chaos.rewinds,
        chaos.exits
    );
}
