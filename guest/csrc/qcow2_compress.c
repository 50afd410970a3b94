/*
 * instar: compress one qcow2 cluster, as QEMU's qcow2 driver does.
 *
 * Both functions take the whole cluster (`src`, `src_size`) and an output buffer of
 * `dest_size` bytes (QEMU passes cluster_size - 1, so a cluster that does not shrink
 * is written uncompressed). They return the compressed length, INSTAR_NO_FIT when the
 * result does not fit in `dest`, or INSTAR_FAILED on any other error.
 */
#include <stddef.h>
#include <string.h>

#include "zlib/zlib.h"
#include "zstd/lib/zstd.h"

#define INSTAR_NO_FIT (-1L)
#define INSTAR_FAILED (-2L)

/*
 * Raw deflate (no zlib header), default level, 4 KiB window (window bits -12),
 * memLevel 9, default strategy, one deflate(Z_FINISH) call. Z_OK after Z_FINISH means
 * the output buffer filled before the stream ended.
 */
long instar_zlib_compress(void *dest, size_t dest_size, const void *src, size_t src_size)
{
    z_stream strm;
    long ret;
    int rc;

    memset(&strm, 0, sizeof(strm));
    rc = deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY);
    if (rc != Z_OK) {
        return INSTAR_FAILED;
    }
    strm.next_in = (Bytef *)src;
    strm.avail_in = (uInt)src_size;
    strm.next_out = (Bytef *)dest;
    strm.avail_out = (uInt)dest_size;

    rc = deflate(&strm, Z_FINISH);
    if (rc == Z_STREAM_END) {
        ret = (long)(dest_size - strm.avail_out);
    } else if (rc == Z_OK) {
        ret = INSTAR_NO_FIT;
    } else {
        ret = INSTAR_FAILED;
    }
    deflateEnd(&strm);
    return ret;
}

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
