#!/usr/bin/env bash
# QEMU 7.2 VM-template + PCIe hot-plug experiment (see FINDINGS.md).
#
# usage: experiments/qemu-hotplug/run.sh KERNEL_VMLINUX [hotplug.py options...]
#   e.g. run.sh /var/tmp/qemuhotplug-cache/out/vmlinux --vsock --clones 3 --cold 3
#   RAM_FILE=1 run.sh ...: guest RAM in a file on /dev/shm (memory-backend-file,share=on),
#   left out of the stream (x-ignore-shared); each clone gets a sparse copy of it.
#
# Builds a busybox initramfs from ./init (+ a static vsock client), then runs
# hotplug.py: boot a template VM without vhost-user devices, migrate it to a
# file, restore clones from it and hot-plug vhost-user-fs (and vhost-user-vsock
# with --vsock) into empty pcie-root-ports. Needs root (virtiofsd), QEMU, busybox-static,
# gcc, /usr/local/bin/virtiofsd and /usr/local/bin/vhost-device-vsock. Accelerator: tcg.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernel=${1:?usage: run.sh KERNEL_VMLINUX [options]}
shift
work=$(mktemp -d /var/tmp/qemuhotplug-run.XXXXXX)
shm=$(mktemp -d /dev/shm/qemuhotplug.XXXXXX)   # guest RAM files in RAM_FILE=1 mode
cleanup() {
    rm -rf "$shm"
    # only the processes this run started are children of hotplug.py, which stops them;
    # anything still holding the run directory is reported, not killed by name.
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/sys" "$work/root/dev" "$work/root/mnt" \
    "$work/run" "$work/share"
cp /bin/busybox "$work/root/bin/busybox"
install -m 0755 "$here/init" "$work/root/init"
gcc -static -O2 -o "$work/root/bin/vsock-hello" "$here/vsock-hello.c"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.cpio.gz"
echo "hello from the host share" > "$work/share/hello.txt"
echo "qemu: $(qemu-system-x86_64 --version | head -1); virtiofsd $(/usr/local/bin/virtiofsd --version); kernel $kernel"
status=0
python3 "$here/hotplug.py" --kernel "$kernel" --initrd "$work/initramfs.cpio.gz" \
    --run "$work/run" --share "$work/share" ${RAM_FILE:+--ram-dir "$shm"} "$@" || status=$?
echo "QEMU command lines (template first, then each clone / cold VM):"
sed 's/^/  /' "$work/run/qemu.cmdline" 2>/dev/null | head -n 3 || true
echo "QEMU stderr (all VMs):"; sed 's/^/  /' "$work/run/qemu.stderr" 2>/dev/null || true
exit $status
