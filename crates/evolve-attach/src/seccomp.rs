//! Checking a seccomp filter before relying on it: the filter's classic-BPF program is run here,
//! on the system calls the loader and the agent make, with the arguments they pass.
//!
//! A filter whose action is anything but allow (or log) for one of them is a refusal naming the
//! call: a forbidden `mmap` would only fail, but a `SECCOMP_RET_KILL` filter would kill the
//! target in the middle of the attach. The filters are read with `PTRACE_SECCOMP_GET_FILTER`
//! (which needs `CAP_SYS_ADMIN`); without it a filtered process is refused, since nothing else
//! tells what the filter allows.

use evolve_code::ptrace::FilterInsn;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

const RET_ACTION_FULL: u32 = 0xffff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// A system call the loader or the agent makes, with representative arguments.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// Its name, for messages.
    pub name: &'static str,
    /// Its number on x86-64.
    pub nr: i64,
    /// Arguments (those that filters commonly inspect; the rest 0).
    pub args: [u64; 6],
    /// Who needs it.
    pub needed_by: &'static str,
}

const fn call(name: &'static str, nr: i64, args: [u64; 6], needed_by: &'static str) -> Call {
    Call {
        name,
        nr,
        args,
        needed_by,
    }
}

const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const MAP_PRIVATE: u64 = 2;
const MAP_ANONYMOUS: u64 = 0x20;

/// What attaching needs the target to be allowed.
pub const NEEDED: &[Call] = &[
    call(
        "mmap",
        libc::SYS_mmap,
        [
            0,
            8192,
            PROT_READ | PROT_EXEC,
            MAP_PRIVATE | MAP_ANONYMOUS,
            u64::MAX,
            0,
        ],
        "the loader's memory",
    ),
    call(
        "mprotect",
        libc::SYS_mprotect,
        [0, 4096, PROT_READ | PROT_WRITE, 0, 0, 0],
        "the loader's data page",
    ),
    call(
        "clone3",
        libc::SYS_clone3,
        [0, 88, 0, 0, 0, 0],
        "pthread_create (the loader thread)",
    ),
    call(
        "clone",
        libc::SYS_clone,
        [0x3d0f00, 0, 0, 0, 0, 0],
        "pthread_create (the loader thread)",
    ),
    call(
        "openat",
        libc::SYS_openat,
        [
            libc::AT_FDCWD as u64,
            0,
            libc::O_RDONLY as u64 | libc::O_CLOEXEC as u64,
            0,
            0,
            0,
        ],
        "dlopen",
    ),
    call("read", libc::SYS_read, [3, 0, 832, 0, 0, 0], "dlopen"),
    call(
        "pread64",
        libc::SYS_pread64,
        [3, 0, 832, 64, 0, 0],
        "dlopen",
    ),
    call(
        "newfstatat",
        libc::SYS_newfstatat,
        [3, 0, 0, 0x1000, 0, 0],
        "dlopen",
    ),
    call(
        "mmap (library code)",
        libc::SYS_mmap,
        [
            0,
            4096,
            PROT_READ | PROT_EXEC,
            MAP_PRIVATE | 0x10 | 0x800,
            3,
            0,
        ],
        "dlopen",
    ),
    call("close", libc::SYS_close, [3, 0, 0, 0, 0, 0], "dlopen"),
    call(
        "munmap",
        libc::SYS_munmap,
        [0, 4096, 0, 0, 0, 0],
        "dlopen, the agent",
    ),
    call("gettid", libc::SYS_gettid, [0; 6], "the loader"),
    call(
        "futex",
        libc::SYS_futex,
        [0, 0x80, 0, 0, 0, 0],
        "the agent's threads",
    ),
    call(
        "socket",
        libc::SYS_socket,
        [
            libc::AF_UNIX as u64,
            libc::SOCK_STREAM as u64 | libc::SOCK_CLOEXEC as u64,
            0,
            0,
            0,
            0,
        ],
        "the agent's control socket",
    ),
    call(
        "bind",
        libc::SYS_bind,
        [3, 0, 110, 0, 0, 0],
        "the agent's control socket",
    ),
    call(
        "listen",
        libc::SYS_listen,
        [3, 128, 0, 0, 0, 0],
        "the agent's control socket",
    ),
    call(
        "accept4",
        libc::SYS_accept4,
        [3, 0, 0, libc::SOCK_CLOEXEC as u64, 0, 0],
        "the agent's control socket",
    ),
    call(
        "getsockopt",
        libc::SYS_getsockopt,
        [3, 1, 17, 0, 0, 0],
        "the agent's peer check",
    ),
    call(
        "mkdir",
        libc::SYS_mkdir,
        [0, 0o700, 0, 0, 0, 0],
        "the agent's socket directory",
    ),
    call(
        "membarrier",
        libc::SYS_membarrier,
        [1 << 6, 0, 0, 0, 0, 0],
        "probes (core sync)",
    ),
    call(
        "mprotect (code)",
        libc::SYS_mprotect,
        [0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, 0, 0, 0],
        "probes (code writes)",
    ),
    call(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        [5, 0, 0, 8, 0, 0],
        "probes (the int3 protocol)",
    ),
    call(
        "tgkill",
        libc::SYS_tgkill,
        [0, 0, 40, 0, 0, 0],
        "probes (stopping the world)",
    ),
];

