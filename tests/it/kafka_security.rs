//! `runner local`, the controller and their workers on a secured Kafka: a broker of each
//! test's own with SASL_SSL, mutual TLS and ACLs (scripts/infra.d/kafka with
//! VAP_KAFKA_SECURE=1). The tests' own clients use the broker's PLAINTEXT
//! listener, a super user, to send commands and read what the runner wrote.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::common::controller::Bed as ControllerBed;
use crate::common::local::{LocalBed, LocalProcess, TopicLog};
use crate::common::oidc::Oidc;
use crate::common::secure_kafka::SecureKafka;
use crate::common::{self, http_get, unique_name, wait_for};

/// A password no other test uses, so that finding it anywhere means a leak.
fn password(who: &str) -> String {
    format!("{who}-Pw-{}", uuid::Uuid::new_v4().simple())
}

/// Writes `secret` to a file only its owner reads, as a mounted Secret is.
fn secret_file(dir: &tempfile::TempDir, name: &str, secret: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path.display().to_string()
}

async fn readyz(local: &LocalProcess) -> (u16, String) {
    let addr = wait_for(
        "runner local's metrics address",
        Duration::from_secs(30),
        || {
            let addr = local.metrics_addr();
            async move { addr }
        },
    )
    .await;
    http_get(&addr, "/readyz").await
}

