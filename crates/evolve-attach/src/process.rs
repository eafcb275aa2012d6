//! What `/proc` says about the target, and the refusals that need nothing more.
//!
//! Everything here only reads `/proc/PID/...`: a refusal decided here has touched nothing.

use crate::error::{Error, ErrorKind, Refusal, Result};
use std::path::{Path, PathBuf};

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags.
const PF_KTHREAD: u64 = 0x0020_0000;
/// `CAP_SYS_PTRACE`'s bit in the capability sets.
const CAP_SYS_PTRACE: u32 = 19;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// `rwxp` flags.
    pub perms: String,
    /// File offset.
    pub offset: u64,
    /// The file, or `[heap]`, `[stack]`, … or empty.
    pub path: String,
}

impl Mapping {
    /// Whether it is executable.
    pub fn is_exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
}

/// The mappings of `pid`.
pub fn maps(pid: u32) -> Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| proc_error(pid, "reading /proc/PID/maps", e))?;
    Ok(text.lines().filter_map(parse_mapping).collect())
}

fn parse_mapping(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, char::is_whitespace);
    let range = fields.next()?;
    let perms = fields.next()?.to_string();
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset,
        path,
    })
}

/// An error reading `/proc/PID/...`: the process is gone, or we may not look.
pub(crate) fn proc_error(pid: u32, what: &str, e: std::io::Error) -> Error {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Error::new(ErrorKind::Exited(pid));
    }
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            Error::refused(Refusal::NotPermitted(why_not_permitted(pid)))
        }
        Some(errno) => Error::system(format!("{what} of process {pid}"), errno),
        None => Error::system(format!("{what} of process {pid}: {e}"), libc::EIO),
    }
}

/// The fields of `/proc/PID/status` we use.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// `Name`.
    pub name: String,
    /// `State`'s letter.
    pub state: char,
    /// `TracerPid` (0: none).
    pub tracer: u32,
    /// Effective uid.
    pub uid: u32,
    /// `Seccomp`: 0 none, 1 strict, 2 filter.
    pub seccomp: u8,
    /// `SigBlk`.
    pub blocked: u64,
    /// `SigIgn`.
    pub ignored: u64,
    /// `CapEff`.
    pub cap_effective: u64,
}

/// `/proc/<path>/status`, e.g. `status("123")` or `status("123/task/124")`.
pub fn status(path: &str) -> std::io::Result<Status> {
    let text = std::fs::read_to_string(format!("/proc/{path}/status"))?;
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let hex = || u64::from_str_radix(value, 16).unwrap_or(0);
        match key {
            "Name" => s.name = value.to_string(),
            "State" => s.state = value.chars().next().unwrap_or('?'),
            "TracerPid" => s.tracer = value.parse().unwrap_or(0),
            "Uid" => {
                s.uid = value
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u32::MAX)
            }
            "Seccomp" => s.seccomp = value.parse().unwrap_or(0),
            "SigBlk" => s.blocked = hex(),
            "SigIgn" => s.ignored = hex(),
            "CapEff" => s.cap_effective = hex(),
            _ => {}
        }
    }
    Ok(s)
}

/// The thread ids of `pid`, sorted.
pub fn threads(pid: u32) -> Result<Vec<i32>> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| proc_error(pid, "listing /proc/PID/task", e))?;
    let mut tids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// What `/proc/PID/task/TID/syscall` says: the syscall a thread is blocked in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Running (or runnable) in user space.
    Running,
    /// Blocked in this system call.
    Syscall(i64),
    /// Blocked in the kernel outside a system call, or unknown.
    Other,
}

/// The activity of thread `tid` of `pid`.
pub fn activity(pid: u32, tid: i32) -> Activity {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) else {
        return Activity::Other;
    };
    let first = text.split_whitespace().next().unwrap_or("");
    match first {
        "running" => Activity::Running,
        n => match n.parse::<i64>() {
            Ok(nr) if nr >= 0 => Activity::Syscall(nr),
            _ => Activity::Other,
        },
    }
}

/// Whether this process (the CLI) has capability `bit` in its effective set.
pub(crate) fn have_capability(bit: u32) -> bool {
    status("self").is_ok_and(|s| s.cap_effective & (1u64 << bit) != 0)
}

/// Why the kernel refuses ptrace on `pid`, as precisely as `/proc` tells.
pub fn why_not_permitted(pid: u32) -> String {
    let me = rustix::process::geteuid().as_raw();
    let target = status(&pid.to_string()).map(|s| s.uid).ok();
    let cap = have_capability(CAP_SYS_PTRACE);
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    explain_not_permitted(me, target, cap, yama)
}

/// The explanation, from the facts (separate so that every case can be tested).
pub fn explain_not_permitted(
    me: u32,
    target: Option<u32>,
    cap_sys_ptrace: bool,
    yama: Option<u8>,
) -> String {
    match yama {
        Some(3) => {
            return "Yama's kernel.yama.ptrace_scope is 3: no process may be traced, by anyone, \
                    until reboot"
                .into()
        }
        Some(2) if !cap_sys_ptrace => {
            return "Yama's kernel.yama.ptrace_scope is 2: only a process with CAP_SYS_PTRACE \
                    may trace (run evolve as root)"
                .into()
        }
        _ => {}
    }
    if let Some(uid) = target {
        if uid != me && !cap_sys_ptrace {
            return format!(
                "the process runs as uid {uid} and evolve as uid {me} without CAP_SYS_PTRACE: \
                 run evolve as that user, or as root"
            );
        }
    }
    if yama == Some(1) && !cap_sys_ptrace {
        return "Yama's kernel.yama.ptrace_scope is 1: only a parent may trace its descendants \
                without CAP_SYS_PTRACE (run evolve with sudo, or set the scope to 0)"
            .into();
    }
    "the kernel refused (the process may be non-dumpable, e.g. setuid, or an LSM forbids it)".into()
}

