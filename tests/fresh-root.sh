#!/usr/bin/env bash
# The fresh-machine test (make fresh-root-test): runs `make deps`
# (packaging/install-deps.sh, then packaging/install-containerd.sh), twice
# (the second must install nothing), then `make build guest-image`, as root in
# a freshly debootstrapped Debian 12 root (minbase, plus make to type the
# command), the host's Rust toolchain bind-mounted read-only, and checks what
# they installed. A Debian package that the scripts use without naming it
# fails here, not on a user's first command.
#
# `make build guest-image` is what `make demo` and `make test` build first
# (about 9 of the test's 15 minutes on 2 cores, plus about 15 for the guest
# kernel, which the fresh root builds from source: its cache starts empty);
# CLH_FRESH_ROOT_BUILD=0 stops after make deps.
#
# It runs again only when what it tests changes: the sha256 of both scripts,
# this file, the Makefile's deps target (and guest-image/build.sh, apt.sh and
# kernel/build-kernel.sh when it builds) names a stamp under $CLH_CACHE_DIR/fresh-root
# (~/.cache/clh-shim/fresh-root); with the stamp there it says so and passes
# at once. CLH_FRESH_ROOT_FORCE=1 reruns it anyway.
#
# The root lives on a tmpfs (CLH_FRESH_ROOT_SIZE, default 12g: it takes
# memory only as it fills) mounted in a private mount and PID namespace
# (unshare): every mount, and every process started in the root, ends with
# that namespace, whatever way the test exits; the trap below removes the
# empty mount point. The debootstrap packages are cached as a tarball
# (debootstrap --make-tarball), one per ISO week, beside the stamps.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache_root="${CLH_CACHE_DIR:-$HOME/.cache/clh-shim}/fresh-root"
suite=bookworm
mirror=http://deb.debian.org/debian
variant=minbase
include="make"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
size="${CLH_FRESH_ROOT_SIZE:-12g}"
build="${CLH_FRESH_ROOT_BUILD:-1}"

log() { echo "fresh-root: $*"; }
die() {
  echo "fresh-root: FAILED: $*" >&2
  exit 1
}

# --- Inside the private namespaces (PID 1 of the new PID namespace) --------
if [ "${1:-}" = --inside ]; then
  work="$2"
  root="$work/root"
  tarball="$3"
  mount -t tmpfs -o "size=$size,mode=0755" clh-fresh-root "$work"
  mkdir "$root"
  if [ -f "$tarball" ]; then
    log "unpacking the cached $suite $variant packages ($tarball)"
  else
    log "downloading the $suite $variant packages (cached in $tarball)"
    mkdir "$work/dl"
    debootstrap --variant="$variant" --include="$include" --make-tarball="$work/debs.tgz" \
      "$suite" "$work/dl" "$mirror" >"$work/debootstrap-dl.log" 2>&1 ||
      die "debootstrap --make-tarball failed; its log: $(tail -n 20 "$work/debootstrap-dl.log")"
    rm -rf "$work/dl"
    if cp "$work/debs.tgz" "$tarball.tmp" 2>/dev/null && mv "$tarball.tmp" "$tarball"; then
      find "$(dirname "$tarball")" -maxdepth 1 -name 'debootstrap-*.tgz' ! -name "$(basename "$tarball")" -delete
    else
      rm -f "$tarball.tmp"
      log "could not cache the tarball in $(dirname "$tarball") (disk full?); going on without"
      tarball="$work/debs.tgz"
    fi
  fi
  debootstrap --variant="$variant" --include="$include" --unpack-tarball="$tarball" \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    die "debootstrap of $suite into $root failed; its log: $(tail -n 20 "$work/debootstrap.log")"
  rm -f "$work/debs.tgz"

  # What a machine has that a bare root lacks: name resolution, and no
  # daemon started by a package's maintainer script (the namespace would end
  # it anyway).
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # The host's local certificate authorities (a TLS-intercepting proxy's,
  # say), which the ca-certificates package adds when the scripts install it:
  # site configuration, like resolv.conf, not something the scripts provide.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  mount --bind /dev "$root/dev"
  if [ -d /dev/pts ]; then mount --bind /dev/pts "$root/dev/pts"; fi
  # The Rust toolchain where rustup puts it, read-only; ~/.cargo writable
  # through an overlay (cargo keeps its registry there), the host's copy
  # never written.
  mkdir -p "$root/root/.rustup" "$root/root/.cargo" "$work/cargo-upper" "$work/cargo-work"
  mount --bind -o ro "$rustup_home" "$root/root/.rustup"
  mount -t overlay overlay -o "lowerdir=$cargo_home,upperdir=$work/cargo-upper,workdir=$work/cargo-work" \
    "$root/root/.cargo" || die "cannot mount an overlay over $cargo_home (overlayfs missing from the kernel?)"
  # The repository's tracked files, not its build outputs.
  mkdir "$root/root/clh-shim"
  tar -C "$repo" --exclude=./target --exclude=./build --exclude=./.git --exclude=./fuzz/target \
    --exclude=./fuzz/corpus --exclude=./fuzz/artifacts -cf - . | tar -C "$root/root/clh-shim" -xf -

  cat >"$root/root/fresh-root-inside.sh" <<'INSIDE'