/// Why a filter forbids a call: the first needed call whose action is not allow, and what the
/// filter would do instead.
pub fn first_forbidden(filters: &[Vec<FilterInsn>]) -> Option<(Call, String)> {
    for c in NEEDED {
        // The kernel runs every filter and takes the most restrictive action (the lowest
        // action value, KILL_PROCESS counting lowest of all).
        let action = filters
            .iter()
            .map(|f| run(f, c))
            .min_by_key(|&a| precedence(a))
            .unwrap_or(RET_ALLOW);
        let kind = action & RET_ACTION_FULL;
        if kind != RET_ALLOW && kind != RET_LOG {
            return Some((*c, describe(action)));
        }
    }
    None
}

fn precedence(action: u32) -> i64 {
    i64::from((action & RET_ACTION_FULL) as i32)
}

fn describe(action: u32) -> String {
    match action & RET_ACTION_FULL {
        RET_KILL_PROCESS => "kill the process".into(),
        RET_KILL_THREAD => "kill the thread".into(),
        RET_TRAP => "send SIGSYS".into(),
        RET_ERRNO => format!(
            "fail with {}",
            std::io::Error::from_raw_os_error((action & 0xffff) as i32)
        ),
        RET_USER_NOTIF => "defer to a supervisor (user notification)".into(),
        RET_TRACE => "stop for a seccomp tracer".into(),
        other => format!("return action {other:#x}"),
    }
}

/// The `struct seccomp_data` word at `offset` for call `c`.
fn data_word(c: &Call, offset: u32) -> u32 {
    match offset {
        0 => c.nr as u32,
        4 => AUDIT_ARCH_X86_64,
        8 | 12 => 0, // instruction_pointer: unknown in advance
        16..=63 => {
            let index = ((offset - 16) / 8) as usize;
            let arg = c.args[index];
            if offset.is_multiple_of(8) {
                arg as u32
            } else {
                (arg >> 32) as u32
            }
        }
        _ => 0,
    }
}

