//! A minimal blocking HTTP/1.1 client for the http example (one request per connection): what
//! the harness needs to drive the service and shut it down, without an HTTP client stack.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response: status code, header lines, body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header lines, as sent.
    pub headers: Vec<String>,
    /// The body.
    pub body: String,
}

impl Response {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// The request line and headers of `method path` to `addr`, closing the connection after.
pub fn request_text(method: &str, path: &str, addr: SocketAddr) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// Parses a whole response read until the server closed the connection.
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("an incomplete HTTP response: {text:?}");
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    Ok(Response {
        status,
        headers: lines.map(str::to_string).collect(),
        body: body.to_string(),
    })
}

/// Sends `method path` to `addr` and reads the whole response.
///
/// ```no_run
/// let addr = "127.0.0.1:8080".parse().unwrap();
/// let response = evolve_demo::http::request(addr, "GET", "/hello")?;
/// assert_eq!(response.status, 200);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(request_text(method, path, addr).as_bytes())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("{method} {path}: reading the response"))?;
    parse_response(&raw)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_response_parses_into_status_headers_and_body() {
        let raw = b"HTTP/1.1 200 OK\r\nx-served-by: track v1\r\ncontent-length: 3\r\n\r\nhi\n";
        let response = super::parse_response(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("X-Served-By"), Some("track v1"));
        assert_eq!(response.body, "hi\n");
        assert!(super::parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
