#!/bin/sh
# Builds an OCI bundle with busybox-static: <dir>/rootfs (busybox + applet
# symlinks) and a `vessel spec`-generated config.json, non-terminal, running
# the given command (default: sh).
# Usage: busybox-bundle.sh <dir> [vessel binary] [-- command args...]
set -eu
dir=$1; shift
vessel=${1:-vessel}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
busybox=$(command -v busybox)
file -L "$busybox" 2>/dev/null | grep -q "statically linked" || [ -n "${VESSEL_ALLOW_DYNAMIC_BUSYBOX:-}" ] || {
  echo "busybox-bundle: $busybox is not static (apt-get install busybox-static)" >&2; exit 1; }
mkdir -p "$dir/rootfs/bin" "$dir/rootfs/etc" "$dir/rootfs/tmp" "$dir/rootfs/proc" "$dir/rootfs/sys" "$dir/rootfs/dev"
cp "$busybox" "$dir/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$dir/rootfs/bin/$applet" ] || ln -s busybox "$dir/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$dir/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$dir/rootfs/etc/group"
rm -f "$dir/config.json"
"$vessel" spec --bundle "$dir"
# Non-terminal, writable root, the requested command.
args=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:] or ["sh"]))' "$@")
python3 - "$dir/config.json" "$args" <<'PY'
import json, sys
p, args = sys.argv[1], json.loads(sys.argv[2])
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = args
c["root"]["readonly"] = False
json.dump(c, open(p, "w"), indent=2)
PY
