#!/usr/bin/env python3
"""Time to agent-ready (`vessel check --boot`) next to a raw QEMU boot of the
same kernel to a marker printed by a minimal /init, measured in the same run.

usage: boot_bench.py VESSEL KERNEL RAW_INITRAMFS RUNS ACCEL
"""
import re
import statistics
import subprocess
import sys
import time

MARKER = b"VESSEL-RAW-INIT-MARKER"


def raw_boot(kernel, initramfs, accel):
    # Same machine, memory, CPU model and kernel command line as the QEMU backend.
    cpu = "host" if accel == "kvm" else "max"
    args = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-no-reboot", "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-machine", f"q35,accel={accel},memory-backend=mem", "-cpu", cpu, "-m", "256M", "-smp", "1",
        "-kernel", kernel, "-initrd", initramfs,
        "-append", "console=ttyS0 reboot=t panic=-1 quiet cryptomgr.notests no_timer_check "
                   "rcupdate.rcu_expedited=1 pci=lastbus=0",
        "-serial", "stdio",
    ]
    start = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    elapsed = None
    while True:
        chunk = p.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
        if MARKER in seen:
            elapsed = time.monotonic() - start
            break
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if elapsed is None:
        sys.exit("raw boot: marker not seen; console: %r" % seen[-500:])
    return elapsed * 1000


def vessel_boot(vessel):
    out = subprocess.run([vessel, "check", "--boot"], capture_output=True, text=True, timeout=120)
    m = re.search(r"agent ready in:\s+(\d+) ms", out.stdout)
    if out.returncode != 0 or not m:
        sys.exit("vessel check --boot failed:\n" + out.stdout + out.stderr)
    accel = re.search(r"^accelerator:\s+(\S+)$", out.stdout, re.M).group(1)
    return float(m.group(1)), accel


def main():
    vessel, kernel, raw_initramfs, runs, accel = sys.argv[1:6]
    runs = int(runs)
    raw, ves = [], []
    seen_accel = set()
    for i in range(runs):
        raw.append(raw_boot(kernel, raw_initramfs, accel))
        t, a = vessel_boot(vessel)
        ves.append(t)
        seen_accel.add(a)
        print(f"run {i + 1:2}/{runs}: raw boot to /init marker {raw[-1]:7.1f} ms, "
              f"vessel agent-ready {ves[-1]:7.1f} ms", flush=True)
    r, v = statistics.median(raw), statistics.median(ves)
    print()
    print(f"accelerator: {accel} (vessel reported: {', '.join(sorted(seen_accel))}); "
          f"QEMU q35, 1 vCPU, 256 MiB; {runs} runs each, interleaved")
    print(f"raw QEMU boot to /init marker : median {r:7.1f} ms (min {min(raw):.1f}, max {max(raw):.1f})")
    print(f"vessel check --boot agent-ready: median {v:7.1f} ms (min {min(ves):.1f}, max {max(ves):.1f})"
          " (from command start: host checks, helper start, boot, vsock handshake, Health.Check, Version)")
    print(f"ratio agent-ready / raw boot   : {v / r:.2f}x")


if __name__ == "__main__":
    main()
