//! Names and stamps every test of a Scenario uses, written once: a fresh
//! scenario UUID, the names the runner gives its Scenario and worker Pod,
//! the broker-style clock and a Scenario's phase.

use vap_runner::controller::crd::{Phase, Scenario};

/// A scenario UUID no other test uses.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The Scenario the runner keeps for `uuid` (docs/architecture.md, "How the controller works").
pub fn scenario_name(uuid: &str) -> String {
    format!("scn-{uuid}")
}

/// The worker Pod the runner starts for `uuid`.
pub fn pod_name(uuid: &str) -> String {
    format!("worker-{uuid}")
}

/// Now, in ms since the epoch, as a Kafka record timestamp.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The phase a Scenario's status shows, if any.
pub fn phase(s: &Scenario) -> Option<Phase> {
    s.status.as_ref()?.phase
}
