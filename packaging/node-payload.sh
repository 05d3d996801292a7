#!/usr/bin/env bash
# Lays out a node payload: what clh-install installs as one version (see
# installer/src/payload.rs), and what the installer image carries.
#
# usage: packaging/node-payload.sh <shim> <clh-install> <guest-dir> <outdir>
#
# The helpers virtiofsd and vhost-device-vsock are taken from PATH (make
# deps installs them); the shim configuration template is
# config/clh-shim.toml. VERSIONS records exactly what went in.
set -euo pipefail

die() { echo "node-payload: error: $*" >&2; exit 1; }
[[ $# -eq 4 ]] || die "usage: $0 <shim> <clh-install> <guest-dir> <outdir>"
shim=$1 installer=$2 guest=$3 out=$4
here=$(cd "$(dirname "$0")/.." && pwd)

[[ -x $shim ]] || die "no shim at $shim: run make shim"
[[ -x $installer ]] || die "no clh-install at $installer: run make installer"
# The installer image has no libc: clh-install must be static.
file -b "$installer" | grep -q 'statically linked' ||
    die "$installer is not statically linked: build it with make installer"
for f in vmlinux vmlinuz initramfs.cpio.gz manifest.txt; do
    [[ -f $guest/$f ]] || die "no $guest/$f: run make guest-image"
done

tmp=$out.tmp
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/share/clh-shim" "$tmp/etc/clh-shim"
install -m 0755 "$shim" "$tmp/bin/containerd-shim-clh-v2"
install -m 0755 "$installer" "$tmp/bin/clh-install"
{
    echo "clh-shim $(git -C "$here" describe --always --dirty 2>/dev/null || echo unknown)"
    for helper in virtiofsd vhost-device-vsock; do
        path=$(command -v "$helper") || die "$helper not on PATH: run make deps"
        install -m 0755 "$path" "$tmp/bin/$helper"
        echo "$helper $("$path" --version 2>/dev/null | head -n1) sha256:$(sha256sum <"$path" | cut -d' ' -f1)"
    done
    echo "guest image: see share/clh-shim/manifest.txt"
} >"$tmp/VERSIONS"
for f in vmlinux vmlinuz initramfs.cpio.gz manifest.txt; do
    install -m 0644 "$guest/$f" "$tmp/share/clh-shim/$f"
done
install -m 0644 "$here/config/clh-shim.toml" "$tmp/etc/clh-shim/config.toml"
rm -rf "$out"
mv "$tmp" "$out"
echo "node-payload: $out ($(du -sh "$out" | cut -f1))"
