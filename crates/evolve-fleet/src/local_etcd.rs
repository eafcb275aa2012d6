//! A single-member etcd on loopback ports of its own, its data in a given directory: what the
//! fleet's tests and benchmark run against (Debian's `etcd-server` package provides `etcd`).
//!
//! ```no_run
//! let dir = std::env::temp_dir().join("evolve-etcd-example");
//! let etcd = evolve_fleet::local_etcd::LocalEtcd::start(&dir).unwrap();
//! println!("etcd on {}", etcd.url());
//! // Dropping it kills etcd.
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd, killed when dropped.
#[derive(Debug)]
pub struct LocalEtcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts etcd with its data in `dir/etcd` and waits until it answers.
    pub fn start(dir: &Path) -> std::io::Result<LocalEtcd> {
        let mut etcd = LocalEtcd {
            child: None,
            client_port: free_port()?,
            peer_port: free_port()?,
            data: dir.join("etcd"),
        };
        etcd.launch()?;
        Ok(etcd)
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn launch(&mut self) -> std::io::Result<()> {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "evolve-fleet", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("evolve-fleet={peer}")])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run etcd (Debian package etcd-server): {e}"),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let healthy = Command::new("etcdctl")
                .args(["--endpoints", &client, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if healthy {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("etcd did not become healthy on {client}"),
        ))
    }

    /// Kills etcd, waits `down_for`, starts it again on the same ports and data.
    pub fn restart(&mut self, down_for: Duration) -> std::io::Result<()> {
        self.kill();
        std::thread::sleep(down_for);
        self.launch()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
