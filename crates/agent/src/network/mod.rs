//! The guest's network: the VM is the pod's network namespace.
//!
//! The agent drops the network namespace from every container spec (see
//! `container::spec`), so all containers of the VM share its namespace. The
//! loopback device of that namespace is brought up once at boot, as runc
//! does for a container's new namespace: programs that talk to themselves over
//! 127.0.0.1 (upstreams, databases, health checks) need it. The host's
//! `SetNetwork` configures the VM's virtio-net devices ([`apply`]) before the
//! first container starts.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use vessel_protocol::net::{Mac, Network, Route};

/// Why the guest network could not be configured.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetError {
    /// open a netlink socket
    Socket(#[source] std::io::Error),
    /// netlink request for {what}
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// no interface named {0:?} in the guest
    NoSuchLink(String),
    /// no network device with MAC {0} in the guest (for {1})
    NoDeviceWithMac(Mac, String),
    /// {0}: {1}
    BadRoute(String, String),
}

/// A netlink connection in the agent's (the VM's) network namespace.
pub fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Index of the link called `name`.
pub async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(NetError::NoSuchLink(name.into())),
        // The kernel answers ENODEV for a name that does not exist.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(NetError::NoSuchLink(name.into()))
        }
        Err(source) => Err(NetError::Netlink {
            what: format!("link {name}"),
            source,
        }),
    }
}

/// Brings the loopback device up.
pub async fn loopback_up(handle: &Handle) -> Result<(), NetError> {
    let index = link_index(handle, "lo").await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|source| NetError::Netlink {
            what: "set lo up".into(),
            source,
        })
}

/// The MAC of a link message, if it has one.
fn link_mac(link: &LinkMessage) -> Option<Mac> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac),
        _ => None,
    })
}

fn bad_route<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> NetError + '_ {
    move |e| NetError::BadRoute(what.to_string(), e.to_string())
}

/// Longest wait for a network device the host plugged in.
const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// Interval between looks while waiting for it.
const DEVICE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Applies a checked configuration: every interface (found by its device MAC) is
/// renamed, given `set_mac` if there is one,
/// gets its MTU and addresses and is set up; then routes (link-scope first, so
/// gateways are reachable) and permanent neighbours are added.
pub async fn apply(handle: &Handle, net: &Network) -> Result<(), NetError> {
    // In a VM restored from a template the host plugs the devices in just
    // before this call and the guest probes them in the background: wait (up
    // to DEVICE_WAIT) until every MAC is there.
    let start = std::time::Instant::now();
    let links: Vec<LinkMessage> = loop {
        let links: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        let all_there = net
            .interfaces
            .iter()
            .all(|i| links.iter().any(|l| link_mac(l) == Some(i.mac)));
        if all_there || start.elapsed() >= DEVICE_WAIT {
            break links;
        }
        tokio::time::sleep(DEVICE_POLL).await;
    };
    let mut index_of = HashMap::new();
    for iface in &net.interfaces {
        let index = links
            .iter()
            .find(|l| link_mac(l) == Some(iface.mac))
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::NoDeviceWithMac(iface.mac, iface.name.clone()))?;
        let name = &iface.name;
        // A link is renamed only while it is down.
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl(format!("set {name} down")))?;
        let mut set = LinkUnspec::new_with_index(index).name(name.clone());
        if let Some(mtu) = iface.mtu {
            set = set.mtu(mtu);
        }
        if let Some(mac) = iface.set_mac {
            // A clone of a template: its device has the template's MAC.
            set = set.address(mac.0.to_vec());
        }
        handle
            .link()
            .set(set.build())
            .execute()
            .await
            .map_err(nl(format!(
                "rename the device with MAC {} to {name}",
                iface.mac
            )))?;
        for a in &iface.addresses {
            handle
                .address()
                .add(index, a.addr(), a.prefix())
                .execute()
                .await
                .map_err(nl(format!("add {a} to {name}")))?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {name} up")))?;
        index_of.insert(name.as_str(), index);
    }
    let mut routes: Vec<&Route> = net.routes.iter().collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    for r in routes {
        let index = index_of[r.device.as_str()];
        let what = format!("route to {} dev {}", r.destination, r.device);
        let bad = bad_route(&what);
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.destination.addr(), r.destination.prefix())
            .map_err(&bad)?
            .output_interface(index);
        if let Some(gw) = r.gateway {
            b = b.gateway(gw).map_err(&bad)?;
        }
        if let Some(src) = r.source {
            b = b.pref_source(src).map_err(&bad)?;
        }
        if r.metric != 0 {
            b = b.priority(r.metric);
        }
        if r.link_scope {
            b = b.scope(RouteScope::Link);
        }
        handle
            .route()
            .add(b.build())
            .execute()
            .await
            .map_err(nl(what.clone()))?;
    }
    for n in &net.neighbours {
        let index = index_of[n.device.as_str()];
        handle
            .neighbours()
            .add(index, n.address)
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("neighbour {} on {}", n.address, n.device)))?;
    }
    Ok(())
}
