//! The guest network configuration sent with `SetNetwork`, typed and checked.
//!
//! The host builds a [`Network`], checks it ([`Network::validate`]) and sends
//! [`Network::to_request`]; the agent accepts only what
//! [`Network::from_request`] returns. Both sides enforce the same limits, so
//! a host bug is caught before the guest sees it and a guest never acts on
//! input it did not check.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::agent::{IpNet as PbIpNet, NetInterface, NetNeighbour, NetRoute, SetNetworkRequest};

/// Most interfaces a VM gets.
pub const MAX_INTERFACES: usize = 16;
/// Most addresses per interface.
pub const MAX_ADDRESSES: usize = 32;
/// Most routes in one request.
pub const MAX_ROUTES: usize = 256;
/// Most static neighbours in one request.
pub const MAX_NEIGHBOURS: usize = 256;
/// Interface names are at most IFNAMSIZ - 1 bytes.
pub const MAX_NAME: usize = 15;
/// Smallest MTU the guest accepts (IPv4's minimum).
pub const MIN_MTU: u32 = 68;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    fn from_bytes(what: &str, b: &[u8]) -> Result<Mac, NetConfigError> {
        let mac: [u8; 6] = b
            .try_into()
            .map_err(|_| NetConfigError::BadMac(what.into(), b.len()))?;
        Ok(Mac(mac))
    }

    /// A unicast, non-zero address (usable for a NIC).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An address with a prefix length that fits its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<IpNet, NetConfigError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(NetConfigError::BadPrefix(addr, prefix.into()));
        }
        Ok(IpNet { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn from_pb(what: &str, pb: &PbIpNet) -> Result<IpNet, NetConfigError> {
        let addr = ip_from_bytes(what, &pb.address)?;
        let prefix = u8::try_from(pb.prefix_len)
            .map_err(|_| NetConfigError::BadPrefix(addr, pb.prefix_len))?;
        IpNet::new(addr, prefix)
    }

    fn to_pb(self) -> PbIpNet {
        PbIpNet {
            address: ip_bytes(self.addr),
            prefix_len: self.prefix.into(),
            ..Default::default()
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn ip_from_bytes(what: &str, b: &[u8]) -> Result<IpAddr, NetConfigError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap()))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()))),
        n => Err(NetConfigError::BadAddress(what.into(), n)),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn opt_ip(what: &str, b: &[u8]) -> Result<Option<IpAddr>, NetConfigError> {
    if b.is_empty() {
        Ok(None)
    } else {
        ip_from_bytes(what, b).map(Some)
    }
}

/// One guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// The device's MAC, which finds it.
    pub mac: Mac,
    /// The MAC the interface is given when it differs from the device's (a
    /// clone of a template keeps the template's device MAC); `None`: keep it.
    pub set_mac: Option<Mac>,
    /// `None` keeps the device's MTU.
    pub mtu: Option<u32>,
    pub addresses: Vec<IpNet>,
}

/// One route of the guest's main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// 0.0.0.0/0 or ::/0 for a default route.
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub metric: u32,
    pub link_scope: bool,
}

/// A static (permanent) neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub address: IpAddr,
    pub mac: Mac,
    pub device: String,
}

/// Everything `SetNetwork` configures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

/// Why a network configuration is refused.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum NetConfigError {
    /// {what}: {count} entries, at most {max} allowed
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// invalid interface name {0:?}: use 1-15 characters from [A-Za-z0-9_.-], not "." or ".."
    BadName(String),
    /// interface name {0:?} appears twice
    DuplicateName(String),
    /// {0}: a MAC address has 6 bytes, got {1}
    BadMac(String, usize),
    /// {0}: MAC {1} is not a unicast address
    NotUnicast(String, Mac),
    /// MAC {0} appears on two interfaces
    DuplicateMac(Mac),
    /// interface {0}: MTU {1} is outside 68-65535
    BadMtu(String, u32),
    /// {0}: an IP address has 4 or 16 bytes, got {1}
    BadAddress(String, usize),
    /// prefix length {1} is too long for {0}
    BadPrefix(IpAddr, u32),
    /// route to {0}: device {1:?} is not one of the interfaces
    UnknownDevice(String, String),
    /// route to {0}: gateway or source {1} is not of the destination's family
    MixedFamily(IpNet, IpAddr),
    /// route to {0}: a link-scope route has no gateway
    LinkScopeGateway(IpNet),
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), NetConfigError> {
    if count > max {
        return Err(NetConfigError::TooMany { what, count, max });
    }
    Ok(())
}

/// Checks an interface name (it becomes a file name under /sys/class/net).
pub fn check_name(name: &str) -> Result<(), NetConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NetConfigError::BadName(name.into()))
    }
}

