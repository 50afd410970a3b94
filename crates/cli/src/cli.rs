//! The `instar` command: dispatch, and printing of results and errors.

use std::ffi::OsString;
use std::io::Write;

use crate::args::{self, OutputFormat, Parsed, RebaseArgs, PROG};
use crate::guest::Guest;
use crate::progress::{Progress, Target};
use crate::rebase_cmd;
use crate::report;

/// Run `instar` with `args` (without the program name); returns the exit status.
pub fn run(args: &[OsString], guest: &mut dyn Guest) -> i32 {
    let (command, rest) = match args::parse_top(args) {
        Ok(Parsed::Help(text)) | Ok(Parsed::Version(text)) => return print_stdout(&text),
        Ok(Parsed::Run(c)) => c,
        Err(e) => return usage_error(&e),
    };
    if command != "rebase" {
        eprintln!(
            "{PROG}: Command not found: {}\nTry '{PROG} --help' for more information",
            command.to_string_lossy()
        );
        return 1;
    }
    match args::parse_rebase(&rest) {
        Ok(Parsed::Help(text)) | Ok(Parsed::Version(text)) => print_stdout(&text),
        Ok(Parsed::Run(a)) => rebase(&a, guest),
        Err(e) => usage_error(&e),
    }
}

fn usage_error(e: &args::UsageError) -> i32 {
    eprintln!("{e}");
    1
}

fn print_stdout(text: &str) -> i32 {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
    0
}

/// `instar rebase` once its arguments are parsed: qemu-img's progress frame around the
/// work, then the result line or object, or the error.
fn rebase(a: &RebaseArgs, guest: &mut dyn Guest) -> i32 {
    let target = match (a.progress, a.output) {
        (false, _) => Target::Off,
        (true, OutputFormat::Human) => Target::Stdout,
        (true, OutputFormat::Json) => Target::Stderr,
    };
    let mut progress = Progress::new(target);
    progress.print(0.0, 100);
    match rebase_cmd::rebase(a, guest, &mut progress) {
        Ok(done) => {
            progress.print(100.0, 0);
            progress.end();
            let text = match a.output {
                OutputFormat::Human if a.quiet => return 0,
                OutputFormat::Human => report::human(&done).to_string(),
                OutputFormat::Json => report::json(&a.file, &done).to_string(),
            };
            print_stdout(&text)
        }
        Err(f) => {
            // qemu-img prints the error, then (for errors of the change itself) its final
            // progress value, then the progress newline.
            eprintln!("{PROG}: {}", f.text);
            if f.at_change {
                progress.print(100.0, 0);
            }
            progress.end();
            1
        }
    }
}
