//! vmdk monolithicSparse images.

#![no_std]

extern crate alloc;
