//! Which hosts a camera URL may point at, so that a `to_deploy` cannot make a
//! worker fetch from the cloud metadata service, the Kubernetes API or other
//! places that are not cameras (server-side request forgery).
//!
//! The decision is a pure function of the host name, the addresses it
//! resolves to and the operator's settings ([`HostPolicy::check`]). It runs
//! at ingest and again in the worker, after the worker resolved the name
//! itself and before the capture backend opens anything.
//!
//! Always refused: cloud metadata names and addresses (169.254.169.254,
//! fd00:ec2::254, `metadata.google.internal`, ...), the Kubernetes API
//! server's names, and in Kubernetes the cluster's own addresses
//! ([`ClusterAddress`]): the `kubernetes` Service's ClusterIP on any port,
//! the API server's endpoints on their ports and every node's addresses on
//! the kubelet's ports — the controller learns them from the API, the
//! worker adds its own Pod's `KUBERNETES_SERVICE_HOST` and node address. The
//! check is port-aware ([`HostPolicy::check_port`]): a camera served on a
//! node's address at another port is fine. Refused unless
//! `CAMERA_ALLOW_CIDRS` names them: link-local, unspecified, multicast and
//! broadcast addresses, the cluster's Service range (`CAMERA_SERVICE_CIDRS`,
//! when given), and loopback when `CAMERA_ALLOW_LOOPBACK` is false (the
//! default in Kubernetes and for the deploys `runner local` reads from Kafka).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::OnceLock;

use url::Url;

/// An address range such as `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{raw:?} is not an address range; give a CIDR such as 10.20.0.0/16 or fd00::/8, or one address"
            )
        };
        let (addr, prefix) = match raw.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A host name pattern: `cam1.example.com` (that name) or
/// `*.cams.example.com` (any name below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(String);

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|rest| rest.ends_with('.')),
            None => host == self.0,
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let name = normalize_host(raw);
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        let valid = !bare.is_empty()
            && bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if valid {
            Ok(HostPattern(name))
        } else {
            Err(format!(
                "{raw:?} is not a host name pattern; give a name such as cam1.example.com or *.cams.example.com"
            ))
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A comma-separated list of `T` from one setting; empty means none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct List<T>(pub Vec<T>);

impl<T: FromStr<Err = String>> FromStr for List<T> {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(T::from_str)
            .collect::<Result<_, _>>()
            .map(List)
    }
}

impl<T: fmt::Display> fmt::Display for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&items.join(","))
    }
}

/// The kubelet's ports: its API (10250) and its read-only port (10255).
pub const KUBELET_PORTS: [u16; 2] = [10250, 10255];

/// What a cluster address is, for the words of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClusterRole {
    /// The ClusterIP of the `kubernetes` Service in `default`.
    Service,
    /// An endpoint of the Kubernetes API server.
    ApiServer,
    /// A node's address on a kubelet port.
    Kubelet,
    /// An address given without saying what it is.
    Cluster,
}

impl ClusterRole {
    fn label(self) -> Option<&'static str> {
        match self {
            ClusterRole::Service => Some("service"),
            ClusterRole::ApiServer => Some("apiserver"),
            ClusterRole::Kubelet => Some("kubelet"),
            ClusterRole::Cluster => None,
        }
    }
}

/// An address of the cluster itself that is never a camera: `addr` on
/// `port`, or on every port when `port` is `None`. Written (in
/// `CAMERA_CLUSTER_ADDRESSES`) as `[role=]ip`, `[role=]ip:port` or
/// `[role=][ipv6]:port`, the role one of `service`, `apiserver`, `kubelet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterAddress {
    pub role: ClusterRole,
    pub addr: IpAddr,
    pub port: Option<u16>,
}

impl ClusterAddress {
    pub fn new(role: ClusterRole, addr: IpAddr, port: Option<u16>) -> ClusterAddress {
        ClusterAddress {
            role,
            addr: addr.to_canonical(),
            port,
        }
    }

    /// `addr` on each kubelet port, and on `also` (a node's own kubelet port).
    pub fn kubelet(addr: IpAddr, also: Option<u16>) -> Vec<ClusterAddress> {
        let mut ports: Vec<u16> = KUBELET_PORTS.into_iter().chain(also).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
            .into_iter()
            .map(|p| ClusterAddress::new(ClusterRole::Kubelet, addr, Some(p)))
            .collect()
    }

