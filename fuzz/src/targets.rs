//! The fuzz targets: each takes the raw input bytes, runs guest code over in-memory
//! devices, and checks the invariants that hold for every input. `Err` is a finding
//! (an invariant broken); a panic (overflow included, in debug builds) is one too and
//! is caught by the caller. `Ok` carries a coarse outcome signature (which error, which
//! success) that campaigns use as feedback.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use instar_abi::{
    Call, ChainImage, Format, NewBacking, ProbeRequest, RebaseRequest, Request, Response,
};
use instar_blockdev::BlockDev;
use instar_chain::layer::Layer;
use instar_chain::probe::{check_format, probe};
use instar_chain::raw::RawImage;
use instar_chain::view::ChainView;
use instar_qcow2::compress::{decompress_cluster, CompressionType};
use instar_qcow2::image::Qcow2Image;
use instar_qcow2::refcount::RefcountReader;
use instar_qcow2::{Header, OpenMode};
use instar_qed::QedImage;
use instar_rebase::{handle, Hooks};
use instar_vmdk::{Descriptor, SparseWriter, VmdkImage};

use crate::bitmaps_target::qcow2_bitmaps;
use crate::case::Case;
use crate::consistency::consistent;
use crate::dev::FuzzDev;
use crate::luks_target::luks_unlock;
use crate::qed_target::qed_read;
use crate::repair_target::qcow2_repair;

/// Largest virtual size whose whole content a target reads (and compares).
pub const MAX_READ: u64 = 8 << 20;
/// Most block-status calls a walk makes.
const MAX_RUNS: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Qcow2Header,
    Qcow2Read,
    Refcount,
    Compressed,
    VmdkDescriptor,
    VmdkRead,
    Probe,
    Chain,
    RebaseUnsafe,
    RebaseSafe,
    QedRead,
    Qcow2Repair,
    Qcow2Bitmaps,
    LuksUnlock,
}

