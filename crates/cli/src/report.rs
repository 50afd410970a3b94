//! What a successful rebase prints on stdout.

use std::ffi::OsStr;

use serde_json::{json, Map, Value};

use crate::rebase_cmd::Done;

/// The human line: `Image rebased.` or `Image detached.`.
pub fn human(done: &Done) -> &'static str {
    if done.new_backing.is_some() {
        "Image rebased."
    } else {
        "Image detached."
    }
}

/// The `--output json` object. Names are the user's own arguments (non-UTF-8 bytes are
/// replaced); serde_json escapes control characters.
pub fn json(overlay: &OsStr, done: &Done) -> Value {
    let mut m = Map::new();
    m.insert("overlay".into(), json!(overlay.to_string_lossy()));
    m.insert("overlay_format".into(), json!(done.overlay_format.name()));
    m.insert("mode".into(), json!(done.mode.name()));
    m.insert("clusters_copied".into(), json!(done.stats.clusters_copied));
    m.insert("bytes_copied".into(), json!(done.stats.bytes_copied));
    match &done.new_backing {
        Some((name, format)) => {
            m.insert(
                "new_backing".into(),
                json!({ "filename": name.to_string_lossy(), "format": format }),
            );
        }
        None => {
            m.insert("detached".into(), json!(true));
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebase_cmd::Mode;
    use instar_abi::{Format, RebaseStats};

    #[test]
    fn shapes() {
        let mut done = Done {
            overlay_format: Format::Qcow2,
            mode: Mode::Unsafe,
            stats: RebaseStats {
                clusters_copied: 2,
                bytes_copied: 131072,
            },
            new_backing: Some(("../b\n.qcow2".into(), "qcow2".into())),
        };
        assert_eq!(human(&done), "Image rebased.");
        let v = json(OsStr::new("o.qcow2"), &done);
        assert_eq!(
            v.to_string(),
            r#"{"bytes_copied":131072,"clusters_copied":2,"mode":"unsafe","new_backing":{"filename":"../b\n.qcow2","format":"qcow2"},"overlay":"o.qcow2","overlay_format":"qcow2"}"#
        );
        done.new_backing = None;
        assert_eq!(human(&done), "Image detached.");
        let v = json(OsStr::new("o.qcow2"), &done);
        assert_eq!(v["detached"], json!(true));
        assert!(v.get("new_backing").is_none());
    }
}
