//! `instar rebase`: the host side of one rebase, in qemu-img 10.2's order of checks.
//!
//! 1. cache modes; `-f`; FILE opened read-write, locked for writing, probed in the sandbox;
//! 2. `-F` validated (after the open, as qemu-img does); the overlay format checked;
//!    in safe mode, the old chain below it ([`crate::chain`], under the path policy);
//! 3. the new backing: its name checked; in safe mode QEMU's in-chain decision, else the
//!    file opened, locked for reading and probed (safe mode, or no `-F`), and in safe mode
//!    its own chain followed;
//! 4. one VM with FILE writable as device 0, then the old chain, then the new chain;
//! 5. FILE cut to the length the guest reports.
//!
//! Every refusal happens before step 4, and the guest itself writes nothing unless the
//! whole change can be made, so an error leaves FILE unchanged.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use instar_abi::{
    Call, ChainImage, ErrorKind, Format, ImageInfo, NewBacking, RebaseRequest, RebaseStats,
    Request, MAX_BACKING_NAME,
};

use crate::args::RebaseArgs;
use crate::chain::{self, Link, Opened, Top, Walk, BACKING_PREFIX};
use crate::drivers::{self, DriverName};
use crate::files::{self, ImageFile};
use crate::guest::{self, Answer, Attached, Guest, Refusal};
use crate::locks::{self, LockError};
use crate::paths;
use crate::policy::{self, Allowed, FileId, Refused};
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
    guest::probe(guest, image, format, writable).map_err(plain_failure)
}

fn plain_failure(text: String) -> Failure {
    Failure {
        text,
        at_change: false,
    }
}

/// The overlay formats instar hands to the guest for a rebase; every other one is
/// refused as QEMU refuses formats without a backing-file change (`ENOTSUP`).
fn overlay_supported(format: Format) -> bool {
    matches!(format, Format::Qcow2 | Format::Vmdk | Format::Qed)
}

/// The new backing file as the guest will get it.
struct NewChain {
    /// Opened files, the `-b` image first (empty when nothing had to be opened).
    images: Vec<ImageFile>,
    chain: Vec<Format>,
    /// What is written into the header: name verbatim, format.
    record: Option<(OsString, String)>,
    /// The `-b` image is `old_chain[i]` (QEMU's in-chain optimisation).
    in_chain: Option<u8>,
}

/// What safe mode knows about the overlay's side when it turns to the new backing.
struct SafeCtx<'a> {
    cwd: &'a [u8],
    allowed: &'a Allowed,
    overlay_id: FileId,
    /// The overlay and the old chain, for the in-chain decision.
    links: Vec<Link>,
    old: &'a [Opened],
}

/// The current directory as bytes (backing names are resolved against it, as the kernel
/// resolves them).
fn current_dir() -> Result<Vec<u8>, Failure> {
    std::env::current_dir()
        .map(|d| d.into_os_string().into_vec())
        .map_err(|e| {
            plain_failure(format!(
                "Could not determine the current directory: {}",
                files::strerror(files::errno_of(&e))
            ))
        })
}

