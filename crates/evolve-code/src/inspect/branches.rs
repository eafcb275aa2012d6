//! Direct branch sites: every 5-byte `call rel32` / `jmp rel32` in an image's functions, indexed
//! by target.
//!
//! The `addr32 call rel32` form (`67 E8 rel32`) that `ld` and Evolve's loader make when they
//! relax `call *f@GOTPCREL(%rip)` counts too: its site is the 5-byte `E8 rel32` one byte in
//! (the prefix stays; a thread never stops between a prefix and its instruction, and the
//! int3 protocol's trap at `site + 1` is recognised as usual).
//!
//! These are the instructions the engine can redirect by rewriting their rel32. They are found by
//! decoding each function symbol's bytes instruction by instruction (from the live memory of the
//! process, so what is found is what runs), never by scanning for byte patterns, which would
//! also match `E8`/`E9` bytes inside other instructions' immediates and displacements.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};

use super::image::Image;
use super::loaded;

/// The kind of a direct branch instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BranchKind {
    /// `call rel32` (`E8 xx xx xx xx`).
    Call,
    /// `jmp rel32` (`E9 xx xx xx xx`), e.g. a tail call.
    Jmp,
}

impl BranchKind {
    /// The instruction's opcode byte.
    pub fn opcode(self) -> u8 {
        match self {
            BranchKind::Call => 0xE8,
            BranchKind::Jmp => 0xE9,
        }
    }
}

/// One 5-byte direct branch instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BranchSite {
    /// Runtime address of the 5-byte instruction (for `67 E8 rel32`, of its `E8`).
    pub address: usize,
    /// Call or jump.
    pub kind: BranchKind,
    /// Runtime address it branches to.
    pub target: usize,
    /// Start address of the function symbol it was found in.
    pub function: usize,
}

impl BranchSite {
    /// Whether `bytes` (the 5 bytes at the site) encode this site's instruction and target.
    pub fn matches(&self, bytes: [u8; 5]) -> bool {
        let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let target = self
            .address
            .wrapping_add(5)
            .wrapping_add(rel as isize as usize);
        bytes[0] == self.kind.opcode() && target == self.target
    }
}

/// All direct 5-byte branch sites of one image, indexed by target.
///
/// The index is a snapshot of the code when it was built: a site the engine has since rewritten
/// still appears with its old target (check it with [`BranchSite::matches`]).
#[derive(Debug, Clone, Default)]
pub struct BranchIndex {
    /// Sorted by (target, address); one entry per site address.
    sites: Vec<BranchSite>,
    functions_decoded: usize,
    bytes_decoded: usize,
}

impl BranchIndex {
    /// Decodes every sized function symbol of `image` that lies inside an executable segment and
    /// records its `call rel32` / `jmp rel32` instructions.
    ///
    /// Function symbols sharing a start address are decoded once. An image that has been
    /// unloaded since it was listed yields an empty index. For a shared library the loader lock
    /// is held while decoding (so it cannot be unloaded meanwhile).
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// let index = BranchIndex::build(executable()?);
    /// for site in index.sites() {
    ///     assert_eq!(index.sites_to(site.target).iter().filter(|s| *s == site).count(), 1);
    /// }
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn build(image: &Image) -> BranchIndex {
        let built = loaded::with_memory(
            image.load_bias(),
            image.is_main_executable(),
            image.segments(),
            |memory| {
                let mut index = BranchIndex::default();
                let mut instr = Instruction::default();
                let mut last_start = None;
                for f in image.functions() {
                    if f.size == 0 || last_start == Some(f.address) {
                        continue;
                    }
                    let Some(end) = f.address.checked_add(f.size) else {
                        continue;
                    };
                    let in_exec = image
                        .exec_ranges()
                        .iter()
                        .any(|r| r.start <= f.address && end <= r.end);
                    let Some(bytes) = in_exec.then(|| memory.bytes(f.address..end)).flatten()
                    else {
                        continue;
                    };
                    last_start = Some(f.address);
                    index.functions_decoded += 1;
                    index.bytes_decoded += bytes.len();
                    scan(bytes, f.address, &mut instr, &mut index.sites);
                }
                index
            },
        );
        let mut index = built.unwrap_or_default();
        index.sites.sort_unstable_by_key(|s| (s.target, s.address));
        // Nested or overlapping function symbols would report a site twice.
        index.sites.dedup_by_key(|s| s.address);
        index
    }

