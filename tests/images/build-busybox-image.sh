#!/usr/bin/env bash
# Builds the busybox test image as an OCI image-layout tarball, named
# docker.io/library/busybox:latest, from the busybox-static .deb that
# packaging/install-containerd.sh unpacks (fetched here if missing).
# Usage: build-busybox-image.sh <out.tar>
set -euo pipefail

out="${1:?usage: build-busybox-image.sh <out.tar>}"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${CLH_CACHE_DIR:-$HOME/.cache/clh-shim}"
busybox="$cache/busybox-static/bin/busybox"

if [ ! -x "$busybox" ]; then
  # Download and unpack only; busybox-static is never installed system-wide.
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get -q -o APT::Sandbox::User=root download busybox-static)
  mkdir -p "$cache/busybox-static.tmp"
  dpkg -x "$work"/busybox-static_*.deb "$cache/busybox-static.tmp"
  dpkg-deb -f "$work"/busybox-static_*.deb Version >"$cache/busybox-static.tmp/VERSION"
  rm -rf "$cache/busybox-static"
  mv "$cache/busybox-static.tmp" "$cache/busybox-static"
fi

python3 "$here/oci_image.py" busybox "$busybox" docker.io/library/busybox:latest "$out"
