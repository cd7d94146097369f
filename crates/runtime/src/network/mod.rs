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
//! Which namespace a sandbox lives in: see [`sandbox`]. A spec without a
//! network namespace keeps a loopback-only VM.

pub mod endpoint;
mod hook;
mod netns;
mod record;
mod sandbox;
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
pub use record::{record_path, undo_recorded, RecordedLink, WiringRecord};
pub use sandbox::{
    netns_request, owned_netns_path, remove_owned_netns, NetnsRequest, SandboxNetns,
};

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
    /// interfaces {links} appeared in {netns} after the VM booted: one interface can be wired at start, and only into a namespace that had none at create (the VM cannot hot-add NICs)
    LateLinks { links: String, netns: PathBuf },
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
    /// The guest device's MAC: the link's, or the spare NIC's (see
    /// [`PodNetwork::wire_new_links`]).
    guest_mac: [u8; 6],
}

/// A tap given to the VM before anything is wired to it: the NIC that an
/// interface added to the namespace after the VM booted is wired to.
struct Spare {
    tap: Link,
    tap_fd: Arc<OwnedFd>,
    offloads: bool,
    mac: [u8; 6],
}

/// The sandbox's network: taps wired to the namespace's links.
pub struct PodNetwork {
    netns: PathBuf,
    ns: OwnedFd,
    handle: Handle,
    endpoints: Vec<Endpoint>,
    spare: Option<Spare>,
    guest: Network,
    /// The MACs the VM's NICs have, in NIC order, where they are not the
    /// endpoints' (a VM restored from a template); empty: the endpoints'.
    device_macs: Vec<[u8; 6]>,
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

/// The name of link `index`, if there is one.
async fn link_name(handle: &Handle, index: u32) -> Option<String> {
    let msg = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .ok()??;
    Some(Link::from_message(&msg).name)
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
            ns,
            handle,
            endpoints: Vec::new(),
            spare: None,
            guest: Network::default(),
            device_macs: Vec::new(),
        };
        match net.attach_in().await {
            Ok(()) => Ok(net),
            Err(e) => {
                net.detach().await;
                Err(e)
            }
        }
    }

    /// The namespace's links but `lo` and our own taps.
    async fn foreign_links(&self) -> Result<Vec<Link>, NetError> {
        let ours: Vec<u32> = self
            .endpoints
            .iter()
            .map(|e| e.tap.index)
            .chain(self.spare.iter().map(|s| s.tap.index))
            .collect();
        Ok(self
            .handle
            .link()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(nl(format!("list the links of {}", self.netns.display())))?
            .iter()
            .map(Link::from_message)
            .filter(|l| l.name != "lo" && !ours.contains(&l.index))
            .collect())
    }

    /// Checks that `link` can be wired to a tap of ours.
    async fn check_wirable(&self, link: &Link) -> Result<EndpointKind, NetError> {
        let kind = EndpointKind::of(link).ok_or_else(|| NetError::Unsupported {
            link: link.name.clone(),
            netns: self.netns.clone(),
            kind: link.kind.clone().unwrap_or_else(|| "device".into()),
        })?;
        let busy = || NetError::Busy {
            link: link.name.clone(),
            netns: self.netns.clone(),
        };
        if kind == EndpointKind::Tap {
            // A tap of another sandbox that is still running.
            return Err(busy());
        }
        if link.mac.is_none() {
            return Err(NetError::NoMac {
                link: link.name.clone(),
                netns: self.netns.clone(),
            });
        }
        if tcfilter::has_ingress(&self.handle, link.index).await? {
            return Err(busy());
        }
        Ok(kind)
    }

    async fn attach_in(&mut self) -> Result<(), NetError> {
        let links = self.foreign_links().await?;
        if links.is_empty() {
            return self.add_spare().await;
        }
        let mut wired = Vec::new();
        for link in links {
            let kind = self.check_wirable(&link).await?;
            wired.push((link, kind));
        }
        let names: Vec<String> = (0..wired.len()).map(tap_name).collect();
        let taps = netns::run_in(self.ns.as_fd(), || {
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
            let guest_mac = link.mac.expect("checked in check_wirable");
            self.endpoints.push(Endpoint {
                link,
                tap: tap_link,
                kind,
                tap_fd: Arc::new(tap.fd),
                offloads: tap.offloads,
                guest_mac,
            });
        }
        for i in 0..self.endpoints.len() {
            self.connect(i).await?;
        }
        self.read_checked_guest_network().await
    }

    /// Sets endpoint `i`'s tap up (with its link's MTU) and redirects the
    /// two into each other.
    async fn connect(&self, i: usize) -> Result<(), NetError> {
        let ep = &self.endpoints[i];
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
        Ok(())
    }

    async fn read_checked_guest_network(&mut self) -> Result<(), NetError> {
        self.guest = self.read_guest_network().await?;
        self.remap_device_macs();
        self.guest.validate().map_err(|source| NetError::Config {
            netns: self.netns.clone(),
            source,
        })
    }

    /// The VM's NICs have `macs` (in NIC order: the endpoints', then the
    /// spare's), a template's: the guest network finds each device by its
    /// MAC and gives it the endpoint's.
    pub fn set_device_macs(&mut self, macs: Vec<[u8; 6]>) {
        self.device_macs = macs;
        self.remap_device_macs();
    }

    fn remap_device_macs(&mut self) {
        for (k, ep) in self.endpoints.iter().enumerate() {
            let Some(&device) = self.device_macs.get(k) else {
                continue;
            };
            let wanted = Mac(ep.guest_mac);
            if let Some(i) = self
                .guest
                .interfaces
                .iter_mut()
                .find(|i| i.set_mac.unwrap_or(i.mac) == wanted)
            {
                if Mac(device) != wanted {
                    i.mac = Mac(device);
                    i.set_mac = Some(wanted);
                }
            }
        }
    }

    /// An empty namespace at boot: a tap that the VM gets as a NIC, for the
    /// interface that `ctr run --cni` and the like add after create (QEMU
    /// here cannot hot-add a NIC: the guest kernel has no PCI hotplug).
    async fn add_spare(&mut self) -> Result<(), NetError> {
        let name = tap_name(0);
        let tap = netns::run_in(self.ns.as_fd(), || tap::create(&name))?;
        let tap_fd = Arc::new(tap.fd);
        let tap_link = self.link_by_name(&name).await?;
        self.spare = Some(Spare {
            tap: tap_link,
            tap_fd,
            offloads: tap.offloads,
            mac: random_mac(),
        });
        Ok(())
    }

    /// Wires the link that appeared in the namespace since [`attach`] to
    /// the spare NIC and returns the guest network to apply; `None` when no
    /// link appeared. The guest device keeps the spare NIC's MAC (the agent
    /// cannot change a device's MAC; the namespace's link is left as CNI
    /// made it): its frames carry that MAC through the redirect.
    ///
    /// [`attach`]: PodNetwork::attach
    pub async fn wire_new_links(&mut self) -> Result<Option<&Network>, NetError> {
        let links = self.foreign_links().await?;
        let wired: Vec<u32> = self.endpoints.iter().map(|e| e.link.index).collect();
        let new: Vec<Link> = links
            .into_iter()
            .filter(|l| !wired.contains(&l.index))
            .collect();
        if new.is_empty() {
            return Ok(None);
        }
        let names = new.iter().map(|l| l.name.as_str()).collect::<Vec<_>>();
        if new.len() > 1 || self.spare.is_none() {
            return Err(NetError::LateLinks {
                links: names.join(", "),
                netns: self.netns.clone(),
            });
        }
        let link = new.into_iter().next().expect("one link");
        let kind = self.check_wirable(&link).await?;
        let spare = self.spare.take().expect("checked above");
        self.endpoints.push(Endpoint {
            link,
            tap: spare.tap,
            kind,
            tap_fd: spare.tap_fd,
            offloads: spare.offloads,
            guest_mac: spare.mac,
        });
        let i = self.endpoints.len() - 1;
        if let Err(e) = self.connect(i).await {
            self.disconnect_last().await;
            return Err(e);
        }
        if let Err(e) = self.read_checked_guest_network().await {
            self.disconnect_last().await;
            return Err(e);
        }
        Ok(Some(&self.guest))
    }

    /// Undoes a failed late wiring: the endpoint's tap becomes spare again.
    async fn disconnect_last(&mut self) {
        if let Some(ep) = self.endpoints.pop() {
            tcfilter::disconnect(&self.handle, ep.link.index, &ep.link.name).await;
            tcfilter::disconnect(&self.handle, ep.tap.index, &ep.tap.name).await;
            self.spare = Some(Spare {
                tap: ep.tap,
                tap_fd: ep.tap_fd,
                offloads: ep.offloads,
                mac: ep.guest_mac,
            });
        }
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
                mac: Mac(ep.guest_mac),
                set_mac: None,
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
    /// With an empty namespace, the spare NIC (see [`PodNetwork::wire_new_links`]).
    pub fn nics(&self) -> Vec<Nic> {
        let wired = self.endpoints.iter().map(|ep| {
            Nic::VirtioTap(TapNic {
                tap_name: ep.tap.name.clone(),
                fd: ep.tap_fd.clone(),
                vnet_hdr: ep.offloads,
                mac: MacAddr(ep.guest_mac),
                mtu: ep.link.mtu,
            })
        });
        let spare = self.spare.iter().map(|s| {
            Nic::VirtioTap(TapNic {
                tap_name: s.tap.name.clone(),
                fd: s.tap_fd.clone(),
                vnet_hdr: s.offloads,
                mac: MacAddr(s.mac),
                mtu: None,
            })
        });
        wired.chain(spare).collect()
    }

    /// What the agent configures in the guest (checked).
    pub fn guest_network(&self) -> &Network {
        &self.guest
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// The namespace's links that carry a qdisc of ours (see [`record`]).
    pub fn record(&self) -> WiringRecord {
        WiringRecord {
            netns: self.netns.clone(),
            links: self
                .endpoints
                .iter()
                .map(|ep| RecordedLink {
                    index: ep.link.index,
                    name: ep.link.name.clone(),
                })
                .collect(),
        }
    }

    /// Removes the tc qdiscs (and their filters) from the links and taps and
    /// closes our tap fds. Idempotent; logs what it cannot remove.
    pub async fn detach(&mut self) {
        self.spare = None;
        for ep in self.endpoints.drain(..) {
            tcfilter::disconnect(&self.handle, ep.link.index, &ep.link.name).await;
            tcfilter::disconnect(&self.handle, ep.tap.index, &ep.tap.name).await;
        }
    }
}

/// A random, locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let b = h.finish().to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
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

    #[test]
    fn spare_macs_are_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02, "{m:?}");
        assert!(Mac(m).is_unicast());
        assert_ne!(random_mac(), m);
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert!(tap_name(vessel_protocol::net::MAX_INTERFACES).len() <= 15);
    }
}
