//! The loader: the routine the target's new thread runs, and the block it shares with us
//! (layout and protocol: [`evolve_code::attached`]).
//!
//! The borrowed thread makes two calls only — `mmap` of the two-page loader region (mapped
//! read-and-execute; we write it through `/proc/PID/mem`) and `pthread_create` on the routine —
//! and is given back. Everything slow (`dlopen` of the agent, its start) happens on the new
//! thread while the whole process runs.

use crate::error::{Error, ErrorKind, Result};
use crate::memory::Memory;
use evolve_code::attached::{layout, ENTRY_SYMBOL};
use iced_x86::code_asm::*;

/// Size of a page (the region is one code page and one data page).
pub const PAGE: u64 = 4096;
/// Size of the loader region.
pub const REGION_LEN: u64 = 2 * PAGE;

const RTLD_NOW: i32 = 2;
const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;

/// The target's functions the loader and the borrowed thread call.
#[derive(Debug, Clone, Copy)]
pub struct Functions {
    /// `mmap`.
    pub mmap: u64,
    /// `munmap`.
    pub munmap: u64,
    /// `mprotect`.
    pub mprotect: u64,
    /// `pthread_create`.
    pub pthread_create: u64,
    /// `pthread_self`.
    pub pthread_self: u64,
    /// `pthread_detach`.
    pub pthread_detach: u64,
    /// `dlopen`.
    pub dlopen: u64,
    /// `dlsym`.
    pub dlsym: u64,
    /// `dlerror`.
    pub dlerror: u64,
    /// `dlclose`.
    pub dlclose: u64,
}

fn asm_error(e: IcedError) -> Error {
    Error::system(format!("assembling the loader: {e}"), libc::EINVAL)
}

