//! What happens when a scenario's worker ends: done, restarted, or given up
//! after its restart budget. Shared by the operator and the local supervisor.

/// Restarts of one run's worker before the scenario is given up as Failed.
pub const DEFAULT_RESTART_LIMIT: u32 = 5;

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit code 0.
    Success,
    /// Any other exit code, or killed.
    Failure,
}

/// What to do about a worker that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// The run is over: its source ended (phase Succeeded).
    Done,
    /// Start the worker again.
    Restart,
    /// The worker keeps ending: the run failed (phase Failed), its slot frees.
    GiveUp,
}

/// Decides after a worker of a `finite` source ended with `exit`, having been
/// restarted `restarts` times already in this run, with at most `limit`
/// restarts allowed. A live source never ends, so its worker exiting 0 is a
/// restart like any other.
pub fn after_exit(finite: bool, exit: Exit, restarts: u32, limit: u32) -> AfterExit {
    if finite && exit == Exit::Success {
        AfterExit::Done
    } else if restarts >= limit {
        AfterExit::GiveUp
    } else {
        AfterExit::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        use AfterExit::*;
        use Exit::*;
        let cases = [
            ("clip ended", true, Success, 0, 5, Done),
            ("clip ended after restarts", true, Success, 5, 5, Done),
            ("clip worker failed", true, Failure, 1, 5, Restart),
            ("live camera exited 0", false, Success, 0, 5, Restart),
            ("live camera crashing", false, Failure, 4, 5, Restart),
            ("budget spent", false, Failure, 5, 5, GiveUp),
            ("live exit 0, budget spent", false, Success, 5, 5, GiveUp),
            ("no restarts allowed", false, Failure, 0, 0, GiveUp),
        ];
        for (name, finite, exit, restarts, limit, want) in cases {
            assert_eq!(after_exit(finite, exit, restarts, limit), want, "{name}");
        }
    }
}
