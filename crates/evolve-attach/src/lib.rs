//! `evolve attach`: bring Evolve's agent into a running process that never linked it.
//!
//! [`attach`] checks the process (the refusals of [`Refusal`], decided before anything in it
//! changes), seizes every thread with ptrace, borrows one thread at a point where it holds no
//! C-library lock for two remote calls — `mmap` of a two-page loader region and
//! `pthread_create` of a loader thread — and gives it back every register (general and
//! FP/SSE/AVX) exactly ([`tracer`] has the protocol). The loader thread `dlopen`s the agent
//! shared object (`libevolve_attach_agent.so`, built by the workspace and found next to the
//! `evolve` binary) and calls its entry, which starts the usual control socket
//! ([`evolve_code::attached`] has the loader's protocol). A process that already runs an agent
//! (linked, or attached earlier) is not touched: its agent is reused.
//!
//! Only the borrowed thread is ever stopped, for well under a millisecond on an idle machine;
//! [`Attached::stops`] records every stop.
//!
//! # Example
//!
//! ```no_run
//! let attached = evolve_attach::attach(1234, &evolve_attach::Options::default())?;
//! println!(
//!     "agent on {} (thread {:?} stopped {:?})",
//!     attached.socket.display(),
//!     attached.stops.borrowed,
//!     attached.stops.max()
//! );
//! # Ok::<(), evolve_attach::Error>(())
//! ```
#![deny(unsafe_code)]

pub mod error;
pub mod loader;
pub mod memory;
pub mod process;
pub mod seccomp;
pub mod symbols;
pub mod tracer;

pub use error::{Error, ErrorKind, Refusal, Result};
pub use tracer::Stops;

use evolve_agent::client::Connection;
use evolve_agent::paths;
use evolve_agent::protocol::{Hello, Request};
use loader::Functions;
use memory::Memory;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The agent shared object's file name.
pub const AGENT_FILE: &str = "libevolve_attach_agent.so";

/// How an attach is done.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The agent shared object (default: [`find_agent`]).
    pub agent: Option<PathBuf>,
    /// Where the agent puts its socket (default: [`socket_dir_for`] the process's owner).
    pub socket_dir: Option<PathBuf>,
}

/// A process with a running agent.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The process.
    pub pid: u32,
    /// Its agent's socket.
    pub socket: PathBuf,
    /// What its agent says about itself.
    pub hello: Hello,
    /// Whether an agent was already running (nothing was injected).
    pub reused: bool,
    /// Every stop of a thread of the target.
    pub stops: Stops,
    /// From the call to the agent's first answer.
    pub total: Duration,
    /// From the loader thread's start to the agent serving.
    pub load: Duration,
}

