//! Opening a qcow2 image with its `encrypt.*` options, as QEMU's open does with
//! `encrypt.format` and `encrypt.key-secret`: the format compared with the header's
//! method, the secret looked up, the LUKS header checked and the key unlocked (or the
//! legacy AES key taken from the passphrase). The passphrase is used here only, in the
//! guest; what leaves is the payload cipher ([`DataCrypt`]), which never prints.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use core::cell::RefCell;

use instar_abi::{GuestError, ImageInfo, ImageKey, KeySecret};
use instar_blockdev::BlockDev;
use instar_luks::{unlock, LuksError, LuksHeader, SectorCipher, HEADER_LEN};
use instar_qcow2::crypt::DataCrypt;
use instar_qcow2::{Header, OpenMode};

use crate::probe::{info_of, open_error, qcow2_info};

/// `QCOW_CRYPT_AES` and `QCOW_CRYPT_LUKS`.
const CRYPT_AES: u32 = 1;
const CRYPT_LUKS: u32 = 2;

/// A qcow2 image opened as QEMU opens it with `key` (its `encrypt.*` options, if any):
/// the header, what a probe reports, and the payload cipher of an encrypted image.
pub(crate) fn qcow2_open(
    dev: &mut dyn BlockDev,
    mode: OpenMode,
    index: u8,
    key: Option<&ImageKey>,
) -> Result<(Header, ImageInfo, Option<DataCrypt>), GuestError> {
    keyed_open(dev, mode, index, key, true)
}

/// What a probe reports of a qcow2 image opened with `key`; with `derive` false every
/// check of [`qcow2_open`] but the key derivation, which the rebase VM makes anyway (a
/// probe that derived the key too would double an encrypted rebase's cost).
pub(crate) fn qcow2_probe(
    dev: &mut dyn BlockDev,
    mode: OpenMode,
    index: u8,
    key: Option<&ImageKey>,
    derive: bool,
) -> Result<ImageInfo, GuestError> {
    keyed_open(dev, mode, index, key, derive).map(|(_, info, _)| info)
}

fn keyed_open(
    dev: &mut dyn BlockDev,
    mode: OpenMode,
    index: u8,
    key: Option<&ImageKey>,
    derive: bool,
) -> Result<(Header, ImageInfo, Option<DataCrypt>), GuestError> {
    let Some(key) = key else {
        let (h, info) = qcow2_info(dev, mode, index)?;
        return Ok((h, info, None));
    };
    let header =
        Header::read_keyed(dev, mode, true).map_err(|e| open_error(index, e.to_string()))?;
    let fail = |m: String| open_error(index, m);
    check_format(header.crypt_method, key.format.as_deref()).map_err(fail)?;
    let crypt = match header.crypt_method {
        0 => None,
        method => unlock_image(dev, &header, method, key, derive).map_err(fail)?,
    };
    let info = info_of(&header);
    Ok((header, info, crypt))
}

/// `qcow2_update_options_prepare`: `encrypt.format` against the header's method.
fn check_format(method: u32, format: Option<&[u8]>) -> Result<(), String> {
    let Some(f) = format else { return Ok(()) };
    let f = String::from_utf8_lossy(f);
    match method {
        0 => Err(format!(
            "No encryption in image header, but options specified format '{f}'"
        )),
        CRYPT_AES if f != "aes" => Err(format!(
            "Header reported 'aes' encryption format but options specify '{f}'"
        )),
        CRYPT_LUKS if f != "luks" => Err(format!(
            "Header reported 'luks' encryption format but options specify '{f}'"
        )),
        _ => Ok(()),
    }
}

/// The secret's bytes, or QEMU's error for a missing or unusable one. QEMU reads the
/// password up to its first NUL (`strlen`); a secret with a NUL is not valid UTF-8
/// already, so the whole buffer is the password.
fn passphrase(key: &ImageKey) -> Result<&[u8], String> {
    match &key.secret {
        None => Err(String::from(
            "Parameter 'encrypt.key-secret' is required for cipher",
        )),
        Some(KeySecret::Unknown(id)) => Err(format!(
            "No secret with id '{}'",
            String::from_utf8_lossy(id)
        )),
        Some(KeySecret::NotUtf8(id)) => Err(format!(
            "Data from secret {} is not valid UTF-8",
            String::from_utf8_lossy(id)
        )),
        Some(KeySecret::Data(p)) => Ok(p.expose()),
    }
}

/// The payload cipher of an encrypted image; with `derive` false, only the checks that
/// come before the LUKS key derivation (the secret, the LUKS header), and no cipher.
fn unlock_image(
    dev: &mut dyn BlockDev,
    header: &Header,
    method: u32,
    key: &ImageKey,
    derive: bool,
) -> Result<Option<DataCrypt>, String> {
    let password = passphrase(key)?;
    if method == CRYPT_AES {
        // Legacy AES: the IV comes from the guest offset.
        let cipher = SectorCipher::legacy_qcow_aes(password);
        return Ok(Some(DataCrypt::new(Rc::new(cipher), false)));
    }
    // Header::read_keyed refused a LUKS image without the extension.
    let (offset, length) = header.crypto_header.unwrap_or((0, 0));
    let dev = RefCell::new(dev);
    let read = |at: u64, buf: &mut [u8]| -> Result<(), LuksError> {
        let len = buf.len() as u64;
        if at.checked_add(len).is_none_or(|end| end > length) {
            return Err(LuksError::OutsideExtension);
        }
        dev.borrow_mut()
            .read_zero_padded(offset + at, buf)
            .map_err(LuksError::Io)
    };
    // A one-sector read is a VM exit: the watchdog then times each derivation alone.
    let tick = || {
        let mut sector = [0u8; 512];
        let _ = dev.borrow_mut().read_zero_padded(offset, &mut sector);
    };
    let mut raw = [0u8; HEADER_LEN];
    read(0, &mut raw).map_err(|e| e.to_string())?;
    let (luks, spec) = LuksHeader::parse(&raw).map_err(|e| e.to_string())?;
    if !derive {
        return Ok(None);
    }
    let master = unlock(&luks, &spec, password, read, tick).map_err(|e| e.to_string())?;
    Ok(Some(DataCrypt::new(Rc::new(master.into_cipher()), true)))
}
