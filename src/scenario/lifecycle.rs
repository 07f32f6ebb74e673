//! What follows when a worker ends, whoever ran it: the scenario's next phase,
//! whether the worker is restarted, and the reason and message published with
//! the change.
//!
//! A worker of a finite source (a file or a clip) that exits 0 finished it:
//! Succeeded. One that exits non-zero or is killed, or a live camera's worker
//! that exits at all, is restarted with exponential backoff until the restart
//! budget is spent, then Failed (the same rule as the operator's,
//! [`super::restart::after_exit`]). A worker ended on purpose
//! (undeployed, replaced by a newer deploy, or the supervisor stopping) is
//! never counted as a failure.

use std::time::Duration;

use super::Phase;
use super::restart::{self, AfterExit};
use crate::backoff::Backoff;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl Exit {
    pub fn describe(self) -> String {
        match self {
            Exit::Code(code) => format!("worker exited with code {code}"),
            Exit::Signal(9) => "worker was killed by signal 9 (SIGKILL)".to_string(),
            Exit::Signal(15) => "worker was ended by signal 15 (SIGTERM)".to_string(),
            Exit::Signal(24) => {
                "worker was ended by signal 24 (SIGXCPU): it used up its CPU time (WORKER_CPU_SECONDS)"
                    .to_string()
            }
            Exit::Signal(sig) => format!("worker was ended by signal {sig}"),
        }
    }
}

/// Why the scenario's worker is no longer wanted, if it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// The worker should still be running: it ended by itself.
    Run,
    /// `to_undeploy` (or removal from the scenarios file) stopped the scenario.
    Stop,
    /// A newer deploy replaced the worker (another camera or `worker_id`), or
    /// asked for a fresh run.
    Supersede,
    /// The supervisor itself is stopping; the scenario resumes on its next start.
    Shutdown,
}

/// Restart settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed per run before the scenario is Failed.
    pub budget: u32,
    /// First restart delay; it doubles per restart up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

/// The scenario's next step after its worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Phase Succeeded; the slot frees.
    Succeeded,
    /// Restart number `restart` (1-based) after `delay`; the slot stays held.
    Restart { restart: u32, delay: Duration },
    /// Phase Failed: the budget is spent; the slot frees.
    Failed,
    /// Phase Stopped; the slot frees.
    Stopped,
    /// Back to the queue, keeping its place (a replaced or re-run worker).
    Requeue,
    /// Keep the recorded phase: the supervisor is stopping.
    Keep,
}

/// Decides what follows a worker's end. `finite` says whether the scenario's
/// source ends on its own ([`super::source::is_finite`]); `restarts` is the
/// number of restarts of the current run so far; `jitter` in 0.0..=1.0
/// spreads restart delays.
pub fn after_exit(
    intent: Intent,
    exit: Exit,
    finite: bool,
    restarts: u32,
    policy: &RestartPolicy,
    jitter: f64,
) -> Next {
    match intent {
        Intent::Stop => Next::Stopped,
        Intent::Supersede => Next::Requeue,
        Intent::Shutdown => Next::Keep,
        Intent::Run => {
            let how = if exit == Exit::Code(0) {
                restart::Exit::Success
            } else {
                restart::Exit::Failure
            };
            match restart::after_exit(finite, how, restarts, policy.budget) {
                AfterExit::Done => Next::Succeeded,
                AfterExit::Restart => Next::Restart {
                    restart: restarts + 1,
                    delay: Backoff::new(policy.base_delay, policy.max_delay)
                        .delay(restarts, jitter),
                },
                AfterExit::GiveUp => Next::Failed,
            }
        }
    }
}

