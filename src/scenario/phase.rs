//! The phases of a scenario's life, shared by the operator and the local
//! supervisor.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a scenario is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Waiting for a free worker slot (MAX_WORKERS).
    Queued,
    /// Its Pod exists but is not running yet.
    Starting,
    /// Its worker is running.
    Running,
    /// Its worker finished (for example, the clip ended).
    Succeeded,
    /// Its worker failed for good.
    Failed,
    /// Stopped by `to_undeploy`.
    Stopped,
}

impl Phase {
    /// Phases that hold a worker slot.
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running)
    }

    /// Phases a scenario never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Stopped)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "Queued",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Stopped => "Stopped",
        }
    }
}
