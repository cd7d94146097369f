#!/usr/bin/env python3
"""Scrape time of `vessel monitor` over N running sandboxes.

usage: monitor_bench.py VESSEL WORKDIR SANDBOXES SCRAPES ACCEL
"""
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def get(addr):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        sys.exit(f"bad answer: {head[:200]!r}")
    return body.decode()


def main():
    vessel, work, n, scrapes, accel = sys.argv[1:6]
    n, scrapes = int(n), int(scrapes)
    vroot = f"{work}/root"
    ids = [f"mon{i}" for i in range(n)]

    def up(cid):
        # stderr to a file: the supervisor `create` leaves behind holds a pipe open.
        err = f"{work}/{cid}.err"
        for cmd in (["create", "--bundle", f"{work}/bundle", cid], ["start", cid]):
            with open(err, "w") as f:
                p = subprocess.run([vessel, "--root", vroot, *cmd], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=f)
            if p.returncode != 0:
                raise RuntimeError(f"{cid}: {' '.join(cmd)}: {open(err).read()[-500:]}")

    monitor = None
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(up, ids))
        print(f"{n} sandboxes running after {time.monotonic() - start:.1f} s", flush=True)
        monitor = subprocess.Popen([vessel, "--root", vroot, "monitor", "--listen", "127.0.0.1:0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = monitor.stdout.readline().strip()
        addr = line.removeprefix("listening on http://").removesuffix("/metrics")
        # Until every sandbox answers with its guest families (first scrapes warm up).
        deadline = time.monotonic() + 120
        while True:
            body = get(addr)
            up_guests = sum(1 for l in body.splitlines()
                            if l.startswith("vessel_guest_up{") and l.endswith(" 1.0")
                            and any(f'sandbox_id="{i}"' in l for i in ids))
            if up_guests == n or time.monotonic() > deadline:
                break
        times = []
        for _ in range(scrapes):
            t = time.monotonic()
            body = get(addr)
            times.append((time.monotonic() - t) * 1000)
        print(f"accelerator: {accel}; {n} sandboxes ({up_guests} guests answering), {scrapes} scrapes, "
              f"{len(body)} bytes, {len(body.splitlines())} lines each")
        ordered = sorted(times)
        p90 = ordered[max(0, -(-9 * len(ordered) // 10) - 1)]
        print(f"scrape: median {statistics.median(times):.1f} ms (min {min(times):.1f}, p90 {p90:.1f}, "
              f"max {max(times):.1f}); target < 50 ms")
    finally:
        if monitor:
            monitor.kill()
            monitor.wait()
        for cid in ids:
            subprocess.run([vessel, "--root", vroot, "delete", "--force", cid], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
