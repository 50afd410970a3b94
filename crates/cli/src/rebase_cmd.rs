//! `instar rebase`: the host side of one rebase, in qemu-img 10.2's order of checks.
//!
//! 1. cache modes; `-f`; FILE opened read-write, locked for writing, probed in the sandbox;
//! 2. `-F` validated (after the open, as qemu-img does); the overlay format checked;
//! 3. the new backing: its name checked, and opened, locked for reading and probed when
//!    it must be (safe mode, or no `-F`);
//! 4. one VM with FILE writable as device 0, then the old chain, then the new chain;
//! 5. FILE cut to the length the guest reports.
//!
//! Every refusal happens before step 4, and the guest itself writes nothing unless the
//! whole change can be made, so an error leaves FILE unchanged.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use instar_abi::{
    Call, ChainImage, ErrorKind, Format, ImageInfo, NewBacking, ProbeRequest, RebaseRequest,
    RebaseStats, Request, MAX_BACKING_NAME,
};

use crate::args::RebaseArgs;
use crate::drivers::{self, DriverName};
use crate::files::{self, ImageFile};
use crate::guest::{self, Answer, Attached, Guest, Refusal};
use crate::locks::{self, LockError};
use crate::paths;
use crate::progress::{Progress, StepCounter};
use crate::sanitize;

/// Whether the rebase rewrote only the header (`-u`) or compared data first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unsafe,
    Safe,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Unsafe => "unsafe",
            Mode::Safe => "safe",
        }
    }
}

/// A finished rebase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub overlay_format: Format,
    pub mode: Mode,
    pub stats: RebaseStats,
    /// The new backing name (verbatim) and the format recorded with it; `None` detached.
    pub new_backing: Option<(OsString, String)>,
}

/// A failed rebase: the text after "instar: " (it may span lines, e.g. QEMU's lock hint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub text: String,
    /// qemu-img reaches its final `qemu_progress_print(100, 0)` for this error (errors of
    /// the backing-file change itself), so `-p` prints `(100.00/100%)` before the newline.
    pub at_change: bool,
}

fn fail<T>(text: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        text: text.into(),
        at_change: false,
    })
}

fn lossy(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

/// How the overlay and the backing files are opened: the names shown in messages, and
/// which files are locked.
struct Ctx<'a> {
    args: &'a RebaseArgs,
    /// FILE as typed, for messages.
    file: String,
    /// `-b` as typed, for messages.
    backing: String,
}

impl Ctx<'_> {
    fn change_failed<T>(&self, why: &str) -> Result<T, Failure> {
        Err(Failure {
            text: format!(
                "Could not change the backing file to '{}': {why}",
                self.backing
            ),
            at_change: true,
        })
    }
}

/// Where a message about a file comes from, for QEMU's prefixes.
#[derive(Clone, Copy)]
enum Role {
    /// FILE: "Could not open 'FILE': …".
    Overlay,
    /// The `-b` file: "Could not open new backing file '-b': …".
    NewBacking,
}

impl Role {
    fn prefix(self, ctx: &Ctx) -> String {
        match self {
            Role::Overlay => format!("Could not open '{}': ", ctx.file),
            Role::NewBacking => format!("Could not open new backing file '{}': ", ctx.backing),
        }
    }
}

fn lock_failure(ctx: &Ctx, role: Role, shown_path: &str, e: LockError) -> Failure {
    let mut text = format!("{}{e}", role.prefix(ctx));
    if e.is_conflict() {
        text.push_str(&format!(
            "\nIs another process using the image [{shown_path}]?"
        ));
    }
    Failure {
        text,
        at_change: false,
    }
}

fn refusal_failure(ctx: &Ctx, role: Role, r: &Refusal) -> Failure {
    match r.kind {
        ErrorKind::Open { .. } => Failure {
            text: format!("{}{}", role.prefix(ctx), r.message),
            at_change: false,
        },
        ErrorKind::ChangeBacking => Failure {
            text: format!(
                "Could not change the backing file to '{}': {}",
                ctx.backing, r.message
            ),
            at_change: true,
        },
        ErrorKind::Plain => Failure {
            text: r.message.clone(),
            at_change: false,
        },
    }
}

fn sandbox_failure(text: String) -> Failure {
    Failure {
        text: sanitize::escape_text(&text),
        at_change: false,
    }
}

/// Probe one opened file in its own VM.
fn probe(
    guest: &mut dyn Guest,
    image: &ImageFile,
    format: Option<Format>,
    writable: bool,
) -> Result<Answer<ImageInfo>, Failure> {
    let call = Call {
        device_sizes: vec![image.len],
        request: Request::Probe(ProbeRequest {
            dev: 0,
            format,
            writable,
        }),
    };
    // The probe never writes: even the overlay is attached read-only.
    let devices = [Attached {
        file: &image.file,
        writable: false,
    }];
    let response = guest
        .run(&call, &devices, &mut |_| {})
        .map_err(sandbox_failure)?;
    guest::probe_answer(response, format).map_err(|e| Failure {
        text: e.to_string(),
        at_change: false,
    })
}