/// The agent shared object next to the running executable (`target/release/`), or installed
/// beside it (`../lib/evolve/`).
///
/// # Errors
/// [`ErrorKind::AgentNotFound`] naming the places looked at.
pub fn find_agent() -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let mut candidates = Vec::new();
    if let Some(dir) = dir {
        candidates.push(dir.join(AGENT_FILE));
        // Tests and benches run from target/<profile>/deps.
        if dir.ends_with("deps") {
            if let Some(up) = dir.parent() {
                candidates.push(up.join(AGENT_FILE));
            }
        }
        candidates.push(dir.join("../lib/evolve").join(AGENT_FILE));
    }
    for c in &candidates {
        if c.is_file() {
            return c.canonicalize().map_err(|e| {
                Error::new(ErrorKind::AgentNotFound(format!("{}: {e}", c.display())))
            });
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(Error::new(ErrorKind::AgentNotFound(format!(
        "the agent shared object {AGENT_FILE} is not installed (looked at {}); build it with \
         `cargo build --release -p evolve-agent-so`",
        looked.join(", ")
    ))))
}

/// The socket directory an agent of a process owned by `uid` uses, as the CLI looks for it.
pub fn socket_dir_for(uid: u32) -> PathBuf {
    if uid == rustix::process::geteuid().as_raw() {
        return paths::socket_dir();
    }
    let run = PathBuf::from(format!("/run/user/{uid}"));
    if run.is_dir() {
        run.join("evolve")
    } else {
        paths::fallback_dir(uid)
    }
}

/// The running agent of `pid`, if its socket answers.
pub fn running_agent(pid: u32) -> Option<(PathBuf, Hello)> {
    let owner = paths::process_owner(pid);
    for dir in paths::candidate_dirs(owner) {
        let socket = paths::socket_path(&dir, pid);
        if !socket.exists() {
            continue;
        }
        if let Some(hello) = hello(&socket) {
            if hello.pid == pid {
                return Some((socket, hello));
            }
        }
    }
    None
}

fn hello(socket: &Path) -> Option<Hello> {
    let mut c = Connection::connect(socket).ok()?;
    let value = c.call(&Request::Hello, Duration::from_secs(3)).ok()?;
    serde_json::from_value(value).ok()
}

/// The functions of the target's C library the attach calls.
fn functions(pid: u32, runtime: &process::Runtime, memory: &Memory) -> Result<Functions> {
    let libc_exports = symbols::exports(pid, &runtime.maps, &runtime.libc, memory)?;
    // glibc before 2.34 kept dlopen in libdl and pthread_create in libpthread.
    let others: Vec<symbols::Exports> = runtime
        .maps
        .iter()
        .filter(|m| {
            let n = Path::new(&m.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            n.is_some_and(|n| n.starts_with("libdl.so") || n.starts_with("libpthread.so"))
        })
        .map(|m| m.path.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|p| symbols::exports(pid, &runtime.maps, &p, memory).ok())
        .collect();
    let find = |name: &str| -> Result<u64> {
        libc_exports
            .function(name)
            .or_else(|| others.iter().find_map(|e| e.function(name)))
            .ok_or_else(|| {
                Error::refused(Refusal::NotGlibc(format!(
                    "{} exports no {name} (glibc before 2.34 without libdl/libpthread loaded?)",
                    runtime.libc
                )))
            })
    };
    Ok(Functions {
        mmap: find("mmap")?,
        munmap: find("munmap")?,
        mprotect: find("mprotect")?,
        pthread_create: find("pthread_create")?,
        pthread_self: find("pthread_self")?,
        pthread_detach: find("pthread_detach")?,
        dlopen: find("dlopen")?,
        dlsym: find("dlsym")?,
        dlerror: find("dlerror")?,
        dlclose: find("dlclose")?,
    })
}

/// The entry of an agent object already mapped in the target (after `evolve detach`).
fn loaded_entry(pid: u32, runtime: &process::Runtime, memory: &Memory) -> Option<u64> {
    let path = runtime
        .maps
        .iter()
        .find(|m| m.path.ends_with(AGENT_FILE))?
        .path
        .clone();
    symbols::exports(pid, &runtime.maps, &path, memory)
        .ok()?
        .function(evolve_code::attached::ENTRY_SYMBOL)
}

/// Refuses a seccomp-filtered thread whose filter forbids what attaching needs.
fn check_seccomp(pid: u32, tid: i32) -> Result<()> {
    let status = process::status(&format!("{pid}/task/{tid}"))
        .map_err(|e| process::proc_error(pid, "reading the thread's status", e))?;
    match status.seccomp {
        0 => Ok(()),
        1 => Err(Error::refused(Refusal::Seccomp(
            "the thread runs in seccomp strict mode: only read, write, exit and sigreturn are \
             allowed"
                .into(),
        ))),
        _ => {
            let filters = evolve_code::ptrace::seccomp_filters(tid).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) {
                    Error::refused(Refusal::Seccomp(
                        "the process runs under a seccomp filter, and reading it to check that \
                         it allows what the loader and the agent need (mmap, clone, openat, \
                         socket, …) requires CAP_SYS_ADMIN: run evolve as root"
                            .into(),
                    ))
                } else {
                    Error::system(
                        "reading the seccomp filter (PTRACE_SECCOMP_GET_FILTER)",
                        e.raw_os_error().unwrap_or(libc::EIO),
                    )
                }
            })?;
            match seccomp::first_forbidden(&filters) {
                None => Ok(()),
                Some((call, action)) => Err(Error::refused(Refusal::Seccomp(format!(
                    "the process's seccomp filter would {action} on {} (needed by {})",
                    call.name, call.needed_by
                )))),
            }
        }
    }
}

