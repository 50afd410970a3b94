//! Builds and fixtures for LUKS-encrypted qcow2 images. qemu-img 10.2.2's build has no
//! crypto library ("Unsupported cipher algorithm …, no crypto library enabled in
//! build"), so encrypted fixtures and comparisons use 11.1 (the newest release) and
//! 10.0 (the machine's own), which have one.

use std::path::Path;

use crate::qemu_ref::{need, Build, NEWEST};

/// 11.1 and 10.0, the builds with a crypto library; `None` skips (panics under
/// `INSTAR_REQUIRE_QEMU=1`) unless both are found.
pub fn crypto_builds() -> Option<Vec<Build>> {
    let newest = need(NEWEST);
    let machine = need("10.0");
    Some(vec![newest?, machine?])
}

/// The `--object` argument defining secret `id` with `data`.
pub fn secret(id: &str, data: &str) -> String {
    format!("secret,id={id},data={data}")
}

/// Create a LUKS-encrypted qcow2 `file` of `size` with passphrase `pass` (secret id
/// `s`, iter-time 10 ms so tests stay fast), `extra` more `-o` options (each starting
/// with a comma) and `args` more arguments before the file (e.g. `-b`, `-F`).
pub fn create(
    b: &Build,
    dir: &Path,
    file: &str,
    size: &str,
    pass: &str,
    extra: &str,
    args: &[&str],
) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10{extra}");
    let sec = secret("s", pass);
    let mut v: Vec<&str> = vec!["create", "-q", "-f", "qcow2", "--object", &sec, "-o", &o];
    v.extend_from_slice(args);
    v.push(file);
    v.push(size);
    let out = crate::run_in(&b.img, &v, dir);
    assert_eq!(out.status, 0, "qemu-img {v:?}: {}", out.stderr);
}

/// The `--image-opts` spec of an encrypted qcow2 `file` with key secret `s`, and
/// `more` options (each starting with a comma).
pub fn image_opts(file: &str, more: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=s{more}")
}

/// qemu-io `cmds` on `spec` (an `--image-opts` string) with the `objects` defined.
pub fn qio(b: &Build, dir: &Path, objects: &[String], spec: &str, cmds: &[&str]) {
    let mut v: Vec<String> = Vec::new();
    for o in objects {
        v.push("--object".into());
        v.push(o.clone());
    }
    v.push("--image-opts".into());
    for c in cmds {
        v.push("-c".into());
        v.push((*c).into());
    }
    v.push(spec.into());
    let out = crate::run_in(&b.io, &v, dir);
    assert!(
        out.status == 0 && !out.stdout.contains("failed") && !out.stderr.contains("rror"),
        "qemu-io {v:?}: {}{}",
        out.stdout,
        out.stderr
    );
}
