//! What the controller chaos test (`controller_chaos`) needs beside the
//! `Bed`: a seeded random sequence that a seed repeats, and a watch of the
//! bed's worker Pods that checks MAX_WORKERS and one worker per scenario at
//! every change the apiserver reports, not only between the test's steps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::controller::{holds_slot, kwok_is_done};

/// A small seeded random sequence (splitmix64): the same seed, the same steps.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One of `items`, if any (a number is drawn either way, so that what
    /// comes next does not depend on it).
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        let drawn = self.next() as usize;
        (!items.is_empty()).then(|| items[drawn % items.len()].clone())
    }
}

/// One worker Pod as the watch saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The scenario whose worker it is (from its name, `worker-<uuid>`).
    pub scenario: String,
    /// The resourceVersion it was created at, when the watch reported its
    /// creation (not when a re-list of the watch first showed it). An
    /// apiserver on one etcd numbers every write of every resource in one
    /// sequence, so it orders the Pod's creation against Scenario writes.
    pub created_rv: Option<u64>,
    /// Its newest version; `None` once it is gone.
    pub now: Option<Pod>,
}

#[derive(Default)]
struct Ledger {
    /// Every worker Pod seen, by uid.
    pods: BTreeMap<String, Seen>,
    /// What the test is doing now, named in violations.
    doing: String,
    violations: Vec<String>,
    most_holding: usize,
}

/// A watch of a namespace's Pods that checks, at every change, that at most
/// `max_workers` Pods hold a worker slot and that no scenario has two; what
/// breaks either is kept as a violation naming what the test was doing.
pub struct PodLedger {
    ledger: Arc<Mutex<Ledger>>,
    task: tokio::task::JoinHandle<()>,
}

/// The scenario of a worker Pod named `worker-<uuid>`.
fn scenario_of(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    name.strip_prefix("worker-").unwrap_or(name).to_string()
}

/// A resourceVersion as a number (0 when it is not one).
pub fn rv(meta: &kube::api::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Ledger {
    fn apply(&mut self, pod: Pod, created: bool, max_workers: usize) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let entry = self.pods.entry(uid).or_insert_with(|| Seen {
            scenario: scenario_of(&pod),
            created_rv: created.then(|| rv(&pod.metadata)),
            now: None,
        });
        entry.now = Some(pod);
        self.check(max_workers);
    }

    fn delete(&mut self, uid: &str) {
        if let Some(seen) = self.pods.get_mut(uid) {
            seen.now = None;
        }
    }

    fn check(&mut self, max_workers: usize) {
        let holding: Vec<&Pod> = self
            .pods
            .values()
            .filter_map(|s| s.now.as_ref())
            .filter(|p| holds_slot(p))
            .collect();
        self.most_holding = self.most_holding.max(holding.len());
        let mut problems = Vec::new();
        if holding.len() > max_workers {
            let names: Vec<&str> = holding
                .iter()
                .filter_map(|p| p.metadata.name.as_deref())
                .collect();
            problems.push(format!(
                "{} worker Pods hold a slot with MAX_WORKERS={max_workers}: {names:?}",
                holding.len()
            ));
        }
        let mut per_scenario: BTreeMap<String, usize> = BTreeMap::new();
        for p in &holding {
            *per_scenario.entry(scenario_of(p)).or_default() += 1;
        }
        for (scenario, n) in per_scenario.into_iter().filter(|(_, n)| *n > 1) {
            problems.push(format!("scenario {scenario} has {n} live worker Pods"));
        }
        for problem in problems {
            let seen = format!("while {}: {problem}", self.doing);
            if !self.violations.contains(&seen) {
                self.violations.push(seen);
            }
        }
    }
}

impl PodLedger {
    /// Starts watching `pods`; returns once the watch has listed what exists.
    pub async fn start(pods: Api<Pod>, max_workers: usize) -> PodLedger {
        use futures::StreamExt;
        use kube::runtime::watcher::{self, Event, watcher};
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (listed, is_listed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let ledger = ledger.clone();
            async move {
                let mut listed = Some(listed);
                let mut relisted: BTreeMap<String, Pod> = BTreeMap::new();
                let mut events = watcher(pods, watcher::Config::default()).boxed();
                while let Some(event) = events.next().await {
                    let mut ledger = ledger.lock().unwrap();
                    match event {
                        Ok(Event::Apply(p)) => ledger.apply(p, true, max_workers),
                        Ok(Event::Delete(p)) => {
                            ledger.delete(p.metadata.uid.as_deref().unwrap_or_default())
                        }
                        Ok(Event::Init) => relisted.clear(),
                        Ok(Event::InitApply(p)) => {
                            relisted.insert(p.metadata.uid.clone().unwrap_or_default(), p);
                        }
                        Ok(Event::InitDone) => {
                            // A re-list (after the watch lapsed) shows what
                            // exists now: what it lacks is gone.
                            let gone: Vec<String> = ledger
                                .pods
                                .iter()
                                .filter(|(uid, s)| s.now.is_some() && !relisted.contains_key(*uid))
                                .map(|(uid, _)| uid.clone())
                                .collect();
                            for uid in gone {
                                ledger.delete(&uid);
                            }
                            for p in std::mem::take(&mut relisted).into_values() {
                                ledger.apply(p, false, max_workers);
                            }
                            if let Some(listed) = listed.take() {
                                let _ = listed.send(());
                            }
                        }
                        Err(_) => {
                            drop(ledger);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), is_listed)
            .await
            .expect("the Pod watch lists within 30 s")
            .expect("the Pod watch runs");
        PodLedger { ledger, task }
    }

    /// Names what the test does from now on (for violations).
    pub fn doing(&self, what: &str) {
        self.ledger.lock().unwrap().doing = what.to_string();
    }

    /// The violations seen so far.
    pub fn violations(&self) -> Vec<String> {
        self.ledger.lock().unwrap().violations.clone()
    }

    /// The most Pods that held a slot at once.
    pub fn most_holding(&self) -> usize {
        self.ledger.lock().unwrap().most_holding
    }

    /// Every worker Pod seen so far, by uid.
    pub fn pods(&self) -> BTreeMap<String, Seen> {
        self.ledger.lock().unwrap().pods.clone()
    }

    /// The Pods that exist now.
    pub fn existing(&self) -> Vec<Pod> {
        let ledger = self.ledger.lock().unwrap();
        ledger.pods.values().filter_map(|s| s.now.clone()).collect()
    }

    /// The scenarios whose worker Pod kwok runs now (not being deleted), by
    /// scenario, with the Pod's uid.
    pub fn running(&self) -> BTreeMap<String, String> {
        self.existing()
            .into_iter()
            .filter(kwok_is_done)
            .map(|p| (scenario_of(&p), p.metadata.uid.unwrap_or_default()))
            .collect()
    }

    /// The scenarios that have a Pod now (any state).
    pub fn with_pod(&self) -> BTreeSet<String> {
        self.existing().iter().map(scenario_of).collect()
    }
}

impl Drop for PodLedger {
    fn drop(&mut self) {
        self.task.abort();
    }
}
