#!/usr/bin/env python3
"""QEMU template + hot-plug experiment driver (called by run.sh).

1. template: boot a q35 VM with memfd share=on guest RAM, virtio-serial, empty
   pcie-root-ports and NO vhost-user device; wait for the guest's READY line;
   `stop` + `migrate` to a file (descriptor passed with getfd, as
   crates/hypervisor/src/qemu/snapshot.rs does); quit.
2. clones: new QEMU, same command line + `-incoming defer`, `migrate-incoming`
   from the file, `cont`; then start virtiofsd, `chardev-add` + `device_add
   vhost-user-fs-pci,bus=rp0`; wait until the guest mounted the tag;
   optionally the same for vhost-user-vsock-pci on rp1 (vhost-device-vsock)
   and a guest->host vsock connection.
3. cold: for comparison, a VM with vhost-user-fs on the command line from the start.

Every step prints its wall time (time.monotonic on the host). Console lines are
timed by polling the console file every 5 ms.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

POLL = 0.005


def log(msg):
    print(msg, flush=True)


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.s.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QMP socket {path} not up after {timeout}s")
                time.sleep(POLL)
        self.f = self.s.makefile("rb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None, fd=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        data = json.dumps(msg).encode() + b"\n"
        if fd is not None:
            socket.send_fds(self.s, [data], [fd])
        else:
            self.s.sendall(data)
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {name}")
            r = json.loads(line)
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error'].get('desc')}")
            return r.get("return")

    def close(self):
        self.s.close()


class Console:
    """Reads the guest console file and timestamps each complete line."""

    def __init__(self, path):
        self.path = path
        self.lines = []  # (host monotonic time, text)
        self.pos = 0
        self.buf = b""

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.monotonic()
        self.pos += len(data)
        self.buf += data
        *complete, self.buf = self.buf.split(b"\n")
        for ln in complete:
            self.lines.append((now, ln.decode(errors="replace").rstrip("\r")))

    def wait(self, marker, proc, timeout, start_index=0):
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for i in range(start_index, len(self.lines)):
                if marker in self.lines[i][1]:
                    return self.lines[i][0], i
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({proc.returncode}) before '{marker}'")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no '{marker}' on the console after {timeout}s")
            time.sleep(POLL)

    def hp_lines(self, start_index=0):
        return [t for _, t in self.lines[start_index:] if "HP:" in t]


def ram_path(a, name):
    """--ram-dir mode: guest RAM in a file there (memory-backend-file,share=on), left out
    of the migration stream (x-ignore-shared); None: memfd RAM in the stream."""
    return os.path.join(a.ram_dir, f"{name}.ram") if a.ram_dir else None


def ram_file_use(path):
    """How much of a guest RAM file on tmpfs is allocated (host memory, mapped or not)."""
    if not path:
        return ""
    return f"; RAM file allocated {os.stat(path).st_blocks * 512 / 2**20:.1f} MiB"


def mem_of(pid):
    """Rss and Pss of a process in MiB (smaps_rollup)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem"):
                out[k] = int(v.split()[0]) / 1024
    return " ".join(f"{k} {v:.1f}" for k, v in out.items()) + " MiB"


