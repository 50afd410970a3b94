//! Work bounds on what a header asks for. QEMU has none (a crafted header with four
//! billion PBKDF2 iterations keeps qemu-img busy for hours); instar refuses such a
//! header before any key derivation.
//!
//! `qemu-img create` times PBKDF2 for `encrypt.iter-time` (default 2000 ms): on a
//! current x86 core with SHA extensions that gives about 8 Mi iterations of
//! PBKDF2-HMAC-SHA-256 for a key slot (2 Mi for the master-key digest, an eighth of a
//! second's worth). 32 Mi iterations per derivation leaves room for a four times faster
//! machine or a longer iter-time. One derivation of 32 Mi iterations takes about 8 s in
//! the guest with SHA extensions (up to about 25 s without); the unlock makes a VM exit
//! before each derivation, so the sandbox's 30 s no-progress watchdog sees each one
//! alone. The worst header, eight active slots at the bound and a wrong passphrase,
//! costs 16 such derivations: about two minutes with SHA extensions, within the VM's
//! total deadline of five minutes; on a machine without them such a header can reach
//! the deadline (`INSTAR_DEADLINE_SECS` raises it) and the command fails, exit 1,
//! nothing written.

/// Most PBKDF2 iterations accepted for one key slot, and for the master-key digest.
pub const MAX_ITERATIONS: u32 = 1 << 25;
