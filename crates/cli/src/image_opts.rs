//! `--image-opts`: FILE as QEMU block options, the subset needed to open encrypted
//! chains: `driver`, `file.filename`, `file.driver=file`, `encrypt.key-secret`,
//! `encrypt.format`, and the `encrypt.` options of backing files under `backing.`
//! (`backing.backing.` for the next level, and so on). Everything else is refused.

use instar_abi::ImageKey;

use crate::secrets::{split_opts, Secrets};

/// One image's `encrypt.` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptOpts {
    pub format: Option<String>,
    pub key_secret: Option<String>,
}

impl EncryptOpts {
    fn is_empty(&self) -> bool {
        self.format.is_none() && self.key_secret.is_none()
    }

    /// What the guest gets for device `dev` (`None` without options).
    pub fn key(&self, dev: u8, secrets: &Secrets) -> Option<ImageKey> {
        (!self.is_empty()).then(|| ImageKey {
            dev,
            format: self.format.as_ref().map(|f| f.as_bytes().to_vec()),
            secret: self.key_secret.as_ref().map(|id| secrets.lookup(id)),
        })
    }
}

/// FILE given with `--image-opts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOpts {
    /// As typed: QEMU's messages name the image by it.
    pub text: String,
    /// `file.filename`.
    pub filename: String,
    /// `driver` (the format; probed when absent).
    pub driver: Option<String>,
    /// The overlay's `encrypt.` options, then each backing level's.
    pub levels: Vec<EncryptOpts>,
}

/// Deepest `backing.` prefix accepted (QEMU's chains are bounded by the path policy).
const MAX_LEVELS: usize = 16;

impl ImageOpts {
    /// Parse FILE. Errors are printed after `instar: `.
    pub fn parse(text: &str) -> Result<ImageOpts, String> {
        let mut o = ImageOpts {
            text: text.to_string(),
            filename: String::new(),
            driver: None,
            levels: vec![EncryptOpts::default()],
        };
        let mut filename = None;
        for p in split_opts(text) {
            let (key, value) = match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (p.clone(), String::from("on")),
            };
            let mut k = key.as_str();
            let mut level = 0;
            while let Some(rest) = k.strip_prefix("backing.") {
                k = rest;
                level += 1;
            }
            if level > MAX_LEVELS {
                return Err(unsupported(&key));
            }
            if o.levels.len() <= level {
                o.levels.resize(level + 1, EncryptOpts::default());
            }
            match (level, k) {
                (_, "encrypt.key-secret") => o.levels[level].key_secret = Some(value),
                (_, "encrypt.format") => o.levels[level].format = Some(value),
                (0, "driver") => o.driver = Some(value),
                (0, "file.filename") => filename = Some(value),
                (0, "file.driver") if value == "file" => {}
                (0, "file.driver") => {
                    return Err(format!(
                        "Could not open '{text}': instar opens local files only (file.driver=file)"
                    ))
                }
                _ => return Err(unsupported(&key)),
            }
        }
        let Some(f) = filename else {
            return Err(format!(
                "Could not open '{text}': A block device must be specified for \"file\""
            ));
        };
        o.filename = f;
        Ok(o)
    }

    /// The `encrypt.` keys given for the image `level` levels below FILE, as that
    /// image's own options name them.
    pub fn keys_at(&self, level: usize) -> Vec<&'static str> {
        let Some(l) = self.levels.get(level) else {
            return Vec::new();
        };
        let mut v = Vec::new();
        if l.format.is_some() {
            v.push("encrypt.format");
        }
        if l.key_secret.is_some() {
            v.push("encrypt.key-secret");
        }
        v
    }

    /// Whether QEMU names the overlay by a `json:` filename: it does when any image of
    /// the chain got runtime options here (QEMU's "strong" options: `encrypt.key-secret`,
    /// and any backing override).
    pub fn has_json_name(&self) -> bool {
        self.levels[0].key_secret.is_some() || self.levels.iter().skip(1).any(|l| !l.is_empty())
    }

    /// Whether the backing file of the image `level` levels below FILE is opened with
    /// options of its own (any `backing.…` key below that level; QEMU's
    /// `bdrv_backing_overridden`), and if so whether they give it a `json:` name (its
    /// `encrypt.key-secret`, or options further down, as [`Self::json_name`] builds it).
    pub fn backing_overridden(&self, level: usize) -> Option<bool> {
        let below = level + 1;
        if self.levels.iter().skip(below).all(|l| l.is_empty()) {
            return None;
        }
        let own = self
            .levels
            .get(below)
            .is_some_and(|l| l.key_secret.is_some());
        Some(own || self.levels.iter().skip(below + 1).any(|l| !l.is_empty()))
    }

    /// The overlay's `json:` filename as QEMU prints it, given each image's format and
    /// filename (the overlay first, then its backing chain nearest first).
    pub fn json_name(&self, chain: &[(String, String)]) -> String {
        format!("json:{}", self.json_level(0, chain))
    }

    fn json_level(&self, level: usize, chain: &[(String, String)]) -> String {
        let (driver, filename) = chain.get(level).cloned().unwrap_or_default();
        let file = qdict_json(vec![
            ("driver", json_str("file")),
            ("filename", json_str(&filename)),
        ]);
        let mut entries = vec![("driver", json_str(&driver)), ("file", file)];
        if let Some(id) = &self.levels[level].key_secret {
            entries.push(("encrypt.key-secret", json_str(id)));
        }
        if self.levels.iter().skip(level + 1).any(|l| !l.is_empty()) {
            entries.push(("backing", self.json_level(level + 1, chain)));
        }
        qdict_json(entries)
    }
}