impl Network {
    /// Checks counts, names, MACs, MTUs, prefix lengths, families and that
    /// every route and neighbour names one of the interfaces.
    pub fn validate(&self) -> Result<(), NetConfigError> {
        check_count("interfaces", self.interfaces.len(), MAX_INTERFACES)?;
        check_count("routes", self.routes.len(), MAX_ROUTES)?;
        check_count("neighbours", self.neighbours.len(), MAX_NEIGHBOURS)?;
        let mut names = HashSet::new();
        let mut macs = HashSet::new();
        for i in &self.interfaces {
            check_name(&i.name)?;
            if !names.insert(i.name.as_str()) {
                return Err(NetConfigError::DuplicateName(i.name.clone()));
            }
            if !i.mac.is_unicast() {
                return Err(NetConfigError::NotUnicast(i.name.clone(), i.mac));
            }
            if !macs.insert(i.mac) {
                return Err(NetConfigError::DuplicateMac(i.mac));
            }
            if let Some(m) = i.set_mac {
                if !m.is_unicast() {
                    return Err(NetConfigError::NotUnicast(i.name.clone(), m));
                }
            }
            if let Some(mtu) = i.mtu {
                if !(MIN_MTU..=65535).contains(&mtu) {
                    return Err(NetConfigError::BadMtu(i.name.clone(), mtu));
                }
            }
            check_count("addresses", i.addresses.len(), MAX_ADDRESSES)?;
            for a in &i.addresses {
                IpNet::new(a.addr, a.prefix)?;
            }
        }
        for r in &self.routes {
            IpNet::new(r.destination.addr, r.destination.prefix)?;
            if !names.contains(r.device.as_str()) {
                return Err(NetConfigError::UnknownDevice(
                    r.destination.to_string(),
                    r.device.clone(),
                ));
            }
            for ip in r.gateway.iter().chain(r.source.iter()) {
                if ip.is_ipv4() != r.destination.addr.is_ipv4() {
                    return Err(NetConfigError::MixedFamily(r.destination, *ip));
                }
            }
            if r.link_scope && r.gateway.is_some() {
                return Err(NetConfigError::LinkScopeGateway(r.destination));
            }
        }
        for n in &self.neighbours {
            if !names.contains(n.device.as_str()) {
                return Err(NetConfigError::UnknownDevice(
                    n.address.to_string(),
                    n.device.clone(),
                ));
            }
            if !n.mac.is_unicast() {
                return Err(NetConfigError::NotUnicast(n.address.to_string(), n.mac));
            }
        }
        Ok(())
    }

    /// Parses and checks a request (counts are checked before anything else
    /// is parsed).
    pub fn from_request(req: &SetNetworkRequest) -> Result<Network, NetConfigError> {
        check_count("interfaces", req.interfaces.len(), MAX_INTERFACES)?;
        check_count("routes", req.routes.len(), MAX_ROUTES)?;
        check_count("neighbours", req.neighbours.len(), MAX_NEIGHBOURS)?;
        let mut net = Network::default();
        for i in &req.interfaces {
            check_name(&i.name)?;
            check_count("addresses", i.addresses.len(), MAX_ADDRESSES)?;
            net.interfaces.push(Interface {
                name: i.name.clone(),
                mac: Mac::from_bytes(&i.name, &i.mac)?,
                set_mac: if i.set_mac.is_empty() {
                    None
                } else {
                    Some(Mac::from_bytes(&i.name, &i.set_mac)?)
                },
                mtu: (i.mtu != 0).then_some(i.mtu),
                addresses: i
                    .addresses
                    .iter()
                    .map(|a| IpNet::from_pb(&i.name, a))
                    .collect::<Result<_, _>>()?,
            });
        }
        for r in &req.routes {
            let what = format!("route via {:?}", r.device);
            let default = PbIpNet::default();
            let dest = r.destination.as_ref().unwrap_or(&default);
            net.routes.push(Route {
                destination: IpNet::from_pb(&what, dest)?,
                gateway: opt_ip(&what, &r.gateway)?,
                device: r.device.clone(),
                source: opt_ip(&what, &r.source)?,
                metric: r.metric,
                link_scope: r.link_scope,
            });
        }
        for n in &req.neighbours {
            let what = format!("neighbour on {:?}", n.device);
            net.neighbours.push(Neighbour {
                address: ip_from_bytes(&what, &n.address)?,
                mac: Mac::from_bytes(&what, &n.mac)?,
                device: n.device.clone(),
            });
        }
        net.validate()?;
        Ok(net)
    }

