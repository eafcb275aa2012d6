//! A client of the agent: one connection, requests in order (used by the `evolve` CLI).

use crate::protocol::{ErrorKind, Reply, Request, VERSION};
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failed exchange with an agent.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be reached.
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading or writing failed (the agent went away, or timed out).
    Io(io::Error),
    /// The agent answered something that is not a reply of this protocol version.
    Protocol(String),
    /// The agent refused or failed the request.
    Refused {
        /// The error's kind.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { path, source } => {
                write!(f, "cannot connect to {}: {source}", path.display())
            }
            ClientError::Io(e) => write!(f, "talking to the agent: {e}"),
            ClientError::Protocol(m) => write!(f, "unexpected answer from the agent: {m}"),
            ClientError::Refused { kind, message } => {
                let kind = serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                write!(f, "{message} ({kind})")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// A connection to an agent.
pub struct Connection {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Connection {
    /// Connects to the agent at `socket`.
    pub fn connect(socket: &Path) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        let reader = BufReader::new(stream.try_clone().map_err(ClientError::Io)?);
        Ok(Connection {
            stream,
            reader,
            next_id: 1,
        })
    }

    /// Sends `request` and waits up to `timeout` for its reply; returns the result of a
    /// successful reply.
    pub fn call(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let reply = self.raw(&request.to_line(id), timeout)?;
        if reply.id != id && reply.ok {
            return Err(ClientError::Protocol(format!(
                "reply for id {} to request {id}",
                reply.id
            )));
        }
        match (reply.ok, reply.result, reply.error) {
            (true, Some(result), _) => Ok(result),
            (false, _, Some(e)) => Err(ClientError::Refused {
                kind: e.kind,
                message: e.message,
            }),
            _ => Err(ClientError::Protocol(
                "a reply without result or error".into(),
            )),
        }
    }

    /// Sends one raw line (no newline) and reads one reply.
    pub fn raw(&mut self, line: &str, timeout: Duration) -> Result<Reply, ClientError> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        self.stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(ClientError::Io)?;
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(ClientError::Io)?;
        self.read_reply()
    }

    /// Reads one reply line.
    pub fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut text = String::new();
        let n = self.reader.read_line(&mut text).map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            )));
        }
        let reply: Reply = serde_json::from_str(&text)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", text.trim_end())))?;
        if reply.v != VERSION {
            return Err(ClientError::Protocol(format!(
                "protocol version {} (this client speaks {VERSION})",
                reply.v
            )));
        }
        Ok(reply)
    }
}
