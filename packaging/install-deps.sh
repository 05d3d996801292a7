#!/usr/bin/env bash
# Installs what building and testing clh-shim needs on a Debian 12 host:
# Debian packages, and the vhost-user daemons from crates.io into /usr/local.
# Idempotent: does nothing for what is already there.
set -euo pipefail

apt_packages=(
  qemu-system-x86   # the QEMU TCG backend
  protobuf-compiler # the agent protocol is compiled at build time
  zstd xz-utils kmod file binutils python3 gcc make # guest image build
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

# vhost-user backends, pinned versions, from crates.io.
declare -A crates=([virtiofsd]=1.14.0 [vhost-device-vsock]=0.3.0)
for bin in "${!crates[@]}"; do
  if [ -x "/usr/local/bin/$bin" ]; then continue; fi
  if [ -x "$HOME/.cargo/bin/$bin" ] && "$HOME/.cargo/bin/$bin" --version 2>/dev/null | grep -q "${crates[$bin]}"; then
    install -m 0755 "$HOME/.cargo/bin/$bin" "/usr/local/bin/$bin"
    continue
  fi
  echo "install-deps: building $bin ${crates[$bin]} from crates.io"
  cargo install --locked --root /usr/local --version "${crates[$bin]}" "$bin"
done
