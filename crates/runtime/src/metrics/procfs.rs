//! What /proc says about one host process of a sandbox: RSS, CPU time, open file
//! descriptors, threads ([`read`], cheap), and PSS ([`pss`], not). Pure parsers
//! over the files' text, and readers.

use std::path::Path;

/// Longest process name kept (the kernel's `comm` is at most 15 bytes).
const MAX_COMM: usize = 16;

/// One host process, as /proc reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcStats {
    pub pid: u32,
    /// `comm`, reduced to `[A-Za-z0-9._-]` (others become `_`).
    pub comm: String,
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub fds: u64,
    pub threads: u64,
}

/// Reads `/proc/<pid>`; `None` if the process is gone.
pub fn read(proc_root: &Path, pid: u32, clock_ticks: u64) -> Option<ProcStats> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let (comm, cpu_ticks) = stat_fields(&stat)?;
    let (rss_kib, threads) = status_fields(&status);
    let fds = std::fs::read_dir(dir.join("fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcStats {
        pid,
        comm,
        rss_bytes: rss_kib.saturating_mul(1024),
        cpu_seconds: cpu_ticks as f64 / clock_ticks.max(1) as f64,
        fds,
        threads,
    })
}

/// PSS of `/proc/<pid>` in bytes (`smaps_rollup`); `None` if it cannot be read (the
/// process is gone, an older kernel, no permission). It walks every page of the
/// process under its mmap lock: milliseconds for a big VM, so it is read off the
/// scrape path.
pub fn pss(proc_root: &Path, pid: u32) -> Option<u64> {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("smaps_rollup"))
        .ok()
        .and_then(|t| kib_field(&t, "Pss:"))
        .map(|k| k.saturating_mul(1024))
}

/// The kernel's clock ticks a second (`_SC_CLK_TCK`).
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100, |t| t as u64)
}

/// `/proc/<pid>/stat`: the name (between the first `(` and the LAST `)`: a name may
/// hold parentheses) and utime + stime in clock ticks.
pub fn stat_fields(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After ")": state(3) ppid(4) ... utime(14) stime(15).
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)?.saturating_add(field(15)?);
    Some((sanitize_comm(comm), ticks))
}

fn sanitize_comm(comm: &str) -> String {
    comm.chars()
        .take(MAX_COMM)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `/proc/<pid>/status`: VmRSS (KiB; 0 for a kernel thread) and Threads.
pub fn status_fields(status: &str) -> (u64, u64) {
    (
        kib_field(status, "VmRSS:").unwrap_or(0),
        kib_field(status, "Threads:").unwrap_or(0),
    )
}

/// The number after `key` at the start of a line (`Pss:   1234 kB` -> 1234).
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_name_may_hold_parentheses_and_spaces() {
        let stat =
            "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        let (comm, ticks) = stat_fields(stat).unwrap();
        assert_eq!(comm, "qemu__x__y");
        assert_eq!(ticks, 300);
        assert!(stat_fields("4242 (x) S 1").is_none());
        assert!(stat_fields("garbage").is_none());
    }

    #[test]
    fn status_and_rollup_fields() {
        let status = "Name:\tqemu\nVmRSS:\t  123456 kB\nThreads:\t5\n";
        assert_eq!(status_fields(status), (123456, 5));
        assert_eq!(status_fields("Name: kthread\n"), (0, 0));
        assert_eq!(kib_field("Rss: 10 kB\nPss:  7 kB\n", "Pss:"), Some(7));
    }

    #[test]
    fn own_process_is_read() {
        let me = read(Path::new("/proc"), std::process::id(), clock_ticks()).unwrap();
        assert!(me.rss_bytes > 0 && me.threads >= 1 && me.fds >= 3, "{me:?}");
        assert!(pss(Path::new("/proc"), std::process::id()).unwrap_or(1) > 0);
        assert!(read(Path::new("/proc"), u32::MAX, 100).is_none());
    }
}
