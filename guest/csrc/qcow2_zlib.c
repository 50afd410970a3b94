/*
 * instar: compress one qcow2 cluster with zlib, as QEMU's qcow2 driver does (the zstd
 * counterpart is qcow2_zstd.c).
 *
 * The function takes the whole cluster (`src`, `src_size`) and an output buffer of
 * `dest_size` bytes (QEMU passes cluster_size - 1, so a cluster that does not shrink
 * is written uncompressed). It returns the compressed length, INSTAR_NO_FIT when the
 * result does not fit in `dest`, or INSTAR_FAILED on any other error.
 */
#include <stddef.h>
#include <string.h>

#include "zlib/zlib.h"

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
