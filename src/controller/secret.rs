//! Camera URLs (and the credentials in them) live only in a Secret per
//! scenario, owned by its Scenario so that it goes when the Scenario goes.
//! The Scenario spec carries the redacted URL; the worker Pod reads the real
//! one through `secretKeyRef`. Naming and building are pure; [`store`] is the
//! one write.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, Secret, SecretKeySelector};
use kube::api::PostParams;
use kube::{Api, ResourceExt};

use super::crd::Scenario;
use super::names::{
    FIELD_MANAGER, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_NAME, LABEL_RUNNER, LABEL_SCENARIO,
    digest_key_secret_name, label_value, secret_name,
};

/// The key of the camera URL in the Secret (the worker's variable name).
pub const CAMERA_URL_KEY: &str = "CAMERA_URL";

/// How a keyed camera digest begins; a digest without it is a
/// [`legacy_camera_digest`].
pub const DIGEST_PREFIX: &str = "hmac-sha256:";

/// The runner's key for camera digests: kept in a Secret of its own
/// ([`digest_key_secret_name`]), created once, so that equal cameras always
/// have equal digests while nobody who reads Scenarios can test guesses of a
/// camera's secrets against a digest offline.
#[derive(Clone)]
pub struct DigestKey(ring::hmac::Key);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(***)")
    }
}

/// Bytes of a new digest key.
const DIGEST_KEY_LEN: usize = 32;

/// The key's entry in its Secret.
pub const DIGEST_KEY_ENTRY: &str = "key";

