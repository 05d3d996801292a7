#!/usr/bin/env bash
# Build the guest image: kernel (vmlinuz for QEMU, PVH vmlinux for Cloud
# Hypervisor), the initramfs whose /init is clh-agent, a baseline
# bench initramfs, and a manifest recording exactly what went in.
#
# usage: guest-image/build.sh <agent-binary> <outdir>
#
# The kernel is Debian's 6.12 cloud kernel from bookworm-backports, fetched
# with a private apt configuration under the cache dir, so the system's apt
# sources are never touched. apt verifies the .deb against the signed
# index; we re-check and record its SHA256.
#
# Environment:
#   CLH_CACHE_DIR       download/extract cache (default ~/.cache/clh-shim)
#   CLH_KERNEL_PACKAGE  exact package name, e.g.
#                       linux-image-6.12.95+deb12-cloud-amd64-unsigned
#   CLH_KERNEL_VERSION  exact package version, e.g. 6.12.95-1~bpo12+1
#                       (both set + cached .deb = no network at all)
#   CLH_APT_REFRESH=1   force `apt-get update` (otherwise at most daily)
#   SOURCE_DATE_EPOCH   mtime for archive entries (default 0)
set -euo pipefail

die() { echo "guest-image: error: $*" >&2; exit 1; }
log() { echo "guest-image: $*" >&2; }

[[ $# -eq 2 ]] || die "usage: $0 <agent-binary> <outdir>"
AGENT=$(realpath "$1")
OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CLH_CACHE_DIR:-$HOME/.cache/clh-shim}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}

[[ -x $AGENT ]] || die "agent binary $AGENT missing or not executable"
file -b "$AGENT" | grep -q 'statically linked\|static-pie linked' ||
    die "agent binary $AGENT is not statically linked: $(file -b "$AGENT")"
for tool in apt-get apt-cache dpkg zstd xz gzip python3 readelf depmod gcc sha256sum; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
mkdir -p "$OUT" "$CACHE"

# --- 1. The kernel package ----------------------------------------------
APT_DIR=$CACHE/apt
mkdir -p "$APT_DIR"/{lists/partial,archives/partial} "$CACHE/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
    >"$APT_DIR/sources.list"
APT_OPTS=(
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o Dir::Etc::Preferences=/dev/null
    -o Dir::Etc::PreferencesParts=/dev/null
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR"
    -o Dir::State::status=/dev/null
    -o APT::Get::List-Cleanup=0
)
# As root, apt drops to _apt for downloads, which cannot write our cache.
[[ $EUID -ne 0 ]] || APT_OPTS+=(-o APT::Sandbox::User=root)

apt_update() {
    log "apt-get update (bookworm-backports, private lists in $APT_DIR)"
    apt-get "${APT_OPTS[@]}" -qq update >&2
}

PKG=${CLH_KERNEL_PACKAGE:-}
VER=${CLH_KERNEL_VERSION:-}
deb_path() { echo "$CACHE/debs/${PKG}_${VER//:/%3a}_amd64.deb"; }

if [[ -n $PKG && -n $VER && -f $(deb_path) && -f $(deb_path).sha256 ]]; then
    log "using cached $PKG $VER"