#!/bin/bash
set -euo pipefail
export LC_ALL=C # sort and join agree on the order
fail() { echo "fresh-root: FAILED: $*" >&2; exit 1; }
cd /root/clh-shim
dpkg-query -W -f='${Package} ${Version}\n' | sort >/root/dpkg-before.txt
echo "fresh-root: make deps in the fresh root ($(wc -l </root/dpkg-before.txt) packages installed)"
start=$SECONDS
make deps || fail "make deps failed in a fresh Debian 12 root: a package the scripts need is not named, or an install step failed (output above)"
echo "fresh-root: make deps took $((SECONDS - start)) s"

echo "fresh-root: checking what make deps installed"
qemu-system-x86_64 --version | head -n1 | grep -E 'version 10\.' ||
  fail "qemu-system-x86_64 is not QEMU 10: $(qemu-system-x86_64 --version | head -n1)"
for bin in virtiofsd vhost-device-vsock cargo-fuzz protoc runc containerd; do
  command -v "$bin" >/dev/null || fail "$bin is not on PATH after make deps"
done
virtiofsd --version | head -n1
vhost-device-vsock --version | head -n1
cargo fuzz --version | head -n1
gcc -print-file-name=libseccomp.a | grep -q / || fail "libseccomp.a not found by gcc (libseccomp-dev)"
cache=/root/.cache/clh-shim
for ctd in containerd-1.7 containerd-2.x; do
  "$cache/$ctd/usr/bin/containerd" --version || fail "$cache/$ctd/usr/bin/containerd does not run"
done
"$cache/busybox-static/bin/busybox" true || fail "$cache/busybox-static/bin/busybox does not run"

# Nothing the root had before was upgraded: only the QEMU transaction took
# packages from backports, and only packages new to the machine.
dpkg-query -W -f='${Package} ${Version}\n' | sort >/root/dpkg-after.txt
changed=$(join /root/dpkg-before.txt /root/dpkg-after.txt | awk '$2 != $3 {print $1 " " $2 " -> " $3}')
[ -z "$changed" ] || fail "make deps changed packages the machine already had: $changed"
echo "fresh-root: from bookworm-backports: $(grep '~bpo' /root/dpkg-after.txt | awk '{print $1}' | xargs)"

echo "fresh-root: make deps again (must install nothing)"
again=$(make deps 2>&1) || fail "the second make deps failed: $again"
if grep -E 'installing|building|fetching' <<<"$again"; then
  fail "the second make deps installed again (above): the scripts are not idempotent"
fi

