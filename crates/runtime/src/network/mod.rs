//! The sandbox's network: the Kata "tcfilter" model.
//!
//! The bundle's network namespace (OCI `linux.namespaces`, type `network`,
//! with a `path`) is the pod's network, made by CNI, podman, docker or a
//! person. [`PodNetwork::attach`] reads its links, addresses, routes and
//! static neighbours over netlink; for each link (an endpoint: see
//! [`endpoint`] for the supported kinds) it creates a tap inside that same
//! namespace and connects the two with tc ([`tcfilter`]). The taps become the
//! VM's virtio-net devices ([`PodNetwork::nics`]) with the links' MACs, and
//! [`PodNetwork::guest_network`] is what the agent configures in the guest.
//! [`PodNetwork::detach`] removes the tc qdiscs; the taps vanish with the last
//! fd (ours and the VMM's).
//!
//! A spec without a network namespace path keeps a loopback-only VM.

pub mod endpoint;
mod hook;
mod netns;
mod tap;
pub mod tcfilter;

pub use hook::NetnsNetwork;

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use vessel_hypervisor::{MacAddr, Nic, TapNic};
use vessel_protocol::net::{Interface, IpNet, Mac, Neighbour, NetConfigError, Network, Route};

pub use endpoint::EndpointKind;

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// Why the sandbox network could not be set up.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetError {
    /// network namespace {path}
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// {0} is not a network namespace
    NotNetns(PathBuf),
    /// join the network namespace
    Setns(#[source] nix::Error),
    /// the thread that joined the network namespace panicked
    ThreadPanicked,
    /// open a netlink socket in the network namespace
    Socket(#[source] std::io::Error),
    /// netlink: {what}
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// tc: {what}
    Tc {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// create tap {tap}
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    /// interface {link} in {netns}: kind {kind} is not supported (supported: veth, macvlan, ipvlan)
    Unsupported {
        link: String,
        netns: PathBuf,
        kind: String,
    },
    /// interface {link} in {netns} already has an ingress qdisc (another runtime, or a sandbox that was not cleaned up, uses it)
    Busy { link: String, netns: PathBuf },
    /// interface {link} in {netns} has no Ethernet MAC address
    NoMac { link: String, netns: PathBuf },
    /// the network of {netns} cannot be given to the guest
    Config {
        netns: PathBuf,
        #[source]
        source: NetConfigError,
    },
    /// invalid network namespace in config.json: {0}
    Spec(String),
}

/// The network namespace path a spec names: `Ok(None)` when it names none
/// (no network entry, or one without a path: the VM has only loopback).
pub fn netns_path(spec: &serde_json::Value) -> Result<Option<PathBuf>, NetError> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else {
        return Ok(None);
    };
    let list = namespaces
        .as_array()
        .ok_or_else(|| NetError::Spec("linux.namespaces is not a list".into()))?;
    for ns in list {
        if ns.get("type").and_then(|t| t.as_str()) != Some("network") {
            continue;
        }
        return match ns.get("path") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(p)) if p.is_empty() => Ok(None),
            Some(serde_json::Value::String(p)) if Path::new(p).is_absolute() => {
                Ok(Some(PathBuf::from(p)))
            }
            Some(other) => Err(NetError::Spec(format!(
                "network namespace path {other} is not an absolute path"
            ))),
        };
    }
    Ok(None)
}

/// A link of the namespace, as netlink reports it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub kind: Option<String>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            kind: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => link.mtu = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let rtnetlink::packet_route::link::LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// One link of the namespace wired to one tap.
struct Endpoint {
    link: Link,
    tap: Link,
    kind: EndpointKind,
    /// Our fd of the tap (the VMM inherits a copy).
    tap_fd: Arc<OwnedFd>,
    offloads: bool,
}

/// The sandbox's network: taps wired to the namespace's links.
pub struct PodNetwork {
    netns: PathBuf,
    handle: Handle,
    endpoints: Vec<Endpoint>,
    guest: Network,
}

impl std::fmt::Debug for PodNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNetwork")
            .field("netns", &self.netns)
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(|e| (&e.link.name, &e.tap.name))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Tap name for endpoint `i` (at most 15 bytes).
fn tap_name(i: usize) -> String {
    format!("tap{i}_vessel")
}

impl PodNetwork {
    /// Wires every link of the namespace at `path` to a new tap in it. On any
    /// error nothing is left (no tap, no qdisc, no filter).
    pub async fn attach(path: &Path) -> Result<PodNetwork, NetError> {
        let ns = netns::open(path)?;
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = netns::run_in(ns.as_fd(), || {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(NetError::Socket)
        })?;
        tokio::spawn(conn);
        let mut net = PodNetwork {
            netns: path.to_path_buf(),
            handle,
            endpoints: Vec::new(),
            guest: Network::default(),
        };
        match net.attach_in(&ns).await {
            Ok(()) => Ok(net),
            Err(e) => {
                net.detach().await;
                Err(e)
            }
        }
    }

