#!/usr/bin/env bash
# Builds the pod sandbox image registry.k8s.io/pause:3.10 as an OCI
# image-layout tarball from pause.c, compiled static (the image has no libc).
# Usage: build-pause-image.sh <out.tar>
set -euo pipefail

out="${1:?usage: build-pause-image.sh <out.tar>}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# -Wl,--build-id=none keeps the binary, hence the image digest, reproducible.
gcc -static -Os -s -Wall -Werror -Wl,--build-id=none -o "$work/pause" "$here/pause.c"
python3 "$here/oci_image.py" pause "$work/pause" registry.k8s.io/pause:3.10 "$out"
