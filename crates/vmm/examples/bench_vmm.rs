//! Benchmarks of the built-in VMM with the tiny test guest (run by bench/bench-vmm.sh).
//!
//! usage: bench_vmm VMM_BINARY GUEST_ELF WORK_DIR
//!
//! Prints, with the accelerator named: VMM start to first guest output (median of 20), RSS
//! overhead (VMM RSS minus guest memory touched), restore to first output (median of 20),
//! and PSS per sandbox for 1 and 20 VMs restored from one snapshot.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 20;
const MEM_MIB: u64 = 128;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn api(sock: &Path, req: &str) -> String {
    let mut s = poll(Duration::from_secs(10), || UnixStream::connect(sock).ok());
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{req} -> {line}");
    line
}

/// Spawns the VMM with serial on a pipe; returns the child and the time to its first byte.
fn time_to_first_output(vmm: &Path, args: &[&str]) -> (Child, Duration) {
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut byte = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut byte)
        .unwrap();
    (child, start.elapsed())
}

/// Waits for the child to exit by itself; returns its user+sys CPU time in ms.
fn wait_cpu_ms(child: Child) -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    // SAFETY: waiting for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32, "wait4 failed");
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

fn finish(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// (RSS of the whole process, RSS of the guest memory mapping), in KiB.
fn rss_split(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = b - a == MEM_MIB << 20;
                    continue;
                }
            }
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap();
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (total, guest)
}

fn pss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vmm = PathBuf::from(&args[1]);
    let guest = args[2].clone();
    let work = PathBuf::from(&args[3]);
    std::fs::create_dir_all(&work).unwrap();
    let accel = if Path::new("/sys/module/kvm_pvm").exists() {
        "KVM (kvm_pvm, software PVM)"
    } else {
        "KVM (hardware)"
    };
    let mem = MEM_MIB.to_string();
    println!("accelerator: {accel}; guest: tiny PVH test guest, 1 vCPU, {MEM_MIB} MiB");

    // 1. Cold start to first output.
    let mut starts = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..RUNS {
        let (child, t) = time_to_first_output(
            &vmm,
            &[
                "--kernel",
                &guest,
                "--cmdline",
                "mode=hello",
                "--mem-mib",
                &mem,
            ],
        );
        starts.push(t.as_secs_f64() * 1e3);
        cpu.push(wait_cpu_ms(child));
    }
    println!(
        "VMM process start to first guest output: median {:.2} ms over {RUNS} runs (min {:.2}, max {:.2})",
        median(starts.clone()),
        starts.iter().cloned().fold(f64::MAX, f64::min),
        starts.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "CPU time of a whole tiny-guest run (VMM start to guest reset, user+sys): median {:.2} ms over {RUNS} runs",
        median(cpu)
    );

    // 2. RSS overhead of an idle guest.
    let sock = work.join("idle.sock");
    let (mut child, _) = time_to_first_output(
        &vmm,
        &[
            "--kernel",
            &guest,
            "--cmdline",
            "mode=idle",
            "--mem-mib",
            &mem,
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    api(&sock, r#"{"action":"metrics"}"#);
    let (total, guest_rss) = rss_split(child.id());
    println!(
        "RSS overhead (idle tiny guest): VMM RSS {total} KiB - guest memory touched {guest_rss} KiB = {} KiB",
        total - guest_rss
    );
    // Snapshot the idle guest for the PSS measurements.
    let idle_snap = work.join("idle-snapshot");
    api(&sock, r#"{"action":"pause"}"#);
    api(
        &sock,
        &format!(r#"{{"action":"snapshot","dir":"{}"}}"#, idle_snap.display()),
    );
    let _ = child.kill();
    let _ = child.wait();

    // 3. Restore to first output: a guest printing ticks continuously.
    let sock = work.join("tick.sock");
    let (child, _) = time_to_first_output(
        &vmm,
        &[
            "--kernel",
            &guest,
            "--cmdline",
            "mode=count count=100000000 delay=50",
            "--mem-mib",
            &mem,
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    let tick_snap = work.join("tick-snapshot");
    api(&sock, r#"{"action":"pause"}"#);
    api(
        &sock,
        &format!(r#"{{"action":"snapshot","dir":"{}"}}"#, tick_snap.display()),
    );
    finish(child);
    let mut restores = Vec::new();
    for _ in 0..RUNS {
        let (child, t) = time_to_first_output(&vmm, &["--restore", tick_snap.to_str().unwrap()]);
        restores.push(t.as_secs_f64() * 1e3);
        finish(child);
    }
    println!(
        "VMM process start (restore) to first guest output: median {:.2} ms over {RUNS} runs (min {:.2}, max {:.2})",
        median(restores.clone()),
        restores.iter().cloned().fold(f64::MAX, f64::min),
        restores.iter().cloned().fold(0.0, f64::max)
    );

    // 4. PSS per sandbox, 1 and 20 idle guests restored from one snapshot.
    for n in [1usize, 20] {
        let mut kids = Vec::new();
        for i in 0..n {
            let sock = work.join(format!("r{i}.sock"));
            let c = Command::new(&vmm)
                .args([
                    "--restore",
                    idle_snap.to_str().unwrap(),
                    "--api-sock",
                    sock.to_str().unwrap(),
                    "--serial-log",
                    "/dev/null",
                ])
                .spawn()
                .unwrap();
            kids.push((c, sock));
        }
        for (_, sock) in &kids {
            api(sock, r#"{"action":"metrics"}"#);
        }
        let pss: u64 = kids.iter().map(|(c, _)| pss_kib(c.id())).sum();
        println!(
            "PSS per sandbox with {n} restored idle guest(s): {:.2} MiB (total {:.2} MiB)",
            pss as f64 / 1024.0 / n as f64,
            pss as f64 / 1024.0
        );
        for (c, _) in kids {
            finish(c);
        }
    }
}
