//! One AFL++ target binary for every fuzz target: `INSTAR_FUZZ_TARGET` names it (see
//! `instar-fuzz list`). A broken invariant panics, which AFL++ records as a crash.

use instar_fuzz::campaign::run_one;
use instar_fuzz::memory::CountingAlloc;
use instar_fuzz::targets::Target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    let name = std::env::var("INSTAR_FUZZ_TARGET").unwrap_or_default();
    let Some(target) = Target::from_name(&name) else {
        eprintln!("INSTAR_FUZZ_TARGET must name a target (instar-fuzz list), not {name:?}");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        if let Err(what) = run_one(target, data) {
            panic!("{}: {what}", target.name());
        }
    });
}
