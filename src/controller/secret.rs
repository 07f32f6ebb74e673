//! Camera URLs (and the credentials in them) live only in a Secret per
//! scenario, owned by its Scenario so that it goes when the Scenario goes.
//! The Scenario spec carries the redacted URL; the worker Pod reads the real
//! one through `secretKeyRef`. Naming and building are pure; [`store`] is the
//! one write.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, Secret, SecretKeySelector};
use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};

use super::crd::Scenario;
use super::pod::{LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_NAME, LABEL_RUNNER, LABEL_SCENARIO};
use super::reconcile::FIELD_MANAGER;

/// The key of the camera URL in the Secret (the worker's variable name).
pub const CAMERA_URL_KEY: &str = "CAMERA_URL";

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

/// A digest that tells two camera URLs of one scenario apart without showing
/// either: hex SHA-256 of the scenario UUID and the URL without its user and
/// password (so a password-only change is the same camera, and no password
/// goes into the digest). Query values stay in it, so `?channel=1` and
/// `?channel=2` differ.
pub fn camera_digest(scenario_uuid: &str, camera_url: &str) -> String {
    let without_userinfo = match url::Url::parse(camera_url) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        // Not a URL FFmpeg would read as one; the redacted form is all that
        // may be kept of it.
        Err(_) => shown_url(camera_url),
    };
    let input = format!("{}\n{without_userinfo}", scenario_uuid.to_ascii_lowercase());
    ring::digest::digest(&ring::digest::SHA256, input.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The camera URL as the Scenario spec shows it.
pub fn shown_url(camera_url: &str) -> String {
    crate::camera_url::redact(camera_url)
}

/// The Secret holding `camera_url` for `scenario`, owned by it. The labels
/// are the Scenario's own (runner, scenario), so a runner's Secrets can be
/// listed by the same selector as its Scenarios.
pub fn build(scenario: &Scenario, camera_url: &str) -> Secret {
    let mut labels = scenario.labels().clone();
    labels.insert(LABEL_NAME.into(), "vap-runner".into());
    labels.insert(LABEL_COMPONENT.into(), "camera".into());
    labels.insert(LABEL_MANAGED_BY.into(), "vap-runner".into());
    labels.retain(|k, _| {
        [
            LABEL_NAME,
            LABEL_COMPONENT,
            LABEL_MANAGED_BY,
            LABEL_RUNNER,
            LABEL_SCENARIO,
        ]
        .contains(&k.as_str())
    });
    let mut secret = Secret {
        type_: Some("Opaque".into()),
        string_data: Some([(CAMERA_URL_KEY.to_string(), camera_url.to_string())].into()),
        ..Default::default()
    };
    secret.metadata.name = Some(secret_name(&scenario.spec.scenario_uuid, scenario.spec.run));
    secret.metadata.namespace = scenario.namespace();
    secret.metadata.labels = Some(labels);
    secret.metadata.owner_references = scenario.controller_owner_ref(&()).map(|o| vec![o]);
    secret
}

/// The worker's `CAMERA_URL`, read from the Secret of the scenario's run.
pub fn camera_url_env(scenario_uuid: &str, run: u32) -> EnvVar {
    EnvVar {
        name: CAMERA_URL_KEY.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name(scenario_uuid, run),
                key: CAMERA_URL_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

/// Writes the camera Secret of `scenario` (which must carry its UID) unless
/// it exists: a replayed deploy never overwrites it, and the controller
/// never needs to read Secrets (its Role grants `create` only).
pub async fn store(
    secrets: &Api<Secret>,
    scenario: &Scenario,
    camera_url: &str,
) -> Result<(), kube::Error> {
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match secrets.create(&params, &build(scenario, camera_url)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::crd::ScenarioSpec;

    fn scenario() -> Scenario {
        let mut s = Scenario::new(
            "scn-550e8400-e29b-41d4-a716-446655440000",
            ScenarioSpec {
                scenario_uuid: "550E8400-e29b-41d4-a716-446655440000".into(),
                worker_id: "11223344-5566-7788-99aa-bbccddeeeff0".into(),
                camera_url: shown_url("rtsp://admin:hunter2@cam/stream"),
                fps: None,
                model: None,
                stopped: false,
                applied: Default::default(),
                run: 1,
            },
        );
        s.metadata.namespace = Some("vap".into());
        s.metadata.uid = Some("uid-1".into());
        s.metadata.labels = Some(
            [
                (LABEL_RUNNER.to_string(), "vap-runner".to_string()),
                ("unrelated".to_string(), "x".to_string()),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn the_secret_is_named_owned_and_holds_the_url() {
        let secret = build(&scenario(), "rtsp://admin:hunter2@cam/stream");
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("scn-550e8400-e29b-41d4-a716-446655440000-camera")
        );
        assert_eq!(secret.metadata.namespace.as_deref(), Some("vap"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Scenario", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            secret.string_data.as_ref().unwrap()[CAMERA_URL_KEY],
            "rtsp://admin:hunter2@cam/stream"
        );
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_RUNNER], "vap-runner");
        assert!(!labels.contains_key("unrelated"));
    }

    #[test]
    fn the_digest_tells_cameras_apart_but_not_passwords() {
        let id = "550e8400-e29b-41d4-a716-446655440000";
        let a = "rtsp://nvr/user=admin&password=x&channel=1&stream=0.sdp";
        let b = "rtsp://nvr/user=admin&password=x&channel=2&stream=0.sdp";
        assert_eq!(shown_url(a), shown_url(b), "redaction hides the difference");
        assert_ne!(camera_digest(id, a), camera_digest(id, b));
        assert_eq!(
            camera_digest(id, "rtsp://admin:old@cam/s"),
            camera_digest(id, "rtsp://admin:new@cam/s")
        );
        assert_ne!(
            camera_digest(id, "rtsp://cam/s"),
            camera_digest("11223344-5566-7788-99aa-bbccddeeeff0", "rtsp://cam/s")
        );
        let d = camera_digest(id, "rtsp://admin:hunter2@cam/s");
        assert_eq!(d.len(), 64);
        assert!(!d.contains("hunter2"));
    }

    #[test]
    fn every_run_has_a_secret_of_its_own() {
        let mut s = scenario();
        s.spec.run = 3;
        assert_eq!(
            build(&s, "rtsp://cam/b").metadata.name.as_deref(),
            Some("scn-550e8400-e29b-41d4-a716-446655440000-camera-r3")
        );
        let env = serde_json::to_string(&camera_url_env(&s.spec.scenario_uuid, 3)).unwrap();
        assert!(env.contains("-camera-r3"), "{env}");
    }

    #[test]
    fn the_spec_and_the_env_never_hold_the_password() {
        let s = scenario();
        assert_eq!(s.spec.camera_url, "rtsp://***@cam/stream");
        let env = serde_json::to_string(&camera_url_env(&s.spec.scenario_uuid, 1)).unwrap();
        assert!(!env.contains("hunter2"), "{env}");
        assert!(
            env.contains(r#""secretKeyRef":{"key":"CAMERA_URL","name":"scn-550e8400-e29b-41d4-a716-446655440000-camera","optional":false}"#),
            "{env}"
        );
    }
}
