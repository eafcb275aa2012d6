//! Why an attach failed or was refused.

use std::fmt;

/// A failed or refused attach. [`Error::kind`] says which; the message names the cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// There is no process with this id.
    NoSuchProcess(u32),
    /// The process may not be attached to; nothing was changed in it.
    Refused(Refusal),
    /// The process exited (or exec'd) while the attach was under way.
    Exited(u32),
    /// A ptrace or `/proc` operation failed unexpectedly.
    System {
        /// What was being done.
        what: String,
        /// The OS error.
        errno: i32,
    },
    /// The agent shared object could not be found next to the `evolve` binary.
    AgentNotFound(String),
    /// The loader thread ran in the target but the agent did not start (the target was left
    /// as it was: the loader's memory is unmapped again).
    LoaderFailed {
        /// The loader's status code.
        status: i32,
        /// `dlerror()` or the agent's own message.
        message: String,
    },
    /// Something did not happen in time (the message says what).
    Timeout(String),
}

/// Why a process may not be attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// PID 1 (init): a mistake would take the whole system (or container) down.
    Init,
    /// The `evolve` process itself, or another `evolve` command.
    Evolve,
    /// A kernel thread: there is no user space to load anything into.
    KernelThread,
    /// A zombie: it has exited and only waits to be reaped.
    Zombie,
    /// Already traced (a debugger, strace, another evolve attach).
    Traced {
        /// The tracer's pid.
        tracer: u32,
        /// Its command name.
        name: String,
    },
    /// The kernel refuses ptrace (the message explains which rule).
    NotPermitted(String),
    /// Statically linked, or no dynamic loader: nothing can load a shared object.
    Static(String),
    /// Not glibc (musl, …): the agent is built against glibc.
    NotGlibc(String),
    /// A seccomp filter forbids what the loader or the agent needs.
    Seccomp(String),
    /// No thread of the process was found at a point where it can safely make the call that
    /// starts the loader thread.
    NoSafeThread(String),
}

impl Error {
    /// An error of this kind.
    pub fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }

    /// A refusal.
    pub fn refused(refusal: Refusal) -> Error {
        Error::new(ErrorKind::Refused(refusal))
    }

    /// A failed system operation.
    pub fn system(what: impl Into<String>, errno: i32) -> Error {
        Error::new(ErrorKind::System {
            what: what.into(),
            errno,
        })
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The refusal, if this is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.kind {
            ErrorKind::Refused(r) => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::NoSuchProcess(pid) => write!(f, "no process {pid}"),
            ErrorKind::Refused(r) => write!(f, "refused: {r}"),
            ErrorKind::Exited(pid) => {
                write!(f, "process {pid} exited (or exec'd) during the attach")
            }
            ErrorKind::System { what, errno } => {
                write!(f, "{what}: {}", std::io::Error::from_raw_os_error(*errno))
            }
            ErrorKind::AgentNotFound(m) => write!(f, "{m}"),
            ErrorKind::LoaderFailed { status, message } => write!(
                f,
                "the agent did not start in the process (loader status {status}): {message}; \
                 the loader's memory was removed again"
            ),
            ErrorKind::Timeout(m) => write!(f, "timed out: {m}"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Init => write!(
                f,
                "PID 1 is init: a fault in it takes the system (or container) down"
            ),
            Refusal::Evolve => write!(f, "that is an evolve process itself"),
            Refusal::KernelThread => write!(
                f,
                "a kernel thread has no user space to load the agent into"
            ),
            Refusal::Zombie => write!(
                f,
                "the process is a zombie (it exited and waits for its parent to reap it)"
            ),
            Refusal::Traced { tracer, name } => write!(
                f,
                "the process is already traced by {tracer} ({name}); a thread can have one \
                 tracer: detach the debugger first"
            ),
            Refusal::NotPermitted(why) => write!(f, "ptrace is not permitted: {why}"),
            Refusal::Static(why) => write!(f, "{why}"),
            Refusal::NotGlibc(why) => write!(f, "{why}"),
            Refusal::Seccomp(why) => write!(f, "{why}"),
            Refusal::NoSafeThread(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for Error {}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

/// The errno of a nix error.
pub(crate) fn errno(e: nix::errno::Errno) -> i32 {
    e as i32
}
