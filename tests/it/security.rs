//! Camera credentials and the camera host policy, on the real test bed:
//! passwords live only in a Secret the controller owns, nothing the runner
//! writes (logs, dead-letter headers, Scenario spec and status, Pods, Events,
//! `scenario_events`) shows them, ingest and the worker refuse hosts that
//! are (or resolve to) metadata, link-local or loopback addresses, and the
//! worker follows no HTTP redirect.

use crate::common;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::controller::Bed;
use crate::common::scenario::uuid;
use crate::common::wait_for;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vap_runner::controller::crd::{Phase, Scenario};

/// The credential-bearing spellings of tests/fixtures/credential-urls.json
/// and the part of their secret that must never show.
fn credential_spellings() -> (String, Vec<String>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/credential-urls.json");
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let urls = table["urls"].as_array().unwrap();
    (
        table["secret"].as_str().unwrap().to_string(),
        urls.iter()
            .map(|u| u.as_str().unwrap().to_string())
            .collect(),
    )
}

// ---------------------------------------------------------------- HTTP servers

/// What the test HTTP server answers.
#[derive(Clone)]
enum Answer {
    /// The file, to requests that carry `Authorization: Basic <credentials>`;
    /// 401 to others.
    FileWithBasicAuth {
        body: Arc<Vec<u8>>,
        credentials: String,
    },
    /// `302 Found` to this location.
    Redirect(String),
}

/// A small HTTP/1.1 server on 127.0.0.1 that counts the requests it gets.
struct HttpServer {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    authorized: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    async fn start(answer: Answer) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let authorized = Arc::new(AtomicUsize::new(0));
        let task = {
            let (requests, authorized) = (requests.clone(), authorized.clone());
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let (answer, requests, authorized) =
                        (answer.clone(), requests.clone(), authorized.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 2048];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                        let _ = match answer {
                            Answer::Redirect(location) => {
                                let reply = format!(
                                    "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                );
                                stream.write_all(reply.as_bytes()).await
                            }
                            Answer::FileWithBasicAuth { body, credentials } => {
                                let expected = format!(
                                    "authorization: basic {}",
                                    base64(credentials.as_bytes()).to_ascii_lowercase()
                                );
                                if head.contains(&expected) {
                                    authorized.fetch_add(1, Ordering::SeqCst);
                                    let reply = format!(
                                        "HTTP/1.1 200 OK\r\nContent-Type: video/x-msvideo\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                        body.len()
                                    );
                                    match stream.write_all(reply.as_bytes()).await {
                                        Ok(()) => stream.write_all(&body).await,
                                        Err(e) => Err(e),
                                    }
                                } else {
                                    stream
                                        .write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"camera\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                        .await
                                }
                            }
                        };
                    });
                }
            })
        };
        HttpServer {
            addr,
            requests,
            authorized,
            task,
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Standard base64 with padding (for a Basic authorization header).
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------- helpers

/// A client that acts as `user` (impersonated by the test bed's admin).
async fn client_as(user: &str) -> Client {
    let mut config = kube::Config::infer().await.expect("KUBECONFIG");
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).expect("client")
}

/// `kubectl -n <ns> get <what> -o yaml`.
fn kubectl_yaml(namespace: &str, what: &str) -> String {
    common::run_ok(
        std::process::Command::new("kubectl").args(["-n", namespace, "get", what, "-o", "yaml"]),
        &format!("kubectl is built by the test bed: {}", common::TESTBED_HINT),
    )
}

