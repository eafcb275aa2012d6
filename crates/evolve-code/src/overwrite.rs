//! Overwriting the entry of an unprepared function with a 5-byte `jmp`: which instructions the
//! jump replaces, and whether doing so can send a thread into the middle of it.
//!
//! The check is made on the whole function, decoded with `iced-x86` (never by scanning bytes):
//!
//! - **Length.** The function must hold 5 bytes of instructions; a shorter one is accepted only
//!   if the bytes that follow it, up to the next symbol, are padding (`int3` or NOP fill that
//!   nothing executes).
//! - **Branch targets.** No branch of the function (jump, conditional jump, loop, `call`) may
//!   land in the replaced instructions `[entry, entry + covered)` — not even on the entry itself:
//!   a loop whose head is the entry would send a thread that is already running the function
//!   to the jump, with its registers in the middle of the old body. A `call` of the entry (a
//!   recursive call) is a new call and is allowed.
//! - **Return addresses.** A `call` among the replaced instructions whose return address lies
//!   inside them is refused: a thread in the callee would return into the middle of the jump.
//!
//! Threads *stopped* inside the replaced bytes are the caller's business (stop-the-world,
//! [`crate::redirect`]); branches from *other* functions into the middle of an entry and
//! computed jumps (jump tables) cannot be seen here, and compilers emit neither into a
//! function's first instructions. Probe detours (`crate::detour`'s prologue check) apply the
//! same whole-function rule to their relocated prologue; [`first_branch_into`] is the one place
//! that decodes a function for branches into a range.
//!
//! # Safety
//!
//! [`read_code`] reads code bytes only inside a readable executable mapping it checked first.
#![allow(unsafe_code)]

use crate::arch::SITE_LEN;
use crate::error::{ErrorKind, Result};
use crate::sys::memory::{self, Mapping};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};
use std::ops::Range;

/// What a `jmp` written at a function's entry replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryBytes {
    /// Bytes of the instructions the jump overlaps, from the entry (at least 5).
    pub covered: usize,
    /// The function's first 5 bytes, which the jump replaces.
    pub original: [u8; SITE_LEN],
}

/// The lower-case mnemonic of `insn`, for messages.
pub(crate) fn mnemonic(insn: &Instruction) -> String {
    format!("{:?}", insn.mnemonic()).to_lowercase()
}

fn is_near_branch(insn: &Instruction) -> bool {
    matches!(
        insn.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
}

/// The first branch of `code` (a function starting at `start`) whose target lies in `range`, with
/// its target; a `call` of `allowed_call` itself does not count. `Err` names an undecodable
/// instruction by its offset: its branches cannot be checked.
pub(crate) fn first_branch_into(
    code: &[u8],
    start: usize,
    range: Range<usize>,
    allowed_call: Option<usize>,
) -> std::result::Result<Option<(Instruction, usize)>, usize> {
    let mut decoder = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return Err(insn.ip() as usize - start);
        }
        if !is_near_branch(&insn) {
            continue;
        }
        let target = insn.near_branch_target() as usize;
        let a_new_call = insn.flow_control() == FlowControl::Call && Some(target) == allowed_call;
        if range.contains(&target) && !a_new_call {
            return Ok(Some((insn, target)));
        }
    }
    Ok(None)
}

