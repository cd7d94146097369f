#!/usr/bin/env python3
"""Write a gzip-compressed newc cpio archive from a spec, without root.

Spec lines (one entry per line, '#' comments):
  dir  <path> <mode>
  file <path> <mode> <host-source>
  nod  <path> <mode> c|b <major> <minor>
  slink <path> <target>
All entries are owned by 0:0 and get mtime 0, so the archive is reproducible.
"""
import gzip
import stat
import sys


def header(ino, mode, nlink, size, rmaj, rmin, name):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name) + 1, 0]
    return ("070701" + "".join("%08X" % f for f in fields)).encode()


def pad(n):
    return b"\0" * ((4 - n % 4) % 4)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: mkcpio.py SPEC OUT.cpio.gz")
    spec, out = sys.argv[1], sys.argv[2]
    data = bytearray()
    ino = 300000
    for lineno, line in enumerate(open(spec), 1):
        line = line.split("#", 1)[0].split()
        if not line:
            continue
        kind, path = line[0], line[1].lstrip("/")
        body, rmaj, rmin = b"", 0, 0
        if kind == "dir":
            mode = stat.S_IFDIR | int(line[2], 8)
        elif kind == "file":
            mode = stat.S_IFREG | int(line[2], 8)
            body = open(line[3], "rb").read()
        elif kind == "nod":
            mode = (stat.S_IFCHR if line[3] == "c" else stat.S_IFBLK) | int(line[2], 8)
            rmaj, rmin = int(line[4]), int(line[5])
        elif kind == "slink":
            mode = stat.S_IFLNK | 0o777
            body = line[2].encode()
        else:
            sys.exit(f"{spec}:{lineno}: unknown entry kind {kind!r}")
        ino += 1
        name = path.encode()
        h = header(ino, mode, 2 if kind == "dir" else 1, len(body), rmaj, rmin, name)
        data += h + name + b"\0" + pad(len(h) + len(name) + 1) + body + pad(len(body))
    name = b"TRAILER!!!"
    h = header(0, 0, 1, 0, 0, 0, name)
    data += h + name + b"\0" + pad(len(h) + len(name) + 1)
    with open(out + ".tmp", "wb") as f:
        f.write(gzip.compress(bytes(data), compresslevel=6, mtime=0))
    import os
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
