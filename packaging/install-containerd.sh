#!/usr/bin/env bash
# Installs the containerd side of the end-to-end test infrastructure:
#   - runc and containerd 1.6 from Debian 12, system-wide (apt-get install);
#   - containerd 1.7.x from Debian 13 (trixie) and 2.1.x from Debian forky
#     (containerd, ctr, containerd-shim-runc-v2 each), unpacked into the cache
#     dir, never installed system-wide: the end-to-end tests run on every
#     containerd Debian offers;
#   - busybox-static from Debian 12, unpacked into the cache dir (the test
#     images are built from it).
# The system apt configuration is never modified: newer suites are read with a
# private apt configuration under the cache dir.
# Idempotent and fast when everything is already there; prints the versions.
set -euo pipefail

cache="${CLH_CACHE_DIR:-$HOME/.cache/clh-shim}"
ctd2_dir="$cache/containerd-2.x"
ctd17_dir="$cache/containerd-1.7"
busybox_dir="$cache/busybox-static"
# The newest suite that ships containerd 2.1.x (trixie has 1.7).
ctd2_suite="${CLH_CONTAINERD2_SUITE:-forky}"
# The suite that ships containerd 1.7.x.
ctd17_suite="${CLH_CONTAINERD17_SUITE:-trixie}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "install-containerd: $*"; }

# containerd and runc from Debian 12. The package ships only a systemd unit;
# PID 1 here is not systemd, so nothing should start, which is checked below.
# Beside them, what this script itself runs: gpg (the keyring check), pgrep
# (procps), the Debian archive keyring (trixie's and forky's indices).
missing=()
for p in containerd runc gpg procps debian-archive-keyring; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Tests never talk to a system daemon; stop it by PID if the package managed
# to start one. The private test instances always run with --config and are
# left alone.
for pid in $(pgrep -x containerd || true); do
  if [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/bin/containerd ] &&
    ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--config'; then
    log "stopping system containerd (pid $pid) started by the package"
    kill "$pid"
  fi
done

# Private apt configuration of one suite: lists and caches under $apt_dir
# ($cache/apt-<suite>, set by fetch_containerd), system dpkg
# status (read only) so that apt can resolve; sources signed by the Debian
# archive keyring, which must hold the trixie keys (forky is signed by them).
# Downloads run as root (APT::Sandbox::User) because the cache under $HOME
# is not reachable by the _apt user. A testing suite's Release file is valid
# for a week only, and a mirror that lags (seen: forky's expired for a month
# while bookworm's was current) would stop every new machine here; the
# signature and the hashes are still checked (Check-Valid-Until=false only
# accepts an older signed index), and what comes from these suites is only
# unpacked into the cache for the tests, never installed.
apt_private() {
  local tool="$1"
  shift
  "$tool" -q \
    -o Dir::Etc::SourceList="$apt_dir/sources.list" \
    -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$apt_dir/lists" \
    -o Dir::Cache="$apt_dir/cache" \
    -o Dir::State::Status=/var/lib/dpkg/status \
    -o APT::Sandbox::User=root \
    -o Acquire::Check-Valid-Until=false \
    -o Acquire::Languages=none \
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false \
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false \
    -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false \
    "$@"
}

# Downloads the named package with apt-get download into $2 and unpacks it
# into $3 (dpkg -x). $1 is "private" or "system" apt configuration.
fetch_deb() {
  local conf="$1" pkg="$2" dest="$3" work
  work="$(mktemp -d)"
  if [ "$conf" = private ]; then
    (cd "$work" && apt_private apt-get download "$pkg")
  else
    (cd "$work" && apt-get -q -o APT::Sandbox::User=root download "$pkg")
  fi
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  dpkg -x "$work"/*.deb "$dest.tmp"
  dpkg-deb -f "$work"/*.deb Version >"$dest.tmp/VERSION"
  rm -rf "$dest" "$work"
  mv "$dest.tmp" "$dest"
}

# Unpacks containerd of series $3 (a glob: 2.1.*) from suite $1 into $2,
# unless it is there. apt checks the suite's Release file against the Debian
# archive keyring and the .deb against the hashes in that signed index; the
# series is checked here, so a suite moving on to another series fails
# loudly instead of testing something else.
fetch_containerd() {
  local suite="$1" dest="$2" series="$3" candidate
  if [ -x "$dest/usr/bin/containerd" ] && [ -f "$dest/VERSION" ]; then
    return 0
  fi
  if ! gpg --no-default-keyring --keyring "$keyring" --list-keys 2>/dev/null | grep -q "trixie"; then
    echo "install-containerd: $keyring lacks the trixie keys; install a newer debian-archive-keyring" >&2
    exit 1
  fi
  apt_dir="$cache/apt-$suite"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main" >"$apt_dir/sources.list"
  log "reading the $suite package index (private apt configuration)"
  apt_private apt-get update >/dev/null
  candidate="$(apt_private apt-cache policy containerd | awk '/Candidate:/ {print $2}')"
  # shellcheck disable=SC2254 # $series is a glob on purpose
  case "$candidate" in
    $series) ;;
    *)
      echo "install-containerd: $suite offers containerd '$candidate', not $series; set CLH_CONTAINERD*_SUITE to a suite that has it" >&2
      exit 1
      ;;
  esac
  log "fetching containerd $candidate from $suite into $dest"
  fetch_deb private "containerd=$candidate" "$dest"
}

fetch_containerd "$ctd17_suite" "$ctd17_dir" '1.7.*'
fetch_containerd "$ctd2_suite" "$ctd2_dir" '2.1.*'

# busybox-static from Debian 12, unpacked only.
if [ ! -x "$busybox_dir/bin/busybox" ]; then
  log "fetching busybox-static into $busybox_dir"
  fetch_deb system busybox-static "$busybox_dir"
fi

log "runc: $(runc --version | head -n1) (deb $(dpkg-query -W -f='${Version}' runc))"
log "containerd 1.6: $(/usr/bin/containerd --version) (deb $(dpkg-query -W -f='${Version}' containerd))"
log "containerd 1.7: $("$ctd17_dir/usr/bin/containerd" --version) (deb $(cat "$ctd17_dir/VERSION")) in $ctd17_dir/usr/bin"
log "containerd 2.x: $("$ctd2_dir/usr/bin/containerd" --version) (deb $(cat "$ctd2_dir/VERSION")) in $ctd2_dir/usr/bin"
log "busybox-static: deb $(cat "$busybox_dir/VERSION") at $busybox_dir/bin/busybox"
