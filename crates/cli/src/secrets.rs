//! `--object secret,…`: the subset of QEMU's `--object` syntax that defines secrets,
//! with QEMU's messages. A secret's bytes stay in a [`SecretBytes`] (never printed,
//! wiped on drop) until they are copied into a sandbox request for the image that
//! names them; only the guest uses them.

use std::fmt;
use std::path::Path;

use instar_abi::{KeySecret, Passphrase};
use zeroize::Zeroizing;

/// A secret's data. Debug is redacted; there is no Display.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(<redacted>)")
    }
}

/// One `--object secret` definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub id: String,
    data: SecretBytes,
}

/// Every secret defined on the command line, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets(Vec<Secret>);

/// Splits a QemuOpts string on commas; `,,` is a literal comma.
pub fn split_opts(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// The keys a `secret` object takes (QEMU's properties of `secret`).
const SECRET_KEYS: &[&str] = &[
    "qom-type", "id", "data", "file", "format", "keyid", "iv", "loaded",
];

impl Secrets {
    /// Define the object `text` (one `--object` argument), as QEMU's getopt loop does
    /// when it meets the option. Errors are QEMU's texts (or instar's for what it
    /// does not support), to print after `instar: `.
    pub fn define(&mut self, text: &str) -> Result<(), String> {
        let mut kv: Vec<(String, String)> = Vec::new();
        for (i, p) in split_opts(text).into_iter().enumerate() {
            match p.split_once('=') {
                Some((k, v)) => kv.push((k.to_string(), v.to_string())),
                // The first bare word is the object's type (QEMU's implied key).
                None if i == 0 => kv.push(("qom-type".into(), p)),
                None => kv.push((p, "on".into())),
            }
        }
        let get = |k: &str| {
            kv.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let Some(kind) = get("qom-type") else {
            return Err("Parameter 'qom-type' is missing".into());
        };
        if kind != "secret" {
            return Err(format!(
                "--object '{kind}' is not supported: instar defines only 'secret' objects"
            ));
        }
        let Some(id) = get("id") else {
            return Err("Parameter 'id' is missing".into());
        };
        let raw = match get("format").as_deref() {
            None | Some("raw") => true,
            Some("base64") => false,
            Some(f) => return Err(format!("Parameter 'format' does not accept value '{f}'")),
        };
        if let Some((k, _)) = kv.iter().find(|(k, _)| !SECRET_KEYS.contains(&k.as_str())) {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
        if self.0.iter().any(|s| s.id == id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let bytes = load(get("data"), get("file"))?;
        if get("keyid").is_some() || get("iv").is_some() {
            return Err(
                "--object secret: 'keyid' and 'iv' (a secret encrypted with another secret) \
                 are not supported by instar"
                    .into(),
            );
        }
        let data = if raw { bytes } else { base64(&bytes)? };
        self.0.push(Secret {
            id,
            data: SecretBytes(data),
        });
        Ok(())
    }

    /// `encrypt.key-secret=ID` as the guest gets it: the data, or why QEMU could not
    /// use it (it reports that only if the image turns out to be encrypted).
    pub fn lookup(&self, id: &str) -> KeySecret {
        match self.0.iter().find(|s| s.id == id) {
            None => KeySecret::Unknown(id.as_bytes().to_vec()),
            // glib's g_utf8_validate with a length refuses an embedded NUL too.
            Some(s) if s.data.0.contains(&0) || std::str::from_utf8(&s.data.0).is_err() => {
                KeySecret::NotUtf8(id.as_bytes().to_vec())
            }
            Some(s) => KeySecret::Data(Passphrase::new(s.data.0.to_vec())),
        }
    }
}

/// `data=` or the contents of `file=` (glib's messages for an unreadable file).
fn load(data: Option<String>, file: Option<String>) -> Result<Zeroizing<Vec<u8>>, String> {
    match (data, file) {
        (Some(_), Some(_)) => Err("'file' and 'data' are mutually exclusive".into()),
        (None, None) => Err("Either 'file' or 'data' must be provided".into()),
        (Some(d), None) => Ok(Zeroizing::new(d.into_bytes())),
        (None, Some(f)) => std::fs::read(Path::new(&f))
            .map(Zeroizing::new)
            .map_err(|e| {
                let why = crate::files::io_text(&e);
                format!("Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {why}")
            }),
    }
}

/// QEMU's `qbase64_decode`: only base64 characters (and `=`, newline) are accepted,
/// then glib's decoder, which drops an incomplete last group.
fn base64(input: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    const VALID: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n";
    if input.contains(&0) {
        return Err("Base64 data contains embedded NUL characters".into());
    }
    if !input.iter().all(|b| VALID.contains(b)) {
        return Err("Base64 data contains invalid characters".into());
    }
    let rank = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            _ => return None,
        })
    };
    let mut out = Zeroizing::new(Vec::with_capacity(input.len() / 4 * 3));
    let (mut v, mut n) = (0u32, 0);
    for &c in input {
        if let Some(r) = rank(c) {
            v = (v << 6) | r;
            n += 1;
            if n == 4 {
                out.extend_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8]);
                v = 0;
                n = 0;
            }
        }
    }
    // glib drops one output byte per '=' among the last two base64 characters.
    let mut left = 2;
    for &c in input.iter().rev() {
        if left == 0 {
            break;
        }
        if rank(c).is_some() {
            if c == b'=' && !out.is_empty() {
                out.pop();
            }
            left -= 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &Secrets, id: &str) -> Vec<u8> {
        match s.lookup(id) {
            KeySecret::Data(p) => p.expose().to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn definitions_and_qemu_messages() {
        let mut s = Secrets::default();
        s.define("secret,id=a,data=pw,,x").unwrap();
        assert_eq!(data(&s, "a"), b"pw,x");
        s.define("secret,id=b,data=cHc=,format=base64").unwrap();
        assert_eq!(data(&s, "b"), b"pw");
        s.define("secret,id=c,data=pw,format=base64").unwrap();
        assert_eq!(data(&s, "c"), b"");
        s.define("secret,id=d,data=aGVsbG8gd29ybGQ=,format=base64")
            .unwrap();
        assert_eq!(data(&s, "d"), b"hello world");
        let err = |t: &str| Secrets::default().define(t).unwrap_err();
        assert_eq!(err("secret,data=x"), "Parameter 'id' is missing");
        assert_eq!(
            err("secret,id=s"),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            err("secret,id=s,data=x,file=y"),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            err("secret,id=s,data=x,bogus=1"),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err("secret,id=s,data=x,format=hex"),
            "Parameter 'format' does not accept value 'hex'"
        );
        assert_eq!(
            err("secret,id=s,data=a b,format=base64"),
            "Base64 data contains invalid characters"
        );
        assert!(err("iothread,id=x").contains("only 'secret'"));
        assert_eq!(
            s.define("secret,id=a,data=again").unwrap_err(),
            "attempt to add duplicate property 'a' to object (type 'container')"
        );
        assert_eq!(s.lookup("zz"), KeySecret::Unknown(b"zz".to_vec()));
        assert!(!format!("{s:?}").contains("pw"));
    }
}
