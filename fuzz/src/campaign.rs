//! A seeded mutation campaign over one target: deterministic for a given seed, with a
//! little feedback (inputs that produce an outcome not seen before join the pool of
//! parents), and the invariants every execution is held to: no panic (debug builds
//! check arithmetic), the target's own checks, a memory budget and a time budget.

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::case::Case;
use crate::memory;
use crate::mutate::mutate;
use crate::rng::Rng;
use crate::targets::Target;

/// Bytes one execution may allocate above what was live when it started. The largest
/// legitimate allocations are bounded by the parsers' own limits (a 32 MiB L1 table,
/// an 8 MiB zstd window, the plan's 64 MiB).
pub const MEMORY_BUDGET: usize = 256 << 20;
/// Longest one execution may take (debug build, shared machine).
pub const TIME_BUDGET: Duration = Duration::from_secs(10);
/// Most pool entries kept besides the seeds.
const POOL: usize = 512;

#[derive(Debug, Clone)]
pub struct Finding {
    pub what: String,
    pub input: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub execs: u64,
    pub elapsed: Duration,
    pub outcomes: usize,
    pub slowest: Duration,
    pub peak_memory: usize,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub execs: u64,
    pub time: Duration,
}

thread_local! {
    static IN_TARGET: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics inside a target are recorded (message and place), not printed.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let recorded = IN_TARGET.with(|t| {
                let mut t = t.borrow_mut();
                if t.is_some() {
                    *t = Some(info.to_string());
                    true
                } else {
                    false
                }
            });
            if !recorded {
                default(info);
            }
        }));
    });
}

/// One execution with every invariant: `Ok(outcome signature)` or what broke.
pub fn run_one(target: Target, data: &[u8]) -> Result<(u64, usize, Duration), String> {
    install_hook();
    IN_TARGET.with(|t| *t.borrow_mut() = Some(String::from("panic")));
    let base = memory::start();
    let start = Instant::now();
    let r = panic::catch_unwind(AssertUnwindSafe(|| target.run(data)));
    let took = start.elapsed();
    let used = memory::peak().saturating_sub(base);
    let panic_msg = IN_TARGET.with(|t| t.borrow_mut().take());
    let sig = match r {
        Ok(Ok(sig)) => sig,
        Ok(Err(broken)) => return Err(broken),
        Err(_) => return Err(panic_msg.unwrap_or_else(|| String::from("panic"))),
    };
    if used > MEMORY_BUDGET {
        return Err(format!("allocated {used} bytes (budget {MEMORY_BUDGET})"));
    }
    if took > TIME_BUDGET {
        return Err(format!("took {took:?} (budget {TIME_BUDGET:?})"));
    }
    Ok((sig, used, took))
}

/// A mutant of `parent` for `target`.
pub fn mutant(target: Target, rng: &mut Rng, parent: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    if !target.takes_case() {
        let mut d = parent.to_vec();
        mutate(rng, &mut d, others);
        return d;
    }
    let mut case = Case::decode(parent);
    if case.images.is_empty() {
        case.images.push(Vec::new());
    }
    match rng.below(10) {
        0 => case.flags ^= 1 << rng.below(5),
        1 => {
            let k = rng.index(case.images.len());
            case.images[k] = others
                .get(rng.index(others.len()))
                .cloned()
                .unwrap_or_default();
        }
        _ => {
            // The overlay most often: it is what the rebase writes.
            let k = if rng.one_in(2) {
                0
            } else {
                rng.index(case.images.len())
            };
            mutate(rng, &mut case.images[k], others);
        }
    }
    case.encode()
}

/// Images to splice from: for cases, the images inside the seed cases.
fn splice_sources(target: Target, seeds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    if target.takes_case() {
        let mut v: Vec<Vec<u8>> = seeds.iter().flat_map(|s| Case::decode(s).images).collect();
        v.sort();
        v.dedup();
        v
    } else {
        seeds.to_vec()
    }
}

/// Run `target` from `seeds` until `budget` is spent; `on_finding` sees each finding
/// as it happens (to save it), and the report keeps them all.
pub fn campaign(
    target: Target,
    seeds: &[Vec<u8>],
    budget: Budget,
    seed: u64,
    on_finding: &mut dyn FnMut(&Finding),
) -> Report {
    let mut rng = Rng::new(seed);
    let others = splice_sources(target, seeds);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut seen = HashSet::new();
    let mut report = Report::default();
    let start = Instant::now();
    let mut record =
        |report: &mut Report, input: Vec<u8>, r: Result<(u64, usize, Duration), String>| match r {
            Ok((sig, mem, took)) => {
                report.slowest = report.slowest.max(took);
                report.peak_memory = report.peak_memory.max(mem);
                seen.insert(sig)
            }
            Err(what) => {
                let f = Finding { what, input };
                on_finding(&f);
                report.findings.push(f);
                false
            }
        };
    for s in seeds {
        let r = run_one(target, s);
        record(&mut report, s.clone(), r);
        report.execs += 1;
    }
    while report.execs < budget.execs && start.elapsed() < budget.time {
        let parent = if pool.is_empty() || rng.one_in(2) {
            seeds
                .get(rng.index(seeds.len()))
                .cloned()
                .unwrap_or_default()
        } else {
            pool[rng.index(pool.len())].clone()
        };
        let child = mutant(target, &mut rng, &parent, &others);
        let r = run_one(target, &child);
        report.execs += 1;
        if record(&mut report, child.clone(), r) {
            if pool.len() < POOL {
                pool.push(child);
            } else {
                let i = rng.index(POOL);
                pool[i] = child;
            }
        }
    }
    report.elapsed = start.elapsed();
    report.outcomes = seen.len();
    report
}
