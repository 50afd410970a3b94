//! Safe-mode (copying) differential runner: one fixture, `qemu-img rebase` of every
//! reference build on its own copy, instar on another, then byte, check, content and
//! counter comparisons. Included by `diff_safe.rs` next to the shared `qemu` module.
#![allow(dead_code)]

use crate::qemu::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub type Build<'a> = dyn Fn(&Fx) -> Vec<String> + 'a;

/// A copy of the fixture directory in which every byte of every file is written (no
/// holes). `Scratch::copy` keeps holes through copy_file_range, and on ext4 what counts
/// as a hole in a file with unwritten extents depends on the page cache at that moment,
/// so two copies of one fixture could differ in `actual-size` before any rebase.
pub fn dense_copy(scratch: &Scratch, label: &str) -> PathBuf {
    let dst = scratch.root().join(label);
    let _ = std::fs::remove_dir_all(&dst);
    instar_testkit::copy_tree_dense(&scratch.fixture(), &dst);
    dst
}

/// An environment change for a run: the variable, set to a value or (`None`) removed.
pub type EnvVar<'a> = (&'a str, Option<&'a str>);

/// `run` with `env` applied to the environment.
pub fn run_env(prog: &Path, args: &[String], cwd: &Path, env: &[EnvVar]) -> Output {
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).current_dir(cwd).env("LC_ALL", "C");
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()));
    Output {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One safe-mode scenario.
pub struct SafeCase<'a> {
    pub name: &'a str,
    /// Overlay path relative to the fixture directory, which is also the working directory.
    pub overlay: &'a str,
    /// Builds the fixture and returns qemu-img's rebase options (with `-F`), FILE excluded.
    pub build: &'a Build<'a>,
    /// Reference builds documented to produce a different file (label, reason). The run
    /// asserts that they still do, so a stale mark fails.
    pub differs: &'a [(&'a str, &'a str)],
    /// Also run instar without `-F`; the probed run must equal qemu-img's run with `-F`.
    pub probe: bool,
    /// Count only data that starts below this guest offset when checking instar's
    /// counters: a v2 overlay with a backing file turns qemu-img's zero writes (runs that
    /// start at or after the old backing's end) into data clusters, which instar does not
    /// count as copied.
    pub count_below: Option<u64>,
    /// The build whose file instar's must equal (and the others are compared with):
    /// "10.2" unless set, e.g. "11.1" where the builds' libraries differ.
    pub reference: &'a str,
    /// Environment variables set (or removed) for the subject's runs.
    pub subject_env: &'a [EnvVar<'a>],
}

impl<'a> SafeCase<'a> {
    pub fn new(name: &'a str, build: &'a Build<'a>) -> SafeCase<'a> {
        SafeCase {
            name,
            overlay: "ovl.qcow2",
            build,
            differs: &[],
            probe: false,
            count_below: None,
            reference: "10.2",
            subject_env: &[],
        }
    }
}

/// `qemu-img map --output=json` of the overlay's own layer (the backing chain is not
/// opened), as raw text for reports.
pub fn layer_map_text(q: &Qemu, cwd: &Path, image: &str) -> String {
    let out = run(&q.img, &["map", "--output=json", &layer_only(image)], cwd);
    format!("{}{}", out.stdout, out.stderr)
}

fn layer_only(image: &str) -> String {
    let name = image.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{name}"}}}}"#
    )
}

