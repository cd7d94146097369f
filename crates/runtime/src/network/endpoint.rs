//! Endpoint kinds: which links of a namespace the runtime can give a VM.
//!
//! Every supported kind is wired the same way (a tap and tc redirects, see
//! [`super::tcfilter`]); the kind decides only whether a link is accepted.

use super::Link;

/// The kind of a link in the sandbox's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    /// One end of a veth pair (CNI bridge/ptp, podman, docker, `ip link add veth`).
    Veth,
    /// A macvlan on a host device (CNI macvlan).
    Macvlan,
    /// An ipvlan on a host device (CNI ipvlan; the MAC is the parent's).
    Ipvlan,
    /// A tap: one of ours from a sandbox still running, never wired twice.
    Tap,
}

impl EndpointKind {
    /// The kind of `link`, or `None` when it is not supported.
    pub fn of(link: &Link) -> Option<EndpointKind> {
        match link.kind.as_deref()? {
            "veth" => Some(EndpointKind::Veth),
            "macvlan" => Some(EndpointKind::Macvlan),
            "ipvlan" => Some(EndpointKind::Ipvlan),
            "tun" => Some(EndpointKind::Tap),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(kind: Option<&str>) -> Link {
        Link {
            index: 2,
            name: "eth0".into(),
            mac: Some([2, 0, 0, 0, 0, 1]),
            mtu: Some(1500),
            kind: kind.map(Into::into),
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(
            EndpointKind::of(&link(Some("veth"))),
            Some(EndpointKind::Veth)
        );
        assert_eq!(
            EndpointKind::of(&link(Some("macvlan"))),
            Some(EndpointKind::Macvlan)
        );
        assert_eq!(
            EndpointKind::of(&link(Some("tun"))),
            Some(EndpointKind::Tap)
        );
        assert_eq!(EndpointKind::of(&link(Some("vxlan"))), None);
        assert_eq!(EndpointKind::of(&link(None)), None);
    }
}
