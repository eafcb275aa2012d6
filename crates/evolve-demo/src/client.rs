//! A small RESP2 client, and a load generator that checks every reply it gets.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(String),
    /// `-ERR …`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$…` (None: the null bulk string)
    Bulk(Option<Vec<u8>>),
    /// `*…`
    Array(Vec<Value>),
}

impl Value {
    /// A bulk string's text.
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Value::Simple(text) => Some(text.clone()),
            _ => None,
        }
    }
}

/// One connection.
///
/// ```no_run
/// use evolve_demo::client::{Client, Value};
///
/// let mut client = Client::connect("127.0.0.1:6380".parse().unwrap())?;
/// assert_eq!(client.command("SET visitor alice")?, Value::Simple("OK".into()));
/// let version = client.info()?["kv_version"].clone();
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Client {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one command without waiting for its reply.
    pub fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out)
    }

    /// Sends a command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> io::Result<Value> {
        self.send(args)?;
        self.read()
    }

    /// [`Self::call`] with space-separated words.
    pub fn command(&mut self, words: &str) -> io::Result<Value> {
        let args: Vec<&[u8]> = words.split_whitespace().map(str::as_bytes).collect();
        self.call(&args)
    }

    /// `INFO`, as field → value.
    pub fn info(&mut self) -> io::Result<HashMap<String, String>> {
        let text = self
            .command("INFO")?
            .text()
            .ok_or_else(|| invalid("INFO did not return text"))?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Reads one reply.
    pub fn read(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || rest.parse::<i64>().map_err(|_| invalid(line));
        Ok(match kind {
            "+" => Value::Simple(rest.to_string()),
            "-" => Value::Error(rest.to_string()),
            ":" => Value::Integer(number()?),
            "$" if number()? < 0 => Value::Bulk(None),
            "$" => {
                let mut bytes = vec![0; number()? as usize + 2];
                io::Read::read_exact(&mut self.reader, &mut bytes)?;
                bytes.truncate(bytes.len() - 2);
                Value::Bulk(Some(bytes))
            }
            "*" => {
                let count = number()?.max(0);
                let items = (0..count).map(|_| self.read()).collect::<io::Result<_>>()?;
                Value::Array(items)
            }
            _ => return Err(invalid(format!("not a RESP reply: {line:?}"))),
        })
    }
}

/// Counters of a [`Load`], read while it runs.
#[derive(Debug, Default)]
pub struct LoadCounters {
    /// Replies received.
    pub requests: AtomicU64,
    /// Error replies, and replies with the wrong value.
    pub wrong: AtomicU64,
    /// Connections lost (each is re-established).
    pub dropped: AtomicU64,
}

/// Client threads sending `SET`, `GET` (checking the value just set) and `INCR` (checking it
/// counts by one) as fast as the server answers.
///
/// ```no_run
/// use evolve_demo::client::Load;
/// use std::sync::atomic::Ordering::Relaxed;
///
/// let load = Load::start("127.0.0.1:6380".parse().unwrap(), 8);
/// std::thread::sleep(std::time::Duration::from_secs(1));
/// let seen = load.stop();
/// assert_eq!(seen.wrong.load(Relaxed), 0);
/// ```
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What they have seen so far.
    pub counters: Arc<LoadCounters>,
}

impl Load {
    /// Starts `clients` threads against `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        Load::start_paced(addr, clients, Duration::ZERO)
    }

    /// Like [`Load::start`], each client resting `pause` after each round of three requests: a
    /// light load, for many servers on one machine.
    pub fn start_paced(addr: SocketAddr, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(LoadCounters::default());
        let threads = (0..clients)
            .map(|id| {
                let (stop, counters) = (stop.clone(), counters.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        if client_session(addr, id, pause, &stop, &counters).is_err() {
                            counters.dropped.fetch_add(1, Relaxed);
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            counters,
        }
    }

    /// Stops the clients and waits for them.
    pub fn stop(self) -> Arc<LoadCounters> {
        self.stop.store(true, Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        self.counters
    }
}

fn client_session(
    addr: SocketAddr,
    id: usize,
    pause: Duration,
    stop: &AtomicBool,
    counters: &LoadCounters,
) -> io::Result<()> {
    let mut client = Client::connect(addr)?;
    let counter = format!("load:{id}:counter");
    client.call(&[b"DEL", counter.as_bytes()])?;
    let mut expected = 0;
    let mut round = 0u64;
    while !stop.load(Relaxed) {
        round += 1;
        let key = format!("load:{id}:{}", round % 1000);
        let value = format!("value-{round}");
        let ok =
            client.call(&[b"SET", key.as_bytes(), value.as_bytes()])? == Value::Simple("OK".into());
        let read = client.call(&[b"GET", key.as_bytes()])?;
        let ok = ok && read == Value::Bulk(Some(value.into_bytes()));
        expected += 1;
        let ok = ok && client.call(&[b"INCR", counter.as_bytes()])? == Value::Integer(expected);
        counters.requests.fetch_add(3, Relaxed);
        if !ok {
            counters.wrong.fetch_add(1, Relaxed);
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}
