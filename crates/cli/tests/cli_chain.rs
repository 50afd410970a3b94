//! Safe-mode rebase with backing chains, end to end through the sandbox: hostile backing
//! names refused by the path policy with the overlay left byte-for-byte unchanged, loops
//! and the depth bound, QEMU's messages for missing files, QEMU's resolution of relative
//! names, and results byte-identical to qemu-img 10.2 (including its in-chain decision).
//! Skipped without /dev/kvm unless `INSTAR_REQUIRE_KVM=1`, and without qemu-img 10.2
//! unless `INSTAR_REQUIRE_QEMU=1`.

mod cli_support;

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use cli_support::*;

const OUTSIDE: &str = "is outside the allowed directories (see --allow-dir)";
const LEVEL: &str = "Could not open backing file: ";

/// The arguments of one run, given the directory of the copy it runs on.
type ArgsFor<'a> = &'a dyn Fn(&Path) -> Vec<String>;

fn setup(test: &str) -> Option<(Qemu, Scratch)> {
    let q = qemu()?;
    if !require_kvm() {
        return None;
    }
    Some((q, Scratch::new(test)))
}

fn io(q: &Qemu, dir: &Path, image: &str, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(image);
    let r = run(&q.io, &a, dir);
    assert_eq!(r.status, 0, "qemu-io {image}: {}{}", r.stdout, r.stderr);
}

/// `qemu-img rebase -u -b NAME -F FMT IMAGE` (how hostile chains and loops are made).
fn point(q: &Qemu, dir: &Path, image: &str, name: &str, fmt: &str) {
    let r = run(&q.img, &["rebase", "-u", "-b", name, "-F", fmt, image], dir);
    assert_eq!(r.status, 0, "rebase -u {image}: {}", r.stderr);
}

