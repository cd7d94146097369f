//! `GuestMetrics`: guest-wide numbers parsed from /proc into typed fields
//! (docs/monitoring.md). Every parser takes the file's text, skips lines it
//! does not understand and caps what it returns.

use vessel_protocol::agent::{
    GuestCpu, GuestDisk, GuestLoad, GuestMemory, GuestMetricsResponse, GuestNetDev,
};

/// Most interfaces and disks reported (the host caps them again).
pub const MAX_DEVICES: usize = 16;
/// Longest interface or disk name reported, in bytes.
pub const MAX_NAME: usize = 32;
/// Bytes in a /proc/diskstats sector.
const SECTOR: u64 = 512;

/// Reads and parses the /proc files. A file that cannot be read leaves its part empty.
pub fn collect() -> GuestMetricsResponse {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    GuestMetricsResponse {
        memory: Some(meminfo(&read("/proc/meminfo"))).into(),
        cpu: Some(cpu(&read("/proc/stat"))).into(),
        load: Some(loadavg(&read("/proc/loadavg"))).into(),
        net: net_dev(&read("/proc/net/dev")),
        disks: diskstats(&read("/proc/diskstats")),
        ..Default::default()
    }
}

fn num(s: Option<&str>) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME
}

pub fn meminfo(text: &str) -> GuestMemory {
    let mut m = GuestMemory::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), value) = (words.next(), num(words.next()).saturating_mul(1024)) else {
            continue;
        };
        match key {
            "MemTotal:" => m.total_bytes = value,
            "MemFree:" => m.free_bytes = value,
            "MemAvailable:" => m.available_bytes = value,
            "Buffers:" => m.buffers_bytes = value,
            "Cached:" => m.cached_bytes = value,
            "Shmem:" => m.shmem_bytes = value,
            _ => {}
        }
    }
    m
}

pub fn cpu(text: &str) -> GuestCpu {
    let mut c = GuestCpu::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("cpu") => {
                let mut n = || num(words.next());
                (c.user, c.nice, c.system, c.idle) = (n(), n(), n(), n());
                (c.iowait, c.irq, c.softirq, c.steal) = (n(), n(), n(), n());
            }
            Some(w) if w.starts_with("cpu") => c.cpus = c.cpus.saturating_add(1),
            _ => {}
        }
    }
    c
}

/// "1.25" -> 125.
fn centi(s: Option<&str>) -> u64 {
    let Some((int, frac)) = s.map(|s| s.split_once('.').unwrap_or((s, "0"))) else {
        return 0;
    };
    let frac: String = frac.chars().chain("00".chars()).take(2).collect();
    num(Some(int))
        .saturating_mul(100)
        .saturating_add(num(Some(&frac)))
}

pub fn loadavg(text: &str) -> GuestLoad {
    let mut words = text.split_whitespace();
    GuestLoad {
        load1_centi: centi(words.next()),
        load5_centi: centi(words.next()),
        load15_centi: centi(words.next()),
        ..Default::default()
    }
}

pub fn net_dev(text: &str) -> Vec<GuestNetDev> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if !name_ok(name) || out.len() == MAX_DEVICES {
            continue;
        }
        let f: Vec<u64> = rest.split_whitespace().map(|w| num(Some(w))).collect();
        if f.len() < 16 {
            continue;
        }
        out.push(GuestNetDev {
            name: name.to_string(),
            rx_bytes: f[0],
            rx_packets: f[1],
            rx_errors: f[2],
            rx_dropped: f[3],
            tx_bytes: f[8],
            tx_packets: f[9],
            tx_errors: f[10],
            tx_dropped: f[11],
            ..Default::default()
        });
    }
    out
}

pub fn diskstats(text: &str) -> Vec<GuestDisk> {
    let mut out = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 14 || out.len() == MAX_DEVICES || !name_ok(w[2]) {
            continue;
        }
        let f = |i: usize| num(Some(w[i]));
        let disk = GuestDisk {
            name: w[2].to_string(),
            reads: f(3),
            read_bytes: f(5).saturating_mul(SECTOR),
            writes: f(7),
            written_bytes: f(9).saturating_mul(SECTOR),
            io_ms: f(12),
            ..Default::default()
        };
        if disk.reads > 0 || disk.writes > 0 {
            out.push(disk);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_bytes() {
        let m = meminfo(
            "MemTotal:         251512 kB\nMemFree:          200000 kB\nMemAvailable:     210000 kB\n\
             Buffers:              12 kB\nCached:            30000 kB\nShmem:  5 kB\nbogus\n",
        );
        assert_eq!(m.total_bytes, 251512 * 1024);
        assert_eq!(m.available_bytes, 210000 * 1024);
        assert_eq!((m.buffers_bytes, m.shmem_bytes), (12 * 1024, 5 * 1024));
    }

    #[test]
    fn cpu_totals_and_count() {
        let c = cpu("cpu  10 1 20 300 4 0 2 0 0 0\ncpu0 10 1 20 300 4 0 2 0 0 0\ncpu1 x\nintr 1\n");
        assert_eq!((c.user, c.nice, c.system, c.idle), (10, 1, 20, 300));
        assert_eq!((c.iowait, c.softirq, c.cpus), (4, 2, 2));
    }

    #[test]
    fn loadavg_in_hundredths() {
        let l = loadavg("0.05 1.5 12.34 1/80 123\n");
        assert_eq!(
            (l.load1_centi, l.load5_centi, l.load15_centi),
            (5, 150, 1234)
        );
        assert_eq!(loadavg("").load1_centi, 0);
    }

    #[test]
    fn net_dev_lines_are_parsed_and_capped() {
        let head = "Inter-|   Receive |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n";
        let line = |n: &str| format!("{n}: 100 2 0 1 0 0 0 0 200 3 0 0 0 0 0 0\n");
        let mut text = head.to_string() + &line("    lo") + &line("eth0");
        let d = net_dev(&text);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[1].name.as_str(), d[1].rx_bytes, d[1].tx_bytes),
            ("eth0", 100, 200)
        );
        assert_eq!((d[1].rx_dropped, d[1].tx_packets), (1, 3));
        for i in 0..40 {
            text += &line(&format!("v{i}"));
        }
        text += &line(&"x".repeat(100));
        assert_eq!(net_dev(&text).len(), MAX_DEVICES);
    }

    #[test]
    fn idle_disks_are_left_out() {
        let d = diskstats(
            "   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n \
             254       0 vda 10 0 80 5 4 0 16 3 0 7 8 0 0 0 0 0 0\nshort line\n",
        );
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].name.as_str(), d[0].reads, d[0].read_bytes),
            ("vda", 10, 80 * 512)
        );
        assert_eq!(
            (d[0].writes, d[0].written_bytes, d[0].io_ms),
            (4, 16 * 512, 7)
        );
    }
}
