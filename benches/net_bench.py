#!/usr/bin/env python3
"""make bench-net: iperf3 TCP and 1,000 sequential HTTP requests, host <->
container, for Vessel and runc on the same network namespace (one run).

usage: net_bench.py VESSEL WORKDIR ACCEL
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time

IPERF_RUNS = 3
IPERF_SECS = 5
REQUESTS = 1000


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, stdin=subprocess.DEVNULL, capture_output=True, **kw)


class Net:
    """A namespace with `eth0` (<net>.2/24) and its veth peer on the host (<net>.1)."""

    def __init__(self):
        pid = os.getpid()
        self.ns = f"vessel-bench-{pid}"
        self.veth = f"vbn{pid % 100000}"
        self.net = f"10.251.{pid % 250}"
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            sh("ip", "addr", "add", f"{self.net}.1/24", "dev", self.veth)
            sh("ip", "link", "set", self.veth, "up")
            for args in (["addr", "add", f"{self.net}.2/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                         ["link", "set", "lo", "up"], ["route", "add", "default", "via", f"{self.net}.1"]):
                sh("ip", "-n", self.ns, *args)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def close(self):
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def wait_port(ip, port, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ip, port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"bench-net: {ip}:{port} did not answer within {timeout} s")


def iperf(ip, reverse):
    """Median receiver throughput in Gbit/s of IPERF_RUNS runs."""
    rates = []
    args = ["iperf3", "-c", ip, "-t", str(IPERF_SECS), "-J"] + (["-R"] if reverse else [])
    while len(rates) < IPERF_RUNS:
        # The server (one client each, restarted in a loop) may be between runs.
        for _ in range(50):
            out = json.loads(sh(*args, check=False).stdout)
            if "error" not in out:
                break
            time.sleep(0.2)
        else:
            sys.exit(f"bench-net: {' '.join(args)}: {out['error']}")
        rates.append(out["end"]["sum_received"]["bits_per_second"] / 1e9)
    return statistics.median(rates)


def http(url):
    """Per-request times (ms) of REQUESTS sequential GETs, and the total wall time (s)."""
    cfg = "".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(REQUESTS))
    start = time.monotonic()
    p = subprocess.run(["curl", "-sf", "-w", "%{time_total}\\n", "-K", "-"], input=cfg.encode(),
                       capture_output=True, check=True)
    wall = time.monotonic() - start
    times = [float(t) * 1000 for t in p.stdout.split()]
    if len(times) != REQUESTS:
        sys.exit(f"bench-net: {len(times)} of {REQUESTS} requests answered")
    return times, wall


def measure(name, ip):
    url = f"http://{ip}/"
    wait_port(ip, 80)
    up = iperf(ip, reverse=False)
    down = iperf(ip, reverse=True)
    times, wall = http(url)
    res = {
        "iperf3 host->container (Gbit/s)": up,
        "iperf3 container->host (Gbit/s)": down,
        "HTTP request median (ms)": statistics.median(times),
        f"HTTP {REQUESTS} requests wall (s)": wall,
    }
    print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    return res


def bundle_for(work, netns_path):
    bundle = os.path.join(work, "bundle")
    p = os.path.join(bundle, "config.json")
    c = json.load(open(p))
    script = ("mkdir -p /www && echo hello > /www/index.html && "
              "{ while :; do /usr/bin/iperf3 -s -1 >>/tmp/iperf3.log 2>&1; done & } && "
              "exec httpd -f -p 80 -h /www")
    c["process"]["args"] = ["sh", "-c", script]
    ns = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
    ns.append({"type": "network", "path": netns_path})
    c["linux"]["namespaces"] = ns
    json.dump(c, open(p, "w"), indent=2)
    return bundle


def main():
    vessel, work, accel = sys.argv[1:4]
    net = Net()
    ip = f"{net.net}.2"
    results = {}
    try:
        bundle = bundle_for(work, f"/var/run/netns/{net.ns}")
        vroot, rroot = os.path.join(work, "vroot"), os.path.join(work, "runc-root")
        logs = [open(os.path.join(work, f), "w") for f in ("out", "err")]

        subprocess.run([vessel, "--root", vroot, "create", "--bundle", bundle, "bn"], check=True,
                       stdin=subprocess.DEVNULL, stdout=logs[0], stderr=logs[1])
        try:
            sh(vessel, "--root", vroot, "start", "bn")
            results["vessel"] = measure("vessel", ip)
        finally:
            sh(vessel, "--root", vroot, "delete", "--force", "bn", check=False)

        subprocess.run(["runc", "--root", rroot, "create", "--bundle", bundle, "rn"], check=True,
                       stdin=subprocess.DEVNULL, stdout=logs[0], stderr=logs[1])
        try:
            sh("runc", "--root", rroot, "start", "rn")
            results["runc"] = measure("runc", ip)
        finally:
            sh("runc", "--root", rroot, "delete", "--force", "rn", check=False)
    finally:
        net.close()

    print()
    print(f"accelerator: {accel} (Vessel's VM; runc runs on the host); one veth namespace, "
          f"iperf3 -t {IPERF_SECS} x {IPERF_RUNS} (median), {REQUESTS} sequential HTTP GETs (busybox httpd)")
    print(f"{'':34} {'vessel':>10} {'runc':>10} {'vessel/runc':>12}")
    for k in results["vessel"]:
        v, r = results["vessel"][k], results["runc"][k]
        print(f"{k:34} {v:10.3f} {r:10.3f} {v / r:12.3f}")


if __name__ == "__main__":
    main()