else
    stamp=$APT_DIR/lists/.updated
    if [[ ${CLH_APT_REFRESH:-0} == 1 || ! -f $stamp ]] || [[ -n $(find "$stamp" -mmin +1440) ]]; then
        apt_update
        touch "$stamp"
    fi
    if [[ -z $PKG ]]; then
        # Newest 6.12 cloud release; its -unsigned variant if packaged (the
        # signed one only adds a Secure Boot signature we have no use for).
        release=$(apt-cache "${APT_OPTS[@]}" search --names-only '^linux-image-6\.12\.[0-9]+\+.*-cloud-amd64(-unsigned)?$' |
            awk '{print $1}' | sed -E 's/^linux-image-//; s/-unsigned$//' | sort -uV | tail -n1)
        [[ -n $release ]] || die "no linux-image-6.12.*-cloud-amd64 in bookworm-backports"
        PKG=linux-image-$release-unsigned
        apt-cache "${APT_OPTS[@]}" show "$PKG" >/dev/null 2>&1 || PKG=linux-image-$release
    fi
    if [[ -z $VER ]]; then
        VER=$(apt-cache "${APT_OPTS[@]}" policy "$PKG" | awk '/Candidate:/ {print $2}')
        [[ -n $VER && $VER != "(none)" ]] || die "package $PKG not found in bookworm-backports"
    fi
    if [[ ! -f $(deb_path) || ! -f $(deb_path).sha256 ]]; then
        want=$(apt-cache "${APT_OPTS[@]}" show "$PKG=$VER" | awk '/^SHA256:/ {print $2; exit}')
        [[ -n $want ]] || die "no SHA256 for $PKG=$VER in the signed index"
        log "downloading $PKG $VER"
        tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
        (cd "$tmp" && apt-get "${APT_OPTS[@]}" -qq download "$PKG=$VER" >&2) ||
            { rm -rf "$tmp"; die "apt-get download $PKG=$VER failed"; }
        got_file=$(ls "$tmp"/*.deb 2>/dev/null | head -n1) || true
        [[ -n $got_file ]] || { rm -rf "$tmp"; die "apt-get download $PKG=$VER failed"; }
        got=$(sha256sum "$got_file" | cut -d' ' -f1)
        [[ $got == "$want" ]] || { rm -rf "$tmp"; die "$PKG=$VER: sha256 $got, index says $want"; }
        mv "$got_file" "$(deb_path)"
        echo "$want" >"$(deb_path).sha256"
        rm -rf "$tmp"
    fi
fi
DEB=$(deb_path)
DEB_SHA=$(cat "$DEB.sha256")
[[ $(sha256sum "$DEB" | cut -d' ' -f1) == "$DEB_SHA" ]] ||
    die "cached $DEB does not match its recorded sha256; delete it and rerun"

# Extract once per package version; depmod because the .deb ships no
# modules.dep (the postinst generates it on install).
ROOT=$CACHE/kernel/${PKG}_${VER}
if [[ ! -f $ROOT/.done ]]; then
    log "extracting $(basename "$DEB")"
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    dpkg -x "$DEB" "$ROOT"
    KREL=$(ls "$ROOT/lib/modules")
    depmod -b "$ROOT" "$KREL"
    touch "$ROOT/.done"
fi
KREL=$(ls "$ROOT/lib/modules")
[[ $(wc -w <<<"$KREL") -eq 1 ]] || die "expected one kernel release in $ROOT/lib/modules, got: $KREL"
KCONFIG=$ROOT/boot/config-$KREL
VMLINUZ=$ROOT/boot/vmlinuz-$KREL
MODDIR=$ROOT/lib/modules/$KREL
[[ -f $KCONFIG && -f $VMLINUZ ]] || die "package $PKG lacks /boot/config-$KREL or /boot/vmlinuz-$KREL"
kconf() { sed -n "s/^CONFIG_$1=//p" "$KCONFIG"; }

# --- 2. vmlinuz and the PVH vmlinux --------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clh-guest-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
install -m 0644 "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"

# The bzImage embeds the kernel ELF compressed with zstd (CONFIG_KERNEL_ZSTD).
# Try each zstd frame magic until one decompresses to an ELF; zstd
# complains about the bytes after the frame, which we expect.
[[ $(kconf KERNEL_ZSTD) == y ]] || die "kernel is not zstd-compressed (CONFIG_KERNEL_ZSTD unset); cannot extract vmlinux"
found=
for off in $(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$VMLINUZ" | cut -d: -f1); do
    tail -c +$((off + 1)) "$VMLINUZ" | zstd -dcq 2>/dev/null >"$WORK/vmlinux" || true
    if [[ $(head -c4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then
        found=$off
        break
    fi
done
[[ -n $found ]] || die "no zstd-compressed ELF found inside $VMLINUZ"
# Cloud Hypervisor boots vmlinux through the PVH entry point, announced by
# the XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) note.
readelf -n "$WORK/vmlinux" | grep -A1 -w Xen | grep -qiE 'PHYS32_ENTRY|0x00000012' ||
    die "extracted vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); Cloud Hypervisor cannot boot it"
mv "$WORK/vmlinux" "$OUT/vmlinux"

# --- 3. Modules ------------------------------------------------------------
# What the agent needs, by kernel option. Options set =y are built in and
# need nothing; =m ones go into the initramfs with their dependencies.
#   option                 module                              why
WANTED=(
    "VSOCKETS               vsock                              agent transport"
    "VIRTIO_VSOCKETS_COMMON vmw_vsock_virtio_transport_common  agent transport"
    "VIRTIO_VSOCKETS        vmw_vsock_virtio_transport         agent transport"
    "VIRTIO_MMIO            virtio_mmio                        QEMU microvm devices"
    "VIRTIO_PCI             virtio_pci                         Cloud Hypervisor devices"
    "FUSE_FS                fuse                               virtio-fs"
    "VIRTIO_FS              virtiofs                           virtio-fs rootfs"
    "OVERLAY_FS             overlay                            container rootfs"
    "VIRTIO_NET             virtio_net                         networking"
    "HW_RANDOM_VIRTIO       virtio_rng                         entropy (optional)"
)
declare -A DEP_OF PATH_OF
while IFS= read -r line; do
    path=${line%%:*}
    name=$(basename "$path"); name=${name%%.ko*}; name=${name//-/_}
    PATH_OF[$name]=$path
    DEP_OF[$path]=${line#*:}
done <"$MODDIR/modules.dep"

ORDER=()
declare -A SEEN
visit() { # depth-first: a module's dependencies load before it
    local path=$1 dep
    [[ -n ${SEEN[$path]:-} ]] && return
    SEEN[$path]=1
    for dep in ${DEP_OF[$path]}; do visit "$dep"; done
    ORDER+=("$path")
}
BUILTIN=()
for row in "${WANTED[@]}"; do
    read -r opt mod _ <<<"$row"
    case $(kconf "$opt") in
        y) BUILTIN+=("$mod") ;;
        m) [[ -n ${PATH_OF[$mod]:-} ]] || die "CONFIG_$opt=m but $mod is not in modules.dep"
           visit "${PATH_OF[$mod]}" ;;
        *) [[ $mod == virtio_rng ]] || die "kernel lacks CONFIG_$opt (needed for $mod)" ;;
    esac
done

# --- 4. The initramfs ---------------------------------------------------------
IRD=$WORK/initramfs
mkdir -p "$IRD"/{proc,sys,dev,run,tmp} "$IRD/lib/modules/$KREL"
install -m 0755 "$AGENT" "$IRD/init"
for path in "${ORDER[@]}"; do
    install -D -m 0644 "$MODDIR/$path" "$IRD/lib/modules/$KREL/$path"
done
printf '%s\n' "${ORDER[@]}" >"$IRD/lib/modules/clh-modules.load"
# The kernel opens /dev/console for init's stdio before /dev is mounted.
DEVS=(--dev dev/console:c:5:1:600 --dev dev/null:c:1:3:666)
python3 "$HERE/mkcpio.py" "$IRD" "${DEVS[@]}" >"$WORK/initramfs.cpio"

# The kernel detects the compression by magic, so any CONFIG_RD_* format
# works; the file name stays initramfs.cpio.gz, which the rest of the tree
# (config defaults, make install) expects, so this stays gzip.
[[ $(kconf RD_GZIP) == y ]] || die "kernel lacks CONFIG_RD_GZIP"
gzip -9 -n -c "$WORK/initramfs.cpio" >"$OUT/initramfs.cpio.gz"

BENCH=$WORK/bench
mkdir -p "$BENCH"/{proc,sys,dev}
gcc -static -Os -s -o "$BENCH/init" "$HERE/bench-init.c"
python3 "$HERE/mkcpio.py" "$BENCH" "${DEVS[@]}" | gzip -9 -n >"$OUT/bench-initramfs.cpio.gz"

# --- 5. Manifest -------------------------------------------------------------
sha() { sha256sum "$1" | cut -d' ' -f1; }
{
    echo "# clh-shim guest image; generated by guest-image/build.sh"
    echo "kernel_package: $PKG"
    echo "kernel_package_version: $VER"
    echo "kernel_package_sha256: $DEB_SHA"
    echo "kernel_release: $KREL"
    echo "agent_sha256: $(sha "$AGENT")"
    echo "modules: $(printf '%s\n' "${ORDER[@]}" | xargs -n1 basename | sed 's/\.ko.*//' | xargs)"
    echo "builtin: ${BUILTIN[*]}"
    for f in vmlinuz vmlinux initramfs.cpio.gz bench-initramfs.cpio.gz; do
        echo "file: $f sha256=$(sha "$OUT/$f") size=$(stat -c %s "$OUT/$f")"
    done
} >"$OUT/manifest.txt"

log "kernel $KREL from $PKG $VER"
log "modules: $(sed -n 's/^modules: //p' "$OUT/manifest.txt")"
for f in vmlinuz vmlinux initramfs.cpio.gz bench-initramfs.cpio.gz; do
    printf 'guest-image: %-24s %8s KiB\n' "$f" $(($(stat -c %s "$OUT/$f") / 1024)) >&2
done