/// Runs one filter program on call `c`; returns its `SECCOMP_RET_*` value. A malformed program
/// (which the kernel would not have accepted) counts as killing.
pub fn run(program: &[FilterInsn], c: &Call) -> u32 {
    let (mut a, mut x) = (0u32, 0u32);
    let mut scratch = [0u32; 16];
    let mut pc = 0usize;
    // Programs only jump forward, so this terminates within the program's length.
    while let Some(insn) = program.get(pc) {
        pc += 1;
        let k = insn.k;
        match insn.code {
            0x20 => a = data_word(c, k),               // ld [k]
            0x00 => a = k,                             // ld #k
            0x01 => x = k,                             // ldx #k
            0x60 => a = scratch[(k & 15) as usize],    // ld M[k]
            0x61 => x = scratch[(k & 15) as usize],    // ldx M[k]
            0x02 => scratch[(k & 15) as usize] = a,    // st M[k]
            0x03 => scratch[(k & 15) as usize] = x,    // stx M[k]
            0x80 => a = 64,                            // ld #len
            0x07 => x = a,                             // tax
            0x87 => a = x,                             // txa
            0x04 => a = a.wrapping_add(k),             // add #k
            0x0c => a = a.wrapping_add(x),             // add x
            0x14 => a = a.wrapping_sub(k),             // sub #k
            0x1c => a = a.wrapping_sub(x),             // sub x
            0x54 => a &= k,                            // and #k
            0x5c => a &= x,                            // and x
            0x44 => a |= k,                            // or #k
            0x4c => a |= x,                            // or x
            0xa4 => a ^= k,                            // xor #k
            0xac => a ^= x,                            // xor x
            0x64 => a = a.checked_shl(k).unwrap_or(0), // lsh #k
            0x74 => a = a.checked_shr(k).unwrap_or(0), // rsh #k
            0x84 => a = a.wrapping_neg(),              // neg
            0x05 => pc += k as usize,                  // ja
            0x15 | 0x1d | 0x25 | 0x2d | 0x35 | 0x3d | 0x45 | 0x4d => {
                let operand = if insn.code & 0x08 != 0 { x } else { k };
                let taken = match insn.code & 0xf0 {
                    0x10 => a == operand,
                    0x20 => a > operand,
                    0x30 => a >= operand,
                    _ => a & operand != 0,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            0x06 => return k, // ret #k
            0x16 => return a, // ret a
            _ => return RET_KILL_PROCESS,
        }
    }
    RET_KILL_PROCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> FilterInsn {
        FilterInsn { code, jt, jf, k }
    }

    /// `if nr == NR: return ACTION; return ALLOW`, with the usual arch check.
    fn deny(nr: i64, action: u32) -> Vec<FilterInsn> {
        vec![
            insn(0x20, 0, 0, 4),
            insn(0x15, 1, 0, AUDIT_ARCH_X86_64),
            insn(0x06, 0, 0, RET_KILL_PROCESS),
            insn(0x20, 0, 0, 0),
            insn(0x15, 0, 1, nr as u32),
            insn(0x06, 0, 0, action),
            insn(0x06, 0, 0, RET_ALLOW),
        ]
    }

    #[test]
    fn allow_all_passes() {
        assert!(first_forbidden(&[vec![insn(0x06, 0, 0, RET_ALLOW)]]).is_none());
        assert!(first_forbidden(&[]).is_none());
    }

    #[test]
    fn a_denied_call_is_named_with_the_action() {
        let (c, what) =
            first_forbidden(&[deny(libc::SYS_socket, RET_ERRNO | libc::EPERM as u32)]).unwrap();
        assert_eq!(c.name, "socket");
        assert!(what.contains("fail with"), "{what}");
        let (c, what) = first_forbidden(&[deny(libc::SYS_clone3, RET_KILL_PROCESS)]).unwrap();
        assert_eq!(c.name, "clone3");
        assert_eq!(what, "kill the process");
    }

    #[test]
    fn most_restrictive_filter_wins() {
        let filters = vec![
            vec![insn(0x06, 0, 0, RET_ALLOW)],
            deny(libc::SYS_mmap, RET_TRAP),
        ];
        let (c, what) = first_forbidden(&filters).unwrap();
        assert_eq!(c.name, "mmap");
        assert_eq!(what, "send SIGSYS");
    }

    #[test]
    fn argument_checks_see_the_arguments() {
        // Deny mmap with PROT_EXEC: load args[2] (offset 32), test bit 2.
        let filter = vec![
            insn(0x20, 0, 0, 0),
            insn(0x15, 0, 3, libc::SYS_mmap as u32),
            insn(0x20, 0, 0, 32),
            insn(0x45, 0, 1, PROT_EXEC as u32),
            insn(0x06, 0, 0, RET_ERRNO | 1),
            insn(0x06, 0, 0, RET_ALLOW),
        ];
        let (c, _) = first_forbidden(&[filter]).unwrap();
        assert_eq!(c.name, "mmap");
    }
}