    /// Whether a connection to `addr` on `port` (`None`: not known, so any)
    /// reaches this address.
    fn matches(&self, addr: IpAddr, port: Option<u16>) -> bool {
        let same = self.addr == addr || embedded_v4(addr) == Some(self.addr);
        let port_matches = match (self.port, port) {
            (Some(mine), Some(theirs)) => mine == theirs,
            _ => true,
        };
        same && port_matches
    }
}

impl FromStr for ClusterAddress {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{raw:?} is not a cluster address; give ip, ip:port or [ipv6]:port, optionally after service=, apiserver= or kubelet="
            )
        };
        let raw_trimmed = raw.trim();
        let (role, rest) = match raw_trimmed.split_once('=') {
            Some(("service", rest)) => (ClusterRole::Service, rest),
            Some(("apiserver", rest)) => (ClusterRole::ApiServer, rest),
            Some(("kubelet", rest)) => (ClusterRole::Kubelet, rest),
            Some(_) => return Err(bad()),
            None => (ClusterRole::Cluster, raw_trimmed),
        };
        if let Ok(sock) = rest.parse::<std::net::SocketAddr>() {
            return Ok(ClusterAddress::new(role, sock.ip(), Some(sock.port())));
        }
        let bare = rest
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(rest);
        let addr: IpAddr = bare.parse().map_err(|_| bad())?;
        Ok(ClusterAddress::new(role, addr, None))
    }
}

impl fmt::Display for ClusterAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(label) = self.role.label() {
            write!(f, "{label}=")?;
        }
        match self.port {
            Some(port) => write!(f, "{}", std::net::SocketAddr::new(self.addr, port)),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Cloud metadata endpoints: never a camera, whatever the settings.
const METADATA_ADDRESSES: &[Cidr] = &[
    Cidr::v4(169, 254, 169, 254, 32), // AWS, GCP, Azure, OpenStack, OCI, DigitalOcean
    Cidr::v4(169, 254, 170, 2, 32),   // AWS ECS task metadata
    Cidr::v4(169, 254, 170, 23, 32),  // AWS EKS Pod Identity
    Cidr::v4(100, 100, 100, 200, 32), // Alibaba Cloud
    Cidr::v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), // AWS IPv6
    Cidr::v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23], 128), // AWS EKS Pod Identity IPv6
];

/// The cloud metadata addresses, which no setting allows (the chart's
/// NetworkPolicy cuts the same list out of the camera ranges).
pub fn metadata_addresses() -> &'static [Cidr] {
    METADATA_ADDRESSES
}

/// Names of metadata services and of the Kubernetes API server.
const RESERVED_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.internal",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
];

/// Kinds of addresses refused unless `CAMERA_ALLOW_CIDRS` contains them.
const SPECIAL_ADDRESSES: &[(Cidr, &str)] = &[
    (Cidr::v4(169, 254, 0, 0, 16), "link-local"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (Cidr::v4(0, 0, 0, 0, 8), "unspecified"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (Cidr::v4(224, 0, 0, 0, 4), "multicast"),
    (Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
    (Cidr::v4(255, 255, 255, 255, 32), "broadcast"),
];

const LOOPBACK: &[Cidr] = &[
    Cidr::v4(127, 0, 0, 0, 8),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
];

/// Where the runner runs and who chose the camera, which decides the default
/// for loopback cameras.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Worker Pods: loopback is the Pod itself, never a camera.
    Kubernetes,
    /// `runner local` fed from Kafka: whoever may write `to_deploy` picks the
    /// camera, and loopback would let them reach this machine's own services.
    LocalIngest,
    /// The operator's own choice on this machine (`runner local`'s scenarios
    /// file, a worker run by hand): cameras on this machine are common.
    Local,
}

impl Mode {
    /// Kubernetes when the process runs in a Pod (the kubelet always sets
    /// `KUBERNETES_SERVICE_HOST`), local otherwise.
    pub fn detect() -> Mode {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            Mode::Kubernetes
        } else {
            Mode::Local
        }
    }
}

/// The operator's settings (see docs/security.md, "Camera host policy").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPolicy {
    pub allow_cidrs: Vec<Cidr>,
    pub deny_cidrs: Vec<Cidr>,
    pub allow_hosts: Vec<HostPattern>,
    pub deny_hosts: Vec<HostPattern>,
    pub allow_loopback: bool,
    /// The cluster's Service range (`CAMERA_SERVICE_CIDRS`): refused unless
    /// `allow_cidrs` contains the address (an in-cluster camera proxy).
    pub service_cidrs: Vec<Cidr>,
    /// The cluster's own addresses: refused whatever the settings.
    pub cluster: Vec<ClusterAddress>,
}

