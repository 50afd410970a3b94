//! `qemu-img rebase -u`: only the backing pointer changes. For qcow2 that is one
//! full-cluster write of the rebuilt cluster 0, made only after every check passed.

use alloc::string::{String, ToString};
use instar_abi::{ErrorKind, Format, GuestError, RebaseOutcome, RebaseRequest};
use instar_blockdev::BlockDev;
use instar_chain::probe::check_format;
use instar_qcow2::bitmaps::BitmapSet;
use instar_qcow2::overlap::Structure;
use instar_qcow2::{ChangeBackingError, Header, OpenMode};

use crate::keyed_open::qcow2_open;
use crate::probe::open_error;
use crate::{device, Hooks, IO_ERROR, OVERLAY};
use instar_qcow2::crypt::DataCrypt;

pub(crate) fn change_error(message: &str) -> GuestError {
    GuestError {
        kind: ErrorKind::ChangeBacking,
        message: String::from(message),
    }
}

/// qemu-img's mapping of the errno from `bdrv_change_backing_file`: `EINVAL` with a
/// name but no format reads "backing format must be specified".
pub(crate) fn map_change_error(err: ChangeBackingError, has_format: bool) -> GuestError {
    match err {
        ChangeBackingError::NoSpace => change_error("No space left in the file header"),
        ChangeBackingError::NameTooLong | ChangeBackingError::DataFileRaw if !has_format => {
            change_error("backing format must be specified")
        }
        ChangeBackingError::NameTooLong | ChangeBackingError::DataFileRaw => {
            change_error("Invalid argument")
        }
    }
}

/// Refuse images whose read-write open by QEMU instar does not reproduce.
fn check_rewritable(header: &Header) -> Result<(), GuestError> {
    crate::bitmap_rebase::check_supported(header)?;
    if header.dirty() {
        return Err(open_error(
            OVERLAY,
            String::from(
                "instar does not rebase images with the dirty bit set (QEMU would repair them on open); \
                 run 'qemu-img check -r all' on the image first",
            ),
        ));
    }
    Ok(())
}

/// The overlay opened for a backing-file change.
pub(crate) struct ForChange {
    /// The header as opened (QEMU's open rewrites it in this state).
    pub old: Header,
    /// The header pointing at the new backing.
    pub header: Header,
    /// Cluster 0 rebuilt from `header`.
    pub cluster: alloc::vec::Vec<u8>,
    /// The persistent bitmaps, as QEMU's open loads them.
    pub bitmaps: Option<BitmapSet>,
    /// An encrypted overlay's unlocked payload cipher (QEMU's open unlocks the key even
    /// for `-u`, so a wrong passphrase fails it).
    pub crypt: Option<DataCrypt>,
}

/// Open the qcow2 overlay as QEMU's read-write open does (its key unlocked, its
/// bitmaps loaded), point its header at `name` (`None` detaches) and rebuild cluster 0:
/// every refusal of a backing-file change, before anything is written.
pub(crate) fn open_for_change(
    dev: &mut dyn BlockDev,
    req: &RebaseRequest,
    name: Option<&[u8]>,
    format: Option<&[u8]>,
) -> Result<ForChange, GuestError> {
    let key = req.keys.iter().find(|k| k.dev == OVERLAY);
    let (mut header, _, crypt) = qcow2_open(dev, OpenMode::ReadWrite, OVERLAY, key)?;
    check_rewritable(&header)?;
    let bitmaps = crate::bitmap_rebase::load(dev, &header)?;
    let old = header.clone();
    if header.has_data_file() && !req.data_file_checked {
        return Err(GuestError {
            kind: ErrorKind::Plain,
            message: String::from("the overlay's external data file was not checked by the host"),
        });
    }
    if name.is_some() && format.is_none() {
        return Err(change_error("backing format must be specified"));
    }
    header
        .change_backing(name, format)
        .map_err(|e| map_change_error(e, format.is_some()))?;
    let cluster = header
        .rebuild()
        .map_err(|e| map_change_error(e, format.is_some()))?;
    Ok(ForChange {
        old,
        header,
        cluster,
        bitmaps,
        crypt,
    })
}

