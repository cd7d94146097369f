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
# The debug binaries the end-to-end targets start, built as `cargo test --workspace`
# builds them (every binary package has integration tests): per-package builds (-p)
# would unify other features and rebuild most of the workspace.
WORKSPACE_BINS := cargo test -q --workspace --no-run

.PHONY: deps guest kernel agent initramfs build config demo test lint workspace-test fuzz fuzz-ci fuzz-ci-build \
        test-lane test-vmm bench-boot bench-run bench-net bench-restore bench-vmm bench-kvm bench-start bench-start-kvm bench-monitor soak faults clean install test-shim bench-shim

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
	cargo build --release -p vessel -p vessel-jailer

# A configuration that points the runtime at this checkout's guest.
config:
	@mkdir -p $(BUILD)
	@printf 'state_root = "/run/vessel"\nguest_kernel = "%s"\nguest_initramfs = "%s"\n' \
		$(GUEST)/vmlinux $(GUEST)/initramfs.cpio.gz > $(DEV_CONFIG)
	@echo "config: $(DEV_CONFIG)"

demo: deps guest build config
	$(VESSEL) check --boot
	@rm -rf $(BUILD)/demo-bundle
	@tests/support/busybox-bundle.sh $(BUILD)/demo-bundle $(VESSEL) -- \
		sh -c 'echo "Hello from a Vessel container in its own microVM"; echo "guest kernel: $$(uname -r)"'
	@echo "host kernel:  $$(uname -r)"
	$(VESSEL) --root $(BUILD)/demo-root run --bundle $(BUILD)/demo-bundle demo-$$$$

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	scripts/ci-run-selftest.sh

# Unit tests and the end-to-end tests, which boot real guests with QEMU
# (they need root and the guest built; in CI a missing prerequisite fails).
# The built-in VMM's Linux boot to /init takes ~105 s on this kind of host's software KVM
# (PVM) and ~10 s on real KVM: `make test` runs it in the KVM lane (suite linux_boot)
# instead; `cargo test --test linux_boot` runs it here.
workspace-test: guest config
	VESSEL_GUEST_DIR=$(GUEST) VESSEL_GUEST_KERNEL=$(GUEST)/vmlinux VESSEL_GUEST_AGENT=$(AGENT_BIN) \
		cargo test --workspace -- --test-threads=2 --skip linux_boots_to_init_with_virtio_devices_probed

# The built-in VMM's tests run with the workspace tests (workspace-test); this
# runs them alone. The Linux boot test uses build/guest/vmlinux.
test-vmm: kernel
	VESSEL_GUEST_KERNEL=$(GUEST)/vmlinux cargo test -p vessel-vmm

# The suites that need hardware KVM (built-in VMM to containers, QEMU -accel kvm,
# snapshots of Linux guests), in the KVM lane: scripts/test-lane.sh, docs/kvm-lane.md.
test-lane: guest config
	VESSEL_GUEST_DIR=$(GUEST) scripts/test-lane.sh

# cargo-fuzz targets (fuzz/, docs/threat-model.md "Fuzzing"): every target
# FUZZ_SECONDS (600) with AddressSanitizer; fuzz-ci: 30 s each without a
# sanitizer (part of make test). Both print target, executions, exec/s,
# corpus size and crashes, and fail on a crash.
fuzz:
	scripts/fuzz.sh

fuzz-ci:
	scripts/fuzz.sh --ci

# fuzz-ci's build alone (make test builds it in the background, see TEST_STEPS).
fuzz-ci-build:
	scripts/fuzz.sh --ci --build-only

# Each step in turn, timed; the table of times is printed at the end (or at a failure).
# fuzz-ci's build runs in the background at nice 19 (scripts/timed-steps.sh, `&`) from
# the workspace tests on, in the CPU time the end-to-end tests leave idle while they wait
# on their guests; its fuzzers run last, in the foreground: at nice 19 beside the KVM
# lane, which leaves no CPU idle, they made 10-20x fewer executions in their 30 s.
TEST_STEPS := deps guest config lint fuzz-ci-build& workspace-test test-lane fuzz-ci
test:
	@scripts/timed-steps.sh $(MAKE) -- $(foreach s,$(TEST_STEPS),'$(s)')

bench-boot: deps guest build config
	benches/boot.sh

bench-run: deps guest build config
	benches/run.sh

# iperf3 TCP both ways and 1,000 sequential HTTP requests, host <-> a Vessel
# container and a runc container on veth namespaces (docs/performance.md).
bench-net: deps guest build config
	benches/net.sh

