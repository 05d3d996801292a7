#!/usr/bin/env bash
# Build the guest image: kernel (vmlinuz for QEMU, PVH vmlinux for Cloud
# Hypervisor), the initramfs whose /init is clh-agent, a baseline
# bench initramfs, and a manifest recording exactly what went in.
#
# usage: guest-image/build.sh <agent-binary> <outdir>
#
# The kernel is either ours (CLH_GUEST_KERNEL=own, the default): built by
# guest-image/kernel/build-kernel.sh from Debian's linux-source-6.12 with
# the minimal, all built-in configuration guest-image/kernel/clh.config, and
# cached by the hash of its inputs; or Debian's 6.12 cloud kernel package
# (CLH_GUEST_KERNEL=debian), whose modules go into the initramfs. Both come
# from bookworm-backports through a private apt configuration under the cache
# dir (guest-image/apt.sh), so the system's apt sources are never touched.
# apt verifies the .deb against the signed index; we re-check and record its
# SHA256.
#
# Environment:
#   CLH_GUEST_KERNEL    own (default) or debian
#   CLH_CACHE_DIR       download/extract cache (default ~/.cache/clh-shim)
#   CLH_KERNEL_SOURCE_VERSION  own: exact linux-source-6.12 version
#                       (see guest-image/kernel/build-kernel.sh)
#   CLH_KERNEL_PACKAGE  debian: exact package name, e.g.
#                       linux-image-6.12.95+deb12-cloud-amd64-unsigned
#   CLH_KERNEL_VERSION  debian: exact package version, e.g. 6.12.95-1~bpo12+1
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
KERNEL_KIND=${CLH_GUEST_KERNEL:-own}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}

[[ -x $AGENT ]] || die "agent binary $AGENT missing or not executable"
file -b "$AGENT" | grep -q 'statically linked\|static-pie linked' ||
    die "agent binary $AGENT is not statically linked: $(file -b "$AGENT")"
for tool in apt-get apt-cache dpkg zstd xz gzip python3 readelf depmod gcc sha256sum; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
mkdir -p "$OUT" "$CACHE"
# shellcheck source=apt.sh
source "$HERE/apt.sh"

# --- 1. The kernel -------------------------------------------------------------
# vmlinuz (bzImage) for QEMU, vmlinux (PVH ELF) for Cloud Hypervisor, the
# kernel's .config, and where its modules are (none for our own kernel).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clh-guest-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
KERNEL_MANIFEST=()
kconf() { sed -n "s/^CONFIG_$1=//p" "$KCONFIG"; }
case $KERNEL_KIND in
    own) # --- 1a. Our kernel, built from linux-source-6.12 -----------------
        KDIR=$("$HERE/kernel/build-kernel.sh") || die "building the kernel failed (guest-image/kernel/build-kernel.sh)"
        [[ -f $KDIR/.done ]] || die "build-kernel.sh printed $KDIR, which holds no finished build"
        KCONFIG=$KDIR/config
        KREL=$(sed -n 's/^kernel_release: //p' "$KDIR/kernel.txt")
        MODDIR=
        install -m 0644 "$KDIR/vmlinuz" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
        install -m 0644 "$KDIR/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
        mapfile -t KERNEL_MANIFEST <"$KDIR/kernel.txt"
        ;;
    debian) # --- 1b. Debian's cloud kernel package ---------------------------
        PKG=${CLH_KERNEL_PACKAGE:-}
        VER=${CLH_KERNEL_VERSION:-}
        if [[ -n $PKG && -n $VER && -f $(deb_path "$PKG" "$VER") && -f $(deb_path "$PKG" "$VER").sha256 ]]; then
            log "using cached $PKG $VER"
        else
            apt_update_if_stale
            if [[ -z $PKG ]]; then
                # Newest 6.12 cloud release; its -unsigned variant if packaged (the
                # signed one only adds a Secure Boot signature we have no use for).
                release=$(apt-cache "${APT_OPTS[@]}" search --names-only '^linux-image-6\.12\.[0-9]+\+.*-cloud-amd64(-unsigned)?$' |
                    awk '{print $1}' | sed -E 's/^linux-image-//; s/-unsigned$//' | sort -uV | tail -n1)
                [[ -n $release ]] || die "no linux-image-6.12.*-cloud-amd64 in bookworm-backports"
                PKG=linux-image-$release-unsigned
                apt-cache "${APT_OPTS[@]}" show "$PKG" >/dev/null 2>&1 || PKG=linux-image-$release
            fi
            [[ -n $VER ]] || VER=$(apt_candidate "$PKG")
        fi
        apt_fetch "$PKG" "$VER"
        DEB=$(deb_path "$PKG" "$VER")
        DEB_SHA=$(cat "$DEB.sha256")

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

        # vmlinuz as packaged, and the PVH vmlinux from inside it.
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
        KERNEL_MANIFEST=(
            "kernel_package: $PKG"
            "kernel_package_version: $VER"
            "kernel_package_sha256: $DEB_SHA"
        )
        ;;
    *) die "CLH_GUEST_KERNEL=$KERNEL_KIND: want own or debian" ;;
