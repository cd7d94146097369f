#!/usr/bin/env python3
"""Network bench driver for benches/net.sh: a Vessel and a runc container, each
in its own network namespace, serving busybox httpd and `iperf3 -s`; from the
host, iperf3 TCP both ways (interleaved runs, median) and sequential HTTP
requests (median, p99). Prints a table with the Vessel/runc ratios.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

# One iperf3 server per test (-1), restarted: the readiness probe's bare
# connection and any server that exits after a test cost nothing.
SERVE = "httpd -p 80 -h /www && while :; do iperf3 -s -1 >/dev/null; echo iperf3 exited $? >&2; done"


def load():
    return open("/proc/loadavg").read().split()[:3]


def bundle(work, name, rootfs, netns, base):
    """A bundle for `sh -c SERVE` in the given network namespace."""
    d = os.path.join(work, name)
    os.makedirs(d)
    with open(os.path.join(base, "config.json")) as f:
        c = json.load(f)
    c["root"] = {"path": rootfs, "readonly": False}
    c["process"]["args"] = ["sh", "-c", SERVE]
    ns = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
    ns.append({"type": "network", "path": netns})
    c["linux"]["namespaces"] = ns
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return d


def wait_port(ip, port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"bench-net: {ip}:{port} did not answer within {timeout} s")


def iperf(ip, seconds, reverse):
    """Gbit/s received, one TCP stream; reverse: the container sends."""
    cmd = ["iperf3", "-c", ip, "-t", str(seconds), "-J", "--connect-timeout", "10000"]
    if reverse:
        cmd.append("-R")
    deadline = time.monotonic() + 120
    while True:
        p = subprocess.run(cmd, capture_output=True, timeout=seconds + 60)
        r = json.loads(p.stdout or b"{}")
        # The one-off server is restarting (SERVE): try again.
        if "unable to connect" in str(r.get("error")) and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        break
    if p.returncode != 0:
        sys.exit(f"bench-net: {' '.join(cmd)} failed: {p.stdout.decode()[-800:]}{p.stderr.decode()[-400:]}")
    try:
        return r["end"]["sum_received"]["bits_per_second"] / 1e9
    except KeyError:
        sys.exit(f"bench-net: {' '.join(cmd)}: no result: {r.get('error')!r} {json.dumps(r['end'])[:600]}")


def http_latencies(ip, n):
    """Milliseconds per request: connect, GET, read to EOF (HTTP/1.0)."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        with socket.create_connection((ip, 80), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        out.append((time.perf_counter() - start) * 1000)
        if not got.startswith(b"HTTP/1.") or b" 200 " not in got.split(b"\r\n", 1)[0]:
            sys.exit(f"bench-net: bad HTTP answer from {ip}: {got[:200]!r}")
    return out


def p99(v):
    s = sorted(v)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


class Container:
    def __init__(self, name, start, stop, ip):
        self.name, self.start_cmds, self.stop_cmd, self.ip = name, start, stop, ip

    def start(self, logs):
        with open(os.path.join(logs, self.name + ".out"), "w") as out, \
                open(os.path.join(logs, self.name + ".err"), "w") as err:
            for cmd in self.start_cmds:
                p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=300)
                if p.returncode != 0:
                    sys.exit(f"bench-net: {' '.join(cmd)} failed; see {logs}")

    def stop(self):
        subprocess.run(self.stop_cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


def main():
    a = argparse.ArgumentParser()
    for opt in ("vessel", "work", "rootfs", "vessel-netns", "vessel-ip", "runc-netns", "runc-ip",
                "accel", "commit"):
        a.add_argument("--" + opt, required=True)
    for opt in ("runs", "seconds", "requests"):
        a.add_argument("--" + opt, type=int, required=True)
    o = a.parse_args()
    base = os.path.join(o.work, "base")
    vb = bundle(o.work, "vbundle", o.rootfs, o.vessel_netns, base)
    rb = bundle(o.work, "rbundle", o.rootfs, o.runc_netns, base)
    vroot, rroot = os.path.join(o.work, "vroot"), os.path.join(o.work, "rroot")
    cs = [
        Container("Vessel", [[o.vessel, "--root", vroot, "create", "--bundle", vb, "vnet"],
                             [o.vessel, "--root", vroot, "start", "vnet"]],
                  [o.vessel, "--root", vroot, "delete", "--force", "vnet"], o.vessel_ip),
        Container("runc", [["runc", "--root", rroot, "create", "--bundle", rb, "rnet"],
                           ["runc", "--root", rroot, "start", "rnet"]],
                  ["runc", "--root", rroot, "delete", "--force", "rnet"], o.runc_ip),
    ]
    load_start = load()
    try:
        for c in cs:
            c.start(o.work)
            wait_port(c.ip, 80, 300)
        res = {c.name: {"up": [], "down": []} for c in cs}
        for i in range(o.runs):
            line = []
            for c in cs:
                res[c.name]["up"].append(iperf(c.ip, o.seconds, reverse=False))
                res[c.name]["down"].append(iperf(c.ip, o.seconds, reverse=True))
                line.append(f"{c.name} host->ctr {res[c.name]['up'][-1]:.3f} ctr->host {res[c.name]['down'][-1]:.3f}")
            print(f"iperf3 run {i + 1}/{o.runs} (Gbit/s): " + "; ".join(line), flush=True)
        for c in cs:
            http_latencies(c.ip, 20)  # warm-up (not counted)
            res[c.name]["http"] = http_latencies(c.ip, o.requests)
            print(f"http {c.name}: {o.requests} requests done", flush=True)
    finally:
        for c in cs:
            c.stop()
    load_end = load()

    rows = [
        ("TCP host -> container", "Gbit/s", lambda r: statistics.median(r["up"])),
        ("TCP container -> host", "Gbit/s", lambda r: statistics.median(r["down"])),
        ("HTTP latency median", "ms", lambda r: statistics.median(r["http"])),
        ("HTTP latency p99", "ms", lambda r: p99(r["http"])),
    ]
    print()
    print(f"bench-net {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {o.commit}")
    print(f"Vessel accelerator: {o.accel}; QEMU virtio-net on a tap + tc mirred redirect; runc: the veth directly")
    print(f"iperf3: 1 TCP stream, {o.seconds} s, median of {o.runs} runs each way, interleaved; "
          f"HTTP: {o.requests} sequential HTTP/1.0 GETs (612 B page, new connection each) to busybox httpd")
    print(f"host load (1/5/15 min): {' '.join(load_start)} at start, {' '.join(load_end)} at end; "
          f"{os.cpu_count()} CPUs")
    print(f"{'':24}{'unit':>8}{'Vessel':>10}{'runc':>10}{'Vessel/runc':>13}")
    for name, unit, f in rows:
        v, r = f(res["Vessel"]), f(res["runc"])
        print(f"{name:24}{unit:>8}{v:10.3f}{r:10.3f}{v / r:13.3f}")


if __name__ == "__main__":
    main()
