//! Command ordering for one scenario: last writer wins, by Kafka record time.
//!
//! `to_deploy` and `to_undeploy` are two topics, and Kafka gives no order across
//! topics: after a backlog an undeploy can be read before the deploy it undoes.
//! So each command carries its record's [`Stamp`], the scenario remembers the
//! stamps it has applied ([`Applied`]), and a command changes the scenario only
//! when it is newer than what was applied:
//!
//! - two commands of the same topic are ordered by timestamp, then offset;
//! - a deploy and an undeploy are ordered by timestamp, and an exact tie goes to
//!   the undeploy;
//! - an undeploy read before any deploy leaves a stopped tombstone, so an older
//!   deploy read later cannot start the scenario;
//! - a deploy newer than the last undeploy, or than a finished run, runs the
//!   scenario again (a fresh run, a new worker);
//! - a newer deploy with another camera URL or `worker_id` replaces the worker.
//!
//! A producer sets its records' timestamps (unless the topic uses the broker's
//! `LogAppendTime`), so a stamp far in the future would win over every later
//! command until that time: [`too_far_ahead`] refuses such a stamp.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a command sits in time: its Kafka record's timestamp (milliseconds
/// since the epoch), then its offset, which orders two records of one topic
/// that share a timestamp.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Stamp {
    pub timestamp_ms: i64,
    pub offset: i64,
}

/// The newest deploy and undeploy applied to a scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Stamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undeploy: Option<Stamp>,
}

impl Applied {
    /// Nothing applied yet (a Scenario written by hand).
    pub fn is_empty(&self) -> bool {
        self.deploy.is_none() && self.undeploy.is_none()
    }

    /// The scenario is stopped when its last undeploy is not older than its last
    /// deploy (an exact tie goes to the undeploy).
    pub fn stopped(&self) -> bool {
        match (self.deploy, self.undeploy) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(d), Some(u)) => u.timestamp_ms >= d.timestamp_ms,
        }
    }
}

/// Why a command changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Not newer than the last command of its own topic (a replay or duplicate).
    Replay,
    /// Older than the last command of the other topic (overtaken).
    Overtaken,
}

impl Stale {
    pub fn as_str(self) -> &'static str {
        match self {
            Stale::Replay => "replay",
            Stale::Overtaken => "overtaken",
        }
    }
}

/// What a `to_deploy` does to the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployDecision {
    /// No scenario yet: create it and run it.
    Create,
    /// The scenario is stopped or its run has finished: a fresh run, a new worker.
    Rerun,
    /// The scenario runs with another camera URL or `worker_id`: replace its worker.
    Replace,
    /// The scenario runs with the same target: record the newer stamp, keep the worker.
    Refresh,
    /// Change nothing.
    Ignore(Stale),
}

/// What a `to_undeploy` does to the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndeployDecision {
    /// No scenario yet: write a stopped tombstone that an older deploy cannot revive.
    Tombstone,
    /// Stop the worker; the scenario becomes Stopped.
    Stop,
    /// Change nothing.
    Ignore(Stale),
}

/// The scenario as a deploy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    pub applied: Applied,
    /// Its run has ended (Succeeded or Failed) and holds no worker.
    pub finished: bool,
    /// The deploy names the same camera URL and `worker_id` as the scenario.
    pub same_target: bool,
}

/// Decides a `to_deploy` stamped `at` for a scenario (`None`: none exists).
pub fn on_deploy(current: Option<Current>, at: Stamp) -> DeployDecision {
    let Some(c) = current else {
        return DeployDecision::Create;
    };
    if c.applied
        .undeploy
        .is_some_and(|u| at.timestamp_ms <= u.timestamp_ms)
    {
        return DeployDecision::Ignore(Stale::Overtaken);
    }
    if c.applied.deploy.is_some_and(|d| at <= d) {
        return DeployDecision::Ignore(Stale::Replay);
    }
    if c.applied.stopped() || c.finished {
        DeployDecision::Rerun
    } else if c.same_target {
        DeployDecision::Refresh
    } else {
        DeployDecision::Replace
    }
}

/// Decides a `to_undeploy` stamped `at` for a scenario's applied stamps
/// (`None`: no scenario exists).
pub fn on_undeploy(applied: Option<Applied>, at: Stamp) -> UndeployDecision {
    let Some(a) = applied else {
        return UndeployDecision::Tombstone;
    };
    if a.undeploy.is_some_and(|u| at <= u) {
        return UndeployDecision::Ignore(Stale::Replay);
    }
    if a.deploy.is_some_and(|d| at.timestamp_ms < d.timestamp_ms) {
        return UndeployDecision::Ignore(Stale::Overtaken);
    }
    UndeployDecision::Stop
}

/// `applied` after carrying out a deploy decision stamped `at`.
pub fn after_deploy(applied: Applied, decision: DeployDecision, at: Stamp) -> Applied {
    match decision {
        DeployDecision::Ignore(_) => applied,
        _ => Applied {
            deploy: Some(at),
            ..applied
        },
    }
}