/// Waits until `/readyz` answers `status` with a body containing `says`; returns the body.
async fn wait_readyz(
    local: &mut LocalProcess,
    status: u16,
    says: &str,
    timeout: Duration,
) -> String {
    let what = format!("/readyz {status} saying {says:?}");
    let mut last = (0, String::new());
    let found = tokio::time::timeout(timeout, async {
        loop {
            local.assert_running();
            last = readyz(local).await;
            if last.0 == status && last.1.contains(says) {
                return last.1.clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out after {timeout:?} waiting for {what}; last answer {last:?}\n{}",
            local.log_tail()
        )
    })
}

/// Waits for `scenario`'s results and its Succeeded phase; returns the result count.
async fn wait_done(
    bed: &LocalBed,
    local: &mut LocalProcess,
    results: &TopicLog,
    events: &TopicLog,
    scenario: &str,
) -> usize {
    let succeeded = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            local.assert_running();
            if events.phases(scenario).last().map(String::as_str) == Some("Succeeded") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if succeeded.is_err() {
        panic!(
            "timed out waiting for the scenario Succeeded on scenario_events; phases {:?}\n{}",
            events.phases(scenario),
            local.log_tail()
        );
    }
    let n = wait_for(
        "results on the results topic",
        Duration::from_secs(30),
        || {
            let n = results
                .all()
                .iter()
                .filter(|(key, v)| {
                    key.as_deref() == Some(scenario) && v["scenario_uuid"] == scenario
                })
                .count();
            async move { (n > 0).then_some(n) }
        },
    )
    .await;
    assert!(bed.list().contains_key(scenario));
    n
}

fn read_proc(pid: u32, file: &str) -> String {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Waits for `local`'s first worker and checks that no secret of `secrets`
/// is on the command line of the supervisor or the worker; returns the
/// worker's environment.
async fn worker_environment(bed: &LocalBed, local: &mut LocalProcess, secrets: &[&str]) -> String {
    let (worker, _) = wait_for("a worker process", Duration::from_secs(60), || {
        local.assert_running();
        let first = bed.workers().first().cloned();
        async move { first }
    })
    .await;
    for pid in [local.pid(), worker] {
        let cmdline = read_proc(pid, "cmdline");
        assert!(
            secrets.iter().all(|s| !cmdline.contains(s)),
            "a secret on the command line of {pid}: {cmdline}"
        );
    }
    read_proc(worker, "environ")
}

/// Waits until `scenario` is done with results, checks `/readyz`, stops
/// `local` and checks that its log (its workers' included) says `says` and
/// holds none of `secrets`.
async fn finish_clean(
    bed: &LocalBed,
    local: &mut LocalProcess,
    (results, events): (&TopicLog, &TopicLog),
    scenario: &str,
    says: &[&str],
    secrets: &[&str],
) {
    let produced = wait_done(bed, local, results, events, scenario).await;
    assert!(produced > 0);
    let (status, body) = readyz(local).await;
    assert_eq!(status, 200, "{body}");
    assert!(local.terminate().success(), "{}", local.log_tail());
    let log = local.log() + &local.stdout();
    assert!(
        says.iter().all(|s| log.contains(s)),
        "the log says how the runner connects ({says:?}):\n{}",
        local.log_tail()
    );
    assert!(
        secrets.iter().all(|s| !log.contains(s)),
        "a secret in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_over_sasl_ssl_runs_a_scenario_with_the_secrets_kept_out_of_sight() {
    let (runner_pw, worker_pw, intruder_pw) =
        (password("runner"), password("worker"), password("intruder"));
    let kafka = SecureKafka::start(&[
        ("runner", &runner_pw),
        ("worker", &worker_pw),
        ("intruder", &intruder_pw),
    ]);
    let bed = LocalBed::on(kafka.bootstrap(), "ksec-local").await;
    kafka.grant_runner("runner", "worker", &(&bed).into());
    let secrets = tempfile::tempdir().expect("secrets dir");
    let runner_file = secret_file(&secrets, "runner-password", &runner_pw);
    let worker_file = secret_file(&secrets, "worker-password", &worker_pw);
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let (sasl_ssl, ca) = (kafka.sasl_ssl(), kafka.ca().display().to_string());
    let mut local = bed.start(&[
        ("KAFKA_BOOTSTRAP_SERVERS", &sasl_ssl),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", "runner"),
        ("KAFKA_SASL_PASSWORD_FILE", &runner_file),
        ("KAFKA_SSL_CA_LOCATION", &ca),
        ("WORKER_KAFKA_SASL_USERNAME", "worker"),
        ("WORKER_KAFKA_SASL_PASSWORD_FILE", &worker_file),
        ("REALTIME", "true"),
    ]);
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &common::media("Megamind.avi")).await;

    // While the worker runs: no password on any command line, and the
    // worker holds no credential of the supervisor's.
    let environ = worker_environment(&bed, &mut local, &[&runner_pw, &worker_pw]).await;
    assert!(
        environ.contains("KAFKA_SASL_USERNAME=worker")
            && !environ.contains(&runner_file)
            && !environ.contains(&runner_pw),
        "the worker's environment: {environ}"
    );

    finish_clean(
        &bed,
        &mut local,
        (&results, &events),
        &scenario,
        &["security.protocol=sasl_ssl", "sasl.username=runner"],
        &[&runner_pw, &worker_pw],
    )
    .await;

    // --help shows no secret, whatever the environment holds.
    for command in ["local", "worker", "controller"] {
        let help = common::run_ok(
            common::runner()
                .args([command, "--help"])
                .env("KAFKA_SASL_PASSWORD", &runner_pw)
                .env("KAFKA_SASL_PASSWORD_FILE", &runner_file),
            "the runner binary is built by cargo test",
        );
        assert!(help.contains("KAFKA_SASL_PASSWORD_FILE"), "{help}");
        assert!(
            !help.contains(&runner_pw),
            "runner {command} --help shows the password"
        );
    }

    // The ACLs the README lists hold: a principal without write on
    // to_deploy cannot deploy, and the worker's cannot read it.
    let intruder: FutureProducer = kafka
        .client("intruder", &intruder_pw)
        .set("message.timeout.ms", "15000")
        .create()
        .expect("producer");
    let refused = intruder
        .send(
            FutureRecord::to(&bed.deploy)
                .key(&scenario)
                .payload(&common::deploy_body(&scenario, "rtsp://cam.example/x")),
            Duration::from_secs(20),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
                _
            ))
        ),
        "a deploy without write on to_deploy: {refused:?}"
    );
    // The topic is closed to the worker's principal: it cannot see it,
    // nor where its messages are.
    let worker_reader: BaseConsumer = kafka
        .client("worker", &worker_pw)
        .set("group.id", unique_name("worker-reader"))
        .create()
        .expect("consumer");
    let metadata = worker_reader
        .fetch_metadata(Some(&bed.deploy), Duration::from_secs(20))
        .expect("metadata");
    assert_eq!(
        metadata.topics()[0].error(),
        Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
        "the worker's principal describing to_deploy"
    );
    let offsets = worker_reader.fetch_watermarks(&bed.deploy, 0, Duration::from_secs(20));
    assert!(
        offsets.is_err(),
        "the worker's principal reads to_deploy's offsets: {offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_over_sasl_plaintext_with_plain_runs_a_scenario_with_the_password_out_of_sight() {
    let runner_pw = password("plain-runner");
    let kafka = SecureKafka::start(&[("runner", &runner_pw)]);
    // The user's SCRAM password differs from its PLAIN one: only a PLAIN
    // login gets in.
    kafka.set_password("runner", &password("scram-only"));
    let bed = LocalBed::on(kafka.bootstrap(), "ksec-plain").await;
    // The workers log in as the supervisor does.
    kafka.grant_runner("runner", "runner", &(&bed).into());
    let secrets = tempfile::tempdir().expect("secrets dir");
    let user_file = secret_file(&secrets, "username", "runner");
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let sasl_plaintext = kafka.sasl_plaintext();
    let mut local = bed.start(&[
        ("KAFKA_BOOTSTRAP_SERVERS", &sasl_plaintext),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("KAFKA_SASL_MECHANISM", "PLAIN"),
        ("KAFKA_SASL_USERNAME_FILE", &user_file),
        ("KAFKA_SASL_PASSWORD", &runner_pw),
        ("REALTIME", "true"),
    ]);
    wait_readyz(&mut local, 200, "ok", Duration::from_secs(60)).await;
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &common::media("Megamind.avi")).await;

    let environ = worker_environment(&bed, &mut local, &[&runner_pw]).await;
    assert!(
        environ.contains("KAFKA_SECURITY_PROTOCOL=sasl_plaintext")
            && environ.contains("KAFKA_SASL_MECHANISM=PLAIN")
            && environ.contains("KAFKA_SASL_USERNAME=runner"),
        "the worker logs in as its supervisor: {environ}"
    );
    finish_clean(
        &bed,
        &mut local,
        (&results, &events),
        &scenario,
        &[
            "security.protocol=sasl_plaintext",
            "sasl.mechanism=PLAIN",
            "sasl.username=runner",
        ],
        &[&runner_pw],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_fails_readyz_in_one_clear_line_and_loses_nothing() {
    let (runner_pw, worker_pw, wrong_pw) =
        (password("runner"), password("worker"), password("wrong"));
    let kafka = SecureKafka::start(&[("runner", &runner_pw), ("worker", &worker_pw)]);
    let bed = LocalBed::on(kafka.bootstrap(), "ksec-login").await;
    kafka.grant_runner("runner", "worker", &(&bed).into());
    let secrets = tempfile::tempdir().expect("secrets dir");
    let worker_file = secret_file(&secrets, "worker-password", &worker_pw);
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &common::media("Megamind.avi")).await;

    let (sasl_ssl, ca) = (kafka.sasl_ssl(), kafka.ca().display().to_string());
    let mut local = bed.start(&[
        ("KAFKA_BOOTSTRAP_SERVERS", &sasl_ssl),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", "runner"),
        ("KAFKA_SASL_PASSWORD", &wrong_pw),
        ("KAFKA_SSL_CA_LOCATION", &ca),
        ("WORKER_KAFKA_SASL_USERNAME", "worker"),
        ("WORKER_KAFKA_SASL_PASSWORD_FILE", &worker_file),
    ]);
    let body = wait_readyz(&mut local, 503, "Kafka", Duration::from_secs(60)).await;
    assert!(
        body.contains("refused the login")
            && body.contains("KAFKA_SASL_PASSWORD")
            && body.contains("\"runner\""),
        "{body}"
    );
    // Still refused a few probes later, and said once in the log.
    wait_for("several failed probes", Duration::from_secs(30), || {
        let log = local.log();
        async move { (log.matches("SASL authentication error").count() >= 3).then_some(()) }
    })
    .await;
    let log = local.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Kafka refused the login"))
        .collect();
    assert_eq!(lines.len(), 1, "one line while it lasts:\n{log}");
    assert!(!log.contains(&wrong_pw), "the password in the log");
    assert!(bed.list().is_empty(), "nothing ingested without a login");

    // A worker with a refused login stops at start with the same words.
    let worker = common::worker(&scenario, &common::media("Megamind.avi"))
        .env("VIDEO_FILE_ROOT", common::MEDIA_DIR)
        .env("KAFKA_BOOTSTRAP_SERVERS", &sasl_ssl)
        .env("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
        .env("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env("KAFKA_SASL_USERNAME", "worker")
        .env("KAFKA_SASL_PASSWORD", &wrong_pw)
        .env("KAFKA_SSL_CA_LOCATION", &ca)
        .env("RESULTS_TOPIC", &bed.results)
        .output()
        .expect("runner worker");
    let stderr = String::from_utf8_lossy(&worker.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        !worker.status.success()
            && last.contains("Kafka refused the login of KAFKA_SASL_USERNAME=\"worker\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&wrong_pw),
        "the password in the worker's log"
    );

    // The operator sets the password the runner has: it logs in, and the
    // deploy that waited runs.
    kafka.set_password("runner", &wrong_pw);
    wait_readyz(&mut local, 200, "ok", Duration::from_secs(60)).await;
    wait_done(&bed, &mut local, &results, &events, &scenario).await;
    assert!(local.log().contains("Kafka answers again"));
    assert!(local.terminate().success(), "{}", local.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_fails_readyz_and_mutual_tls_works() {
    let kafka = SecureKafka::start(&[("admin", &password("admin"))]);
    let bed = LocalBed::on(kafka.bootstrap(), "ksec-mtls").await;
    // The client certificate's principal is both supervisor and worker.
    kafka.grant_runner("mtls-client", "mtls-client", &(&bed).into());
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &common::media("Megamind.avi")).await;
    let (cert, key) = kafka.client_cert();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mutual_tls = kafka.mutual_tls();
    let tls = [
        ("KAFKA_BOOTSTRAP_SERVERS", mutual_tls.as_str()),
        ("KAFKA_SECURITY_PROTOCOL", "ssl"),
        ("KAFKA_SSL_CERTIFICATE_LOCATION", &cert),
        ("KAFKA_SSL_KEY_LOCATION", &key),
    ];

    // The system's store does not know the bed's CA.
    let mut untrusting = bed.start(&tls);
    let body = wait_readyz(&mut untrusting, 503, "Kafka", Duration::from_secs(60)).await;
    assert!(
        body.contains("TLS handshake") && body.contains("KAFKA_SSL_CA_LOCATION"),
        "{body}"
    );
    assert!(
        untrusting.terminate().success(),
        "{}",
        untrusting.log_tail()
    );
    assert!(
        bed.list().is_empty(),
        "nothing ingested over an untrusted connection"
    );

    let ca = kafka.ca().display().to_string();
    let mut with_ca: Vec<(&str, &str)> = tls.to_vec();
    with_ca.push(("KAFKA_SSL_CA_LOCATION", &ca));
    let mut local = bed.start(&with_ca);
    wait_readyz(&mut local, 200, "ok", Duration::from_secs(60)).await;
    wait_done(&bed, &mut local, &results, &events, &scenario).await;
    assert!(local.terminate().success(), "{}", local.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_its_worker_pod_run_over_sasl_ssl_with_their_own_principals() {
    let (runner_pw, worker_pw) = (password("runner"), password("worker"));
    let kafka = SecureKafka::start(&[("runner", &runner_pw), ("worker", &worker_pw)]);
    let bed = ControllerBed::on(kafka.bootstrap(), "ksec-ctl").await;
    kafka.grant_runner("runner", "worker", &(&bed).into());
    let files = tempfile::tempdir().expect("secrets dir");
    let runner_file = secret_file(&files, "runner-password", &runner_pw);
    let (sasl_ssl, ca_path) = (kafka.sasl_ssl(), kafka.ca().display().to_string());
    controller_and_worker_pod(
        &kafka,
        &bed,
        &[
            ("KAFKA_BOOTSTRAP_SERVERS", &sasl_ssl),
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SASL_USERNAME", "runner"),
            ("KAFKA_SASL_PASSWORD_FILE", &runner_file),
            ("KAFKA_SSL_CA_LOCATION", &ca_path),
        ],
        serde_json::json!({"username": "worker", "password": worker_pw}),
        ("KAFKA_SASL_PASSWORD_FILE", "sasl.username=worker"),
        &[&runner_pw, &worker_pw],
    )
    .await;

    // Without a Secret for its workers, the controller refuses SASL.
    let refused = common::runner()
        .args(["controller"])
        .env("KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
        .env("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
        .env("KAFKA_SASL_USERNAME", "runner")
        .env("KAFKA_SASL_PASSWORD_FILE", &runner_file)
        .output()
        .expect("runner controller");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("WORKER_KAFKA_SASL_SECRET"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_its_worker_pod_run_over_oauthbearer_as_their_own_subjects() {
    let (runner_secret, worker_secret) = (password("oidc-runner"), password("oidc-worker"));
    let oidc = Oidc::start(&[
        ("vap-runner", &runner_secret, "runner-oidc"),
        ("vap-worker", &worker_secret, "worker-oidc"),
    ])
    .await;
    let kafka = SecureKafka::start_with_oauth(&[("admin", &password("admin"))], &oidc.jwks_url());
    let bed = ControllerBed::on(kafka.bootstrap(), "ksec-ctl-oauth").await;
    // Each principal is its token's `sub`, with its own ACLs.
    kafka.grant_runner("runner-oidc", "worker-oidc", &(&bed).into());
    let files = tempfile::tempdir().expect("secrets dir");
    let runner_file = secret_file(&files, "client-secret", &runner_secret);
    let settings = oauth_settings(&kafka, &oidc, &runner_file);
    controller_and_worker_pod(
        &kafka,
        &bed,
        &as_env(&settings),
        serde_json::json!({"client-id": "vap-worker", "client-secret": worker_secret}),
        (
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
            "sasl.oauthbearer.client.id=vap-worker",
        ),
        &[&runner_secret, &worker_secret],
    )
    .await;
    let (issued, refused) = oidc.counts();
    assert!(
        issued >= 2 && refused == 0,
        "tokens for the controller and its worker: {issued} issued, {refused} refused"
    );
}

/// Starts a controller on `bed` with the Kafka `settings`, worker Pods told
/// to log in with the Secret `worker-kafka` (holding `worker_login`) and
/// trust the broker's CA from the Secret `kafka-ca`; deploys vtest.avi and
/// runs its worker Pod's command as the kubelet would, with the Secrets
/// mounted. Checks that the worker delivers all 80 results, that the Pod
/// spec names `shown.0` and the worker's log `shown.1`, and that none of
/// `hidden` is in the Pod spec, either log or the controller's command line.
async fn controller_and_worker_pod(
    kafka: &SecureKafka,
    bed: &ControllerBed,
    settings: &[(&str, &str)],
    worker_login: serde_json::Value,
    shown: (&str, &str),
    hidden: &[&str],
) {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::PostParams;
    use vap_runner::controller::crd::Phase;
    use vap_runner::controller::names::pod_name;

    let secrets: kube::Api<Secret> = kube::Api::namespaced(bed.client.clone(), &bed.namespace);
    let ca = std::fs::read_to_string(kafka.ca()).expect("the bed's CA");
    for secret in [
        serde_json::json!({"metadata": {"name": "worker-kafka"}, "stringData": worker_login}),
        serde_json::json!({"metadata": {"name": "kafka-ca"}, "stringData": {"ca.crt": ca}}),
    ] {
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(secret).unwrap(),
            )
            .await
            .expect("create Secret");
    }
    let mut env = settings.to_vec();
    env.extend([
        ("WORKER_KAFKA_SASL_SECRET", "worker-kafka"),
        ("WORKER_KAFKA_CA_SECRET", "kafka-ca"),
        ("VIDEO_FPS", "1"),
    ]);
    let controller = bed.start_controller(&env);
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &format!("{}/vtest.avi", common::MEDIA_DIR))
        .await;
    bed.wait_phase(&scenario, Phase::Running).await;

    // The worker Pod names its own Secret and the CA; no secret value is in it.
    let pod = bed.pods().get(&pod_name(&scenario)).await.unwrap();
    let spec = serde_json::to_string(&pod.spec).unwrap();
    assert!(
        hidden.iter().all(|secret| !spec.contains(secret)),
        "a secret in the Pod spec"
    );
    assert!(
        spec.contains("\"secretName\":\"worker-kafka\"")
            && spec.contains("\"secretName\":\"kafka-ca\"")
            && spec.contains("\"value\":\"sasl_ssl\"")
            && spec.contains(shown.0),
        "the Pod spec: {spec}"
    );
    // Run as the kubelet would, with the Secrets mounted: it produces as
    // its own principal.
    let output = bed
        .pod_command(&pod)
        .await
        .output()
        .expect("run the Pod's command");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(log.contains(shown.1), "{log}");
    assert!(
        hidden.iter().all(|secret| !log.contains(secret)),
        "a secret in the worker's log"
    );
    assert_eq!(
        common::messages_in(&bed.bootstrap, &bed.results),
        Some(80),
        "vtest.avi (79.5 s) at VIDEO_FPS=1 gives 80 results"
    );
    let controller_log = std::fs::read_to_string(&controller.log_path).unwrap_or_default();
    assert!(controller_log.contains("security.protocol=sasl_ssl"));
    let cmdline = read_proc(controller.pid().expect("controller pid"), "cmdline");
    for secret in hidden {
        assert!(
            !controller_log.contains(secret),
            "a secret in the controller's log"
        );
        assert!(!cmdline.contains(secret), "{cmdline}");
    }
}

/// `runner local`'s settings for OAUTHBEARER over SASL_SSL with `oidc`'s
/// client `vap-runner` and the client secret in `secret_file`.
fn oauth_settings(kafka: &SecureKafka, oidc: &Oidc, secret_file: &str) -> Vec<(String, String)> {
    [
        ("KAFKA_BOOTSTRAP_SERVERS", kafka.sasl_ssl()),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl".into()),
        ("KAFKA_SASL_MECHANISM", "OAUTHBEARER".into()),
        (
            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
            oidc.token_endpoint(),
        ),
        ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "vap-runner".into()),
        (
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
            secret_file.into(),
        ),
        ("KAFKA_SASL_OAUTHBEARER_SCOPE", "kafka".into()),
        ("KAFKA_SSL_CA_LOCATION", kafka.ca().display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn as_env(settings: &[(String, String)]) -> Vec<(&str, &str)> {
    settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_over_sasl_ssl_with_oauthbearer_runs_a_scenario_as_the_token_subject() {
    let client_secret = password("oidc-client");
    let oidc = Oidc::start(&[("vap-runner", &client_secret, "runner-oidc")]).await;
    let kafka = SecureKafka::start_with_oauth(&[("admin", &password("admin"))], &oidc.jwks_url());
    let bed = LocalBed::on(kafka.bootstrap(), "ksec-oauth").await;
    // The principal is the token's `sub`; it alone has the ACLs.
    kafka.grant_runner("runner-oidc", "runner-oidc", &(&bed).into());
    let secrets = tempfile::tempdir().expect("secrets dir");
    let secret_path = secret_file(&secrets, "client-secret", &client_secret);
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let mut settings = oauth_settings(&kafka, &oidc, &secret_path);
    settings.push(("REALTIME".into(), "true".into()));
    let mut local = bed.start(&as_env(&settings));
    wait_readyz(&mut local, 200, "ok", Duration::from_secs(60)).await;
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &common::media("Megamind.avi")).await;

    let environ = worker_environment(&bed, &mut local, &[&client_secret]).await;
    assert!(
        environ.contains("KAFKA_SASL_MECHANISM=OAUTHBEARER")
            && environ.contains(&format!(
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE={secret_path}"
            ))
            && !environ.contains(&client_secret),
        "the worker gets the secret's file, not the secret: {environ}"
    );
    finish_clean(
        &bed,
        &mut local,
        (&results, &events),
        &scenario,
        &[
            "sasl.mechanism=OAUTHBEARER",
            "sasl.oauthbearer.client.id=vap-runner",
        ],
        &[&client_secret],
    )
    .await;
    let (issued, refused) = oidc.counts();
    assert!(
        issued >= 2 && refused == 0,
        "tokens for the supervisor and its worker: {issued} issued, {refused} refused"
    );
    assert_eq!(oidc.last_scope().as_deref(), Some("kafka"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_secret_fails_readyz_in_one_line_naming_the_settings_and_loses_nothing() {
    let wrong_secret = password("wrong-client");
    let oidc = Oidc::start(&[("vap-runner", &password("right-client"), "runner-oidc")]).await;
    let kafka = SecureKafka::start_with_oauth(&[("admin", &password("admin"))], &oidc.jwks_url());
    let bed = LocalBed::on(kafka.bootstrap(), "ksec-oauth-refused").await;
    kafka.grant_runner("runner-oidc", "runner-oidc", &(&bed).into());
    let secrets = tempfile::tempdir().expect("secrets dir");
    let secret_path = secret_file(&secrets, "client-secret", &wrong_secret);
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let scenario = uuid::Uuid::new_v4().to_string();
    bed.deploy(&scenario, &common::media("Megamind.avi")).await;

    let mut local = bed.start(&as_env(&oauth_settings(&kafka, &oidc, &secret_path)));
    let body = wait_readyz(&mut local, 503, "Kafka", Duration::from_secs(60)).await;
    assert!(
        body.contains("OAUTHBEARER login")
            && body.contains("KAFKA_SASL_OAUTHBEARER_CLIENT_ID=\"vap-runner\"")
            && body.contains("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE")
            && body.contains("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")
            && !body.contains(&wrong_secret),
        "{body}"
    );
    wait_for("refused token requests", Duration::from_secs(30), || {
        let refused = oidc.counts().1;
        async move { (refused >= 2).then_some(()) }
    })
    .await;
    let log = local.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("OAUTHBEARER login"))
        .collect();
    assert_eq!(lines.len(), 1, "one line while it lasts:\n{log}");
    assert!(!log.contains(&wrong_secret), "the client secret in the log");
    assert!(bed.list().is_empty(), "nothing ingested without a login");

    // The provider now accepts the secret the runner has: it logs in, and
    // the deploy that waited runs.
    oidc.set_secret("vap-runner", &wrong_secret);
    wait_readyz(&mut local, 200, "ok", Duration::from_secs(90)).await;
    wait_done(&bed, &mut local, &results, &events, &scenario).await;
    assert!(local.log().contains("Kafka answers again"));
    assert!(local.terminate().success(), "{}", local.log_tail());
}
