//! Command-line scanning with glibc `getopt_long` semantics, so that option errors read
//! exactly like qemu-img's (which prints glibc's messages with `argv[0]` = "qemu-img rebase").
//!
//! What is reproduced: option clusters (`-uqb x`), attached values (`-Fqcow2`,
//! `--backing=x`), a required value taken from the next argument whatever it looks like
//! (`-b -u` sets the backing to "-u"), unambiguous long prefixes (`--prog`), exact long
//! names winning over prefixes (`--backing`), `--` ending the options, and argument
//! permutation (options after the file name), which `POSIXLY_CORRECT` or [`Mode::StopAtPositional`]
//! turn off.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// One option a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct OptSpec {
    /// The identifier reported in [`Item::Opt`].
    pub id: &'static str,
    /// Short option letters (the first one, and aliases such as `-B` for `-F`).
    pub shorts: &'static [char],
    /// Long name without the dashes.
    pub long: Option<&'static str>,
    /// Whether the option requires a value.
    pub takes_value: bool,
}

/// One scanned element, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Opt {
        id: &'static str,
        value: Option<OsString>,
    },
    Positional(OsString),
}

/// Whether scanning permutes (GNU default) or stops at the first non-option (`+` in the
/// option string, as qemu-img's global options use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Permute,
    StopAtPositional,
}

/// A getopt error: the text glibc prints after `"<argv0>: "`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetoptError(pub String);

/// Scan `args` (without the program name). Returns the items found before the first error
/// and the error, if any: the caller acts on the items in order (e.g. `--help` before a
/// later bad option wins), then reports the error.
pub fn scan(args: &[OsString], specs: &[OptSpec], mode: Mode) -> (Vec<Item>, Option<GetoptError>) {
    let permute = mode == Mode::Permute && std::env::var_os("POSIXLY_CORRECT").is_none();
    let mut items = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_bytes();
        i += 1;
        if arg == b"--" {
            items.extend(args[i..].iter().cloned().map(Item::Positional));
            break;
        }
        if arg.len() < 2 || arg[0] != b'-' {
            if !permute {
                items.push(Item::Positional(args[i - 1].clone()));
                items.extend(args[i..].iter().cloned().map(Item::Positional));
                break;
            }
            items.push(Item::Positional(args[i - 1].clone()));
            continue;
        }
        let result = if arg[1] == b'-' {
            long_option(&arg[2..], args, &mut i, specs)
        } else {
            short_cluster(&arg[1..], args, &mut i, specs)
        };
        match result {
            Ok(found) => items.extend(found),
            Err((found, err)) => {
                items.extend(found);
                return (items, Some(err));
            }
        }
    }
    (items, None)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn long_option<'a>(
    body: &[u8],
    args: &[OsString],
    i: &mut usize,
    specs: &'a [OptSpec],
) -> Result<Vec<Item>, (Vec<Item>, GetoptError)> {
    let (name, inline) = match body.iter().position(|&c| c == b'=') {
        Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
        None => (body, None),
    };
    let exact = specs
        .iter()
        .find(|s| s.long.is_some_and(|l| l.as_bytes() == name));
    let spec = match exact {
        Some(s) => s,
        None => {
            let matches: Vec<&'a OptSpec> = specs
                .iter()
                .filter(|s| s.long.is_some_and(|l| l.as_bytes().starts_with(name)))
                .collect();
            match matches.as_slice() {
                [] => {
                    return Err((
                        vec![],
                        GetoptError(format!("unrecognized option '--{}'", lossy(body))),
                    ))
                }
                [one] => *one,
                many => {
                    let mut msg =
                        format!("option '--{}' is ambiguous; possibilities:", lossy(body));
                    for s in many {
                        msg.push_str(&format!(" '--{}'", s.long.unwrap_or_default()));
                    }
                    return Err((vec![], GetoptError(msg)));
                }
            }
        }
    };
    let long = spec.long.unwrap_or_default();
    let value = if spec.takes_value {
        match inline {
            Some(v) => Some(OsString::from_vec(v.to_vec())),
            None if *i < args.len() => {
                *i += 1;
                Some(args[*i - 1].clone())
            }
            None => {
                return Err((
                    vec![],
                    GetoptError(format!("option '--{long}' requires an argument")),
                ))
            }
        }
    } else {
        if inline.is_some() {
            return Err((
                vec![],
                GetoptError(format!("option '--{long}' doesn't allow an argument")),
            ));
        }
        None
    };
    Ok(vec![Item::Opt { id: spec.id, value }])
}

