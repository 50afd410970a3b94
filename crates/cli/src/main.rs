//! `instar`: a sandboxed `qemu-img rebase`. See `instar --help`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut guest = instar::sandbox_guest::SandboxGuest::default();
    let status = instar::cli::run(&args, &mut guest);
    std::process::exit(status);
}