def wait_path(path, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not created after {timeout}s")
        time.sleep(POLL)


def qemu_args(a, run, incoming=False, cold_fs_sock=None, vsock=False, mem_path=None):
    # the runtime's guest_cmdline words (crates/hypervisor/src/lib.rs), pci=lastbus=0 included
    cmdline = ("console=ttyS0 panic=-1 reboot=t quiet cryptomgr.notests no_timer_check "
               "rcupdate.rcu_expedited=1 pci=lastbus=0")
    if vsock:
        cmdline += " hp.vsock=1"
    if a.settle:
        cmdline += f" hp.hold={int(a.settle) + 3}"
    args = [
        a.qemu, "-name", "hotplug,debug-threads=on",
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-object", (f"memory-backend-file,id=mem,size={a.mem}M,mem-path={mem_path},share=on"
                    if mem_path else f"memory-backend-memfd,id=mem,size={a.mem}M,share=on"),
        "-machine", "q35,memory-backend=mem",
        "-accel", "tcg,tb-size=64", "-cpu", "max", "-m", f"{a.mem}M", "-smp", "1",
        "-kernel", a.kernel, "-initrd", a.initrd, "-append", cmdline,
        "-chardev", f"file,id=console,path={run}/console.log", "-serial", "chardev:console",
        "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
        # the agent channel, as channel = "serial" does today
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={run}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agent,name=vessel.agent",
        "-device", "virtio-rng-pci",
    ]
    if a.balloon:
        # free page reporting: the guest reports free 2 MiB blocks, QEMU discards them
        # (fallocate PUNCH_HOLE on the memfd)
        args += ["-device", "virtio-balloon-pci,free-page-reporting=on"]
    if a.acpi_hotplug_off:
        # q35's default since QEMU 6.1 is ACPI hot-plug for root ports, which hides the
        # native hot-plug capability (HPC) from the slot; our guest has no ACPI.
        args += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    for i in range(a.root_ports):
        args += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    if cold_fs_sock:
        args += ["-chardev", f"socket,id=fs0,path={cold_fs_sock}",
                 "-device", "vhost-user-fs-pci,chardev=fs0,tag=share,bus=rp0"]
    if incoming:
        args += ["-incoming", "defer"]
    return args


def start_qemu(a, run, ram_backend=False, **kw):
    for f in ("console.log", "qmp.sock", "agent.sock"):
        try:
            os.unlink(os.path.join(run, f))
        except FileNotFoundError:
            pass
    err = open(os.path.join(run, "qemu.stderr"), "ab")
    args = qemu_args(a, run, **kw)
    if ram_backend:
        args = [x.replace("memory-backend-memfd", "memory-backend-ram").replace(",share=on", "")
                for x in args]
    with open(os.path.join(run, "qemu.cmdline"), "a") as f:
        f.write(" ".join(args) + "\n")
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)


def stop_proc(p, timeout=5):
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def start_virtiofsd(a, run, tag):
    sock = f"{run}/{tag}-fs.sock"
    p = subprocess.Popen([a.virtiofsd, f"--socket-path={sock}", f"--shared-dir={a.share}",
                          "--cache=auto"],
                         stdin=subprocess.DEVNULL,
                         stdout=open(f"{run}/virtiofsd-{tag}.log", "ab"), stderr=subprocess.STDOUT)
    return p, sock


def template(a, run, stream):
    t0 = time.monotonic()
    q = start_qemu(a, run, vsock=a.vsock, mem_path=ram_path(a, "template"))
    con = Console(f"{run}/console.log")
    t_ready, _ = con.wait("HP: READY", q, 120)
    log(f"template: boot to READY {t_ready - t0:.3f} s (tcg)")
    for ln in con.hp_lines():
        log("  guest " + ln)
    qmp = Qmp(f"{run}/qmp.sock")
    if a.template_wait:
        time.sleep(a.template_wait)  # an idle period before the snapshot, by design
        log(f"template: {a.template_wait} s idle after READY; QEMU memory: {mem_of(q.pid)}")
    t1 = time.monotonic()
    qmp.cmd("stop")
    qmp.cmd("migrate-set-parameters", {"max-bandwidth": 16 << 30})
    ignore_shared_ram(a, qmp)
    fd = os.open(stream, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    qmp.cmd("getfd", {"fdname": "snap"}, fd=fd)
    qmp.cmd("migrate", {"uri": "fd:snap"})
    m = wait_migration(qmp, "migrate")
    os.fsync(fd)
    os.close(fd)
    t2 = time.monotonic()
    size = os.path.getsize(stream)
    log(f"template: stop + migrate to file {t2 - t1:.3f} s, stream {size} bytes "
        f"({size / 2**20:.1f} MiB) for {a.mem} MiB guest RAM; QEMU total-time "
        f"{m.get('total-time')} ms, ram {json.dumps(m.get('ram', {}))}")
    qmp.cmd("quit")
    q.wait(10)
    qmp.close()
    return {"boot": t_ready - t0, "migrate": t2 - t1, "size": size}


def ignore_shared_ram(a, qmp):
    """RAM-file mode: leave the guest RAM (a shared file) out of the stream, on both sides."""
    if a.ram_dir:
        qmp.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})


