//! `instar`: a sandboxed `qemu-img rebase`. See `instar --help`.

use std::time::Duration;

/// Environment variable that sets the sandbox watchdog: seconds without a VM exit after
/// which a guest is stopped (default 30).
const WATCHDOG_ENV: &str = "INSTAR_WATCHDOG_SECS";

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut guest = instar::sandbox_guest::SandboxGuest::default();
    if let Some(value) = std::env::var_os(WATCHDOG_ENV) {
        match value
            .to_str()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86400.0)
        {
            Some(secs) => guest.options.watchdog = Duration::from_secs_f64(secs),
            None => {
                eprintln!(
                    "instar: Invalid {WATCHDOG_ENV} value '{}': expected seconds, more than 0 \
                     and at most 86400",
                    value.to_string_lossy()
                );
                std::process::exit(1);
            }
        }
    }
    let status = instar::cli::run(&args, &mut guest);
    std::process::exit(status);
}
