#!/usr/bin/env bash
# QEMU's own iotests that exercise `qemu-img rebase`, with `rebase` routed to instar and
# every other qemu-img subcommand (create, map, check, info, amend …) to the real qemu-img.
#
#   scripts/iotests.sh              # 024 031 042 043 050 061 082 252 qemu-img-bitmaps
#                                   # (qcow2) and 024 042 043 050 under -qed: all must pass
#   scripts/iotests.sh 024 050      # just these (qcow2), all of which must pass
#   scripts/iotests.sh qemu-img-bitmaps   # a test of tests/qemu-iotests/tests/, by name
#                                   # (tests/qemu-img-bitmaps works too)
#   IOTESTS_QED="024" scripts/iotests.sh 024   # and these under -qed
#
# Exit status: 0 when every test that must pass passed, 1 otherwise. The tests come from
# QEMU's source (10.2.2 by default), run outside a build tree: qemu-img and qemu-io are the
# machine's binaries, qemu-nbd and qemu-storage-daemon too when present, and qemu-system is
# a stand-in that only answers the two questions the harness asks (scripts/iotests/).
#
# Environment:
#   INSTAR             instar binary (default: target/release/instar, built here)
#   QEMU_IMG, QEMU_IO  real qemu-img / qemu-io (default /usr/bin/qemu-img, /usr/bin/qemu-io)
#   QEMU_SRC           an unpacked QEMU source tree to take the tests from
#   QEMU_SRC_VERSION   Debian source version fetched otherwise (default 1:10.2.2+ds-1)
#   IOTESTS_CACHE      download cache (default ~/.cache/instar/iotests)
#   IOTESTS_WORK       work directory, kept afterwards (default: a temporary one, removed
#                      unless a test failed)
#
# On a fresh Debian machine run it as root: missing packages (qemu-utils, python3,
# xz-utils) are installed with apt-get, and the source package is fetched with a private
# apt configuration that knows sid's source packages (the system's sources stay untouched).
# Like the cargo tests, it skips (exit 0, with a note) when /dev/kvm is missing or when
# qemu-img or the tests are missing and cannot be installed, unless INSTAR_REQUIRE_KVM=1
# or INSTAR_REQUIRE_QEMU=1 respectively.
#
# INSTAR=/usr/bin/qemu-img runs the same tests against qemu-img itself, as a baseline.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QEMU_IMG=${QEMU_IMG:-/usr/bin/qemu-img}
QEMU_IO=${QEMU_IO:-/usr/bin/qemu-io}
QEMU_SRC_VERSION=${QEMU_SRC_VERSION:-1:10.2.2+ds-1}
CACHE=${IOTESTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/instar/iotests}
REQUIRED=(024 031 042 043 050 061 082 252 271 314 qemu-img-bitmaps)
# The same rebase tests with qed images (-qed).
read -r -a REQUIRED_QED <<< "${IOTESTS_QED-024 042 043 050}"
OPTIONAL=()
# Failures that follow from a documented difference between instar and qemu-img; these
# tests are not in the default set (run them by name to see the difference).
declare -A EXPECTED=(
    [114]="rebase -u -b X without -F must fail in qemu-img; instar probes X (-F is optional)"
)
if [ $# -gt 0 ]; then
    # Named tests live in tests/qemu-iotests/tests/; check finds them by their bare name,
    # which is also how it reports them.
    REQUIRED=("${@#tests/}"); OPTIONAL=()
    [ -n "${IOTESTS_QED+set}" ] || REQUIRED_QED=()
fi

log() { printf 'iotests: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# unavailable KVM|QEMU REASON: skip, or fail when INSTAR_REQUIRE_<KIND>=1.
unavailable() {
    local require=INSTAR_REQUIRE_$1; shift
    [ "${!require:-0}" = 1 ] && die "$* ($require=1)"
    log "skipped: $*"; exit 0
}

# --- what the run needs -------------------------------------------------------------
need_packages() {
    local missing=() cmd pkg
    for cmd in "$QEMU_IMG:qemu-utils" "$QEMU_IO:qemu-utils" "python3:python3" "xz:xz-utils"; do
        pkg=${cmd##*:}; cmd=${cmd%:*}
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" = 0 ] || unavailable QEMU "missing packages (${missing[*]}); run as root to install them"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
}

# The QEMU tree to copy tests/qemu-iotests and python/ from: $QEMU_SRC, the tree that
# ../shared/scripts/qemu-ref.sh unpacked, or the Debian source package fetched into $CACHE.
# Sets SRC (not run in a subshell, so that a skip ends the script).
qemu_source() {
    local version=${QEMU_SRC_VERSION#*:}; version=${version%-*}
    local upstream=${version%+*}
    local cand
    for cand in "${QEMU_SRC:-}" \
                "${QEMU_REF_DIR:-$HOME/.cache/instar/qemu}/_build/qemu-$upstream" \
                "$CACHE/qemu-$upstream"; do
        if [ -n "$cand" ] && [ -x "$cand/tests/qemu-iotests/check" ] && [ -d "$cand/python" ]; then
            SRC=$cand; return
        fi
    done
    [ -z "${QEMU_SRC:-}" ] || die "QEMU_SRC=$QEMU_SRC has no tests/qemu-iotests/check"
    [ "$(id -u)" = 0 ] || unavailable QEMU "no QEMU source here; run as root to fetch it, or set QEMU_SRC"
    local aptdir=$CACHE/apt
    mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$CACHE/dl"
    echo 'deb-src http://deb.debian.org/debian sid main' > "$aptdir/sources.list"
    local apt=(-o Dir::Etc::sourcelist="$aptdir/sources.list" -o Dir::Etc::sourceparts=-
               -o Dir::State::Lists="$aptdir/lists" -o Dir::Cache="$aptdir/cache")
    local orig=$CACHE/dl/qemu_$version.orig.tar.xz
    if [ ! -f "$orig" ]; then
        log "fetching the source package qemu=$QEMU_SRC_VERSION"
        apt-get "${apt[@]}" update -qq
        (cd "$CACHE/dl" && apt-get "${apt[@]}" source --download-only -qq \
            "qemu=$QEMU_SRC_VERSION" 2>&1 | grep -v unsandboxed >&2 || true)
        [ -f "$orig" ] || die "could not fetch qemu=$QEMU_SRC_VERSION (sid may have moved on;" \
                              "set QEMU_SRC_VERSION or QEMU_SRC)"
    fi
    # Only the two directories the tests need.
    tar -C "$CACHE" -xJf "$orig" "qemu-$upstream/tests/qemu-iotests" "qemu-$upstream/python"
    SRC=$CACHE/qemu-$upstream
}

need_packages
[ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || unavailable KVM "instar needs read/write access to /dev/kvm"
if [ -z "${INSTAR:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet -p instar)
    INSTAR=$ROOT/target/release/instar
fi
INSTAR=$(command -v "$INSTAR") || die "INSTAR=$INSTAR is not executable"
INSTAR=$(realpath "$INSTAR")
QEMU_IMG=$(realpath "$(command -v "$QEMU_IMG")")
QEMU_IO=$(realpath "$(command -v "$QEMU_IO")")
qemu_source

# --- a build-tree-like work directory --------------------------------------------------
if [ -n "${IOTESTS_WORK:-}" ]; then
    WORK=$IOTESTS_WORK; KEEP=1
    rm -rf "$WORK"; mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/instar-iotests.XXXXXX); KEEP=0
fi
WORK=$(cd "$WORK" && pwd)
mkdir -p "$WORK/tests" "$WORK/bin"
cp -a "$SRC/tests/qemu-iotests" "$WORK/tests/"
cp -a "$SRC/python" "$WORK/"
install -m 0755 "$ROOT/scripts/iotests/qemu-img" "$ROOT/scripts/iotests/qemu-system" "$WORK/bin/"

real_or_stub() { if [ -x "$1" ]; then printf '%s\n' "$1"; else printf '%s\n' "$WORK/bin/qemu-system"; fi; }
export INSTAR REAL_QEMU_IMG=$QEMU_IMG
export QEMU_IMG_PROG=$WORK/bin/qemu-img
export QEMU_IO_PROG=$QEMU_IO
export QEMU_PROG=$WORK/bin/qemu-system
export QEMU_NBD_PROG QSD_PROG
QEMU_NBD_PROG=$(real_or_stub "$(dirname "$QEMU_IMG")/qemu-nbd")
QSD_PROG=$(real_or_stub "$(dirname "$QEMU_IMG")/qemu-storage-daemon")
# common.rc defines QEMU_IMG / QEMU_IO itself; ours must not leak into it.
unset QEMU_IMG QEMU_IO

log "instar: $("$INSTAR" --version 2>&1 | head -1)"
log "qemu-img: $("$REAL_QEMU_IMG" --version | head -1)"
log "tests from: $SRC"

# --- run ---------------------------------------------------------------------------------
cd "$WORK/tests/qemu-iotests"
start=$SECONDS
set +e
./check -qcow2 "${REQUIRED[@]}" "${OPTIONAL[@]}" 2>&1 | tee "$WORK/check.log"
if [ ${#REQUIRED_QED[@]} -gt 0 ]; then
    ./check -qed "${REQUIRED_QED[@]}" 2>&1 | tee "$WORK/check-qed.log"
fi
set -e
log "check took $((SECONDS - start)) s"

# Per-test verdicts from check's result lines ("024   pass", "082   not run"; check
# rewrites a line with \r and colours it when on a terminal).
status_of() {
    local s log=${2:-$WORK/check.log}
    s=$(tr '\r' '\n' < "$log" | sed -e 's/\x1b\[[0-9;]*m//g' \
        | grep -oE "(^| )$1 +(pass|fail|not run)" | tail -1 | sed -E "s/^ ?$1 +//")
    printf '%s\n' "${s:-missing}"
}
failed=0
npass=0
nfail=0
for t in "${REQUIRED[@]}"; do
    s=$(status_of "$t"); log "required $t: $s"
    if [ "$s" = pass ]; then npass=$((npass + 1)); else nfail=$((nfail + 1)); failed=1; fi
done
for t in "${REQUIRED_QED[@]}"; do
    s=$(status_of "$t" "$WORK/check-qed.log"); log "required $t (qed): $s"
    if [ "$s" = pass ]; then npass=$((npass + 1)); else nfail=$((nfail + 1)); failed=1; fi
done
for t in "${OPTIONAL[@]}"; do
    s=$(status_of "$t")
    if [ "$s" = fail ] && [ -n "${EXPECTED[$t]:-}" ]; then s="fail (expected: ${EXPECTED[$t]})"; fi
    log "optional $t: $s"
done
# A plain summary line, last.
echo "iotests: $npass passed, $nfail failed"

if [ "$failed" = 0 ] && [ "$KEEP" = 0 ]; then
    rm -rf "$WORK"
else
    log "work directory kept: $WORK (the .out.bad files are in tests/qemu-iotests/scratch/)"
fi
exit "$failed"
