//! The tcfilter model: an ingress qdisc on the endpoint's link and on its
//! tap, and a u32 match-all filter with a mirred egress redirect on each, so
//! every frame that arrives on one leaves through the other.

use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::Handle;

use super::{Link, NetError};

/// Parent id of the ingress qdisc (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;
/// ETH_P_ALL in network byte order, as `tc ... protocol all` sends it.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

/// Redirects `link` <-> `tap` both ways. On failure nothing is left.
pub async fn connect(handle: &Handle, link: &Link, tap: &Link) -> Result<(), NetError> {
    let res = connect_in(handle, link, tap).await;
    if res.is_err() {
        disconnect(handle, link.index, &link.name).await;
        disconnect(handle, tap.index, &tap.name).await;
    }
    res
}

async fn connect_in(handle: &Handle, link: &Link, tap: &Link) -> Result<(), NetError> {
    for (from, to) in [(link, tap), (tap, link)] {
        handle
            .qdisc()
            .add(from.index as i32)
            .ingress()
            .execute()
            .await
            .map_err(|source| NetError::Tc {
                what: format!("add an ingress qdisc to {}", from.name),
                source,
            })?;
        handle
            .traffic_filter(from.index as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(PROTOCOL_ALL)
            .redirect(to.index)
            .map_err(|source| NetError::Tc {
                what: format!("build the redirect {} -> {}", from.name, to.name),
                source,
            })?
            .execute()
            .await
            .map_err(|source| NetError::Tc {
                what: format!("redirect {} -> {}", from.name, to.name),
                source,
            })?;
    }
    Ok(())
}

/// Deletes the ingress qdisc of link `index` (and with it its filters).
/// Idempotent: a link without one, or gone, is not an error.
pub async fn disconnect(handle: &Handle, index: u32, name: &str) {
    let mut del = handle.qdisc().del(index as i32);
    let msg = del.message_mut();
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = TcHandle::from(INGRESS_PARENT);
    match del.execute().await {
        Ok(()) => log::debug!("removed the ingress qdisc of {name}"),
        Err(rtnetlink::Error::NetlinkError(e))
            if [libc::ENOENT, libc::EINVAL, libc::ENODEV]
                .iter()
                .any(|c| e.raw_code() == -c) => {}
        Err(e) => log::warn!("remove the ingress qdisc of {name}: {e}"),
    }
}

/// Whether link `index` has an ingress qdisc.
pub async fn has_ingress(handle: &Handle, index: u32) -> Result<bool, NetError> {
    use futures::TryStreamExt;
    let qdiscs: Vec<_> = handle
        .qdisc()
        .get()
        .index(index as i32)
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(|source| NetError::Tc {
            what: format!("list the qdiscs of link {index}"),
            source,
        })?;
    Ok(qdiscs
        .iter()
        .any(|q| q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS))
}
