#!/usr/bin/env bash
# Installs everything Vessel needs on a Debian 12 host: apt packages and the
# crates.io helper binaries (pinned versions). Safe to re-run: a second run
# only checks what is there.
set -euo pipefail

APT_PACKAGES=(
    # guest kernel build
    linux-source-6.1 bc flex bison libelf-dev libssl-dev cpio build-essential python3 file
    # hypervisor and helpers
    qemu-system-x86 libseccomp-dev libcap-ng-dev
    # the agent's libbpf (libcontainer's cgroup v2 device filter; also needs libelf-dev, make)
    zlib1g-dev pkg-config
    # container tooling used by tests and the demo
    busybox-static umoci skopeo docker-registry runc crun containerd podman docker.io iptables iproute2 curl containernetworking-plugins protobuf-compiler hyperfine
    # make bench-net (the host's iperf3 and its libraries are copied into the container)
    iperf3
    # the KVM lane's L1 (scripts/kvm-lane.sh: module dependencies)
    kmod
)
# name version
CARGO_TOOLS=(
    "vhost-device-vsock 0.3.0"
    "virtiofsd 1.14.0"
    # make fuzz / fuzz-ci (scripts/fuzz.sh; runs on the nightly toolchain)
    "cargo-fuzz 0.13.1"
)
PREFIX=${VESSEL_TOOLS_PREFIX:-/usr/local}

say() { echo "deps: $*" >&2; }

if [[ $(id -u) != 0 ]]; then
    say "must run as root (apt-get install, $PREFIX/bin)"
    exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    [[ $p == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "apt packages present"
fi

for t in "${CARGO_TOOLS[@]}"; do
    read -r name version <<<"$t"
    if "$PREFIX/bin/$name" --version 2>/dev/null | grep -q "$version"; then
        say "$name $version present"
        continue
    fi
    say "cargo install $name $version (takes a minute or two)"
    cargo install --quiet --locked "$name" --version "$version" --root "$PREFIX"
done

# The KVM test lane's L1 kernel (Debian's generic linux-image, cached by version).
"$(dirname "$0")/kvm-lane.sh" --prepare
