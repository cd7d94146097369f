#!/usr/bin/env python3
"""`vessel run` vs `runc run` / `crun run` vs a raw QEMU boot, interleaved;
then the host PSS of one idle sandbox.

usage: run_bench.py VESSEL KERNEL WORKDIR RUNS ACCEL
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot_bench import raw_boot  # noqa: E402


def timed(cmd):
    start = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    ms = (time.monotonic() - start) * 1000
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.decode()[-800:]}")
    return ms


def descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid):
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def main():
    vessel, kernel, work, runs, accel = sys.argv[1:6]
    runs = int(runs)
    bundle = os.path.join(work, "bundle")
    raw_initramfs = os.path.join(work, "raw.cpio.gz")
    vroot, rroot, croot = (os.path.join(work, n) for n in ("vroot", "runc-root", "crun-root"))
    results = {"vessel run": [], "runc run": [], "crun run": [], "raw QEMU boot": []}
    for i in range(runs):
        results["vessel run"].append(timed([vessel, "--root", vroot, "run", "--bundle", bundle, f"b{i}"]))
        results["runc run"].append(timed(["runc", "--root", rroot, "run", "--bundle", bundle, f"r{i}"]))
        results["crun run"].append(timed(["crun", "--root", croot, "run", "--bundle", bundle, f"c{i}"]))
        results["raw QEMU boot"].append(raw_boot(kernel, raw_initramfs, accel))
        print(f"run {i + 1:2}/{runs}: " + ", ".join(f"{k} {v[-1]:7.1f} ms" for k, v in results.items()), flush=True)
    print()
    print(f"accelerator: {accel}; busybox `true`; QEMU q35, 1 vCPU, 256 MiB; {runs} runs each, interleaved")
    for k, v in results.items():
        print(f"{k:14}: median {statistics.median(v):8.1f} ms (min {min(v):.1f}, max {max(v):.1f})")

    # Host memory of one idle sandbox.
    with open(os.path.join(bundle, "config.json")) as f:
        cfg = f.read()
    idle = os.path.join(work, "idle")
    os.makedirs(idle)
    os.symlink(os.path.join(bundle, "rootfs"), os.path.join(idle, "rootfs"))
    with open(os.path.join(idle, "config.json"), "w") as f:
        f.write(cfg.replace('"true"', '"sleep", "600"'))
    subprocess.run([vessel, "--root", vroot, "create", "--bundle", idle, "idle"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([vessel, "--root", vroot, "start", "idle"], check=True)
    time.sleep(3)  # let the guest settle before measuring (not synchronization)
    import json
    state = json.loads(subprocess.run([vessel, "--root", vroot, "state", "idle"], check=True,
                                      capture_output=True).stdout)
    pids = descendants(state["pid"])
    rows = []
    for p in pids:
        try:
            name = open(f"/proc/{p}/comm").read().strip()
            rows.append((name, p, pss_kib(p)))
        except OSError:
            pass
    subprocess.run([vessel, "--root", vroot, "delete", "--force", "idle"], check=True)
    print()
    print(f"idle sandbox host PSS ({accel}; sleep 600 in the container):")
    for name, p, kib in rows:
        print(f"  {name:20} pid {p:7}  {kib / 1024:7.1f} MiB")
    print(f"  total{'':27}  {sum(r[2] for r in rows) / 1024:7.1f} MiB")


if __name__ == "__main__":
    main()
