//! What a freestanding Rust binary must provide itself: the memory functions
//! (compiler_builtins on this target exports only mangled versions), the
//! personality symbol the precompiled libcore references, and the panic
//! handler. All of it runs in ring 3.

use core::arch::asm;

/// # Safety
/// The usual `memcpy` contract: valid, non-overlapping ranges.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear (ring-3 entry and the ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The usual `memmove` contract: valid ranges, overlap allowed.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src or past its end: a forward copy never reads what it wrote.
        // SAFETY: the caller's contract.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards (DF set, then cleared again) from the last byte.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dest.wrapping_add(n).wrapping_sub(1) => _,
             inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
             options(nostack));
    }
    dest
}

/// # Safety
/// The usual `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The usual `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, within both ranges by the caller's contract.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// The usual `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled libcore references this symbol even with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// liballoc's precompiled formatting code references this; with
/// `panic = "abort"` nothing unwinds, so it is never reached.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::channel::fatal(
        protocol::MessageKind::Panic,
        protocol::ExitCode::Panic,
        format_args!("_Unwind_Resume called: unwinding is not supported"),
    )
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::channel::fatal(
        protocol::MessageKind::Panic,
        protocol::ExitCode::Panic,
        format_args!("{info}"),
    )
}
