#!/bin/sh
# Builds the tiny PVH test guest: build.sh OUT_ELF
# 32-bit freestanding C with the host gcc and binutils, wrapped in an ELF64 container
# (linux-loader reads ELF64 only; the PVH entry is 32-bit code anyway).
set -eu
out=${1:?usage: build.sh OUT_ELF}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cflags="-m32 -march=i686 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -fno-asynchronous-unwind-tables -nostdlib -O2 -Wall -Werror"
gcc $cflags -c "$here/start.S" -o "$tmp/start.o"
gcc $cflags -c "$here/guest.c" -o "$tmp/guest.o"
ld -m elf_i386 --no-warn-rwx-segments -nostdlib -static -T "$here/link.ld" "$tmp/start.o" "$tmp/guest.o" -o "$tmp/guest32.elf"
objcopy -I elf32-i386 -O elf64-x86-64 "$tmp/guest32.elf" "$out.tmp"
mv "$out.tmp" "$out"
