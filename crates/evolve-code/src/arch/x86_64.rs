//! x86-64 encodings of the 5-byte site instructions, `int3` and springboards.

use crate::site::SiteInsn;

/// Length of every patch site in bytes.
pub const SITE_LEN: usize = 5;

/// The breakpoint instruction used by the int3 write protocol.
pub const INT3: u8 = 0xcc;

const JMP_REL32: u8 = 0xe9;
const CALL_REL32: u8 = 0xe8;

/// The recommended 5-byte NOP (`nopl 0x0(%rax,%rax,1)`), as the compilers and the kernel emit it.
pub const NOP5: [u8; SITE_LEN] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Length of a springboard: `jmp *0(%rip)` followed by the 8-byte absolute target.
pub const SPRINGBOARD_LEN: usize = 14;

/// The displacement of a `rel32` branch at `site` to `target`, if it fits.
pub fn rel32(site: usize, target: usize) -> Option<i32> {
    let next = (site as i128) + SITE_LEN as i128;
    i32::try_from(target as i128 - next).ok()
}

/// Encodes `insn` for placement at `site`; `None` if a branch target is out of `rel32` range.
pub fn encode(insn: SiteInsn, site: usize) -> Option<[u8; SITE_LEN]> {
    let branch = |opcode: u8, target: usize| {
        let d = rel32(site, target)?.to_le_bytes();
        Some([opcode, d[0], d[1], d[2], d[3]])
    };
    match insn {
        SiteInsn::Jmp(target) => branch(JMP_REL32, target),
        SiteInsn::Call(target) => branch(CALL_REL32, target),
        SiteInsn::Nop => Some(NOP5),
    }
}

/// Decodes the 5 bytes at `site`; `None` if they are not a site instruction.
pub fn decode(bytes: [u8; SITE_LEN], site: usize) -> Option<SiteInsn> {
    let target = || {
        let d = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        (site as i64 + SITE_LEN as i64 + d as i64) as usize
    };
    match bytes[0] {
        JMP_REL32 => Some(SiteInsn::Jmp(target())),
        CALL_REL32 => Some(SiteInsn::Call(target())),
        _ if bytes == NOP5 => Some(SiteInsn::Nop),
        _ => None,
    }
}

/// A springboard: an absolute jump to `target` that fits anywhere (`jmp *0(%rip); .quad target`).
pub fn springboard(target: usize) -> [u8; SPRINGBOARD_LEN] {
    let mut code = [0u8; SPRINGBOARD_LEN];
    code[..6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    code[6..].copy_from_slice(&(target as u64).to_le_bytes());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_round_trip_through_encode_and_decode() {
        let site = 0x5555_0000_1000usize;
        for insn in [
            SiteInsn::Jmp(site + 0x1234),
            SiteInsn::Call(site - 0x7000_0000),
            SiteInsn::Jmp(site + 5),
            SiteInsn::Nop,
        ] {
            let bytes = encode(insn, site).unwrap();
            assert_eq!(decode(bytes, site), Some(insn));
        }
    }

    #[test]
    fn targets_beyond_two_gib_do_not_encode() {
        let site = 0x5555_0000_0000usize;
        assert!(encode(SiteInsn::Jmp(site + (1 << 31) + 5), site).is_none());
        assert!(encode(SiteInsn::Jmp(site + (1 << 31) + 4), site).is_some());
        assert!(encode(SiteInsn::Call(site - (1 << 31) + 5), site).is_some());
        assert!(encode(SiteInsn::Call(site - (1 << 31) + 4), site).is_none());
    }

    #[test]
    fn other_bytes_are_not_site_instructions() {
        assert_eq!(decode([0x90; 5], 0x1000), None);
        assert_eq!(decode([0x0f, 0x1f, 0x44, 0x00, 0x01], 0x1000), None);
    }

    #[test]
    fn springboard_is_an_absolute_jump_through_the_following_quad() {
        let code = springboard(0x7fff_1234_5678);
        assert_eq!(code[..6], [0xff, 0x25, 0, 0, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(code[6..].try_into().unwrap()),
            0x7fff_1234_5678
        );
    }
}
