//! One endpoint for every sandbox on the host (`vessel monitor`): finds the
//! sandboxes' metrics sockets under the state roots, scrapes them at once (each
//! bounded by [`SCRAPE_TIMEOUT`]), merges their families and adds
//! `vessel_sandboxes{state,backend}`. A sandbox that does not answer in time is
//! counted `unresponsive` and costs the scrape no more than the timeout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use super::http;

/// Where `vessel monitor` listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9653";
/// Longest wait for one sandbox's answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read from one sandbox.
pub const MAX_SCRAPE_BYTES: usize = 4 << 20;
/// Most sockets scraped (the rest are counted `unscraped`).
pub const MAX_SANDBOXES: usize = 4096;
/// Largest merged answer: the sandboxes whose text would take it past this are
/// left out and counted `over_limit`.
pub const MAX_TOTAL_BYTES: usize = 64 << 20;

/// Directories of a state root that hold no run directory. `shared` holds the
/// guest-writable shares: never looked into.
const NOT_SANDBOXES: [&str; 3] = ["shared", "templates", "netns"];

/// The metrics sockets under `roots`: `<root>/<id>/metrics.sock` (the shim's run
/// directories and those under [`crate::container::VM_ROOT_FALLBACK`]) and
/// `<root>/<id>/<vm id>/metrics.sock` (the CLI's, inside its container directories,
/// [`crate::container::vm_location`]: 16 hex digits, so never the container's
/// guest-writable `shared` directory). Symbolic links are not followed; each socket is
/// listed once.
pub fn discover(roots: &[PathBuf]) -> Vec<Found> {
    let mut found = std::collections::BTreeSet::new();
    let dirs = |p: &Path, keep: fn(&str) -> bool| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| e.file_name().to_str().is_some_and(keep))
            .map(|e| e.path())
            .collect()
    };
    let sandbox_dir = |name: &str| !NOT_SANDBOXES.contains(&name);
    let vm_dir = |name: &str| name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit());
    let is_socket = |p: &Path| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
    };
    for root in roots {
        for d in dirs(root, sandbox_dir) {
            let id = d
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            for candidate in std::iter::once(d.clone())
                .chain(dirs(&d, vm_dir))
                .map(|d| d.join(super::SOCKET))
            {
                if is_socket(&candidate) {
                    found.insert((candidate, id.clone()));
                }
            }
        }
    }
    found
        .into_iter()
        .map(|(socket, id)| Found { socket, id })
        .collect()
}

/// A sandbox's metrics socket, and the name of its directory under the state
/// root (the pod id of the shim's, the container id of the CLI's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub socket: PathBuf,
    pub id: String,
}

/// Scrape errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ScrapeError {
    /// cannot connect to {0}
    Connect(String, #[source] std::io::Error),
    /// no answer from {0} within {1:?}
    Timeout(String, Duration),
    /// scraping {0}
    Http(String, #[source] http::HttpError),
}

/// One sandbox's metrics text.
pub async fn scrape(socket: &Path) -> Result<String, ScrapeError> {
    let name = socket.display().to_string();
    let work = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| ScrapeError::Connect(name.clone(), e))?;
        http::get(&mut s, "/metrics", MAX_SCRAPE_BYTES)
            .await
            .map_err(|e| ScrapeError::Http(name.clone(), e))
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(ScrapeError::Timeout(name.clone(), SCRAPE_TIMEOUT)))
}

