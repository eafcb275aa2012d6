//! The agent thread: accepting connections, checking peers, reading lines, replying.
//!
//! # Not blocking the process
//!
//! The agent runs on its own threads: one accepts, one serves each connection (at most
//! [`MAX_CONNECTIONS`]; more are answered `busy` and closed). Nothing a client does holds a lock
//! the program's threads need, except the operations it asks for (an `--atomic` apply holds
//! threads at safe points, for a bounded time). A connection idle for [`IDLE_TIMEOUT`] is closed;
//! a reply that cannot be written within [`WRITE_TIMEOUT`] closes the connection.
//!
//! # Peers
//!
//! The socket file is mode 0600 in a 0700 directory; in addition, each connection's peer
//! credentials (`SO_PEERCRED`, taken by the kernel at `connect`) are checked: a peer whose uid is
//! neither the process's effective uid nor root gets one `permission_denied` reply and is closed.

use crate::dispatch::{self, Context};
use crate::journal::{Client, Journal};
use crate::paths;
use crate::protocol::{ErrorKind, Reply, MAX_LINE};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection without a request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A reply not written within this time closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

struct Shared {
    context: Context,
    owner: u32,
    connections: AtomicUsize,
    stopping: AtomicBool,
}

/// The running agent. Dropping it stops accepting and removes the socket.
#[must_use = "the agent stops and its socket is removed when this is dropped"]
pub struct Agent {
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Agent {
    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accepting thread.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Starts the agent on `dir/<pid>.sock`.
pub fn start_in(dir: &Path) -> io::Result<Agent> {
    crate::trust::load();
    paths::prepare_dir(dir)?;
    let pid = std::process::id();
    let socket = paths::socket_path(dir, pid);
    // A socket of our pid is stale: it belonged to an earlier process with the same pid.
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(&socket)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", socket.display()),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let shared = Arc::new(Shared {
        context: Context {
            journal: Journal::of_process(paths::journal_path(dir, pid)),
            started: Instant::now(),
            probes: Default::default(),
        },
        owner: rustix::process::geteuid().as_raw(),
        connections: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
    });
    let accepting = shared.clone();
    let thread = std::thread::Builder::new()
        .name("evolve-agent".into())
        .spawn(move || accept(listener, accepting))?;
    Ok(Agent {
        socket,
        shared,
        thread: Some(thread),
    })
}

fn accept(listener: UnixListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            // EMFILE and the like: back off rather than spin.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let reply = Reply::error(
                serde_json::Value::Null,
                ErrorKind::Busy,
                format!("the agent serves {MAX_CONNECTIONS} connections at once; try again"),
            );
            let _ = writeln!(&stream, "{}", reply.to_line());
            continue;
        }
        let serving = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("evolve-agent-conn".into())
            .spawn(move || {
                let _ = connection(&stream, &serving);
                serving.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The peer's uid and pid, from `SO_PEERCRED`.
fn peer(stream: &UnixStream) -> io::Result<Client> {
    let cred = rustix::net::sockopt::socket_peercred(stream)?;
    Ok(Client {
        uid: cred.uid.as_raw(),
        pid: cred.pid.as_raw_nonzero().get() as u32,
    })
}

fn send(mut stream: &UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = reply.to_line();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

fn connection(stream: &UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let client = peer(stream)?;
    if client.uid != shared.owner && client.uid != 0 {
        let reply = Reply::error(
            serde_json::Value::Null,
            ErrorKind::PermissionDenied,
            format!(
                "uid {} may not control this process (owner uid {}, or root)",
                client.uid, shared.owner
            ),
        );
        return send(stream, &reply);
    }
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        line.clear();
        let read = reader
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Ok(()); // closed
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_LINE {
            let reply = Reply::error(
                serde_json::Value::Null,
                ErrorKind::Oversized,
                format!("request longer than {MAX_LINE} bytes; closing the connection"),
            );
            return send(stream, &reply);
        }
        if complete {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match dispatch::parse(&line) {
            Err((id, kind, message)) => Reply::error(id, kind, message),
            Ok((id, request)) => {
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    dispatch::serve(&shared.context, client, request)
                }));
                match served {
                    Ok(Ok(result)) => Reply::ok(id, result),
                    Ok(Err((kind, message))) => Reply::error(id, kind, message),
                    Err(_) => Reply::error(
                        id,
                        ErrorKind::Internal,
                        "the agent panicked serving this request (see the process's stderr)",
                    ),
                }
            }
        };
        send(stream, &reply)?;
        if !complete {
            return Ok(()); // end of stream without a newline
        }
    }
}