esac

# --- 2. Modules ------------------------------------------------------------
# What the agent needs, by kernel option. Options set =y are built in and
# need nothing; =m ones go into the initramfs with their dependencies (our
# own kernel has no modules at all: everything is =y).
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
if [[ -n $MODDIR ]]; then
    while IFS= read -r line; do
        path=${line%%:*}
        name=$(basename "$path"); name=${name%%.ko*}; name=${name//-/_}
        PATH_OF[$name]=$path
        DEP_OF[$path]=${line#*:}
    done <"$MODDIR/modules.dep"
fi

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
        m) [[ -n ${PATH_OF[$mod]:-} ]] || die "CONFIG_$opt=m but $mod is not in ${MODDIR:-the kernel, which has no modules (build it in: guest-image/kernel/clh.config)}"
           visit "${PATH_OF[$mod]}" ;;
        *) [[ $mod == virtio_rng ]] || die "kernel lacks CONFIG_$opt (needed for $mod)" ;;
    esac
done

# --- 3. The initramfs ---------------------------------------------------------
IRD=$WORK/initramfs
mkdir -p "$IRD"/{proc,sys,dev,run,tmp}
install -m 0755 "$AGENT" "$IRD/init"
# No modules, no load list: the agent then loads nothing.
if [[ ${#ORDER[@]} -gt 0 ]]; then
    mkdir -p "$IRD/lib/modules/$KREL"
    for path in "${ORDER[@]}"; do
        install -D -m 0644 "$MODDIR/$path" "$IRD/lib/modules/$KREL/$path"
    done
    printf '%s\n' "${ORDER[@]}" >"$IRD/lib/modules/clh-modules.load"
fi
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

# --- 4. Manifest -------------------------------------------------------------
sha() { sha256sum "$1" | cut -d' ' -f1; }
{
    echo "# clh-shim guest image; generated by guest-image/build.sh"
    echo "kernel: $KERNEL_KIND"
    printf '%s\n' "${KERNEL_MANIFEST[@]}" | grep -v '^kernel_release: '
    echo "kernel_release: $KREL"
    echo "agent_sha256: $(sha "$AGENT")"
    echo "modules: $(printf '%s\n' "${ORDER[@]}" | xargs -r -n1 basename | sed 's/\.ko.*//' | xargs)"
    echo "builtin: ${BUILTIN[*]}"
    for f in vmlinuz vmlinux initramfs.cpio.gz bench-initramfs.cpio.gz; do
        echo "file: $f sha256=$(sha "$OUT/$f") size=$(stat -c %s "$OUT/$f")"
    done
} >"$OUT/manifest.txt"

log "kernel $KREL ($KERNEL_KIND)"
log "modules: $(sed -n 's/^modules: //p' "$OUT/manifest.txt")"
for f in vmlinuz vmlinux initramfs.cpio.gz bench-initramfs.cpio.gz; do
    printf 'guest-image: %-24s %8s KiB\n' "$f" $(($(stat -c %s "$OUT/$f") / 1024)) >&2
done
