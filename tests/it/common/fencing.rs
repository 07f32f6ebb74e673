//! Fenced writes on the test bed: the chart's fencing policy installed for a
//! bed's controller identity, and a TCP relay in front of the kube-apiserver
//! that holds what a controller sends, as a partitioned network would.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::controller::{Bed, Identity, remove_admission_policy};
use super::wait_for;
use vap_runner::controller::fencing::{ANNOTATION_LEADER, REFUSAL_MARKER};

/// The runner name (and label) the bed's controllers run under by default.
pub const RUNNER: &str = "vap-runner";

/// The chart's fencing policy and binding (`templates/fencing.yaml`, as
/// `helm template` renders it) for runner [`RUNNER`] in a bed's namespace and
/// a controller running as an [`Identity`]; removed when dropped.
pub struct Fencing {
    pub policy: ValidatingAdmissionPolicy,
    pub binding: ValidatingAdmissionPolicyBinding,
}

/// A kube client acting as `identity` (through its kubeconfig).
pub async fn client_as(kubeconfig: &std::path::Path) -> Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig"),
        &Default::default(),
    )
    .await
    .expect("kube config");
    Client::try_from(config).expect("kube client")
}

impl Fencing {
    /// The policy objects the chart renders for `identity` in `namespace`.
    pub fn rendered(namespace: &str, identity: &Identity) -> Fencing {
        let account = identity.user.rsplit(':').next().expect("account name");
        let account = format!("controller.serviceAccount.name={account}");
        let objects = super::chart_objects(&[
            "--namespace",
            namespace,
            "--set",
            &format!("fullnameOverride={RUNNER}"),
            "--set",
            &account,
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
            "--show-only",
            "templates/fencing.yaml",
        ]);
        let of = |kind: &str| {
            objects
                .iter()
                .find(|o| o["kind"] == kind)
                .unwrap_or_else(|| panic!("the chart renders no {kind} for fencing"))
                .clone()
        };
        Fencing {
            policy: serde_json::from_value(of("ValidatingAdmissionPolicy")).unwrap(),
            binding: serde_json::from_value(of("ValidatingAdmissionPolicyBinding")).unwrap(),
        }
    }

    /// Installs the policy for the controller of `bed` running as
    /// `identity`, and waits until it acts: a Secret of the runner stamped
    /// by nobody is refused to `identity`.
    pub async fn install(bed: &Bed, identity: &Identity) -> Fencing {
        let fencing = Fencing::rendered(&bed.namespace, identity);
        Api::<ValidatingAdmissionPolicy>::all(bed.client.clone())
            .create(&PostParams::default(), &fencing.policy)
            .await
            .expect("create the fencing policy");
        Api::<ValidatingAdmissionPolicyBinding>::all(bed.client.clone())
            .create(&PostParams::default(), &fencing.binding)
            .await
            .expect("create the fencing policy binding");
        let secrets: Api<Secret> =
            Api::namespaced(client_as(&identity.kubeconfig).await, &bed.namespace);
        let probe = stamped_secret("fencing-probe", "nobody/0");
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let name = fencing.policy.metadata.name.clone().unwrap_or_default();
        wait_for(
            "the fencing policy to act",
            Duration::from_secs(60),
            || async {
                let refused = secrets.create(&dry, &probe).await.err()?;
                refused.to_string().contains(&name).then_some(())
            },
        )
        .await;
        fencing
    }

    /// Whether `e` is the policy's refusal (its words: [`REFUSAL_MARKER`]).
    pub fn refused(e: &kube::Error) -> bool {
        e.to_string().contains(REFUSAL_MARKER)
    }
}

/// A Secret of runner [`RUNNER`] carrying the stamp `stamp`.
pub fn stamped_secret(name: &str, stamp: &str) -> Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "labels": {"runner.vap.io/runner": RUNNER},
            "annotations": {ANNOTATION_LEADER: stamp}
        },
        "stringData": {"x": "y"}
    }))
    .unwrap()
}

/// The stamp annotation of an object, if any.
pub fn stamp_of(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(ANNOTATION_LEADER)
        .map(String::as_str)
}

impl Drop for Fencing {
    fn drop(&mut self) {
        remove_admission_policy(self.policy.metadata.name.clone().unwrap_or_default());
    }
}

/// A TCP relay to the kube-apiserver of the bed. While held, nothing a
/// client sends through it goes on (it waits in the relay, as in a
/// partitioned network); answers still come back. Released, it all goes on.
pub struct HoldingProxy {
    held: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    upstream: String,
}

impl HoldingProxy {
    /// Starts a relay to the server of the bed's admin kubeconfig.
    pub async fn start() -> HoldingProxy {
        let (_, admin) = super::kubeconfig_env();
        let config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&admin).expect("read KUBECONFIG"))
                .expect("KUBECONFIG YAML");
        let server = config["clusters"][0]["cluster"]["server"]
            .as_str()
            .expect("a server in KUBECONFIG")
            .to_string();
        let upstream = server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(watch::channel(false).0);
        let task = tokio::spawn({
            let (held, upstream) = (held.clone(), upstream.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let held = held.subscribe();
                    tokio::spawn(relay(client_read, server_write, move |_| {
                        Some(held.clone())
                    }));
                    tokio::spawn(relay(server_read, client_write, |_| None));
                }
            }
        });
        HoldingProxy {
            held,
            task,
            dir: tempfile::tempdir().expect("kubeconfig dir"),
            addr,
            upstream: server,
        }
    }

    /// A copy of `kubeconfig` whose server is this relay (the same TLS
    /// names: the relay only passes bytes on).
    pub fn kubeconfig(&self, kubeconfig: &std::path::Path) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig).expect("read kubeconfig");
        let relayed = format!("https://{}", self.addr);
        let path = self.dir.path().join("relayed.kubeconfig");
        std::fs::write(&path, text.replace(&self.upstream, &relayed)).unwrap();
        path
    }

    /// Holds what clients send from now on.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Sends on what was held, and everything after.
    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`. `gate` sees each chunk read first; when it returns
/// a hold switch, the chunk waits until that switch is off.
pub async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: impl FnMut(&[u8]) -> Option<watch::Receiver<bool>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(mut held) = gate(&buf[..n])
            && held.wait_for(|h| !*h).await.is_err()
        {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
