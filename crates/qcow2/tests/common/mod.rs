//! Shared with the other format crates: see `instar-testkit`.
#![allow(unused_imports)]

pub use instar_testkit::*;
