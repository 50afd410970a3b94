//! Locating the reference qemu-img builds, for every test crate.
//!
//! A build is asked for by version prefix (`"10.2"` matches `10.2.2`, not `10.20`). The
//! candidates are, in order: the environment variable `QEMU_IMG_<MAJOR>_<MINOR>` (e.g.
//! `QEMU_IMG_11_1`), the builds `../shared/scripts/qemu-ref.sh --list` reports (the
//! script's path can be set with `INSTAR_QEMU_REF`), then every `qemu-img` on `PATH`
//! (the machine's own build, e.g. 10.0.2 in /usr/bin). A candidate counts only if its
//! `--version` says that version and a `qemu-io` runs next to it: no build stands in
//! for another. This is the one place the tests locate qemu-img. Some builds are wrapper scripts that start the real binary with a
//! private runtime (11.1.3); they are used like any other.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The version the project is byte-identical to.
pub const REFERENCE: &str = "10.2";
/// The newest release, expected to give the same bytes as [`REFERENCE`].
pub const NEWEST: &str = "11.1";

/// One reference build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// The full version, e.g. `11.1.3`.
    pub version: String,
    pub img: PathBuf,
    pub io: PathBuf,
}

/// Whether `INSTAR_REQUIRE_QEMU=1`: a missing reference build fails the test.
pub fn required() -> bool {
    crate::skip::required("INSTAR_REQUIRE_QEMU")
}

fn script() -> PathBuf {
    std::env::var_os("INSTAR_QEMU_REF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/scripts/qemu-ref.sh")
        })
}

/// `qemu-ref.sh --list`: (version, qemu-img path) of every installed build, read once.
pub fn listed() -> &'static [(String, PathBuf)] {
    static LISTED: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    LISTED.get_or_init(|| {
        let Ok(out) = Command::new("bash").arg(script()).arg("--list").output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(v, p)| (v.trim().to_string(), PathBuf::from(p.trim())))
            .collect()
    })
}

/// The version `qemu-img --version` prints (`qemu-img version 10.0.2 (Debian …)`).
pub fn version_of(img: &Path) -> Option<String> {
    let out = Command::new(img).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text
        .lines()
        .next()?
        .strip_prefix("qemu-img version ")?
        .split_whitespace()
        .next()?;
    Some(v.to_string())
}

/// Whether `version` is `prefix` or a release of it (`10.2` matches `10.2.2`).
pub fn matches(version: &str, prefix: &str) -> bool {
    version == prefix || version.starts_with(&format!("{prefix}."))
}

/// The build of version `prefix`, or `None`.
pub fn find(prefix: &str) -> Option<Build> {
    let var = format!("QEMU_IMG_{}", prefix.replace('.', "_"));
    let mut candidates: Vec<PathBuf> = std::env::var_os(&var)
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for (v, p) in listed() {
        if matches(v, prefix) {
            candidates.push(p.clone());
        }
    }
    candidates.extend(on_path());
    candidates.into_iter().find_map(|img| {
        let version = version_of(&img)?;
        let io = img.with_file_name("qemu-io");
        let io_runs = Command::new(&io)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        (matches(&version, prefix) && io_runs).then_some(Build { version, img, io })
    })
}

/// Every `qemu-img` on PATH, the last candidates of [`find`].
fn on_path() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-img"))
                .collect()
        })
        .unwrap_or_default()
}

/// `qemu-nbd` from PATH (the reference builds are built without it), or `None` after a
/// note (a failure under `INSTAR_REQUIRE_QEMU=1`).
pub fn qemu_nbd() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-nbd"))
            .find(|c| c.exists())
    });
    crate::skip::need(found.is_some(), "INSTAR_REQUIRE_QEMU", "qemu-nbd not found");
    found
}

/// [`find`], for a build a test cannot run without: `None` (after a note) skips the
/// test, and under `INSTAR_REQUIRE_QEMU=1` a missing build panics.
pub fn need(prefix: &str) -> Option<Build> {
    let found = find(prefix);
    if found.is_none() {
        let note = format!(
            "qemu-img {prefix} not found (set QEMU_IMG_{} or run ../shared/scripts/qemu-ref.sh)",
            prefix.replace('.', "_")
        );
        crate::skip::need(false, "INSTAR_REQUIRE_QEMU", &note);
    }
    found
}

/// qemu-img 10.2, the reference, alone: `None` skips (see [`need`]).
pub fn reference_img() -> Option<PathBuf> {
    need(REFERENCE).map(|b| b.img)
}

/// Every reference build: 10.2 first, then 11.1 (the newest release, required like
/// 10.2), then 10.0 (the machine's own) and 7.2 when installed. `None` skips.
pub fn all_builds() -> Option<Vec<Build>> {
    let (reference, newest) = reference_and_newest()?;
    let mut v = vec![reference, newest];
    v.extend(find("10.0"));
    v.extend(find("7.2"));
    Some(v)
}

/// The reference (10.2) and the newest (11.1) builds, which must give the same bytes;
/// `None` skips the test (panics under `INSTAR_REQUIRE_QEMU=1`) unless both are found.
pub fn reference_and_newest() -> Option<(Build, Build)> {
    let reference = need(REFERENCE);
    let newest = need(NEWEST);
    Some((reference?, newest?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_prefixes_match_whole_components() {
        assert!(matches("10.2.2", "10.2"));
        assert!(matches("10.2", "10.2"));
        assert!(matches("11.1.3", "11.1"));
        assert!(!matches("10.20.1", "10.2"));
        assert!(!matches("10.0.2", "10.2"));
    }

    #[test]
    fn listed_builds_report_their_version() {
        for (v, p) in listed() {
            let got = version_of(p);
            assert!(
                got.as_deref()
                    .is_some_and(|g| matches(g, v) || matches(v, g)),
                "{} lists {v} but --version says {got:?}",
                p.display()
            );
        }
    }

    #[test]
    fn reference_and_newest_are_found_when_required() {
        // Under INSTAR_REQUIRE_QEMU=1 a missing build panics inside `need`.
        if let Some((r, n)) = reference_and_newest() {
            assert!(matches(&r.version, REFERENCE), "{r:?}");
            assert!(matches(&n.version, NEWEST), "{n:?}");
            assert!(r.io.is_file() && n.io.is_file());
        }
    }
}
