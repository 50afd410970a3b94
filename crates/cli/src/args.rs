//! The command line: `instar [-h] [-V] COMMAND …` and `instar rebase …`.
//!
//! The options are declared once ([`REBASE_OPTIONS`]); from that table come the glibc-style
//! scanner ([`crate::getopt`], for qemu-img's exact error texts and parsing rules) and
//! the clap command (for the typed result and the `--help` text). The scanner turns the
//! command line into a canonical one (`--long=value … -- FILE…`) that clap then parses, so
//! both always agree.

use std::ffi::OsString;

use clap::{Arg, ArgAction, Command};

use crate::getopt::{self, Item, Mode, OptSpec};
use crate::image_opts::ImageOpts;
use crate::secrets::Secrets;

/// The name shown in usage and getopt messages, in place of qemu-img's `argv[0]`.
pub const PROG: &str = "instar";

/// One `rebase` option: how it is scanned and how it is documented.
struct OptDoc {
    spec: OptSpec,
    value_name: &'static str,
    help: &'static str,
}

const fn opt(
    id: &'static str,
    shorts: &'static [char],
    long: &'static str,
    value_name: &'static str,
    help: &'static str,
) -> OptDoc {
    OptDoc {
        spec: OptSpec {
            id,
            shorts,
            long: Some(long),
            takes_value: !value_name.is_empty(),
        },
        value_name,
        help,
    }
}

/// `rebase` options, in qemu-img 10.2's `long_options` order (which is the order glibc
/// lists the possibilities of an ambiguous abbreviation in), then instar's own.
const REBASE_OPTIONS: &[OptDoc] = &[
    opt("help", &['h'], "help", "", "Print this help and exit"),
    opt(
        "format",
        &['f'],
        "format",
        "FMT",
        "Format of FILE (default: probed in the sandbox). qcow2 overlays can be rebased \
         (and vmdk where the guest supports it); other formats are refused as qemu-img refuses them",
    ),
    opt(
        "image-opts",
        &[],
        "image-opts",
        "",
        "FILE is QEMU block options, for encrypted images: driver=FMT, file.filename=PATH \
         (required), file.driver=file, encrypt.key-secret=ID, encrypt.format=luks|aes, and \
         the same encrypt options of backing files under backing. (backing.backing. …). \
         Other options are refused (docs/luks.md)",
    ),
    opt(
        "cache",
        &['t'],
        "cache",
        "CACHE",
        "Cache mode for FILE: none, writeback, writethrough, directsync, unsafe \
         (validated like qemu-img; instar's I/O does not depend on it) [default: writeback]",
    ),
    opt(
        "compress",
        &['c'],
        "compress",
        "",
        "Safe mode: write the clusters copied into FILE compressed (qcow2, with FILE's \
         compression type, zlib or zstd), byte-identical to qemu-img -c; a cluster that \
         does not shrink is written uncompressed. With -u there is nothing to compress. \
         Refused for formats without compressed clusters (qed), as qemu-img refuses them",
    ),
    opt(
        "backing",
        &['b'],
        "backing",
        "BACKING",
        "Required. The new backing file, stored in FILE's header verbatim; \"\" detaches FILE \
         from its backing file. When it must be opened (safe mode, or no -F) a relative \
         name is resolved against FILE's directory, as QEMU does",
    ),
    opt(
        "backing-format",
        &['F', 'B'],
        "backing-format",
        "FMT",
        "Format of BACKING, recorded in the header; any QEMU 10.2 driver name. \
         Optional: when absent, BACKING's format is probed in the sandbox and recorded \
         only if BACKING names no other file (no backing file, no external data file, \
         no vmdk extent file); otherwise -F is required. -B is QEMU 10.2's name for it",
    ),
    opt(
        "backing-cache",
        &['T'],
        "backing-cache",
        "CACHE",
        "Cache mode for the backing files (validated like -t) [default: writeback]",
    ),
    opt(
        "backing-unsafe",
        &['u'],
        "backing-unsafe",
        "",
        "Unsafe mode: only rewrite the backing file name and format; no data is compared \
         or copied, and the old backing chain is never opened",
    ),
    opt(
        "force-share",
        &['U'],
        "force-share",
        "",
        "Open the new backing file without taking or checking locks (FILE is always \
         locked for writing)",
    ),
    opt(
        "progress",
        &['p'],
        "progress",
        "",
        "Print qemu-img's progress lines (\"    (xx.xx/100%)\\r\")",
    ),
    opt(
        "quiet",
        &['q'],
        "quiet",
        "",
        "Print nothing on success (cancels -p; --output json still prints its object)",
    ),
    opt(
        "object",
        &[],
        "object",
        "OBJDEF",
        "Define a secret for --image-opts' encrypt.key-secret: secret,id=ID,data=TEXT or \
         secret,id=ID,file=PATH, with format=raw (default) or format=base64. Repeatable. \
         The secret reaches only the sandbox and is never printed; other object types, \
         and keyid/iv (encrypted secrets), are refused",
    ),
    opt(
        "output",
        &[],
        "output",
        "FMT",
        "human (default): one line, \"Image rebased.\" or \"Image detached.\"; \
         json: one JSON object describing the result",
    ),
    opt(
        "allow-dir",
        &[],
        "allow-dir",
        "DIR",
        "Also allow backing files (safe mode) and FILE's external data file (both modes) \
         named inside images to live in DIR (and below it). Repeatable. By default only FILE's directory tree and the directory \
         tree of the -b file are allowed (see docs/path-policy.md)",
    ),
];

