#!/usr/bin/env bash
# Builds a local busybox OCI image (no network) from Debian's busybox-static with
# umoci, and exports it with skopeo as an oci-archive and a docker-archive.
#
#   tests/support/busybox-image.sh OUT_DIR
#
# Outputs (stdout prints the docker-archive path):
#   OUT_DIR/busybox-oci.tar      oci-archive, ref localhost/vessel-busybox:latest
#   OUT_DIR/busybox-docker.tar   docker-archive, tag localhost/vessel-busybox:latest
#   OUT_DIR/pause-docker.tar     docker-archive, tag localhost/vessel-pause:latest (same
#                                layers, runs `sleep` forever: the CRI sandbox image)
# Idempotent: rebuilt only when /bin/busybox or this script changes.
set -euo pipefail

OUT=${1:?usage: busybox-image.sh OUT_DIR}
REF=${VESSEL_TEST_IMAGE:-localhost/vessel-busybox:latest}
PAUSE_REF=${VESSEL_PAUSE_IMAGE:-localhost/vessel-pause:latest}
BUSYBOX=/bin/busybox
say() { echo "busybox-image: $*" >&2; }

for tool in umoci skopeo sha256sum; do
    command -v "$tool" >/dev/null || { say "$tool missing (scripts/install-deps.sh)"; exit 1; }
done
[[ -x $BUSYBOX ]] && "$BUSYBOX" --list >/dev/null 2>&1 || { say "$BUSYBOX missing: apt-get install busybox-static"; exit 1; }
file -L "$BUSYBOX" 2>/dev/null | grep -q "statically linked" || { say "$BUSYBOX is not static: apt-get install busybox-static"; exit 1; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Tests start harnesses in parallel: one builds, the others wait and reuse it.
exec 9>"$OUT/.lock"
flock 9
# Contents only (sha256sum prints the path too): the lane's host step and the harness in
# L1 name this script by different paths, and a rebuild in L1 cannot work (umoci on the
# lane's 9p overlay sees one inode for distinct files and writes them as hard links).
key=$( { cat "$BUSYBOX" "${BASH_SOURCE[0]}"; echo "$REF $PAUSE_REF"; } | sha256sum | cut -d' ' -f1)
if [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$key" && -f $OUT/busybox-oci.tar && -f $OUT/busybox-docker.tar && -f $OUT/pause-docker.tar ]]; then
    echo "$OUT/busybox-docker.tar"
    exit 0
fi

work=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$work/bundle" >/dev/null 2>&1
root=$work/bundle/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root,var}
chmod 1777 "$root/tmp"
install -m 0755 "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [[ $applet == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
umoci repack --image "$layout:latest" "$work/bundle" >/dev/null
umoci config --image "$layout:latest" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.cmd sh --config.workingdir /
umoci config --image "$layout:latest" --tag pause \
    --config.entrypoint /bin/sleep --config.cmd 2147483647
umoci gc --layout "$layout"

rm -f "$OUT/busybox-oci.tar" "$OUT/busybox-docker.tar" "$OUT/pause-docker.tar"
skopeo --insecure-policy copy --quiet "oci:$layout:latest" "oci-archive:$OUT/busybox-oci.tar:$REF"
skopeo --insecure-policy copy --quiet "oci:$layout:latest" "docker-archive:$OUT/busybox-docker.tar:$REF"
skopeo --insecure-policy copy --quiet "oci:$layout:pause" "docker-archive:$OUT/pause-docker.tar:$PAUSE_REF"
echo "$key" >"$OUT/.stamp"
say "built $REF"
echo "$OUT/busybox-docker.tar"