/// Scrapes every sandbox under `roots` and merges the answers into one text.
pub async fn collect(roots: &[PathBuf]) -> String {
    let found = discover(roots);
    let unscraped = found.len().saturating_sub(MAX_SANDBOXES);
    let found = &found[..found.len().min(MAX_SANDBOXES)];
    let answers = futures::future::join_all(found.iter().map(|f| scrape(&f.socket))).await;
    let mut texts = Vec::new();
    let mut total = 0;
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut up = String::from(
        "# HELP vessel_sandbox_up 1 if the sandbox's metrics socket answered this scrape \
         in time, by the name of its directory in the state root.\n\
         # TYPE vessel_sandbox_up gauge\n",
    );
    for (f, answer) in found.iter().zip(answers) {
        let key = match answer {
            Ok(text) if total + text.len() > MAX_TOTAL_BYTES => {
                log::warn!(
                    "{}: left out, the answer would exceed {MAX_TOTAL_BYTES} bytes",
                    f.socket.display()
                );
                ("over_limit".to_string(), "unknown".to_string())
            }
            Ok(text) => {
                total += text.len();
                let key = sandbox_state(&text);
                texts.push(text);
                key
            }
            Err(e) => {
                log::warn!("{}", crate::chain(&e));
                ("unresponsive".to_string(), "unknown".to_string())
            }
        };
        let answered = u8::from(key.0 != "unresponsive");
        up += &format!(
            "vessel_sandbox_up{{sandbox_id=\"{}\"}} {answered}\n",
            label_value(&f.id)
        );
        *counts.entry(key).or_default() += 1;
    }
    if unscraped > 0 {
        counts.insert(
            ("unscraped".to_string(), "unknown".to_string()),
            unscraped as u64,
        );
    }
    let mut extra = String::from(
        "# HELP vessel_sandboxes Sandboxes on this host by state and hypervisor backend.\n\
         # TYPE vessel_sandboxes gauge\n",
    );
    for ((state, backend), n) in counts {
        extra += &format!("vessel_sandboxes{{state=\"{state}\",backend=\"{backend}\"}} {n}\n");
    }
    extra += &up;
    merge(&texts, &extra)
}

/// `v` as an OpenMetrics label value: `\`, `"` and line feeds escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `state` and `backend` of the `vessel_sandbox_info` sample in one sandbox's text.
fn sandbox_state(text: &str) -> (String, String) {
    let line = text
        .lines()
        .find(|l| l.starts_with("vessel_sandbox_info{"))
        .unwrap_or_default();
    let label = |key: &str| {
        let start = line.find(&format!("{key}=\""))? + key.len() + 2;
        let value = &line[start..];
        let value = &value[..value.find('"')?];
        // Host-made enum values; anything else is not ours.
        value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            .then(|| value.to_string())
    };
    (
        label("state").unwrap_or_else(|| "unknown".into()),
        label("backend").unwrap_or_else(|| "unknown".into()),
    )
}