/// The loader routine, assembled to run at `base` (the code page). It follows the System V
/// ABI as a thread start routine: `rdi` is the block (the data page). Its steps are those of
/// [`evolve_code::attached`]'s protocol.
pub fn routine(base: u64) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(64).map_err(asm_error)?;
    let off = |o: usize| o as i32;
    let mut dlopen_failed = a.create_label();
    let mut no_entry = a.create_label();
    let mut have_entry = a.create_label();
    let mut start_failed = a.create_label();
    let mut out = a.create_label();
    let mut copy_error = a.create_label();
    let mut copy_loop = a.create_label();
    let mut copy_done = a.create_label();
    let mut from_path = a.create_label();
    let mut opened = a.create_label();
    let mut wait_memfd = a.create_label();
    let mut memfd_filled = a.create_label();
    let mut memfd_given_up = a.create_label();
    let mut memfd_failed = a.create_label();
    let fp = |i: usize| off(layout::FUNCTIONS + 8 * i);
    (|| -> std::result::Result<(), IcedError> {
        // Entry: rsp ≡ 8 (mod 16); two pushes and 8 bytes realign it for the calls below.
        a.push(rbx)?;
        a.push(r12)?;
        a.sub(rsp, 8)?;
        a.mov(rbx, rdi)?;
        // rt_sigprocmask(SIG_SETMASK, &block.sigmask, NULL, 8): the creator's own mask (it
        // was borrowed with its asynchronous signals blocked, and this thread inherited that).
        a.mov(eax, libc::SYS_rt_sigprocmask as u32)?;
        a.mov(edi, libc::SIG_SETMASK as u32)?;
        a.lea(rsi, qword_ptr(rbx + off(layout::SIGMASK)))?;
        a.xor(edx, edx)?;
        a.mov(r10d, 8)?;
        a.syscall()?;
        // The data page was mapped read-only with the code; make it writable.
        a.mov(rdi, rbx)?;
        a.mov(esi, PAGE as u32)?;
        a.mov(edx, (PROT_READ | PROT_WRITE) as u32)?;
        a.call(qword_ptr(rbx + off(layout::MPROTECT)))?;
        a.test(eax, eax)?;
        a.jnz(out)?;
        // pthread_detach(pthread_self()): nobody joins this thread.
        a.call(qword_ptr(rbx + fp(0)))?;
        a.mov(rdi, rax)?;
        a.call(qword_ptr(rbx + fp(1)))?;
        // The kernel tid, so that the agent (or the injector) knows when this thread is gone.
        a.mov(eax, libc::SYS_gettid as u32)?;
        a.syscall()?;
        a.mov(dword_ptr(rbx + off(layout::TID)), eax)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::LOADING)?;
        // An agent already loaded (after a detach): call its entry directly.
        a.mov(rax, qword_ptr(rbx + off(layout::ENTRY)))?;
        a.test(rax, rax)?;
        a.jnz(have_entry)?;
        a.cmp(dword_ptr(rbx + off(layout::LOAD_FROM)), layout::FROM_MEMFD)?;
        a.jne(from_path)?;

        // memfd_create(name, MFD_CLOEXEC); the injector fills it through /proc/PID/fd/N.
        a.mov(eax, libc::SYS_memfd_create as u32)?;
        a.lea(rdi, qword_ptr(rbx + off(layout::MEMFD_NAME)))?;
        a.mov(esi, libc::MFD_CLOEXEC)?;
        a.syscall()?;
        a.mov(dword_ptr(rbx + off(layout::MEMFD)), eax)?;
        a.test(eax, eax)?;
        a.js(memfd_failed)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::WAITING)?;
        a.mov(r12d, layout::MAX_NAPS)?;
        a.set_label(&mut wait_memfd)?;
        a.cmp(
            dword_ptr(rbx + off(layout::LOAD_FROM)),
            layout::MEMFD_FILLED,
        )?;
        a.je(memfd_filled)?;
        a.cmp(
            dword_ptr(rbx + off(layout::LOAD_FROM)),
            layout::MEMFD_ABANDONED,
        )?;
        a.je(memfd_given_up)?;
        a.dec(r12d)?;
        a.jz(memfd_given_up)?;
        a.mov(eax, libc::SYS_nanosleep as u32)?;
        a.lea(rdi, qword_ptr(rbx + off(layout::NAP)))?;
        a.xor(esi, esi)?;
        a.syscall()?;
        a.jmp(wait_memfd)?;
        a.set_label(&mut memfd_filled)?;
        a.lea(rdi, qword_ptr(rbx + off(layout::FD_PATH)))?;
        a.mov(esi, RTLD_NOW as u32)?;
        a.call(qword_ptr(rbx + fp(2)))?;
        // The mapping keeps the memfd's pages; the descriptor is no longer needed.
        a.mov(r12, rax)?;
        a.mov(edi, dword_ptr(rbx + off(layout::MEMFD)))?;
        a.mov(eax, libc::SYS_close as u32)?;
        a.syscall()?;
        a.mov(rax, r12)?;
        a.jmp(opened)?;

        a.set_label(&mut from_path)?;
        a.lea(rdi, qword_ptr(rbx + off(layout::PATH)))?;
        a.mov(esi, RTLD_NOW as u32)?;
        a.call(qword_ptr(rbx + fp(2)))?;
        a.set_label(&mut opened)?;
        a.test(rax, rax)?;
        a.jz(dlopen_failed)?;
        a.mov(qword_ptr(rbx + off(layout::HANDLE)), rax)?;
        a.mov(rdi, rax)?;
        a.lea(rsi, qword_ptr(rbx + off(layout::ENTRY_NAME)))?;
        a.call(qword_ptr(rbx + fp(3)))?;
        a.test(rax, rax)?;
        a.jz(no_entry)?;
        a.set_label(&mut have_entry)?;
        a.mov(rdi, rbx)?;
        a.call(rax)?;
        a.test(eax, eax)?;
        a.jnz(start_failed)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::READY)?;
        a.jmp(out)?;

        a.set_label(&mut dlopen_failed)?;
        a.call(copy_error)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::DLOPEN_FAILED)?;
        a.jmp(out)?;

        a.set_label(&mut no_entry)?;
        a.call(copy_error)?;
        a.mov(rdi, qword_ptr(rbx + off(layout::HANDLE)))?;
        a.call(qword_ptr(rbx + fp(5)))?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::NO_ENTRY)?;
        a.jmp(out)?;

        // Not filled in time, or abandoned: close the memfd and report.
        a.set_label(&mut memfd_given_up)?;
        a.mov(edi, dword_ptr(rbx + off(layout::MEMFD)))?;
        a.mov(eax, libc::SYS_close as u32)?;
        a.syscall()?;
        a.set_label(&mut memfd_failed)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::MEMFD_FAILED)?;
        a.jmp(out)?;

        // The entry wrote its message; the object stays loaded (its starter may have begun).
        a.set_label(&mut start_failed)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::START_FAILED)?;

        a.set_label(&mut out)?;
        a.xor(eax, eax)?;
        a.add(rsp, 8)?;
        a.pop(r12)?;
        a.pop(rbx)?;
        a.ret()?;

        // copy_error: the block's error buffer = dlerror(). Entered with rsp ≡ 8 (mod 16)
        // (the routine's frame is aligned, the call pushed 8): realign for dlerror.
        a.set_label(&mut copy_error)?;
        a.sub(rsp, 8)?;
        a.call(qword_ptr(rbx + fp(4)))?;
        a.add(rsp, 8)?;
        a.lea(rdi, qword_ptr(rbx + off(layout::ERROR)))?;
        a.mov(byte_ptr(rdi), 0)?;
        a.test(rax, rax)?;
        a.jz(copy_done)?;
        a.mov(ecx, (layout::ERROR_LEN - 1) as u32)?;
        a.set_label(&mut copy_loop)?;
        a.mov(dl, byte_ptr(rax))?;
        a.mov(byte_ptr(rdi), dl)?;
        a.test(dl, dl)?;
        a.jz(copy_done)?;
        a.inc(rax)?;
        a.inc(rdi)?;
        a.dec(ecx)?;
        a.jnz(copy_loop)?;
        a.mov(byte_ptr(rdi), 0)?;
        a.set_label(&mut copy_done)?;
        a.ret()?;
        Ok(())
    })()
    .map_err(asm_error)?;
    a.assemble(base).map_err(asm_error)
}

