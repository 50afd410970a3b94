#!/usr/bin/env bash
# Build instar and run real rebases on demo images made with qemu-img, then check the
# results with qemu-img itself. Leaves the images in $DEMO_DIR (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building instar (release)"
cargo build --release --quiet -p instar
INSTAR=$PWD/target/release/instar

DEMO_DIR=${DEMO_DIR:-$(mktemp -d /tmp/instar-demo.XXXXXX)}
mkdir -p "$DEMO_DIR"
cd "$DEMO_DIR"
rm -f base.qcow2 base-moved.qcow2 new-base.qcow2 ovl.qcow2 ovl.before.qcow2 ovl.qemu.qcow2
echo "== demo images in $DEMO_DIR"

# base.qcow2 <- ovl.qcow2, each with some data of its own.
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x22 8M 1M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ovl.qcow2
qemu-io -f qcow2 -c 'write -P 0x33 1M 512k' ovl.qcow2 >/dev/null
cp ovl.qcow2 ovl.before.qcow2

# 1. Unsafe rebase: the backing file moved; point the overlay at its new name.
cp base.qcow2 base-moved.qcow2
echo "== instar rebase -u -b base-moved.qcow2 -F qcow2 ovl.qcow2"
"$INSTAR" rebase -u -b base-moved.qcow2 -F qcow2 --output json ovl.qcow2
qemu-img info ovl.qcow2 | grep -E '^(image|backing file)'
qemu-img check -q ovl.qcow2
qemu-img compare -q ovl.before.qcow2 ovl.qcow2
echo "   content unchanged (qemu-img compare), image clean (qemu-img check)"

# 2. Unsafe rebase without -F: instar probes the new backing's format in the sandbox.
echo "== instar rebase -u -b base.qcow2 ovl.qcow2   (format probed)"
"$INSTAR" rebase -u -b base.qcow2 ovl.qcow2
qemu-img info --output=json ovl.qcow2 | grep -E '"backing-filename(-format)?"'

# 3. Safe rebase onto a different backing file: clusters that differ are copied up
#    so the overlay keeps its content; qemu-img does the same on a copy, and the two
#    files must be identical byte for byte.
qemu-img create -q -f qcow2 new-base.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 2M' new-base.qcow2 >/dev/null
cp ovl.qcow2 ovl.qemu.qcow2
echo "== instar rebase -b new-base.qcow2 -F qcow2 ovl.qcow2   (safe mode)"
"$INSTAR" rebase -b new-base.qcow2 -F qcow2 --output json ovl.qcow2
qemu-img compare -q ovl.before.qcow2 ovl.qcow2
qemu-img check -q ovl.qcow2
echo "   content unchanged (qemu-img compare), image clean (qemu-img check)"
qemu-img rebase -b new-base.qcow2 -F qcow2 ovl.qemu.qcow2
cmp ovl.qcow2 ovl.qemu.qcow2
echo "   byte-identical to qemu-img rebase's result (cmp)"

# 4. Detach.
echo "== instar rebase -u -b '' ovl.qcow2"
"$INSTAR" rebase -u -b '' ovl.qcow2
qemu-img info ovl.qcow2 | grep -E '^backing file' || echo "   no backing file"
echo "== demo done"