/// Checks that a `jmp` may be written over the entry of the function at `address`, `size` bytes
/// long (its symbol size), and says what it replaces. `code` holds the bytes from `address` up
/// to the next symbol or the end of its code (at least `size` bytes, unless the function is
/// shorter than 5 bytes and the next symbol follows closely). The error is the reason, for the
/// caller to wrap with the function's name.
pub(crate) fn entry_bytes(
    code: &[u8],
    address: usize,
    size: usize,
) -> std::result::Result<EntryBytes, String> {
    if size == 0 {
        return Err("its symbol has no size: its code cannot be checked".into());
    }
    if code.len() < size {
        return Err(format!(
            "its symbol says {size} bytes but only {} are readable code",
            code.len()
        ));
    }
    let mut decoder = Decoder::with_ip(64, code, address as u64, DecoderOptions::NONE);
    let mut covered = 0;
    while covered < SITE_LEN {
        if covered >= size {
            // Past the function's end: only padding may lie under the rest of the jump.
            if code.len() < SITE_LEN {
                return Err(format!(
                    "it is shorter than the 5-byte jmp ({size} bytes) and the next symbol starts \
                     {} bytes after its entry",
                    code.len()
                ));
            }
            let insn = decoder.decode();
            let padding = !insn.is_invalid()
                && matches!(insn.mnemonic(), Mnemonic::Int3 | Mnemonic::Nop)
                && covered + insn.len() <= code.len();
            if !padding {
                return Err(format!(
                    "it is shorter than the 5-byte jmp ({size} bytes) and is followed by `{}` at \
                     offset {covered}, not padding (int3 or nop)",
                    if insn.is_invalid() {
                        "undecodable bytes".to_owned()
                    } else {
                        mnemonic(&insn)
                    }
                ));
            }
            covered += insn.len();
            continue;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(format!("undecodable instruction at offset {covered}"));
        }
        if covered + insn.len() > size {
            return Err(format!(
                "`{}` at offset {covered} runs past the end of the function ({size} bytes)",
                mnemonic(&insn)
            ));
        }
        let end = covered + insn.len();
        // A `call`'s return address is on the stack, where a stopped thread's PC does not
        // show it (a `syscall` resumes at its PC, which the stop-the-world check sees).
        if insn.mnemonic() == Mnemonic::Call && end < SITE_LEN {
            return Err(format!(
                "`{}` at offset {covered} returns to offset {end}, inside the 5 bytes the jmp \
                 replaces",
                mnemonic(&insn)
            ));
        }
        covered = end;
    }
    let inside = address..address + covered;
    match first_branch_into(&code[..size], address, inside, Some(address)) {
        Err(offset) => {
            return Err(format!(
                "undecodable instruction at offset {offset}: its branches cannot be checked"
            ))
        }
        Ok(Some((insn, target))) => {
            let at = insn.ip() as usize - address;
            return Err(if target == address {
                format!(
                    "`{}` at offset {at} branches to the entry: the entry is a loop target",
                    mnemonic(&insn)
                )
            } else {
                format!(
                    "`{}` at offset {at} branches to offset {}, inside the {covered} bytes the \
                     jmp replaces",
                    mnemonic(&insn),
                    target - address
                )
            });
        }
        Ok(None) => {}
    }
    let original = code[..SITE_LEN].try_into().expect("5 bytes checked above");
    Ok(EntryBytes { covered, original })
}

