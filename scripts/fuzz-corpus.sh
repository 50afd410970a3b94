#!/usr/bin/env bash
# Seed corpus for the fuzz targets, made with qemu-img and qemu-io.
#
#   scripts/fuzz-corpus.sh DIR [--small]
#
# --small makes only the small images committed in fuzz/seeds/ (512-byte to 16 KiB
# clusters, so that the test suite's short campaign needs no qemu-img); without it the
# larger variants (64 KiB and 2 MiB clusters, vmdk grains) are added for long campaigns.
set -euo pipefail
out=${1:?usage: fuzz-corpus.sh DIR [--small]}
small=${2:-}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

img() { "$QEMU_IMG" "$@" >/dev/null; }
io() { local f=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; "$QEMU_IO" -f "${FMT:-qcow2}" "${a[@]}" "$f" >/dev/null; }
keep() { cp "$1" "$out/$2"; }

# A little of everything: data, zero clusters, a discarded range, a partial cluster.
fill() { io "$1" 'write -P 0x11 0 3k' 'write -P 0x22 5k 1k' 'write -z 8k 4k' 'write -P 0x33 20k 2k' 'discard 20k 512'; }

# qcow2 v3 and v2, 512-byte clusters.
img create -f qcow2 -o cluster_size=512 v3.qcow2 32k; fill v3.qcow2; keep v3.qcow2 qcow2-v3-c512
img create -f qcow2 -o cluster_size=512,compat=0.10 v2.qcow2 32k; fill v2.qcow2; keep v2.qcow2 qcow2-v2-c512
# Refcount widths.
for bits in 1 8 64; do
    img create -f qcow2 -o cluster_size=512,refcount_bits=$bits rc$bits.qcow2 32k; fill rc$bits.qcow2
    keep rc$bits.qcow2 qcow2-refcount$bits
done
# Snapshots (their own L1 tables and a snapshot table).
img create -f qcow2 -o cluster_size=512 snap.qcow2 32k; fill snap.qcow2
img snapshot -c one snap.qcow2; io snap.qcow2 'write -P 0x44 1k 2k'
img snapshot -c two snap.qcow2; keep snap.qcow2 qcow2-snapshots
# Compressed clusters, zlib and zstd.
img create -f raw src.raw 32k; FMT=raw io src.raw 'write -P 0x55 0 8k' 'write -P 0x66 16k 4k'
img convert -c -O qcow2 -o cluster_size=4096,compression_type=zlib src.raw zlib.qcow2; keep zlib.qcow2 qcow2-zlib
img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd src.raw zstd.qcow2; keep zstd.qcow2 qcow2-zstd
# Extended L2 entries (subclusters), the smallest cluster size that allows them.
img create -f qcow2 -o cluster_size=16k,extended_l2=on extl2.qcow2 64k
io extl2.qcow2 'write -P 0x77 0 1k' 'write -z 2k 1k' 'write -P 0x78 20k 512'; keep extl2.qcow2 qcow2-extl2
# External data file (the header names it).
img create -f qcow2 -o cluster_size=512,data_file=data.raw df.qcow2 32k; keep df.qcow2 qcow2-datafile
# A backing chain: base, and an overlay naming it with its format.
img create -f qcow2 -o cluster_size=512 base.qcow2 32k; io base.qcow2 'write -P 0xa1 0 16k'
img create -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 ov.qcow2 32k
io ov.qcow2 'write -P 0xb2 1k 2k' 'write -z 6k 1k'
keep base.qcow2 chain-base.qcow2; keep ov.qcow2 chain-overlay.qcow2
img create -f raw rawbase.raw 16k; FMT=raw io rawbase.raw 'write -P 0xc3 0 16k'; keep rawbase.raw raw-16k
# vmdk: monolithicSparse, streamOptimized, a descriptor file.
img create -f vmdk -o subformat=monolithicSparse sparse.vmdk 1M
FMT=vmdk io sparse.vmdk 'write -P 0xd4 0 4k' 'write -P 0xd5 70k 1k'; keep sparse.vmdk vmdk-sparse
img convert -O vmdk -o subformat=streamOptimized src.raw stream.vmdk; keep stream.vmdk vmdk-stream
img create -f vmdk -o subformat=monolithicFlat flat.vmdk 64k; keep flat.vmdk vmdk-descriptor
img create -f vmdk -o subformat=monolithicSparse -b sparse.vmdk -F vmdk child.vmdk 1M
FMT=vmdk io child.vmdk 'write -P 0xe6 64k 2k'; keep child.vmdk vmdk-child

