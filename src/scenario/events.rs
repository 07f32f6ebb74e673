//! The `scenario_events` message: one per phase change (key = scenario UUID),
//! with the same schema whether workers run as Pods or as local processes.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Phase;
use crate::messages::wire_timestamp;

/// One `scenario_events` message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseEvent<'a> {
    pub scenario_uuid: &'a str,
    pub phase: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
    pub timestamp: String,
}

impl<'a> PhaseEvent<'a> {
    pub fn new(
        scenario_uuid: &'a str,
        phase: Phase,
        reason: &'a str,
        message: &'a str,
        at: DateTime<Utc>,
    ) -> Self {
        PhaseEvent {
            scenario_uuid,
            phase: phase.as_str(),
            reason,
            message,
            timestamp: wire_timestamp(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn serializes_with_the_published_field_names() {
        let at = Utc.with_ymd_and_hms(2026, 1, 11, 12, 30, 5).unwrap();
        let event = PhaseEvent::new(
            "550e8400-e29b-41d4-a716-446655440000",
            Phase::Running,
            "WorkerStarted",
            "worker is running",
            at,
        );
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"scenario_uuid":"550e8400-e29b-41d4-a716-446655440000","phase":"Running","reason":"WorkerStarted","message":"worker is running","timestamp":"2026-01-11T12:30:05.000Z"}"#
        );
    }
}
