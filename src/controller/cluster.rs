//! What the camera host policy learns of the cluster: the `kubernetes`
//! Service's ClusterIP (every port), the API server's endpoints (their
//! ports) and every node's addresses on the kubelet's ports (10250, 10255
//! and the port the node reports). None of them is ever a camera, whatever
//! the settings; a camera on a node's address at another port stays fine.
//!
//! Folding API objects into addresses is pure ([`service_addresses`],
//! [`slice_addresses`], [`endpoints_addresses`], [`node_addresses`],
//! [`Learned`]); [`Learner`] reads the objects with the controller's client,
//! at start and then every `CLUSTER_REFRESH_SECS`. A read that fails (RBAC
//! may forbid listing nodes) is logged once as a warning, counted in
//! `vap_controller_cluster_learning_failures_total`, and what was learned
//! before from that source is kept.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::watch;

use super::metrics::{ControllerMetrics, SourceLabels};
use crate::host_policy::{ClusterAddress, ClusterRole};

/// The namespace and name of the API server's Service and endpoints.
const NAMESPACE: &str = "default";
const NAME: &str = "kubernetes";

/// Node address types that are addresses (a `Hostname` counts when it is
/// an IP address, as on some clouds and kind).
const NODE_ADDRESS_TYPES: &[&str] = &["InternalIP", "ExternalIP", "Hostname"];

fn ip(raw: &str) -> Option<IpAddr> {
    raw.trim().parse().ok()
}

fn port(raw: Option<i32>) -> Option<u16> {
    raw.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)
}

/// The Service's ClusterIPs, on every port.
pub fn service_addresses(service: &Service) -> Vec<ClusterAddress> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    spec.cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .filter_map(|raw| ip(raw))
        .map(|addr| ClusterAddress::new(ClusterRole::Service, addr, None))
        .collect()
}

/// Each address of an EndpointSlice on each of its ports (every port when
/// it lists none).
pub fn slice_addresses(slice: &EndpointSlice) -> Vec<ClusterAddress> {
    let ports: Vec<Option<u16>> = match slice.ports.as_deref() {
        Some(ports) if !ports.is_empty() => ports.iter().map(|p| port(p.port)).collect(),
        _ => vec![None],
    };
    slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter())
        .filter_map(|raw| ip(raw))
        .flat_map(|addr| {
            ports
                .iter()
                .map(move |p| ClusterAddress::new(ClusterRole::ApiServer, addr, *p))
        })
        .collect()
}

/// Each address of an Endpoints object (ready or not) on each port of its
/// subset (every port when it lists none).
pub fn endpoints_addresses(endpoints: &Endpoints) -> Vec<ClusterAddress> {
    let mut found = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports: Vec<Option<u16>> = match subset.ports.as_deref() {
            Some(ports) if !ports.is_empty() => ports.iter().map(|p| port(Some(p.port))).collect(),
            _ => vec![None],
        };
        let addrs = subset
            .addresses
            .iter()
            .flatten()
            .chain(subset.not_ready_addresses.iter().flatten())
            .filter_map(|a| ip(&a.ip));
        for addr in addrs {
            for p in &ports {
                found.push(ClusterAddress::new(ClusterRole::ApiServer, addr, *p));
            }
        }
    }
    found
}

/// A node's addresses on the kubelet's ports and on the port its kubelet
/// reports (`status.daemonEndpoints.kubeletEndpoint.Port`).
pub fn node_addresses(node: &Node) -> Vec<ClusterAddress> {
    let Some(status) = &node.status else {
        return Vec::new();
    };
    let reported = port(
        status
            .daemon_endpoints
            .as_ref()
            .and_then(|d| d.kubelet_endpoint.as_ref())
            .map(|k| k.port),
    );
    status
        .addresses
        .iter()
        .flatten()
        .filter(|a| NODE_ADDRESS_TYPES.contains(&a.type_.as_str()))
        .filter_map(|a| ip(&a.address))
        .flat_map(|addr| ClusterAddress::kubelet(addr, reported))
        .collect()
}

/// What each source last gave; `None` until it was read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    pub service: Option<Vec<ClusterAddress>>,
    pub apiserver: Option<Vec<ClusterAddress>>,
    pub nodes: Option<Vec<ClusterAddress>>,
}