/// The reason and message published with a change to `phase`.
pub fn phase_reason(phase: Phase) -> (&'static str, &'static str) {
    match phase {
        Phase::Queued => (
            "WaitingForSlot",
            "all MAX_WORKERS slots are taken; waiting in FIFO order",
        ),
        Phase::Starting => ("BackOff", "worker ended; restarting after a delay"),
        Phase::Running => ("WorkerStarted", "worker is running"),
        Phase::Succeeded => ("WorkerSucceeded", "worker finished"),
        Phase::Failed => ("WorkerFailed", "worker failed"),
        Phase::Stopped => ("Undeployed", "stopped by to_undeploy"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RestartPolicy = RestartPolicy {
        budget: 2,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(300),
    };

    #[test]
    fn after_exit_table() {
        let ms = Duration::from_millis;
        let cases = [
            ("clip ended", Intent::Run, Exit::Code(0), 0, Next::Succeeded),
            (
                "clip ended after restarts",
                Intent::Run,
                Exit::Code(0),
                2,
                Next::Succeeded,
            ),
            (
                "first failure",
                Intent::Run,
                Exit::Code(1),
                0,
                Next::Restart {
                    restart: 1,
                    delay: ms(100),
                },
            ),
            (
                "killed",
                Intent::Run,
                Exit::Signal(9),
                1,
                Next::Restart {
                    restart: 2,
                    delay: ms(200),
                },
            ),
            ("budget spent", Intent::Run, Exit::Code(1), 2, Next::Failed),
            (
                "killed, budget spent",
                Intent::Run,
                Exit::Signal(9),
                2,
                Next::Failed,
            ),
            (
                "undeployed, clean exit",
                Intent::Stop,
                Exit::Code(0),
                0,
                Next::Stopped,
            ),
            (
                "undeployed, SIGKILL after the grace",
                Intent::Stop,
                Exit::Signal(9),
                2,
                Next::Stopped,
            ),
            (
                "replaced",
                Intent::Supersede,
                Exit::Signal(15),
                0,
                Next::Requeue,
            ),
            (
                "supervisor stopping",
                Intent::Shutdown,
                Exit::Code(0),
                0,
                Next::Keep,
            ),
        ];
        for (name, intent, exit, restarts, want) in cases {
            assert_eq!(
                after_exit(intent, exit, true, restarts, &POLICY, 1.0),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn a_live_cameras_worker_that_exits_0_is_restarted() {
        assert_eq!(
            after_exit(Intent::Run, Exit::Code(0), false, 0, &POLICY, 1.0),
            Next::Restart {
                restart: 1,
                delay: Duration::from_millis(100),
            }
        );
        assert_eq!(
            after_exit(Intent::Run, Exit::Code(0), false, 2, &POLICY, 1.0),
            Next::Failed
        );
    }

    #[test]
    fn restart_delays_are_capped() {
        let policy = RestartPolicy {
            budget: 100,
            ..POLICY
        };
        let Next::Restart { delay, .. } =
            after_exit(Intent::Run, Exit::Code(1), true, 50, &policy, 1.0)
        else {
            panic!("a restart within the budget");
        };
        assert_eq!(delay, Duration::from_millis(300));
    }

    #[test]
    fn a_zero_budget_fails_at_once() {
        let policy = RestartPolicy {
            budget: 0,
            ..POLICY
        };
        assert_eq!(
            after_exit(Intent::Run, Exit::Code(3), true, 0, &policy, 0.5),
            Next::Failed
        );
    }

    #[test]
    fn each_phase_is_published_with_its_own_reason_and_words() {
        use Phase::*;
        let phases = [Queued, Starting, Running, Succeeded, Failed, Stopped];
        let reasons: Vec<_> = phases.iter().map(|p| phase_reason(*p)).collect();
        for (phase, (reason, message)) in phases.iter().zip(&reasons) {
            assert!(
                reason.starts_with(|c: char| c.is_ascii_uppercase())
                    && reason.chars().all(|c| c.is_ascii_alphanumeric()),
                "{phase:?}: {reason:?} is not a CamelCase reason"
            );
            assert!(!message.is_empty(), "{phase:?}");
        }
        for (i, a) in reasons.iter().enumerate() {
            for b in &reasons[i + 1..] {
                assert_ne!(a.0, b.0, "two phases share a reason");
            }
        }
    }

    #[test]
    fn exits_are_described_for_people() {
        assert_eq!(Exit::Code(2).describe(), "worker exited with code 2");
        assert!(Exit::Signal(9).describe().contains("SIGKILL"));
        assert!(Exit::Signal(15).describe().contains("SIGTERM"));
        assert!(Exit::Signal(24).describe().contains("WORKER_CPU_SECONDS"));
        let other = Exit::Signal(2).describe();
        assert!(
            other.contains("signal 2") && !other.contains("SIG"),
            "{other}"
        );
    }
}