/// `applied` after carrying out an undeploy decision stamped `at`.
pub fn after_undeploy(applied: Applied, decision: UndeployDecision, at: Stamp) -> Applied {
    match decision {
        UndeployDecision::Ignore(_) => applied,
        _ => Applied {
            undeploy: Some(at),
            ..applied
        },
    }
}

/// How far `stamp_ms` lies after `now_ms` (the runner's clock, standing in
/// for the broker's), when that is more than `max_ahead_ms`; `None` for a
/// stamp that may be taken. A stamp set by the broker (`LogAppendTime`) is
/// the broker's clock and is not judged here.
pub fn too_far_ahead(stamp_ms: i64, now_ms: i64, max_ahead_ms: i64) -> Option<i64> {
    let ahead = stamp_ms.saturating_sub(now_ms);
    (ahead > max_ahead_ms).then_some(ahead)
}

/// Whether a command stamped `at` is older than `horizon`, the time the
/// runner keeps a finished scenario and its applied stamps (FINISHED_TTL_SECS).
/// Past it, a scenario that is not known may have run and been removed: a
/// deploy for it cannot be told from a replay, so it is not taken.
pub fn beyond_horizon(at: Stamp, now_ms: i64, horizon: std::time::Duration) -> bool {
    let horizon_ms = i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(at.timestamp_ms) > horizon_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeployDecision as D;
    use UndeployDecision as U;

    fn s(timestamp_ms: i64, offset: i64) -> Stamp {
        Stamp {
            timestamp_ms,
            offset,
        }
    }

    fn applied(deploy: Option<Stamp>, undeploy: Option<Stamp>) -> Applied {
        Applied { deploy, undeploy }
    }

    fn cur(a: Applied, finished: bool, same_target: bool) -> Option<Current> {
        Some(Current {
            applied: a,
            finished,
            same_target,
        })
    }

    #[test]
    fn deploy_table() {
        let running = applied(Some(s(100, 5)), None);
        let stopped = applied(Some(s(100, 5)), Some(s(200, 1)));
        let tombstone = applied(None, Some(s(200, 1)));
        let cases = [
            ("first deploy creates", None, s(100, 0), D::Create),
            (
                "exact replay",
                cur(running, false, true),
                s(100, 5),
                D::Ignore(Stale::Replay),
            ),
            (
                "older replay",
                cur(running, false, true),
                s(90, 9),
                D::Ignore(Stale::Replay),
            ),
            (
                "same ms, earlier offset",
                cur(running, false, false),
                s(100, 4),
                D::Ignore(Stale::Replay),
            ),
            (
                "same ms, later offset is newer",
                cur(running, false, false),
                s(100, 6),
                D::Replace,
            ),
            (
                "newer, same target",
                cur(running, false, true),
                s(150, 0),
                D::Refresh,
            ),
            (
                "newer, other camera",
                cur(running, false, false),
                s(150, 0),
                D::Replace,
            ),
            (
                "newer after a finished run",
                cur(running, true, true),
                s(150, 0),
                D::Rerun,
            ),
            (
                "replay after a finished run",
                cur(running, true, true),
                s(100, 5),
                D::Ignore(Stale::Replay),
            ),
            (
                "older than the stop",
                cur(stopped, false, true),
                s(150, 0),
                D::Ignore(Stale::Overtaken),
            ),
            (
                "tie with the stop: undeploy wins",
                cur(stopped, false, true),
                s(200, 9),
                D::Ignore(Stale::Overtaken),
            ),
            (
                "newer than the stop runs again",
                cur(stopped, false, true),
                s(201, 0),
                D::Rerun,
            ),
            (
                "older than a tombstone",
                cur(tombstone, false, false),
                s(150, 0),
                D::Ignore(Stale::Overtaken),
            ),
            (
                "newer than a tombstone runs",
                cur(tombstone, false, false),
                s(250, 0),
                D::Rerun,
            ),
        ];
        for (name, current, at, want) in cases {
            assert_eq!(on_deploy(current, at), want, "{name}");
        }
    }

    #[test]
    fn undeploy_table() {
        let running = applied(Some(s(100, 5)), None);
        let stopped = applied(Some(s(100, 5)), Some(s(200, 1)));
        let cases = [
            (
                "before any deploy: tombstone",
                None,
                s(100, 0),
                U::Tombstone,
            ),
            (
                "newer than the deploy stops",
                Some(running),
                s(150, 0),
                U::Stop,
            ),
            (
                "tie with the deploy: undeploy wins",
                Some(running),
                s(100, 0),
                U::Stop,
            ),
            (
                "older than the deploy",
                Some(running),
                s(99, 9),
                U::Ignore(Stale::Overtaken),
            ),
            (
                "replayed undeploy",
                Some(stopped),
                s(200, 1),
                U::Ignore(Stale::Replay),
            ),
            (
                "older undeploy",
                Some(stopped),
                s(150, 3),
                U::Ignore(Stale::Replay),
            ),
            (
                "newer undeploy of a stopped scenario",
                Some(stopped),
                s(300, 0),
                U::Stop,
            ),
        ];
        for (name, a, at, want) in cases {
            assert_eq!(on_undeploy(a, at), want, "{name}");
        }
    }

    #[test]
    fn stopped_is_decided_by_time_with_ties_to_the_undeploy() {
        assert!(!applied(None, None).stopped());
        assert!(!applied(Some(s(1, 0)), None).stopped());
        assert!(applied(None, Some(s(1, 0))).stopped());
        assert!(applied(Some(s(1, 9)), Some(s(1, 0))).stopped());
        assert!(!applied(Some(s(2, 0)), Some(s(1, 9))).stopped());
    }

    #[test]
    fn an_ignored_command_leaves_the_stamps_as_they_were() {
        let a = applied(Some(s(100, 5)), Some(s(200, 1)));
        for stale in [Stale::Replay, Stale::Overtaken] {
            assert_eq!(after_deploy(a, D::Ignore(stale), s(50, 0)), a);
            assert_eq!(after_undeploy(a, U::Ignore(stale), s(50, 0)), a);
        }
        // Carried out, a command records its stamp and keeps the other one.
        let deployed = after_deploy(a, D::Rerun, s(300, 0));
        assert_eq!(deployed, applied(Some(s(300, 0)), Some(s(200, 1))));
        let undeployed = after_undeploy(a, U::Stop, s(300, 0));
        assert_eq!(undeployed, applied(Some(s(100, 5)), Some(s(300, 0))));
    }

    #[test]
    fn applied_is_empty_only_before_any_command() {
        assert!(Applied::default().is_empty());
        assert!(!applied(Some(s(1, 0)), None).is_empty());
        assert!(!applied(None, Some(s(1, 0))).is_empty());
    }

    #[test]
    fn each_staleness_has_its_own_label() {
        let (replay, overtaken) = (Stale::Replay.as_str(), Stale::Overtaken.as_str());
        assert_ne!(replay, overtaken);
        for label in [replay, overtaken] {
            assert!(
                !label.is_empty() && label.chars().all(|c| c.is_ascii_lowercase()),
                "{label:?}"
            );
        }
    }

    /// Whatever order two commands are read in, the scenario ends the same way.
    #[test]
    fn the_outcome_does_not_depend_on_the_reading_order() {
        let deploy = s(100, 0);
        for undeploy in [s(50, 0), s(100, 0), s(150, 0)] {
            // Deploy read first.
            let a = after_deploy(Applied::default(), on_deploy(None, deploy), deploy);
            let a1 = after_undeploy(a, on_undeploy(Some(a), undeploy), undeploy);
            // Undeploy read first.
            let b = after_undeploy(Applied::default(), on_undeploy(None, undeploy), undeploy);
            let d = on_deploy(cur(b, false, false), deploy);
            let b1 = after_deploy(b, d, deploy);
            let want_stopped = undeploy.timestamp_ms >= deploy.timestamp_ms;
            assert_eq!(
                a1.stopped(),
                want_stopped,
                "deploy first, undeploy at {undeploy:?}"
            );
            assert_eq!(
                b1.stopped(),
                want_stopped,
                "undeploy first, undeploy at {undeploy:?}"
            );
        }
    }

    #[test]
    fn a_stamp_further_ahead_than_the_allowed_skew_is_refused() {
        let now = 1_700_000_000_000;
        assert_eq!(too_far_ahead(now, now, 300_000), None);
        assert_eq!(
            too_far_ahead(now - 86_400_000, now, 300_000),
            None,
            "the past is fine"
        );
        assert_eq!(
            too_far_ahead(now + 300_000, now, 300_000),
            None,
            "at the limit"
        );
        assert_eq!(too_far_ahead(now + 300_001, now, 300_000), Some(300_001));
        assert_eq!(
            too_far_ahead(4_102_444_800_000, now, 300_000),
            Some(4_102_444_800_000 - now),
            "a stamp in 2100"
        );
        assert_eq!(too_far_ahead(i64::MAX, i64::MIN, 0), Some(i64::MAX));
    }

    #[test]
    fn a_command_older_than_the_finished_ttl_is_beyond_the_horizon() {
        let now = 1_700_000_000_000;
        let hour = std::time::Duration::from_secs(3600);
        assert!(!beyond_horizon(s(now, 0), now, hour), "just sent");
        assert!(
            !beyond_horizon(s(now - 3_600_000, 0), now, hour),
            "at the horizon"
        );
        assert!(beyond_horizon(s(now - 3_600_001, 0), now, hour));
        assert!(
            !beyond_horizon(s(now + 60_000, 0), now, hour),
            "ahead is not old"
        );
        assert!(beyond_horizon(s(i64::MIN, 0), now, hour));
        assert!(
            !beyond_horizon(s(0, 0), now, std::time::Duration::MAX),
            "no TTL"
        );
    }
}
