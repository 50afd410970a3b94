//! Passes the linker script (absolute path, so the linker's working directory does not
//! matter) to the guest binary only, and compiles the C compressors for the guest
//! (`csrc/`): zlib 1.2.13, zstd 1.5.4 and zstd 1.5.7 side by side, and instar's glue.
//!
//! The two zstd versions define the same symbols. Each is compiled to objects of its own
//! (with its own copy of the glue `qcow2_zstd.c`), then every global symbol those
//! objects define is given a prefix of the version (`zstd154_`, `zstd157_`) with
//! `objcopy --redefine-syms`, the list made from `nm`. This renames definitions and the
//! references between them alike without touching the vendored sources, covers every
//! symbol a new release may add, and leaves no unprefixed zstd symbol in the guest: a
//! call can only reach the version it was compiled against, and a symbol that slipped
//! through would fail the link (or the check below), never bind to the other version.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// zlib: only the deflate side and what it links against.
const ZLIB: &[&str] = &["adler32.c", "crc32.c", "deflate.c", "trees.c", "zutil.c"];
/// zstd: the single-threaded compressor and the common code it uses.
const ZSTD_FILES: &[&str] = &[
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

/// One zstd version built into the guest.
struct Zstd {
    /// `csrc/zstd-<version>/`.
    version: &'static str,
    /// Given to every global symbol of its objects (`src/compressor.rs` calls them so).
    prefix: &'static str,
    /// Files besides [`ZSTD_FILES`].
    extra: &'static [&'static str],
}

const ZSTD: &[Zstd] = &[
    Zstd {
        version: "1.5.4",
        prefix: "zstd154_",
        extra: &[],
    },
    Zstd {
        version: "1.5.7",
        prefix: "zstd157_",
        // The block splitter that came with 1.5.7.
        extra: &["compress/zstd_preSplit.c"],
    },
];

/// What the renamed zstd objects may still refer to outside themselves: the C library
/// functions the guest supplies (`src/libc.rs`, `src/boot.rs`), and the linker's
/// `_GLOBAL_OFFSET_TABLE_` (the compiler's default position-independent code addresses
/// some tables relative to it).
const OUTSIDE: &[&str] = &[
    "malloc",
    "calloc",
    "free",
    "memcpy",
    "memmove",
    "memset",
    "memcmp",
    "_GLOBAL_OFFSET_TABLE_",
];

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=NM");
    println!("cargo:rerun-if-env-changed=OBJCOPY");

    let csrc = Path::new(&dir).join("csrc");
    let mut zlib = freestanding();
    // zlib: the standard C build, with the memory functions of the C library.
    zlib.define("STDC", None).include(&csrc);
    for f in ZLIB {
        zlib.file(csrc.join("zlib").join(f));
    }
    zlib.file(csrc.join("qcow2_zlib.c"));
    zlib.compile("instar_zlib");

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for z in ZSTD {
        build_zstd(&csrc, &out, z);
    }
}

/// The flags every C file of the guest is compiled with. The guest has no C runtime:
/// no stack protector (no __stack_chk_guard), no PIC (linked static at a fixed
/// address), no red zone (as the Rust code), no unwind tables, no _FORTIFY_SOURCE
/// wrappers. Sections let --gc-sections drop what the compressors never call.
fn freestanding() -> cc::Build {
    let mut b = cc::Build::new();
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
        .define("NDEBUG", None);
    b
}

/// Compile zstd `z.version` and its glue, give every global symbol defined there the
/// version's prefix, and archive the objects as `libinstar_zstd<prefix>.a`.
fn build_zstd(csrc: &Path, out: &Path, z: &Zstd) {
    let lib = csrc.join(format!("zstd-{}", z.version)).join("lib");
    let mut b = freestanding();
    // One thread, no tracing hooks, no run-time CPU dispatch (the output is the same
    // either way; fixed code is easier to reason about in the sandbox).
    b.define("ZSTD_TRACE", Some("0"))
        .define("DYNAMIC_BMI2", Some("0"))
        .define("ZSTD_DISABLE_ASM", None)
        .define("ZSTD_LEGACY_SUPPORT", Some("0"))
        .define("XXH_NAMESPACE", Some("ZSTD_"))
        .include(&lib)
        .out_dir(out.join(format!("zstd-{}", z.version)));
    for f in ZSTD_FILES.iter().chain(z.extra) {
        b.file(lib.join(f));
    }
    b.file(csrc.join("qcow2_zstd.c"));
    let objects = b.compile_intermediates();

    let defined = symbols(&objects, &["--defined-only"]);
    assert!(
        defined.iter().any(|s| s == "ZSTD_versionString"),
        "zstd {}: no ZSTD_versionString among its symbols",
        z.version
    );
    let map = out.join(format!("zstd-{}.redefine", z.version));
    let text: String = defined
        .iter()
        .map(|s| format!("{s} {}{s}\n", z.prefix))
        .collect();
    std::fs::write(&map, text).expect("write the symbol map");
    for o in &objects {
        let mut redefine = std::ffi::OsString::from("--redefine-syms=");
        redefine.push(&map);
        run(Command::new(tool("OBJCOPY", "objcopy"))
            .arg(redefine)
            .arg(o));
    }

    // Nothing left that another version (or anything else) could satisfy.
    let escaped: Vec<String> = symbols(&objects, &["--undefined-only"])
        .into_iter()
        .filter(|s| !s.starts_with(z.prefix) && !OUTSIDE.contains(&s.as_str()))
        .collect();
    assert!(
        escaped.is_empty(),
        "zstd {}: its objects still call {escaped:?} after renaming",
        z.version
    );

    let mut archive = cc::Build::new();
    archive.objects(&objects);
    archive.compile(&format!("instar_{}", z.prefix.trim_end_matches('_')));
}

/// The binutils tool `default`, or the one the environment variable `var` names.
fn tool(var: &str, default: &str) -> std::ffi::OsString {
    std::env::var_os(var).unwrap_or_else(|| default.into())
}

/// Global symbol names `nm -g <extra>` lists for `objects`, sorted, without repeats.
fn symbols(objects: &[PathBuf], extra: &[&str]) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for o in objects {
        let out = run(Command::new(tool("NM", "nm"))
            .args(["-g", "-P"])
            .args(extra)
            .arg(o));
        // POSIX format: "name type [value size]", one symbol a line.
        for line in out.lines() {
            if let Some(name) = line.split_whitespace().next() {
                names.insert(name.to_string());
            }
        }
    }
    names.into_iter().collect()
}

/// Run `cmd`; its stdout. A build script's failure is a panic with the reason.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