impl HostPolicy {
    /// The built-in rules only, with the mode's loopback default.
    pub fn defaults(mode: Mode) -> HostPolicy {
        HostPolicy {
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            allow_loopback: mode == Mode::Local,
            service_cidrs: Vec::new(),
            cluster: Vec::new(),
        }
    }

    /// This policy with the `learned` cluster addresses added to its own.
    pub fn with_cluster(&self, learned: &[ClusterAddress]) -> HostPolicy {
        let mut policy = self.clone();
        policy.cluster.extend_from_slice(learned);
        policy
    }

    /// Adds what a Pod knows of its cluster: the `kubernetes` Service's
    /// address (`KUBERNETES_SERVICE_HOST`, set in every Pod) on any port,
    /// and its node's address (`NODE_IP`, from the downward API) on the
    /// kubelet's ports. Values that are not addresses are left out.
    pub fn add_pod_addresses(&mut self, service_host: Option<&str>, node_ip: Option<&str>) {
        let ip = |v: Option<&str>| v.and_then(|v| normalize_host(v).parse::<IpAddr>().ok());
        if let Some(addr) = ip(service_host) {
            self.cluster
                .push(ClusterAddress::new(ClusterRole::Service, addr, None));
        }
        if let Some(addr) = ip(node_ip) {
            self.cluster.extend(ClusterAddress::kubelet(addr, None));
        }
    }

    /// Decides whether a camera on `host`, which resolves to `addrs`, may
    /// be read, on a port not known (so every cluster address counts,
    /// whatever its port). See [`HostPolicy::check_port`].
    pub fn check(&self, host: &str, addrs: &[IpAddr]) -> Result<(), HostRefusal> {
        self.check_port(host, None, addrs)
    }

    /// Decides whether a camera on `host` at `port` (`None`: not known),
    /// which resolves to `addrs`, may be read. An IP literal host is checked
    /// as its own address; an empty `addrs` checks the name only.
    pub fn check_port(
        &self,
        host: &str,
        port: Option<u16>,
        addrs: &[IpAddr],
    ) -> Result<(), HostRefusal> {
        let name = normalize_host(host);
        let refuse = |addr: Option<IpAddr>, rule: Rule| HostRefusal {
            host: name.clone(),
            addr,
            port,
            rule,
        };
        let literal: Vec<IpAddr>;
        let addrs = match name.parse::<IpAddr>() {
            Ok(ip) => {
                literal = vec![ip];
                &literal[..]
            }
            Err(_) => {
                if is_reserved_name(&name) {
                    return Err(refuse(None, Rule::ReservedName));
                }
                if let Some(p) = self.deny_hosts.iter().find(|p| p.matches(&name)) {
                    return Err(refuse(None, Rule::DeniedName(p.to_string())));
                }
                addrs
            }
        };
        let name_allowed = self.allow_hosts.iter().any(|p| p.matches(&name));
        let confined = !self.allow_cidrs.is_empty() || !self.allow_hosts.is_empty();
        for &addr in addrs {
            let addr = addr.to_canonical();
            let in_any = |list: &[Cidr]| {
                list.iter()
                    .find(|c| {
                        c.contains(addr) || embedded_v4(addr).is_some_and(|v4| c.contains(v4))
                    })
                    .copied()
            };
            if in_any(METADATA_ADDRESSES).is_some() {
                return Err(refuse(Some(addr), Rule::Metadata));
            }
            if let Some(entry) = self.cluster.iter().find(|c| c.matches(addr, port)) {
                return Err(refuse(Some(addr), Rule::Cluster(*entry)));
            }
            if let Some(cidr) = in_any(&self.deny_cidrs) {
                return Err(refuse(Some(addr), Rule::DeniedCidr(cidr)));
            }
            let explicitly_allowed = in_any(&self.allow_cidrs).is_some();
            if explicitly_allowed {
                continue;
            }
            if let Some((_, kind)) = SPECIAL_ADDRESSES.iter().find(|(c, _)| {
                c.contains(addr) || embedded_v4(addr).is_some_and(|v4| c.contains(v4))
            }) {
                return Err(refuse(Some(addr), Rule::Special(kind)));
            }
            if let Some(cidr) = in_any(&self.service_cidrs) {
                return Err(refuse(Some(addr), Rule::ServiceCidr(cidr)));
            }
            if !self.allow_loopback && in_any(LOOPBACK).is_some() {
                return Err(refuse(Some(addr), Rule::Loopback));
            }
            if confined && !name_allowed {
                return Err(refuse(Some(addr), Rule::NotAllowed));
            }
        }
        Ok(())
    }