fn unsupported(key: &str) -> String {
    format!(
        "--image-opts: option '{key}' is not supported by instar (only driver, file.filename, \
         file.driver=file, encrypt.key-secret, encrypt.format, and encrypt options under backing.)"
    )
}

/// The key QEMU's `qdict_first` returns among `keys`: the lowest QDict bucket.
pub fn qdict_first(keys: &[String]) -> Option<&String> {
    keys.iter().min_by_key(|k| qdict_bucket(k))
}

/// QEMU's `tdb_hash`, which orders a QDict's keys (bucket = hash % 512).
fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut v = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// A QDict as QEMU's JSON writer prints it: keys in bucket order.
fn qdict_json(mut entries: Vec<(&str, String)>) -> String {
    entries.sort_by_key(|(k, _)| qdict_bucket(k));
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}: {v}", json_str(k)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// A JSON string as QEMU's `qobject_to_json` quotes it.
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_match_qemu() {
        let o =
            ImageOpts::parse("driver=qcow2,file.filename=e1.qcow2,encrypt.key-secret=s").unwrap();
        assert!(o.has_json_name());
        let chain = [("qcow2".to_string(), "e1.qcow2".to_string())];
        assert_eq!(
            o.json_name(&chain),
            r#"json:{"encrypt.key-secret": "s", "driver": "qcow2", "file": {"driver": "file", "filename": "e1.qcow2"}}"#
        );
        let o = ImageOpts::parse(
            "driver=qcow2,file.filename=e1.qcow2,encrypt.key-secret=s,backing.encrypt.key-secret=s",
        )
        .unwrap();
        let chain = [
            ("qcow2".to_string(), "e1.qcow2".to_string()),
            ("qcow2".to_string(), "eb.qcow2".to_string()),
        ];
        assert_eq!(
            o.json_name(&chain),
            r#"json:{"backing": {"encrypt.key-secret": "s", "driver": "qcow2", "file": {"driver": "file", "filename": "eb.qcow2"}}, "encrypt.key-secret": "s", "driver": "qcow2", "file": {"driver": "file", "filename": "e1.qcow2"}}"#
        );
    }

    #[test]
    fn backing_links_overridden_by_options() {
        let o = ImageOpts::parse("driver=qcow2,file.filename=t,encrypt.key-secret=s").unwrap();
        assert_eq!(o.backing_overridden(0), None);
        let o =
            ImageOpts::parse("driver=qcow2,file.filename=t,backing.encrypt.key-secret=s").unwrap();
        assert_eq!(o.backing_overridden(0), Some(true));
        assert_eq!(o.backing_overridden(1), None);
        let o = ImageOpts::parse("file.filename=t,backing.encrypt.format=luks").unwrap();
        assert_eq!(o.backing_overridden(0), Some(false));
        let o = ImageOpts::parse("file.filename=t,backing.backing.encrypt.format=luks").unwrap();
        assert_eq!(o.backing_overridden(0), Some(true));
        assert_eq!(o.backing_overridden(1), Some(false));
    }

    #[test]
    fn parse_rules() {
        let o = ImageOpts::parse("file.filename=a,,b,backing.backing.encrypt.format=luks").unwrap();
        assert_eq!(o.filename, "a,b");
        assert_eq!(o.levels.len(), 3);
        assert_eq!(o.levels[2].format.as_deref(), Some("luks"));
        assert!(ImageOpts::parse("driver=qcow2")
            .unwrap_err()
            .contains("A block device must be specified"));
        assert!(ImageOpts::parse("file.filename=a,cache.direct=on")
            .unwrap_err()
            .contains("'cache.direct'"));
        assert!(ImageOpts::parse("file.filename=a,backing.file.filename=b").is_err());
    }
}
