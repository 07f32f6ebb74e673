//! Deploy and undeploy commands applied to the state store, from Kafka (the
//! shared [`crate::ingest`] loop calls [`LocalCommands`]) or from the
//! scenarios file. The order of commands for one scenario is decided by
//! [`crate::scenario::ordering`]; this module only carries the decision out
//! on a [`Record`].

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::state::{Occupancy, Origin, Record, StateError, StateStore, Target};
use crate::ingest::{CommandStore, Effect, StoreError};
use crate::messages::{DeployRequest, UndeployRequest};
use crate::scenario::Phase;
use crate::scenario::admission::has_room;
use crate::scenario::ordering::{
    self, Current, DeployDecision, Stamp, UndeployDecision, after_deploy, after_undeploy,
};

/// Carries out a deploy stamped `at` on a scenario's record.
pub fn apply_deploy(
    record: &mut Option<Record>,
    uuid: &str,
    target: Target,
    at: Stamp,
    now: DateTime<Utc>,
) -> DeployDecision {
    let current = record.as_ref().map(|r| Current {
        applied: r.applied,
        finished: r.finished(),
        same_target: r.same_target(&target),
    });
    let decision = ordering::on_deploy(current, at);
    match decision {
        DeployDecision::Create => *record = Some(Record::new(uuid, target, now)),
        DeployDecision::Rerun => {
            if let Some(r) = record.as_mut() {
                retarget(r, target);
                r.run += 1;
                r.phase = None;
                r.restarts = 0;
                r.enqueued_at = now;
                r.finished_at = None;
                r.restart_at = None;
                r.last_error = None;
            }
        }
        DeployDecision::Replace => {
            // A new run: the supervisor replaces the worker; restarts count anew.
            if let Some(r) = record.as_mut() {
                retarget(r, target);
                r.run += 1;
                r.restarts = 0;
            }
        }
        DeployDecision::Refresh | DeployDecision::Ignore(_) => {}
    }
    if let Some(r) = record.as_mut() {
        r.applied = after_deploy(r.applied, decision, at);
    }
    decision
}

fn retarget(r: &mut Record, target: Target) {
    r.worker_id = target.worker_id;
    r.camera_url = target.camera_url;
    r.fps = target.fps;
    r.model = target.model;
    r.origin = target.origin;
}

/// Carries out an undeploy stamped `at`. A scenario never seen gets a stopped
/// tombstone, so an older deploy read later cannot start it.
pub fn apply_undeploy(
    record: &mut Option<Record>,
    uuid: &str,
    at: Stamp,
    now: DateTime<Utc>,
) -> UndeployDecision {
    let decision = ordering::on_undeploy(record.as_ref().map(|r| r.applied), at);
    if decision == UndeployDecision::Tombstone {
        let mut tombstone = Record::new(
            uuid,
            Target {
                worker_id: None,
                camera_url: String::new(),
                fps: None,
                model: None,
                origin: Origin::Kafka,
            },
            now,
        );
        tombstone.phase = Some(crate::scenario::Phase::Stopped);
        tombstone.finished_at = Some(now);
        *record = Some(tombstone);
    }
    if let Some(r) = record.as_mut() {
        r.applied = after_undeploy(r.applied, decision, at);
    }
    decision
}

/// The supervisor's [`CommandStore`]: each command is one transaction in the
/// state store, then the supervisor is woken to act on it. A deploy that
/// would queue one more scenario than `max_queued` allows is refused.
pub struct LocalCommands {
    pub state: Arc<StateStore>,
    pub wake: Arc<Notify>,
    pub max_workers: usize,
    pub max_queued: usize,
}

/// Whether a deploy decided as `decision` on `record` makes one more
/// scenario wait for a worker.
fn queues(record: Option<&Record>, decision: DeployDecision) -> bool {
    match decision {
        DeployDecision::Create => true,
        DeployDecision::Rerun => record
            .is_none_or(|r| r.applied.stopped() || !matches!(r.phase, None | Some(Phase::Queued))),
        _ => false,
    }
}

fn transient(e: StateError) -> StoreError {
    StoreError::Transient(e.to_string())
}