/// The header rewrite replaces all of cluster 0. QEMU's open accepts a table at the
/// aligned offset 0, and its rewrite then changes the table (the image may no longer
/// open, or read otherwise). A table the header names inside cluster 0 whose bytes the
/// rewrite would change is refused instead, before any write; one the rewrite leaves
/// as it was is harmless, as in QEMU.
fn cluster0_rewrite_keeps_tables(
    dev: &mut dyn BlockDev,
    h: &Header,
    new: &[u8],
) -> Result<(), GuestError> {
    let cs = h.cluster_size();
    let l1_len = u64::from(h.l1_size).saturating_mul(8);
    let rt_len = u64::from(h.refcount_table_clusters).saturating_mul(cs);
    // A snapshot table's length depends on its entries: all of cluster 0 counts.
    let tables = [
        (
            h.l1_size > 0,
            h.l1_table_offset,
            l1_len,
            Structure::ActiveL1.qemu_name(),
        ),
        (
            true,
            h.refcount_table_offset,
            rt_len,
            Structure::RefcountTable.qemu_name(),
        ),
        (
            h.nb_snapshots > 0,
            h.snapshots_offset,
            cs,
            Structure::SnapshotTable.qemu_name(),
        ),
    ];
    let crypto = h.crypto_header.map(|(o, l)| (true, o, l, "crypto header"));
    let in_cluster0: alloc::vec::Vec<_> = tables
        .into_iter()
        .chain(crypto)
        .filter(|&(present, offset, _, _)| present && offset < cs)
        .collect();
    if in_cluster0.is_empty() {
        return Ok(());
    }
    let mut old = alloc::vec![0u8; new.len()];
    let n = dev.size().min(new.len() as u64) as usize;
    dev.read_at(0, &mut old[..n])
        .map_err(|_| change_error(IO_ERROR))?;
    for (_, offset, len, what) in in_cluster0 {
        let end = offset.saturating_add(len).min(new.len() as u64) as usize;
        let range = offset as usize..end.max(offset as usize);
        if old.get(range.clone()) != new.get(range) {
            return Err(crate::plain(alloc::format!(
                "Preventing invalid write on metadata (overlaps with qcow2_header): the {what} \
                 at {offset:#x} lies in cluster 0, and the header rewrite would change it; \
                 nothing was written"
            )));
        }
    }
    Ok(())
}

pub(crate) fn rebase(
    req: &RebaseRequest,
    devs: &mut [&mut dyn BlockDev],
    hooks: &mut dyn Hooks,
) -> Result<RebaseOutcome, GuestError> {
    let dev = device(devs, OVERLAY)?;
    // `-b ""` detaches like no `-b` at all.
    let backing = req.new_backing.as_ref().filter(|b| !b.name.is_empty());
    let name = backing.map(|b| b.name.as_slice());
    let format = backing.and_then(|b| b.format.as_deref());

    if req.overlay_format != Format::Qcow2 {
        check_format(dev, req.overlay_format, true)
            .map_err(|e| open_error(OVERLAY, e.to_string()))?;
        return Err(match req.overlay_format {
            // qemu-img 10.x asks for the driver info first, which parallels lacks.
            Format::Parallels => GuestError {
                kind: ErrorKind::Plain,
                message: String::from("could not get block driver info"),
            },
            _ if name.is_some() && format.is_none() => {
                change_error("backing format must be specified")
            }
            _ => change_error("Operation not supported"),
        });
    }

    let opened = open_for_change(dev, req, name, format)?;
    if opened.bitmaps.as_ref().is_some_and(BitmapSet::needs_store) {
        return crate::bitmap_rebase::unsafe_rebase(dev, opened, hooks);
    }
    let (opened_old, header, cluster) = (opened.old, opened.header, opened.cluster);
    cluster0_rewrite_keeps_tables(dev, &header, &cluster)?;

    hooks.write_phase(crate::write_end::header_end(
        dev.size(),
        cluster.len() as u64,
    ));
    dev.write_at(0, &cluster)
        .map_err(|_| change_error(IO_ERROR))?;
    dev.flush().map_err(|_| change_error(IO_ERROR))?;
    Ok(RebaseOutcome {
        repair_lines: crate::bitmap_rebase::open_lines(&opened_old),
        ..RebaseOutcome::default()
    })
}
