#!/usr/bin/env bash
# Installs what building and testing clh-shim needs on a Debian 12 host:
# Debian packages, and the vhost-user daemons from crates.io into /usr/local.
# Idempotent: does nothing for what is already there.
# Every Debian package it relies on is named here, even those most machines
# have: tests/fresh-root.sh (make fresh-root-test) runs it in a debootstrapped
# minbase Debian 12 root, where anything unnamed is missing.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root (it installs Debian packages and /usr/local/bin tools)" >&2
  exit 1
fi

apt_packages=(
  ca-certificates # cargo reaches crates.io over https
  libc6-dev # rustc links through gcc (below), which only recommends libc6-dev: not installed with --no-install-recommends
  protobuf-compiler # the agent protocol is compiled at build time
  libseccomp-dev # the agent's seccomp filters (libseccomp.a, linked statically)
  zstd xz-utils kmod file binutils python3 gcc make # guest image build
  python3-yaml # tests: the Kubernetes manifests of packaging/kubernetes parse and agree
  openssl # tests: certificates of the fake Kubernetes API server (node labels)
  flex bison bc libelf-dev lz4 # the guest kernel build from linux-source-6.12 (guest-image/kernel/build-kernel.sh)
  containernetworking-plugins # CNI static, loopback, bridge, host-local (/usr/lib/cni) for the CRI tests
  iproute2 # the network tests remove their CNI bridge (ip link delete)
  iptables # the CNI portmap plugin's hostPort rules (the network tests)
  libcap-ng-dev # virtiofsd links libcap-ng (cargo install below)
  pkg-config # how virtiofsd's build finds libcap-ng and libseccomp
  g++ # libfuzzer-sys builds libFuzzer (make fuzz)
  debootstrap # tests/fresh-root.sh builds a fresh Debian 12 root to run this script in
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# QEMU 10 from bookworm-backports for the TCG backend: bookworm's QEMU 7.2
# TCG crashes the guest kernel about one boot in five when the host CPU is
# contended (double faults, NULL dereferences in early boot); 10.0 does not.
# Backports is added with a low pin priority, so it never upgrades anything
# else; the QEMU transaction alone targets it (-t), so that what QEMU 10 needs
# that bookworm lacks (seabios >= 1.16.3, newer libraries) also comes from
# backports, while packages already installed stay as they are.
qemu_major() { dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/[^0-9].*//'; }
if [ "$(qemu_major || true)" != 10 ]; then
  list=/etc/apt/sources.list.d/clh-shim-bookworm-backports.sources
  if [ ! -e "$list" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$list" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    cat > /etc/apt/preferences.d/clh-shim-bookworm-backports <<'PIN'
Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100
PIN
  fi
  echo "install-deps: installing QEMU 10 from bookworm-backports"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-system-data \
    seabios # QEMU 10's BIOS: it needs seabios >= 1.16.3, which only backports has
fi
case "$(qemu_major || true)" in
  10) ;;
  *)
    echo "install-deps: qemu-system-x86 $(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || echo '(not installed)') is not QEMU 10 after installing from bookworm-backports; check that apt reaches bookworm-backports (apt-cache policy qemu-system-x86)" >&2
    exit 1
    ;;
esac
echo "install-deps: $(qemu-system-x86_64 --version | head -n 1)"

# vhost-user backends, and cargo-fuzz for make fuzz (it builds libFuzzer
# with g++), pinned versions, from crates.io.
declare -A crates=([virtiofsd]=1.14.0 [vhost-device-vsock]=0.3.0 [cargo-fuzz]=0.13.1)
for bin in "${!crates[@]}"; do
  if [ -x "/usr/local/bin/$bin" ]; then continue; fi
  if [ -x "$HOME/.cargo/bin/$bin" ] && "$HOME/.cargo/bin/$bin" --version 2>/dev/null | grep -q "${crates[$bin]}"; then
    install -m 0755 "$HOME/.cargo/bin/$bin" "/usr/local/bin/$bin"
    continue
  fi
  if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo is not on PATH ($PATH), and $bin must be built from crates.io: install the Rust toolchain with rustup and put ~/.cargo/bin on PATH" >&2
    exit 1
  fi
  echo "install-deps: building $bin ${crates[$bin]} from crates.io"
  cargo install --locked --root /usr/local --version "${crates[$bin]}" "$bin"
done