/// Brings the agent into process `pid` (see the crate docs), or reuses the one it runs.
///
/// # Errors
/// A [`Refusal`] (nothing in the process changed), the process exiting meanwhile, the loader
/// failing in the process (its memory is removed again), or a system error.
pub fn attach(pid: u32, options: &Options) -> Result<Attached> {
    let started = Instant::now();
    let status = process::check_basic(pid)?;
    if let Some((socket, hello)) = running_agent(pid) {
        return Ok(Attached {
            pid,
            socket,
            hello,
            reused: true,
            stops: Stops::default(),
            total: started.elapsed(),
            load: Duration::ZERO,
        });
    }
    let agent = match &options.agent {
        Some(a) => a.clone(),
        None => find_agent()?,
    };
    let runtime = process::check_runtime(pid)?;
    let memory = Memory::open(pid)?;
    let functions = functions(pid, &runtime, &memory)?;
    let entry = loaded_entry(pid, &runtime, &memory);
    let socket_dir = options
        .socket_dir
        .clone()
        .unwrap_or_else(|| socket_dir_for(status.uid));
    let agent_path = agent.display().to_string();
    let socket_dir_text = socket_dir.display().to_string();

    let (region, stops) = tracer::with_borrowed_thread(
        pid,
        &runtime.maps,
        |borrowed| check_seccomp(pid, borrowed.tid()),
        |borrowed| {
            let region = borrowed.call(&memory, functions.mmap, &loader::mmap_args())?;
            if region > u64::MAX - 4095 {
                return Err(Error::system(
                    "mmap of the loader region in the process",
                    -(region as i64) as i32,
                ));
            }
            let spec = loader::BlockSpec {
                region,
                functions: &functions,
                agent: &agent_path,
                loaded_entry: entry,
                socket_dir: &socket_dir_text,
            };
            let started_thread = loader::install(&memory, &spec).and_then(|()| {
                let created = borrowed.call(
                    &memory,
                    functions.pthread_create,
                    &[borrowed.scratch(), 0, region, region + loader::PAGE],
                )? as i32;
                if created != 0 {
                    return Err(Error::system(
                        "pthread_create of the loader thread in the process",
                        created,
                    ));
                }
                Ok(())
            });
            if let Err(e) = started_thread {
                // Nothing runs in the region: take it back while we hold the thread.
                let _ = borrowed.call(&memory, functions.munmap, &[region, loader::REGION_LEN]);
                return Err(e);
            }
            Ok(region)
        },
    )?;
    let loading = Instant::now();
    match loader::wait(&memory, pid, region, Duration::from_secs(20))? {
        loader::Outcome::Ready | loader::Outcome::RegionGone => {}
        loader::Outcome::Failed {
            status,
            message,
            tid,
        } => {
            cleanup(pid, &runtime, &functions, &memory, region, tid)?;
            return Err(Error::new(ErrorKind::LoaderFailed { status, message }));
        }
    }
    let load = loading.elapsed();
    let socket = paths::socket_path(&socket_dir, pid);
    let hello = hello(&socket).ok_or_else(|| {
        if !alive(pid) {
            return Error::new(ErrorKind::Exited(pid));
        }
        Error::new(ErrorKind::Timeout(format!(
            "the agent reported ready but {} does not answer",
            socket.display()
        )))
    })?;
    Ok(Attached {
        pid,
        socket,
        hello,
        reused: false,
        stops,
        total: started.elapsed(),
        load,
    })
}

/// Whether `pid` still runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    process::status(&pid.to_string()).is_ok_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// Unmaps a failed loader's region once its thread is gone (a second, equally short borrow).
fn cleanup(
    pid: u32,
    runtime: &process::Runtime,
    functions: &Functions,
    memory: &Memory,
    region: u64,
    loader_tid: i32,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while loader_tid != 0 && Path::new(&format!("/proc/{pid}/task/{loader_tid}")).exists() {
        if Instant::now() > deadline {
            return Err(Error::new(ErrorKind::Timeout(format!(
                "the failed loader thread {loader_tid} did not exit; its two pages stay mapped \
                 at {region:#x}"
            ))));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (result, _) = tracer::with_borrowed_thread(
        pid,
        &runtime.maps,
        |_| Ok(()),
        |borrowed| borrowed.call(memory, functions.munmap, &[region, loader::REGION_LEN]),
    )?;
    if result != 0 {
        return Err(Error::system(
            format!("munmap of the loader region {region:#x}"),
            -(result as i64) as i32,
        ));
    }
    Ok(())
}

/// Asks the agent of `pid` to remove its probes and stop (`revert`: revert applied patches
/// instead of refusing); waits until its socket is gone.
///
/// # Errors
/// No agent, a linked agent, patches applied without `revert`, or the agent not stopping.
pub fn detach(
    pid: u32,
    revert: bool,
) -> std::result::Result<evolve_agent::protocol::Detached, String> {
    let (socket, _) =
        running_agent(pid).ok_or_else(|| format!("process {pid} runs no evolve agent"))?;
    let mut c = Connection::connect(&socket).map_err(|e| e.to_string())?;
    let value = c
        .call(&Request::Detach { revert }, Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let detached: evolve_agent::protocol::Detached =
        serde_json::from_value(value).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while socket.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "the agent of {pid} did not remove {}",
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(detached)
}