/// Guest ranges `[start, end)` that hold data in the overlay's own layer.
pub fn layer_data(q: &Qemu, cwd: &Path, image: &str) -> Vec<(u64, u64)> {
    let out = run(&q.img, &["map", "--output=json", &layer_only(image)], cwd);
    assert_eq!(out.status, 0, "qemu-img map {image}: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("qemu-img map JSON");
    let mut r = Vec::new();
    for e in v.as_array().expect("map array") {
        let flag = |k: &str| e[k].as_bool().unwrap_or(false);
        if flag("present") && flag("data") {
            let s = e["start"].as_u64().expect("start");
            let l = e["length"].as_u64().expect("length");
            r.push((s, s + l));
        }
    }
    r
}

/// `a` minus `b`, both sorted and disjoint.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// Bytes and distinct clusters covered by `ranges`.
pub fn bytes_and_clusters(ranges: &[(u64, u64)], cluster: u64) -> (u64, u64) {
    let bytes = ranges.iter().map(|(s, e)| e - s).sum();
    let mut clusters = std::collections::BTreeSet::new();
    for &(s, e) in ranges {
        for c in s / cluster..=(e - 1) / cluster {
            clusters.insert(c);
        }
    }
    (bytes, clusters.len() as u64)
}

/// Cluster size of a qcow2 file.
pub fn cluster_size_of(path: &Path) -> u64 {
    let b = std::fs::read(path).expect("read image");
    1u64 << be32(&b, off::CLUSTER_BITS)
}

/// `qemu-img compare` of two images (each through its own backing chain), run in `cwd`.
pub fn compare(q: &Qemu, cwd: &Path, a: &str, b: &str) -> Result<(), String> {
    let out = run(
        &q.img,
        &["compare", "-f", "qcow2", "-F", "qcow2", a, b],
        cwd,
    );
    if out.status == 0 && out.stdout == "Images are identical.\n" {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {a} {b}: exit {}: {}{}",
            out.status,
            out.stdout.trim_end(),
            out.stderr.trim_end()
        ))
    }
}

/// The value of `-b` in an argument list.
fn backing_arg(a: &[String]) -> Option<&str> {
    a.windows(2).find(|w| w[0] == "-b").map(|w| w[1].as_str())
}

fn rebase_argv(opts: &[String], extra: &[&str], overlay: &str) -> Vec<String> {
    let mut v = vec!["rebase".to_string()];
    v.extend(opts.iter().cloned());
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(overlay.to_string());
    v
}

/// A bug report for two overlays that should be equal: the first differing bytes and
/// both files' `qemu-img map`/`check`.
fn report_diff(q: &Qemu, want: (&Path, &str), got: (&Path, &str)) -> String {
    let a = std::fs::read(want.0.join(want.1)).unwrap_or_default();
    let b = std::fs::read(got.0.join(got.1)).unwrap_or_default();
    let mut s = describe_diff(&a, &b).unwrap_or_default();
    for (label, (dir, name)) in [("expected", want), ("got", got)] {
        s.push_str(&format!(
            "\n  {label} map: {}\n  {label} check: {}",
            layer_map_text(q, dir, name).trim_end().replace('\n', " "),
            check_problems(q, dir, name).unwrap_or_else(|| "clean".into())
        ));
    }
    s
}

