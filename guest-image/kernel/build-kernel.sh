#!/usr/bin/env bash
# Build clh-shim's own guest kernel from Debian's linux-source-6.12 with the
# minimal configuration in clh.config, and print the directory holding it:
#   vmlinuz     the bzImage, for QEMU -kernel
#   vmlinux     the same kernel as an ELF with the PVH entry note, for
#               Cloud Hypervisor
#   config      the full .config
#   kernel.txt  source package, version, sha256, inputs hash, release,
#               compiler, output hashes
#
# usage: guest-image/kernel/build-kernel.sh
#
# The source comes from bookworm-backports through the private apt
# configuration of guest-image/apt.sh, checked against the signed index.
# The result is cached under $CACHE/kernel-own/<sha256 of the inputs>/: the
# source package (name, version, sha256), clh.config, this script and the
# compiler's version. Same inputs, no rebuild; a CI cache of
# $CACHE/kernel-own keyed on the same inputs rebuilds only when they change.
#
# Environment:
#   CLH_CACHE_DIR                download/build cache (default ~/.cache/clh-shim)
#   CLH_KERNEL_SOURCE_VERSION    exact linux-source-6.12 version, e.g.
#                                6.12.95-1~bpo12+1 (default: the candidate in
#                                bookworm-backports; set + cached .deb = no
#                                network at all)
#   CLH_KERNEL_JOBS              make -j (default: the number of CPUs)
#   CLH_KERNEL_KEEP_TREE=1       keep the unpacked source and objects
#   CLH_APT_REFRESH=1            force `apt-get update`
#   SOURCE_DATE_EPOCH            the kernel's build timestamp (default 0)
set -euo pipefail

die() { echo "build-kernel: error: $*" >&2; exit 1; }
log() { echo "build-kernel: $*" >&2; }