# qed: 4 KiB clusters and two-cluster tables (one-cluster tables do not open in QEMU), alone and over a base.
img create -f qed -o cluster_size=4096,table_size=2 q.qed 64k
FMT=qed io q.qed 'write -P 0x91 0 6k' 'write -P 0x92 40k 1k'; keep q.qed qed-c4k
img create -f qed -o cluster_size=4096,table_size=2 -b base.qcow2 -F qcow2 qov.qed 32k
FMT=qed io qov.qed 'write -P 0x93 2k 3k'; keep qov.qed qed-overlay
# qed chains: a qed image over the qcow2 base, a qed overlay over that one (three
# images), and a qcow2 overlay over the qed image.
img create -f qed -o cluster_size=4096,table_size=2 -b base.qcow2 -F qcow2 qbase.qed 32k
FMT=qed io qbase.qed 'write -P 0x96 4k 8k' 'write -z 16k 4k'; keep qbase.qed qed-chain-base
img create -f qed -o cluster_size=4096,table_size=2 -b qbase.qed -F qed qtop.qed 32k
FMT=qed io qtop.qed 'write -P 0x97 6k 3k' 'write -P 0x98 28k 1k'; keep qtop.qed qed-chain-overlay
img create -f qcow2 -o cluster_size=512 -b qbase.qed -F qed qcov.qcow2 32k
io qcov.qcow2 'write -P 0x99 3k 2k'; keep qcov.qcow2 qcow2-over-qed
# A dirty qcow2 image: lazy refcounts, the writer killed before it closed the image.
img create -f qcow2 -o cluster_size=512,lazy_refcounts=on dirty.qcow2 32k
io dirty.qcow2 'write -P 0x94 0 3k' 'write -P 0x95 9k 1k' abort 2>/dev/null || true
keep dirty.qcow2 qcow2-dirty
# Persistent bitmaps: a fine one (several data clusters), a disabled one, an empty one.
img create -f qcow2 -o cluster_size=512 bm.qcow2 1M
img bitmap --add -g 512 bm.qcow2 fine
img bitmap --add bm.qcow2 coarse
io bm.qcow2 'write -P 1 0 3k' 'write -P 2 700k 20k'
img bitmap --disable bm.qcow2 coarse
img bitmap --add bm.qcow2 empty
keep bm.qcow2 qcow2-bitmaps
# A LUKS header and slot 0's key material (passphrase "fuzz"; the luks_unlock target),
# cut out of an encrypted qcow2. Needs a qemu-img with a crypto library (not 10.2.2's);
# the fewest iterations QEMU writes (iter-time=1, SHA-512), AES-128-CBC-ESSIV keys.
if img create -f qcow2 --object secret,id=s,data=fuzz -o encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=1,encrypt.hash-alg=sha512,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,cluster_size=512 luks.qcow2 64k 2>/dev/null; then
    off=$(python3 -c 'import struct,sys
f=open("luks.qcow2","rb").read(); at=struct.unpack(">I",f[100:104])[0]
while struct.unpack(">I",f[at:at+4])[0]!=0x0537be77: at+=8+(struct.unpack(">I",f[at+4:at+8])[0]+7)//8*8
print(struct.unpack(">Q",f[at+8:at+16])[0])')
    dd if=luks.qcow2 of="$out/luks-header" bs=1 skip="$off" count=68096 status=none
else
    echo "fuzz-corpus.sh: $QEMU_IMG has no crypto library: no luks-header seed" >&2
fi

[ "$small" = --small ] && exit 0

# Larger clusters for long campaigns.
img create -f qcow2 v3-64k.qcow2 1M; fill v3-64k.qcow2; keep v3-64k.qcow2 qcow2-v3-c64k
img create -f qcow2 -o cluster_size=2M big.qcow2 8M; io big.qcow2 'write -P 0x12 0 4k'; keep big.qcow2 qcow2-c2m
img create -f qcow2 -o extended_l2=on extl2-64k.qcow2 1M; io extl2-64k.qcow2 'write -P 0x13 0 4k' 'write -z 8k 4k'
keep extl2-64k.qcow2 qcow2-extl2-c64k
img convert -c -O qcow2 -o compression_type=zstd src.raw zstd64.qcow2; keep zstd64.qcow2 qcow2-zstd-c64k
img create -f vmdk -o subformat=twoGbMaxExtentSparse split.vmdk 1M; keep split.vmdk vmdk-split-descriptor