/// The overlay formats instar hands to the guest for a rebase; every other one is
/// refused as QEMU refuses formats without a backing-file change (`ENOTSUP`).
fn overlay_supported(format: Format) -> bool {
    matches!(format, Format::Qcow2 | Format::Vmdk)
}

/// The new backing file as the guest will get it.
struct NewChain {
    /// Opened files, the `-b` image first (empty when nothing had to be opened).
    images: Vec<ImageFile>,
    chain: Vec<Format>,
    /// What is written into the header: name verbatim, format.
    record: Option<(OsString, String)>,
}

/// Run `instar rebase` with `args`; progress (if any) goes through `progress`.
pub fn rebase(
    args: &RebaseArgs,
    guest: &mut dyn Guest,
    progress: &mut Progress,
) -> Result<Done, Failure> {
    let ctx = Ctx {
        args,
        file: lossy(&args.file),
        backing: lossy(&args.backing),
    };
    let cache = lossy(&args.cache);
    if !drivers::is_cache_mode(&cache) {
        return fail(format!("Invalid cache option: {cache}"));
    }
    let backing_cache = lossy(&args.backing_cache);
    if !drivers::is_cache_mode(&backing_cache) {
        return fail(format!("Invalid source cache option: {backing_cache}"));
    }

    // The overlay.
    let wanted = match args.format.as_deref().map(lossy) {
        None => None,
        Some(f) => match drivers::classify(&f) {
            DriverName::Format(format) => Some(format),
            DriverName::QemuOnly => {
                return fail(format!(
                    "{}Driver '{f}' is not supported by instar",
                    Role::Overlay.prefix(&ctx)
                ))
            }
            DriverName::Unknown => {
                return fail(format!(
                    "{}Unknown driver '{f}'",
                    Role::Overlay.prefix(&ctx)
                ))
            }
        },
    };
    if paths::has_protocol(args.file.as_bytes()) {
        let e = paths::PathError::Protocol {
            protocol: String::from_utf8_lossy(paths::protocol_of(args.file.as_bytes()))
                .into_owned(),
            name: ctx.file.clone(),
        };
        return fail(format!("{}{e}", Role::Overlay.prefix(&ctx)));
    }
    let overlay = files::open_image(Path::new(&args.file), true)
        .or_else(|e| fail(format!("{}{e}", Role::Overlay.prefix(&ctx))))?;
    locks::lock_image(&overlay.file, locks::OVERLAY)
        .map_err(|e| lock_failure(&ctx, Role::Overlay, &ctx.file, e))?;
    let info = match probe(guest, &overlay, wanted, true)? {
        Answer::Ok(info) => info,
        Answer::Refused(r) => return Err(refusal_failure(&ctx, Role::Overlay, &r)),
    };
    if wanted.is_none() && info.format == Format::Raw {
        // qemu-img's warning for a probed raw image opened read-write (raw-format.c).
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations \
             on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions.",
            ctx.file
        );
    }

    // -F, checked after the overlay is open, as qemu-img orders it.
    let backing_format = match args.backing_format.as_deref().map(lossy) {
        None => None,
        Some(f) if drivers::is_qemu_driver(&f) => Some(f),
        Some(f) => return fail(format!("Invalid format name: '{f}'")),
    };
    match info.format {
        // qemu-img 10.x's bdrv_get_info() fails for parallels before anything else.
        Format::Parallels => return fail("could not get block driver info"),
        f if !overlay_supported(f) => return ctx.change_failed("Operation not supported"),
        _ => {}
    }

    let mode = if args.unsafe_mode {
        Mode::Unsafe
    } else {
        Mode::Safe
    };
    let new = new_backing(&ctx, guest, backing_format.as_deref(), mode)?;

    // Safe mode needs the old chain; its discovery (with the path policy for names found
    // in images) is not there yet, so only overlays without a backing file go ahead.
    if mode == Mode::Safe && info.backing_file.is_some() {
        return fail(
            "Safe mode with an existing backing file is not supported yet; \
             use -u (unsafe mode) to change only the backing file name",
        );
    }

    // One VM: the overlay writable, then (safe mode) the new chain read-only.
    let mut devices = vec![Attached {
        file: &overlay.file,
        writable: true,
    }];
    let mut device_sizes = vec![overlay.len];
    let mut new_chain = Vec::new();
    for (image, &format) in new.images.iter().zip(&new.chain) {
        let dev = u8::try_from(devices.len()).map_err(|_| Failure {
            text: "Backing chain too long".into(),
            at_change: false,
        })?;
        new_chain.push(ChainImage { dev, format });
        devices.push(Attached {
            file: &image.file,
            writable: false,
        });
        device_sizes.push(image.len);
    }
    let request = RebaseRequest {
        overlay_format: info.format,
        unsafe_mode: mode == Mode::Unsafe,
        new_backing: new.record.as_ref().map(|(name, format)| NewBacking {
            name: name.as_bytes().to_vec(),
            format: Some(format.as_bytes().to_vec()),
        }),
        old_chain: Vec::new(),
        new_chain,
        in_chain: None,
        progress: args.progress && mode == Mode::Safe,
    };
    let call = Call {
        device_sizes,
        request: Request::Rebase(request),
    };
    let mut steps = StepCounter::new(info.virtual_size);
    let response = {
        let mut on_progress = |n: u32| steps.advance(n, progress);
        guest
            .run(&call, &devices, &mut on_progress)
            .map_err(sandbox_failure)?
    };
    let outcome = match guest::rebase_answer(response).map_err(|e| Failure {
        text: e.to_string(),
        at_change: false,
    })? {
        Answer::Ok(o) => o,
        Answer::Refused(r) => {
            let role = match r.kind {
                ErrorKind::Open { dev } if dev > 0 => Role::NewBacking,
                _ => Role::Overlay,
            };
            return Err(refusal_failure(&ctx, role, &r));
        }
    };
    finish_overlay(&ctx, &overlay, outcome.overlay_len)?;
    Ok(Done {
        overlay_format: info.format,
        mode,
        stats: outcome.stats,
        new_backing: new.record,
    })
}