impl DigestKey {
    pub fn new(bytes: &[u8]) -> DigestKey {
        DigestKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes))
    }

    /// Tells two camera URLs of one scenario apart without showing either:
    /// an HMAC-SHA256, under this key, of the scenario UUID and the whole
    /// URL (credentials, query and fragment included), hex after
    /// [`DIGEST_PREFIX`].
    pub fn digest(&self, scenario_uuid: &str, camera_url: &str) -> String {
        let input = format!("{}\n{camera_url}", scenario_uuid.to_ascii_lowercase());
        let tag = ring::hmac::sign(&self.0, input.as_bytes());
        format!("{DIGEST_PREFIX}{}", hex(tag.as_ref()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest Scenarios written before the keyed one carry: hex SHA-256 of
/// the scenario UUID and the URL without its user and password. It is only
/// ever compared with (an existing Scenario's camera against a new deploy),
/// never written again.
pub fn legacy_camera_digest(scenario_uuid: &str, camera_url: &str) -> String {
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
    hex(ring::digest::digest(&ring::digest::SHA256, input.as_bytes()).as_ref())
}

/// Whether a Scenario whose camera is recorded as `recorded` (its digest
/// annotation) and shown as `shown` (its spec) has the camera `camera_url`,
/// whose keyed digest is `digest`. A keyed digest is compared as it is; a
/// legacy one with the legacy digest of `camera_url`; a Scenario without a
/// digest by its shown URL.
pub fn same_camera(
    recorded: Option<&str>,
    shown: &str,
    scenario_uuid: &str,
    camera_url: &str,
    digest: &str,
) -> bool {
    match recorded {
        Some(keyed) if keyed.starts_with(DIGEST_PREFIX) => keyed == digest,
        Some(legacy) => legacy == legacy_camera_digest(scenario_uuid, camera_url),
        None => shown == shown_url(camera_url),
    }
}

/// Why the digest key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DigestKeyError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("its entry `{DIGEST_KEY_ENTRY}` is missing or shorter than {DIGEST_KEY_LEN} bytes")]
    Malformed,
    #[error("no random bytes for a new key")]
    Random,
}

/// Reads runner `runner_name`'s digest key from its Secret, creating the
/// Secret (stamped by `leadership`) with a new random key when there is none
/// (the first start; a replica that loses the race to create it reads the
/// winner's). A creation the fencing policy refuses is tried again while
/// leadership holds: right after a take-over the policy may not have seen
/// it yet.
pub async fn digest_key(
    secrets: &Api<Secret>,
    runner_name: &str,
    leadership: &super::leader::Leadership,
) -> Result<DigestKey, DigestKeyError> {
    let name = digest_key_secret_name(runner_name);
    loop {
        if let Some(secret) = secrets.get_opt(&name).await? {
            return match secret.data.as_ref().and_then(|d| d.get(DIGEST_KEY_ENTRY)) {
                Some(key) if key.0.len() >= DIGEST_KEY_LEN => Ok(DigestKey::new(&key.0)),
                _ => Err(DigestKeyError::Malformed),
            };
        }
        let mut bytes = [0u8; DIGEST_KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| DigestKeyError::Random)?;
        let mut secret = Secret {
            type_: Some("Opaque".into()),
            data: Some(
                [(
                    DIGEST_KEY_ENTRY.to_string(),
                    k8s_openapi::ByteString(bytes.to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        secret.metadata.name = Some(name.clone());
        secret.metadata.labels = Some(
            [
                (LABEL_NAME.to_string(), "vap-runner".to_string()),
                (LABEL_COMPONENT.to_string(), "digest-key".to_string()),
                (LABEL_MANAGED_BY.to_string(), "vap-runner".to_string()),
                (LABEL_RUNNER.to_string(), label_value(runner_name)),
            ]
            .into(),
        );
        super::fencing::stamp_meta(&mut secret.metadata, leadership.stamp());
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match secrets.create(&params, &secret).await {
            Ok(_) => {
                tracing::info!(secret = %name, "created the camera digest key");
                return Ok(DigestKey::new(&bytes));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue, // another replica made it
            Err(e)
                if super::refusal::classify(&e) == super::refusal::Refusal::Fenced
                    && leadership.holds() =>
            {
                tracing::debug!(error = %e, "the digest key Secret was refused as fenced; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
    secret.metadata.owner_references = super::crd::owner_reference(scenario).map(|o| vec![o]);
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

/// Writes the camera Secret of `scenario` (which must carry its UID),
/// stamped with the leader's `stamp`, unless it exists: a replayed deploy
/// never overwrites it, and the controller never needs to read Secrets (its
/// Role grants `create` only).
pub async fn store(
    secrets: &Api<Secret>,
    scenario: &Scenario,
    camera_url: &str,
    stamp: Option<&str>,
) -> Result<(), kube::Error> {
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut secret = build(scenario, camera_url);
    super::fencing::stamp_meta(&mut secret.metadata, stamp);
    match secrets.create(&params, &secret).await {
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
                target: None,
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
            owner.block_owner_deletion,
            Some(true),
            "a foreground delete waits for it"
        );
        assert_eq!(
            secret.string_data.as_ref().unwrap()[CAMERA_URL_KEY],
            "rtsp://admin:hunter2@cam/stream"
        );
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_RUNNER], "vap-runner");
        assert!(!labels.contains_key("unrelated"));
    }

    #[test]
    fn the_keyed_digest_tells_cameras_apart_and_needs_the_key() {
        let id = "550e8400-e29b-41d4-a716-446655440000";
        let key = DigestKey::new(&[7u8; 32]);
        let a = "rtsp://nvr/user=admin&password=x&channel=1&stream=0.sdp";
        let b = "rtsp://nvr/user=admin&password=x&channel=2&stream=0.sdp";
        assert_eq!(shown_url(a), shown_url(b), "redaction hides the difference");
        assert_ne!(key.digest(id, a), key.digest(id, b));
        assert_eq!(
            key.digest(id, a),
            key.digest(id, a),
            "equal cameras, equal digests"
        );
        // The whole URL counts: a new password is a new camera target.
        assert_ne!(
            key.digest(id, "rtsp://admin:old@cam/s"),
            key.digest(id, "rtsp://admin:new@cam/s")
        );
        assert_ne!(
            key.digest(id, "rtsp://cam/s"),
            key.digest("11223344-5566-7788-99aa-bbccddeeeff0", "rtsp://cam/s")
        );
        // Without the key nothing matches: another key, or the unkeyed hash.
        let url = "rtsp://admin:hunter2@cam/s";
        let d = key.digest(id, url);
        assert_ne!(d, DigestKey::new(&[8u8; 32]).digest(id, url));
        let unkeyed = hex(ring::digest::digest(
            &ring::digest::SHA256,
            format!("{id}\n{url}").as_bytes(),
        )
        .as_ref());
        assert!(!d.contains(&unkeyed) && !d.contains(&legacy_camera_digest(id, url)));
        assert!(d.starts_with(DIGEST_PREFIX) && d.len() == DIGEST_PREFIX.len() + 64);
        assert!(!d.contains("hunter2"));
        assert_eq!(format!("{key:?}"), "DigestKey(***)");
    }

    #[test]
    fn a_camera_is_compared_by_the_digest_its_scenario_carries() {
        let id = "550e8400-e29b-41d4-a716-446655440000";
        let key = DigestKey::new(&[7u8; 32]);
        let url = "rtsp://admin:pw@cam/s?channel=1";
        let digest = key.digest(id, url);
        let legacy = legacy_camera_digest(id, url);
        let shown = shown_url(url);
        let (keyed, old) = (Some(digest.as_str()), Some(legacy.as_str()));
        let (channel_2, new_password) = (
            "rtsp://admin:pw@cam/s?channel=2",
            "rtsp://admin:new@cam/s?channel=1",
        );
        for (recorded, camera, same) in [
            (keyed, url, true),
            (keyed, channel_2, false),
            (keyed, new_password, false),
            // Written before the keyed digest: compared the old way, where
            // only the user and password did not count.
            (old, url, true),
            (old, new_password, true),
            (old, channel_2, false),
            // Written before any digest: by the shown URL.
            (None, url, true),
            (None, "rtsp://admin:pw@other/s?channel=1", false),
        ] {
            assert_eq!(
                same_camera(recorded, &shown, id, camera, &key.digest(id, camera)),
                same,
                "{recorded:?} vs {camera}"
            );
        }
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