impl Learned {
    /// Every address learned, sorted, each once.
    pub fn addresses(&self) -> Vec<ClusterAddress> {
        let all: BTreeSet<ClusterAddress> = [&self.service, &self.apiserver, &self.nodes]
            .into_iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        all.into_iter().collect()
    }
}

/// One source of cluster addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Service,
    ApiServer,
    Nodes,
}

impl Source {
    const ALL: [Source; 3] = [Source::Service, Source::ApiServer, Source::Nodes];

    fn label(self) -> &'static str {
        match self {
            Source::Service => "service",
            Source::ApiServer => "apiserver",
            Source::Nodes => "nodes",
        }
    }

    /// What reading it needs, for the warning.
    fn needs(self) -> &'static str {
        match self {
            Source::Service => "get on the Service `kubernetes` in `default`",
            Source::ApiServer => {
                "get on the EndpointSlice (or Endpoints) `kubernetes` in `default`"
            }
            Source::Nodes => "list on nodes (cluster-wide)",
        }
    }
}

/// Reads the cluster's addresses with the controller's client.
pub struct Learner {
    client: Client,
    learned: Learned,
    /// Sources whose failure was already logged as a warning.
    warned: Vec<bool>,
    metrics: Arc<ControllerMetrics>,
}

impl Learner {
    pub fn new(client: Client, metrics: Arc<ControllerMetrics>) -> Learner {
        Learner {
            client,
            learned: Learned::default(),
            warned: vec![false; Source::ALL.len()],
            metrics,
        }
    }

    /// Reads every source once; a failed source keeps what it gave before.
    pub async fn learn(&mut self) -> Vec<ClusterAddress> {
        for (i, source) in Source::ALL.into_iter().enumerate() {
            match self.read(source).await {
                Ok(found) => {
                    if std::mem::take(&mut self.warned[i]) {
                        tracing::info!(
                            source = source.label(),
                            "the cluster's addresses can be read again"
                        );
                    }
                    let slot = match source {
                        Source::Service => &mut self.learned.service,
                        Source::ApiServer => &mut self.learned.apiserver,
                        Source::Nodes => &mut self.learned.nodes,
                    };
                    *slot = Some(found);
                }
                Err(e) => {
                    self.metrics
                        .cluster_learning_failures
                        .get_or_create(&SourceLabels {
                            source: source.label(),
                        })
                        .inc();
                    if std::mem::replace(&mut self.warned[i], true) {
                        tracing::debug!(source = source.label(), error = %e, "cannot read the cluster's addresses");
                    } else {
                        tracing::warn!(
                            source = source.label(),
                            error = %e,
                            "cannot read the cluster's addresses for the camera host policy; keeping what is known. The controller needs {} (the chart grants it unless cameraPolicy.learnCluster is false)",
                            source.needs()
                        );
                    }
                }
            }
        }
        let addresses = self.learned.addresses();
        self.metrics
            .cluster_addresses
            .set(i64::try_from(addresses.len()).unwrap_or(i64::MAX));
        addresses
    }

    async fn read(&self, source: Source) -> Result<Vec<ClusterAddress>, kube::Error> {
        match source {
            Source::Service => {
                let services: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
                Ok(services
                    .get_opt(NAME)
                    .await?
                    .map(|s| service_addresses(&s))
                    .unwrap_or_default())
            }
            Source::ApiServer => {
                let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), NAMESPACE);
                if let Some(slice) = slices.get_opt(NAME).await? {
                    return Ok(slice_addresses(&slice));
                }
                let endpoints: Api<Endpoints> = Api::namespaced(self.client.clone(), NAMESPACE);
                Ok(endpoints
                    .get_opt(NAME)
                    .await?
                    .map(|e| endpoints_addresses(&e))
                    .unwrap_or_default())
            }
            Source::Nodes => {
                let nodes: Api<Node> = Api::all(self.client.clone());
                let mut found = Vec::new();
                let mut params = ListParams::default().limit(500);
                loop {
                    let page = nodes.list(&params).await?;
                    found.extend(page.items.iter().flat_map(node_addresses));
                    match page.metadata.continue_ {
                        Some(token) if !token.is_empty() => params = params.continue_token(&token),
                        _ => break,
                    }
                }
                Ok(found)
            }
        }
    }

    /// Learns once now, then every `every` in a task of its own; the
    /// receiver always holds the newest list.
    pub async fn start(
        mut self,
        every: Duration,
    ) -> (
        watch::Receiver<Vec<ClusterAddress>>,
        tokio::task::JoinHandle<()>,
    ) {
        let first = self.learn().await;
        log_learned(&first);
        let (tx, rx) = watch::channel(first);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let next = self.learn().await;
                tx.send_if_modified(|current| {
                    if *current == next {
                        return false;
                    }
                    log_learned(&next);
                    *current = next;
                    true
                });
            }
        });
        (rx, task)
    }
}