    /// The sites branching to `target`, in address order.
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// let index = BranchIndex::build(executable()?);
    /// assert!(index.sites_to(0).is_empty());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn sites_to(&self, target: usize) -> &[BranchSite] {
        let from = self.sites.partition_point(|s| s.target < target);
        let to = from + self.sites[from..].partition_point(|s| s.target == target);
        &self.sites[from..to]
    }

    /// Every site, sorted by target and then address.
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// let index = BranchIndex::build(executable()?);
    /// assert_eq!(index.sites().len(), index.len());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn sites(&self) -> &[BranchSite] {
        &self.sites
    }

    /// The number of sites.
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// assert!(BranchIndex::build(executable()?).len() > 0);
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether there are no sites.
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// assert!(!BranchIndex::build(executable()?).is_empty());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// How many functions were decoded (aliases counted once).
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// assert!(BranchIndex::build(executable()?).functions_decoded() > 0);
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn functions_decoded(&self) -> usize {
        self.functions_decoded
    }

    /// How many bytes of code were decoded.
    ///
    /// # Example
    /// ```
    /// use evolve_code::inspect::{executable, BranchIndex};
    /// let index = BranchIndex::build(executable()?);
    /// assert!(index.bytes_decoded() >= 5 * index.len());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn bytes_decoded(&self) -> usize {
        self.bytes_decoded
    }
}

/// The 5-byte direct branches of `code`, a function starting at `start` (for code outside the
/// executable's index: loaded patches).
pub(crate) fn direct_branches(code: &[u8], start: usize) -> Vec<BranchSite> {
    // Sized once for the most 5-byte branches the code can hold: a growing vector would leave
    // copies of the (plain) addresses in freed memory, where a reclamation scan of a patch's
    // code would find them (the caller scrubs this one).
    let mut out = Vec::with_capacity(code.len() / 5 + 1);
    scan(code, start, &mut Instruction::default(), &mut out);
    out
}

/// Decodes `code` (the function starting at `start`) and appends its 5-byte direct branches.
fn scan(code: &[u8], start: usize, instr: &mut Instruction, out: &mut Vec<BranchSite>) {
    let mut decoder = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
    while decoder.can_decode() {
        decoder.decode_out(instr);
        let kind = match instr.code() {
            Code::Call_rel32_64 => BranchKind::Call,
            Code::Jmp_rel32_64 => BranchKind::Jmp,
            _ => continue,
        };
        let offset = (instr.ip() - start as u64) as usize;
        // Exactly `E8/E9 rel32`, or `67 E8 rel32` (a relaxed GOT call): no other prefixes,
        // which a site rewrite could not preserve.
        let prefix = match (instr.len(), code[offset]) {
            (5, opcode) if opcode == kind.opcode() => 0,
            (6, 0x67) if kind == BranchKind::Call && code[offset + 1] == kind.opcode() => 1,
            _ => continue,
        };
        out.push(BranchSite {
            address: instr.ip() as usize + prefix,
            kind,
            target: instr.near_branch_target() as usize,
            function: start,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_only_whole_5_byte_direct_branches() {
        let start = 0x1000usize;
        let code = [
            0xE8, 0x0B, 0x00, 0x00, 0x00, // 1000: call 0x1010
            0xB8, 0xE8, 0x01, 0x02,
            0x03, // 1005: mov eax, 0x030201e8 (E8 inside an immediate)
            0xE9, 0xF1, 0xFF, 0xFF, 0xFF, // 100a: jmp 0x1000
            0xEB, 0xFE, // 100f: jmp short (not rel32)
            0x66, 0xE8, 0x00, 0x00, 0x00, 0x00, // 1011: operand-size-prefixed call
            0x67, 0xE8, 0xE3, 0xFF, 0xFF,
            0xFF, // 1017: addr32 call 0x1000 (a relaxed GOT call)
            0xC3, // ret
        ];
        let mut sites = Vec::new();
        scan(&code, start, &mut Instruction::default(), &mut sites);
        assert_eq!(
            sites,
            vec![
                BranchSite {
                    address: 0x1000,
                    kind: BranchKind::Call,
                    target: 0x1010,
                    function: start
                },
                BranchSite {
                    address: 0x100a,
                    kind: BranchKind::Jmp,
                    target: 0x1000,
                    function: start
                },
                BranchSite {
                    address: 0x1018,
                    kind: BranchKind::Call,
                    target: 0x1000,
                    function: start
                },
            ]
        );
        assert!(sites[2].matches([0xE8, 0xE3, 0xFF, 0xFF, 0xFF]));
        assert!(sites[0].matches([0xE8, 0x0B, 0, 0, 0]));
        assert!(!sites[0].matches([0xE9, 0x0B, 0, 0, 0]));
        assert!(sites[1].matches([0xE9, 0xF1, 0xFF, 0xFF, 0xFF]));
    }
}