    async fn attach_in(&mut self, ns: &OwnedFd) -> Result<(), NetError> {
        let links: Vec<Link> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(nl(format!("list the links of {}", self.netns.display())))?
            .iter()
            .map(Link::from_message)
            .filter(|l| l.name != "lo")
            .collect();
        let mut wired = Vec::new();
        for link in links {
            let kind = EndpointKind::of(&link).ok_or_else(|| NetError::Unsupported {
                link: link.name.clone(),
                netns: self.netns.clone(),
                kind: link.kind.clone().unwrap_or_else(|| "device".into()),
            })?;
            if kind == EndpointKind::Tap {
                // A tap of ours from a sandbox that is still running.
                return Err(NetError::Busy {
                    link: link.name.clone(),
                    netns: self.netns.clone(),
                });
            }
            if link.mac.is_none() {
                return Err(NetError::NoMac {
                    link: link.name.clone(),
                    netns: self.netns.clone(),
                });
            }
            if tcfilter::has_ingress(&self.handle, link.index).await? {
                return Err(NetError::Busy {
                    link: link.name.clone(),
                    netns: self.netns.clone(),
                });
            }
            wired.push((link, kind));
        }
        let names: Vec<String> = (0..wired.len()).map(tap_name).collect();
        let taps = netns::run_in(ns.as_fd(), || {
            names
                .iter()
                .map(|n| tap::create(n))
                .collect::<Result<Vec<_>, _>>()
        })?;
        // Pair each link with its tap first: detach cleans up whatever exists.
        let mut pending = Vec::new();
        for ((link, kind), tap) in wired.into_iter().zip(taps) {
            let tap_link = self.link_by_name(&tap.name).await?;
            pending.push((link, kind, tap, tap_link));
        }
        for (link, kind, tap, tap_link) in pending {
            self.endpoints.push(Endpoint {
                link,
                tap: tap_link,
                kind,
                tap_fd: Arc::new(tap.fd),
                offloads: tap.offloads,
            });
        }
        for ep in &self.endpoints {
            let mut set = LinkUnspec::new_with_index(ep.tap.index).up();
            if let Some(mtu) = ep.link.mtu {
                set = set.mtu(mtu);
            }
            self.handle
                .link()
                .set(set.build())
                .execute()
                .await
                .map_err(nl(format!("set {} up", ep.tap.name)))?;
            tcfilter::connect(&self.handle, &ep.link, &ep.tap).await?;
            log::info!(
                "network {}: {} ({:?}) <-> {} (offloads: {})",
                self.netns.display(),
                ep.link.name,
                ep.kind,
                ep.tap.name,
                ep.offloads
            );
        }
        self.guest = self.read_guest_network().await?;
        self.guest.validate().map_err(|source| NetError::Config {
            netns: self.netns.clone(),
            source,
        })?;
        Ok(())
    }

    async fn link_by_name(&self, name: &str) -> Result<Link, NetError> {
        let msg = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(nl(format!("find {name}")))?;
        msg.map(|m| Link::from_message(&m))
            .ok_or_else(|| NetError::Netlink {
                what: format!("find {name}"),
                source: rtnetlink::Error::RequestFailed,
            })
    }

