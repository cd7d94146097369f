#!/usr/bin/env bash
# Build the Vessel guest kernel from Debian's linux-source-6.1 and cache it.
#
# usage: guest/kernel/build.sh OUT_DIR
#
# The result (vmlinux with the PVH entry note, bzImage, .config, release) is
# cached in ${VESSEL_CACHE_DIR:-/var/cache/vessel}/kernel/<key>, where <key> is a
# hash of the source package version, vessel.config and patches/*. A second run
# with the same inputs copies the cached files in well under a second.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
cache_root=${VESSEL_CACHE_DIR:-/var/cache/vessel}/kernel
pkg=linux-source-6.1
jobs=${VESSEL_KERNEL_JOBS:-$(nproc)}

step="start"
log=""
fail() {
    echo "guest kernel: FAILED at step: $step" >&2
    if [[ -n $log && -f $log ]]; then
        echo "guest kernel: last lines of $log:" >&2
        tail -n 30 "$log" >&2
    fi
}
trap fail ERR

say() { echo "guest kernel: $*" >&2; }

step="check source package $pkg"
if ! version=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) || [[ -z $version ]]; then
    say "$pkg is not installed; run 'make deps' (apt-get install $pkg) first"
    false
fi
tarball=/usr/src/$pkg.tar.xz
[[ -f $tarball ]] || { say "missing $tarball although $pkg $version is installed"; false; }

step="compute cache key"
key=$( {
    echo "pkg=$pkg $version"
    echo "fragment"; cat "$here/vessel.config"
    for p in "$here"/patches/*.patch; do echo "patch $(basename "$p")"; cat "$p"; done
} | sha256sum | cut -c1-16)
cached=$cache_root/$key

# The checks every kernel must pass, on a fresh build and on a cache hit alike, so a
# cached kernel can never hide a check that fails on a fresh machine.
# The PVH entry note: binutils 2.40 prints a tab after the note size, older ones spaces.
verify_outputs() {
    local dir=$1
    local f
    for f in vmlinux bzImage config release; do
        [[ -s $dir/$f ]] || { say "$dir/$f is missing or empty"; return 1; }
    done
    readelf -n "$dir/vmlinux" |
        grep -Eq 'Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+(Unknown note type: \(0x00000012\)|XEN_ELFNOTE_PHYS32_ENTRY)' ||
        { say "vmlinux has no PVH/Xen ELF note (readelf -n $dir/vmlinux); a bad cache entry can be removed with rm -rf $dir"; return 1; }
    file -b "$dir/bzImage" | grep -q 'Linux kernel x86 boot executable' ||
        { say "$dir/bzImage is not an x86 boot image"; return 1; }
    grep -qx 'CONFIG_PVH=y' "$dir/config" || { say "$dir/config lacks CONFIG_PVH=y"; return 1; }
}

install_outputs() {
    mkdir -p "$out"
    for f in vmlinux bzImage config release; do
        cp -f "$cached/$f" "$out/$f.tmp" && mv -f "$out/$f.tmp" "$out/$f"
    done
    say "$(cat "$out/release") (key $key) -> $out"
}

if [[ -f $cached/release ]]; then
    step="verify cached kernel $cached"
    say "cache hit $cached; verifying"
    verify_outputs "$cached"
    install_outputs
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
step="wait for another kernel build (lock $cache_root/.lock)"
flock 9
if [[ -f $cached/release ]]; then   # built by whoever held the lock
    step="verify cached kernel $cached"
    verify_outputs "$cached"
    install_outputs
    exit 0
fi

work=$cache_root/build-$key
rm -rf "$work"
mkdir -p "$work"
log=$work/build.log
say "building $pkg $version (key $key) in $work; log: $log"

step="extract $tarball"
say "[1/5] extracting source"
tar -C "$work" -xJf "$tarball"
src=$work/$pkg

step="apply patches"
say "[2/5] applying patches"
for p in "$here"/patches/*.patch; do
    patch -d "$src" -p1 --forward --quiet < "$p" >>"$log" 2>&1
done

step="configure (tinyconfig + vessel.config + olddefconfig)"
say "[3/5] configuring"
make -C "$src" tinyconfig >>"$log" 2>&1
(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$here/vessel.config") >>"$log" 2>&1
make -C "$src" olddefconfig >>"$log" 2>&1

step="verify config"
missing=0
while IFS= read -r line; do
    case $line in
        CONFIG_*=*)
            grep -qxF "$line" "$src/.config" || { say "option not in final config: $line"; missing=1; } ;;
        "# CONFIG_"*" is not set")
            opt=${line#"# "}; opt=${opt%% *}
            if grep -q "^$opt=" "$src/.config"; then say "option should be off: $opt"; missing=1; fi ;;
    esac
done < "$here/vessel.config"
[[ $missing == 0 ]]

step="compile (make -j$jobs vmlinux bzImage)"
say "[4/5] compiling with $jobs jobs (about 6 minutes on 2 cores)"
make -C "$src" -j"$jobs" vmlinux bzImage >>"$log" 2>&1 &
mk=$!
while kill -0 "$mk" 2>/dev/null; do
    sleep 15 &
    wait $! || true
    kill -0 "$mk" 2>/dev/null && say "      ... $(grep -c '^  CC' "$log" || true) files compiled"
done
wait "$mk"

step="store in cache"
say "[5/5] caching"
mkdir -p "$work/out"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$work/out/"
cp "$src/.config" "$work/out/config"
make -s -C "$src" kernelrelease > "$work/out/release"
step="verify outputs"
verify_outputs "$work/out"
rm -rf "$cached"
mv "$work/out" "$cached"
rm -rf "$work"
install_outputs
