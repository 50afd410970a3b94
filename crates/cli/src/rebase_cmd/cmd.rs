//! The command being run: its arguments, and how its messages name FILE and `-b`.

use std::ffi::OsStr;

use instar_abi::ErrorKind;

use crate::args::RebaseArgs;
use crate::failure::Failure;
use crate::guest::Refusal;

/// `instar rebase` as typed.
pub struct Cmd<'a> {
    pub args: &'a RebaseArgs,
    /// FILE as typed, for messages.
    pub file: String,
    /// `-b` as typed, for messages.
    pub backing: String,
}

/// Where a message about a file comes from, for QEMU's prefixes.
#[derive(Clone, Copy)]
pub enum Role {
    /// FILE: "Could not open 'FILE': …".
    Overlay,
    /// The `-b` file: "Could not open new backing file '-b': …".
    NewBacking,
}

/// A name the user typed, as qemu-img prints it (non-UTF-8 bytes replaced).
pub fn lossy(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

impl<'a> Cmd<'a> {
    pub fn new(args: &'a RebaseArgs) -> Cmd<'a> {
        Cmd {
            args,
            // With --image-opts QEMU names FILE by the options as typed.
            file: args
                .image_opts
                .as_ref()
                .map_or_else(|| lossy(&args.file), |o| o.text.clone()),
            backing: lossy(&args.backing),
        }
    }

    /// How QEMU's messages about the file in `role` begin.
    pub fn prefix(&self, role: Role) -> String {
        match role {
            Role::Overlay => format!("Could not open '{}': ", self.file),
            Role::NewBacking => format!("Could not open new backing file '{}': ", self.backing),
        }
    }

    /// The `encrypt.` options of the image `level` levels below FILE (0: FILE) for
    /// device `dev`, as the guest gets them.
    pub fn key(&self, level: usize, dev: u8) -> Option<instar_abi::ImageKey> {
        let o = self.args.image_opts.as_ref()?;
        o.levels.get(level)?.key(dev, &self.args.secrets)
    }

    /// An error of the backing-file change itself.
    pub fn change(&self, why: &str) -> Failure {
        Failure::change(&self.backing, why)
    }

    /// A guest refusal about the file in `role`; a refusal of the change itself names
    /// `-b` instead.
    pub fn refusal(&self, role: Role, r: &Refusal) -> Failure {
        match r.kind {
            ErrorKind::ChangeBacking => self.change(&r.message),
            _ => Failure::refused(&self.prefix(role), r),
        }
    }
}
