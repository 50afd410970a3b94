//! Format detection (see the crate docs).