    /// The policy as worker environment variables, so that a worker started
    /// by a supervisor applies exactly the supervisor's rules.
    pub fn worker_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "CAMERA_ALLOW_CIDRS",
                List(self.allow_cidrs.clone()).to_string(),
            ),
            (
                "CAMERA_DENY_CIDRS",
                List(self.deny_cidrs.clone()).to_string(),
            ),
            (
                "CAMERA_ALLOW_HOSTS",
                List(self.allow_hosts.clone()).to_string(),
            ),
            (
                "CAMERA_DENY_HOSTS",
                List(self.deny_hosts.clone()).to_string(),
            ),
            ("CAMERA_ALLOW_LOOPBACK", self.allow_loopback.to_string()),
            (
                "CAMERA_SERVICE_CIDRS",
                List(self.service_cidrs.clone()).to_string(),
            ),
            (
                "CAMERA_CLUSTER_ADDRESSES",
                List(self.cluster.clone()).to_string(),
            ),
        ]
    }

    /// Resolves the host of a network camera URL with the system resolver
    /// and checks the name and every address. Blocking; for the worker.
    pub fn check_url_resolving(&self, url: &Url) -> Result<(), HostRefusal> {
        let Some(host) = url.host_str() else {
            return Ok(());
        };
        let name = normalize_host(host);
        let port = url_port(url);
        if name.parse::<IpAddr>().is_ok() {
            return self.check_port(&name, port, &[]);
        }
        self.check_port(&name, port, &[])?;
        let addrs: Vec<IpAddr> =
            std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port.unwrap_or(554)))
                .map_err(|e| HostRefusal {
                    host: name.clone(),
                    addr: None,
                    port,
                    rule: Rule::Unresolvable(e.to_string()),
                })?
                .map(|a| a.ip())
                .collect();
        self.check_port(&name, port, &addrs)
    }
}

/// The port a camera URL connects to: its own, or its scheme's default
/// (`None` for a scheme without one, which every port rule then matches).
pub fn url_port(url: &Url) -> Option<u16> {
    url.port_or_known_default().or(match url.scheme() {
        "rtsp" => Some(554),
        "rtsps" => Some(322),
        _ => None,
    })
}

/// Checks a camera URL at ingest: the name, and every address it resolves to
/// from here if it resolves within `timeout`. A name the supervisor cannot
/// resolve (cameras on a network only workers reach) passes here; the
/// worker checks it again once it has addresses.
pub async fn check_url_at_ingest(
    policy: &HostPolicy,
    url: &Url,
    timeout: std::time::Duration,
) -> Result<(), HostRefusal> {
    let Some(host) = url.host_str() else {
        return Ok(());
    };
    let name = normalize_host(host);
    let port = url_port(url);
    policy.check_port(&name, port, &[])?;
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let lookup = tokio::net::lookup_host((name.as_str(), port.unwrap_or(554)));
    match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(found)) => {
            let addrs: Vec<IpAddr> = found.map(|a| a.ip()).collect();
            policy.check_port(&name, port, &addrs)
        }
        _ => Ok(()),
    }
}

/// The policy this process applies; set once by the worker at start-up.
static INSTALLED: OnceLock<HostPolicy> = OnceLock::new();

/// Makes `policy` the one [`recheck`] applies. Later calls change nothing.
pub fn install(policy: HostPolicy) {
    let _ = INSTALLED.set(policy);
}

/// Checks a camera URL again right before it is opened (the name may
/// resolve to something else than at start-up), with the installed policy
/// or, if none was installed, the built-in rules for this mode. The error
/// text names the host and the rule, never credentials.
pub fn recheck(url: &Url) -> Result<(), String> {
    let defaults;
    let policy = match INSTALLED.get() {
        Some(policy) => policy,
        None => {
            defaults = HostPolicy::defaults(Mode::detect());
            &defaults
        }
    };
    policy.check_url_resolving(url).map_err(|e| e.to_string())
}

/// Why a host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct HostRefusal {
    pub host: String,
    pub addr: Option<IpAddr>,
    /// The port the camera was to be read on, if known.
    pub port: Option<u16>,
    pub rule: Rule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    ReservedName,
    DeniedName(String),
    Metadata,
    DeniedCidr(Cidr),
    Special(&'static str),
    Loopback,
    NotAllowed,
    Unresolvable(String),
    /// One of the cluster's own addresses (the entry that matched).
    Cluster(ClusterAddress),
    /// Inside `CAMERA_SERVICE_CIDRS` and not allowed by `CAMERA_ALLOW_CIDRS`.
    ServiceCidr(Cidr),
}