fn log_learned(addresses: &[ClusterAddress]) {
    let list = crate::host_policy::List(addresses.to_vec()).to_string();
    tracing::info!(
        count = addresses.len(),
        "camera host policy: cluster addresses refused as cameras: {list}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_policy::List;

    fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).unwrap()
    }

    fn text(addresses: &[ClusterAddress]) -> String {
        List(addresses.to_vec()).to_string()
    }

    #[test]
    fn the_kubernetes_service_counts_on_every_port() {
        let service: Service = from_json(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00:10:96::1"],
                     "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}
        }));
        let learned = Learned {
            service: Some(service_addresses(&service)),
            ..Default::default()
        };
        assert_eq!(
            text(&learned.addresses()),
            "service=10.96.0.1,service=fd00:10:96::1"
        );
        let headless: Service = from_json(serde_json::json!({"spec": {"clusterIP": "None"}}));
        assert!(service_addresses(&headless).is_empty());
    }

    #[test]
    fn api_server_endpoints_count_on_their_ports() {
        let slice: EndpointSlice = from_json(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["172.18.0.2"]}, {"addresses": ["172.18.0.4"]}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]
        }));
        assert_eq!(
            text(&slice_addresses(&slice)),
            "apiserver=172.18.0.2:6443,apiserver=172.18.0.4:6443"
        );
        let endpoints: Endpoints = from_json(serde_json::json!({
            "subsets": [{"addresses": [{"ip": "172.18.0.2"}], "notReadyAddresses": [{"ip": "172.18.0.5"}],
                         "ports": [{"port": 6443}]}]
        }));
        assert_eq!(
            text(&endpoints_addresses(&endpoints)),
            "apiserver=172.18.0.2:6443,apiserver=172.18.0.5:6443"
        );
    }

    #[test]
    fn nodes_count_on_the_kubelet_ports_only() {
        let node: Node = from_json(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "172.18.0.3"},
                    {"type": "ExternalIP", "address": "203.0.113.7"},
                    {"type": "Hostname", "address": "node-a"},
                    {"type": "InternalDNS", "address": "10.1.1.1"}
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10260}}
            }
        }));
        let by_ip: Node = from_json(serde_json::json!({
            "status": {"addresses": [{"type": "Hostname", "address": "172.18.0.9"}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}
        }));
        let learned = Learned {
            nodes: Some([node, by_ip].iter().flat_map(node_addresses).collect()),
            ..Default::default()
        };
        assert_eq!(
            text(&learned.addresses()),
            "kubelet=172.18.0.3:10250,kubelet=172.18.0.3:10255,kubelet=172.18.0.3:10260,\
             kubelet=172.18.0.9:10250,kubelet=172.18.0.9:10255,\
             kubelet=203.0.113.7:10250,kubelet=203.0.113.7:10255,kubelet=203.0.113.7:10260"
        );
    }

    #[test]
    fn sources_fold_into_one_sorted_list_each_address_once() {
        let a = ClusterAddress::new(ClusterRole::Service, "10.96.0.1".parse().unwrap(), None);
        let learned = Learned {
            service: Some(vec![a, a]),
            apiserver: None,
            nodes: Some(ClusterAddress::kubelet("10.0.0.2".parse().unwrap(), None)),
        };
        assert_eq!(
            text(&learned.addresses()),
            "service=10.96.0.1,kubelet=10.0.0.2:10250,kubelet=10.0.0.2:10255"
        );
        assert!(Learned::default().addresses().is_empty());
    }
}
