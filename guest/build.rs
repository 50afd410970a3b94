//! Passes the linker script (absolute path, so the linker's working directory does not
//! matter) to the guest binary only, and compiles the C compressors (zlib 1.2.13,
//! zstd 1.5.4 and instar's glue, `csrc/`) for the guest.

#![forbid(unsafe_code)]

/// zlib: only the deflate side and what it links against.
const ZLIB: &[&str] = &["adler32.c", "crc32.c", "deflate.c", "trees.c", "zutil.c"];
/// zstd: the single-threaded compressor and the common code it uses.
const ZSTD: &[&str] = &[
    "common/debug.c",
    "common/entropy_common.c",
    "common/error_private.c",
    "common/fse_decompress.c",
    "common/xxhash.c",
    "common/zstd_common.c",
    "compress/fse_compress.c",
    "compress/hist.c",
    "compress/huf_compress.c",
    "compress/zstd_compress.c",
    "compress/zstd_compress_literals.c",
    "compress/zstd_compress_sequences.c",
    "compress/zstd_compress_superblock.c",
    "compress/zstd_double_fast.c",
    "compress/zstd_fast.c",
    "compress/zstd_lazy.c",
    "compress/zstd_ldm.c",
    "compress/zstd_opt.c",
];

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");

    let csrc = std::path::Path::new(&dir).join("csrc");
    let mut b = cc::Build::new();
    // The guest has no C runtime: no stack protector (no __stack_chk_guard), no PIC
    // (linked static at a fixed address), no red zone (as the Rust code), no unwind
    // tables, no _FORTIFY_SOURCE wrappers. Sections let --gc-sections drop what the
    // compressors never call.
    b.pic(false)
        .opt_level(2)
        .warnings(false)
        .flag("-fno-stack-protector")
        .flag("-mno-red-zone")
        .flag("-fno-asynchronous-unwind-tables")
        .flag("-fno-unwind-tables")
        .flag("-ffunction-sections")
        .flag("-fdata-sections")
        .flag("-U_FORTIFY_SOURCE")
        .define("NDEBUG", None)
        // zlib: the standard C build, with the memory functions of the C library.
        .define("STDC", None)
        // zstd: one thread, no tracing hooks, no run-time CPU dispatch (the output is
        // the same either way; fixed code is easier to reason about in the sandbox).
        .define("ZSTD_TRACE", Some("0"))
        .define("DYNAMIC_BMI2", Some("0"))
        .define("ZSTD_DISABLE_ASM", None)
        .define("ZSTD_LEGACY_SUPPORT", Some("0"))
        .define("XXH_NAMESPACE", Some("ZSTD_"))
        .include(&csrc);
    for f in ZLIB {
        b.file(csrc.join("zlib").join(f));
    }
    for f in ZSTD {
        b.file(csrc.join("zstd/lib").join(f));
    }
    b.file(csrc.join("qcow2_compress.c"));
    b.compile("instar_compress");
}
