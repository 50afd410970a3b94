//! The LUKS code against qcow2 images encrypted by real qemu-img: every AES
//! combination `qemu-img create` offers unlocks with the right passphrase, decrypts
//! what qemu-io wrote (IV sector = host offset / 512), and re-encrypts to the same
//! bytes; a wrong passphrase gives QEMU's error.

use std::path::Path;

use instar_luks::{unlock, LuksError, LuksHeader, HEADER_LEN};
use instar_testkit::luks::{create, crypto_builds, image_opts, qio, secret};
use instar_testkit::qemu_ref::Build;
use instar_testkit::Scratch;

const PASS: &str = "correct horse";

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The crypto header extension's (offset, length).
fn crypto_ext(f: &[u8]) -> (u64, u64) {
    let mut at = be32(f, 100) as usize;
    loop {
        let (ty, len) = (be32(f, at), be32(f, at + 4) as usize);
        assert_ne!(ty, 0, "no crypto header extension");
        if ty == 0x0537_be77 {
            return (be64(f, at + 8), be64(f, at + 16));
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// Host offset of guest cluster 0 (a plain data cluster).
fn host_of_cluster0(f: &[u8]) -> u64 {
    let l1 = be64(f, 40) as usize;
    let l2 = (be64(f, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    be64(f, l2) & 0x00ff_ffff_ffff_fe00
}

fn make(b: &Build, dir: &Scratch, opts: &str) -> std::path::PathBuf {
    let name = format!("{}{}.qcow2", b.version, opts.replace([',', '='], "_"));
    create(b, dir.path(".").as_path(), &name, "1M", PASS, opts, &[]);
    let spec = image_opts(&name, "");
    qio(
        b,
        dir.path(".").as_path(),
        &[secret("s", PASS)],
        &spec,
        &["write -P 0x5a 0 64k"],
    );
    dir.path(&name)
}

fn check(file: &Path) {
    let f = std::fs::read(file).unwrap();
    let (off, len) = crypto_ext(&f);
    let hdr: &[u8; HEADER_LEN] = f[off as usize..off as usize + HEADER_LEN]
        .try_into()
        .unwrap();
    let (header, spec) = LuksHeader::parse(hdr).unwrap();
    let read = |o: u64, buf: &mut [u8]| {
        assert!(o + buf.len() as u64 <= len);
        let s = (off + o) as usize;
        buf.copy_from_slice(&f[s..s + buf.len()]);
        Ok::<(), LuksError>(())
    };
    let wrong = unlock(&header, &spec, b"wrong", read, || {}).unwrap_err();
    assert_eq!(
        wrong.to_string(),
        "Invalid password, cannot unlock any keyslot"
    );
    let key = unlock(&header, &spec, PASS.as_bytes(), read, || {}).unwrap();
    let host = host_of_cluster0(&f);
    let stored = &f[host as usize..host as usize + 65536];
    let mut data = stored.to_vec();
    key.cipher().decrypt(host / 512, &mut data);
    assert!(
        data.iter().all(|&b| b == 0x5a),
        "{spec:?}: decrypted data differs"
    );
    key.cipher().encrypt(host / 512, &mut data);
    assert_eq!(data, stored, "{spec:?}: re-encryption differs");
}

#[test]
fn every_aes_combination_unlocks_and_decrypts() {
    let Some(builds) = crypto_builds() else {
        return;
    };
    let dir = Scratch::new("luks-unlock");
    let combos = [
        "",
        ",encrypt.cipher-alg=aes-128",
        ",encrypt.cipher-alg=aes-192",
        ",encrypt.cipher-alg=aes-128,encrypt.ivgen-alg=plain",
        ",encrypt.cipher-mode=xts,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha1",
        ",encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha224",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha384",
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
    ];
    for b in &builds {
        for opts in combos {
            check(&make(b, &dir, opts));
        }
    }
}

#[test]
fn other_ciphers_are_refused_by_name() {
    let Some(builds) = crypto_builds() else {
        return;
    };
    let dir = Scratch::new("luks-refuse");
    let file = make(&builds[0], &dir, ",encrypt.cipher-alg=twofish-256");
    let f = std::fs::read(&file).unwrap();
    let (off, _) = crypto_ext(&f);
    let hdr: &[u8; HEADER_LEN] = f[off as usize..off as usize + HEADER_LEN]
        .try_into()
        .unwrap();
    let err = LuksHeader::parse(hdr).unwrap_err();
    assert!(
        matches!(err, LuksError::Unimplemented { what: "cipher", ref name } if name == "twofish"),
        "{err}"
    );
}