if [ "${CLH_FRESH_ROOT_BUILD:-1}" = 1 ]; then
  echo "fresh-root: make build guest-image in the fresh root"
  start=$SECONDS
  make build guest-image || fail "make build guest-image failed in the fresh root after make deps"
  echo "fresh-root: make build guest-image took $((SECONDS - start)) s"
fi
echo "fresh-root: the fresh root passed"
INSIDE
  chmod 0755 "$root/root/fresh-root-inside.sh"
  exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CLH_FRESH_ROOT_BUILD="$build" /root/fresh-root-inside.sh
fi

# --- Outside: the cache, then the namespaces ---------------------------------
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"
# What decides the outcome: the scripts, this test, the deps target, and,
# when the test builds, the guest image scripts (their tools are named in
# install-deps.sh).
hash="$(cd "$repo" && {
  sha256sum packaging/install-deps.sh packaging/install-containerd.sh tests/fresh-root.sh
  sed -n '/^deps:/,/^$/p' Makefile
  if [ "$build" = 1 ]; then sha256sum guest-image/build.sh guest-image/apt.sh guest-image/kernel/build-kernel.sh; fi
  echo "build=$build"
} | sha256sum | cut -d' ' -f1)"
stamp="$cache_root/$hash.ok"
if [ -f "$stamp" ] && [ "${CLH_FRESH_ROOT_FORCE:-0}" != 1 ]; then
  log "CACHED: make deps passed in a fresh $suite root for these scripts (hash ${hash:0:16}, $(cat "$stamp")); not run again (CLH_FRESH_ROOT_FORCE=1 reruns it)"
  exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed: run make deps (packaging/install-deps.sh installs it)"
command -v unshare >/dev/null || die "unshare (util-linux) is not installed"
[ -x "$rustup_home/toolchains" ] || [ -d "$rustup_home/toolchains" ] ||
  die "no Rust toolchain in $rustup_home (set RUSTUP_HOME, or install it with rustup)"
[ -d "$cargo_home/bin" ] || die "no $cargo_home/bin (set CARGO_HOME, or install the toolchain with rustup)"
mkdir -p "$cache_root"
tarball="$cache_root/debootstrap-$suite-$variant-$include-$(date +%G-W%V).tgz"
work="$(mktemp -d "${TMPDIR:-/tmp}/clh-fresh-root.XXXXXX")"
# unshare runs in the background so that a signal reaches this trap at once.
# unshare itself ignores SIGINT and SIGTERM while it waits, so the trap
# SIGKILLs its child, the namespace's PID 1: that ends every process in the
# namespace, and with the last of them its mounts and the tmpfs (--kill-child
# does the same if unshare is killed). $work is then an empty mount point
# here: rmdir, not rm -rf, so that nothing under a mount is ever removed.
pid=
cleanup() {
  local init=()
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    read -r -a init <"/proc/$pid/task/$pid/children" 2>/dev/null || true
    if [ ${#init[@]} -gt 0 ]; then kill -KILL "${init[@]}" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  fi
  rmdir "$work" 2>/dev/null || echo "fresh-root: could not remove $work (still mounted? see: grep clh-fresh-root /proc/mounts)" >&2
}
trap cleanup EXIT
trap 'echo "fresh-root: interrupted; ending the fresh root" >&2; exit 130' INT TERM HUP
what="make deps"
if [ "$build" = 1 ]; then what="make deps, then make build guest-image,"; fi
log "running $what in a fresh $suite root (hash ${hash:0:16}; about 30 minutes on 2 cores, less without the build)"
start=$SECONDS
unshare --mount --pid --fork --propagation private --kill-child bash "$0" --inside "$work" "$tarball" &
pid=$!
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ] ||
  die "the fresh-root test failed (above, exit $rc) after $((SECONDS - start)) s; the root is gone with its namespace; fix the scripts and rerun make fresh-root-test"
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - start)) s" >"$stamp"
log "passed in $((SECONDS - start)) s; stamp $stamp"