fn rebase_specs() -> Vec<OptSpec> {
    REBASE_OPTIONS.iter().map(|o| o.spec).collect()
}

const TOP_SPECS: &[OptSpec] = &[
    OptSpec {
        id: "help",
        shorts: &['h'],
        long: Some("help"),
        takes_value: false,
    },
    OptSpec {
        id: "version",
        shorts: &['V'],
        long: Some("version"),
        takes_value: false,
    },
];

const TOP_ABOUT: &str =
    "instar changes the backing file of qcow2 images like `qemu-img rebase` (QEMU 10.2), \
with the same results byte for byte, but every byte of image data is read and written \
by a throw-away KVM micro-VM: the instar process itself only handles the command line, \
file names, locks and file descriptors. Errors are qemu-img's messages with the prefix \
`instar:`; the exit status is 0 on success and 1 on any error.";

const REBASE_ABOUT: &str =
    "Change the backing file of FILE (a qcow2, qed or vmdk image), like `qemu-img rebase`.

Safe mode (the default) makes FILE read the same after the change: every cluster that \
FILE does not allocate and whose content differs between the old and the new backing \
chain is copied into FILE first. Unsafe mode (-u) only rewrites the name and format of \
the backing file in FILE's header.

Nothing is written unless the whole operation can succeed: every refusal leaves FILE \
byte-for-byte unchanged. FILE is locked for writing, and every backing file instar \
opens is locked for shared reading, compatibly with QEMU's own locks, so an image in \
use by QEMU, qemu-nbd or qemu-io is refused (and they refuse it while instar runs).";