async fn scenario_count(bed: &Bed) -> usize {
    bed.scenarios()
        .list(&ListParams::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(0)
}

trait SecretsApi {
    fn secrets(&self) -> Api<Secret>;
}

impl SecretsApi for Bed {
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_password_lives_only_in_the_secret_the_controller_owns() {
    let password = format!("pw-{}", &uuid()[..8]);
    let clip = Arc::new(std::fs::read(common::media("vtest.avi")).unwrap());
    let camera = HttpServer::start(Answer::FileWithBasicAuth {
        body: clip,
        credentials: format!("admin:{password}"),
    })
    .await;
    let camera_url = format!("http://admin:{password}@{}/vtest.avi", camera.addr);

    let bed = Bed::new("sec-secret").await;
    // The camera is on this machine: allow loopback (refused by default in
    // Kubernetes mode).
    let controller = bed.start_controller(&[("CAMERA_ALLOW_LOOPBACK", "true")]);
    let id = uuid();
    bed.deploy(&id, &camera_url).await;
    let scenario_name = common::scenario::scenario_name(&id);
    let pod_name = common::scenario::pod_name(&id);
    bed.wait_phase(&id, Phase::Running).await;

    // Exactly one place holds the password: the Secret, owned by the Scenario.
    let scenario = bed.scenarios().get(&scenario_name).await.unwrap();
    assert_eq!(
        scenario.spec.camera_url,
        format!("http://***@{}/vtest.avi", camera.addr)
    );
    let secrets = bed.secrets().list(&ListParams::default()).await.unwrap();
    let holding: Vec<&Secret> = secrets
        .items
        .iter()
        .filter(|s| {
            s.data
                .iter()
                .flatten()
                .any(|(_, v)| String::from_utf8_lossy(&v.0).contains(&password))
        })
        .collect();
    assert_eq!(holding.len(), 1, "exactly one Secret holds the password");
    let secret = holding[0];
    assert_eq!(secret.name_any(), format!("scn-{id}-camera"));
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(owner.uid.as_str())),
        ("Scenario", scenario.metadata.uid.as_deref())
    );
    for what in [
        "pods",
        "scenarios",
        "events.events.k8s.io",
        "events",
        "configmaps",
    ] {
        let yaml = kubectl_yaml(&bed.namespace, what);
        assert!(
            !yaml.contains(&password),
            "kubectl get {what} -o yaml shows the password"
        );
    }
    let log = std::fs::read_to_string(&controller.log_path).unwrap();
    assert!(
        !log.contains(&password),
        "the controller log shows the password"
    );

    // Someone who may read Pods, Scenarios and Events but not Secrets (the
    // built-in `view` role plus Scenarios) cannot learn it.
    let user = format!("viewer-{}", &id[..8]);
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "scenario-reader"},
        "rules": [{"apiGroups": ["runner.vap.io"], "resources": ["scenarios"], "verbs": ["get", "list", "watch"]}]
    }))
    .unwrap();
    Api::<Role>::namespaced(bed.client.clone(), &bed.namespace)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let bindings: Api<RoleBinding> = Api::namespaced(bed.client.clone(), &bed.namespace);
    for (name, kind, role) in [
        ("viewer-view", "ClusterRole", "view"),
        ("viewer-scenarios", "Role", "scenario-reader"),
    ] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        }))
        .unwrap();
        bindings
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    }
    let viewer = client_as(&user).await;
    let seen_pods = wait_for(
        "the viewer's RoleBindings to apply",
        Duration::from_secs(30),
        || {
            let pods: Api<Pod> = Api::namespaced(viewer.clone(), &bed.namespace);
            async move { pods.list(&ListParams::default()).await.ok() }
        },
    )
    .await;
    let seen_scenarios = Api::<Scenario>::namespaced(viewer.clone(), &bed.namespace)
        .list(&ListParams::default())
        .await
        .expect("the viewer may list Scenarios");
    let seen = format!(
        "{}{}",
        serde_json::to_string(&seen_pods.items).unwrap(),
        serde_json::to_string(&seen_scenarios.items).unwrap()
    );
    assert!(seen.contains(&id) && !seen.contains(&password));
    let viewer_secrets: Api<Secret> = Api::namespaced(viewer.clone(), &bed.namespace);
    for result in [
        viewer_secrets
            .get(&format!("scn-{id}-camera"))
            .await
            .map(|_| ()),
        viewer_secrets
            .list(&ListParams::default())
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(result, Err(kube::Error::Api(ref e)) if e.code == 403),
            "the viewer must not read Secrets: {result:?}"
        );
    }

    // The worker still gets the right URL: the Pod's command with its env
    // resolved as the kubelet would reads the camera, which wants the password.
    let pod = bed.pods().get(&pod_name).await.unwrap();
    let mut worker = tokio::process::Command::from(bed.pod_command(&pod).await)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the Pod's command");
    wait_for(
        "results from the worker",
        Duration::from_secs(60),
        || async { (bed.messages_in(&bed.results) >= 3).then_some(()) },
    )
    .await;
    assert!(camera.authorized.load(Ordering::SeqCst) >= 1);
    let pid = worker.id().unwrap().to_string();
    common::run_ok(
        std::process::Command::new("kill").args(["-TERM", &pid]),
        "kill is part of procps",
    );
    let output = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stderr = String::new();
        worker
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        (worker.wait().await.unwrap(), stderr)
    })
    .await
    .expect("the worker stops within 30 s of SIGTERM");
    // The clip may end before SIGTERM arrives: 0 (its end) or 143 (stopped
    // first); either way a clean end, every result delivered.
    assert!(
        matches!(output.0.code(), Some(0 | 143)),
        "the worker ends cleanly, got {}:\n{}",
        output.0,
        output.1
    );
    assert!(
        !output.1.contains(&password),
        "the worker log shows the password:\n{}",
        output.1
    );
}

