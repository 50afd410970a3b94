//! Ring-0 entry and the few symbols a `no_std` binary on the host target must provide.
//!
//! The VMM starts the vCPU in 64-bit long mode at CPL0 with RDI = end of guest RAM.
//! kvm-pvm runs CPL0 code in an instruction emulator that cannot execute SSE, so the
//! stub only enables the FPU/SSE state (and AVX state where the CPU has it) and drops to
//! CPL3 with `iretq`; all Rust code runs at CPL3. PVM does not enforce CR4/XCR0 at CPL3,
//! but hardware KVM does: this enabling sequence must stay correct on its own.

use core::arch::global_asm;

/// GDT selectors written by the VMM (crates/vmm/src/memory.rs), with RPL 3.
pub const USER_DATA_SELECTOR: u64 = 0x18 | 3;
pub const USER_CODE_SELECTOR: u64 = 0x20 | 3;

global_asm!(
    ".section .boot, \"ax\"",
    ".global _start",
    "_start:",
    // The iretq frame goes on the top of the (still empty) user stack.
    "    lea rsp, [rip + __stack_top]",
    "    mov r12, rdi",
    // CR0: EM=0 (no FPU emulation), MP=1 (WAIT honours TS).
    "    mov rax, cr0",
    "    and rax, ~(1 << 2)",
    "    or rax, (1 << 1)",
    "    mov cr0, rax",
    // CR4: OSFXSR (FXSAVE/SSE) | OSXMMEXCPT (SIMD exceptions as #XM).
    "    mov rax, cr4",
    "    or rax, (1 << 9) | (1 << 10)",
    "    mov cr4, rax",
    // XSAVE-capable CPU: CR4.OSXSAVE, then XCR0 = x87 | SSE (| AVX when CPUID has it).
    "    mov eax, 1",
    "    xor ecx, ecx",
    "    cpuid",
    "    bt ecx, 26",
    "    jnc 2f",
    "    mov r13d, ecx",
    "    mov rax, cr4",
    "    or rax, (1 << 18)",
    "    mov cr4, rax",
    "    mov eax, 3",
    "    bt r13d, 28",
    "    jnc 1f",
    "    or eax, 4",
    "1:",
    "    xor edx, edx",
    "    xor ecx, ecx",
    "    xsetbv",
    "2:",
    // iretq to CPL3: SS, RSP, RFLAGS (interrupts off), CS, RIP. RSP = top - 8 gives the
    // SysV alignment a called function expects.
    "    mov rdi, r12",
    "    lea rax, [rip + __stack_top]",
    "    sub rax, 8",
    "    push {ss}",
    "    push rax",
    "    push 0x2",
    "    push {cs}",
    "    lea rax, [rip + {main}]",
    "    push rax",
    "    iretq",
    ss = const USER_DATA_SELECTOR,
    cs = const USER_CODE_SELECTOR,
    main = sym crate::guest_main,
);

// The compiler lowers copies and fills to these; `rep movsb`/`rep stosb` in asm keep LLVM
// from turning a Rust loop back into a call to the function itself.

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap: a forward copy is correct.
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
        return unsafe { memcpy(dest, src, n) };
    }
    // dest lies inside [src, src + n): copy backwards with the direction flag set.
    // SAFETY: the caller guarantees both ranges are valid; DF is restored before return.
    unsafe {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            options(nostack)
        );
    }
    dest
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes.
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
/// Standard C `memcmp` contract.
///
/// Safe mode compares gigabytes: equal prefixes are skipped a word at a time (32 bytes
/// per step, then 8), and only the last differing word is compared byte by byte.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; every read
    // below (all through `word`) stays below `n` and uses unaligned loads.
    let word = |p: *const u8, i: usize| unsafe { (p.add(i) as *const u64).read_unaligned() };
    let mut i = 0;
    while i + 32 <= n {
        let diff = (word(a, i) ^ word(b, i))
            | (word(a, i + 8) ^ word(b, i + 8))
            | (word(a, i + 16) ^ word(b, i + 16))
            | (word(a, i + 24) ^ word(b, i + 24));
        if diff != 0 {
            break;
        }
        i += 32;
    }
    while i + 8 <= n && word(a, i) == word(b, i) {
        i += 8;
    }
    while i < n {
        // SAFETY: as above, `i < n`.
        let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the precompiled `alloc`/`core` (built with unwinding); never reached
/// with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::runtime::halt()
}

/// See [`_Unwind_Resume`].
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
