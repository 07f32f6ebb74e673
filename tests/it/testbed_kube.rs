//! The test bed's Kubernetes control plane is real: a Pod created through the
//! kube-apiserver is bound by kube-scheduler to the kwok Node and reaches
//! Running; deleting its namespace removes it. The ServiceAccount admission
//! plugin is on, as in a real cluster. Each test's namespace is deleted when
//! the test ends, failed or not.

use crate::common;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn pod_reaches_running_on_the_fake_node() {
    let client = common::kube_client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node_list = nodes.list(&Default::default()).await.expect("list nodes");
    assert!(
        !node_list.items.is_empty(),
        "no Node in the test bed: kwok's fake Node is missing; {}",
        common::TESTBED_HINT
    );

    let ns = common::TempNamespace::create(&client, "testbed").await;
    let ns_name = ns.name.clone();
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe"},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "probe", "image": "registry.invalid/probe:1"}]
        }
    }))
    .unwrap();
    // The ServiceAccount plugin itself waits a moment for a new
    // namespace's "default" ServiceAccount.
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let node = common::wait_for("the Pod to reach Running", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("probe").await.ok()?;
            let phase = pod.status.as_ref()?.phase.clone()?;
            (phase == "Running").then(|| pod.spec.as_ref()?.node_name.clone())?
        }
    })
    .await;
    assert!(
        node_list
            .items
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(node.as_str())),
        "Pod ran on {node}, which is not a test bed Node"
    );

    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .expect("delete namespace");
    common::wait_for("the namespace to be gone", Duration::from_secs(90), || {
        let namespaces = namespaces.clone();
        let ns_name = ns_name.clone();
        async move {
            match namespaces.get_opt(&ns_name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

/// A Pod named `name` under ServiceAccount `account` (none: the namespace's
/// default) that opts out of a token when `automount` is `Some(false)`.
fn pod(name: &str, account: Option<&str>, automount: Option<bool>) -> Pod {
    let mut spec = json!({
        "containers": [{"name": "probe", "image": "registry.invalid/probe:1"}]
    });
    if let Some(account) = account {
        spec["serviceAccountName"] = json!(account);
    }
    if let Some(automount) = automount {
        spec["automountServiceAccountToken"] = json!(automount);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

#[tokio::test]
async fn service_accounts_are_required_and_tokens_mounted_unless_opted_out() {
    let client = common::kube_client().await;
    let ns = common::TempNamespace::create(&client, "testbed-sa").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let create = PostParams::default();

    // kube-controller-manager gives every namespace its "default" account.
    common::wait_for(
        "kube-controller-manager to create the namespace's \"default\" ServiceAccount",
        Duration::from_secs(30),
        || {
            let accounts = accounts.clone();
            async move { accounts.get_opt("default").await.ok().flatten() }
        },
    )
    .await;

    // A Pod naming a ServiceAccount that does not exist is refused, even
    // when it wants no token; once the account exists it is admitted.
    let early = pod("early", Some("probe"), Some(false));
    match pods.create(&create, &early).await {
        Err(kube::Error::Api(e)) => assert!(
            e.code == 403 && e.message.contains("service account"),
            "a Pod whose ServiceAccount is missing is refused for that reason, not: {e:?}"
        ),
        Ok(_) => panic!(
            "a Pod naming a missing ServiceAccount was admitted: the ServiceAccount admission plugin is off"
        ),
        Err(e) => panic!("create Pod early: {e}"),
    }
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "probe"}})).unwrap();
    accounts
        .create(&create, &account)
        .await
        .expect("create ServiceAccount probe");
    let admitted = pods
        .create(&create, &early)
        .await
        .expect("the Pod is admitted once its ServiceAccount exists");
    assert!(
        common::service_account_tokens(&admitted).is_empty(),
        "a Pod that opts out got a token: {:?}",
        common::service_account_tokens(&admitted)
    );

    // A Pod that does not opt out runs as "default" with a token mounted.
    let mounted = pods
        .create(&create, &pod("mounted", None, None))
        .await
        .expect("create Pod mounted");
    let spec = mounted.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    let tokens = common::service_account_tokens(&mounted);
    assert!(
        tokens
            .iter()
            .any(|t| t.starts_with("volume kube-api-access-"))
            && tokens
                .iter()
                .any(|t| t.starts_with("container probe mounts")),
        "a Pod that does not opt out has no token volume and mount: {tokens:?}"
    );

    // A ServiceAccount that opts out keeps the token from its Pods; a Pod
    // that opts in explicitly overrides it.
    let quiet: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": "quiet"},
        "automountServiceAccountToken": false
    }))
    .unwrap();
    accounts
        .create(&create, &quiet)
        .await
        .expect("create ServiceAccount quiet");
    let under_quiet = pods
        .create(&create, &pod("under-quiet", Some("quiet"), None))
        .await
        .expect("create Pod under-quiet");
    assert!(
        common::service_account_tokens(&under_quiet).is_empty(),
        "the ServiceAccount opts out, yet its Pod got a token: {:?}",
        common::service_account_tokens(&under_quiet)
    );
    let opted_in = pods
        .create(&create, &pod("opted-in", Some("quiet"), Some(true)))
        .await
        .expect("create Pod opted-in");
    assert!(
        !common::service_account_tokens(&opted_in).is_empty(),
        "a Pod that opts in got no token"
    );
}
