//! `kv-server [--port PORT] [--bind ADDR]`: an in-memory key-value server speaking the Redis
//! protocol (RESP2), one thread per connection, whose command handlers (`kv-commands`) are hot
//! functions and whose command statistics are a multiverse switch (`kv_core::stats`).
//!
//! It prints one line when ready — `kv-server listening on ADDR pid PID` — and runs until a
//! client sends `SHUTDOWN`. Built with the `evolve` feature (the default) it starts the Evolve
//! agent, so `evolve apply PID patch.so` and the other commands reach it.

use kv_core::resp::{self, Reply};
use kv_core::{stats, Store};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// The agent, dropped (its socket removed) before `SHUTDOWN` exits the process.
#[cfg(feature = "evolve")]
static AGENT: Mutex<Option<evolve::agent::Agent>> = Mutex::new(None);
#[cfg(not(feature = "evolve"))]
static AGENT: Mutex<Option<()>> = Mutex::new(None);

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut bind, mut port) = ("127.0.0.1".to_string(), "6380".to_string());
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(value)) => port = value,
            ("--bind", Some(value)) => bind = value,
            _ => {
                eprintln!("usage: kv-server [--port PORT] [--bind ADDR]");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(format!("{bind}:{port}")).unwrap_or_else(|e| {
        eprintln!("kv-server: cannot listen on {bind}:{port}: {e}");
        std::process::exit(1);
    });
    #[cfg(feature = "evolve")]
    {
        let agent = evolve::agent::start().unwrap_or_else(|e| {
            eprintln!("kv-server: the evolve agent did not start: {e}");
            std::process::exit(1);
        });
        *AGENT.lock().unwrap() = Some(agent);
    }
    println!(
        "kv-server listening on {} pid {}",
        listener
            .local_addr()
            .expect("a bound listener has an address"),
        std::process::id()
    );
    let store = Arc::new(Store::new());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let store = store.clone();
        std::thread::spawn(move || serve(stream, &store));
    }
}

/// Serves one connection until the client leaves.
fn serve(mut stream: TcpStream, store: &Store) {
    stats::CONNECTIONS_RECEIVED.fetch_add(1, Relaxed);
    stats::CONNECTED_CLIENTS.fetch_add(1, Relaxed);
    if let Err(e) = exchange(&mut stream, store) {
        if !matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) {
            eprintln!("kv-server: connection failed: {e}");
        }
        stats::CONNECTIONS_DROPPED.fetch_add(1, Relaxed);
    }
    stats::CONNECTED_CLIENTS.fetch_sub(1, Relaxed);
}

/// Reads requests, executes every complete one, writes their replies in one go (pipelined
/// clients get one write per batch). `Ok` when the client closes or quits.
fn exchange(stream: &mut TcpStream, store: &Store) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut input = Vec::with_capacity(16 << 10);
    let mut output = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        input.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        let mut close = false;
        loop {
            match resp::parse(&input[used..]) {
                Ok(Some((request, length))) => {
                    used += length;
                    if request.is_empty() {
                        continue;
                    }
                    if request[0].eq_ignore_ascii_case(b"SHUTDOWN") {
                        stream.write_all(&output)?;
                        shutdown();
                    }
                    let reply = kv_commands::execute(store, &request);
                    stats::count_command();
                    if reply.is_error() {
                        stats::count_error();
                    }
                    reply.encode(&mut output);
                    if reply == Reply::Goodbye {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    stats::PROTOCOL_ERRORS.fetch_add(1, Relaxed);
                    Reply::error(&e).encode(&mut output);
                    close = true;
                    break;
                }
            }
        }
        input.drain(..used);
        stream.write_all(&output)?;
        output.clear();
        if close {
            return Ok(());
        }
    }
}

/// `SHUTDOWN`: removes the agent's socket and exits.
fn shutdown() -> ! {
    let _ = AGENT.lock().unwrap_or_else(|p| p.into_inner()).take();
    std::process::exit(0)
}