impl Target {
    pub const ALL: [Target; 14] = [
        Target::Qcow2Header,
        Target::Qcow2Read,
        Target::Refcount,
        Target::Compressed,
        Target::VmdkDescriptor,
        Target::VmdkRead,
        Target::Probe,
        Target::Chain,
        Target::RebaseUnsafe,
        Target::RebaseSafe,
        Target::QedRead,
        Target::Qcow2Repair,
        Target::Qcow2Bitmaps,
        Target::LuksUnlock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Qcow2Header => "qcow2_header",
            Target::Qcow2Read => "qcow2_read",
            Target::Refcount => "refcount",
            Target::Compressed => "compressed",
            Target::VmdkDescriptor => "vmdk_descriptor",
            Target::VmdkRead => "vmdk_read",
            Target::Probe => "probe",
            Target::Chain => "chain",
            Target::RebaseUnsafe => "rebase_unsafe",
            Target::RebaseSafe => "rebase_safe",
            Target::QedRead => "qed_read",
            Target::Qcow2Repair => "qcow2_repair",
            Target::Qcow2Bitmaps => "qcow2_bitmaps",
            Target::LuksUnlock => "luks_unlock",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the input is a [`Case`] (several images and flags) rather than one image.
    pub fn takes_case(self) -> bool {
        matches!(
            self,
            Target::Chain | Target::RebaseUnsafe | Target::RebaseSafe
        )
    }

    pub fn run(self, data: &[u8]) -> Result<u64, String> {
        match self {
            Target::Qcow2Header => Ok(qcow2_header(data)),
            Target::Qcow2Read => Ok(qcow2_read(data)),
            Target::Refcount => Ok(refcount(data)),
            Target::Compressed => Ok(compressed(data)),
            Target::VmdkDescriptor => Ok(vmdk_descriptor(data)),
            Target::VmdkRead => Ok(vmdk_read(data)),
            Target::Probe => probe_target(data),
            Target::Chain => Ok(chain(data)),
            Target::RebaseUnsafe => rebase(data, true),
            Target::RebaseSafe => rebase(data, false),
            Target::QedRead => qed_read(data),
            Target::Qcow2Repair => qcow2_repair(data),
            Target::Qcow2Bitmaps => qcow2_bitmaps(data),
            Target::LuksUnlock => luks_unlock(data),
        }
    }
}

/// A signature of an outcome: the message with its numbers removed, hashed (FNV-1a).
pub fn signature(tag: u64, message: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ tag;
    for b in message.bytes().filter(|b| !b.is_ascii_digit()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn sig<T, E: ToString>(tag: u64, r: &Result<T, E>) -> u64 {
    match r {
        Ok(_) => signature(tag, "ok"),
        Err(e) => signature(tag, &e.to_string()),
    }
}

fn qcow2_header(data: &[u8]) -> u64 {
    let mut s = 0;
    for (i, mode) in [OpenMode::ReadOnly, OpenMode::ReadWrite]
        .into_iter()
        .enumerate()
    {
        let mut dev = FuzzDev::new(data.to_vec(), true);
        let r = Header::read(&mut dev, mode);
        s ^= sig(i as u64, &r);
        if let Ok(mut h) = r {
            s ^= sig(10, &h.rebuild());
            let _ = h.after_rewrite();
            let r = h.change_backing(Some(b"new-backing.qcow2"), Some(b"qcow2"));
            s ^= sig(11, &r);
            if r.is_ok() {
                s ^= sig(12, &h.rebuild());
            }
            s ^= sig(13, &h.change_backing(None, None));
        }
    }
    s
}

/// Walk a layer's block status over its whole virtual size, then read it all.
pub(crate) fn walk(layer: &mut dyn Layer) -> u64 {
    let size = layer.virtual_size();
    let (mut off, mut runs, mut s) = (0u64, 0usize, 0u64);
    while off < size && runs < MAX_RUNS {
        match layer.block_status(off, size - off) {
            Ok((state, n)) if n > 0 => {
                s = s.rotate_left(1) ^ state as u64;
                off += n;
            }
            Ok(_) => return signature(1, "empty run"),
            Err(e) => return signature(2, &e.to_string()),
        }
        runs += 1;
    }
    if size <= MAX_READ {
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            if let Err(e) = layer.read(off, &mut buf[..n]) {
                return signature(3, &e.to_string());
            }
            off += n as u64;
        }
    }
    s
}

fn qcow2_read(data: &[u8]) -> u64 {
    let mut dev = FuzzDev::new(data.to_vec(), true);
    let header = match Header::read(&mut dev, OpenMode::ReadOnly) {
        Ok(h) => h,
        Err(e) => return signature(0, &e.to_string()),
    };
    match Qcow2Image::open(&mut dev, &header) {
        Ok(mut img) => walk(&mut img),
        Err(e) => signature(4, &e.to_string()),
    }
}

fn refcount(data: &[u8]) -> u64 {
    let mut dev = FuzzDev::new(data.to_vec(), true);
    let header = match Header::read(&mut dev, OpenMode::ReadOnly) {
        Ok(h) => h,
        Err(e) => return signature(0, &e.to_string()),
    };
    let mut rc = match RefcountReader::load(&mut dev, &header) {
        Ok(rc) => rc,
        Err(e) => return signature(1, &e.to_string()),
    };
    let clusters = (dev.size() >> header.cluster_bits().min(63)).saturating_add(4);
    let mut s = 0u64;
    for i in (0..clusters.min(4096)).chain([u64::MAX, u64::MAX >> 9, 1 << 40]) {
        match rc.refcount(&mut dev, i) {
            Ok(v) => s = s.rotate_left(1) ^ v.min(3),
            Err(e) => return signature(2, &e.to_string()),
        }
    }
    s
}

/// Input: compression type (low bit), log2 of the cluster size (`9 + byte % 13`), stream.
fn compressed(data: &[u8]) -> u64 {
    let [kind, bits, stream @ ..] = data else {
        return 0;
    };
    let kind = if kind & 1 == 0 {
        CompressionType::Zlib
    } else {
        CompressionType::Zstd
    };
    let mut out = vec![0u8; 1 << (9 + u32::from(*bits) % 13)];
    sig(kind as u64, &decompress_cluster(kind, stream, &mut out))
}

fn vmdk_descriptor(data: &[u8]) -> u64 {
    let r = Descriptor::parse(data);
    let mut s = sig(0, &r);
    if let Ok(d) = r {
        s ^= sig(1, &d.with_parent(Some((b"parent.vmdk", 0x1234_5678))));
        s ^= sig(2, &d.with_parent(None));
    }
    s
}

fn vmdk_read(data: &[u8]) -> u64 {
    let mut dev = FuzzDev::new(data.to_vec(), true);
    let s = match VmdkImage::open(&mut dev) {
        Ok(mut img) => walk(&mut img),
        Err(e) => signature(0, &e.to_string()),
    };
    let mut wdev = FuzzDev::new(data.to_vec(), false);
    let w = SparseWriter::open(&mut wdev).map(|_| ());
    s ^ sig(1, &w)
}

/// What the host sees of a run: the write end the guest declared, if it did.
#[derive(Default)]
struct PhaseHooks {
    write_end: Option<u64>,
    compressor: Option<crate::compressor::FuzzCompressor>,
}

impl Hooks for PhaseHooks {
    fn progress(&mut self, _steps: u32) {}
    fn write_phase(&mut self, end: u64) {
        self.write_end = Some(end);
    }
    fn compressor(&mut self) -> Option<&mut dyn instar_qcow2::compressor::Compressor> {
        self.compressor
            .as_mut()
            .map(|c| c as &mut dyn instar_qcow2::compressor::Compressor)
    }
}

fn call(devs: &mut [FuzzDev], request: Request) -> Response {
    call_phased(devs, request).0
}

/// Run `request`; also the declared write end.
fn call_phased(devs: &mut [FuzzDev], request: Request) -> (Response, Option<u64>) {
    let call = Call {
        device_sizes: devs.iter().map(|d| d.size()).collect(),
        request,
    };
    let mut refs: Vec<&mut dyn BlockDev> =
        devs.iter_mut().map(|d| d as &mut dyn BlockDev).collect();
    let mut hooks = PhaseHooks {
        write_end: None,
        compressor: Some(crate::compressor::FuzzCompressor),
    };
    let response = handle(&call, &mut refs, &mut hooks);
    (response, hooks.write_end)
}

/// The host's rule: no write before the write phase, none past the declared end.
fn writes_within(dev: &FuzzDev, write_end: Option<u64>) -> Result<(), String> {
    let end = write_end.unwrap_or(0);
    match dev.writes.iter().find(|&&(o, n)| o.saturating_add(n) > end) {
        Some(&(o, n)) if write_end.is_none() => Err(format!(
            "a write of {n} bytes at {o} before the write phase"
        )),
        Some(&(o, n)) => Err(format!(
            "a write of {n} bytes at {o} past the declared end {end}"
        )),
        None => Ok(()),
    }
}

fn response_sig(tag: u64, r: &Response) -> u64 {
    match r {
        Response::Error(e) => signature(tag, &e.message),
        Response::Probe(info) => signature(tag, info.format.name()),
        other => signature(tag, &format!("{:?}", core::mem::discriminant(other))),
    }
}

/// The probe, every explicit-format check, and the guest's probe request.
fn probe_target(data: &[u8]) -> Result<u64, String> {
    let mut dev = FuzzDev::new(data.to_vec(), true);
    let mut s = sig(0, &probe(&mut dev));
    for f in Format::ALL {
        s ^= sig(f as u64, &check_format(&mut dev, f, false));
        s ^= sig(f as u64 + 20, &check_format(&mut dev, f, true));
    }
    let formats = [
        None,
        Some(Format::Qcow2),
        Some(Format::Vmdk),
        Some(Format::Raw),
        Some(Format::Qed),
    ];
    for (i, format) in formats.into_iter().enumerate() {
        for writable in [false, true] {
            let mut devs = [FuzzDev::new(data.to_vec(), !writable)];
            let req = Request::Probe(ProbeRequest {
                dev: 0,
                format,
                writable,
                key: None,
                derive_key: true,
            });
            s ^= response_sig(40 + i as u64, &call(&mut devs, req));
            if devs[0].data != data || !devs[0].writes.is_empty() {
                return Err(String::from("a probe request wrote to its device"));
            }
        }
    }
    Ok(s)
}

/// The format the host would pass for an image: the probe's answer (raw if it fails).
fn probed(data: &[u8]) -> Format {
    probe(&mut FuzzDev::new(data.to_vec(), true)).unwrap_or(Format::Raw)
}

/// Open `dev` as a chain layer of `format`, as the guest's chain code does.
fn open_layer<'a>(dev: &'a mut FuzzDev, format: Format) -> Option<Box<dyn Layer + 'a>> {
    match format {
        Format::Raw => Some(Box::new(RawImage::new(dev))),
        Format::Qcow2 => {
            let header = Header::read(dev, OpenMode::ReadOnly).ok()?;
            if header.has_data_file() {
                return None;
            }
            Some(Box::new(Qcow2Image::open(dev, &header).ok()?))
        }
        Format::Vmdk => Some(Box::new(VmdkImage::open(dev).ok()?)),
        Format::Qed => Some(Box::new(QedImage::open(dev).ok()?)),
        _ => None,
    }
}

