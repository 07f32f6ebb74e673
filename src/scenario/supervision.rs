//! What a supervisor does next for one scenario, from what it knows of it:
//! stop or replace its worker, record it as stopped, let it wait for a slot,
//! or hold its slot while a restart is pending. Slots themselves are given
//! out by [`super::admission`].

use super::Phase;
use super::lifecycle::Intent;

/// What a supervisor knows of one scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The last command stopped it (`Applied::stopped`).
    pub stopped: bool,
    /// Its recorded phase; `None` while admission has not looked at it yet.
    pub phase: Option<Phase>,
    /// Its worker process, if one runs: `Some(true)` when that worker runs the
    /// scenario's current run, `Some(false)` when a newer deploy superseded it.
    pub worker: Option<bool>,
    /// Its restart backoff is over.
    pub restart_due: bool,
}

/// The next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ask the worker to stop (SIGTERM, SIGKILL after the grace period); it
    /// holds its slot until its process has exited.
    StopWorker(Intent),
    /// The worker runs as it should: it holds its slot.
    KeepWorker,
    /// No worker and stopped: record the phase Stopped.
    MarkStopped,
    /// No worker and wants one: wait for admission.
    Wait,
    /// A restart is pending: the slot stays held; start it when due.
    HoldSlot { restart_now: bool },
    /// Ended (Succeeded, Failed, Stopped): nothing to do.
    Nothing,
}

pub fn step(v: View) -> Step {
    match (v.worker, v.stopped) {
        (Some(_), true) => Step::StopWorker(Intent::Stop),
        (Some(false), false) => Step::StopWorker(Intent::Supersede),
        (Some(true), false) => Step::KeepWorker,
        (None, true) if v.phase == Some(Phase::Stopped) => Step::Nothing,
        (None, true) => Step::MarkStopped,
        (None, false) => match v.phase {
            // Running without a worker: its supervisor ended before the
            // worker did; it waits for a slot again.
            None | Some(Phase::Queued) | Some(Phase::Running) => Step::Wait,
            Some(Phase::Starting) => Step::HoldSlot {
                restart_now: v.restart_due,
            },
            Some(Phase::Succeeded | Phase::Failed | Phase::Stopped) => Step::Nothing,
        },
    }
}

impl Step {
    /// The scenario holds a worker slot (a live or stopping worker, or a
    /// pending restart).
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Step::StopWorker(_) | Step::KeepWorker | Step::HoldSlot { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(stopped: bool, phase: Option<Phase>, worker: Option<bool>, restart_due: bool) -> View {
        View {
            stopped,
            phase,
            worker,
            restart_due,
        }
    }

    #[test]
    fn step_table() {
        use Phase::*;
        let cases = [
            (
                "running worker",
                v(false, Some(Running), Some(true), false),
                Step::KeepWorker,
            ),
            (
                "undeployed while running",
                v(true, Some(Running), Some(true), false),
                Step::StopWorker(Intent::Stop),
            ),
            (
                "replaced while running",
                v(false, Some(Running), Some(false), false),
                Step::StopWorker(Intent::Supersede),
            ),
            (
                "replaced, then undeployed",
                v(true, Some(Running), Some(false), false),
                Step::StopWorker(Intent::Stop),
            ),
            (
                "undeployed while queued",
                v(true, Some(Queued), None, false),
                Step::MarkStopped,
            ),
            (
                "undeployed in backoff",
                v(true, Some(Starting), None, false),
                Step::MarkStopped,
            ),
            (
                "tombstone",
                v(true, Some(Stopped), None, false),
                Step::Nothing,
            ),
            ("new", v(false, None, None, false), Step::Wait),
            ("queued", v(false, Some(Queued), None, false), Step::Wait),
            (
                "its supervisor ended",
                v(false, Some(Running), None, false),
                Step::Wait,
            ),
            (
                "backoff pending",
                v(false, Some(Starting), None, false),
                Step::HoldSlot { restart_now: false },
            ),
            (
                "backoff over",
                v(false, Some(Starting), None, true),
                Step::HoldSlot { restart_now: true },
            ),
            (
                "succeeded",
                v(false, Some(Succeeded), None, false),
                Step::Nothing,
            ),
            ("failed", v(false, Some(Failed), None, false), Step::Nothing),
        ];
        for (name, view, want) in cases {
            assert_eq!(step(view), want, "{name}");
        }
    }

    #[test]
    fn only_workers_and_pending_restarts_hold_slots() {
        assert!(Step::KeepWorker.holds_slot());
        assert!(Step::StopWorker(Intent::Stop).holds_slot());
        assert!(Step::HoldSlot { restart_now: false }.holds_slot());
        assert!(!Step::Wait.holds_slot());
        assert!(!Step::MarkStopped.holds_slot());
        assert!(!Step::Nothing.holds_slot());
    }
}
