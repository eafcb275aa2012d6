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
/// ABI as a thread start routine: `rdi` is the block (the data page).
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
    let fp = |i: usize| off(layout::FUNCTIONS + 8 * i);
    (|| -> std::result::Result<(), IcedError> {
        // Entry: rsp ≡ 8 (mod 16); one push realigns it for the calls below.
        a.push(rbx)?;
        a.mov(rbx, rdi)?;
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
        a.lea(rdi, qword_ptr(rbx + off(layout::PATH)))?;
        a.mov(esi, RTLD_NOW as u32)?;
        a.call(qword_ptr(rbx + fp(2)))?;
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

        // The entry wrote its message; the object stays loaded (its starter may have begun).
        a.set_label(&mut start_failed)?;
        a.mov(dword_ptr(rbx + off(layout::STATUS)), layout::START_FAILED)?;

        a.set_label(&mut out)?;
        a.xor(eax, eax)?;
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
    /// The agent serves its socket.
    Ready,
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

/// Polls the block until the loader finishes, up to `timeout`.
pub fn wait(
    memory: &Memory,
    pid: u32,
    region: u64,
    timeout: std::time::Duration,
) -> Result<Outcome> {
    let block = region + PAGE;
    let deadline = std::time::Instant::now() + timeout;
    let mut tid_seen = 0;
    loop {
        let status = match memory.read_i32(block + layout::STATUS as u64) {
            Ok(s) => s,
            Err(_)
                if !crate::process::status(&pid.to_string())
                    .is_ok_and(|s| !matches!(s.state, 'Z' | 'X')) =>
            {
                return Err(Error::new(ErrorKind::Exited(pid)))
            }
            Err(_) => return Ok(Outcome::RegionGone),
        };
        if tid_seen == 0 {
            tid_seen = memory.read_i32(block + layout::TID as u64).unwrap_or(0);
        }
        match status {
            layout::READY => return Ok(Outcome::Ready),
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
        })
        .unwrap();
        let word = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(word(layout::FUNCTIONS + 16), 7);
        assert_eq!(word(layout::MPROTECT), 3);
        assert_eq!(word(layout::REGION_LEN), REGION_LEN);
        assert!(b[layout::PATH..].starts_with(b"/opt/evolve/libevolve_attach_agent.so\0"));
        assert!(b[layout::ENTRY_NAME..].starts_with(b"evolve_attach_entry\0"));
        let long = "x".repeat(layout::SOCKET_DIR_LEN);
        assert!(block(&BlockSpec {
            region: 0,
            functions: &functions,
            agent: "/a",
            loaded_entry: None,
            socket_dir: &long,
        })
        .is_err());
    }
}