impl LocalCommands {
    async fn write<T: Send + 'static>(
        &self,
        uuid: String,
        change: impl FnOnce(&mut Option<Record>, &dyn Fn() -> Result<Occupancy, StateError>) -> T
        + Send
        + 'static,
    ) -> Result<T, StoreError> {
        let state = self.state.clone();
        let out = tokio::task::spawn_blocking(move || state.update_seeing_others(&uuid, change))
            .await
            .map_err(|e| StoreError::Transient(e.to_string()))?
            .map_err(transient)?;
        self.wake.notify_one();
        Ok(out)
    }
}

impl CommandStore for LocalCommands {
    fn rejected_category(&self) -> &'static str {
        "rejected_by_state"
    }

    async fn deploy(
        &self,
        req: &DeployRequest,
        at: Stamp,
        read_at: DateTime<Utc>,
    ) -> Result<Effect, StoreError> {
        let uuid = req.scenario_uuid.to_string();
        let target = Target {
            worker_id: Some(req.worker_id.to_string()),
            camera_url: req.camera_url.clone(),
            fps: None,
            model: None,
            origin: Origin::Kafka,
        };
        let key = uuid.clone();
        let (max_workers, max_queued) = (self.max_workers, self.max_queued);
        let decision = self
            .write(key, move |r, others| {
                let current = r.as_ref().map(|r| Current {
                    applied: r.applied,
                    finished: r.finished(),
                    same_target: r.same_target(&target),
                });
                if queues(r.as_ref(), ordering::on_deploy(current, at)) {
                    let seen = others()?;
                    if !has_room(seen.waiting, seen.live, max_workers, max_queued) {
                        return Ok(Err(StoreError::QueueFull { max_queued }));
                    }
                }
                // Its place in the queue: when ingest read the command.
                Ok::<_, StateError>(Ok(apply_deploy(r, &uuid, target, at, read_at)))
            })
            .await?
            .map_err(transient)??;
        Ok(Effect::Deploy(decision))
    }

    async fn undeploy(&self, req: &UndeployRequest, at: Stamp) -> Result<Effect, StoreError> {
        let uuid = req.scenario_uuid.to_string();
        let key = uuid.clone();
        let decision = self
            .write(key, move |r, _| apply_undeploy(r, &uuid, at, Utc::now()))
            .await?;
        Ok(Effect::Undeploy(decision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ordering::Stale;

    fn s(timestamp_ms: i64) -> Stamp {
        Stamp {
            timestamp_ms,
            offset: 0,
        }
    }

    fn target(camera: &str) -> Target {
        Target {
            worker_id: Some("w".into()),
            camera_url: camera.into(),
            fps: None,
            model: None,
            origin: Origin::Kafka,
        }
    }

    #[test]
    fn duplicates_change_nothing_and_a_newer_camera_is_a_new_run() {
        let now = Utc::now();
        let mut r = None;
        assert_eq!(
            apply_deploy(&mut r, "u", target("/a"), s(1), now),
            DeployDecision::Create
        );
        let created = r.clone();
        assert_eq!(
            apply_deploy(&mut r, "u", target("/a"), s(1), now),
            DeployDecision::Ignore(Stale::Replay)
        );
        assert_eq!(r, created);
        assert_eq!(
            apply_deploy(&mut r, "u", target("/b"), s(2), now),
            DeployDecision::Replace
        );
        let r1 = r.clone().unwrap();
        assert_eq!((r1.run, r1.camera_url.as_str()), (2, "/b"));
    }

    #[test]
    fn undeploy_first_leaves_a_tombstone_an_older_deploy_cannot_revive() {
        let now = Utc::now();
        let mut r = None;
        assert_eq!(
            apply_undeploy(&mut r, "u", s(5), now),
            UndeployDecision::Tombstone
        );
        assert_eq!(r.as_ref().unwrap().phase, Some(Phase::Stopped));
        assert_eq!(
            apply_deploy(&mut r, "u", target("/a"), s(4), now),
            DeployDecision::Ignore(Stale::Overtaken)
        );
        assert_eq!(
            apply_deploy(&mut r, "u", target("/a"), s(6), now),
            DeployDecision::Rerun
        );
        let rec = r.unwrap();
        assert_eq!(
            (rec.phase, rec.run, rec.camera_url.as_str()),
            (None, 2, "/a")
        );
    }

    #[test]
    fn a_finished_run_is_run_again_by_a_newer_deploy() {
        let now = Utc::now();
        let mut r = None;
        apply_deploy(&mut r, "u", target("/a"), s(1), now);
        if let Some(rec) = r.as_mut() {
            rec.phase = Some(Phase::Failed);
            rec.restarts = 3;
        }
        assert_eq!(
            apply_deploy(&mut r, "u", target("/a"), s(2), now),
            DeployDecision::Rerun
        );
        let rec = r.unwrap();
        assert_eq!((rec.phase, rec.restarts, rec.run), (None, 0, 2));
    }

    fn deploy_of(n: u128) -> DeployRequest {
        DeployRequest {
            scenario_uuid: uuid::Uuid::from_u128(n),
            worker_id: uuid::Uuid::from_u128(0),
            camera_url: format!("rtsp://cam/{n}"),
            target: Default::default(),
        }
    }

    #[test]
    fn a_deploy_past_max_queued_is_refused_and_replays_and_stops_still_pass() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .unwrap();
        let commands = LocalCommands {
            state: Arc::new(StateStore::open(dir.path()).unwrap()),
            wake: Arc::new(Notify::new()),
            max_workers: 1,
            max_queued: 2,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // One takes the free slot, two queue, the fourth is refused.
            for n in 1..=3 {
                let effect = commands
                    .deploy(&deploy_of(n), s(n as i64), Utc::now())
                    .await
                    .unwrap();
                assert_eq!(effect, Effect::Deploy(DeployDecision::Create));
            }
            let refused = commands.deploy(&deploy_of(4), s(4), Utc::now()).await;
            assert!(
                matches!(refused, Err(StoreError::QueueFull { max_queued: 2 })),
                "{refused:?}"
            );
            assert_eq!(
                commands
                    .state
                    .get(&uuid::Uuid::from_u128(4).to_string())
                    .unwrap(),
                None
            );
            // A replay of a queued one changes nothing and is not refused.
            let replay = commands
                .deploy(&deploy_of(2), s(2), Utc::now())
                .await
                .unwrap();
            assert_eq!(
                replay,
                Effect::Deploy(DeployDecision::Ignore(Stale::Replay))
            );
            // A stop makes room.
            let stop = UndeployRequest {
                scenario_uuid: uuid::Uuid::from_u128(3),
            };
            commands.undeploy(&stop, s(10)).await.unwrap();
            let effect = commands
                .deploy(&deploy_of(4), s(11), Utc::now())
                .await
                .unwrap();
            assert_eq!(effect, Effect::Deploy(DeployDecision::Create));
            // ...and running it again queues it once more: refused now.
            let again = commands.deploy(&deploy_of(3), s(12), Utc::now()).await;
            assert!(
                matches!(again, Err(StoreError::QueueFull { .. })),
                "{again:?}"
            );
        });
    }

    #[test]
    fn which_deploys_queue_one_more() {
        let now = Utc::now();
        let record = |phase: Option<Phase>| {
            let mut r = Record::new("u", target("/a"), now);
            r.phase = phase;
            r
        };
        for (r, decision, queues_one) in [
            (None, DeployDecision::Create, true),
            (
                Some(record(Some(Phase::Succeeded))),
                DeployDecision::Rerun,
                true,
            ),
            (
                Some(record(Some(Phase::Stopped))),
                DeployDecision::Rerun,
                true,
            ),
            (
                Some(record(Some(Phase::Running))),
                DeployDecision::Replace,
                false,
            ),
            (Some(record(None)), DeployDecision::Refresh, false),
            (
                Some(record(None)),
                DeployDecision::Ignore(Stale::Replay),
                false,
            ),
        ] {
            assert_eq!(
                queues(r.as_ref(), decision),
                queues_one,
                "{r:?} {decision:?}"
            );
        }
    }
}
