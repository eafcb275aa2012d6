//! Prologues a detour must refuse, built in assembly so their bytes are exactly known: one that
//! enters the kernel in the bytes the `jmp` would replace, and functions larger than 64 KiB
//! with a branch back into their prologue at the far end.
//!
//! `global_asm!` counts as unsafe code: the functions are only decoded, never called.
#![allow(unsafe_code)]

use evolve_code::{ErrorKind, Prologue};

core::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl evolve_test_syscall_prologue",
    "evolve_test_syscall_prologue:",
    "xor eax, eax",
    "syscall",
    "nop",
    "nop",
    "nop",
    "ret",
    ".globl evolve_test_syscall_prologue_end",
    "evolve_test_syscall_prologue_end:",
    ".p2align 4",
    ".globl evolve_test_int_prologue",
    "evolve_test_int_prologue:",
    "nop",
    "nop",
    "int 0x80",
    "nop",
    "ret",
    ".globl evolve_test_int_prologue_end",
    "evolve_test_int_prologue_end:",
    ".p2align 4",
    ".globl evolve_test_int3_prologue",
    "evolve_test_int3_prologue:",
    "push rbp",
    "int3",
    "mov rbp, rsp",
    "pop rbp",
    "ret",
    ".globl evolve_test_int3_prologue_end",
    "evolve_test_int3_prologue_end:",
    // 70 000 bytes of body, then a branch to offset 4, inside the 9 relocated bytes
    // (push rbp: 1, mov rbp, rsp: 3, mov eax, 1: 5).
    ".p2align 4",
    ".globl evolve_test_big_function",
    "evolve_test_big_function:",
    "push rbp",
    "mov rbp, rsp",
    "2:",
    "mov eax, 1",
    ".fill 70000, 1, 0x90",
    "dec eax",
    "jnz 2b",
    "pop rbp",
    "ret",
    ".globl evolve_test_big_function_end",
    "evolve_test_big_function_end:",
    // The same without the branch back: relocatable.
    ".p2align 4",
    ".globl evolve_test_big_plain_function",
    "evolve_test_big_plain_function:",
    "push rbp",
    "mov rbp, rsp",
    "mov eax, 1",
    ".fill 70000, 1, 0x90",
    "pop rbp",
    "ret",
    ".globl evolve_test_big_plain_function_end",
    "evolve_test_big_plain_function_end:",
);

extern "C" {
    fn evolve_test_syscall_prologue();
    fn evolve_test_syscall_prologue_end();
    fn evolve_test_int_prologue();
    fn evolve_test_int_prologue_end();
    fn evolve_test_int3_prologue();
    fn evolve_test_int3_prologue_end();
    fn evolve_test_big_function();
    fn evolve_test_big_function_end();
    fn evolve_test_big_plain_function();
    fn evolve_test_big_plain_function_end();
}

fn refusal(start: unsafe extern "C" fn(), end: unsafe extern "C" fn()) -> String {
    let (start, end) = (start as *const () as usize, end as *const () as usize);
    let err = Prologue::of(start, end - start).expect_err("the prologue must be refused");
    assert!(
        matches!(err.kind(), ErrorKind::Unrelocatable { .. }),
        "{err}"
    );
    err.to_string()
}

#[test]
fn a_prologue_with_a_system_call_is_refused() {
    let reason = refusal(
        evolve_test_syscall_prologue,
        evolve_test_syscall_prologue_end,
    );
    assert!(
        reason.contains("`syscall` at offset 2 enters the kernel"),
        "{reason}"
    );
}

#[test]
fn a_prologue_with_an_interrupt_is_refused() {
    let reason = refusal(evolve_test_int_prologue, evolve_test_int_prologue_end);
    assert!(
        reason.contains("`int` at offset 2 enters the kernel"),
        "{reason}"
    );
    let reason = refusal(evolve_test_int3_prologue, evolve_test_int3_prologue_end);
    assert!(
        reason.contains("`int3` at offset 1 enters the kernel"),
        "{reason}"
    );
}

#[test]
fn a_branch_into_the_prologue_beyond_64_kib_is_found() {
    let reason = refusal(evolve_test_big_function, evolve_test_big_function_end);
    assert!(
        reason.contains("branches into the overwritten bytes (to offset 4)"),
        "{reason}"
    );
    let (start, end) = (
        evolve_test_big_plain_function as *const () as usize,
        evolve_test_big_plain_function_end as *const () as usize,
    );
    let prologue = Prologue::of(start, end - start).expect("no branch into it: relocatable");
    assert_eq!(prologue.len(), 9);
}