def wait_migration(qmp, what):
    """Polls query-migrate until the migration (either side) completes; its last answer."""
    while True:
        m = qmp.cmd("query-migrate")
        st = m.get("status")
        if st == "completed":
            return m
        if st in ("failed", "cancelled"):
            raise RuntimeError(f"{what}: {m.get('error-desc')}")
        time.sleep(POLL)


def clone(a, run, stream, n, vsock):
    res = {}
    t0 = time.monotonic()
    mem_path = ram_path(a, f"clone{n}")
    if mem_path:
        # the clone's RAM: a sparse copy of the template's RAM file (holes stay holes)
        subprocess.run(["cp", "--sparse=always", ram_path(a, "template"), mem_path], check=True)
        t_cp = time.monotonic()
        log(f"clone {n}: cp --sparse=always of the template RAM file {t_cp - t0:.3f} s, "
            f"{os.stat(mem_path).st_blocks * 512 / 2**20:.1f} MiB allocated")
    q = start_qemu(a, run, incoming=True, vsock=a.vsock, mem_path=mem_path)
    fsd = vsd = None
    listener = None
    try:
        qmp = Qmp(f"{run}/qmp.sock")
        t_qmp = time.monotonic()
        fd = os.open(stream, os.O_RDONLY)
        qmp.cmd("getfd", {"fdname": "snap"}, fd=fd)
        os.close(fd)
        ignore_shared_ram(a, qmp)
        qmp.cmd("migrate-incoming", {"uri": "fd:snap"})
        wait_migration(qmp, "migrate-incoming")
        t_loaded = time.monotonic()
        qmp.cmd("cont")
        t_run = time.monotonic()
        res["restore"] = t_run - t0
        log(f"clone {n}: QEMU start to QMP {t_qmp - t0:.3f} s, load stream {t_loaded - t_qmp:.3f} s, "
            f"cont; start to running {t_run - t0:.3f} s (tcg)")
        con = Console(f"{run}/console.log")

        # virtio-fs hot-plug
        t3 = time.monotonic()
        fsd, fs_sock = start_virtiofsd(a, run, f"c{n}")
        wait_path(fs_sock, fsd)
        t4 = time.monotonic()
        qmp.cmd("chardev-add", {"id": "fs0", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": fs_sock}}, "server": False}}})
        t5 = time.monotonic()
        qmp.cmd("device_add", {"driver": "vhost-user-fs-pci", "id": "fsdev0", "bus": "rp0",
                               "chardev": "fs0", "tag": "share"})
        t6 = time.monotonic()
        log(f"clone {n}: virtiofsd up {t4 - t3:.3f} s, chardev-add {t5 - t4:.3f} s, "
            f"device_add vhost-user-fs-pci {t6 - t5:.3f} s")
        t_mnt, i_mnt = con.wait("HP: MOUNTED", q, 30)
        res["fs_plug"] = t6 - t4
        res["fs_mounted"] = t_mnt - t6
        res["fs_total"] = t_mnt - t3
        res["restore_to_mounted"] = t_mnt - t0
        log(f"clone {n}: mount works {t_mnt - t6:.3f} s after device_add (guest polls every 50 ms); "
            f"virtiofsd start to mounted {t_mnt - t3:.3f} s; restore start to mounted {t_mnt - t0:.3f} s")
        log(f"clone {n}: QEMU memory at mounted: {mem_of(q.pid)}{ram_file_use(mem_path)}")
        if a.try_remigrate:
            # a clone with a hot-plugged vhost-user-fs device: can it be migrated again?
            nfd = os.open("/dev/null", os.O_WRONLY)
            try:
                qmp.cmd("getfd", {"fdname": "null"}, fd=nfd)
                qmp.cmd("migrate", {"uri": "fd:null"})
                log(f"clone {n}: migrate after hot-plug: accepted, status "
                    f"{qmp.cmd('query-migrate').get('status')}")
                qmp.cmd("migrate_cancel")
            except RuntimeError as e:
                log(f"clone {n}: migrate after hot-plug refused: {e}")
            finally:
                os.close(nfd)
        for k in range(1, int(a.settle) + 1):
            time.sleep(1)  # a measurement interval, not synchronization
            log(f"clone {n}: QEMU memory {k} s after mounted: {mem_of(q.pid)}{ram_file_use(mem_path)}")
        for ln in con.hp_lines():
            log("  guest " + ln)
        shown = len(con.lines)
        if vsock:
            res.update(plug_vsock(a, run, qmp, q, con, n))
            shown = len(con.lines)
        # the guest prints dmesg, DONE, then reboots (QEMU exits: -no-reboot)
        con.wait("HP: DONE", q, 60)
        q.wait(20 + a.settle)
        for ln in con.hp_lines(shown):
            log("  guest " + ln)
        qmp.close()
    finally:
        stop_proc(q)
        stop_proc(fsd)
        if mem_path:
            os.unlink(mem_path)
    return res


def plug_vsock(a, run, qmp, q, con, n):
    # Host listener for guest-initiated connections: vhost-device-vsock forwards a
    # guest connect to CID 2 port P to <uds-path>_P.
    uds = f"{run}/c{n}-vsock.uds"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(f"{uds}_1234")
    lsock.listen(1)
    got = {}

    def serve():
        c, _ = lsock.accept()
        got["t"] = time.monotonic()
        got["data"] = c.recv(128)
        c.sendall(b"hello-from-host\n")
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    t0 = time.monotonic()
    vsock_sock = f"{run}/c{n}-vhost-vsock.sock"
    vsd = subprocess.Popen([a.vhost_vsock, "--guest-cid", "3", "--socket", vsock_sock,
                            "--uds-path", uds], stdin=subprocess.DEVNULL,
                           stdout=open(f"{run}/vhost-vsock-c{n}.log", "ab"), stderr=subprocess.STDOUT)
    try:
        wait_path(vsock_sock, vsd)
        t1 = time.monotonic()
        qmp.cmd("chardev-add", {"id": "vs0", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": vsock_sock}}, "server": False}}})
        qmp.cmd("device_add", {"driver": "vhost-user-vsock-pci", "id": "vsockdev0", "bus": "rp1",
                               "chardev": "vs0"})
        t2 = time.monotonic()
        log(f"clone {n}: vhost-device-vsock up {t1 - t0:.3f} s, chardev-add + device_add "
            f"vhost-user-vsock-pci {t2 - t1:.3f} s")
        t_bound, _ = con.wait("HP: VSOCK-BOUND", q, 30)
        t_ok, _ = con.wait("HP: VSOCK-OK", q, 30)
        th.join(5)
        log(f"clone {n}: guest vsock driver bound {t_bound - t2:.3f} s after device_add, guest->host "
            f"connection answered {got.get('t', float('nan')) - t2:.3f} s after device_add "
            f"(host got {got.get('data')!r})")
        return {"vsock_plug": t2 - t1, "vsock_bound": t_bound - t2, "vsock_ok": t_ok - t2}
    finally:
        lsock.close()
        # vhost-device-vsock stays up until QEMU disconnects; stopped by the caller's exit
        threading.Thread(target=lambda: (time.sleep(30), stop_proc(vsd)), daemon=True).start()
        _VSDS.append(vsd)


_VSDS = []


def memcheck(a, run, stream, backend):
    """Restore only (no hot-plug): QEMU memory right after the load, per memory backend."""
    q = start_qemu(a, run, incoming=True, vsock=a.vsock, ram_backend=(backend == "ram"))
    try:
        qmp = Qmp(f"{run}/qmp.sock")
        fd = os.open(stream, os.O_RDONLY)
        qmp.cmd("getfd", {"fdname": "snap"}, fd=fd)
        os.close(fd)
        qmp.cmd("migrate-incoming", {"uri": "fd:snap"})
        while qmp.cmd("query-migrate").get("status") != "completed":
            time.sleep(POLL)
        qmp.cmd("cont")
        log(f"memcheck: clone with memory-backend-{backend}: QEMU memory after load: {mem_of(q.pid)}")
        qmp.cmd("quit")
        q.wait(10)
    finally:
        stop_proc(q)


def cold(a, run, n):
    t0 = time.monotonic()
    fsd, fs_sock = start_virtiofsd(a, run, f"cold{n}")
    q = None
    try:
        wait_path(fs_sock, fsd)
        q = start_qemu(a, run, cold_fs_sock=fs_sock)
        con = Console(f"{run}/console.log")
        t_mnt, _ = con.wait("HP: MOUNTED", q, 120)
        log(f"cold {n}: virtiofsd + QEMU start to mounted {t_mnt - t0:.3f} s (vhost-user-fs on the "
            f"command line, tcg); QEMU memory at mounted: {mem_of(q.pid)}")
        if a.settle:
            time.sleep(int(a.settle))  # a measurement interval, not synchronization
            log(f"cold {n}: QEMU memory {int(a.settle)} s after mounted: {mem_of(q.pid)}")
        con.wait("HP: DONE", q, 60)
        q.wait(20 + a.settle)
        return t_mnt - t0
    finally:
        stop_proc(q)
        stop_proc(fsd)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--share", required=True)
    p.add_argument("--virtiofsd", default="/usr/local/bin/virtiofsd")
    p.add_argument("--vhost-vsock", default="/usr/local/bin/vhost-device-vsock")
    p.add_argument("--mem", type=int, default=256)
    p.add_argument("--root-ports", type=int, default=2)
    p.add_argument("--clones", type=int, default=3)
    p.add_argument("--cold", type=int, default=3)
    p.add_argument("--vsock", action="store_true")
    p.add_argument("--balloon", action="store_true")
    p.add_argument("--settle", type=float, default=0)
    p.add_argument("--ram-dir", help="guest RAM files here (tmpfs), x-ignore-shared migration")
    p.add_argument("--template-wait", type=float, default=0)
    p.add_argument("--try-remigrate", action="store_true")
    p.add_argument("--memcheck", action="store_true")
    p.add_argument("--keep-acpi-hotplug", dest="acpi_hotplug_off", action="store_false")
    a = p.parse_args()
    stream = os.path.join(a.run, "template.migration")
    try:
        t = template(a, a.run, stream)
        if a.memcheck:
            memcheck(a, a.run, stream, "memfd")
            memcheck(a, a.run, stream, "ram")
        rs = [clone(a, a.run, stream, i, a.vsock) for i in range(1, a.clones + 1)]
        cs = [cold(a, a.run, i) for i in range(1, a.cold + 1)]
    finally:
        for v in _VSDS:
            stop_proc(v)
        if a.ram_dir and os.path.exists(ram_path(a, "template")):
            os.unlink(ram_path(a, "template"))
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
    log("summary (tcg, medians):")
    log(f"  template boot {t['boot']:.3f} s, migrate {t['migrate']:.3f} s, stream {t['size'] / 2**20:.1f} MiB")
    for k in rs[0].keys() if rs else []:
        log(f"  clone {k}: {med([r[k] for r in rs]):.3f} s  (all: {', '.join(f'{r[k]:.3f}' for r in rs)})")
    if cs:
        log(f"  cold boot to mounted: {med(cs):.3f} s  (all: {', '.join(f'{c:.3f}' for c in cs)})")


if __name__ == "__main__":
    main()
