# Vessel: run `make demo` or `make test` on a fresh Debian 12 host (as root).
SHELL := /bin/bash
.DEFAULT_GOAL := build

BUILD      := $(CURDIR)/build
GUEST      := $(BUILD)/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN  := $(CURDIR)/target/$(AGENT_TARGET)/release/vessel-agent
DEV_CONFIG := $(BUILD)/config.toml
VESSEL     := $(CURDIR)/target/release/vessel
export VESSEL_CONFIG := $(DEV_CONFIG)

.PHONY: deps guest kernel agent initramfs build config demo test lint workspace-test \
        test-vmm bench-boot bench-vmm clean

deps:
	scripts/install-deps.sh

kernel:
	guest/kernel/build.sh $(GUEST)

agent:
	RUSTFLAGS='-C target-feature=+crt-static' \
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	cargo build --release -p vessel-agent --target $(AGENT_TARGET)

initramfs: agent
	guest/initramfs/build.sh $(AGENT_BIN) $(GUEST)/initramfs.cpio.gz

guest: kernel initramfs

build:
	cargo build --release -p vessel

# A configuration that points the runtime at this checkout's guest.
config:
	@mkdir -p $(BUILD)
	@printf 'state_root = "/run/vessel"\nguest_kernel = "%s"\nguest_initramfs = "%s"\n' \
		$(GUEST)/vmlinux $(GUEST)/initramfs.cpio.gz > $(DEV_CONFIG)
	@echo "config: $(DEV_CONFIG)"

demo: deps guest build config
	$(VESSEL) check --boot

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# Unit tests and the end-to-end tests, which boot real guests with QEMU
# (they need root and the guest built; in CI a missing prerequisite fails).
workspace-test: guest config
	VESSEL_GUEST_DIR=$(GUEST) VESSEL_GUEST_KERNEL=$(GUEST)/vmlinux cargo test --workspace -- --test-threads=2

# The built-in VMM's tests run with the workspace tests (workspace-test); this
# runs them alone. The Linux boot test uses build/guest/vmlinux.
test-vmm: kernel
	VESSEL_GUEST_KERNEL=$(GUEST)/vmlinux cargo test -p vessel-vmm

test: deps guest config lint workspace-test

bench-boot: deps guest build config
	benches/boot.sh

bench-vmm:
	sh crates/vmm/bench/bench-vmm.sh

clean:
	rm -rf $(BUILD) target