/// Run one scenario; panics with every failure found.
pub fn run_safe_case(c: &SafeCase) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(c.name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let opts = (c.build)(&fx);
    let pre = format!("fixture/{}", c.overlay);
    let before = snapshot(&fx.dir);
    // 10.2 inspects every result (check, compare, info, map).
    let q10 = &refs.v10_2;
    let mut failures: Vec<String> = Vec::new();
    let Some(qref) = refs.all().into_iter().find(|q| q.label == c.reference) else {
        need(
            false,
            "INSTAR_REQUIRE_QEMU",
            &format!("qemu-img {} missing", c.reference),
        );
        return;
    };
    let rl = qref.label;

    // The reference build (10.2 unless the case says otherwise). Its own result must be
    // sound.
    let ref_dir = dense_copy(&scratch, &format!("qemu-{rl}"));
    let argv = rebase_argv(&opts, &[], c.overlay);
    let shown_q = format!("cd {}; {}", ref_dir.display(), show_cmd("qemu-img", &argv));
    let out = run(&qref.img, &argv, &ref_dir);
    assert!(
        out.status == 0 && out.stdout.is_empty(),
        "{shown_q}: exit {}\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    if let Some(p) = check_problems(q10, &ref_dir, c.overlay) {
        panic!("qemu-img {rl}'s own result is not clean: {p}");
    }
    if let Err(e) = compare(
        q10,
        scratch.root(),
        &pre,
        &format!("qemu-{rl}/{}", c.overlay),
    ) {
        panic!("qemu-img {rl}'s own result changed the content: {e}");
    }
    let ref_bytes = std::fs::read(ref_dir.join(c.overlay)).expect("read overlay");

    // The other builds: equal to the reference, unless documented otherwise (then they
    // must differ). The newest release's file is kept to compare instar's with it as well.
    let mut newest: Option<(&str, PathBuf)> = None;
    for q in refs.all().into_iter().filter(|q| q.label != rl) {
        let dir = dense_copy(&scratch, &format!("qemu-{}", q.label));
        let out = run(&q.img, &argv, &dir);
        let got = std::fs::read(dir.join(c.overlay)).expect("read overlay");
        let same = out.status == 0 && got == ref_bytes;
        let documented = c.differs.iter().any(|(l, _)| *l == q.label);
        if refs.newest().is_some_and(|n| n.label == q.label) && out.status == 0 && !documented {
            newest = Some((q.label, dir.clone()));
        }
        match c.differs.iter().find(|(l, _)| *l == q.label) {
            Some((_, why)) if same => failures.push(format!(
                "qemu-img {} now produces {rl}'s file, but the scenario is marked as differing ({why})",
                q.label
            )),
            Some((_, why)) => eprintln!(
                "note: qemu-img {} differs from {rl} as documented ({why}): exit {}; {}",
                q.label,
                out.status,
                describe_diff(&ref_bytes, &got).unwrap_or_default()
            ),
            None if out.status != 0 => failures.push(format!(
                "qemu-img {} failed: exit {}: {}",
                q.label, out.status, out.stderr
            )),
            None if !same => failures.push(format!(
                "qemu-img {} result differs from {rl}'s: {}",
                q.label,
                report_diff(q10, (&ref_dir, c.overlay), (&dir, c.overlay))
            )),
            None => {}
        }
    }

    // The subject, with the same arguments (and the JSON report when it is instar).
    let extra: &[&str] = if subject.is_instar() {
        &["--output", "json"]
    } else {
        &[]
    };
    let dir = dense_copy(&scratch, "subject");
    let iargv = rebase_argv(&opts, extra, c.overlay);
    let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &iargv));
    let out = run_env(subject.path(), &iargv, &dir, c.subject_env);
    if out.status != 0 {
        failures.push(format!(
            "{shown}\n  exit {} (expected 0), stderr: {}",
            out.status,
            out.stderr.trim_end()
        ));
    } else {
        check_subject_result(
            c,
            q10,
            &scratch,
            (rl, &ref_dir, &ref_bytes),
            &dir,
            &before,
            &shown,
            &mut failures,
        );
        if let Some((label, qdir)) = &newest {
            let want = std::fs::read(qdir.join(c.overlay)).expect("read overlay");
            if std::fs::read(dir.join(c.overlay)).ok().as_deref() != Some(&want[..]) {
                failures.push(format!(
                    "{shown}\n  overlay differs from qemu-img {label}'s: {}",
                    report_diff(q10, (qdir, c.overlay), (&dir, c.overlay))
                ));
            }
        }
        if subject.is_instar() {
            check_json(c, q10, &fx.dir, &dir, &opts, &out, &shown, &mut failures);
        } else if !out.stdout.is_empty() {
            failures.push(format!("{shown}: stdout {:?}", out.stdout));
        }
    }

    // instar without -F: the probed format must give qemu-img's file with -F.
    if c.probe && subject.is_instar() {
        let (stripped, fmt) = strip_backing_format(&opts);
        assert!(
            fmt.is_some(),
            "probe run asked for, but no -F in the scenario"
        );
        let dir = dense_copy(&scratch, "subject-probed");
        let pargv = rebase_argv(&stripped, &[], c.overlay);
        let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &pargv));
        let out = run_env(subject.path(), &pargv, &dir, c.subject_env);
        if out.status != 0 || out.stdout != "Image rebased.\n" || !out.stderr.is_empty() {
            failures.push(format!(
                "{shown}\n  exit {}, stdout {:?}, stderr {:?} (expected 0, \"Image rebased.\\n\", nothing)",
                out.status, out.stdout, out.stderr
            ));
        } else if std::fs::read(dir.join(c.overlay)).ok().as_deref() != Some(&ref_bytes[..]) {
            failures.push(format!(
                "{shown}\n  overlay differs from qemu-img {rl}'s (run with -F): {}",
                report_diff(q10, (&ref_dir, c.overlay), (&dir, c.overlay))
            ));
        }
    }

    assert!(
        failures.is_empty(),
        "scenario {}:\n{}",
        c.name,
        failures.join("\n")
    );
}

