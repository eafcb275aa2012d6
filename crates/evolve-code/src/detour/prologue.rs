//! Relocatable prologues: the first instructions of a function, decoded, checked and re-encoded
//! to run elsewhere (see the refusal rules in [`crate::detour`]'s module docs).
#![allow(unsafe_code)]

use super::JMP_LEN;
use crate::error::{Error, ErrorKind, Result};
use crate::sys::memory;
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};

/// The relocatable first instructions of a function.
#[derive(Debug, Clone)]
pub struct Prologue {
    function: usize,
    original: Vec<u8>,
    instructions: Vec<Instruction>,
}

pub(super) fn read_code(address: usize, len: usize) -> Result<Vec<u8>> {
    // A function may span several mappings (see overwrite::read_code).
    crate::overwrite::read_code(&memory::mappings()?, address, len)
}

fn show(insn: &Instruction) -> String {
    format!("{:?}", insn.mnemonic()).to_lowercase()
}

impl Prologue {
    /// Decodes the prologue of the function at `function`, `size` bytes long (its symbol size),
    /// and checks that it can be relocated (see the module docs).
    ///
    /// # Example
    /// ```
    /// #[inline(never)]
    /// extern "C" fn f(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(3) ^ 7 }
    /// let exe = evolve_code::inspect::executable().unwrap();
    /// let sym = exe.function_containing(f as usize).unwrap();
    /// match evolve_code::Prologue::of(sym.address, sym.size) {
    ///     Ok(p) => assert!(p.len() >= 5),
    ///     Err(e) => println!("{e}"), // a tiny function may be too short
    /// }
    /// ```
    pub fn of(function: usize, size: usize) -> Result<Prologue> {
        let refuse = |reason: String| Error::new(ErrorKind::Unrelocatable { function, reason });
        if size < JMP_LEN {
            return Err(refuse(format!(
                "the function is {size} bytes long, shorter than the 5-byte jmp"
            )));
        }
        // The whole function: a branch into the prologue from anywhere in it must be found.
        let code = read_code(function, size)?;
        let mut decoder = Decoder::with_ip(64, &code, function as u64, DecoderOptions::NONE);
        let mut instructions = Vec::new();
        let mut covered = 0;
        while covered < JMP_LEN {
            let insn = decoder.decode();
            if insn.is_invalid() {
                return Err(refuse(format!(
                    "undecodable instruction at offset {covered} ({:#x})",
                    function + covered
                )));
            }
            covered += insn.len();
            if matches!(insn.flow_control(), FlowControl::Interrupt)
                || matches!(
                    insn.mnemonic(),
                    Mnemonic::Syscall | Mnemonic::Sysenter | Mnemonic::Int | Mnemonic::Int1
                )
            {
                return Err(refuse(format!(
                    "`{}` at offset {} enters the kernel in the overwritten bytes (a thread \
                     in the kernel there resumes, or restarts the call, inside the new jmp)",
                    show(&insn),
                    covered - insn.len()
                )));
            }
            match insn.flow_control() {
                FlowControl::Call | FlowControl::IndirectCall => {
                    return Err(refuse(format!(
                        "`{}` at offset {} is a call in the overwritten bytes (its return \
                         address would point into the trampoline)",
                        show(&insn),
                        covered - insn.len()
                    )))
                }
                FlowControl::Next | FlowControl::ConditionalBranch => {}
                _ if covered >= JMP_LEN => {}
                _ => {
                    return Err(refuse(format!(
                        "the function is too short: control leaves it with `{}` after {covered} \
                         bytes, before the 5 bytes a jmp needs",
                        show(&insn)
                    )))
                }
            }
            if matches!(insn.code(), Code::Xbegin_rel32 | Code::Xbegin_rel16) {
                return Err(refuse(format!(
                    "unsupported instruction `{}` in the prologue",
                    show(&insn)
                )));
            }
            instructions.push(insn);
        }
        // No branch of the function may land strictly inside the overwritten bytes.
        let inside = (function + 1) as u64..(function + covered) as u64;
        let mut all = Decoder::with_ip(64, &code, function as u64, DecoderOptions::NONE);
        for insn in &mut all {
            let target = insn.near_branch_target();
            if !insn.is_invalid() && inside.contains(&target) {
                return Err(refuse(format!(
                    "`{}` at offset {} branches into the overwritten bytes (to offset {})",
                    show(&insn),
                    insn.ip() - function as u64,
                    target - function as u64
                )));
            }
        }
        Ok(Prologue {
            function,
            original: code[..covered].to_vec(),
            instructions,
        })
    }

    /// Bytes the relocated instructions occupy in the function (at least 5).
    pub fn len(&self) -> usize {
        self.original.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The function's original bytes that the detour overwrites.
    pub fn original(&self) -> &[u8] {
        &self.original
    }

    /// The instructions to relocate, then a jump back to the rest of the function: the
    /// trampoline's tail (re-encoded where they land, which fixes RIP-relative operands and
    /// near branches, see [`super::trampoline`]).
    pub(super) fn relocated(&self) -> Result<Vec<Instruction>> {
        let mut insns = self.instructions.clone();
        let back =
            Instruction::with_branch(Code::Jmp_rel32_64, (self.function + self.len()) as u64)
                .map_err(|e| self.refuse(format!("{e}")))?;
        insns.push(back);
        Ok(insns)
    }

    pub(super) fn refuse(&self, reason: String) -> Error {
        Error::new(ErrorKind::Unrelocatable {
            function: self.function,
            reason,
        })
    }
}