/// Decide what the header will name, opening the new backing file when it must be.
fn new_backing(
    ctx: &Ctx,
    guest: &mut dyn Guest,
    backing_format: Option<&str>,
    mode: Mode,
) -> Result<NewChain, Failure> {
    let args = ctx.args;
    let none = NewChain {
        images: Vec::new(),
        chain: Vec::new(),
        record: None,
    };
    if args.backing.is_empty() {
        // Detach: -F was validated and is ignored, as in qemu-img.
        return Ok(none);
    }
    // qcow2's limit, checked where QEMU checks it; without -F QEMU's EINVAL reads as a
    // missing format, and that text is kept.
    if args.backing.len() > MAX_BACKING_NAME {
        return ctx.change_failed(if backing_format.is_some() {
            "Invalid argument"
        } else {
            "backing format must be specified"
        });
    }
    if let (Mode::Unsafe, Some(f)) = (mode, backing_format) {
        // Unsafe mode with -F: the new backing is never opened.
        return Ok(NewChain {
            record: Some((args.backing.clone(), f.to_string())),
            ..none
        });
    }
    let open_as = match backing_format.map(drivers::classify) {
        None => None,
        Some(DriverName::Format(f)) => Some(f),
        Some(_) => {
            return fail(format!(
                "{}Driver '{}' is not supported by instar",
                Role::NewBacking.prefix(ctx),
                backing_format.unwrap_or_default()
            ))
        }
    };
    let path = paths::resolve_backing(&args.file, &args.backing)
        .or_else(|e| fail(format!("{}{e}", Role::NewBacking.prefix(ctx))))?;
    let image = match files::open_image(&path, false) {
        Ok(image) => image,
        // Unsafe mode opens the file only to learn its format; when it cannot, the error
        // is the one qemu-img gives for a missing -F.
        Err(_) if mode == Mode::Unsafe => {
            return ctx.change_failed("backing format must be specified")
        }
        Err(e) => return fail(format!("{}{e}", Role::NewBacking.prefix(ctx))),
    };
    let shown = path.to_string_lossy().into_owned();
    if !args.force_share {
        locks::lock_image(&image.file, locks::READER)
            .map_err(|e| lock_failure(ctx, Role::NewBacking, &shown, e))?;
    }
    let info = match probe(guest, &image, open_as, false)? {
        Answer::Ok(info) => info,
        Answer::Refused(r) => return Err(refusal_failure(ctx, Role::NewBacking, &r)),
    };
    if mode == Mode::Safe && info.backing_file.is_some() {
        return fail(format!(
            "{}Safe mode onto a backing file that has its own backing file is not \
             supported yet; use -u (unsafe mode)",
            Role::NewBacking.prefix(ctx)
        ));
    }
    let format = backing_format
        .map(str::to_string)
        .unwrap_or_else(|| info.format.name().to_string());
    // Unsafe mode only needed the format: the file (and its lock) is let go here.
    let images = if mode == Mode::Safe {
        vec![image]
    } else {
        Vec::new()
    };
    Ok(NewChain {
        images,
        chain: vec![info.format],
        record: Some((args.backing.clone(), format)),
    })
}

/// Cut the overlay to the length the guest meant (virtio-blk writes whole sectors), never
/// below its original length and never growing it, then flush it as qemu-img's close does
/// (except with `-t unsafe`).
fn finish_overlay(ctx: &Ctx, overlay: &ImageFile, wanted: Option<u64>) -> Result<(), Failure> {
    let io_failure = |what: &str, e: std::io::Error| Failure {
        text: format!(
            "Could not {what} '{}': {}",
            ctx.file,
            files::strerror(files::errno_of(&e))
        ),
        at_change: false,
    };
    if let Some(len) = wanted {
        let current = overlay
            .file
            .metadata()
            .map_err(|e| io_failure("stat", e))?
            .len();
        let target = len.max(overlay.len);
        if target < current {
            overlay
                .file
                .set_len(target)
                .map_err(|e| io_failure("truncate", e))?;
        }
    }
    if ctx.args.cache != "unsafe" {
        overlay
            .file
            .sync_data()
            .map_err(|e| io_failure("flush", e))?;
    }
    Ok(())
}
