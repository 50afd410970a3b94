//! LUKS-encrypted qcow2 (and legacy AES) against qemu-img 11.1.3 and 10.0.2, the
//! reference builds with a crypto library (10.2.2's has none): `--object secret` and
//! `--image-opts`, safe and unsafe rebases over encrypted overlays and encrypted old
//! backings, byte for byte and word for word, then `qemu-img check` and `compare` with
//! the secrets; every refusal with QEMU's message, exit 1 and no file changed; and no
//! trace of the passphrase in anything instar prints.
//!
//! Each scenario builds one fixture per qemu-img build (with that build), copies it
//! twice, runs qemu-img on one copy and instar on the other, and compares.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use instar_testkit::luks::{create, crypto_builds, image_opts, qio, secret};
use instar_testkit::qemu_ref::Build;
use instar_testkit::{copy_tree, require_kvm, run_in, Outcome, Scratch};

const PASS: &str = "pw-Luks-7f3a";

fn instar() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_instar"))
}

/// Both sides, or `None` to skip.
fn setup() -> Option<Vec<Build>> {
    let builds = crypto_builds()?;
    require_kvm().then_some(builds)
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            m.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    m
}

/// `args` with `FILE` replaced: the arguments both tools get.
fn argv(args: &[&str]) -> Vec<String> {
    let mut v = vec!["rebase".to_string()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// Run qemu-img and instar on two copies of `fixture` with `args`; compare exit
/// status, stderr (prefix mapped) and every file. Returns the two directories.
fn compare(b: &Build, fixture: &Path, name: &str, args: &[&str]) -> (Scratch, Scratch, Outcome) {
    let q = Scratch::new(&format!("luks-q-{name}"));
    let i = Scratch::new(&format!("luks-i-{name}"));
    copy_tree(fixture, &q.0);
    copy_tree(fixture, &i.0);
    let a = argv(args);
    let qo = run_in(&b.img, &a, &q.0);
    let io = run_in(&instar(), &a, &i.0);
    let who = format!("{name} against {} ({a:?})", b.version);
    let qerr = qo.stderr.replace("qemu-img: ", "instar: ");
    assert_eq!(
        io.status, qo.status,
        "{who}: exit status; qemu-img: {}; instar: {}",
        qo.stderr, io.stderr
    );
    assert_eq!(
        io.stderr.trim_end(),
        qerr.trim_end(),
        "{who}: stderr differs"
    );
    let (qs, is) = (snapshot(&q.0), snapshot(&i.0));
    assert_eq!(
        qs.keys().collect::<Vec<_>>(),
        is.keys().collect::<Vec<_>>(),
        "{who}: files"
    );
    for (f, bytes) in &qs {
        assert!(
            bytes == &is[f],
            "{who}: {f} differs (see {} and {})",
            q.0.display(),
            i.0.display()
        );
    }
    if qo.status != 0 {
        assert_eq!(snapshot(fixture), is, "{who}: a refusal changed a file");
    }
    (q, i, io)
}

/// `qemu-img check` of `spec` (image opts) must be clean.
fn check(b: &Build, dir: &Path, objects: &[String], spec: &str) {
    let mut a: Vec<String> = vec!["check".into()];
    for o in objects {
        a.extend(["--object".into(), o.clone()]);
    }
    a.extend(["--image-opts".into(), spec.into()]);
    let out = run_in(&b.img, &a, dir);
    assert!(
        out.status == 0 && out.stdout.contains("No errors"),
        "check {spec}: {}{}",
        out.stdout,
        out.stderr
    );
}

/// `qemu-img compare` of two image-opts specs must report identical content.
fn same_content(b: &Build, dir: &Path, objects: &[String], a_spec: &str, b_spec: &str) {
    let mut a: Vec<String> = vec!["compare".into()];
    for o in objects {
        a.extend(["--object".into(), o.clone()]);
    }
    a.extend(["--image-opts".into(), a_spec.into(), b_spec.into()]);
    let out = run_in(&b.img, &a, dir);
    assert_eq!(
        out.status, 0,
        "compare {a_spec} {b_spec}: {}{}",
        out.stdout, out.stderr
    );
}

/// Plain backings: `b1.qcow2` (0x11 over 0..2M), `b2.qcow2` (0x22 over 1M..3M).
fn plain_backings(b: &Build, dir: &Path, size: &str) {
    for (n, cmd) in [
        ("b1.qcow2", "write -P 0x11 0 2M"),
        ("b2.qcow2", "write -P 0x22 1M 2M"),
    ] {
        let out = run_in(&b.img, &["create", "-q", "-f", "qcow2", n, size], dir);
        assert_eq!(out.status, 0, "{}", out.stderr);
        let out = run_in(&b.io, &["-f", "qcow2", "-c", cmd, n], dir);
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
}

/// An encrypted overlay `ov.qcow2` over `b1.qcow2` with `extra` creation options and a
/// 64 KiB write at 512 KiB (and one at 2M+4k) through the secret.
fn encrypted_overlay(b: &Build, dir: &Path, size: &str, extra: &str) {
    plain_backings(b, dir, size);
    create(
        b,
        dir,
        "ov.qcow2",
        size,
        PASS,
        extra,
        &["-b", "b1.qcow2", "-F", "qcow2"],
    );
    let spec = image_opts("ov.qcow2", "");
    qio(
        b,
        dir,
        &[secret("s", PASS)],
        &spec,
        &["write -P 0x33 512k 64k", "write -P 0x44 2052k 8k"],
    );
}

fn fixture(b: &Build, name: &str, make: impl FnOnce(&Build, &Path)) -> Scratch {
    let fx = Scratch::new(&format!("luks-fx-{name}-{}", b.version));
    make(b, &fx.0);
    fx
}

fn opts(extra: &str) -> String {
    image_opts("ov.qcow2", extra)
}

/// A safe rebase over `fixture` onto absolute `b2.qcow2`, then check and compare.
fn safe_onto_b2(b: &Build, fx: &Scratch, name: &str, spec: &str, objects: &[String]) {
    let target = fx.path("b2.qcow2");
    let target = target.to_str().unwrap().to_string();
    let mut args: Vec<&str> = Vec::new();
    for o in objects {
        args.extend(["--object", o]);
    }
    args.extend(["--image-opts", "-b", &target, "-F", "qcow2", spec]);
    let (_, i, out) = compare(b, &fx.0, name, &args);
    assert_eq!(out.status, 0, "{name}: {}", out.stderr);
    check(b, &i.0, objects, spec);
    // The content is what it was before, read through the old chain.
    let before = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s",
        fx.path("ov.qcow2").display()
    );
    let before = if spec.contains("backing.encrypt") {
        format!("{before},backing.encrypt.key-secret=s")
    } else {
        before
    };
    same_content(b, &i.0, objects, spec, &before);
}

#[test]
fn safe_rebase_of_encrypted_overlays() {
    let Some(builds) = setup() else { return };
    let variants = [
        ("default", "4M", ""),
        ("cbc-essiv-aes128-c4k", "4M", ",cluster_size=4096,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"),
        ("xts-plain-aes192-sha1", "4M", ",encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1"),
        ("odd-size-c512", "3147264", ",cluster_size=512"),
        ("extended-l2", "4M", ",extended_l2=on,cluster_size=32768"),
    ];
    for b in &builds {
        for (name, size, extra) in variants {
            let fx = fixture(b, name, |b, d| encrypted_overlay(b, d, size, extra));
            safe_onto_b2(b, &fx, name, &opts(""), &[secret("s", PASS)]);
        }
    }
}

#[test]
fn unsafe_rebase_and_detach() {
    let Some(builds) = setup() else { return };
    for b in &builds {
        let fx = fixture(b, "unsafe", |b, d| encrypted_overlay(b, d, "4M", ""));
        let obj = secret("s", PASS);
        let spec = opts("");
        for (name, args) in [
            (
                "u-rel",
                vec![
                    "--object",
                    &obj,
                    "--image-opts",
                    "-u",
                    "-b",
                    "b2.qcow2",
                    "-F",
                    "qcow2",
                    &spec,
                ],
            ),
            (
                "u-detach",
                vec!["--object", &obj, "--image-opts", "-u", "-b", "", &spec],
            ),
            (
                "safe-detach",
                vec!["--object", &obj, "--image-opts", "-b", "", &spec],
            ),
        ] {
            let (_, i, out) = compare(b, &fx.0, name, &args);
            assert_eq!(out.status, 0, "{name}: {}", out.stderr);
            check(b, &i.0, std::slice::from_ref(&obj), &spec);
        }
    }
}

/// Encrypted overlay over an encrypted old backing (its own passphrase, given as
/// `backing.encrypt.key-secret`), over a plain image.
fn encrypted_chain(b: &Build, dir: &Path) {
    plain_backings(b, dir, "4M");
    create(
        b,
        dir,
        "mid.qcow2",
        "4M",
        "other",
        "",
        &["-b", "b1.qcow2", "-F", "qcow2"],
    );
    qio(
        b,
        dir,
        &[secret("s", "other")],
        &image_opts("mid.qcow2", ""),
        &["write -P 0x55 1536k 1M"],
    );
    create(
        b,
        dir,
        "ov.qcow2",
        "4M",
        PASS,
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    let spec = format!(
        "{},backing.encrypt.key-secret=m",
        image_opts("ov.qcow2", "")
    );
    qio(
        b,
        dir,
        &[secret("s", PASS), secret("m", "other")],
        &spec,
        &["write -P 0x66 3M 64k"],
    );
}

#[test]
fn encrypted_old_backing() {
    let Some(builds) = setup() else { return };
    for b in &builds {
        let fx = fixture(b, "chain", encrypted_chain);
        let objects = [secret("s", PASS), secret("m", "other")];
        let spec = opts(",backing.encrypt.key-secret=m");
        let target = fx.path("b2.qcow2").to_str().unwrap().to_string();
        let mut args: Vec<&str> = Vec::new();
        for o in &objects {
            args.extend(["--object", o]);
        }
        let tail = ["--image-opts", "-b", &target, "-F", "qcow2", &spec];
        let (_, i, out) = compare(b, &fx.0, "enc-old", &[&args[..], &tail].concat());
        assert_eq!(out.status, 0, "{}", out.stderr);
        check(b, &i.0, &objects, &opts(""));
        // Onto the encrypted image below, which is in the old chain: the options make
        // the overlay's name json:{…}, so QEMU's in-chain search cannot resolve the
        // chain's relative names, opens -b anew without a secret, and fails.
        let mid = fx.path("mid.qcow2").to_str().unwrap().to_string();
        let tail = ["--image-opts", "-b", &mid, "-F", "qcow2", &spec];
        let (_, _, out) = compare(b, &fx.0, "enc-in-chain", &[&args[..], &tail].concat());
        assert!(
            out.stderr.contains("Could not open new backing file"),
            "{}",
            out.stderr
        );
        // Refusals: the backing's secret missing, wrong, relative -b under options.
        let bad = [secret("s", PASS), secret("m", "wrong")];
        let mut bargs: Vec<&str> = Vec::new();
        for o in &bad {
            bargs.extend(["--object", o]);
        }
        let plain_spec = opts("");
        let cases: Vec<Vec<&str>> = vec![
            [
                &args[..],
                &["--image-opts", "-b", &target, "-F", "qcow2", &plain_spec][..],
            ]
            .concat(),
            [&bargs[..], &tail[..]].concat(),
            [
                &args[..],
                &["--image-opts", "-b", "b2.qcow2", "-F", "qcow2", &spec][..],
            ]
            .concat(),
        ];
        for (k, c) in cases.iter().enumerate() {
            let (_, _, out) = compare(b, &fx.0, &format!("enc-old-refused-{k}"), c);
            assert_eq!(out.status, 1);
        }
    }
}

/// A plain overlay over an encrypted backing, rebased onto that same backing with its
/// secret given as `backing.encrypt.key-secret`: the option overrides the overlay's
/// backing link, so QEMU's in-chain search compares `-b` only with the backing's
/// `json:{…}` name, opens `-b` anew without a secret and fails. instar must not reuse
/// the old chain's unlocked image (found by scripts/diff_random.py, seed 7032).
#[test]
fn plain_overlay_onto_its_encrypted_backing() {
    let Some(builds) = setup() else { return };
    for b in &builds {
        let fx = fixture(b, "plain-over-enc", |b, d| {
            create(b, d, "eb.qcow2", "4M", PASS, "", &[]);
            let spec = image_opts("eb.qcow2", "");
            qio(b, d, &[secret("s", PASS)], &spec, &["write -P 0x21 0 1M"]);
            let a = [
                "create", "-q", "-f", "qcow2", "-b", "eb.qcow2", "-F", "qcow2",
            ];
            let out = run_in(&b.img, &[&a[..], &["pt.qcow2", "4M"]].concat(), d);
            assert_eq!(out.status, 0, "{}", out.stderr);
        });
        let sec = secret("s", PASS);
        let eb = fx.path("eb.qcow2").to_str().unwrap().to_string();
        let spec = "driver=qcow2,file.filename=pt.qcow2,backing.encrypt.key-secret=s";
        for mode in [&[][..], &["-c"][..]] {
            let args = [
                "--object",
                &sec,
                "--image-opts",
                "-b",
                &eb,
                "-F",
                "qcow2",
                spec,
            ];
            let (_, _, out) = compare(b, &fx.0, "plain-onto-enc", &[mode, &args[..]].concat());
            assert_eq!(out.status, 1, "{}", out.stderr);
            assert!(
                out.stderr.contains("Could not open new backing file")
                    && out
                        .stderr
                        .contains("'encrypt.key-secret' is required for cipher"),
                "{}",
                out.stderr
            );
        }
    }
}

#[test]
fn refusals_match_qemu() {
    let Some(builds) = setup() else { return };
    for b in &builds {
        let fx = fixture(b, "refuse", |b, d| {
            encrypted_overlay(b, d, "4M", "");
            create(b, d, "encb.qcow2", "4M", "nb", "", &[]);
            let out = run_in(&b.img, &["create", "-q", "-f", "qed", "q.qed", "1M"], d);
            assert_eq!(out.status, 0, "{}", out.stderr);
        });
        let good = secret("s", PASS);
        let wrong = secret("s", "not-it");
        let encb = fx.path("encb.qcow2").to_str().unwrap().to_string();
        let missing = fx.path("missing.qcow2").to_str().unwrap().to_string();
        let spec = opts("");
        let with_backing_key = opts(",backing.encrypt.key-secret=s");
        let beyond_chain = opts(",backing.backing.encrypt.format=luks");
        let cases: Vec<(&str, Vec<&str>)> = vec![
            (
                "wrong-pass-safe",
                vec!["--object", &wrong, "--image-opts", "-b", "", &spec],
            ),
            (
                "wrong-pass-unsafe",
                vec![
                    "--object",
                    &wrong,
                    "--image-opts",
                    "-u",
                    "-b",
                    "x",
                    "-F",
                    "qcow2",
                    &spec,
                ],
            ),
            // The probe does not derive the key; a later failure must still come
            // second to the wrong passphrase, as in QEMU's open.
            (
                "wrong-pass-missing-backing",
                vec![
                    "--object",
                    &wrong,
                    "--image-opts",
                    "-b",
                    &missing,
                    "-F",
                    "qcow2",
                    &spec,
                ],
            ),
            (
                "wrong-pass-compress-onto-encrypted",
                vec![
                    "--object",
                    &wrong,
                    "--image-opts",
                    "-c",
                    "-b",
                    &encb,
                    "-F",
                    "qcow2",
                    &spec,
                ],
            ),
            (
                "no-secret",
                vec!["-u", "-b", "x", "-F", "qcow2", "ov.qcow2"],
            ),
            (
                "no-key-secret",
                vec![
                    "--object",
                    &good,
                    "--image-opts",
                    "-b",
                    "",
                    "driver=qcow2,file.filename=ov.qcow2",
                ],
            ),
            (
                "unknown-id",
                vec![
                    "--object",
                    &good,
                    "--image-opts",
                    "-b",
                    "",
                    "driver=qcow2,file.filename=ov.qcow2,encrypt.key-secret=t",
                ],
            ),
            (
                "format-mismatch",
                vec![
                    "--object",
                    &good,
                    "--image-opts",
                    "-b",
                    "",
                    "driver=qcow2,file.filename=ov.qcow2,encrypt.key-secret=s,encrypt.format=aes",
                ],
            ),
            (
                "format-on-plain",
                vec![
                    "--image-opts",
                    "-b",
                    "",
                    "driver=qcow2,file.filename=b1.qcow2,encrypt.format=luks",
                ],
            ),
            (
                "encrypted-new-backing",
                vec![
                    "--object",
                    &good,
                    "--image-opts",
                    "-b",
                    &encb,
                    "-F",
                    "qcow2",
                    &spec,
                ],
            ),
            (
                "missing-file",
                vec!["--image-opts", "-b", "", "driver=qcow2"],
            ),
            (
                "object-no-id",
                vec!["--object", "secret,data=x", "-b", "", "ov.qcow2"],
            ),
            (
                "object-no-data",
                vec!["--object", "secret,id=s", "-b", "", "ov.qcow2"],
            ),
            (
                "object-both",
                vec![
                    "--object",
                    "secret,id=s,data=x,file=y",
                    "-b",
                    "",
                    "ov.qcow2",
                ],
            ),
            (
                "object-bad-format",
                vec![
                    "--object",
                    "secret,id=s,data=x,format=hex",
                    "-b",
                    "",
                    "ov.qcow2",
                ],
            ),
            (
                "object-bad-base64",
                vec![
                    "--object",
                    "secret,id=s,data=a b,format=base64",
                    "-b",
                    "",
                    "ov.qcow2",
                ],
            ),
            (
                "object-dup",
                vec!["--object", &good, "--object", &good, "-b", "", "ov.qcow2"],
            ),
            (
                "object-unexpected",
                vec![
                    "--object",
                    "secret,id=s,data=x,bogus=1",
                    "-b",
                    "",
                    "ov.qcow2",
                ],
            ),
            (
                "image-opts-and-f",
                vec!["--image-opts", "-f", "qcow2", "-b", "", &spec],
            ),
            (
                "secret-not-utf8",
                vec![
                    "--object",
                    "secret,id=s,data=/w==,format=base64",
                    "--image-opts",
                    "-b",
                    "",
                    &spec,
                ],
            ),
            (
                "secret-nul",
                vec![
                    "--object",
                    "secret,id=s,data=AA==,format=base64",
                    "--image-opts",
                    "-b",
                    "",
                    &spec,
                ],
            ),
            (
                "unsafe-backing-opts",
                vec![
                    "--object",
                    &good,
                    "--image-opts",
                    "-u",
                    "-b",
                    "x",
                    "-F",
                    "qcow2",
                    &with_backing_key,
                ],
            ),
            (
                "beyond-chain",
                vec!["--object", &good, "--image-opts", "-b", "", &beyond_chain],
            ),
            (
                "qed-encrypt-opts",
                vec![
                    "--image-opts",
                    "-b",
                    "",
                    "file.filename=q.qed,encrypt.format=luks,encrypt.key-secret=s",
                ],
            ),
        ];
        for (name, args) in cases {
            let (_, _, out) = compare(b, &fx.0, name, &args);
            assert_eq!(out.status, 1, "{name}");
        }
        // Options for a plain backing are consumed by its open: no error.
        let (_, _, out) = compare(
            b,
            &fx.0,
            "plain-backing-opts",
            &[
                "--object",
                &good,
                "--image-opts",
                "-b",
                "",
                &with_backing_key,
            ],
        );
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
}

#[test]
fn secret_from_file_and_base64() {
    let Some(builds) = setup() else { return };
    for b in &builds {
        let fx = fixture(b, "secretsrc", |b, d| {
            encrypted_overlay(b, d, "4M", "");
            std::fs::write(d.join("pass.txt"), PASS).unwrap();
            std::fs::write(d.join("pass-nl.txt"), format!("{PASS}\n")).unwrap();
        });
        let b64 = format!("secret,id=s,format=base64,data={}", base64(PASS.as_bytes()));
        let file = format!("secret,id=s,file={}", fx.path("pass.txt").display());
        // QEMU keeps a file's trailing newline: the passphrase is then wrong.
        let file_nl = format!("secret,id=s,file={}", fx.path("pass-nl.txt").display());
        let missing = "secret,id=s,file=/nonexistent-secret-file".to_string();
        for (name, obj, ok) in [
            ("base64", &b64, true),
            ("file", &file, true),
            ("file-nl", &file_nl, false),
            ("file-missing", &missing, false),
        ] {
            let (_, _, out) = compare(
                b,
                &fx.0,
                name,
                &["--object", obj, "--image-opts", "-b", "", &opts("")],
            );
            assert_eq!(out.status == 0, ok, "{name}: {}", out.stderr);
        }
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let v = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[((v >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn legacy_aes_overlay() {
    let Some(builds) = setup() else { return };
    for b in &builds {
        let fx = fixture(b, "aes", |b, d| {
            plain_backings(b, d, "4M");
            let o = "encrypt.format=aes,encrypt.key-secret=s";
            let sec = secret("s", PASS);
            let out = run_in(
                &b.img,
                &[
                    "create", "-q", "-f", "qcow2", "--object", &sec, "-o", o, "-b", "b1.qcow2",
                    "-F", "qcow2", "ov.qcow2", "4M",
                ],
                d,
            );
            assert_eq!(out.status, 0, "{}", out.stderr);
            qio(
                b,
                d,
                &[sec],
                &image_opts("ov.qcow2", ""),
                &["write -P 0x33 512k 64k"],
            );
        });
        safe_onto_b2(b, &fx, "aes", &opts(""), &[secret("s", PASS)]);
    }
}

/// The passphrase appears in nothing instar prints: success (human and JSON), a wrong
/// passphrase, a refused option, and a sandbox failure forced by a corrupted header.
#[test]
fn passphrase_never_printed() {
    let Some(builds) = setup() else { return };
    let b = &builds[0];
    let distinctive = "Zq9-UNIQUE-pass-4471";
    let fx = fixture(b, "leak", |b, d| {
        plain_backings(b, d, "4M");
        create(
            b,
            d,
            "ov.qcow2",
            "4M",
            distinctive,
            "",
            &["-b", "b1.qcow2", "-F", "qcow2"],
        );
    });
    let good = secret("s", distinctive);
    let wrong = secret("s", &format!("{distinctive}-wrong"));
    let spec = opts("");
    let target = fx.path("b2.qcow2").to_str().unwrap().to_string();
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "--object",
            &good,
            "--image-opts",
            "-b",
            &target,
            "-F",
            "qcow2",
            &spec,
        ],
        vec![
            "--object",
            &good,
            "--image-opts",
            "--output",
            "json",
            "-u",
            "-b",
            "b2.qcow2",
            "-F",
            "qcow2",
            &spec,
        ],
        vec![
            "--object",
            &wrong,
            "--image-opts",
            "--output",
            "json",
            "-b",
            "",
            &spec,
        ],
        vec![
            "--object",
            &good,
            "--image-opts",
            "-b",
            "",
            "driver=qcow2,file.filename=ov.qcow2,encrypt.key-secret=s,cache.direct=on",
        ],
        vec!["--object", &good, "--object", &good, "-b", "", "ov.qcow2"],
        vec![
            "--object",
            &good,
            "--image-opts",
            "-b",
            "",
            "-p",
            "driver=qcow2,file.filename=ov.qcow2,encrypt.key-secret=s,encrypt.format=luks",
        ],
    ];
    let dir = Scratch::new("luks-leak");
    copy_tree(&fx.0, &dir.0);
    for a in &runs {
        let out = run_in(&instar(), &argv(a), &dir.0);
        for text in [&out.stdout, &out.stderr] {
            assert!(
                !text.contains(distinctive),
                "{a:?} printed the passphrase: {text}"
            );
        }
    }
    // A header whose LUKS magic is broken: the guest's error must not carry it either.
    let f = dir.path("ov.qcow2");
    let mut bytes = std::fs::read(&f).unwrap();
    let crypto_at = find_crypto_header(&bytes);
    bytes[crypto_at] ^= 0xff;
    std::fs::write(&f, &bytes).unwrap();
    let out = run_in(&instar(), &argv(&runs[0]), &dir.0);
    assert_eq!(out.status, 1);
    assert!(
        out.stderr.contains("Volume is not in LUKS format"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(distinctive) && !out.stdout.contains(distinctive));
}

/// Offset of the LUKS header named by the crypto header extension.
fn find_crypto_header(f: &[u8]) -> usize {
    let be32 = |at: usize| u32::from_be_bytes(f[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize;
    while be32(at) != 0x0537_be77 {
        assert_ne!(be32(at), 0, "no crypto extension");
        at += 8 + (be32(at + 4) as usize).div_ceil(8) * 8;
    }
    u64::from_be_bytes(f[at + 8..at + 16].try_into().unwrap()) as usize
}

/// The overlap proof knows the LUKS header: an overlay whose refcounts call one of its
/// clusters free (so QEMU's allocator would take it and overwrite key material) is
/// refused before anything is written.
#[test]
fn luks_header_clusters_are_metadata() {
    let Some(builds) = setup() else { return };
    let b = &builds[0];
    // No data in the overlay yet: its first L2 table is a one-cluster allocation, which
    // first fit places in the freed cluster.
    let fx = fixture(b, "overlap", |b, d| {
        plain_backings(b, d, "4M");
        create(
            b,
            d,
            "ov.qcow2",
            "4M",
            PASS,
            "",
            &["-b", "b1.qcow2", "-F", "qcow2"],
        );
    });
    let f = fx.path("ov.qcow2");
    let mut bytes = std::fs::read(&f).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cluster = 65536usize;
    let luks = find_crypto_header(&bytes);
    let refblock = be64(&bytes, be64(&bytes, 48) as usize) as usize;
    // A cluster of key material, its 16-bit refcount set to 0.
    let victim = luks / cluster + 3;
    bytes[refblock + 2 * victim..refblock + 2 * victim + 2].copy_from_slice(&[0, 0]);
    std::fs::write(&f, &bytes).unwrap();
    let dir = Scratch::new("luks-overlap");
    copy_tree(&fx.0, &dir.0);
    let before = snapshot(&dir.0);
    let target = dir.path("b2.qcow2").to_str().unwrap().to_string();
    let sec = secret("s", PASS);
    let out = run_in(
        &instar(),
        &argv(&[
            "--object",
            &sec,
            "--image-opts",
            "-b",
            &target,
            "-F",
            "qcow2",
            &opts(""),
        ]),
        &dir.0,
    );
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("Preventing invalid write on metadata (overlaps with encryption header)"),
        "{}",
        out.stderr
    );
    assert!(
        snapshot(&dir.0) == before,
        "a refused rebase changed a file"
    );
}

/// Crafted encryption headers: QEMU's message for each, word for word, nothing written.
#[test]
fn crafted_luks_headers_match_qemu() {
    let Some(builds) = setup() else { return };
    let patch = |d: &Path, name: &str, f: &dyn Fn(&mut Vec<u8>, usize, usize)| {
        let mut bytes = std::fs::read(d.join("ov.qcow2")).unwrap();
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let mut ext = be32(100) as usize;
        while be32(ext) != 0x0537_be77 {
            ext += 8 + (be32(ext + 4) as usize).div_ceil(8) * 8;
        }
        let luks = find_crypto_header(&bytes);
        f(&mut bytes, ext, luks);
        std::fs::write(d.join(name), bytes).unwrap();
    };
    for b in &builds {
        let fx = fixture(b, "crafted", |b, d| {
            encrypted_overlay(b, d, "4M", "");
            // The extension's length too short for the LUKS header.
            patch(d, "short.qcow2", &|f, ext, _| {
                f[ext + 16..ext + 24].copy_from_slice(&100u64.to_be_bytes())
            });
            // The LUKS header past the end of the file (reads as zeros).
            patch(d, "far.qcow2", &|f, ext, _| {
                f[ext + 8..ext + 16].copy_from_slice(&(1u64 << 28).to_be_bytes())
            });
            // Slot 0 active with no iterations.
            patch(d, "iter0.qcow2", &|f, _, l| {
                f[l + 212..l + 216].copy_from_slice(&[0; 4])
            });
            // An IV hash QEMU does not know.
            patch(d, "hash.qcow2", &|f, _, l| {
                f[l + 40..l + 72].fill(0);
                f[l + 40..l + 56].copy_from_slice(b"xts-plain64:sha9");
            });
            // The master-key digest changed: no slot unlocks.
            patch(d, "digest.qcow2", &|f, _, l| f[l + 112] ^= 1);
        });
        let sec = secret("s", PASS);
        for name in ["short", "far", "iter0", "hash", "digest"] {
            let spec = image_opts(&format!("{name}.qcow2"), "");
            let args = [
                "--object",
                &sec,
                "--image-opts",
                "-u",
                "-b",
                "x",
                "-F",
                "qcow2",
                &spec,
            ];
            let (_, _, out) = compare(b, &fx.0, name, &args);
            assert_eq!(out.status, 1, "{name}");
        }
    }
}