impl HostRefusal {
    /// True when the refusal may go away by itself (a name that does not
    /// resolve yet); every other refusal holds until the settings change.
    pub fn is_transient(&self) -> bool {
        matches!(self.rule, Rule::Unresolvable(_))
    }

    fn describe(&self) -> String {
        let host = &self.host;
        let at = match self.addr {
            Some(addr) if addr.to_string() != *host => format!("host {host} resolves to {addr}"),
            _ => format!("host {host}"),
        };
        match &self.rule {
            Rule::ReservedName => format!(
                "host {host} is a cloud metadata or Kubernetes API server name, which is never a camera"
            ),
            Rule::DeniedName(p) => format!("host {host} matches CAMERA_DENY_HOSTS entry {p}"),
            Rule::Metadata => format!("{at}, a cloud metadata address, which is never a camera"),
            Rule::DeniedCidr(c) => format!("{at}, inside CAMERA_DENY_CIDRS entry {c}"),
            Rule::Special(kind) => format!(
                "{at}, a {kind} address; such addresses are refused unless CAMERA_ALLOW_CIDRS contains them"
            ),
            Rule::Loopback => format!(
                "{at}, a loopback address; set CAMERA_ALLOW_LOOPBACK=true to allow cameras on the runner's own machine"
            ),
            Rule::NotAllowed => format!(
                "{at}, outside CAMERA_ALLOW_CIDRS and CAMERA_ALLOW_HOSTS; add it there or use a camera inside them"
            ),
            Rule::Unresolvable(reason) => format!("host {host} cannot be resolved: {reason}"),
            Rule::Cluster(entry) => {
                let on = match (entry.port, self.port) {
                    (Some(p), _) | (None, Some(p)) => format!("{at}, port {p}"),
                    (None, None) => at,
                };
                match entry.role {
                    ClusterRole::Service => format!(
                        "{on}: the ClusterIP of the `kubernetes` Service (the Kubernetes API), which is never a camera"
                    ),
                    ClusterRole::ApiServer => format!(
                        "{on}: an endpoint of the Kubernetes API server, which is never a camera"
                    ),
                    ClusterRole::Kubelet => format!(
                        "{on}: a kubelet port of a cluster node, which is never a camera; a camera on a node's address must use another port"
                    ),
                    ClusterRole::Cluster => format!(
                        "{on}: an address of the cluster itself ({entry} in CAMERA_CLUSTER_ADDRESSES), which is never a camera"
                    ),
                }
            }
            Rule::ServiceCidr(c) => format!(
                "{at}, inside the cluster's Service range {c} (CAMERA_SERVICE_CIDRS); to allow an in-cluster camera proxy, add its Service address to CAMERA_ALLOW_CIDRS"
            ),
        }
    }
}

/// Lower case, without brackets and without a trailing dot.
fn normalize_host(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&host);
    host.trim_end_matches('.').to_string()
}

fn is_reserved_name(name: &str) -> bool {
    RESERVED_NAMES.contains(&name)
        || name.ends_with(".metadata.google.internal")
        || name.starts_with("kubernetes.default.svc.")
}

