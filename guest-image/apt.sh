# shellcheck shell=bash
# Shared by guest-image/build.sh and guest-image/kernel/build-kernel.sh:
# a private apt configuration for bookworm-backports under the cache dir,
# so the system's apt sources are never touched, and a verified download.
# apt verifies the index's signature (Debian's archive keyring); we check
# each .deb against the SHA256 of that signed index and record it.
#
# Source it after defining die() and log() and setting CACHE.
#   CLH_APT_REFRESH=1   force `apt-get update` (otherwise at most daily)

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

# `apt-get update` of the private lists when forced, missing or a day old.
apt_update_if_stale() {
    local stamp=$APT_DIR/lists/.updated
    if [[ ${CLH_APT_REFRESH:-0} == 1 || ! -f $stamp ]] || [[ -n $(find "$stamp" -mmin +1440) ]]; then
        log "apt-get update (bookworm-backports, private lists in $APT_DIR)"
        apt-get "${APT_OPTS[@]}" -qq update >&2
        touch "$stamp"
    fi
}

# The candidate version of package $1 in bookworm-backports.
apt_candidate() {
    local ver
    ver=$(apt-cache "${APT_OPTS[@]}" policy "$1" | awk '/Candidate:/ {print $2}')
    [[ -n $ver && $ver != "(none)" ]] || die "package $1 not found in bookworm-backports"
    echo "$ver"
}

# Where package $1 version $2 is cached (its architecture in $3, default amd64).
deb_path() { echo "$CACHE/debs/${1}_${2//:/%3a}_${3:-amd64}.deb"; }

# Downloads package $1 version $2 (arch $3) unless cached, checks it against
# the signed index, and records its SHA256 next to it. Needs the lists.
apt_fetch() {
    local pkg=$1 ver=$2 dest want tmp got_file got
    dest=$(deb_path "$pkg" "$ver" "${3:-amd64}")
    if [[ ! -f $dest || ! -f $dest.sha256 ]]; then
        want=$(apt-cache "${APT_OPTS[@]}" show "$pkg=$ver" | awk '/^SHA256:/ {print $2; exit}')
        [[ -n $want ]] || die "no SHA256 for $pkg=$ver in the signed index"
        log "downloading $pkg $ver"
        tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
        (cd "$tmp" && apt-get "${APT_OPTS[@]}" -qq download "$pkg=$ver" >&2) ||
            { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
        got_file=$(ls "$tmp"/*.deb 2>/dev/null | head -n1) || true
        [[ -n $got_file ]] || { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
        got=$(sha256sum "$got_file" | cut -d' ' -f1)
        [[ $got == "$want" ]] || { rm -rf "$tmp"; die "$pkg=$ver: sha256 $got, index says $want"; }
        mv "$got_file" "$dest"
        echo "$want" >"$dest.sha256"
        rm -rf "$tmp"
    fi
    [[ $(sha256sum "$dest" | cut -d' ' -f1) == "$(cat "$dest.sha256")" ]] ||
        die "cached $dest does not match its recorded sha256; delete it and rerun"
}
