//! What a sandbox wired into its namespace, kept on disk while it is wired:
//! the tc qdiscs on the namespace's own links (made by CNI, podman or a
//! person) outlive a supervisor that was SIGKILLed, and the taps do not (they
//! go with the last fd). A cleanup after such a crash (`vessel delete`)
//! removes exactly the qdiscs the record names.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{netns, tcfilter, NetError};

/// A record is ours (in the state root), but never read a huge one.
const MAX_RECORD: u64 = 64 * 1024;

/// The links of `netns` that carry an ingress qdisc of ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WiringRecord {
    pub netns: PathBuf,
    pub links: Vec<RecordedLink>,
}

/// A link by index and name: both must still match to be touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedLink {
    pub index: u32,
    pub name: String,
}

/// Where sandbox `id`'s record is kept.
pub fn record_path(state_root: &Path, id: &str) -> PathBuf {
    state_root.join("wired").join(format!("{id}.json"))
}

impl WiringRecord {
    /// Writes the record atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    }

    fn load(path: &Path) -> std::io::Result<Option<WiringRecord>> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut text = Vec::new();
        file.take(MAX_RECORD).read_to_end(&mut text)?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(std::io::Error::other)
    }
}

/// Removes the record of sandbox `id` (idempotent).
pub fn forget(state_root: &Path, id: &str) {
    let path = record_path(state_root, id);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", path.display());
        }
    }
}

/// After sandbox `id`'s supervisor died without detaching: removes the
/// ingress qdiscs (and so their filters) its record names from links that
/// still have the recorded index and name, then the record. Idempotent; a
/// namespace that is gone has nothing left to clean.
pub async fn undo_recorded(state_root: &Path, id: &str) {
    if !vessel_protocol::id::valid_id(id) {
        return;
    }
    let path = record_path(state_root, id);
    match WiringRecord::load(&path) {
        Ok(Some(record)) => {
            if let Err(e) = unwire(&record).await {
                log::warn!("sandbox {id}: {}", crate::chain(&e));
            }
        }
        Ok(None) => return,
        Err(e) => log::warn!("sandbox {id}: read {}: {e}", path.display()),
    }
    forget(state_root, id);
}

async fn unwire(record: &WiringRecord) -> Result<(), NetError> {
    let ns = match netns::open(&record.netns) {
        Ok(ns) => ns,
        Err(NetError::Netns { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = netns::run_in(ns.as_fd(), || {
        let _guard = rt.enter();
        rtnetlink::new_connection().map_err(NetError::Socket)
    })?;
    let conn = tokio::spawn(conn);
    for link in &record.links {
        if super::link_name(&handle, link.index).await.as_deref() == Some(link.name.as_str())
            && tcfilter::has_ingress(&handle, link.index).await?
        {
            tcfilter::disconnect(&handle, link.index, &link.name).await;
        }
    }
    conn.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "c1");
        assert_eq!(WiringRecord::load(&path).unwrap(), None);
        let r = WiringRecord {
            netns: "/var/run/netns/x".into(),
            links: vec![RecordedLink {
                index: 2,
                name: "eth0".into(),
            }],
        };
        r.save(&path).unwrap();
        assert_eq!(WiringRecord::load(&path).unwrap(), Some(r));
        forget(dir.path(), "c1");
        assert!(!path.exists());
        forget(dir.path(), "c1");
    }

    #[test]
    fn a_garbled_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "c1");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"netns\": 3}").unwrap();
        assert!(WiringRecord::load(&path).is_err());
    }
}