/// The IPv4 address inside a NAT64 (64:ff9b::/96) or 6to4 (2002::/16)
/// address, which reaches that IPv4 address on networks that route them.
fn embedded_v4(addr: IpAddr) -> Option<IpAddr> {
    let IpAddr::V6(v6) = addr else {
        return None;
    };
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| {
        IpAddr::V4(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        ))
    };
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule_of(policy: &HostPolicy, host: &str, addrs: &[&str]) -> Option<Rule> {
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
        policy.check(host, &addrs).err().map(|e| e.rule)
    }

    #[test]
    fn metadata_and_reserved_names_are_always_refused() {
        let mut open = HostPolicy::defaults(Mode::Local);
        open.allow_cidrs = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        for host in [
            "169.254.169.254",
            "[fd00:ec2::254]",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "100.100.100.200",
        ] {
            assert_eq!(rule_of(&open, host, &[]), Some(Rule::Metadata), "{host}");
        }
        for host in [
            "metadata.google.internal",
            "METADATA.google.internal.",
            "kubernetes.default.svc.cluster.local",
            "kubernetes",
        ] {
            assert_eq!(
                rule_of(&open, host, &[]),
                Some(Rule::ReservedName),
                "{host}"
            );
        }
        assert_eq!(
            rule_of(&open, "cam.example.com", &["10.0.0.1", "169.254.169.254"]),
            Some(Rule::Metadata),
            "any resolved address counts"
        );
    }

    #[test]
    fn special_addresses_need_an_explicit_allow() {
        let policy = HostPolicy::defaults(Mode::Kubernetes);
        for (host, kind) in [
            ("169.254.1.2", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("239.1.1.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            assert_eq!(
                rule_of(&policy, host, &[]),
                Some(Rule::Special(kind)),
                "{host}"
            );
        }
        let mut zeroconf = policy.clone();
        zeroconf.allow_cidrs = vec!["169.254.10.0/24".parse().unwrap()];
        assert_eq!(rule_of(&zeroconf, "169.254.10.7", &[]), None);
        assert_eq!(
            rule_of(&zeroconf, "169.254.169.254", &[]),
            Some(Rule::Metadata)
        );
    }

    #[test]
    fn loopback_follows_the_mode_and_the_setting() {
        let k8s = HostPolicy::defaults(Mode::Kubernetes);
        let local = HostPolicy::defaults(Mode::Local);
        let from_kafka = HostPolicy::defaults(Mode::LocalIngest);
        assert_eq!(rule_of(&k8s, "127.0.0.1", &[]), Some(Rule::Loopback));
        assert_eq!(rule_of(&k8s, "localhost", &["::1"]), Some(Rule::Loopback));
        assert_eq!(rule_of(&local, "127.0.0.1", &[]), None);
        assert_eq!(rule_of(&from_kafka, "127.0.0.1", &[]), Some(Rule::Loopback));
        assert_eq!(
            rule_of(&from_kafka, "localhost", &["::1"]),
            Some(Rule::Loopback)
        );
        // Cluster service names and private networks are allowed by default.
        assert_eq!(
            rule_of(&k8s, "clip-server.e2e.svc.cluster.local", &["10.96.0.12"]),
            None
        );
        assert_eq!(rule_of(&k8s, "192.168.1.10", &[]), None);
    }

    #[test]
    fn allow_and_deny_lists_confine_cameras() {
        let mut policy = HostPolicy::defaults(Mode::Kubernetes);
        policy.allow_cidrs = vec!["192.168.10.0/24".parse().unwrap()];
        policy.allow_hosts = vec!["*.cams.example.com".parse().unwrap()];
        policy.deny_cidrs = vec!["192.168.10.99".parse().unwrap()];
        policy.deny_hosts = vec!["bad.cams.example.com".parse().unwrap()];
        assert_eq!(rule_of(&policy, "192.168.10.5", &[]), None);
        assert_eq!(
            rule_of(&policy, "door.cams.example.com", &["10.1.1.1"]),
            None
        );
        assert_eq!(rule_of(&policy, "10.1.1.1", &[]), Some(Rule::NotAllowed));
        assert_eq!(
            rule_of(&policy, "cams.example.com", &["10.1.1.1"]),
            Some(Rule::NotAllowed),
            "*.x matches names below x only"
        );
        assert!(matches!(
            rule_of(&policy, "192.168.10.99", &[]),
            Some(Rule::DeniedCidr(_))
        ));
        assert!(matches!(
            rule_of(&policy, "bad.cams.example.com", &["192.168.10.5"]),
            Some(Rule::DeniedName(_))
        ));
        // An allowed name still may not resolve to a metadata address.
        assert_eq!(
            rule_of(&policy, "door.cams.example.com", &["169.254.169.254"]),
            Some(Rule::Metadata)
        );
    }

    #[test]
    fn settings_parse_with_clear_errors() {
        let list: List<Cidr> = "10.0.0.0/8, fd00::/8,192.168.1.1".parse().unwrap();
        assert_eq!(list.to_string(), "10.0.0.0/8,fd00::/8,192.168.1.1/32");
        assert_eq!("".parse::<List<Cidr>>().unwrap(), List(vec![]));
        let err = "10.0.0.0/33".parse::<List<Cidr>>().unwrap_err();
        assert!(err.contains("10.0.0.0/33") && err.contains("CIDR"), "{err}");
        let err = "cam one".parse::<List<HostPattern>>().unwrap_err();
        assert!(err.contains("cam one"), "{err}");
        let policy = HostPolicy::defaults(Mode::Kubernetes);
        assert!(
            policy
                .worker_env()
                .contains(&("CAMERA_ALLOW_LOOPBACK", "false".into()))
        );
    }

    #[test]
    fn refusals_name_the_host_the_address_and_the_fix() {
        let policy = HostPolicy::defaults(Mode::Kubernetes);
        let text = policy
            .check("cam.example.com", &[ip("127.0.0.1")])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("cam.example.com")
                && text.contains("127.0.0.1")
                && text.contains("CAMERA_ALLOW_LOOPBACK=true"),
            "{text}"
        );
    }

    fn cluster(entries: &str) -> Vec<ClusterAddress> {
        entries.parse::<List<ClusterAddress>>().unwrap().0
    }

    #[test]
    fn cluster_addresses_parse_and_print_back() {
        let list: List<ClusterAddress> =
            "service=10.96.0.1, apiserver=172.18.0.2:6443,kubelet=[fd00::5]:10250,10.0.0.9,[fd00::7]"
                .parse()
                .unwrap();
        assert_eq!(
            list.to_string(),
            "service=10.96.0.1,apiserver=172.18.0.2:6443,kubelet=[fd00::5]:10250,10.0.0.9,fd00::7"
        );
        assert_eq!(list.0[1].port, Some(6443));
        assert_eq!(list.0[1].role, ClusterRole::ApiServer);
        assert_eq!(list.0[3].role, ClusterRole::Cluster);
        assert_eq!(list.to_string().parse::<List<ClusterAddress>>(), Ok(list));
        // A mapped IPv4 address is kept as the IPv4 address it is.
        assert_eq!(
            "::ffff:10.0.0.1".parse::<ClusterAddress>().unwrap().addr,
            ip("10.0.0.1")
        );
        for bad in [
            "node=10.0.0.1",
            "10.0.0.1:99999",
            "kubelet=",
            "cam.example.com:80",
        ] {
            let err = bad.parse::<ClusterAddress>().unwrap_err();
            assert!(err.contains(bad) && err.contains("ip:port"), "{err}");
        }
        assert_eq!(
            ClusterAddress::kubelet(ip("10.0.0.5"), Some(10250)),
            cluster("kubelet=10.0.0.5:10250,kubelet=10.0.0.5:10255")
        );
        assert_eq!(
            ClusterAddress::kubelet(ip("10.0.0.5"), Some(10260)).len(),
            3
        );
    }

    #[test]
    fn cluster_addresses_are_refused_on_their_ports_whatever_the_settings() {
        let mut policy = HostPolicy::defaults(Mode::Kubernetes);
        policy.allow_cidrs = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        policy.allow_hosts = vec!["*.example.com".parse().unwrap()];
        policy.cluster = cluster(
            "service=10.96.0.1,apiserver=172.18.0.2:6443,kubelet=172.18.0.3:10250,kubelet=172.18.0.3:10255",
        );
        let rule = |host: &str, port: Option<u16>, addrs: &[&str]| {
            let addrs: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
            policy.check_port(host, port, &addrs).err().map(|e| e.rule)
        };
        let role = |r: Option<Rule>| match r {
            Some(Rule::Cluster(entry)) => Some(entry.role),
            _ => None,
        };
        // The kubernetes Service's ClusterIP on any port, by address or name.
        assert_eq!(
            role(rule("10.96.0.1", Some(443), &[])),
            Some(ClusterRole::Service)
        );
        assert_eq!(
            role(rule("10.96.0.1", Some(554), &[])),
            Some(ClusterRole::Service)
        );
        assert_eq!(
            role(rule("api.example.com", Some(80), &["10.96.0.1"])),
            Some(ClusterRole::Service)
        );
        // The API server's endpoint on its port only.
        assert_eq!(
            role(rule("172.18.0.2", Some(6443), &[])),
            Some(ClusterRole::ApiServer)
        );
        assert_eq!(rule("172.18.0.2", Some(8554), &[]), None);
        // A node on its kubelet ports, but not on a camera's port.
        assert_eq!(
            role(rule("172.18.0.3", Some(10250), &[])),
            Some(ClusterRole::Kubelet)
        );
        assert_eq!(
            role(rule("172.18.0.3", Some(10255), &[])),
            Some(ClusterRole::Kubelet)
        );
        assert_eq!(
            role(rule("[::ffff:172.18.0.3]", Some(10250), &[])),
            Some(ClusterRole::Kubelet)
        );
        assert_eq!(rule("172.18.0.3", Some(8554), &[]), None);
        // An unknown port counts as any port.
        assert_eq!(
            role(rule("172.18.0.3", None, &[])),
            Some(ClusterRole::Kubelet)
        );
    }

    #[test]
    fn urls_are_checked_on_their_port_or_their_schemes_default() {
        let mut policy = HostPolicy::defaults(Mode::Kubernetes);
        policy.cluster = cluster("apiserver=192.0.2.10:443,kubelet=192.0.2.20:10250");
        let check = |raw: &str| policy.check_url_resolving(&Url::parse(raw).unwrap());
        assert!(
            check("https://192.0.2.10/video.mp4").is_err(),
            "https is 443"
        );
        assert!(check("http://192.0.2.10/video.mp4").is_ok(), "http is 80");
        assert!(check("rtsp://192.0.2.20:10250/live").is_err());
        assert!(check("rtsp://192.0.2.20/live").is_ok(), "rtsp is 554");
        assert_eq!(url_port(&Url::parse("rtsps://cam/a").unwrap()), Some(322));
    }

    #[test]
    fn a_pod_adds_its_service_host_and_its_node_on_the_kubelet_ports() {
        let mut policy = HostPolicy::defaults(Mode::Kubernetes);
        policy.add_pod_addresses(Some("10.96.0.1"), Some("172.18.0.3"));
        policy.add_pod_addresses(Some("kubernetes.default"), Some(""));
        assert_eq!(
            policy.cluster,
            cluster("service=10.96.0.1,kubelet=172.18.0.3:10250,kubelet=172.18.0.3:10255")
        );
        let learned = policy.with_cluster(&cluster("apiserver=172.18.0.2:6443"));
        assert_eq!(learned.cluster.len(), 4);
        assert_eq!(policy.cluster.len(), 3, "the policy itself is unchanged");
    }

    #[test]
    fn the_service_range_is_refused_unless_allowed() {
        let mut policy = HostPolicy::defaults(Mode::Kubernetes);
        policy.service_cidrs = vec!["10.96.0.0/12".parse().unwrap()];
        assert!(matches!(
            rule_of(&policy, "proxy.cams.svc.cluster.local", &["10.100.3.4"]),
            Some(Rule::ServiceCidr(_))
        ));
        assert_eq!(
            rule_of(&policy, "10.244.1.7", &[]),
            None,
            "Pods are not Services"
        );
        let mut proxy = policy.clone();
        proxy.allow_cidrs = vec!["10.100.3.4".parse().unwrap()];
        assert_eq!(rule_of(&proxy, "10.100.3.4", &[]), None);
        // The Service ClusterIP rule holds even inside an allowed range.
        proxy.allow_cidrs = vec!["10.96.0.0/12".parse().unwrap()];
        proxy.cluster = cluster("service=10.96.0.1");
        assert!(matches!(
            rule_of(&proxy, "10.96.0.1", &[]),
            Some(Rule::Cluster(_))
        ));
        assert!(
            policy
                .worker_env()
                .contains(&("CAMERA_SERVICE_CIDRS", "10.96.0.0/12".into()))
        );
    }

    #[test]
    fn cluster_refusals_say_what_the_address_is_and_the_fix() {
        let mut policy = HostPolicy::defaults(Mode::Kubernetes);
        policy.cluster =
            cluster("service=10.96.0.1,apiserver=172.18.0.2:6443,kubelet=172.18.0.3:10250");
        policy.service_cidrs = vec!["10.96.0.0/12".parse().unwrap()];
        let text = |host: &str, port: u16, addrs: &[&str]| {
            let addrs: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
            policy
                .check_port(host, Some(port), &addrs)
                .unwrap_err()
                .to_string()
        };
        let t = text("cam.example.com", 554, &["10.96.0.1"]);
        assert!(
            t.contains("cam.example.com resolves to 10.96.0.1, port 554")
                && t.contains("`kubernetes` Service"),
            "{t}"
        );
        let t = text("172.18.0.2", 6443, &[]);
        assert!(
            t.contains("host 172.18.0.2, port 6443") && t.contains("API server"),
            "{t}"
        );
        let t = text("172.18.0.3", 10250, &[]);
        assert!(
            t.contains("kubelet port") && t.contains("another port"),
            "{t}"
        );
        let t = text("10.100.0.9", 554, &[]);
        assert!(
            t.contains("CAMERA_SERVICE_CIDRS") && t.contains("CAMERA_ALLOW_CIDRS"),
            "{t}"
        );
    }
}
