# clh-shim: containerd-shim-clh-v2 and its guest image.
#
#   make demo    set everything up, ctr run a container in a microVM
#   make test    set everything up and run every test
#   make fuzz    run each fuzz target for FUZZ_SECONDS (30) seconds
#   make bench   boot, ctr, CRI (start latency, memory), shared-fs, network and density benchmarks, beside their baselines
#   make soak    pods made and removed for SOAK_CYCLES cycles; resource counts must stay flat
#   make fresh-root-test   make deps and the build in a freshly debootstrapped Debian 12 root (rerun only when the scripts change)
#   make node-install      install on this node with clh-install (make node-uninstall takes it off)
#   make node-image        the node installer image (OCI archive) for packaging/kubernetes/clh-deploy.yaml

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO ?= cargo
BUILD_DIR := $(CURDIR)/build
GUEST_DIR := $(BUILD_DIR)/guest
# The agent is PID 1 of the guest: a static binary. The gnu target with
# crt-static and libseccomp.a (libseccomp-dev), position-dependent: a
# static-pie agent with libseccomp.a crashes at start; a plain static one runs.
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/release/clh-agent
SHIM_BIN := target/release/containerd-shim-clh-v2
export CLH_GUEST_DIR := $(GUEST_DIR)
# The guest kernel: own (built from Debian's linux-source-6.12 with
# guest-image/kernel/clh.config, cached by the hash of its inputs) or debian
# (Debian's 6.12 cloud kernel package): make guest-image CLH_GUEST_KERNEL=debian
export CLH_GUEST_KERNEL ?= own
# The test guest image: the same kernel, an agent with the fault switch
# (feature fault-injection; REL-AGENT-01, REL-PANIC-01). Never installed.
FAULTS_GUEST_DIR := $(BUILD_DIR)/guest-faults
export CLH_FAULTS_GUEST_DIR := $(FAULTS_GUEST_DIR)

.PHONY: installer node-payload node-image node-install node-uninstall
.PHONY: all deps fresh-root-test build shim agent guest-image guest-image-faults guest-image-debian soak test unit-test lint fuzz bench demo check clean install

all: build guest-image

deps:
	packaging/install-deps.sh
	packaging/install-containerd.sh

# make deps, then make build guest-image, as on a fresh machine: in a
# debootstrapped Debian 12 minbase root with the host's Rust toolchain
# (tests/fresh-root.sh, about 15 minutes). Cached by the sha256 of the install
# scripts, the test, the deps target above and guest-image/build.sh: it runs
# again only when they change (CLH_FRESH_ROOT_FORCE=1 reruns it,
# CLH_FRESH_ROOT_BUILD=0 stops after make deps).
fresh-root-test: deps
	tests/fresh-root.sh

shim:
	$(CARGO) build --release -p containerd-shim-clh-v2

STATIC_BUILD = LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=$(dir $(shell gcc -print-file-name=libseccomp.a)) \
		RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
		$(CARGO) build --release --target $(AGENT_TARGET)
AGENT_BUILD = $(STATIC_BUILD) -p clh-agent

agent:
	$(AGENT_BUILD)

build: shim agent

# The node installer, static (its image has no libc), built with the
# agent's flags so that the two share one target dir without rebuilds.
INSTALLER_BIN := target/$(AGENT_TARGET)/release/clh-install
installer:
	$(STATIC_BUILD) -p clh-install

# What clh-install installs: shim, guest image, helpers, config template.
NODE_PAYLOAD := $(BUILD_DIR)/node-payload
node-payload: shim installer guest-image
	packaging/node-payload.sh $(SHIM_BIN) $(INSTALLER_BIN) $(GUEST_DIR) $(NODE_PAYLOAD)

# The installer image as an OCI archive: `ctr -n k8s.io images import` it
# on each node (or push it to your registry), then kubectl apply
# packaging/kubernetes/clh-deploy.yaml.
NODE_IMAGE_NAME := localhost/clh-shim-installer:0.1.0
node-image: node-payload
	python3 tests/images/oci_image.py installer $(NODE_PAYLOAD) $(NODE_IMAGE_NAME) $(BUILD_DIR)/clh-node-installer.tar

# One command on a node without Kubernetes (see packaging/README.md).
node-install: deps node-payload
	$(NODE_PAYLOAD)/bin/clh-install install

