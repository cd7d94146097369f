#!/usr/bin/env python3
"""make bench-kvm, inside the KVM lane (benches/kvm.sh starts it there): the
built-in VMM and QEMU-KVM on real (nested) KVM, all in one run.

usage: kvm_bench.py ROOT WORK RUNS

ROOT is the checkout (release binaries in target/release), WORK holds what
benches/kvm.sh prepared on the host: raw.cpio.gz (a tiny /init that prints a
marker and reboots), bundle/ (busybox running `true`) and restore_bench.

1. boot to agent ready (`vessel check --boot`) with the built-in VMM and with
   QEMU-KVM, each against a raw QEMU-KVM boot of the same kernel to /init,
   interleaved, medians of RUNS;
2. `vessel run <bundle> true`, both backends, same raw boot ratio;
3. restore to agent ready vs cold boot (the restore_bench example), both;
4. host PSS of one idle sandbox (every host process of it: supervisor, VMM or
   QEMU, virtiofsd, vsock backend), both;
5. density: idle built-in sandboxes started one after another until L1 has
   1 GiB left (MemAvailable), how many and the PSS each.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot_bench import raw_boot  # noqa: E402
from run_bench import descendants, pss_kib, timed  # noqa: E402

ACCEL = "kvm (nested SVM under TCG)"
BACKENDS = ("builtin", "qemu-kvm")
DENSITY_FLOOR_MIB = 1024


def write_config(work, root, name):
    guest = os.environ["VESSEL_GUEST_DIR"]
    path = os.path.join(work, f"{name}.toml")
    text = (f'state_root = "/run/vessel-bench/{name}"\n'
            f'guest_kernel = "{guest}/vmlinux"\nguest_initramfs = "{guest}/initramfs.cpio.gz"\n')
    if name == "builtin":
        text += ('hypervisor = "builtin"\n[builtin]\n'
                 f'vmm_path = "{root}/target/release/vessel-vmm"\njailer = true\n'
                 f'jailer_path = "{root}/target/release/vessel-jailer"\n')
    else:
        text += 'hypervisor = "qemu"\n[qemu]\naccelerator = "kvm"\n'
    with open(path, "w") as f:
        f.write(text)
    return path


def check_boot(vessel, cfg):
    out = subprocess.run([vessel, "--config", cfg, "check", "--boot"], capture_output=True,
                         text=True, timeout=300)
    m = re.search(r"^agent ready in:\s+(\d+) ms", out.stdout, re.M)
    a = re.search(r"^accelerator:\s+(\S+)$", out.stdout, re.M)
    if out.returncode != 0 or not m or not a:
        sys.exit(f"vessel check --boot ({cfg}) failed:\n{out.stdout}{out.stderr}")
    if a.group(1) != "kvm":
        sys.exit(f"vessel check --boot ({cfg}) ran on {a.group(1)}, not kvm")
    return float(m.group(1))


def median_line(name, v, unit="ms", ref=None):
    m = statistics.median(v)
    ratio = f"  {m / ref:5.2f}x raw" if ref else ""
    print(f"  {name:34} median {m:8.1f} {unit} (min {min(v):.1f}, max {max(v):.1f}, n={len(v)}){ratio}")
    return m


def vessel(v, cfg, root, *args, **kw):
    return subprocess.run([v, "--config", cfg, "--root", root, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, **kw)


def sandbox_pids(state):
    """Every host process of a container's sandbox: the supervisor and its
    descendants (VMM or jailer, virtiofsd, vsock backend), and any process whose
    command line names the sandbox's run directory."""
    pids = set(descendants(state["pid"]))
    vm_dir = state["vm_dir"]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if vm_dir.encode() in f.read():
                        pids.add(int(d))
            except OSError:
                pass
    return sorted(pids)


def pss_rows(pids):
    rows = []
    for p in pids:
        try:
            with open(f"/proc/{p}/comm") as f:
                rows.append((f.read().strip(), p, pss_kib(p)))
        except OSError:
            pass
    return rows


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def start_idle(v, cfg, root, bundle, cid):
    """Creates and starts an idle container (`sleep` in busybox); returns its state."""
    for cmd in (["create", "--bundle", bundle, cid], ["start", cid]):
        # As with runc, the container's process inherits create's stdio: pipes here
        # would stay open for the container's life, so output goes to a file.
        with tempfile.TemporaryFile() as err:
            out = subprocess.run([v, "--config", cfg, "--root", root, *cmd],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err, timeout=300)
            if out.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{' '.join(cmd)}: {err.read().decode(errors='replace').strip()[-600:]}")
    out = vessel(v, cfg, root, "state", cid)
    state = json.loads(out.stdout)
    # The OCI state has the supervisor's pid; the run directory (vm_dir) is in the
    # runtime's own record of the container.
    with open(os.path.join(root, cid, "state.json")) as f:
        state["vm_dir"] = json.load(f)["vm_dir"]
    return state


def settled_pss(state, timeout=30):
    """PSS rows once the sandbox's total stops moving (within 1% over a
    second), or after `timeout` s: a fresh guest still touches memory."""
    deadline = time.monotonic() + timeout
    prev = None
    while True:
        rows = pss_rows(sandbox_pids(state))
        total = sum(r[2] for r in rows)
        if prev is not None and abs(total - prev) <= 0.01 * prev or time.monotonic() > deadline:
            return rows
        prev = total
        time.sleep(1)