/// Every file below `dir` (symlinks as their targets' names), for "nothing changed".
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let t = e.file_type().unwrap();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            if t.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, target.into_os_string().into_encoded_bytes());
            } else if t.is_dir() {
                walk(base, &p, out);
            } else if t.is_file() {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Run instar expecting a refusal with exactly `want` on stderr and nothing written.
fn refused(args: &[&str], cwd: &Path, root: &Path, want: &str) {
    let before = snapshot(root);
    let r = instar(args, cwd);
    assert_eq!(
        (r.status, r.stdout.as_str(), r.stderr.as_str()),
        (1, "", format!("instar: {want}\n").as_str()),
        "{args:?}"
    );
    assert!(snapshot(root) == before, "{args:?} changed a file");
}

fn copy_tree(src: &Path, dst: &Path) {
    let r = run(
        Path::new("cp"),
        &["-a", src.to_str().unwrap(), dst.to_str().unwrap()],
        Path::new("/"),
    );
    assert_eq!(r.status, 0, "cp: {}", r.stderr);
}

/// Run qemu-img and instar with the same arguments on two copies of `fixture` (named
/// `q` and `i`, so absolute names have the same length) in `cwd` (relative to the copy);
/// returns both outcomes and the two copies.
fn side_by_side(
    q: &Qemu,
    fixture: &Path,
    cwd: &str,
    args: ArgsFor,
) -> (Run, Run, PathBuf, PathBuf) {
    side_by_side_with(q, fixture, cwd, args, &[])
}

/// [`side_by_side`] with options only instar has (`--allow-dir`) added for instar.
fn side_by_side_with(
    q: &Qemu,
    fixture: &Path,
    cwd: &str,
    args: ArgsFor,
    instar_only: &[&str],
) -> (Run, Run, PathBuf, PathBuf) {
    let parent = fixture.parent().unwrap();
    let (dq, di) = (parent.join("q"), parent.join("i"));
    let _ = std::fs::remove_dir_all(&dq);
    let _ = std::fs::remove_dir_all(&di);
    copy_tree(fixture, &dq);
    copy_tree(fixture, &di);
    let aq = args(&dq);
    let ai = args(&di);
    let aq: Vec<&str> = aq.iter().map(String::as_str).collect();
    let ai: Vec<&str> = ai.iter().map(String::as_str).collect();
    let mut qa = vec!["rebase"];
    qa.extend_from_slice(&aq);
    let mut ia = vec!["rebase", "-q"];
    ia.extend_from_slice(instar_only);
    ia.extend_from_slice(&ai);
    let rq = run(&q.img, &qa, &dq.join(cwd));
    let ri = instar(&ia, &di.join(cwd));
    (rq, ri, dq, di)
}

/// Both succeeded and left the same files (names of the copies' directories swapped).
fn same_result(rq: &Run, ri: &Run, dq: &Path, di: &Path) {
    assert_eq!(rq.status, 0, "qemu-img: {}", rq.stderr);
    assert_eq!(ri.status, 0, "instar: {}", ri.stderr);
    assert_eq!(ri.stderr, "", "instar printed a warning");
    let (sq, si) = (snapshot(dq), snapshot(di));
    assert_eq!(sq.keys().collect::<Vec<_>>(), si.keys().collect::<Vec<_>>());
    let (nq, ni) = (
        dq.to_str().unwrap().as_bytes(),
        di.to_str().unwrap().as_bytes(),
    );
    for (name, q_bytes) in &sq {
        let mut i_bytes = si[name].clone();
        // An absolute backing name differs only in the copy's directory name.
        let mut k = 0;
        while k + ni.len() <= i_bytes.len() {
            if &i_bytes[k..k + ni.len()] == ni {
                i_bytes[k..k + ni.len()].copy_from_slice(nq);
                k += ni.len();
            } else {
                k += 1;
            }
        }
        assert!(
            &i_bytes == q_bytes,
            "{} differs from qemu-img's",
            name.display()
        );
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn hostile_old_chain_names_are_refused() {
    let Some((q, s)) = setup("chain-hostile") else {
        return;
    };
    let t = s.path("t");
    std::fs::create_dir_all(t.join("sub")).unwrap();
    create(&q, &t, "qcow2", "nb.qcow2", "1M", &[]);
    symlink("/etc/passwd", t.join("passwd-link")).unwrap();
    symlink("/etc/instar-no-such-file", t.join("dangling")).unwrap();
    symlink("/etc", t.join("etc-dir")).unwrap();
    let cases = [
        "/etc/passwd",
        "/etc/instar-no-such-file",
        "../../x",
        "../../etc/passwd",
        "sub/../../x",
        "passwd-link",
        "dangling",
        "etc-dir/passwd",
        "/dev/zero",
    ];
    for (k, name) in cases.iter().enumerate() {
        let ovl = format!("o{k}.qcow2");
        create(&q, &t, "qcow2", &ovl, "1M", &[]);
        point(&q, &t, &ovl, name, "raw");
        refused(
            &["rebase", "-b", "nb.qcow2", "-F", "qcow2", &ovl],
            &t,
            &s.0,
            &format!("Could not open '{ovl}': {LEVEL}backing file name '{name}' {OUTSIDE}"),
        );
    }
    for (k, name) in [
        "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}}",
        "nbd://localhost:10809/x",
        "file:/etc/passwd",
    ]
    .iter()
    .enumerate()
    {
        let ovl = format!("p{k}.qcow2");
        create(&q, &t, "qcow2", &ovl, "1M", &[]);
        point(&q, &t, &ovl, name, "raw");
        refused(
            &["rebase", "-b", "nb.qcow2", "-F", "qcow2", &ovl],
            &t,
            &s.0,
            &format!(
                "Could not open '{ovl}': {LEVEL}backing file name '{name}' has a protocol \
                 prefix; instar opens local files only"
            ),
        );
    }
    // Deeper in the chain, and through a detach (which reads the whole old chain).
    create(&q, &t, "qcow2", "mid.qcow2", "1M", &[]);
    point(&q, &t, "mid.qcow2", "/etc/passwd", "raw");
    create(
        &q,
        &t,
        "qcow2",
        "top.qcow2",
        "1M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    for b in ["nb.qcow2", ""] {
        refused(
            &["rebase", "-b", b, "-F", "qcow2", "top.qcow2"],
            &t,
            &s.0,
            &format!("Could not open 'top.qcow2': {LEVEL}{LEVEL}backing file name '/etc/passwd' {OUTSIDE}"),
        );
    }
    // Run from elsewhere: the names are still resolved against the overlay's directory.
    refused(
        &["rebase", "-b", "nb.qcow2", "-F", "qcow2", "t/o0.qcow2"],
        &s.0,
        &s.0,
        &format!("Could not open 't/o0.qcow2': {LEVEL}backing file name '/etc/passwd' {OUTSIDE}"),
    );
}

#[test]
fn loops_are_refused() {
    let Some((q, s)) = setup("chain-loops") else {
        return;
    };
    let d = &s.0;
    create(&q, d, "qcow2", "nb.qcow2", "1M", &[]);
    create(&q, d, "qcow2", "self.qcow2", "1M", &[]);
    point(&q, d, "self.qcow2", "self.qcow2", "qcow2");
    create(&q, d, "qcow2", "la.qcow2", "1M", &[]);
    create(
        &q,
        d,
        "qcow2",
        "lb.qcow2",
        "1M",
        &["-b", "la.qcow2", "-F", "qcow2"],
    );
    point(&q, d, "la.qcow2", "lb.qcow2", "qcow2");
    // -u: qemu-img create would follow the loop forever.
    create(
        &q,
        d,
        "qcow2",
        "top.qcow2",
        "1M",
        &["-u", "-b", "la.qcow2", "-F", "qcow2"],
    );
    // The same file under another name is the same file.
    symlink("nb.qcow2", d.join("nb-alias.qcow2")).unwrap();
    create(&q, d, "qcow2", "a2.qcow2", "1M", &[]);
    point(&q, d, "a2.qcow2", "alias2.qcow2", "qcow2");
    symlink("a2.qcow2", d.join("alias2.qcow2")).unwrap();
    let cases = [
        ("self.qcow2", format!("{LEVEL}backing file 'self.qcow2'")),
        ("la.qcow2", format!("{LEVEL}{LEVEL}backing file 'la.qcow2'")),
        (
            "top.qcow2",
            format!("{LEVEL}{LEVEL}{LEVEL}backing file 'la.qcow2'"),
        ),
        ("a2.qcow2", format!("{LEVEL}backing file 'alias2.qcow2'")),
    ];
    for (ovl, tail) in cases {
        refused(
            &["rebase", "-b", "nb.qcow2", "-F", "qcow2", ovl],
            d,
            d,
            &format!("Could not open '{ovl}': {tail} creates an infinite loop"),
        );
    }
    // -U skips the new backing's locks, so -b naming the overlay itself reaches the
    // loop check (without -U it is QEMU's lock conflict).
    refused(
        &[
            "rebase",
            "-U",
            "-b",
            "nb-alias.qcow2",
            "-F",
            "qcow2",
            "nb.qcow2",
        ],
        d,
        d,
        "Could not open new backing file 'nb-alias.qcow2': backing file 'nb-alias.qcow2' \
         creates an infinite loop",
    );
    refused(
        &["rebase", "-b", "nb.qcow2", "-F", "qcow2", "nb.qcow2"],
        d,
        d,
        "Could not open new backing file 'nb.qcow2': Failed to get shared \"write\" lock\n\
         Is another process using the image [nb.qcow2]?",
    );
}

#[test]
fn chain_depth_is_bounded() {
    let Some((q, s)) = setup("chain-depth") else {
        return;
    };
    let f = s.path("f");
    std::fs::create_dir(&f).unwrap();
    create(&q, &f, "qcow2", "d0.qcow2", "1M", &[]);
    io(&q, &f, "d0.qcow2", &["write -P 7 0 64k"]);
    for i in 1..=17 {
        let below = format!("d{}.qcow2", i - 1);
        create(
            &q,
            &f,
            "qcow2",
            &format!("d{i}.qcow2"),
            "1M",
            &["-b", &below, "-F", "qcow2"],
        );
        io(
            &q,
            &f,
            &format!("d{i}.qcow2"),
            &[&format!("write -P {i} {}k 64k", 64 * (i % 16))],
        );
    }
    create(&q, &f, "qcow2", "nb.qcow2", "1M", &[]);
    // 16 images below the overlay: fine, and the same file as qemu-img's.
    let (rq, ri, dq, di) = side_by_side(&q, &f, ".", &|_| {
        strings(&["-b", "nb.qcow2", "-F", "qcow2", "d16.qcow2"])
    });
    same_result(&rq, &ri, &dq, &di);
    // 17: refused, nothing written.
    refused(
        &["rebase", "-b", "nb.qcow2", "-F", "qcow2", "d17.qcow2"],
        &f,
        &s.0,
        &format!(
            "Could not open 'd17.qcow2': {}backing file name 'd0.qcow2' makes the backing \
             chain longer than 16 images (instar's limit)",
            LEVEL.repeat(17)
        ),
    );
    // The new chain has the same bound, -b included.
    refused(
        &["rebase", "-b", "d17.qcow2", "-F", "qcow2", "nb.qcow2"],
        &f,
        &s.0,
        &format!(
            "Could not open new backing file 'd17.qcow2': {}backing file name 'd1.qcow2' \
             makes the backing chain longer than 16 images (instar's limit)",
            LEVEL.repeat(16)
        ),
    );
}

/// Errors QEMU itself gives read exactly like qemu-img's (and write nothing).
#[test]
fn missing_files_read_like_qemu() {
    let Some((q, s)) = setup("chain-missing") else {
        return;
    };
    let f = s.path("f");
    std::fs::create_dir_all(f.join("sub")).unwrap();
    create(&q, &f, "qcow2", "nb.qcow2", "1M", &[]);
    create(&q, &f, "qcow2", "base.qcow2", "1M", &[]);
    create(&q, &f, "qcow2", "gone.qcow2", "1M", &[]);
    create(
        &q,
        &f,
        "qcow2",
        "mid.qcow2",
        "1M",
        &["-b", "gone.qcow2", "-F", "qcow2"],
    );
    create(
        &q,
        &f,
        "qcow2",
        "o1.qcow2",
        "1M",
        &["-b", "gone.qcow2", "-F", "qcow2"],
    );
    create(
        &q,
        &f,
        "qcow2",
        "o2.qcow2",
        "1M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    create(
        &q,
        &f.join("sub"),
        "qcow2",
        "o3.qcow2",
        "1M",
        &["-u", "-b", "../sub/gone.qcow2", "-F", "qcow2"],
    );
    // Outside sub/ (the allowed tree when -b is in sub/ too): refused alike whether the
    // file exists or not.
    for (ovl, name) in [
        ("o3b.qcow2", "../gone.qcow2"),
        ("o3c.qcow2", "../base.qcow2"),
    ] {
        create(
            &q,
            &f.join("sub"),
            "qcow2",
            ovl,
            "1M",
            &["-u", "-b", name, "-F", "qcow2"],
        );
    }
    create(&q, &f.join("sub"), "qcow2", "o4.qcow2", "1M", &[]);
    create(
        &q,
        &f,
        "qcow2",
        "nb2.qcow2",
        "1M",
        &["-b", "gone.qcow2", "-F", "qcow2"],
    );
    // An unknown recorded backing format.
    create(
        &q,
        &f,
        "qcow2",
        "o5.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "raw"],
    );
    let p = f.join("o5.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes[..4096].windows(3).position(|w| w == b"raw").unwrap();
    bytes[at..at + 3].copy_from_slice(b"Raw");
    std::fs::write(&p, bytes).unwrap();
    std::fs::remove_file(f.join("gone.qcow2")).unwrap();
    let cases: &[&[&str]] = &[
        &["-b", "nb.qcow2", "-F", "qcow2", "o1.qcow2"],
        &["-b", "nb.qcow2", "-F", "qcow2", "o2.qcow2"],
        &["-b", "", "o2.qcow2"],
        &["-b", "nb.qcow2", "-F", "qcow2", "sub/o3.qcow2"],
        &["-b", "sub/nb.qcow2", "-F", "qcow2", "sub/o4.qcow2"],
        &["-b", "../nb2.qcow2", "-F", "qcow2", "sub/o4.qcow2"],
        &["-b", "nb.qcow2", "-F", "qcow2", "o5.qcow2"],
    ];
    for (ovl, name) in [
        ("o3b.qcow2", "../gone.qcow2"),
        ("o3c.qcow2", "../base.qcow2"),
    ] {
        let ovl = format!("sub/{ovl}");
        refused(
            &["rebase", "-b", "nb.qcow2", "-F", "qcow2", &ovl],
            &f,
            &f,
            &format!("Could not open '{ovl}': {LEVEL}backing file name '{name}' {OUTSIDE}"),
        );
    }
    for args in cases {
        let (rq, ri, dq, di) = side_by_side(&q, &f, ".", &|_| strings(args));
        assert_eq!(rq.status, 1, "{args:?}: qemu-img succeeded");
        assert_eq!(ri.status, 1, "{args:?}: instar succeeded");
        assert_eq!(ri.stderr, as_instar(&rq.stderr, &q.img), "{args:?}");
        assert!(snapshot(&di) == snapshot(&f), "{args:?}: instar wrote");
        let _ = dq;
    }
}

/// A relative -b into another directory is resolved against the overlay's directory,
/// and the new backing's own names against its directory, as QEMU does.
#[test]
fn relative_names_resolve_like_qemu() {
    let Some((q, s)) = setup("chain-relative") else {
        return;
    };
    let f = s.path("f");
    for d in ["a", "b", "shared"] {
        std::fs::create_dir_all(f.join(d)).unwrap();
    }
    let a = f.join("a");
    let b = f.join("b");
    create(&q, &a, "qcow2", "base.qcow2", "4M", &[]);
    io(&q, &a, "base.qcow2", &["write -P 1 0 2M"]);
    create(
        &q,
        &a,
        "qcow2",
        "ovl.qcow2",
        "4M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    io(&q, &a, "ovl.qcow2", &["write -P 3 1M 64k"]);
    create(&q, &b, "raw", "nbase.img", "4M", &[]);
    create(
        &q,
        &b,
        "qcow2",
        "nb.qcow2",
        "4M",
        &["-b", "nbase.img", "-F", "raw"],
    );
    io(
        &q,
        &b,
        "nb.qcow2",
        &["write -P 1 0 512k", "write -P 5 3M 64k"],
    );
    // From the root, from inside a/, and from b/.
    for (cwd, ovl, backing) in [
        (".", "a/ovl.qcow2", "../b/nb.qcow2"),
        ("a", "ovl.qcow2", "../b/nb.qcow2"),
        ("b", "../a/ovl.qcow2", "../b/nb.qcow2"),
        (".", "a/ovl.qcow2", ""),
    ] {
        let (rq, ri, dq, di) = side_by_side(&q, &f, cwd, &|_| {
            strings(&["-b", backing, "-F", "qcow2", ovl])
        });
        same_result(&rq, &ri, &dq, &di);
    }
    // A name in the new chain leaving the allowed directories is refused too.
    create(&q, &b, "qcow2", "evil.qcow2", "4M", &[]);
    point(&q, &b, "evil.qcow2", "/etc/passwd", "raw");
    refused(
        &[
            "rebase",
            "-b",
            "../b/evil.qcow2",
            "-F",
            "qcow2",
            "a/ovl.qcow2",
        ],
        &f,
        &s.0,
        &format!(
            "Could not open new backing file '../b/evil.qcow2': {LEVEL}backing file name \
             '/etc/passwd' {OUTSIDE}"
        ),
    );
    // An old chain reaching into a sibling directory needs --allow-dir.
    create(&q, &f.join("shared"), "qcow2", "sbase.qcow2", "4M", &[]);
    io(&q, &f.join("shared"), "sbase.qcow2", &["write -P 9 0 1M"]);
    create(
        &q,
        &a,
        "qcow2",
        "s-ovl.qcow2",
        "4M",
        &["-b", "../shared/sbase.qcow2", "-F", "qcow2"],
    );
    refused(
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "a/s-ovl.qcow2"],
        &f,
        &s.0,
        &format!(
            "Could not open 'a/s-ovl.qcow2': {LEVEL}backing file name '../shared/sbase.qcow2' \
             {OUTSIDE}"
        ),
    );
    let (rq, ri, dq, di) = side_by_side_with(
        &q,
        &f,
        ".",
        &|_| strings(&["-b", "base.qcow2", "-F", "qcow2", "a/s-ovl.qcow2"]),
        &["--allow-dir", "shared"],
    );
    same_result(&rq, &ri, &dq, &di);
}

/// The discriminating case for QEMU's in-chain decision: the old backing (mid) is
/// shorter than the overlay and has data just before its end; with the optimisation the
/// region past mid's end is a zero write, without it one data write spans mid's end, so
/// the two decisions give different files.
fn in_chain_fixture(q: &Qemu, f: &Path) {
    let s = f.join("s");
    std::fs::create_dir_all(&s).unwrap();
    create(q, &s, "qcow2", "base.qcow2", "4M", &[]);
    io(q, &s, "base.qcow2", &["write -P 1 512k 1M"]);
    create(
        q,
        &s,
        "qcow2",
        "mid.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    io(q, &s, "mid.qcow2", &["write -P 2 960k 64k"]);
    create(
        q,
        &s,
        "qcow2",
        "top.qcow2",
        "4M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
}

#[test]
fn in_chain_results_match_qemu() {
    let Some((q, s)) = setup("chain-inchain-e2e") else {
        return;
    };
    let f = s.path("f");
    in_chain_fixture(&q, &f);
    let mut results = Vec::new();
    // (a) bare overlay name: QEMU reuses base; (b) s/top.qcow2 with a relative -b: it
    // does not; (c) absolute -b: it does.
    let cases: [(&str, ArgsFor); 3] = [
        ("s", &|_| {
            strings(&["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"])
        }),
        (".", &|_| {
            strings(&["-b", "base.qcow2", "-F", "qcow2", "s/top.qcow2"])
        }),
        (".", &|d| {
            let abs = d.join("s/base.qcow2").to_str().unwrap().to_string();
            vec![
                "-b".into(),
                abs,
                "-F".into(),
                "qcow2".into(),
                "s/top.qcow2".into(),
            ]
        }),
    ];
    for (cwd, args) in cases {
        let (rq, ri, dq, di) = side_by_side(&q, &f, cwd, args);
        same_result(&rq, &ri, &dq, &di);
        results.push(std::fs::read(dq.join("s/top.qcow2")).unwrap().len());
    }
    // The fixture does tell the decisions apart (qemu-img's own files differ in size).
    assert_ne!(results[0], results[1], "{results:?}");
    assert_eq!(results[0], results[2], "{results:?}");
}

/// Formats along the chain: a probed raw backing (no format recorded) and a vmdk chain
/// (QEMU opens a vmdk image's parent as vmdk).
#[test]
fn chain_formats_match_qemu() {
    let Some((q, s)) = setup("chain-formats") else {
        return;
    };
    let f = s.path("f");
    std::fs::create_dir(&f).unwrap();
    create(&q, &f, "qcow2", "nb.qcow2", "2M", &[]);
    io(&q, &f, "nb.qcow2", &["write -P 4 0 256k"]);
    // Raw backing named without a format: the name written by hand into cluster 0.
    create(&q, &f, "raw", "r.img", "2M", &[]);
    let r = run(
        &q.io,
        &["-f", "raw", "-c", "write -P 6 64k 128k", "r.img"],
        &f,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    create(&q, &f, "qcow2", "o-raw.qcow2", "2M", &[]);
    let p = f.join("o-raw.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    let name = b"r.img";
    let off = 4096 - name.len();
    bytes[off..4096].copy_from_slice(name);
    bytes[8..16].copy_from_slice(&(off as u64).to_be_bytes());
    bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    std::fs::write(&p, bytes).unwrap();
    assert!(info(&q, &f, "o-raw.qcow2")
        .get("backing-filename-format")
        .is_none());
    // vmdk parent chain.
    let r = run(&q.img, &["create", "-q", "-f", "vmdk", "v0.vmdk", "2M"], &f);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let r = run(
        &q.io,
        &["-f", "vmdk", "-c", "write -P 8 0 192k", "v0.vmdk"],
        &f,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    let r = run(
        &q.img,
        &[
            "create", "-q", "-f", "vmdk", "-b", "v0.vmdk", "-F", "vmdk", "v1.vmdk", "2M",
        ],
        &f,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    let r = run(
        &q.io,
        &["-f", "vmdk", "-c", "write -P 9 128k 128k", "v1.vmdk"],
        &f,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    create(
        &q,
        &f,
        "qcow2",
        "o-vmdk.qcow2",
        "2M",
        &["-b", "v1.vmdk", "-F", "vmdk"],
    );
    for ovl in ["o-raw.qcow2", "o-vmdk.qcow2"] {
        let (rq, ri, dq, di) = side_by_side(&q, &f, ".", &|_| {
            strings(&["-b", "nb.qcow2", "-F", "qcow2", ovl])
        });
        same_result(&rq, &ri, &dq, &di);
        assert_eq!(rq.stderr, "");
    }
}

#[test]
fn old_chain_in_use_is_refused_like_qemu() {
    let Some((q, s)) = setup("chain-locked") else {
        return;
    };
    let d = &s.0;
    create(&q, d, "qcow2", "base.qcow2", "1M", &[]);
    create(
        &q,
        d,
        "qcow2",
        "mid.qcow2",
        "1M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    create(
        &q,
        d,
        "qcow2",
        "ovl.qcow2",
        "1M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    create(&q, d, "qcow2", "nb.qcow2", "1M", &[]);
    let _held = LockHolder::open(&q.io, d, "qcow2", "base.qcow2", false);
    let args = ["rebase", "-b", "nb.qcow2", "-F", "qcow2", "ovl.qcow2"];
    let rq = run(&q.img, &args, d);
    assert_eq!(rq.status, 1);
    refused(
        &args,
        d,
        d,
        as_instar(&rq.stderr, &q.img)
            .trim_start_matches("instar: ")
            .trim_end(),
    );
}

/// `-p` prints qemu-img's progress lines; the in-chain decision changes them (steps
/// skipped as unchanged since the reused image add no progress).
#[test]
fn progress_matches_qemu() {
    let Some((q, s)) = setup("chain-progress") else {
        return;
    };
    let f = s.path("f");
    in_chain_fixture(&q, &f);
    let mut seen = Vec::new();
    for (cwd, ovl) in [("s", "top.qcow2"), (".", "s/top.qcow2")] {
        let args = ["rebase", "-p", "-b", "base.qcow2", "-F", "qcow2", ovl];
        let dq = s.path("pq");
        let di = s.path("pi");
        let _ = std::fs::remove_dir_all(&dq);
        let _ = std::fs::remove_dir_all(&di);
        copy_tree(&f, &dq);
        copy_tree(&f, &di);
        let rq = run(&q.img, &args, &dq.join(cwd));
        let ri = instar(&args, &di.join(cwd));
        assert_eq!(rq.status, 0, "{}", rq.stderr);
        assert_eq!(ri.status, 0, "{}", ri.stderr);
        assert_eq!(ri.stdout, format!("{}Image rebased.\n", rq.stdout), "{ovl}");
        seen.push(rq.stdout);
    }
    assert_ne!(
        seen[0], seen[1],
        "the fixture does not tell the decisions apart"
    );
}
