//! A running example server and its agent.

use anyhow::{anyhow, bail, Context, Result};
use evolve_agent::client::Connection;
use evolve_agent::protocol::Request;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::workspace::{Example, KV};

/// A server process, shut down when dropped.
pub struct Server {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// Its agent's socket directory.
    pub socket_dir: PathBuf,
    example: &'static Example,
}

impl Server {
    /// Starts `binary` (a kv server) on a free port of 127.0.0.1 and waits until it listens. `socket_dir`:
    /// where its agent puts its socket (default: the user's usual directory).
    pub fn start(binary: &Path, socket_dir: Option<&Path>) -> Result<Server> {
        Server::start_with(binary, socket_dir, &[])
    }

    /// [`Server::start`] with more environment variables (e.g. `EVOLVE_TRUSTED_KEYS`).
    pub fn start_with(
        binary: &Path,
        socket_dir: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> Result<Server> {
        Server::start_example(&KV, binary, socket_dir, env)
    }

    /// [`Server::start_with`] for the server of `example`.
    pub fn start_example(
        example: &'static Example,
        binary: &Path,
        socket_dir: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> Result<Server> {
        let mut command = Command::new(binary);
        command.envs(env.iter().copied());
        command
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        if let Some(dir) = socket_dir {
            command.env("EVOLVE_SOCKET_DIR", dir);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        // "<server> listening on ADDR pid PID"
        let words: Vec<&str> = line.split_whitespace().collect();
        let (addr, pid) = match words.as_slice() {
            [name, "listening", "on", addr, "pid", pid] if *name == example.server => {
                (addr.parse()?, pid.parse()?)
            }
            _ => {
                let _ = child.kill();
                bail!("the server did not start: {line:?}");
            }
        };
        let socket_dir = socket_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(evolve_agent::paths::socket_dir);
        Ok(Server {
            child,
            addr,
            pid,
            socket_dir,
            example,
        })
    }

    /// A connection to the server's agent.
    pub fn control(&self) -> Result<Control> {
        let socket = evolve_agent::paths::socket_path(&self.socket_dir, self.pid);
        let connection = Connection::connect(&socket).map_err(|e| anyhow!("{e}"))?;
        Ok(Control { connection })
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        (self.example.shutdown)(self.addr);
        for _ in 0..100 {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Requests to a server's agent (what the `evolve` CLI sends).
pub struct Control {
    connection: Connection,
}

/// How long an agent request may take (an apply may wait for safe points; a gc scans memory).
const TIMEOUT: Duration = Duration::from_secs(120);

impl Control {
    /// Sends `request`; its result or the agent's refusal.
    pub fn call(&mut self, request: &Request) -> Result<Value> {
        self.connection
            .call(request, TIMEOUT)
            .map_err(|e| anyhow!("{e}"))
    }

    /// `evolve apply PID PATCH`.
    pub fn apply(&mut self, patch: &Path) -> Result<Value> {
        let path = patch.canonicalize()?.to_string_lossy().into_owned();
        self.call(&Request::Apply {
            path,
            atomic: false,
            trial_ms: None,
            safe_point_timeout_ms: None,
        })
    }

    /// `evolve revert PID [TARGET]`.
    pub fn revert(&mut self, target: Option<&str>) -> Result<Value> {
        self.call(&Request::Revert {
            target: target.map(str::to_string),
            version: None,
        })
    }

    /// `evolve switch PID set NAME VALUE` then `evolve commit PID NAME`.
    pub fn set_and_commit(&mut self, switch: &str, value: &str) -> Result<Value> {
        self.call(&Request::SwitchSet {
            name: switch.into(),
            value: value.into(),
        })?;
        self.call(&Request::Commit {
            switch: Some(switch.into()),
        })
    }

    /// `evolve revert-switches PID`.
    pub fn revert_switches(&mut self) -> Result<Value> {
        self.call(&Request::RevertSwitches { switch: None })
    }
}