    /// Addresses, routes and permanent neighbours of the wired links, as the
    /// guest gets them (kernel routes and IPv6 link-local addresses are the
    /// guest kernel's own).
    async fn read_guest_network(&self) -> Result<Network, NetError> {
        let mut net = Network::default();
        for ep in &self.endpoints {
            let mut addresses = Vec::new();
            let msgs: Vec<_> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(ep.link.index)
                .execute()
                .try_collect()
                .await
                .map_err(nl(format!("list the addresses of {}", ep.link.name)))?;
            for m in msgs.iter().filter(|m| m.header.index == ep.link.index) {
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                let Some(addr) = addr else { continue };
                if is_link_local_v6(addr) {
                    continue;
                }
                addresses.push(IpNet::new(addr, m.header.prefix_len).map_err(|source| {
                    NetError::Config {
                        netns: self.netns.clone(),
                        source,
                    }
                })?);
            }
            net.interfaces.push(Interface {
                name: ep.link.name.clone(),
                mac: Mac(ep.link.mac.expect("checked in attach")),
                mtu: ep.link.mtu,
                addresses,
            });
        }
        for family in [false, true] {
            let filter = if family {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
            };
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(nl("list the routes"))?;
            for m in &msgs {
                if let Some(r) = self.guest_route(m)? {
                    net.routes.push(r);
                }
            }
        }
        let neighbours: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list the neighbours"))?;
        for m in &neighbours {
            if m.header.state != NeighbourState::Permanent {
                continue;
            }
            let Some(ep) = self.endpoint_of(m.header.ifindex) else {
                continue;
            };
            let mut address = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        address = Some(IpAddr::V4(*ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        address = Some(IpAddr::V6(*ip))
                    }
                    NeighbourAttribute::LinkLayerAddress(b) => {
                        mac = <[u8; 6]>::try_from(b.as_slice()).ok()
                    }
                    _ => {}
                }
            }
            if let (Some(address), Some(mac)) = (address, mac) {
                net.neighbours.push(Neighbour {
                    address,
                    mac: Mac(mac),
                    device: ep.link.name.clone(),
                });
            }
        }
        Ok(net)
    }

    fn endpoint_of(&self, index: u32) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.link.index == index)
    }

    /// The guest's copy of a route of the main table through a wired link;
    /// `None` for routes the guest kernel makes itself or that use no link
    /// of ours.
    fn guest_route(&self, m: &RouteMessage) -> Result<Option<Route>, NetError> {
        let h = &m.header;
        if h.table != RT_TABLE_MAIN as u8 && h.table != 0
            || h.kind != RouteType::Unicast
            || h.protocol == RouteProtocol::Kernel
        {
            return Ok(None);
        }
        let mut dest = None;
        let mut gateway = None;
        let mut source = None;
        let mut oif = None;
        let mut metric = 0;
        let mut table = u32::from(h.table);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => dest = route_ip(d),
                RouteAttribute::Gateway(g) => gateway = route_ip(g),
                RouteAttribute::PrefSource(s) => source = route_ip(s),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => metric = *p,
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN {
            return Ok(None);
        }
        let Some(ep) = oif.and_then(|i| self.endpoint_of(i)) else {
            return Ok(None);
        };
        let v6 = h.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
        let unspecified = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        let dest = dest.unwrap_or(unspecified);
        if is_link_local_v6(dest) || dest.is_multicast() {
            return Ok(None);
        }
        let destination =
            IpNet::new(dest, h.destination_prefix_length).map_err(|source| NetError::Config {
                netns: self.netns.clone(),
                source,
            })?;
        Ok(Some(Route {
            destination,
            gateway,
            device: ep.link.name.clone(),
            source,
            metric,
            link_scope: h.scope == RouteScope::Link && gateway.is_none(),
        }))
    }

    /// The VM's network devices: one virtio-net per wired link, on its tap,
    /// with the link's MAC and MTU.
    pub fn nics(&self) -> Vec<Nic> {
        self.endpoints
            .iter()
            .map(|ep| {
                Nic::VirtioTap(TapNic {
                    tap_name: ep.tap.name.clone(),
                    fd: ep.tap_fd.clone(),
                    vnet_hdr: ep.offloads,
                    mac: MacAddr(ep.link.mac.expect("checked in attach")),
                    mtu: ep.link.mtu,
                })
            })
            .collect()
    }

    /// What the agent configures in the guest (checked).
    pub fn guest_network(&self) -> &Network {
        &self.guest
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Removes the tc qdiscs (and their filters) from the links and taps and
    /// closes our tap fds. Idempotent; logs what it cannot remove.
    pub async fn detach(&mut self) {
        for ep in self.endpoints.drain(..) {
            tcfilter::disconnect(&self.handle, ep.link.index, &ep.link.name).await;
            tcfilter::disconnect(&self.handle, ep.tap.index, &ep.tap.name).await;
        }
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn is_link_local_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_from_spec() {
        let spec = |ns: serde_json::Value| json!({"linux": {"namespaces": ns}});
        assert_eq!(netns_path(&json!({})).unwrap(), None);
        assert_eq!(
            netns_path(&spec(json!([{"type": "pid"}, {"type": "network"}]))).unwrap(),
            None
        );
        assert_eq!(
            netns_path(&spec(
                json!([{"type": "network", "path": "/var/run/netns/a"}])
            ))
            .unwrap(),
            Some(PathBuf::from("/var/run/netns/a"))
        );
        assert!(netns_path(&spec(json!([{"type": "network", "path": "rel"}]))).is_err());
        assert!(netns_path(&spec(json!([{"type": "network", "path": 3}]))).is_err());
        assert!(netns_path(&spec(json!({}))).is_err());
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert!(tap_name(vessel_protocol::net::MAX_INTERFACES).len() <= 15);
    }
}