node-uninstall:
	/opt/clh-shim/current/bin/clh-install uninstall

guest-image: agent
	guest-image/build.sh $(AGENT_BIN) $(GUEST_DIR)

# Both agents build to the same $(AGENT_BIN): the fault one is copied
# aside, then the plain one is linked back (cargo re-links a fresh build),
# so what `make install` takes is never the test agent.
guest-image-faults: guest-image
	$(AGENT_BUILD) --features fault-injection
	mkdir -p $(BUILD_DIR)/agent-faults
	cp $(AGENT_BIN) $(BUILD_DIR)/agent-faults/clh-agent
	$(AGENT_BUILD)
	guest-image/build.sh $(BUILD_DIR)/agent-faults/clh-agent $(FAULTS_GUEST_DIR)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p clh-agent --all-targets --features fault-injection -- -D warnings

# Every test: lints, unit tests, then the VM tests (real QEMU TCG guests,
# real virtiofsd; Cloud Hypervisor API tests when cloud-hypervisor is on
# PATH). VM tests run one at a time: the host has 2 cores. A test that
# cannot run here records why in the skip log (crate clh-test-skip); the
# count and the reasons are the last thing printed.
SKIP_LOG := $(BUILD_DIR)/test-skips.log
test: export CLH_TEST_SKIP_LOG := $(SKIP_LOG)
test: deps fresh-root-test guest-image guest-image-faults guest-image-debian lint
	mkdir -p $(BUILD_DIR) && rm -f $(SKIP_LOG)
	$(CARGO) test --workspace --exclude clh-tests
	FUZZ_SECONDS=20 tests/fuzz.sh
	$(CARGO) test -p clh-tests -- --test-threads=1
	# The Debian cloud kernel stays selectable (CLH_GUEST_KERNEL=debian):
	# the boot tests on it too.
	CLH_GUEST_DIR=$(BUILD_DIR)/guest-debian $(CARGO) test -p clh-tests --test boot_qemu -- --test-threads=1
	tests/report-skips.sh $(SKIP_LOG)

# The cargo-fuzz targets of fuzz/ (a package of its own, outside the
# workspace), each for FUZZ_SECONDS seconds; a crash fails it.
FUZZ_SECONDS ?= 30
fuzz: deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz.sh

# The same agent with the Debian cloud kernel: the boot bench compares.
guest-image-debian: agent
	CLH_GUEST_KERNEL=debian guest-image/build.sh $(AGENT_BIN) $(BUILD_DIR)/guest-debian

bench: deps guest-image guest-image-debian
	$(CARGO) bench -p clh-tests --bench boot
	$(CARGO) bench -p clh-tests --bench ctr
	$(CARGO) bench -p clh-tests --bench cri
	$(CARGO) bench -p clh-tests --bench fs
	$(CARGO) bench -p clh-tests --bench net
	$(CARGO) bench -p clh-tests --bench density

# REL-SOAK-01: SOAK_PODS pods at once for SOAK_CYCLES cycles (make test
# runs 1 x 2); the counts per cycle and a flat-line verdict.
SOAK_PODS ?= 3
SOAK_CYCLES ?= 10
soak: deps guest-image
	SOAK_PODS=$(SOAK_PODS) SOAK_CYCLES=$(SOAK_CYCLES) \
		$(CARGO) test -p clh-tests --test soak -- --nocapture

check: shim
	$(SHIM_BIN) check --config $(BUILD_DIR)/demo-config.toml || true

demo: deps guest-image shim
	tests/demo.sh

install: build guest-image
	install -D -m 0755 $(SHIM_BIN) /usr/local/bin/containerd-shim-clh-v2
	install -D -m 0644 $(GUEST_DIR)/vmlinux /usr/share/clh-shim/vmlinux
	install -D -m 0644 $(GUEST_DIR)/vmlinuz /usr/share/clh-shim/vmlinuz
	install -D -m 0644 $(GUEST_DIR)/initramfs.cpio.gz /usr/share/clh-shim/initramfs.cpio.gz
	test -e /etc/clh-shim/config.toml || install -D -m 0644 config/clh-shim.toml /etc/clh-shim/config.toml

clean:
	$(CARGO) clean
	rm -rf $(BUILD_DIR)