/// Reads `len` bytes of code at `address`, which must lie in readable executable mappings of
/// `maps` (the process's mappings, read by the caller once for many functions).
///
/// One function may span several adjacent mappings: writing code splits the executable's text
/// mapping at the pages written (each becomes a private copy the kernel may keep in a mapping
/// of its own), so after a patch and its revert a function that crosses a page boundary lies
/// in two — the next apply of memcached's `server_stats` did.
pub(crate) fn read_code(maps: &[Mapping], address: usize, len: usize) -> Result<Vec<u8>> {
    let end = address
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or(ErrorKind::NotExecutable { address })?;
    let mut next = address;
    while next < end {
        let mapping = memory::mapping_containing(maps, next)
            .filter(|m| m.protection.exec && m.protection.read)
            .ok_or(ErrorKind::NotExecutable { address: next })?;
        next = mapping.range.end;
    }
    Ok((address..end)
        // SAFETY: every byte of the range lies in a readable mapping (the loop above walked
        // them without a gap); code bytes are read with volatile loads, as the engine may
        // rewrite sites concurrently.
        .map(|a| unsafe { std::ptr::read_volatile(a as *const u8) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: usize = 0x1000;

    fn check(code: &[u8], size: usize) -> std::result::Result<EntryBytes, String> {
        entry_bytes(code, AT, size)
    }

    /// This test binary's own code, described as two adjacent mappings (as after a write split
    /// the text mapping), then with a hole.
    #[test]
    fn code_is_read_across_adjacent_mappings_and_not_across_a_hole() {
        let maps = memory::mappings().unwrap();
        let here = code_is_read_across_adjacent_mappings_and_not_across_a_hole as fn() as usize;
        let text = memory::mapping_containing(&maps, here).unwrap();
        let (start, end) = (text.range.start, text.range.end);
        // A range of 64 bytes around a point of the text mapping, split at that point.
        let split = (here & !0xfff).max(start + 64).min(end - 64);
        let protection = text.protection;
        let piece = |range: std::ops::Range<usize>| Mapping { range, protection };
        let whole = read_code(&maps, split - 32, 64).unwrap();
        let two = [piece(start..split), piece(split..end)];
        assert_eq!(read_code(&two, split - 32, 64).unwrap(), whole);
        let hole = [piece(start..split), piece(split + 1..end)];
        let e = read_code(&hole, split - 32, 64).unwrap_err();
        assert!(e.to_string().contains(&format!("{split:#x}")), "{e}");
        assert!(read_code(&two, split, 0).is_err());
    }

    #[test]
    fn one_long_instruction_covers_the_jump() {
        // imul rax, rdi, 0x1234567 ; ret
        let code = [0x48, 0x69, 0xc7, 0x67, 0x45, 0x23, 0x01, 0xc3];
        let e = check(&code, code.len()).unwrap();
        assert_eq!(e.covered, 7);
        assert_eq!(e.original, [0x48, 0x69, 0xc7, 0x67, 0x45]);
    }

    #[test]
    fn a_short_function_needs_padding_up_to_five_bytes() {
        // xor eax, eax ; ret ; then int3 padding: accepted.
        let padded = [0x31, 0xc0, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc];
        assert_eq!(check(&padded, 3).unwrap().covered, 5);
        // Multi-byte NOP filler is padding too.
        let nops = [0xc3, 0x0f, 0x1f, 0x44, 0x00, 0x00];
        assert_eq!(check(&nops, 1).unwrap().covered, 6);
        // Followed by another function's code: refused.
        let next = [0x31, 0xc0, 0xc3, 0x48, 0x89, 0xf8, 0xc3];
        let e = check(&next, 3).unwrap_err();
        assert!(e.contains("(3 bytes)") && e.contains("not padding"), "{e}");
        // The next symbol starts at once.
        let e = check(&[0xc3, 0xcc], 1).unwrap_err();
        assert!(e.contains("next symbol starts 2 bytes"), "{e}");
    }

    #[test]
    fn a_branch_into_the_replaced_bytes_is_refused() {
        // 0: test rdi, rdi ; 3: jz +5 ; 5: dec rdi ; 8: jmp 0 ; 10: mov rax, rsi ; 13: ret
        let loop_at_entry = [
            0x48, 0x85, 0xff, 0x74, 0x05, 0x48, 0xff, 0xcf, 0xeb, 0xf6, 0x48, 0x89, 0xf0, 0xc3,
        ];
        let e = check(&loop_at_entry, loop_at_entry.len()).unwrap_err();
        assert!(e.contains("offset 8") && e.contains("loop target"), "{e}");
        // 0: nop ; 1: test rdi, rdi ; 4: jz 1 ; 6: ret: a target strictly inside.
        let inside = [0x90, 0x48, 0x85, 0xff, 0x74, 0xfb, 0xc3];
        let e = check(&inside, inside.len()).unwrap_err();
        assert!(e.contains("to offset 1"), "{e}");
    }

    #[test]
    fn a_recursive_call_is_a_new_call_but_a_return_inside_is_refused() {
        // 0: imul rax, rdi, 3 (4 bytes) ; 4: push rax ; 5: call 0 ; 10: pop rcx ; 11: ret
        let recursive = [
            0x48, 0x6b, 0xc7, 0x03, 0x50, 0xe8, 0xf6, 0xff, 0xff, 0xff, 0x59, 0xc3,
        ];
        assert_eq!(check(&recursive, recursive.len()).unwrap().covered, 5);
        // 0: call rax (2) ; 2: add rax, 1 (4) ; 6: ret: returns to offset 2.
        let call_inside = [0xff, 0xd0, 0x48, 0x83, 0xc0, 0x01, 0xc3];
        let e = check(&call_inside, call_inside.len()).unwrap_err();
        assert!(e.contains("returns to offset 2"), "{e}");
    }
}