#[allow(clippy::too_many_arguments)]
fn check_subject_result(
    c: &SafeCase,
    q10: &Qemu,
    scratch: &Scratch,
    reference: (&str, &Path, &[u8]),
    dir: &Path,
    before: &std::collections::BTreeMap<PathBuf, Vec<u8>>,
    shown: &str,
    failures: &mut Vec<String>,
) {
    let (rl, ref_dir, ref_bytes) = reference;
    let got = std::fs::read(dir.join(c.overlay)).expect("read overlay");
    if got != ref_bytes {
        failures.push(format!(
            "{shown}\n  overlay differs from qemu-img {rl}'s: {}",
            report_diff(q10, (ref_dir, c.overlay), (dir, c.overlay))
        ));
    }
    if let Some(p) = check_problems(q10, dir, c.overlay) {
        failures.push(format!("{shown}\n  qemu-img check: {p}"));
    }
    let label = dir.file_name().expect("dir name").to_string_lossy();
    if let Err(e) = compare(
        q10,
        scratch.root(),
        &format!("fixture/{}", c.overlay),
        &format!("{label}/{}", c.overlay),
    ) {
        failures.push(format!("{shown}\n  content changed: {e}"));
    }
    // Every other file is left alone.
    let after = snapshot(dir);
    for (path, bytes) in before {
        if path.as_path() != Path::new(c.overlay) && after.get(path) != Some(bytes) {
            failures.push(format!("{shown}\n  {} changed or vanished", path.display()));
        }
    }
    // Same holes. `actual-size` (st_blocks) is left out of the info comparison: it also
    // counts the filesystem's extent-tree blocks, which vary from run to run for one and
    // the same sequence of writes.
    let strip = |s: String| -> String {
        s.lines()
            .filter(|l| !l.contains("\"actual-size\""))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let a = strip(info_json(q10, ref_dir, c.overlay));
    let b = strip(info_json(q10, dir, c.overlay));
    if a != b {
        failures.push(format!(
            "{shown}\n  qemu-img info differs from the one of qemu-img {rl}'s result:\n{}",
            line_diff(&a, &b)
        ));
    }
    let (ha, hb) = (
        data_extents(&ref_dir.join(c.overlay)),
        data_extents(&dir.join(c.overlay)),
    );
    if ha != hb {
        failures.push(format!(
            "{shown}\n  data/hole layout differs from qemu-img {rl}'s result: expected {ha:x?}, got {hb:x?}"
        ));
    }
}

pub use instar_testkit::sparse::data_extents;

/// The JSON report: its fields, and counters that match the data clusters that appeared.
#[allow(clippy::too_many_arguments)]
fn check_json(
    c: &SafeCase,
    q10: &Qemu,
    fixture: &Path,
    dir: &Path,
    opts: &[String],
    out: &Output,
    shown: &str,
    failures: &mut Vec<String>,
) {
    let v: Value = match serde_json::from_str(out.stdout.trim_end()) {
        Ok(v) => v,
        Err(e) => {
            failures.push(format!(
                "{shown}\n  stdout is not JSON ({e}): {:?}",
                out.stdout
            ));
            return;
        }
    };
    if !out.stderr.is_empty() {
        failures.push(format!("{shown}\n  stderr not empty: {:?}", out.stderr));
    }
    let mut want = serde_json::Map::new();
    want.insert("mode".into(), "safe".into());
    want.insert("overlay".into(), c.overlay.into());
    want.insert("overlay_format".into(), "qcow2".into());
    match backing_arg(opts) {
        Some("") | None => {
            want.insert("detached".into(), true.into());
        }
        Some(b) => {
            let fmt = strip_backing_format(opts).1.unwrap_or_default();
            want.insert(
                "new_backing".into(),
                serde_json::json!({"filename": b, "format": fmt}),
            );
        }
    }
    for (k, w) in &want {
        if v.get(k) != Some(w) {
            failures.push(format!("{shown}\n  JSON {k}: {:?}, expected {w}", v.get(k)));
        }
    }
    let cs = cluster_size_of(&dir.join(c.overlay));
    let new_data = subtract(
        &layer_data(q10, dir, c.overlay),
        &layer_data(q10, fixture, c.overlay),
    );
    let counted: Vec<(u64, u64)> = match c.count_below {
        Some(limit) => new_data
            .iter()
            .filter(|(s, _)| *s < limit)
            .map(|&(s, e)| (s, e.min(limit)))
            .collect(),
        None => new_data,
    };
    let (bytes, clusters) = bytes_and_clusters(&counted, cs);
    let got = (v["bytes_copied"].as_u64(), v["clusters_copied"].as_u64());
    if got != (Some(bytes), Some(clusters)) {
        failures.push(format!(
            "{shown}\n  JSON bytes_copied/clusters_copied {:?}/{:?}, but qemu-img map shows {bytes} new data bytes in {clusters} clusters ({counted:x?})",
            got.0, got.1
        ));
    }
}

/// `-p` output of qemu-img (every build) and instar for one fixture and argument list.
/// instar's stdout is qemu-img's followed by its success line.
pub fn progress_case(name: &str, build: &dyn Fn(&Fx) -> Vec<String>, overlay: &str) {
    let Some((refs, subject)) = setup() else {
        return;
    };
    let scratch = Scratch::new(name);
    let fx = Fx::new(scratch.fixture(), &refs.v10_2);
    let opts = build(&fx);
    let argv = rebase_argv(&opts, &["-p"], overlay);
    let mut failures = Vec::new();
    let dir = dense_copy(&scratch, "qemu-10.2");
    let want = run(&refs.v10_2.img, &argv, &dir);
    assert_eq!(want.status, 0, "qemu-img 10.2: {}", want.stderr);
    assert!(want.stdout.starts_with("    (0.00/100%)\r") && want.stdout.ends_with("\r\n"));
    for q in &refs.others {
        let dir = dense_copy(&scratch, &format!("qemu-{}", q.label));
        let got = run(&q.img, &argv, &dir);
        if (got.status, &got.stdout) != (0, &want.stdout) {
            failures.push(format!(
                "qemu-img {}: exit {}, stdout {:?} (10.2: {:?})",
                q.label, got.status, got.stdout, want.stdout
            ));
        }
    }
    let dir = dense_copy(&scratch, "subject");
    let got = run(subject.path(), &argv, &dir);
    let expected = if subject.is_instar() {
        let tail = if backing_arg(&opts) == Some("") {
            "Image detached.\n"
        } else {
            "Image rebased.\n"
        };
        format!("{}{tail}", want.stdout)
    } else {
        want.stdout.clone()
    };
    let shown = format!("cd {}; {}", dir.display(), show_cmd("instar", &argv));
    if got.status != 0 || got.stdout != expected {
        failures.push(format!(
            "{shown}\n  exit {}, stdout {:?}\n  expected {:?}\n  stderr {}",
            got.status,
            got.stdout,
            expected,
            got.stderr.trim_end()
        ));
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}