/// Merges OpenMetrics texts: each family once (its `# HELP`/`# TYPE`/`# UNIT` from the
/// first text that has it) with the samples of every text, then `extra` (whole
/// families), then `# EOF`.
pub fn merge(texts: &[String], extra: &str) -> String {
    struct FamilyText {
        head: Vec<String>,
        samples: Vec<String>,
    }
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, FamilyText> = BTreeMap::new();
    for text in texts {
        let mut current: Option<String> = None;
        let mut head_from_this_text = false;
        for line in text.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.split(' ').nth(1).unwrap_or_default().to_string();
                if current.as_deref() != Some(name.as_str()) {
                    head_from_this_text = !families.contains_key(&name);
                    if head_from_this_text {
                        order.push(name.clone());
                        families.insert(
                            name.clone(),
                            FamilyText {
                                head: Vec::new(),
                                samples: Vec::new(),
                            },
                        );
                    }
                    current = Some(name.clone());
                }
                if head_from_this_text {
                    if let Some(f) = families.get_mut(&name) {
                        f.head.push(line.to_string());
                    }
                }
            } else if let Some(f) = current.as_ref().and_then(|c| families.get_mut(c)) {
                f.samples.push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let f = &families[&name];
        for l in f.head.iter().chain(&f.samples) {
            out += l;
            out.push('\n');
        }
    }
    out += extra;
    out += "# EOF\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, state: &str) -> String {
        format!(
            "# HELP vessel_sandbox_info The sandbox.\n# TYPE vessel_sandbox_info gauge\n\
             vessel_sandbox_info{{sandbox_id=\"{id}\",backend=\"qemu\",accelerator=\"tcg\",state=\"{state}\"}} 1\n\
             # HELP vessel_guest_cpu_seconds Guest CPU.\n# TYPE vessel_guest_cpu_seconds counter\n\
             vessel_guest_cpu_seconds_total{{sandbox_id=\"{id}\",mode=\"user\"}} 1.5\n# EOF\n"
        )
    }

    #[test]
    fn families_are_merged_once_with_every_sample() {
        let merged = merge(
            &[sandbox("a", "running"), sandbox("b", "running")],
            "# HELP x X.\n# TYPE x gauge\nx 1\n",
        );
        assert_eq!(
            merged.matches("# TYPE vessel_sandbox_info gauge").count(),
            1
        );
        assert_eq!(merged.matches("# TYPE vessel_guest_cpu_seconds").count(), 1);
        assert_eq!(merged.matches("# EOF").count(), 1);
        assert!(merged.ends_with("x 1\n# EOF\n"));
        let lines: Vec<&str> = merged.lines().collect();
        let a = lines
            .iter()
            .position(|l| l.contains("mode=\"user\"") && l.contains("\"a\""));
        let b = lines
            .iter()
            .position(|l| l.contains("mode=\"user\"") && l.contains("\"b\""));
        let head = lines
            .iter()
            .position(|l| *l == "# TYPE vessel_guest_cpu_seconds counter");
        // Both samples follow their family's one head, together.
        assert_eq!(
            (head.unwrap() + 1, head.unwrap() + 2),
            (a.unwrap(), b.unwrap())
        );
    }

    #[test]
    fn state_and_backend_are_read_from_the_info_sample() {
        assert_eq!(
            sandbox_state(&sandbox("a", "vm_exited")),
            ("vm_exited".into(), "qemu".into())
        );
        assert_eq!(sandbox_state("junk"), ("unknown".into(), "unknown".into()));
        assert_eq!(
            sandbox_state("vessel_sandbox_info{state=\"a\\\"b\"} 1"),
            ("unknown".into(), "unknown".into())
        );
    }

    #[tokio::test]
    async fn a_silent_sandbox_costs_one_timeout_and_is_counted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("pod1");
        std::fs::create_dir(&dir).unwrap();
        // Accepts, never answers.
        let _silent =
            std::os::unix::net::UnixListener::bind(dir.join(super::super::SOCKET)).unwrap();
        let nested = root.path().join("c1").join("0123456789abcdef");
        std::fs::create_dir_all(&nested).unwrap();
        let answering = tokio::net::UnixListener::bind(nested.join(super::super::SOCKET)).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = answering.accept().await.unwrap();
                tokio::spawn(async move {
                    let _ = http::answer(&mut c, async { sandbox("c1", "running") }).await;
                });
            }
        });
        std::fs::write(root.path().join("metrics.sock"), "not a socket").unwrap();
        // Guest-writable shares are never looked into.
        for planted in ["shared/pod1", "c1/shared"] {
            let d = root.path().join(planted);
            std::fs::create_dir_all(&d).unwrap();
            std::os::unix::net::UnixListener::bind(d.join(super::super::SOCKET)).unwrap();
        }
        let found = discover(&[root.path().to_path_buf()]);
        assert_eq!(
            found.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["c1", "pod1"]
        );
        let started = std::time::Instant::now();
        let text = collect(&[root.path().to_path_buf()]).await;
        assert!(started.elapsed() < SCRAPE_TIMEOUT + Duration::from_secs(1));
        assert!(
            text.contains("vessel_sandboxes{state=\"running\",backend=\"qemu\"} 1"),
            "{text}"
        );
        assert!(text.contains("vessel_sandboxes{state=\"unresponsive\",backend=\"unknown\"} 1"));
        assert!(text.contains("sandbox_id=\"c1\""));
        // The silent one is named, not waited for beyond the timeout.
        assert!(
            text.contains("vessel_sandbox_up{sandbox_id=\"pod1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("vessel_sandbox_up{sandbox_id=\"c1\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
