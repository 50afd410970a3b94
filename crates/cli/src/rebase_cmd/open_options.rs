//! `--image-opts` options that QEMU's open of FILE (and of its backing chain) leaves
//! unconsumed, which it then refuses, in the order its recursive open meets them:
//! options for a backing level below the end of the chain (`Must specify either
//! driver or file`, unless FILE itself has no backing file: then they are ignored),
//! then, deepest image first, `encrypt.` options of an image that is not qcow2, and
//! with `-u` (the backing chain is not opened) every `backing.` option.

use instar_abi::Format;

use super::cmd::{Cmd, Role};
use super::old_chain::OldChain;
use crate::chain::level_prefix;
use crate::failure::Failure;
use crate::image_opts::qdict_first;

fn unsupported(prefix: &str, format: Format, keys: &[String]) -> Result<(), Failure> {
    match qdict_first(keys) {
        Some(k) => Err(Failure::about(
            prefix,
            format!(
                "Block format '{}' does not support the option '{k}'",
                format.name()
            ),
        )),
        None => Ok(()),
    }
}

/// Refuse what QEMU's open refuses (see the module documentation); `old` is the old
/// chain in safe mode.
pub fn check(cmd: &Cmd, format: Format, old: Option<&OldChain>) -> Result<(), Failure> {
    let Some(o) = cmd.args.image_opts.as_ref() else {
        return Ok(());
    };
    let top = cmd.prefix(Role::Overlay);
    let own = |level: usize, fmt: Format| -> Vec<String> {
        if fmt == Format::Qcow2 {
            return Vec::new();
        }
        o.keys_at(level).into_iter().map(String::from).collect()
    };
    let Some(old) = old else {
        // -u: the chain is never opened, so every backing. option is left over.
        let mut keys = own(0, format);
        for level in 1..o.levels.len() {
            let prefix = "backing.".repeat(level);
            keys.extend(o.keys_at(level).into_iter().map(|k| format!("{prefix}{k}")));
        }
        return unsupported(&top, format, &keys);
    };
    let n = old.images.len();
    let deeper = (n + 1..o.levels.len()).any(|l| !o.keys_at(l).is_empty());
    if n > 0 && deeper {
        return Err(Failure::about(
            &level_prefix(&top, n + 1),
            "Must specify either driver or file",
        ));
    }
    for (i, img) in old.images.iter().enumerate().rev() {
        unsupported(
            &level_prefix(&top, i + 1),
            img.format,
            &own(i + 1, img.format),
        )?;
    }
    unsupported(&top, format, &own(0, format))
}