/// What the block tells the loader.
pub struct BlockSpec<'a> {
    /// The region's start.
    pub region: u64,
    /// The target's functions.
    pub functions: &'a Functions,
    /// The agent shared object.
    pub agent: &'a str,
    /// The agent's entry if it is already loaded.
    pub loaded_entry: Option<u64>,
    /// Where the agent puts its socket.
    pub socket_dir: &'a str,
    /// The signal mask the loader thread installs (its creator's own).
    pub sigmask: u64,
    /// Load the agent from a memfd the injector fills rather than from its path.
    pub from_memfd: bool,
}

fn put(block: &mut [u8], offset: usize, bytes: &[u8]) {
    block[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn put_str(block: &mut [u8], offset: usize, max: usize, text: &str, what: &str) -> Result<()> {
    if text.len() + 1 > max || text.contains('\0') {
        return Err(Error::system(
            format!(
                "{what} {text:?} is longer than {} bytes or holds a NUL",
                max - 1
            ),
            libc::ENAMETOOLONG,
        ));
    }
    put(block, offset, text.as_bytes());
    Ok(())
}

/// The data page's initial contents.
pub fn block(spec: &BlockSpec<'_>) -> Result<Vec<u8>> {
    let mut b = vec![0u8; PAGE as usize];
    let f = spec.functions;
    for (i, address) in [
        f.pthread_self,
        f.pthread_detach,
        f.dlopen,
        f.dlsym,
        f.dlerror,
        f.dlclose,
    ]
    .into_iter()
    .enumerate()
    {
        put(&mut b, layout::FUNCTIONS + 8 * i, &address.to_le_bytes());
    }
    put(&mut b, layout::MPROTECT, &f.mprotect.to_le_bytes());
    put(&mut b, layout::SIGMASK, &spec.sigmask.to_le_bytes());
    // A 200 µs nap between looks at the memfd's state.
    put(&mut b, layout::NAP + 8, &200_000u64.to_le_bytes());
    let from = if spec.from_memfd {
        layout::FROM_MEMFD
    } else {
        layout::FROM_PATH
    };
    put(&mut b, layout::LOAD_FROM, &from.to_le_bytes());
    // Not created yet (a failed memfd_create stores -errno).
    put(&mut b, layout::MEMFD, &i32::MIN.to_le_bytes());
    put_str(
        &mut b,
        layout::MEMFD_NAME,
        64,
        crate::AGENT_FILE,
        "the memfd's name",
    )?;
    put(&mut b, layout::REGION, &spec.region.to_le_bytes());
    put(&mut b, layout::REGION_LEN, &REGION_LEN.to_le_bytes());
    put(
        &mut b,
        layout::ENTRY,
        &spec.loaded_entry.unwrap_or(0).to_le_bytes(),
    );
    put_str(
        &mut b,
        layout::ENTRY_NAME,
        64,
        ENTRY_SYMBOL,
        "the entry name",
    )?;
    put_str(
        &mut b,
        layout::SOCKET_DIR,
        layout::SOCKET_DIR_LEN,
        spec.socket_dir,
        "the socket directory",
    )?;
    put_str(
        &mut b,
        layout::PATH,
        layout::PATH_LEN,
        spec.agent,
        "the agent's path",
    )?;
    Ok(b)
}

/// Writes the region's pages (code, then the block) into the target.
pub fn install(memory: &Memory, spec: &BlockSpec<'_>) -> Result<()> {
    let code = routine(spec.region)?;
    assert!(code.len() as u64 <= PAGE, "the loader fits in a page");
    memory.write(spec.region + PAGE, &block(spec)?)?;
    memory.write(spec.region, &code)
}

/// The `mmap` arguments of the region: two pages, read and execute (written through
/// `/proc/PID/mem`; the loader makes its data page writable itself).
pub fn mmap_args() -> [u64; 6] {
    [
        0,
        REGION_LEN,
        PROT_READ | PROT_EXEC,
        (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
        u64::MAX,
        0,
    ]
}

/// What the loader reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The loader reached the status waited for.
    Reached,
    /// The loader failed; the region is still mapped and must be unmapped once `tid` exited.
    Failed {
        /// Status code.
        status: i32,
        /// Message.
        message: String,
        /// The loader thread.
        tid: i32,
    },
    /// The region is gone: the agent took it over and unmapped it (success), read first.
    RegionGone,
}

/// Polls the block until the loader reaches status `until` (or fails), up to `timeout`.
pub fn wait(
    memory: &Memory,
    pid: u32,
    region: u64,
    until: i32,
    timeout: std::time::Duration,
) -> Result<Outcome> {
    let block = region + PAGE;
    let deadline = std::time::Instant::now() + timeout;
    let mut tid_seen = 0;
    loop {
        let status = match memory.read_i32(block + layout::STATUS as u64) {
            Ok(s) => s,
            Err(_) if crate::process::dying(pid) => return Err(Error::new(ErrorKind::Exited(pid))),
            Err(_) => return Ok(Outcome::RegionGone),
        };
        if tid_seen == 0 {
            tid_seen = memory.read_i32(block + layout::TID as u64).unwrap_or(0);
        }
        match status {
            s if s == until => return Ok(Outcome::Reached),
            layout::MEMFD_FAILED => {
                let fd = memory
                    .read_i32(block + layout::MEMFD as u64)
                    .unwrap_or(i32::MIN);
                let message = if fd < 0 && fd != i32::MIN {
                    format!(
                        "memfd_create failed in the process: {}",
                        std::io::Error::from_raw_os_error(-fd)
                    )
                } else {
                    "the agent was not written into the loader's memfd".to_string()
                };
                return Ok(Outcome::Failed {
                    status,
                    message,
                    tid: tid_seen,
                });
            }
            s if s < 0 => {
                let raw = memory.read(block + layout::ERROR as u64, layout::ERROR_LEN)?;
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                return Ok(Outcome::Failed {
                    status: s,
                    message: String::from_utf8_lossy(&raw[..end]).into_owned(),
                    tid: tid_seen,
                });
            }
            _ => {}
        }
        // A loader that vanished without a final status failed before it could write one.
        if tid_seen != 0
            && !std::path::Path::new(&format!("/proc/{pid}/task/{tid_seen}")).exists()
            && memory.read_i32(block + layout::STATUS as u64).ok() == Some(status)
        {
            return Ok(Outcome::Failed {
                status,
                message: "the loader thread ended without reporting".into(),
                tid: tid_seen,
            });
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(ErrorKind::Timeout(format!(
                "the loader thread (tid {tid_seen}) of process {pid} did not finish within {} s; \
                 it is left running",
                timeout.as_secs()
            ))));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// The part of shared object `data` that `dlopen` reads: everything up to the end of the last
/// segment, without section headers (the debug info and symbol tables that follow are never
/// mapped, and would only cost the target memory in a memfd).
///
/// # Errors
/// `data` is not a 64-bit ELF file.
pub fn loadable_image(data: &[u8]) -> Result<Vec<u8>> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let not_elf = |e: object::Error| {
        Error::system(
            format!("the agent is not a 64-bit ELF file ({e})"),
            libc::ENOEXEC,
        )
    };
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    let end = header
        .program_headers(endian, data)
        .map_err(not_elf)?
        .iter()
        .map(|p| p.p_offset(endian) + p.p_filesz(endian))
        .max()
        .unwrap_or(0) as usize;
    let mut image = data[..end.min(data.len())].to_vec();
    let (copy, _) =
        object::pod::from_bytes_mut::<object::elf::FileHeader64<object::Endianness>>(&mut image)
            .map_err(|()| Error::system("the agent's ELF header", libc::ENOEXEC))?;
    copy.e_shoff.set(endian, 0);
    copy.e_shnum.set(endian, 0);
    copy.e_shstrndx.set(endian, 0);
    Ok(image)
}

/// Writes `image` into the memfd the loader created (through `/proc/PID/fd/N`, which reaches
/// it whatever the target's mount namespace) and tells the loader to load it. On failure the
/// loader is told to give up (it then reports [`layout::MEMFD_FAILED`]).
///
/// # Errors
/// The descriptor cannot be opened or written.
pub fn fill_memfd(memory: &Memory, pid: u32, region: u64, image: &[u8]) -> Result<()> {
    use std::io::Write;
    let block = region + PAGE;
    let filled = (|| -> Result<()> {
        let fd = memory.read_i32(block + layout::MEMFD as u64)?;
        let path = format!("/proc/{pid}/fd/{fd}");
        let sys = |what: &str, e: std::io::Error| {
            Error::system(
                format!("{what} {path} (the loader's memfd)"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| sys("opening", e))?;
        file.write_all(image).map_err(|e| sys("writing", e))?;
        let mut fd_path = format!("/proc/self/fd/{fd}").into_bytes();
        fd_path.push(0);
        memory.write(block + layout::FD_PATH as u64, &fd_path)
    })();
    let next = if filled.is_ok() {
        layout::MEMFD_FILLED
    } else {
        layout::MEMFD_ABANDONED
    };
    memory.write(block + layout::LOAD_FROM as u64, &next.to_le_bytes())?;
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routine_assembles_into_a_page_and_decodes() {
        let code = routine(0x7f00_0000_0000).unwrap();
        assert!(code.len() < PAGE as usize / 4, "{} bytes", code.len());
        let mut decoder = iced_x86::Decoder::with_ip(64, &code, 0x7f00_0000_0000, 0);
        let mut rets = 0;
        while decoder.can_decode() {
            let insn = decoder.decode();
            assert!(!insn.is_invalid());
            if insn.mnemonic() == iced_x86::Mnemonic::Ret {
                rets += 1;
            }
        }
        assert_eq!(rets, 2, "the routine and its error copier each return once");
    }

    #[test]
    fn the_block_holds_paths_and_functions_at_their_offsets() {
        let functions = Functions {
            mmap: 1,
            munmap: 2,
            mprotect: 3,
            pthread_create: 4,
            pthread_self: 5,
            pthread_detach: 6,
            dlopen: 7,
            dlsym: 8,
            dlerror: 9,
            dlclose: 10,
        };
        let b = block(&BlockSpec {
            region: 0x1000,
            functions: &functions,
            agent: "/opt/evolve/libevolve_attach_agent.so",
            loaded_entry: None,
            socket_dir: "/run/user/1000/evolve",
            sigmask: 1 << (libc::SIGUSR1 - 1),
            from_memfd: true,
        })
        .unwrap();
        let word = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(word(layout::FUNCTIONS + 16), 7);
        assert_eq!(word(layout::MPROTECT), 3);
        assert_eq!(word(layout::REGION_LEN), REGION_LEN);
        assert!(b[layout::PATH..].starts_with(b"/opt/evolve/libevolve_attach_agent.so\0"));
        assert!(b[layout::ENTRY_NAME..].starts_with(b"evolve_attach_entry\0"));
        assert!(b[layout::MEMFD_NAME..].starts_with(b"libevolve_attach_agent.so\0"));
        assert_eq!(word(layout::SIGMASK), 1 << (libc::SIGUSR1 - 1));
        let int = |o: usize| i32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(int(layout::LOAD_FROM), layout::FROM_MEMFD);
        assert_eq!(int(layout::MEMFD), i32::MIN);
        assert_eq!(word(layout::NAP + 8), 200_000, "a 200 µs nap");
        let long = "x".repeat(layout::SOCKET_DIR_LEN);
        assert!(block(&BlockSpec {
            region: 0,
            functions: &functions,
            agent: "/a",
            loaded_entry: None,
            socket_dir: &long,
            sigmask: 0,
            from_memfd: false,
        })
        .is_err());
    }
}