fn short_cluster(
    cluster: &[u8],
    args: &[OsString],
    i: &mut usize,
    specs: &[OptSpec],
) -> Result<Vec<Item>, (Vec<Item>, GetoptError)> {
    let mut found = Vec::new();
    let mut k = 0;
    while k < cluster.len() {
        // Option letters are ASCII; a non-ASCII byte is reported as glibc does, byte-wise.
        let c = cluster[k];
        k += 1;
        let spec = specs
            .iter()
            .find(|s| s.shorts.iter().any(|&l| l.is_ascii() && l as u8 == c));
        let Some(spec) = spec else {
            return Err((
                found,
                GetoptError(format!("invalid option -- '{}'", lossy(&[c]))),
            ));
        };
        if spec.takes_value {
            let value = if k < cluster.len() {
                OsStr::from_bytes(&cluster[k..]).to_os_string()
            } else if *i < args.len() {
                *i += 1;
                args[*i - 1].clone()
            } else {
                return Err((
                    found,
                    GetoptError(format!("option requires an argument -- '{}'", c as char)),
                ));
            };
            found.push(Item::Opt {
                id: spec.id,
                value: Some(value),
            });
            return Ok(found);
        }
        found.push(Item::Opt {
            id: spec.id,
            value: None,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptSpec] = &[
        OptSpec {
            id: "help",
            shorts: &['h'],
            long: Some("help"),
            takes_value: false,
        },
        OptSpec {
            id: "backing",
            shorts: &['b'],
            long: Some("backing"),
            takes_value: true,
        },
        OptSpec {
            id: "bfmt",
            shorts: &['F', 'B'],
            long: Some("backing-format"),
            takes_value: true,
        },
        OptSpec {
            id: "bcache",
            shorts: &['T'],
            long: Some("backing-cache"),
            takes_value: true,
        },
        OptSpec {
            id: "unsafe",
            shorts: &['u'],
            long: Some("backing-unsafe"),
            takes_value: false,
        },
        OptSpec {
            id: "progress",
            shorts: &['p'],
            long: Some("progress"),
            takes_value: false,
        },
        OptSpec {
            id: "quiet",
            shorts: &['q'],
            long: Some("quiet"),
            takes_value: false,
        },
    ];

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn opt(id: &'static str, v: Option<&str>) -> Item {
        Item::Opt {
            id,
            value: v.map(OsString::from),
        }
    }

    #[test]
    fn clusters_values_and_permutation() {
        let (items, err) = scan(
            &os(&["f.qcow2", "-uqb", "x", "-Bqcow2", "--backing=", "--prog"]),
            SPECS,
            Mode::Permute,
        );
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![
                Item::Positional("f.qcow2".into()),
                opt("unsafe", None),
                opt("quiet", None),
                opt("backing", Some("x")),
                opt("bfmt", Some("qcow2")),
                opt("backing", Some("")),
                opt("progress", None),
            ]
        );
    }

    #[test]
    fn value_taken_verbatim_from_next_argument() {
        let (items, err) = scan(&os(&["-b", "-u", "--", "-p"]), SPECS, Mode::Permute);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![opt("backing", Some("-u")), Item::Positional("-p".into())]
        );
    }

    #[test]
    fn glibc_messages() {
        let cases: &[(&[&str], &str)] = &[
            (&["-X"], "invalid option -- 'X'"),
            (&["--bogus=1"], "unrecognized option '--bogus=1'"),
            (&["-b"], "option requires an argument -- 'b'"),
            (&["--backing"], "option '--backing' requires an argument"),
            (&["--qui=1"], "option '--quiet' doesn't allow an argument"),
            (
                &["--back", "x"],
                "option '--back' is ambiguous; possibilities: '--backing' '--backing-format' '--backing-cache' '--backing-unsafe'",
            ),
        ];
        for (args, msg) in cases {
            let (_, err) = scan(&os(args), SPECS, Mode::Permute);
            assert_eq!(err, Some(GetoptError(msg.to_string())), "{args:?}");
        }
    }

    #[test]
    fn items_before_an_error_are_kept() {
        let (items, err) = scan(&os(&["-h", "-X"]), SPECS, Mode::Permute);
        assert_eq!(items, vec![opt("help", None)]);
        assert!(err.is_some());
        let (items, _) = scan(&os(&["-uX"]), SPECS, Mode::Permute);
        assert_eq!(items, vec![opt("unsafe", None)]);
    }

    #[test]
    fn stop_at_positional() {
        let (items, err) = scan(&os(&["rebase", "-X"]), SPECS, Mode::StopAtPositional);
        assert_eq!(err, None);
        assert_eq!(
            items,
            vec![
                Item::Positional("rebase".into()),
                Item::Positional("-X".into())
            ]
        );
    }
}
