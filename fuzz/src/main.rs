//! `instar-fuzz`: long seeded campaigns and reproduction of saved inputs.
//!
//! ```text
//! instar-fuzz campaign TARGET|all [--execs N] [--secs S] [--seed N] [--seeds DIR] [--findings DIR]
//! instar-fuzz run TARGET FILE...
//! instar-fuzz seeds TARGET|all DIR [--seeds DIR]
//! instar-fuzz unpack FILE DIR
//! instar-fuzz mutate IN OUT SEED
//! instar-fuzz list
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use instar_fuzz::campaign::{campaign, run_one, Budget};
use instar_fuzz::memory::CountingAlloc;
use instar_fuzz::seeds;
use instar_fuzz::targets::Target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

struct Opts {
    execs: u64,
    secs: u64,
    seed: u64,
    seeds: Option<PathBuf>,
    findings: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        execs: u64::MAX,
        secs: 60,
        seed: 1,
        seeds: None,
        findings: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--execs" => o.execs = num(val()?)?,
            "--secs" => o.secs = num(val()?)?,
            "--seed" => o.seed = num(val()?)?,
            "--seeds" => o.seeds = Some(PathBuf::from(val()?)),
            "--findings" => o.findings = Some(PathBuf::from(val()?)),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    Ok(o)
}

fn targets(name: &str) -> Result<Vec<Target>, String> {
    if name == "all" {
        return Ok(Target::ALL.to_vec());
    }
    Target::from_name(name)
        .map(|t| vec![t])
        .ok_or_else(|| format!("unknown target {name}"))
}

fn run_campaign(name: &str, opts: &Opts) -> Result<bool, String> {
    let mut files = seeds::committed();
    if let Some(dir) = &opts.seeds {
        files.extend(seeds::load_dir(dir));
    }
    let mut clean = true;
    for t in targets(name)? {
        let seed_inputs = seeds::for_target(t, &files);
        let budget = Budget {
            execs: opts.execs,
            time: Duration::from_secs(opts.secs),
        };
        let mut save = |f: &instar_fuzz::campaign::Finding| {
            eprintln!("FINDING {}: {}", t.name(), f.what);
            if let Some(dir) = &opts.findings {
                let _ = std::fs::create_dir_all(dir);
                let h = instar_fuzz::targets::signature(0, &f.what);
                let _ = std::fs::write(dir.join(format!("{}-{h:016x}", t.name())), &f.input);
            }
        };
        let r = campaign(t, &seed_inputs, budget, opts.seed, &mut save);
        println!(
            "{}: {} execs in {:.1} s ({:.0}/s), {} seeds, {} outcomes, slowest {:?}, peak {} KiB, {} findings",
            t.name(),
            r.execs,
            r.elapsed.as_secs_f64(),
            r.execs as f64 / r.elapsed.as_secs_f64().max(1e-9),
            seed_inputs.len(),
            r.outcomes,
            r.slowest,
            r.peak_memory >> 10,
            r.findings.len()
        );
        clean &= r.findings.is_empty();
    }
    Ok(clean)
}

fn reproduce(name: &str, files: &[String]) -> Result<bool, String> {
    let t = Target::from_name(name).ok_or_else(|| format!("unknown target {name}"))?;
    let mut clean = true;
    for f in files {
        let data = std::fs::read(f).map_err(|e| format!("{f}: {e}"))?;
        match run_one(t, &data) {
            Ok((sig, mem, took)) => println!("{f}: ok (outcome {sig:016x}, {mem} bytes, {took:?})"),
            Err(what) => {
                println!("{f}: FINDING {what}");
                clean = false;
            }
        }
    }
    Ok(clean)
}

/// Write the seed inputs of a target (or of `all`, one directory each) into `dir`.
fn write_seeds(name: &str, dir: &str, opts: &Opts) -> Result<bool, String> {
    let mut files = seeds::committed();
    if let Some(extra) = &opts.seeds {
        files.extend(seeds::load_dir(extra));
    }
    for t in targets(name)? {
        let out = if name == "all" {
            PathBuf::from(dir).join(t.name())
        } else {
            PathBuf::from(dir)
        };
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        for (i, input) in seeds::for_target(t, &files).iter().enumerate() {
            std::fs::write(out.join(format!("seed-{i:03}")), input).map_err(|e| e.to_string())?;
        }
    }
    Ok(true)
}

/// Write a structure-aware mutant of the image `input` to `output` (for scripts).
fn mutate_file(input: &str, output: &str, seed: &str) -> Result<bool, String> {
    let mut data = std::fs::read(input).map_err(|e| format!("{input}: {e}"))?;
    let seed: u64 = seed.parse().map_err(|e| format!("seed: {e}"))?;
    let others: Vec<Vec<u8>> = seeds::committed().into_iter().map(|(_, d)| d).collect();
    let mut rng = instar_fuzz::rng::Rng::new(seed);
    instar_fuzz::mutate::mutate(&mut rng, &mut data, &others);
    std::fs::write(output, &data).map_err(|e| format!("{output}: {e}"))?;
    Ok(true)
}

/// Write the images of a case input as `DIR/0`, `DIR/1`, `DIR/2`, and its flags.
fn unpack(file: &str, dir: &str) -> Result<bool, String> {
    let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    let case = instar_fuzz::case::Case::decode(&data);
    std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
    for (i, img) in case.images.iter().enumerate() {
        std::fs::write(PathBuf::from(dir).join(i.to_string()), img).map_err(|e| e.to_string())?;
    }
    println!("flags {:#04x}", case.flags);
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("campaign") if args.len() >= 2 => parse(&args[2..]).and_then(|o| run_campaign(&args[1], &o)),
        Some("run") if args.len() >= 3 => reproduce(&args[1], &args[2..]),
        Some("unpack") if args.len() == 3 => unpack(&args[1], &args[2]),
        Some("mutate") if args.len() == 4 => mutate_file(&args[1], &args[2], &args[3]),
        Some("seeds") if args.len() >= 3 => parse(&args[3..]).and_then(|o| write_seeds(&args[1], &args[2], &o)),
        Some("list") => {
            Target::ALL.iter().for_each(|t| println!("{}", t.name()));
            Ok(true)
        }
        _ => Err(String::from("usage: instar-fuzz campaign TARGET|all [--execs N] [--secs S] [--seed N] [--seeds DIR] [--findings DIR] | run TARGET FILE... | seeds TARGET|all DIR [--seeds DIR] | unpack FILE DIR | mutate IN OUT SEED | list")),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("instar-fuzz: {e}");
            ExitCode::from(2)
        }
    }
}
