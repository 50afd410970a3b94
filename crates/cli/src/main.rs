//! `instar`: a sandboxed `qemu-img rebase`. See `instar --help`.

#![forbid(unsafe_code)]

use std::time::Duration;

/// Environment variable that sets the sandbox watchdog: seconds without a VM exit after
/// which a guest is stopped (default 30).
const WATCHDOG_ENV: &str = "INSTAR_WATCHDOG_SECS";
/// Environment variable that sets every VM's total deadline in seconds (default: in
/// proportion to the work, see docs/sandbox-bounds.md).
const DEADLINE_ENV: &str = "INSTAR_DEADLINE_SECS";

/// Seconds from the environment variable `name`, more than 0 and at most `max`; a bad
/// value ends the process with a message.
fn secs_from_env(name: &str, max: f64) -> Option<Duration> {
    let value = std::env::var_os(name)?;
    match value
        .to_str()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= max)
    {
        Some(secs) => Some(Duration::from_secs_f64(secs)),
        None => {
            eprintln!(
                "instar: Invalid {name} value '{}': expected seconds, more than 0 and at \
                 most {max}",
                instar::sanitize::escape_text(&value.to_string_lossy())
            );
            std::process::exit(1);
        }
    }
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut guest = instar::sandbox_guest::SandboxGuest::default();
    if let Some(limit) = secs_from_env(WATCHDOG_ENV, 86400.0) {
        guest.options.watchdog = limit;
    }
    // Up to 30 days: a deadline is a backstop, not a schedule.
    guest.options.deadline = secs_from_env(DEADLINE_ENV, 2_592_000.0);
    // Checked here too (the rebase reads it again), so a bad value stops before anything
    // is opened or printed, as the other variables do.
    if let Err(e) = instar::compress_libs::zstd_from_env() {
        eprintln!("instar: {e}");
        std::process::exit(1);
    }
    let status = instar::cli::run(&args, &mut guest);
    std::process::exit(status);
}