/// The allowed directories: `--allow-dir` first (checked before anything is opened).
fn allowed_from_args(args: &RebaseArgs, cwd: &[u8]) -> Result<Allowed, Failure> {
    let mut allowed = Allowed::new();
    for dir in &args.allow_dirs {
        allowed.add(cwd, dir.as_bytes()).map_err(|e| {
            plain_failure(format!(
                "Could not use --allow-dir '{}': {}",
                lossy(dir),
                files::strerror(files::errno_of(&e))
            ))
        })?;
    }
    Ok(allowed)
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
    // Names are resolved against the current directory only in safe mode.
    let cwd = if args.unsafe_mode && args.allow_dirs.is_empty() {
        Vec::new()
    } else {
        current_dir()?
    };
    let mut allowed = allowed_from_args(args, &cwd)?;
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
    let overlay_id = overlay
        .file
        .metadata()
        .map(|m| FileId::of(&m))
        .map_err(|e| stat_failure(Role::Overlay.prefix(&ctx), &e))?;
    if let Some(done) = unsafe_in_one_vm(&ctx, guest, &overlay, wanted)? {
        return Ok(done);
    }
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

    // QEMU opens an external data file together with the overlay; a missing one fails
    // the rebase there, so it must here too.
    if let Some(name) = info.data_file.as_deref() {
        check_data_file(&ctx, name)?;
    }

    let mode = if args.unsafe_mode {
        Mode::Unsafe
    } else {
        Mode::Safe
    };

    // Safe mode: QEMU opens the overlay with its whole backing chain.
    let mut old: Vec<Opened> = Vec::new();
    if mode == Mode::Safe {
        add_default_dirs(args, &cwd, &mut allowed);
        let mut seen = HashSet::from([overlay_id]);
        let mut walk = Walk {
            guest: &mut *guest,
            allowed: &allowed,
            cwd: &cwd,
            lock: true,
            prefix: Role::Overlay.prefix(&ctx),
            already: 0,
        };
        let top = Top {
            filename: args.file.as_bytes(),
            info: &info,
        };
        old = chain::walk(&mut walk, top, &mut seen).map_err(plain_failure)?;
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

    let safe = (mode == Mode::Safe).then(|| SafeCtx {
        cwd: &cwd,
        allowed: &allowed,
        overlay_id,
        links: std::iter::once(Link {
            filename: args.file.as_bytes().to_vec(),
            backing: info.backing_file.clone(),
        })
        .chain(old.iter().map(|o| Link {
            filename: o.filename.clone(),
            backing: o.info.backing_file.clone(),
        }))
        .collect(),
        old: &old,
    });
    let new = new_backing(
        &ctx,
        guest,
        backing_format.as_deref(),
        safe.as_ref(),
        info.format,
    )?;

    // One VM: the overlay writable, then (safe mode) the old chain and the new chain
    // read-only. `prefixes[dev]` is how a guest error about that device begins.
    let mut devices = vec![Attached {
        file: &overlay.file,
        writable: true,
    }];
    let mut device_sizes = vec![overlay.len];
    let mut prefixes = vec![Role::Overlay.prefix(&ctx)];
    let mut old_chain = Vec::new();
    let mut new_chain = Vec::new();
    let old_devices = old.iter().enumerate().map(|(k, o)| {
        let prefix = format!(
            "{}{}",
            Role::Overlay.prefix(&ctx),
            BACKING_PREFIX.repeat(k + 1)
        );
        (&o.image, o.format, prefix, true)
    });
    let new_devices = new
        .images
        .iter()
        .zip(&new.chain)
        .enumerate()
        .map(|(j, (image, &format))| {
            let prefix = format!(
                "{}{}",
                Role::NewBacking.prefix(&ctx),
                BACKING_PREFIX.repeat(j)
            );
            (image, format, prefix, false)
        });
    for (image, format, prefix, is_old) in old_devices.chain(new_devices) {
        // At most 1 + 2 × MAX_CHAIN devices; the sandbox takes 64.
        let dev = u8::try_from(devices.len())
            .map_err(|_| plain_failure("internal error: too many devices".into()))?;
        let entry = ChainImage { dev, format };
        if is_old {
            old_chain.push(entry);
        } else {
            new_chain.push(entry);
        }
        devices.push(Attached {
            file: &image.file,
            writable: false,
        });
        device_sizes.push(image.len);
        prefixes.push(prefix);
    }
    let request = RebaseRequest {
        overlay_format: info.format,
        unsafe_mode: mode == Mode::Unsafe,
        new_backing: header_backing(new.record.as_ref()),
        old_chain,
        new_chain,
        in_chain: new.in_chain,
        // check_data_file() ran after the probe.
        data_file_checked: true,
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
            if let ErrorKind::Open { dev } = r.kind {
                if let Some(prefix) = prefixes.get(usize::from(dev)) {
                    return Err(plain_failure(guest::refusal_text(prefix, &r)));
                }
            }
            return Err(refusal_failure(&ctx, Role::Overlay, &r));
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

/// What the guest writes into the header for `record` (name verbatim, format).
fn header_backing(record: Option<&(OsString, String)>) -> Option<NewBacking> {
    record.map(|(name, format)| NewBacking {
        name: name.as_bytes().to_vec(),
        format: Some(format.as_bytes().to_vec()),
    })
}

/// `-u` with a valid `-F` (or a detach) on what should be a qcow2 overlay: one VM that
/// validates the overlay as QEMU's read-write open does and rewrites its header, instead
/// of a probe VM and then a rebase VM. The requests are the ones the full path would
/// send. Any refusal (not qcow2, an external data file to check, a bad header, no
/// sandbox) returns `None` without a write, and the full path then reports it with
/// QEMU's words in QEMU's order.
fn unsafe_in_one_vm(
    ctx: &Ctx,
    guest: &mut dyn Guest,
    overlay: &ImageFile,
    wanted: Option<Format>,
) -> Result<Option<Done>, Failure> {
    let args = ctx.args;
    if !args.unsafe_mode
        || !matches!(wanted, None | Some(Format::Qcow2))
        || args.backing.len() > MAX_BACKING_NAME
    {
        return Ok(None);
    }
    let format = match args.backing_format.as_deref().map(lossy) {
        Some(f) if drivers::is_qemu_driver(&f) => Some(f),
        Some(_) => return Ok(None),
        None if args.backing.is_empty() => None,
        // The new backing must be probed: the full path.
        None => return Ok(None),
    };
    let record =
        (!args.backing.is_empty()).then(|| (args.backing.clone(), format.unwrap_or_default()));
    let request = RebaseRequest {
        overlay_format: Format::Qcow2,
        unsafe_mode: true,
        new_backing: header_backing(record.as_ref()),
        old_chain: Vec::new(),
        new_chain: Vec::new(),
        in_chain: None,
        progress: false,
        data_file_checked: false,
    };
    let call = Call {
        device_sizes: vec![overlay.len],
        request: Request::Rebase(request),
    };
    let devices = [Attached {
        file: &overlay.file,
        writable: true,
    }];
    let Ok(response) = guest.run(&call, &devices, &mut |_| {}) else {
        return Ok(None);
    };
    let Ok(Answer::Ok(outcome)) = guest::rebase_answer(response) else {
        return Ok(None);
    };
    finish_overlay(ctx, overlay, outcome.overlay_len)?;
    Ok(Some(Done {
        overlay_format: Format::Qcow2,
        mode: Mode::Unsafe,
        stats: outcome.stats,
        new_backing: record,
    }))
}

/// Check that the overlay's external data file can be opened, as QEMU's open of the
/// overlay requires. Its name is resolved against the current directory (QEMU's rule for
/// `data-file`) and is subject to the path policy, like a backing file name; instar never
/// reads it.
fn check_data_file(ctx: &Ctx, name: &[u8]) -> Result<(), Failure> {
    let prefix = Role::Overlay.prefix(ctx);
    let shown = policy::shown(name);
    if paths::has_protocol(name) {
        return fail(format!(
            "{prefix}data file name '{shown}' has a protocol prefix; instar opens local files only"
        ));
    }
    let cwd = current_dir()?;
    let mut allowed = allowed_from_args(ctx.args, &cwd)?;
    add_default_dirs(ctx.args, &cwd, &mut allowed);
    let path = Path::new(OsStr::from_bytes(name));
    let lexical = paths::normalise(&cwd, name);
    let inside = allowed.contains(Path::new(OsStr::from_bytes(&lexical)))
        && std::fs::canonicalize(path).map_or(true, |real| allowed.contains(&real));
    if !inside {
        return fail(format!(
            "{prefix}data file name '{shown}' is outside the allowed directories (see --allow-dir)"
        ));
    }
    files::open_image(path, false)
        .map(drop)
        .or_else(|e| fail(format!("{prefix}{e}")))
}

/// Add the default allowed directories: FILE's directory, and the directory of the `-b`
/// file as resolved against it (when it exists; a missing one fails later with QEMU's
/// text). Both are trusted because the user named them.
fn add_default_dirs(args: &RebaseArgs, cwd: &[u8], allowed: &mut Allowed) {
    // FILE was opened, so its directory exists.
    let _ = allowed.add(cwd, paths::dirname(args.file.as_bytes()));
    if !args.backing.is_empty() {
        if let Ok(b) = paths::resolve_backing(&args.file, &args.backing) {
            let _ = allowed.add(cwd, paths::dirname(b.as_os_str().as_bytes()));
        }
    }
}

/// Decide what the header will name, opening the new backing file when it must be
/// (`safe` is `Some` in safe mode).
fn new_backing(
    ctx: &Ctx,
    guest: &mut dyn Guest,
    backing_format: Option<&str>,
    safe: Option<&SafeCtx>,
    overlay_format: Format,
) -> Result<NewChain, Failure> {
    let args = ctx.args;
    let none = NewChain {
        images: Vec::new(),
        chain: Vec::new(),
        record: None,
        in_chain: None,
    };
    if args.backing.is_empty() {
        // Detach: -F was validated and is ignored, as in qemu-img.
        return Ok(none);
    }
    // qcow2's limit, checked where QEMU checks it; without -F QEMU's EINVAL reads as a
    // missing format, and that text is kept.
    // (qed's limit is its header's free space, checked in the guest.)
    if overlay_format != Format::Qed && args.backing.len() > MAX_BACKING_NAME {
        return ctx.change_failed(if backing_format.is_some() {
            "Invalid argument"
        } else {
            "backing format must be specified"
        });
    }
    // A vmdk overlay records its parent's CID, so the guest reads it from the new
    // backing even in unsafe mode.
    let attach_unsafe = safe.is_none() && overlay_format == Format::Vmdk;
    if let (None, Some(f), false) = (safe, backing_format, attach_unsafe) {
        // Unsafe mode with -F: the new backing is never opened.
        return Ok(NewChain {
            record: Some((args.backing.clone(), f.to_string())),
            ..none
        });
    }
    let path = paths::resolve_backing(&args.file, &args.backing)
        .or_else(|e| fail(format!("{}{e}", Role::NewBacking.prefix(ctx))))?;
    if let Some(safe) = safe {
        // QEMU reuses an image of the old chain when -b names it (by its own rule); the
        // image keeps the format it was opened with, and -F only goes into the header.
        if let Some(k) = chain::find_backing_image(&safe.links, path.as_os_str().as_bytes()) {
            let format = backing_format
                .map(str::to_string)
                .or_else(|| safe.old.get(k).map(|o| o.format.name().to_string()))
                .unwrap_or_default();
            return Ok(NewChain {
                record: Some((args.backing.clone(), format)),
                in_chain: Some(u8::try_from(k).unwrap_or(u8::MAX)),
                ..none
            });
        }
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
    let image = match files::open_image(&path, false) {
        Ok(image) => image,
        // Unsafe mode opens the file only to learn its format; when it cannot, the error
        // is the one qemu-img gives for a missing -F.
        Err(_) if safe.is_none() && !attach_unsafe => {
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
    let format = backing_format
        .map(str::to_string)
        .unwrap_or_else(|| info.format.name().to_string());
    let record = Some((args.backing.clone(), format));
    let Some(safe) = safe else {
        if attach_unsafe {
            return Ok(NewChain {
                images: vec![image],
                chain: vec![info.format],
                record,
                in_chain: None,
            });
        }
        // Unsafe mode only needed the format: the file (and its lock) is let go here.
        return Ok(NewChain { record, ..none });
    };
    if !info.format.readable() {
        return fail(format!(
            "{}instar does not read {} images",
            Role::NewBacking.prefix(ctx),
            info.format.name()
        ));
    }
    // The new backing and its own chain. Without locks (-U) the overlay itself can be
    // named here; it would become its own backing file.
    let b_id = image
        .file
        .metadata()
        .map(|m| FileId::of(&m))
        .map_err(|e| stat_failure(Role::NewBacking.prefix(ctx), &e))?;
    let mut seen = HashSet::from([safe.overlay_id]);
    if !seen.insert(b_id) {
        return fail(format!(
            "{}{}",
            Role::NewBacking.prefix(ctx),
            Refused::Loop {
                filename: policy::shown(path.as_os_str().as_bytes())
            }
        ));
    }
    let mut walk = Walk {
        guest,
        allowed: safe.allowed,
        cwd: safe.cwd,
        lock: !args.force_share,
        prefix: Role::NewBacking.prefix(ctx),
        already: 1,
    };
    let top = Top {
        filename: path.as_os_str().as_bytes(),
        info: &info,
    };
    let below = chain::walk(&mut walk, top, &mut seen).map_err(plain_failure)?;
    let mut images = vec![image];
    let mut formats = vec![info.format];
    for o in below {
        formats.push(o.format);
        images.push(o.image);
    }
    Ok(NewChain {
        images,
        chain: formats,
        record,
        in_chain: None,
    })
}

/// QEMU's `Could not stat file` for a file whose messages start with `prefix`.
fn stat_failure(prefix: String, e: &std::io::Error) -> Failure {
    plain_failure(format!(
        "{prefix}Could not stat file: {}",
        files::strerror(files::errno_of(e))
    ))
}

/// Cut the overlay to the length the guest meant (virtio-blk writes whole sectors), never
/// below its original length and never growing it, then flush the truncation (except with
/// `-t unsafe`).
fn finish_overlay(ctx: &Ctx, overlay: &ImageFile, wanted: Option<u64>) -> Result<(), Failure> {
    let io_failure = |what: &str, e: std::io::Error| Failure {
        text: format!(
            "Could not {what} '{}': {}",
            ctx.file,
            files::strerror(files::errno_of(&e))
        ),
        at_change: false,
    };
    let mut truncated = false;
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
            truncated = true;
        }
    }
    // The guest flushed its own writes (a virtio-blk flush is an fdatasync); only a
    // truncation here still needs one.
    if truncated && ctx.args.cache != "unsafe" {
        overlay
            .file
            .sync_data()
            .map_err(|e| io_failure("flush", e))?;
    }
    Ok(())
}
