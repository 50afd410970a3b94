//! Work bounds on what a header asks for. QEMU has none (a crafted header with four
//! billion PBKDF2 iterations keeps qemu-img busy for hours); instar refuses such a
//! header before any key derivation.
//!
//! The bounds are set well above what `qemu-img create` writes: it times PBKDF2 for
//! `encrypt.iter-time` (default 2000 ms), which on today's fastest cores gives a few
//! million iterations for SHA-256 (SHA-1 and SHA-512 a little more). 16 Mi iterations per
//! derivation leave a wide margin; the worst header, eight active slots at the bound and
//! a wrong passphrase, costs 9 x 16 Mi HMAC iterations, about a minute of guest CPU.

/// Most PBKDF2 iterations accepted for one key slot, and for the master-key digest.
pub const MAX_ITERATIONS: u32 = 1 << 24;
