//! The test bed's Kubernetes control plane is real: a Pod created through the
//! kube-apiserver is bound by kube-scheduler to the kwok Node and reaches
//! Running; deleting its namespace removes it. Each test's namespace is
//! deleted when the test ends, failed or not.

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
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