const REBASE_AFTER: &str = "Where instar differs from qemu-img:
  -b is required (-b \"\" detaches); qemu-img also detaches with -u alone.
  -F is optional: without it the new backing file is probed in the sandbox and its
     format recorded, but only if that image names no other file (no backing file,
     no external data file, no vmdk extent file: a raw disk's guest can forge such a
     header). Otherwise, or if it cannot be probed (e.g. it does not exist), the error
     is qemu-img's \"backing format must be specified\"; -F trusts the format.
  Backing names with a protocol prefix (nbd:, json:, file: …) are refused wherever a
     file must be opened; write ./nbd:x for a local file of that name.
  Names read from images are printed with bytes outside printable ASCII as \\xNN.
  Safe mode opens a backing file named inside an image only if it is a regular file
     inside FILE's directory tree, the -b file's directory tree or an --allow-dir (also
     after symlinks), without a protocol prefix, loops, or more than 16 images per chain
     (docs/path-policy.md). FILE's external data file must pass the same rules in both
     modes (its name is resolved against the current directory, as QEMU does).
  -c is refused. --object defines secrets only (secret,id=…,data=…|file=…[,format=
     raw|base64]); --image-opts takes only driver, file.filename, file.driver=file
     and encrypt.key-secret/encrypt.format (also under backing.): docs/luks.md.
  Output: \"Image rebased.\" or \"Image detached.\" on stdout (qemu-img prints nothing),
     or with --output json one object: {\"overlay\", \"overlay_format\", \"mode\"
     (\"unsafe\"|\"safe\"), \"clusters_copied\", \"bytes_copied\", and \"new_backing\":
     {\"filename\", \"format\"} or \"detached\": true}. With --output json, -p
     progress goes to stderr.
See docs/cli.md for the full list.";

/// The clap command for `instar rebase`, which renders `instar rebase --help`.
pub fn rebase_command() -> Command {
    let mut cmd = Command::new("rebase")
        .bin_name(format!("{PROG} rebase"))
        .about("Change the backing file of a qcow2, qed or vmdk image (like qemu-img rebase)")
        .long_about(REBASE_ABOUT)
        .override_usage(
            "instar rebase [-f FMT] -b BACKING [-F FMT] [-u] [-c] [-q] [-p] [-U] [-t CACHE] [-T CACHE]\n       \
             [--output human|json] [--allow-dir DIR]...\n       \
             [--object secret,id=ID,data=…|file=…]... [--image-opts] FILE",
        )
        .after_help(REBASE_AFTER)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .args_override_self(true);
    for o in REBASE_OPTIONS {
        let s = &o.spec;
        let mut arg = Arg::new(s.id).help(o.help);
        if let Some(long) = s.long {
            arg = arg.long(long);
        }
        if let Some((&first, rest)) = s.shorts.split_first() {
            arg = arg.short(first);
            for &alias in rest {
                arg = arg.visible_short_alias(alias);
            }
        }
        arg = if s.takes_value {
            arg.value_name(o.value_name)
                .num_args(1)
                .allow_hyphen_values(true)
                .value_parser(clap::value_parser!(OsString))
                .action(if s.id == "allow-dir" {
                    ArgAction::Append
                } else {
                    ArgAction::Set
                })
        } else {
            arg.action(ArgAction::SetTrue)
        };
        cmd = cmd.arg(arg);
    }
    cmd.arg(
        Arg::new("file")
            .value_name("FILE")
            .help("The image whose backing file is changed (a plain file name)")
            .required(true)
            .value_parser(clap::value_parser!(OsString)),
    )
}

/// The clap command for `instar`, which renders `instar --help`.
pub fn top_command() -> Command {
    Command::new(PROG)
        .about("Sandboxed, byte-compatible replacement for qemu-img rebase")
        .long_about(TOP_ABOUT)
        .override_usage("instar [-h | -V] COMMAND [--help | command options]")
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(
            Arg::new("help")
                .short('h')
                .long("help")
                .help("Print this help and exit")
                .action(ArgAction::SetTrue),
        )
        .arg(
            Arg::new("version")
                .short('V')
                .long("version")
                .help("Print the version and exit")
                .action(ArgAction::SetTrue),
        )
        .subcommand(rebase_command())
        .after_help("Run 'instar rebase --help' for the options of rebase.")
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Human,
    Json,
}

/// A parsed `instar rebase` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebaseArgs {
    pub file: OsString,
    /// `-f`.
    pub format: Option<OsString>,
    /// `-b` (`Some("")` detaches).
    pub backing: OsString,
    /// `-F` / `-B`.
    pub backing_format: Option<OsString>,
    pub unsafe_mode: bool,
    pub force_share: bool,
    /// `-p`, already cancelled by `-q`.
    pub progress: bool,
    pub quiet: bool,
    pub cache: OsString,
    pub backing_cache: OsString,
    pub output: OutputFormat,
    /// `--allow-dir`, in command-line order.
    pub allow_dirs: Vec<OsString>,
    /// `-c`: copied clusters are written compressed.
    pub compress: bool,
    /// `--object secret,…` definitions.
    pub secrets: Secrets,
    /// `--image-opts`: FILE's options (`file` above is then its `file.filename`, and
    /// `format` its `driver`).
    pub image_opts: Option<ImageOpts>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    Help(String),
    Version(String),
    Run(T),
}

/// A command-line error. `Display` is what goes to stderr, without the final newline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// glibc's getopt text, prefixed with the command name (`instar rebase: …`).
    #[error("{cmd}: {msg}\nTry '{cmd} --help' for more information")]
    Getopt { cmd: String, msg: String },
    /// qemu-img's `error_exit`: `instar: …` and the "Try" line.
    #[error("{PROG}: {msg}\nTry '{cmd} --help' for more information")]
    Usage { cmd: String, msg: String },
    /// qemu-img's `error_report` during argument handling (`--object`): no "Try" line.
    #[error("{PROG}: {msg}")]
    Plain { msg: String },
}

fn usage(cmd: &str, msg: impl Into<String>) -> UsageError {
    UsageError::Usage {
        cmd: cmd.to_string(),
        msg: msg.into(),
    }
}

/// The top-level command: `Run((command, its arguments))`.
pub fn parse_top(args: &[OsString]) -> Result<Parsed<(OsString, Vec<OsString>)>, UsageError> {
    let (items, err) = getopt::scan(args, TOP_SPECS, Mode::StopAtPositional);
    let mut rest: Option<usize> = None;
    for (k, item) in items.iter().enumerate() {
        match item {
            Item::Opt { id: "help", .. } => {
                return Ok(Parsed::Help(top_command().render_long_help().to_string()))
            }
            Item::Opt { id: "version", .. } => {
                return Ok(Parsed::Version(format!(
                    "{PROG} version {}\nCompatible with qemu-img rebase of QEMU 10.2\n",
                    env!("CARGO_PKG_VERSION")
                )))
            }
            Item::Opt { .. } => {}
            Item::Positional(_) => {
                rest = Some(k);
                break;
            }
        }
    }
    if let Some(e) = err {
        return Err(UsageError::Getopt {
            cmd: PROG.to_string(),
            msg: e.0,
        });
    }
    let Some(k) = rest else {
        return Err(usage(PROG, "Not enough arguments"));
    };
    let Item::Positional(command) = &items[k] else {
        return Err(usage(PROG, "Not enough arguments"));
    };
    // Global options take no values, so the command's own arguments are everything after
    // the first occurrence of its name (the scan stopped there).
    let pos = args
        .iter()
        .position(|a| a == command)
        .map_or(args.len(), |p| p + 1);
    Ok(Parsed::Run((command.clone(), args[pos..].to_vec())))
}

/// `instar rebase` arguments (without "rebase" itself).
pub fn parse_rebase(args: &[OsString]) -> Result<Parsed<RebaseArgs>, UsageError> {
    let cmd = format!("{PROG} rebase");
    let specs = rebase_specs();
    let (items, err) = getopt::scan(args, &specs, Mode::Permute);

    // Act on options in command-line order, as qemu-img's getopt loop does.
    let mut canonical: Vec<OsString> = vec![OsString::from(cmd.clone())];
    let mut files: Vec<OsString> = Vec::new();
    let mut secrets = Secrets::default();
    let mut image_opts = false;
    for item in &items {
        match item {
            Item::Opt { id: "help", .. } => {
                return Ok(Parsed::Help(
                    rebase_command().render_long_help().to_string(),
                ))
            }
            // qemu-img defines each object when its getopt loop meets it.
            Item::Opt {
                id: "object",
                value: Some(v),
            } => secrets
                .define(&v.to_string_lossy())
                .map_err(|msg| UsageError::Plain { msg })?,
            Item::Opt {
                id: "image-opts", ..
            } => image_opts = true,
            Item::Opt {
                id: "output",
                value: Some(v),
            } if v != "human" && v != "json" => {
                return Err(usage(
                    &cmd,
                    format!(
                        "--output expects 'human' or 'json', not '{}'",
                        v.to_string_lossy()
                    ),
                ))
            }
            Item::Opt { id, value } => {
                let mut a = OsString::from(format!("--{id}"));
                if let Some(v) = value {
                    a.push("=");
                    a.push(v);
                }
                canonical.push(a);
            }
            Item::Positional(p) => files.push(p.clone()),
        }
    }
    if let Some(e) = err {
        return Err(UsageError::Getopt { cmd, msg: e.0 });
    }
    let [file] = files.as_slice() else {
        return Err(usage(&cmd, "Expecting one image file name"));
    };
    canonical.push(OsString::from("--"));
    canonical.push(file.clone());

    let m = rebase_command()
        .try_get_matches_from(canonical)
        .map_err(|e| usage(&cmd, format!("internal error: {}", e.kind())))?;
    let flag = |id: &str| m.get_flag(id);
    let value = |id: &str| m.get_one::<OsString>(id).cloned();
    let unsafe_mode = flag("backing-unsafe");
    let Some(backing) = value("backing") else {
        return Err(usage(
            &cmd,
            if unsafe_mode {
                "Must specify backing file (-b); use -b \"\" to detach the image from its backing file"
            } else {
                "Must specify backing file (-b) or use unsafe mode (-u)"
            },
        ));
    };
    let quiet = flag("quiet");
    let (file, format, image_opts) = if image_opts {
        let o =
            ImageOpts::parse(&file.to_string_lossy()).map_err(|msg| UsageError::Plain { msg })?;
        if value("format").is_some() {
            return Err(UsageError::Plain {
                msg: "--image-opts and --format are mutually exclusive".into(),
            });
        }
        (
            OsString::from(&o.filename),
            o.driver.clone().map(OsString::from),
            Some(o),
        )
    } else {
        (file.clone(), value("format"), None)
    };
    Ok(Parsed::Run(RebaseArgs {
        file,
        format,
        backing,
        backing_format: value("backing-format"),
        unsafe_mode,
        force_share: flag("force-share"),
        progress: flag("progress") && !quiet,
        quiet,
        cache: value("cache").unwrap_or_else(|| "writeback".into()),
        backing_cache: value("backing-cache").unwrap_or_else(|| "writeback".into()),
        output: match value("output") {
            Some(v) if v == "json" => OutputFormat::Json,
            _ => OutputFormat::Human,
        },
        allow_dirs: m
            .get_many::<OsString>("allow-dir")
            .map(|v| v.cloned().collect())
            .unwrap_or_default(),
        compress: flag("compress"),
        secrets,
        image_opts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn run(v: &[&str]) -> RebaseArgs {
        match parse_rebase(&os(v)) {
            Ok(Parsed::Run(a)) => a,
            other => panic!("{v:?}: {other:?}"),
        }
    }

    fn err(v: &[&str]) -> String {
        match parse_rebase(&os(v)) {
            Err(e) => e.to_string(),
            other => panic!("{v:?}: {other:?}"),
        }
    }

    #[test]
    fn clap_command_is_consistent() {
        rebase_command().debug_assert();
        top_command().debug_assert();
    }

    #[test]
    fn full_line() {
        let a = run(&[
            "-f",
            "qcow2",
            "-uqpU",
            "-b",
            "",
            "-B",
            "raw",
            "-t",
            "none",
            "--backing-cache=unsafe",
            "--output",
            "json",
            "o.qcow2",
        ]);
        assert_eq!(a.file, "o.qcow2");
        assert_eq!(a.format.as_deref(), Some("qcow2".as_ref()));
        assert_eq!(a.backing, "");
        assert_eq!(a.backing_format.as_deref(), Some("raw".as_ref()));
        assert!(a.unsafe_mode && a.force_share && a.quiet);
        assert!(!a.progress, "-q cancels -p");
        assert_eq!(a.cache, "none");
        assert_eq!(a.backing_cache, "unsafe");
        assert_eq!(a.output, OutputFormat::Json);
    }

    #[test]
    fn last_occurrence_wins_and_values_may_look_like_options() {
        let a = run(&[
            "o",
            "-b",
            "x",
            "--backing",
            "-u",
            "-F",
            "qcow2",
            "-B",
            "raw",
        ]);
        assert_eq!(a.backing, "-u");
        assert!(!a.unsafe_mode);
        assert_eq!(a.backing_format.as_deref(), Some("raw".as_ref()));
        assert_eq!(a.cache, "writeback");
        assert_eq!(a.output, OutputFormat::Human);
        assert!(a.allow_dirs.is_empty());
    }

    #[test]
    fn allow_dir_repeats() {
        let a = run(&[
            "--allow-dir",
            "/a",
            "-b",
            "x",
            "--allow-dir=b c",
            "--allow",
            "-u",
            "o",
        ]);
        assert_eq!(a.allow_dirs, os(&["/a", "b c", "-u"]));
        assert!(!a.unsafe_mode);
    }

    #[test]
    fn usage_errors() {
        assert_eq!(
            err(&[]),
            "instar: Expecting one image file name\nTry 'instar rebase --help' for more information"
        );
        assert_eq!(
            err(&["a", "b", "-b", "x"]),
            "instar: Expecting one image file name\nTry 'instar rebase --help' for more information"
        );
        assert_eq!(
            err(&["a"]),
            "instar: Must specify backing file (-b) or use unsafe mode (-u)\n\
             Try 'instar rebase --help' for more information"
        );
        assert_eq!(
            err(&["-X", "a"]),
            "instar rebase: invalid option -- 'X'\nTry 'instar rebase --help' for more information"
        );
        assert_eq!(
            err(&["--output", "xml", "a"]),
            "instar: --output expects 'human' or 'json', not 'xml'\n\
             Try 'instar rebase --help' for more information"
        );
        assert_eq!(
            err(&["--object", "secret,id=s", "a"]),
            "instar: Either 'file' or 'data' must be provided"
        );
        assert!(run(&["-c", "-b", "x", "a"]).compress);
        assert!(run(&["--compress", "-b", "x", "a"]).compress);
        assert!(!run(&["-b", "x", "a"]).compress);
        assert!(err(&["--object", "iothread,id=x", "-b", "", "a"]).contains("only 'secret'"));
        assert_eq!(
            err(&["--image-opts", "-f", "qcow2", "-b", "", "file.filename=a"]),
            "instar: --image-opts and --format are mutually exclusive"
        );
        let a = run(&[
            "--object",
            "secret,id=s,data=x",
            "--image-opts",
            "-b",
            "",
            "driver=qcow2,file.filename=o.qcow2,encrypt.key-secret=s",
        ]);
        assert_eq!(a.file, "o.qcow2");
        assert_eq!(a.format.as_deref(), Some(std::ffi::OsStr::new("qcow2")));
        assert!(a.image_opts.is_some());
    }

    #[test]
    fn help_before_a_later_error_wins() {
        assert!(matches!(
            parse_rebase(&os(&["-h", "-X"])),
            Ok(Parsed::Help(_))
        ));
        assert!(parse_rebase(&os(&["-X", "-h"])).is_err());
    }

    #[test]
    fn top_level() {
        match parse_top(&os(&["rebase", "-u", "x"])) {
            Ok(Parsed::Run((c, rest))) => {
                assert_eq!(c, "rebase");
                assert_eq!(rest, os(&["-u", "x"]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_top(&os(&[])).unwrap_err().to_string(),
            "instar: Not enough arguments\nTry 'instar --help' for more information"
        );
        assert_eq!(
            parse_top(&os(&["-x"])).unwrap_err().to_string(),
            "instar: invalid option -- 'x'\nTry 'instar --help' for more information"
        );
    }
}