/// The camera digest on a Scenario is an HMAC under a key the runner keeps
/// in a Secret of its own, created once: it matches nothing that can be
/// computed without the key, stays the same across restarts (a replayed
/// deploy of the same camera still only refreshes), and a Scenario written
/// before digests were keyed is still compared the old way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_camera_digest_is_keyed_by_a_secret_the_runner_keeps() {
    use crate::common::controller::{ingested, sample_or_zero};
    use crate::common::scenario::{now_ms, scenario_name};
    use vap_runner::controller::secret::{DigestKey, legacy_camera_digest};
    const DIGEST: &str = "runner.vap.io/camera-digest";

    let bed = Bed::new("sec-digest").await;
    let mut controller = bed.start_controller(&[]);
    let _explain = bed.explain_failure(&[&controller]);
    let (a, b) = (uuid(), uuid());
    let clip = format!("{}/vtest.avi", common::MEDIA_DIR);
    let other_clip = format!("{}/Megamind.avi", common::MEDIA_DIR);
    let at = now_ms();
    bed.deploy_at(&a, &clip, at).await;
    bed.deploy_at(&b, &clip, at).await;
    bed.wait_phase(&a, Phase::Running).await;
    bed.wait_phase(&b, Phase::Running).await;

    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let key_secret = secrets
        .get("vap-runner-camera-digest-key")
        .await
        .expect("the runner's digest key Secret");
    let key = &key_secret.data.as_ref().unwrap()["key"].0;
    assert!(key.len() >= 32, "a key of {} bytes", key.len());
    let digest_of = |id: &str| {
        let scenarios = bed.scenarios();
        let name = scenario_name(id);
        async move {
            let s = scenarios.get(&name).await.unwrap();
            s.annotations()[DIGEST].clone()
        }
    };
    let digest_a = digest_of(&a).await;
    assert_eq!(digest_a, DigestKey::new(key).digest(&a, &clip));
    let unkeyed: String =
        ring::digest::digest(&ring::digest::SHA256, format!("{a}\n{clip}").as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
    assert!(
        !digest_a.contains(&unkeyed) && !digest_a.contains(&legacy_camera_digest(&a, &clip)),
        "{digest_a}"
    );

    // Scenario b as a runner before keyed digests would have written it.
    bed.scenarios()
        .patch(
            &scenario_name(&b),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                DIGEST: legacy_camera_digest(&b, &clip)
            }}})),
        )
        .await
        .expect("write an old digest");

    // A restart keeps the key: newer deploys of the same cameras refresh,
    // whichever digest their Scenario carries.
    assert!(
        controller.terminate().success(),
        "{}",
        controller.log_tail()
    );
    let controller = bed.start_controller(&[]);
    let _explain_restarted = bed.explain_failure(&[&controller]);
    bed.deploy_at(&a, &clip, at + 1).await;
    bed.deploy_at(&b, &clip, at + 1).await;
    bed.wait_committed(&bed.deploy, 4, Duration::from_secs(120))
        .await;
    let again = secrets.get("vap-runner-camera-digest-key").await.unwrap();
    assert_eq!(again.metadata.uid, key_secret.metadata.uid, "created once");
    assert_eq!(&again.data.as_ref().unwrap()["key"].0, key);
    let metrics = controller.metrics().await;
    assert_eq!(
        common::controller::sample(&metrics, &ingested("deploy", "refreshed")),
        2.0,
        "{}",
        controller.log_tail()
    );
    assert_eq!(
        sample_or_zero(&metrics, &ingested("deploy", "replaced")),
        0.0
    );
    assert_eq!(digest_of(&a).await, digest_a);

    // Another camera replaces b's worker, and its digest is keyed from then on.
    bed.deploy_at(&b, &other_clip, at + 2).await;
    bed.wait_committed(&bed.deploy, 5, Duration::from_secs(120))
        .await;
    assert_eq!(
        controller.metric(&ingested("deploy", "replaced")).await,
        1.0
    );
    assert_eq!(
        digest_of(&b).await,
        DigestKey::new(key).digest(&b, &other_clip)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_blocked_hosts_and_no_secret_spelling_leaks() {
    let bed = Bed::new("sec-ingest").await;
    let controller = bed.start_controller(&[("MAX_WORKERS", "2")]);
    // Refused for their host, with reason camera_url: metadata and
    // link-local addresses (IPv4, IPv6, mapped), a metadata name, and names
    // that resolve to refused addresses here (a numeric name, which the
    // resolver reads as 169.254.169.254, and `localhost` from the hosts file,
    // loopback — refused in Kubernetes mode).
    let blocked = [
        "http://169.254.169.254/latest/meta-data/",
        "rtsp://169.254.10.20/stream",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "rtsp://[fe80::1]/stream",
        "http://[::ffff:169.254.169.254]/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "rtsp://0xa9fea9fe/stream",
        "rtsp://localhost:8554/stream",
        "rtsp://0.0.0.0/stream",
        "rtsp://239.1.2.3/stream",
    ];
    let (secret, spellings) = credential_spellings();
    let mut sent = 0;
    for camera in blocked
        .iter()
        .map(|s| s.to_string())
        .chain(spellings.clone())
    {
        bed.deploy(&uuid(), &camera).await;
        sent += 1;
    }
    // Every message ends as a Scenario or on the DLQ.
    let dead = wait_for(
        "every request handled",
        Duration::from_secs(120),
        || async {
            let dead = bed.messages_in(&bed.dlq);
            let total = dead as usize + scenario_count(&bed).await;
            (total >= sent).then_some(dead as usize)
        },
    )
    .await;
    let dlq = bed.read_topic(&bed.dlq, dead).await;
    for camera in blocked {
        let letter = dlq
            .iter()
            .find(|r| String::from_utf8_lossy(&r.payload).contains(&format!("\"{camera}\"")))
            .unwrap_or_else(|| panic!("{camera} was not refused\n{}", controller.log_tail()));
        assert_eq!(letter.header("reason"), "camera_url", "{camera}");
        assert!(
            letter.header("error").contains("camera host policy"),
            "{camera}: {}",
            letter.header("error")
        );
    }

    // No secret in any header, log line, status, spec, Pod, Event or
    // scenario_events message (the DLQ payload is the request itself).
    for letter in &dlq {
        for (key, value) in &letter.headers {
            assert!(
                !value.contains(&secret),
                "DLQ header {key} shows a secret: {value}"
            );
        }
    }
    wait_for(
        "scenarios to get a phase",
        Duration::from_secs(60),
        || async {
            let list = bed.scenarios().list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .all(|s| s.status.as_ref().and_then(|s| s.phase).is_some())
                .then_some(())
        },
    )
    .await;
    for what in ["scenarios", "pods", "events.events.k8s.io"] {
        let yaml = kubectl_yaml(&bed.namespace, what);
        assert!(
            !yaml.contains(&secret),
            "kubectl get {what} -o yaml shows a secret"
        );
    }
    let phase_events = bed.messages_in(&bed.events) as usize;
    for message in bed.read_topic(&bed.events, phase_events).await {
        let payload = String::from_utf8_lossy(&message.payload);
        assert!(
            !payload.contains(&secret),
            "scenario_events shows a secret: {payload}"
        );
    }
    let log = std::fs::read_to_string(&controller.log_path).unwrap();
    for line in log.lines() {
        assert!(
            !line.contains(&secret),
            "the controller log shows a secret: {line}"
        );
    }
}

#[test]
fn the_worker_refuses_names_that_resolve_to_blocked_addresses() {
    for (camera, expected) in [
        (
            "rtsp://admin:S3cretPw@localhost:8554/a",
            "resolves to 127.0.0.1, a loopback address",
        ),
        (
            "rtsp://admin:S3cretPw@0xa9fea9fe/a",
            "resolves to 169.254.169.254, a cloud metadata address",
        ),
        (
            "http://admin:S3cretPw@169.254.169.254/",
            "a cloud metadata address",
        ),
    ] {
        let mut cmd = common::worker("550e8400-e29b-41d4-a716-446655440000", camera);
        cmd.args(["--sink", "stdout"])
            .env("CAMERA_ALLOW_LOOPBACK", "false")
            .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1");
        let out = cmd.output().expect("run the worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{camera} was opened:\n{stderr}");
        assert!(stderr.contains(expected), "{camera}:\n{stderr}");
        assert!(
            !stderr.contains("cretPw"),
            "{camera}: the password shows:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_follows_no_http_redirect() {
    // The target of the redirect would be a fine camera; only the redirect
    // is refused, so the worker never reaches it.
    let clip = Arc::new(std::fs::read(common::media("vtest.avi")).unwrap());
    let target = HttpServer::start(Answer::FileWithBasicAuth {
        body: clip,
        credentials: "admin:pw".into(),
    })
    .await;
    let redirector = HttpServer::start(Answer::Redirect(format!(
        "http://admin:pw@{}/vtest.avi",
        target.addr
    )))
    .await;
    let camera = format!("http://{}/cam", redirector.addr);
    let mut cmd = common::worker("550e8400-e29b-41d4-a716-446655440000", &camera);
    cmd.args(["--sink", "stdout", "--max-reconnects", "1"])
        .args(["--reconnect-base-ms", "50", "--open-timeout-ms", "3000"])
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1");
    // Asynchronously: the servers run on this test's runtime.
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run the worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the worker read through a redirect:\n{stderr}"
    );
    assert!(redirector.requests.load(Ordering::SeqCst) >= 1, "{stderr}");
    assert_eq!(
        target.requests.load(Ordering::SeqCst),
        0,
        "the redirect was followed:\n{stderr}"
    );
}

/// The object of `kind` that `helm template` renders with a bootstrap server
/// and the `sets`.
fn rendered(kind: &str, sets: &[&str]) -> serde_json::Value {
    let args: Vec<&str> = sets.iter().flat_map(|set| ["--set", set]).collect();
    common::chart_objects(&args)
        .into_iter()
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("helm template renders no {kind}"))
}

#[test]
fn the_network_policy_cuts_out_ipv4_and_ipv6_metadata() {
    let policy = rendered(
        "NetworkPolicy",
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.cameras.cidrs={0.0.0.0/0,::/0,fd00::/8,fd00:ec2::/32,fd00:ec3::/32,192.168.10.0/24}",
        ],
    );
    let mut excepts = std::collections::BTreeMap::new();
    for rule in policy["spec"]["egress"].as_array().unwrap() {
        for peer in rule["to"].as_array().into_iter().flatten() {
            if let Some(cidr) = peer["ipBlock"]["cidr"].as_str() {
                excepts.insert(cidr.to_string(), peer["ipBlock"]["except"].clone());
            }
        }
    }
    let v4 = json!([
        "169.254.169.254/32",
        "169.254.170.2/32",
        "169.254.170.23/32",
        "100.100.100.200/32"
    ]);
    let v6 = json!(["fd00:ec2::254/128", "fd00:ec2::23/128"]);
    let expected = [
        ("0.0.0.0/0", v4),
        ("::/0", v6.clone()),
        ("fd00::/8", v6.clone()),
        ("fd00:ec2::/32", v6),
        ("fd00:ec3::/32", serde_json::Value::Null),
        ("192.168.10.0/24", serde_json::Value::Null),
    ];
    for (cidr, except) in expected {
        assert_eq!(excepts.get(cidr), Some(&except), "{cidr}: {excepts:?}");
    }
}