/// The dev and inode of a file, to compare executables.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The process's executable (where `/proc/PID/exe` points).
pub fn executable(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The refusals decided from `/proc` alone: no such process, PID 1, evolve itself, kernel
/// threads, zombies, already traced.
pub fn check_basic(pid: u32) -> Result<Status> {
    if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(Error::new(ErrorKind::NoSuchProcess(pid)));
    }
    let status = status(&pid.to_string()).map_err(|e| proc_error(pid, "reading status", e))?;
    if pid == 1 {
        return Err(Error::refused(Refusal::Init));
    }
    if pid == std::process::id() {
        return Err(Error::refused(Refusal::Evolve));
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces and parentheses).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let flags: u64 = after
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    if flags & PF_KTHREAD != 0 {
        return Err(Error::refused(Refusal::KernelThread));
    }
    if matches!(status.state, 'Z' | 'X') {
        return Err(Error::refused(Refusal::Zombie));
    }
    if let (Some(ours), Some(theirs)) = (
        std::env::current_exe().ok().and_then(|p| file_id(&p)),
        file_id(Path::new(&format!("/proc/{pid}/exe"))),
    ) {
        if ours == theirs {
            return Err(Error::refused(Refusal::Evolve));
        }
    }
    check_not_traced(pid)?;
    Ok(status)
}

/// Refuses if any thread of `pid` has a tracer.
pub fn check_not_traced(pid: u32) -> Result<()> {
    for tid in threads(pid)? {
        let Ok(s) = status(&format!("{pid}/task/{tid}")) else {
            continue;
        };
        if s.tracer != 0 && s.tracer != std::process::id() {
            let name = status(&s.tracer.to_string())
                .map(|t| t.name)
                .unwrap_or_else(|_| "?".into());
            return Err(Error::refused(Refusal::Traced {
                tracer: s.tracer,
                name,
            }));
        }
    }
    Ok(())
}

/// The C library and dynamic loader the process runs with.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The mapped glibc (`libc.so.6`).
    pub libc: String,
    /// Every mapping, for symbol lookups.
    pub maps: Vec<Mapping>,
}

/// Refuses static binaries, processes without a dynamic loader and libcs other than glibc.
pub fn check_runtime(pid: u32) -> Result<Runtime> {
    let maps = maps(pid)?;
    let file_name = |m: &Mapping| {
        Path::new(&m.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let names: Vec<String> = maps.iter().map(file_name).collect();
    // musl's loader is its libc (`/usr/lib/x86_64-linux-musl/libc.so`, `/lib/ld-musl-*.so.1`).
    if maps.iter().any(|m| m.path.contains("musl")) {
        return Err(Error::refused(Refusal::NotGlibc(
            "the process runs on musl libc; evolve's agent is built against glibc".into(),
        )));
    }
    let has_loader = names.iter().any(|n| n.starts_with("ld-linux"));
    let libc = maps
        .iter()
        .find(|m| {
            let n = file_name(m);
            n == "libc.so.6" || (n.starts_with("libc-2.") && n.ends_with(".so"))
        })
        .map(|m| m.path.clone());
    match (has_loader, libc) {
        (true, Some(libc)) => Ok(Runtime { libc, maps }),
        (false, None) => Err(Error::refused(Refusal::Static(
            "the program is statically linked (no dynamic loader, no shared libc): nothing in \
             it can load a shared object"
                .into(),
        ))),
        (false, Some(_)) => Err(Error::refused(Refusal::Static(
            "the process has no glibc dynamic loader (ld-linux) mapped".into(),
        ))),
        (true, None) => Err(Error::refused(Refusal::NotGlibc(
            "the process has a dynamic loader but no glibc (libc.so.6) mapped".into(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let m = parse_mapping(
            "7f1c2a400000-7f1c2a428000 r--p 00000000 fe:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(m.start, 0x7f1c2a400000);
        assert_eq!(m.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(!m.is_exec());
        let anon = parse_mapping("7ffd1000-7ffd2000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(anon.path, "");
    }

    #[test]
    fn not_permitted_explanations_name_the_rule() {
        assert!(explain_not_permitted(1000, Some(1000), false, Some(3)).contains("is 3"));
        assert!(explain_not_permitted(0, Some(1000), false, Some(2)).contains("is 2"));
        assert!(explain_not_permitted(1000, Some(1000), false, Some(1)).contains("is 1"));
        assert!(explain_not_permitted(1000, Some(1000), true, Some(1)).contains("kernel refused"));
        let other = explain_not_permitted(1000, Some(33), false, None);
        assert!(
            other.contains("uid 33") && other.contains("CAP_SYS_PTRACE"),
            "{other}"
        );
        assert!(explain_not_permitted(0, Some(33), true, Some(0)).contains("non-dumpable"));
    }

    #[test]
    fn own_process_is_refused_as_evolve() {
        let e = check_basic(std::process::id()).unwrap_err();
        assert_eq!(e.refusal(), Some(&Refusal::Evolve));
        let e = check_basic(1).unwrap_err();
        assert_eq!(e.refusal(), Some(&Refusal::Init));
        assert!(matches!(
            check_basic(0).unwrap_err().kind(),
            ErrorKind::NoSuchProcess(0)
        ));
    }
}