[[ $# -eq 0 ]] || die "usage: $0 (prints the output directory)"
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CLH_CACHE_DIR:-$HOME/.cache/clh-shim}
FRAGMENT=$HERE/clh.config
SERIES=6.12
SRC_PKG=linux-source-$SERIES
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
for tool in apt-get apt-cache dpkg-deb tar xz lz4 make gcc ld bc flex bison perl readelf objcopy sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (packaging/install-deps.sh installs it)"
done
[[ -f /usr/include/gelf.h ]] || die "missing libelf headers (libelf-dev; packaging/install-deps.sh installs it)"
mkdir -p "$CACHE"

# shellcheck source=../apt.sh
source "$HERE/../apt.sh"

# --- 1. The source package ----------------------------------------------------
VER=${CLH_KERNEL_SOURCE_VERSION:-}
if [[ -n $VER && -f $(deb_path "$SRC_PKG" "$VER" all) && -f $(deb_path "$SRC_PKG" "$VER" all).sha256 ]]; then
    log "using cached $SRC_PKG $VER"
else
    apt_update_if_stale
    [[ -n $VER ]] || VER=$(apt_candidate "$SRC_PKG")
fi
apt_fetch "$SRC_PKG" "$VER" all
DEB=$(deb_path "$SRC_PKG" "$VER" all)
DEB_SHA=$(cat "$DEB.sha256")

# --- 2. The cache key -------------------------------------------------------------
CC_VERSION=$(gcc --version | head -n1)
LD_VERSION=$(ld --version | head -n1)
KEY=$(
    {
        echo "source $SRC_PKG $VER $DEB_SHA"
        echo "fragment $(sha256sum <"$FRAGMENT" | cut -d' ' -f1)"
        echo "script $(sha256sum <"$0" | cut -d' ' -f1)"
        echo "cc $CC_VERSION"
        echo "ld $LD_VERSION"
        echo "epoch $SOURCE_DATE_EPOCH"
    } | sha256sum | cut -d' ' -f1
)
DEST=$CACHE/kernel-own/$KEY
# One build per key at a time (two image builds at once wait for the first).
mkdir -p "$CACHE/kernel-own"
exec 9>"$CACHE/kernel-own/.lock-$KEY"
flock 9
if [[ -f $DEST/.done ]]; then
    log "cached: $DEST"
    echo "$DEST"
    exit 0
fi

# --- 3. Unpack -------------------------------------------------------------------
TREE=$CACHE/kernel-own/build-$KEY
rm -rf "$TREE"
mkdir -p "$TREE"
[[ ${CLH_KERNEL_KEEP_TREE:-0} == 1 ]] || trap 'rm -rf "$TREE"' EXIT
log "unpacking $SRC_PKG $VER"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$TREE" --wildcards "./usr/src/linux-source-$SERIES.tar.*"
TARBALL=$(ls "$TREE"/usr/src/linux-source-$SERIES.tar.* | head -n1)
[[ -n $TARBALL ]] || die "$DEB has no /usr/src/linux-source-$SERIES.tar.*"
tar -x -C "$TREE" -f "$TARBALL"
rm -rf "$TREE/usr"
SRC=$TREE/linux-source-$SERIES
[[ -f $SRC/Makefile ]] || die "no kernel tree at $SRC"
OBJ=$TREE/obj
mkdir -p "$OBJ"

# --- 4. Configure and check -----------------------------------------------------
export KBUILD_BUILD_TIMESTAMP="@$SOURCE_DATE_EPOCH" KBUILD_BUILD_USER=clh KBUILD_BUILD_HOST=clh-shim KBUILD_BUILD_VERSION=1
MAKE=(make -s -C "$SRC" O="$OBJ" ARCH=x86_64)
log "configuring: allnoconfig + $(basename "$FRAGMENT")"
"${MAKE[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >&2
"${MAKE[@]}" olddefconfig >&2
# Every option of the fragment must have kept its value: Kconfig silently
# drops one whose dependencies are unmet.
bad=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF "$line" "$OBJ/.config" ||
            bad+=("${BASH_REMATCH[1]}: want ${BASH_REMATCH[2]}, got $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$OBJ/.config" || echo unset)")
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        ! grep -qE "^${BASH_REMATCH[1]}=" "$OBJ/.config" ||
            bad+=("${BASH_REMATCH[1]}: want unset, got $(grep -E "^${BASH_REMATCH[1]}=" "$OBJ/.config")")
    fi
done <"$FRAGMENT"
if [[ ${#bad[@]} -gt 0 ]]; then
    printf 'build-kernel:   %s\n' "${bad[@]}" >&2
    die "${#bad[@]} option(s) of $FRAGMENT did not survive olddefconfig (unmet dependencies?)"
fi

# --- 5. Build --------------------------------------------------------------------
JOBS=${CLH_KERNEL_JOBS:-$(nproc)}
log "building $SRC_PKG $VER with -j$JOBS (several minutes)"
nice -n 19 "${MAKE[@]}" -j"$JOBS" bzImage vmlinux >&2
KREL=$(cat "$OBJ/include/config/kernel.release")
STAGE=$CACHE/kernel-own/.stage-$KEY
rm -rf "$STAGE"
mkdir -p "$STAGE"
install -m 0644 "$OBJ/arch/x86/boot/bzImage" "$STAGE/vmlinuz"
# Cloud Hypervisor loads the ELF's segments; symbols are of no use to it.
objcopy --strip-all "$OBJ/vmlinux" "$STAGE/vmlinux"
chmod 0644 "$STAGE/vmlinux"
readelf -n "$STAGE/vmlinux" | grep -A1 -w Xen | grep -qiE 'PHYS32_ENTRY|0x00000012' ||
    die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH set?"
install -m 0644 "$OBJ/.config" "$STAGE/config"
sha() { sha256sum "$1" | cut -d' ' -f1; }
{
    echo "kernel_source_package: $SRC_PKG"
    echo "kernel_source_version: $VER"
    echo "kernel_source_sha256: $DEB_SHA"
    echo "kernel_config_fragment_sha256: $(sha "$FRAGMENT")"
    echo "kernel_build_inputs_sha256: $KEY"
    echo "kernel_release: $KREL"
    echo "kernel_compiler: $CC_VERSION"
    echo "kernel_linker: $LD_VERSION"
    echo "kernel_config_sha256: $(sha "$STAGE/config")"
} >"$STAGE/kernel.txt"
touch "$STAGE/.done"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
log "built $KREL: $DEST"
echo "$DEST"
