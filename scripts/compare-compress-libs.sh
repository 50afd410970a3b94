#!/bin/bash
# compare-compress-libs.sh — do two builds of zlib (or zstd) compress qcow2 clusters to
# the same bytes? Compresses a corpus with QEMU's qcow2 parameters (zlib: raw deflate,
# window bits -12, memLevel 9, default level; zstd: one ZSTD_compressStream2(ZSTD_e_end)
# call, default parameters; output buffer cluster_size - 1) under this machine's
# libraries and under those of another runtime (by default the Debian 13 runtime of the
# qemu-img 11.1.3 reference build, ../shared/scripts/qemu-ref.sh), and diffs the two
# lists of (cluster size, kind, seed, result, FNV-1a of the output).
#
#   scripts/compare-compress-libs.sh zlib|zstd [BYTES_PER_CLUSTER_SIZE]
#
# Needs gcc, zlib1g-dev and libzstd-dev. Exit 0 when the outputs are identical.
# docs/compression.md records what it found.
set -euo pipefail
lib=${1:?usage: $0 zlib|zstd [bytes]}
budget=${2:-100000000}
root=${RUNTIME_ROOT:-${QEMU_REF_DIR:-$HOME/.cache/instar/qemu}/11.1.3/root}
libdir=$root/usr/lib/x86_64-linux-gnu
[ -x "$libdir/ld-linux-x86-64.so.2" ] || { echo "no runtime at $root" >&2; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/c.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <zlib.h>
#include <zstd.h>

static uint64_t s;
static uint64_t rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
static const char *W[] = {"the","cluster","of","a","qcow2","image","is","written","compressed",
 "when","rebase","copies","data","from","old","backing","file","into","overlay","zlib","zstd","\n"};

static void fill(unsigned char *b, size_t n, int k) {
    size_t i;
    switch (k) {
    case 0: for (i = 0; i < n; i++) b[i] = rnd(); break;               /* random */
    case 1: { size_t p = 0; while (p < n) { const char *w = W[rnd() % 22]; size_t l = strlen(w);
              for (size_t j = 0; j < l && p < n; j++) b[p++] = w[j]; if (p < n) b[p++] = ' '; } break; }
    case 2: memset(b, 0, n); for (i = 0; i < n / 512 + 1; i++) b[rnd() % n] = rnd(); break; /* zero-heavy */
    case 3: memset(b, 0, n); b[rnd() % n] = 1 + rnd() % 255; break;   /* sparse: one byte */
    case 4: memset(b, (int)(rnd() | 1), n); break;                     /* single byte */
    case 5: for (i = 0; i < n; i++) b[i] = "ACGT"[rnd() & 3]; break;   /* four symbols */
    case 6: for (i = 0; i < n; i++) b[i] = (i & 1) ? 0 : rnd(); break; /* half random */
    case 7: for (i = 0; i < n; i++) b[i] = (i < n / 2) ? "ACGT"[rnd() & 3] : rnd(); break; /* mixed */
    case 8: { unsigned char pat[97]; for (i = 0; i < 97; i++) pat[i] = rnd();           /* repeats + noise */
              for (i = 0; i < n; i++) b[i] = (rnd() % 50 == 0) ? rnd() : pat[i % 97]; break; }
    case 9: for (i = 0; i < n; i++) b[i] = (rnd() % 8 == 0) ? rnd() : 0; break;       /* 1/8 random */
    case 10: { uint32_t v = rnd(); for (i = 0; i + 4 <= n; i += 4) { v += rnd() % 16; memcpy(b + i, &v, 4); }
              for (; i < n; i++) b[i] = 0; break; }                              /* counters */
    default: for (i = 0; i < n; i++) b[i] = (rnd() % 3 == 0) ? ' ' + rnd() % 95 : 'e'; break; /* skewed text */
    }
}

static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL; for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; } return h;
}

int main(int argc, char **argv) {
    int zstd = argc > 1 && !strcmp(argv[1], "zstd");
    size_t budget = argc > 2 ? strtoull(argv[2], 0, 0) : (16u << 20);
    printf("# %s\n", zstd ? ZSTD_versionString() : zlibVersion());
    for (size_t cs = 512; cs <= (2u << 20); cs *= 2) {
        unsigned char *src = malloc(cs), *dst = malloc(cs);
        int seeds = (int)(budget / cs / 12); if (seeds < 2) seeds = 2; if (seeds > 64) seeds = 64;
        for (int k = 0; k < 12; k++) for (int seed = 0; seed < seeds; seed++) {
            s = 0x9e3779b97f4a7c15ULL ^ (cs * 131 + k * 7919 + seed + 1);
            fill(src, cs, k);
            long ret;
            if (!zstd) {
                z_stream z; memset(&z, 0, sizeof z);
                if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) return 2;
                z.next_in = src; z.avail_in = cs; z.next_out = dst; z.avail_out = cs - 1;
                int rc = deflate(&z, Z_FINISH);
                ret = rc == Z_STREAM_END ? (long)(cs - 1 - z.avail_out) : rc == Z_OK ? -1 : -2;
                deflateEnd(&z);
            } else {
                ZSTD_outBuffer o = { dst, cs - 1, 0 }; ZSTD_inBuffer in = { src, cs, 0 };
                ZSTD_CCtx *c = ZSTD_createCCtx();
                size_t r = ZSTD_compressStream2(c, &o, &in, ZSTD_e_end);
                ret = r ? (r > o.size - o.pos ? -1 : -2) : (long)o.pos;
                ZSTD_freeCCtx(c);
            }
            printf("%zu %d %d %ld %016llx\n", cs, k, seed, ret,
                   (unsigned long long)(ret > 0 ? fnv(dst, ret) : 0));
        }
        free(src); free(dst);
    }
    return 0;
}
C
gcc -O2 -o "$tmp/c" "$tmp/c.c" -lz -lzstd
nice "$tmp/c" "$lib" "$budget" >"$tmp/here.txt"
nice "$libdir/ld-linux-x86-64.so.2" --library-path "$libdir" "$tmp/c" "$lib" "$budget" >"$tmp/there.txt"
echo "here:  $(head -1 "$tmp/here.txt" | cut -c3-), there: $(head -1 "$tmp/there.txt" | cut -c3-)"
n=$(($(wc -l <"$tmp/here.txt") - 1))
d=$(diff <(tail -n +2 "$tmp/here.txt") <(tail -n +2 "$tmp/there.txt") | grep -c '^<' || true)
echo "$n clusters, $d with different output"
[ "$d" = 0 ]