    /// The request that carries this configuration.
    pub fn to_request(&self) -> SetNetworkRequest {
        SetNetworkRequest {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| NetInterface {
                    name: i.name.clone(),
                    mac: i.mac.0.to_vec(),
                    set_mac: i.set_mac.map(|m| m.0.to_vec()).unwrap_or_default(),
                    mtu: i.mtu.unwrap_or(0),
                    addresses: i.addresses.iter().map(|a| a.to_pb()).collect(),
                    ..Default::default()
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| NetRoute {
                    destination: Some(r.destination.to_pb()).into(),
                    gateway: r.gateway.map(ip_bytes).unwrap_or_default(),
                    device: r.device.clone(),
                    source: r.source.map(ip_bytes).unwrap_or_default(),
                    metric: r.metric,
                    link_scope: r.link_scope,
                    ..Default::default()
                })
                .collect(),
            neighbours: self
                .neighbours
                .iter()
                .map(|n| NetNeighbour {
                    address: ip_bytes(n.address),
                    mac: n.mac.0.to_vec(),
                    device: n.device.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sample() -> Network {
        Network {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Mac([0x02, 0, 0, 0, 0, 1]),
                set_mac: Some(Mac([0x02, 0, 0, 0, 0, 9])),
                mtu: Some(1500),
                addresses: vec![
                    IpNet::new(ip("10.244.1.2"), 24).unwrap(),
                    IpNet::new(ip("fd00::2"), 64).unwrap(),
                ],
            }],
            routes: vec![
                Route {
                    destination: IpNet::new(ip("10.9.0.0"), 16).unwrap(),
                    gateway: None,
                    device: "eth0".into(),
                    source: None,
                    metric: 0,
                    link_scope: true,
                },
                Route {
                    destination: IpNet::new(ip("0.0.0.0"), 0).unwrap(),
                    gateway: Some(ip("10.244.1.1")),
                    device: "eth0".into(),
                    source: Some(ip("10.244.1.2")),
                    metric: 100,
                    link_scope: false,
                },
            ],
            neighbours: vec![Neighbour {
                address: ip("10.244.1.1"),
                mac: Mac([0x02, 0, 0, 0, 0, 9]),
                device: "eth0".into(),
            }],
        }
    }

    #[test]
    fn round_trip() {
        let net = sample();
        net.validate().unwrap();
        assert_eq!(Network::from_request(&net.to_request()).unwrap(), net);
    }

    #[test]
    fn refuses_bad_input() {
        let bad = |f: &dyn Fn(&mut Network)| {
            let mut n = sample();
            f(&mut n);
            let host = n.validate().unwrap_err();
            let guest = Network::from_request(&n.to_request()).unwrap_err();
            assert_eq!(host, guest);
            host
        };
        assert!(matches!(
            bad(&|n| n.interfaces[0].name = "../x".into()),
            NetConfigError::BadName(_)
        ));
        assert!(matches!(
            bad(&|n| n.interfaces[0].name = "a".repeat(16)),
            NetConfigError::BadName(_)
        ));
        assert!(matches!(
            bad(&|n| n.interfaces[0].mac = Mac([1, 0, 0, 0, 0, 1])),
            NetConfigError::NotUnicast(..)
        ));
        assert!(matches!(
            bad(&|n| n.interfaces[0].mtu = Some(67)),
            NetConfigError::BadMtu(..)
        ));
        assert!(matches!(
            bad(&|n| n.routes[0].device = "eth1".into()),
            NetConfigError::UnknownDevice(..)
        ));
        assert!(matches!(
            bad(&|n| n.routes[1].gateway = Some(ip("fd00::1"))),
            NetConfigError::MixedFamily(..)
        ));
        assert!(matches!(
            bad(&|n| {
                let i = n.interfaces[0].clone();
                n.interfaces.push(i)
            }),
            NetConfigError::DuplicateName(_)
        ));
        assert!(matches!(
            bad(&|n| n.routes = vec![n.routes[0].clone(); MAX_ROUTES + 1]),
            NetConfigError::TooMany { .. }
        ));
    }

    #[test]
    fn refuses_malformed_wire_values() {
        let mut req = sample().to_request();
        req.interfaces[0].addresses[0].prefix_len = 33;
        assert!(matches!(
            Network::from_request(&req),
            Err(NetConfigError::BadPrefix(..))
        ));
        let mut req = sample().to_request();
        req.interfaces[0].mac = vec![2, 0, 0];
        assert!(matches!(
            Network::from_request(&req),
            Err(NetConfigError::BadMac(..))
        ));
        let mut req = sample().to_request();
        req.routes[1].gateway = vec![10, 0, 0];
        assert!(matches!(
            Network::from_request(&req),
            Err(NetConfigError::BadAddress(..))
        ));
        let mut req = sample().to_request();
        req.interfaces[0].addresses[0].prefix_len = 1 << 20;
        assert!(matches!(
            Network::from_request(&req),
            Err(NetConfigError::BadPrefix(..))
        ));
    }
}