/// The chart's NetworkPolicy blocks by default exactly the metadata
/// addresses the camera host policy always refuses.
#[test]
fn the_network_policy_blocks_every_metadata_address_the_host_policy_refuses() {
    let values: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/vap-runner/values.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let chart: std::collections::BTreeSet<String> = values["networkPolicy"]["blockedCidrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let policy: std::collections::BTreeSet<String> = vap_runner::host_policy::metadata_addresses()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(chart, policy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_time_migration_moves_old_camera_urls_into_secrets() {
    let bed = Bed::new("sec-migrate").await;
    // Scenarios as a runner before camera Secrets wrote them: the URL, with
    // its password, in the spec.
    let old = [
        (
            "rtsp://admin:S3cretPw@cam.example.com:554/live?channel=1",
            "rtsp://***@cam.example.com:554",
        ),
        (
            "http://cam.example.com/mjpeg?token=S3cretPw",
            "http://cam.example.com",
        ),
        ("rtsp:admin:S3cretPw@cam", "<unparseable>"),
    ];
    let mut names = Vec::new();
    for (url, _) in old {
        let id = uuid();
        let scenario: Scenario = serde_json::from_value(json!({
            "apiVersion": "runner.vap.io/v1alpha1", "kind": "Scenario",
            "metadata": {"name": common::scenario::scenario_name(&id), "labels": {"runner.vap.io/runner": "vap-runner"}},
            "spec": {"scenarioUuid": id, "workerId": "11223344-5566-7788-99aa-bbccddeeeff0", "cameraUrl": url}
        }))
        .unwrap();
        bed.scenarios()
            .create(&PostParams::default(), &scenario)
            .await
            .unwrap();
        names.push(common::scenario::scenario_name(&id));
    }
    let script = format!(
        "{}/scripts/migrate-camera-secrets",
        env!("CARGO_MANIFEST_DIR")
    );
    let run = || {
        common::run_ok(
            std::process::Command::new(&script).arg(&bed.namespace),
            "the script needs bash and kubectl",
        )
    };
    let first = run();
    assert!(first.contains("3 Scenario(s) migrated"), "{first}");
    assert!(!first.contains("cretPw"), "{first}");
    for (name, (url, shown)) in names.iter().zip(old) {
        let scenario = bed.scenarios().get(name).await.unwrap();
        assert_eq!(scenario.spec.camera_url, shown);
        let secret = bed.secrets().get(&format!("{name}-camera")).await.unwrap();
        let data = secret.data.clone().unwrap();
        assert_eq!(String::from_utf8_lossy(&data["CAMERA_URL"].0), url);
        let owner = &secret.owner_references()[0];
        assert_eq!(Some(owner.uid.as_str()), scenario.metadata.uid.as_deref());
    }
    let again = run();
    assert!(
        again.contains("0 Scenario(s) migrated"),
        "idempotent: {again}"
    );
}

#[test]
fn camera_policy_values_become_the_controllers_settings() {
    let deployment = rendered(
        "Deployment",
        &[
            "cameraPolicy.allowCidrs={192.168.10.0/24,fd12::/48}",
            "cameraPolicy.denyHosts={*.office.example.com}",
        ],
    );
    let env: std::collections::BTreeMap<String, String> =
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect();
    assert_eq!(env["CAMERA_ALLOW_CIDRS"], "192.168.10.0/24,fd12::/48");
    assert_eq!(env["CAMERA_DENY_HOSTS"], "*.office.example.com");
    assert_eq!(env["CAMERA_ALLOW_LOOPBACK"], "false");
    assert!(
        !env.contains_key("CAMERA_DENY_CIDRS"),
        "empty lists are left out"
    );
    // The controller reads them as they are rendered.
    use vap_runner::host_policy::{Cidr, HostPattern, List};
    assert_eq!(
        env["CAMERA_ALLOW_CIDRS"]
            .parse::<List<Cidr>>()
            .unwrap()
            .0
            .len(),
        2
    );
    assert!(
        env["CAMERA_DENY_HOSTS"]
            .parse::<List<HostPattern>>()
            .is_ok()
    );
}

// ------------------------------------------------ the cluster's own addresses

/// The address of node `kwok-node-0` (the bed's fake node) and its Service
/// `kubernetes`'s ClusterIP.
async fn cluster_of_the_bed(client: &Client) -> (String, String) {
    use k8s_openapi::api::core::v1::{Node, Service};
    let node = Api::<Node>::all(client.clone())
        .get("kwok-node-0")
        .await
        .expect("the bed's node");
    let node_ip = node
        .status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .expect("the node's InternalIP")
        .address;
    let service = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .expect("the kubernetes Service");
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip).expect("ClusterIP");
    (node_ip, cluster_ip)
}

