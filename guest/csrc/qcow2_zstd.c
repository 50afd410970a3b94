/*
 * instar: compress one qcow2 cluster with zstd, as QEMU's qcow2 driver does.
 *
 * Compiled once for each zstd version built into the guest (zstd-1.5.4/, zstd-1.5.7/),
 * with that version's lib/ on the include path. guest/build.rs then gives every global
 * symbol of each version's objects, this file's included, a prefix of its own
 * ("zstd154_", "zstd157_"), so both libraries link into one binary and each glue
 * function calls its own version.
 *
 * It takes the whole cluster (`src`, `src_size`) and an output buffer of `dest_size`
 * bytes (QEMU passes cluster_size - 1, so a cluster that does not shrink is written
 * uncompressed). It returns the compressed length, INSTAR_NO_FIT when the result does
 * not fit in `dest`, or INSTAR_FAILED on any other error.
 */
#include <stddef.h>

#include "zstd.h"

#define INSTAR_NO_FIT (-1L)
#define INSTAR_FAILED (-2L)

/*
 * One zstd frame with the library's default parameters, made by a single
 * ZSTD_compressStream2(ZSTD_e_end) call on a fresh context. A non-zero return means
 * data is left to flush: the output buffer was too small (or, when what is left would
 * fit, a library error).
 */
long instar_zstd_compress(void *dest, size_t dest_size, const void *src, size_t src_size)
{
    ZSTD_outBuffer output = { dest, dest_size, 0 };
    ZSTD_inBuffer input = { src, src_size, 0 };
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    size_t left;
    long ret;

    if (!cctx) {
        return INSTAR_FAILED;
    }
    left = ZSTD_compressStream2(cctx, &output, &input, ZSTD_e_end);
    if (left) {
        ret = left > output.size - output.pos ? INSTAR_NO_FIT : INSTAR_FAILED;
    } else if (output.pos > dest_size) {
        ret = INSTAR_FAILED;
    } else {
        ret = (long)output.pos;
    }
    ZSTD_freeCCtx(cctx);
    return ret;
}
