//! The `instar` library: the parts of the CLI that tests and the binary share.

pub mod sandbox;

pub mod args;
pub mod chain;
pub mod cli;
pub mod compress_libs;
pub mod drivers;
pub mod failure;
pub mod files;
pub mod getopt;
pub mod guest;
pub mod image_opts;
pub mod locks;
pub mod paths;
pub mod policy;
pub mod progress;
pub mod rebase_cmd;
pub mod report;
pub mod sandbox_guest;
pub mod sanitize;
pub mod secrets;
