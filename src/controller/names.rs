//! The names, labels and annotations the runner gives the objects it
//! writes, and its field manager: one module below the others, so the
//! planner, the Pod and Secret builders and the reconciler agree on them
//! without importing each other.

/// The field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "vap-runner";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_RUNNER: &str = "runner.vap.io/runner";
pub const LABEL_SCENARIO: &str = "runner.vap.io/scenario";
pub const LABEL_WORKER_ID: &str = "runner.vap.io/worker-id";
/// The Scenario's run (`spec.run`) a worker Pod belongs to: a Pod of an older
/// run is replaced.
pub const LABEL_RUN: &str = "runner.vap.io/run";
/// Name of the worker container in its Pod.
pub const WORKER_CONTAINER: &str = "worker";
/// Annotation with the moment ingest wrote a Scenario (RFC 3339, nanoseconds):
/// the queue order, finer than the second-granular creationTimestamp.
pub const ANNOTATION_ENQUEUED_AT: &str = "runner.vap.io/enqueued-at";

/// Annotation with what the camera URL is, decided by ingest from the URL
/// itself (the spec shows it redacted): `clip` (a file or a clip, which ends
/// on its own) or `live`.
pub const ANNOTATION_SOURCE: &str = "runner.vap.io/source";

/// Annotation with a keyed digest of the camera URL (see
/// [`super::secret::DigestKey`]): a newer deploy names the same camera when
/// the digests match, whatever the redacted URLs show.
pub const ANNOTATION_CAMERA_DIGEST: &str = "runner.vap.io/camera-digest";

/// The deterministic name of a scenario's worker Pod.
pub fn pod_name(scenario_uuid: &str) -> String {
    format!("worker-{}", scenario_uuid.to_ascii_lowercase())
}

/// The deterministic name of the Scenario for a scenario UUID.
pub fn scenario_name(scenario_uuid: &str) -> String {
    format!("scn-{}", scenario_uuid.to_ascii_lowercase())
}

/// A label value made safe: at most 63 characters of `[A-Za-z0-9._-]`,
/// starting and ending alphanumeric.
pub fn label_value(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Labels every worker Pod of `runner` carries (the selector of its watches).
pub fn runner_selector(runner: &str) -> String {
    format!(
        "{LABEL_COMPONENT}=worker,{LABEL_RUNNER}={}",
        label_value(runner)
    )
}

/// The deterministic name of the camera Secret of a scenario's run. Each run
/// (a new camera URL, or a new deploy after a stop) gets a Secret of its own,
/// so the controller only ever creates Secrets, never changes one; the first
/// run's is `scn-<uuid>-camera`.
pub fn secret_name(scenario_uuid: &str, run: u32) -> String {
    let uuid = scenario_uuid.to_ascii_lowercase();
    if run <= 1 {
        format!("scn-{uuid}-camera")
    } else {
        format!("scn-{uuid}-camera-r{run}")
    }
}

/// The Secret in which runner `runner_name` keeps its camera digest key.
pub fn digest_key_secret_name(runner_name: &str) -> String {
    format!("{}-camera-digest-key", label_value(runner_name))
}
