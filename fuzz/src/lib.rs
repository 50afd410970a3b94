//! Fuzzing the guest's parsers and planners on the stable toolchain.
//!
//! - [`targets`] (with [`qed_target`], [`repair_target`] and [`luks_target`]): one function per parser
//!   or planner the guest runs, over in-memory devices ([`dev::FuzzDev`]), with the
//!   invariants that hold for every input.
//! - [`mutate`] and [`layout`]: structure-aware mutations of qcow2, qed, vmdk and
//!   descriptor images; [`case`]: the framing of multi-image inputs.
//! - [`campaign`]: a seeded, deterministic mutation campaign (the test suite's short
//!   run and `scripts/fuzz.sh`'s long runs); [`memory`]: the per-execution memory
//!   budget. AFL++ drives the same targets through `fuzz/afl` (see `docs/fuzzing.md`).

extern crate alloc;

pub mod bitmaps_target;
pub mod campaign;
pub mod case;
pub mod compressor;
pub mod consistency;
pub mod dev;
pub mod layout;
pub mod luks_target;
pub mod memory;
pub mod mutate;
pub mod qed_target;
pub mod repair_target;
pub mod rng;
pub mod seeds;
pub mod targets;