/// The API server's address in the EndpointSlice `kubernetes` (the bed's
/// API server keeps none, since it listens on loopback: this one stands in
/// for a cluster's).
const API_SERVER_ENDPOINT: (&str, u16) = ("192.0.2.10", 6443);

async fn give_the_api_server_an_endpoint(client: &Client) {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Patch, PatchParams};
    let (addr, port) = API_SERVER_ENDPOINT;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {
            "kubernetes.io/service-name": "kubernetes",
            "endpointslice.kubernetes.io/managed-by": "vap-runner-tests"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [addr], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}]
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .patch(
            "kubernetes",
            &PatchParams::apply("vap-runner-tests").force(),
            &Patch::Apply(&slice),
        )
        .await
        .expect("the EndpointSlice kubernetes");
}

/// Removes the stand-in EndpointSlice, so the bed is left as it was found.
async fn take_the_api_server_endpoint_back(client: &Client) {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .delete("kubernetes", &Default::default())
        .await
        .expect("delete the stand-in EndpointSlice kubernetes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_the_clusters_own_addresses_but_not_cameras_on_a_node() {
    let bed = Bed::new("sec-cluster").await;
    give_the_api_server_an_endpoint(&bed.client).await;
    let (node_ip, cluster_ip) = cluster_of_the_bed(&bed.client).await;
    // The bed's node has a loopback address: loopback is allowed, so only
    // the cluster rules decide.
    let controller = bed.start_controller(&[("CAMERA_ALLOW_LOOPBACK", "true")]);
    let (api_addr, api_port) = API_SERVER_ENDPOINT;
    let refused = [
        (
            format!("rtsp://{cluster_ip}:8554/stream"),
            "`kubernetes` Service",
        ),
        (
            format!("https://{cluster_ip}/api/v1/secrets"),
            "`kubernetes` Service",
        ),
        (
            format!("https://{api_addr}:{api_port}/api/v1/secrets"),
            "endpoint of the Kubernetes API server",
        ),
        (
            format!("http://{node_ip}:10250/pods"),
            "kubelet port of a cluster node",
        ),
        (
            format!("http://{node_ip}:10255/pods"),
            "kubelet port of a cluster node",
        ),
    ];
    for (camera, _) in &refused {
        bed.deploy(&uuid(), camera).await;
    }
    // A camera on the node's address at another port, and one on the API
    // server's address at another port, are cameras like any other.
    let on_node = uuid();
    bed.deploy(&on_node, &format!("rtsp://{node_ip}:8554/stream"))
        .await;
    let beside_api = uuid();
    bed.deploy(&beside_api, &format!("rtsp://{api_addr}:554/stream"))
        .await;

    let dlq = bed.read_topic(&bed.dlq, refused.len()).await;
    for (camera, words) in &refused {
        let letter = dlq
            .iter()
            .find(|r| String::from_utf8_lossy(&r.payload).contains(&format!("\"{camera}\"")))
            .unwrap_or_else(|| panic!("{camera} was not refused\n{}", controller.log_tail()));
        assert_eq!(letter.header("reason"), "camera_url", "{camera}");
        let error = letter.header("error");
        assert!(
            error.contains("camera host policy") && error.contains(words),
            "{camera}: {error}"
        );
    }
    for scenario in [&on_node, &beside_api] {
        bed.wait_phase(scenario, Phase::Running).await;
    }
    // Its worker refuses the same addresses: the learned list and its own
    // node's address reach the Pod.
    let pod = bed
        .pods()
        .get(&vap_runner::controller::names::pod_name(&on_node))
        .await
        .expect("the worker Pod");
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    let learned = env
        .iter()
        .find(|e| e.name == "CAMERA_CLUSTER_ADDRESSES")
        .and_then(|e| e.value.clone())
        .expect("CAMERA_CLUSTER_ADDRESSES");
    for entry in [
        format!("service={cluster_ip}"),
        format!("apiserver={api_addr}:{api_port}"),
        format!("kubelet={node_ip}:10250"),
    ] {
        assert!(learned.split(',').any(|e| e == entry), "{entry}: {learned}");
    }
    let node = env.iter().find(|e| e.name == "NODE_IP").expect("NODE_IP");
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("status.hostIP")
    );
    assert!(controller.metric("vap_controller_cluster_addresses").await >= 4.0);
    take_the_api_server_endpoint_back(&bed.client).await;
}

#[test]
fn the_worker_refuses_its_pods_cluster_addresses() {
    for (camera, extra, expected) in [
        (
            "rtsp://10.96.0.1:8554/a",
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            "`kubernetes` Service",
        ),
        (
            "http://127.0.0.1:10250/pods",
            ("NODE_IP", "127.0.0.1"),
            "kubelet port of a cluster node",
        ),
        (
            "https://192.0.2.10:6443/api",
            ("CAMERA_CLUSTER_ADDRESSES", "apiserver=192.0.2.10:6443"),
            "endpoint of the Kubernetes API server",
        ),
    ] {
        let mut cmd = common::worker("550e8400-e29b-41d4-a716-446655440000", camera);
        cmd.args(["--sink", "stdout"])
            .env("CAMERA_ALLOW_LOOPBACK", "true")
            .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
            .env(extra.0, extra.1);
        let out = cmd.output().expect("run the worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{camera} was opened:\n{stderr}");
        assert!(stderr.contains(expected), "{camera}:\n{stderr}");
    }
}