fn opens(image: &[u8], format: Format) -> bool {
    open_layer(&mut FuzzDev::new(image.to_vec(), true), format).is_some()
}

/// The content of the chain `devs` (top first), if it opens and is small enough.
fn chain_content(devs: &mut [FuzzDev], formats: &[Format]) -> Result<Vec<u8>, String> {
    let mut layers = Vec::new();
    for (k, (dev, &f)) in devs.iter_mut().zip(formats).enumerate() {
        layers.push(open_layer(dev, f).ok_or_else(|| format!("layer {k} does not open"))?);
    }
    let mut view = ChainView::new(layers);
    let size = view.virtual_size();
    if size > MAX_READ {
        return Err(String::from("too large to compare"));
    }
    let mut buf = vec![0u8; size as usize];
    view.read(0, &mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn chain(data: &[u8]) -> u64 {
    let case = Case::decode(data);
    let formats: Vec<Format> = case.images.iter().map(|i| probed(i)).collect();
    let mut devs: Vec<FuzzDev> = case
        .images
        .iter()
        .map(|i| FuzzDev::new(i.clone(), true))
        .collect();
    let mut layers = Vec::new();
    for (k, (dev, &f)) in devs.iter_mut().zip(&formats).enumerate() {
        match open_layer(dev, f) {
            Some(l) => layers.push(l),
            None => return signature(k as u64, "open"),
        }
    }
    let mut view = ChainView::new(layers);
    let size = view.virtual_size();
    let (mut off, mut s, mut runs) = (0u64, 0u64, 0usize);
    while off < size && runs < MAX_RUNS {
        match view.is_allocated_above(0, None, off, size - off) {
            Ok(a) => {
                s = s.rotate_left(1) ^ a.layer.map_or(0, |l| l as u64 + 1);
                if a.bytes == 0 {
                    return signature(5, "empty run");
                }
                off += a.bytes;
            }
            Err(e) => return signature(6, &e.to_string()),
        }
        runs += 1;
    }
    if size <= MAX_READ {
        let mut buf = vec![0u8; size as usize];
        s ^= sig(7, &view.read(0, &mut buf));
    }
    s
}

/// Flag bits of a rebase case.
mod flag {
    /// `-F` is not given (the guest refuses to record a probed name without it).
    pub const NO_FORMAT: u8 = 0;
    /// Detach: no new backing.
    pub const DETACH: u8 = 1;
    /// The new backing is the old chain's first image (qemu-img's in-chain path).
    pub const IN_CHAIN: u8 = 2;
    /// The host has checked the external data file.
    pub const DATA_FILE_CHECKED: u8 = 3;
    pub const PROGRESS: u8 = 4;
    /// `-c`: copied clusters are written compressed.
    pub const COMPRESS: u8 = 5;
}

/// The request the host would send for `case`: overlay on device 0, old backing on 1,
/// new backing on 2 (each present when its image is not empty), formats as probed.
fn rebase_request(case: &Case, formats: &[Format], unsafe_mode: bool) -> RebaseRequest {
    let present = |i: usize| case.images.get(i).is_some_and(|d| !d.is_empty());
    let detach = case.flag(flag::DETACH);
    let in_chain = !detach && case.flag(flag::IN_CHAIN) && present(1);
    let new_format = if in_chain {
        formats.get(1)
    } else {
        formats.get(2)
    };
    let format = new_format.filter(|_| !case.flag(flag::NO_FORMAT));
    let chain_image = |dev: u8| ChainImage {
        dev,
        format: formats[usize::from(dev)],
    };
    RebaseRequest {
        overlay_format: match formats[0] {
            f @ (Format::Vmdk | Format::Qed) => f,
            _ => Format::Qcow2,
        },
        unsafe_mode,
        new_backing: (!detach).then(|| NewBacking {
            name: b"new-backing.img".to_vec(),
            format: format.map(|f| f.name().as_bytes().to_vec()),
        }),
        old_chain: if present(1) && !unsafe_mode {
            vec![chain_image(1)]
        } else {
            vec![]
        },
        new_chain: if !detach && !in_chain && present(2) && !unsafe_mode {
            vec![chain_image(2)]
        } else {
            vec![]
        },
        in_chain: (in_chain && !unsafe_mode).then_some(0),
        data_file_checked: case.flag(flag::DATA_FILE_CHECKED),
        progress: case.flag(flag::PROGRESS),
        compress: case.flag(flag::COMPRESS) && !unsafe_mode,
        keys: Vec::new(),
        // The harness compresses with `FuzzCompressor`, whatever the release; the
        // end-to-end campaign runs the guest's two zstd releases.
        zstd: Default::default(),
    }
}

/// The rebase request through `instar_rebase::handle`. Invariants: backing devices are
/// never written; an error leaves the overlay untouched; a success leaves an overlay
/// that opens and whose content is what it was (safe mode: over the new chain as it
/// was over the old one; unsafe mode: its own data).
fn rebase(data: &[u8], unsafe_mode: bool) -> Result<u64, String> {
    let mut case = Case::decode(data);
    if case.images.is_empty() {
        return Ok(0);
    }
    case.images.resize(3, Vec::new());
    let formats: Vec<Format> = case.images.iter().map(|i| probed(i)).collect();
    let req = rebase_request(&case, &formats, unsafe_mode);
    let opened = opens(&case.images[0], formats[0]);
    let before = content_before(&case, &formats, &req);
    let mut devs: Vec<FuzzDev> = case
        .images
        .iter()
        .enumerate()
        .map(|(i, d)| FuzzDev::new(d.clone(), i > 0))
        .collect();
    let (resp, write_end) = call_phased(&mut devs, Request::Rebase(req.clone()));
    if devs[1..].iter().any(|d| d.write_attempts > 0) {
        return Err(String::from("a backing device was written"));
    }
    writes_within(&devs[0], write_end)?;
    let capped = devs.iter().any(|d| d.capped);
    let strict = match &resp {
        Response::Error(_) if capped => Ok(()),
        Response::Error(e) => {
            if !devs[0].writes.is_empty() || devs[0].data != case.images[0] {
                Err(format!(
                    "the overlay changed although the rebase failed: {}",
                    e.message
                ))
            } else {
                Ok(())
            }
        }
        Response::Rebase(_) => check_after(&mut devs, &formats, &req, opened, before),
        other => return Err(format!("unexpected response {other:?}")),
    };
    match strict {
        // An overlay whose metadata lies is held to these only with INSTAR_FUZZ_STRICT.
        Err(e) if strict_for(&case.images[0], formats[0]) => Err(e),
        _ => Ok(response_sig(u64::from(unsafe_mode), &resp)),
    }
}

/// Whether a broken strict invariant counts for this overlay (see [`consistent`]).
fn strict_for(overlay: &[u8], format: Format) -> bool {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALL.get_or_init(|| std::env::var("INSTAR_FUZZ_STRICT").as_deref() == Ok("1"))
        || format != Format::Qcow2
        || consistent(overlay)
}

/// What must be readable after a successful rebase: safe mode, the overlay over its
/// old chain; unsafe mode, the overlay's own data.
fn content_before(case: &Case, formats: &[Format], req: &RebaseRequest) -> Option<Vec<u8>> {
    let n = if req.unsafe_mode {
        1
    } else {
        1 + req.old_chain.len()
    };
    let mut devs: Vec<FuzzDev> = case.images[..n]
        .iter()
        .map(|d| FuzzDev::new(d.clone(), true))
        .collect();
    chain_content(&mut devs, &formats[..n]).ok()
}

fn check_after(
    devs: &mut [FuzzDev],
    formats: &[Format],
    req: &RebaseRequest,
    opened: bool,
    before: Option<Vec<u8>>,
) -> Result<(), String> {
    // An overlay that opened must open again as what it was.
    if opened && !opens(&devs[0].data, formats[0]) {
        return Err(String::from("the rebased overlay does not open"));
    }
    let top = FuzzDev::new(devs[0].data.clone(), true);
    let Some(before) = before else {
        return Ok(());
    };
    let mut chain = vec![top];
    let mut chain_formats = vec![formats[0]];
    if !req.unsafe_mode {
        let below: Vec<u8> = match (req.in_chain, req.new_chain.first()) {
            (Some(_), _) => vec![1],
            (None, Some(img)) => vec![img.dev],
            (None, None) => vec![],
        };
        for d in below {
            chain.push(FuzzDev::new(devs[usize::from(d)].data.clone(), true));
            chain_formats.push(formats[usize::from(d)]);
        }
    }
    match chain_content(&mut chain, &chain_formats) {
        Ok(after) if after == before => Ok(()),
        Ok(after) => {
            let at = after
                .iter()
                .zip(&before)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            Err(format!(
                "the rebase changed the overlay's content (first at {at:#x})"
            ))
        }
        Err(e) => Err(format!("the rebased overlay's chain cannot be read: {e}")),
    }
}