def main():
    root, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    v = os.path.join(root, "target/release/vessel")
    kernel = os.path.join(os.environ["VESSEL_GUEST_DIR"], "vmlinux")
    raw_initramfs = os.path.join(work, "raw.cpio.gz")
    bundle = os.path.join(work, "bundle")
    cfgs = {b: write_config(work, root, b) for b in BACKENDS}
    roots = {b: f"/run/vessel-bench/{b}-cli" for b in BACKENDS}
    print(f"bench-kvm: accelerator {ACCEL}; L1: {os.uname().release}, {os.cpu_count()} vCPUs, "
          f"{mem_available_mib()} MiB available; guest {kernel}; sandboxes 1 vCPU, 256 MiB; "
          f"{runs} runs each, interleaved", flush=True)

    # 1 and 2: boot to agent and `vessel run true`, against the raw boot.
    raw, boot, run = [], {b: [] for b in BACKENDS}, {b: [] for b in BACKENDS}
    for i in range(runs):
        raw.append(raw_boot(kernel, raw_initramfs, "kvm"))
        for b in BACKENDS:
            boot[b].append(check_boot(v, cfgs[b]))
            run[b].append(timed([v, "--config", cfgs[b], "--root", roots[b], "run", "--bundle",
                                 bundle, f"t{i}"]))
        print(f"run {i + 1:2}/{runs}: raw {raw[-1]:7.1f} ms; "
              + "; ".join(f"{b}: boot {boot[b][-1]:7.1f} ms, run {run[b][-1]:7.1f} ms"
                          for b in BACKENDS), flush=True)
    print()
    print(f"boot and run ({ACCEL}):")
    r = median_line("raw QEMU-KVM boot to /init marker", raw)
    for b in BACKENDS:
        median_line(f"{b}: boot to agent ready", boot[b], ref=r)
        median_line(f"{b}: vessel run <bundle> true", run[b], ref=r)

    # 3: restore vs cold boot.
    restore_ratio = {}
    for b in BACKENDS:
        print(f"\nrestore vs cold boot, {b} ({ACCEL}):", flush=True)
        out = subprocess.run([os.path.join(work, "restore_bench"), str(runs)],
                             env={**os.environ, "VESSEL_CONFIG": cfgs[b]}, capture_output=True,
                             text=True, timeout=3600)
        if out.returncode != 0:
            sys.exit(f"restore_bench ({b}) failed:\n{out.stdout}{out.stderr}")
        for line in out.stdout.splitlines():
            print(f"  {line}")
            m = re.match(r"restore / cold boot\s+([0-9.]+)x", line)
            if m:
                restore_ratio[b] = float(m.group(1))

    # 4: PSS of one idle sandbox.
    idle = os.path.join(work, "idle")
    single = {}
    for b in BACKENDS:
        st = start_idle(v, cfgs[b], roots[b], idle, f"idle-{b}")
        rows = settled_pss(st)
        vessel(v, cfgs[b], roots[b], "delete", "--force", f"idle-{b}")
        single[b] = sum(r[2] for r in rows) / 1024
        print(f"\nhost PSS of one idle sandbox, {b} ({ACCEL}; `sleep` in the container):")
        for name, p, kib in rows:
            print(f"  {name:20} pid {p:7}  {kib / 1024:7.1f} MiB")
        print(f"  {'total':34} {single[b]:7.1f} MiB")

    # 5: density of idle built-in sandboxes.
    b = "builtin"
    start_avail = mem_available_mib()
    print(f"\ndensity, {b} ({ACCEL}): idle sandboxes until MemAvailable < {DENSITY_FLOOR_MIB} MiB "
          f"(now {start_avail} MiB)", flush=True)
    states, stop_reason = [], "MemAvailable reached the floor"
    t0 = time.monotonic()
    while mem_available_mib() >= DENSITY_FLOOR_MIB:
        try:
            states.append(start_idle(v, cfgs[b], roots[b], idle, f"d{len(states)}"))
        except RuntimeError as e:
            stop_reason = f"sandbox {len(states)} failed to start: {e}"
            break
        if len(states) % 5 == 0:
            print(f"  {len(states):3} sandboxes, MemAvailable {mem_available_mib()} MiB, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    pss_each = [sum(r[2] for r in pss_rows(sandbox_pids(s))) / 1024 for s in states]
    end_avail = mem_available_mib()
    n = len(states)
    print(f"  stopped: {stop_reason}")
    print(f"  sandboxes running        : {n} (started in {time.monotonic() - t0:.0f} s)")
    if n:
        print(f"  host PSS per sandbox     : median {statistics.median(pss_each):.1f} MiB "
              f"(min {min(pss_each):.1f}, max {max(pss_each):.1f}); total {sum(pss_each):.0f} MiB")
        print(f"  MemAvailable per sandbox : {(start_avail - end_avail) / n:.1f} MiB "
              f"({start_avail} -> {end_avail} MiB)")
    for i in range(n):
        vessel(v, cfgs[b], roots[b], "delete", "--force", f"d{i}")

    print(f"\nsummary ({ACCEL}; goals from issue 9):")
    print(f"  built-in boot to agent / raw boot : {statistics.median(boot['builtin']) / r:.2f}x "
          f"(goal <= 1.3x)")
    for b in BACKENDS:
        print(f"  {b} restore / cold boot{'':{12 - len(b)}}: {restore_ratio.get(b, float('nan')):.2f}x "
              "(goal <= 0.1x)")
    print(f"  host PSS, idle built-in sandbox    : {single['builtin']:.1f} MiB (goal <= 16 MiB)")
    print(f"  idle built-in sandboxes to 1 GiB left: {n}")


if __name__ == "__main__":
    main()