# Scrape time of `vessel monitor` with SANDBOXES (20) running sandboxes, median of
# SCRAPES (20) (docs/monitoring.md).
bench-monitor: deps guest build config
	benches/monitor.sh

# Cold boot vs restore from a snapshot (QEMU; TCG on hosts without hardware KVM).
bench-restore: deps guest config
	cargo run --release -q -p vessel-runtime --example restore_bench -- $${RUNS:-10}

# Start from a template vs cold boot (docs/snapshots.md): `vessel run`, `ctr run` and a
# CRI pod + container, interleaved, medians of RUNS (10) and ratios; host PSS per idle
# sandbox with 1 and with 20 running. Here: the configured backend (QEMU boots cold, and
# the bench says why). bench-start-kvm: the built-in VMM on real KVM, in the KVM lane.
bench-start: deps guest config
	$(WORKSPACE_BINS)
	VESSEL_GUEST_DIR=$(GUEST) RUNS=$${RUNS:-10} cargo test -q --workspace \
		--test start_bench -- --ignored --nocapture

bench-start-kvm: guest config
	VESSEL_GUEST_DIR=$(GUEST) LANE_SUITES=start-bench LANE_PARALLEL=1 LANE_ENV=RUNS \
		LANE_SUITE_TIMEOUT=$${LANE_SUITE_TIMEOUT:-3600} RUNS=$${RUNS:-10} scripts/test-lane.sh

# Issue 14: 1,000 mixed cycles (vessel run, create/start/exec/kill/delete, ctr run, CRI
# pod + two containers) with leak checks every 100, then 20 pods at once
# (SOAK_CYCLES, SOAK_PODS, SOAK_CHECK_EVERY). Not in CI: `make test` runs soak_ci.
soak: deps guest config
	$(WORKSPACE_BINS)
	VESSEL_GUEST_DIR=$(GUEST) VESSEL_GUEST_KERNEL=$(GUEST)/vmlinux cargo test -q \
		--workspace --test soak -- --ignored --nocapture soak

# Issue 14: 100 faults at random lifecycle points (FAULTS, FAULTS_SEED), with the table
# fault / injections / recovered / leaks. `make test` runs faults_ci (each fault once).
faults: deps guest config
	$(WORKSPACE_BINS)
	VESSEL_GUEST_DIR=$(GUEST) VESSEL_GUEST_KERNEL=$(GUEST)/vmlinux cargo test -q \
		--workspace --test faults -- --ignored --nocapture faults

bench-vmm:
	sh crates/vmm/bench/bench-vmm.sh

# The built-in VMM and QEMU-KVM on real KVM, in the KVM lane (docs/kvm-lane.md):
# boot, run, restore, PSS and density figures (docs/performance.md).
bench-kvm: guest config
	benches/kvm.sh

clean:
	rm -rf $(BUILD) target

# Binaries to $(PREFIX)/bin, the guest to $(PREFIX)/share/vessel, and a default
# /etc/vessel/config.toml only when none exists (an existing one is kept).
PREFIX ?= /usr/local
install: guest
	cargo build --release -p vessel -p containerd-shim-vessel-v2 -p vessel-vmm -p vessel-jailer
	install -D -m 0755 -t $(DESTDIR)$(PREFIX)/bin target/release/vessel \
		target/release/containerd-shim-vessel-v2 target/release/vessel-vmm \
		target/release/vessel-jailer
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/vessel $(GUEST)/vmlinux $(GUEST)/initramfs.cpio.gz
	@if [ -e $(DESTDIR)/etc/vessel/config.toml ]; then \
		echo "install: keeping existing $(DESTDIR)/etc/vessel/config.toml"; \
	else \
		mkdir -p $(DESTDIR)/etc/vessel && \
		printf 'guest_kernel = "%s"\nguest_initramfs = "%s"\n' \
			$(PREFIX)/share/vessel/vmlinux $(PREFIX)/share/vessel/initramfs.cpio.gz \
			> $(DESTDIR)/etc/vessel/config.toml && \
		echo "install: wrote $(DESTDIR)/etc/vessel/config.toml"; \
	fi

# The containerd shim's end-to-end tests alone (private containerd 1.6, ctr and CRI);
# workspace-test runs them too.
test-shim: guest config
	VESSEL_GUEST_DIR=$(GUEST) cargo test -p containerd-shim-vessel-v2 -- --test-threads=1

bench-shim: deps guest config
	cargo build --release -p containerd-shim-vessel-v2
	benches/shim.sh
