//! RESP2, the Redis serialization protocol: requests are arrays of bulk strings (or inline
//! commands, space-separated lines, as `redis-benchmark`'s `PING_INLINE` sends), replies are
//! simple strings, errors, integers, bulk strings and arrays.

use std::io::Write;

/// The largest request accepted (bytes of one command), as a defence against garbage input.
pub const MAX_REQUEST: usize = 64 << 20;

/// One command: its arguments, the command name first.
pub type Request = Vec<Vec<u8>>;

/// A reply to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(&'static str),
    /// `-ERR …`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo` or the null bulk string `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n…`
    Array(Vec<Reply>),
    /// `+OK`, then the server closes the connection (`QUIT`).
    Goodbye,
}

impl Reply {
    /// `+OK`.
    pub const OK: Reply = Reply::Simple("OK");

    /// An error reply with the conventional `ERR ` prefix.
    pub fn error(message: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {message}"))
    }

    /// The wrong-number-of-arguments error Redis gives for `command`.
    pub fn arity(command: &str) -> Reply {
        Reply::error(format_args!(
            "wrong number of arguments for '{}' command",
            command.to_ascii_lowercase()
        ))
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Appends the reply's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => {
                out.push(b'+');
                out.extend_from_slice(s.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Goodbye => out.extend_from_slice(b"+OK\r\n"),
            Reply::Error(e) => {
                out.push(b'-');
                // A line break inside would end the error early and desynchronise the client.
                out.extend(
                    e.bytes()
                        .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
                );
                out.extend_from_slice(b"\r\n");
            }
            Reply::Integer(n) => {
                let _ = write!(out, ":{n}\r\n");
            }
            Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(Some(bytes)) => {
                let _ = write!(out, "${}\r\n", bytes.len());
                out.extend_from_slice(bytes);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Array(items) => {
                let _ = write!(out, "*{}\r\n", items.len());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }
}

/// Why a request could not be parsed: the connection cannot continue (RESP has no way to
/// resynchronise), so the server replies with the error and closes it, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Protocol error: {}", self.0)
    }
}

/// Parses one request from the start of `buf`: `Ok(Some((request, bytes used)))`, `Ok(None)` if
/// more input is needed, or the protocol error.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_array(buf),
        Some(_) => parse_inline(buf),
    }
}

fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let end = buf[from..].windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[from..from + end], from + end + 2))
}

fn number(text: &[u8], what: &str) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProtocolError(format!("invalid {what}")))
}

fn too_long(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtocolError> {
    if buf.len() > MAX_REQUEST {
        Err(ProtocolError("too big request".into()))
    } else {
        Ok(None)
    }
}

fn parse_array(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtocolError> {
    let Some((header, mut at)) = line(buf, 1) else {
        return too_long(buf);
    };
    let count = number(header, "multibulk length")?;
    if !(0..=1 << 20).contains(&count) {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if at >= buf.len() {
            return too_long(buf);
        }
        if buf[at] != b'$' {
            return Err(ProtocolError(format!(
                "expected '$', got '{}'",
                buf[at] as char
            )));
        }
        let Some((len, start)) = line(buf, at + 1) else {
            return too_long(buf);
        };
        let len = number(len, "bulk length")?;
        if !(0..=MAX_REQUEST as i64).contains(&len) {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return too_long(buf);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not followed by CRLF".into()));
        }
        args.push(buf[start..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

fn parse_inline(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtocolError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return too_long(buf);
    };
    let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let args = text
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Ok(Some((args, end + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arrays_inline_and_partial_input() {
        let wire = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        let (request, used) = parse(wire).unwrap().unwrap();
        assert_eq!(
            request,
            vec![b"SET".to_vec(), b"k".to_vec(), b"hello".to_vec()]
        );
        assert_eq!(used, wire.len());
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (request, used) = parse(b"PING  x\r\nrest").unwrap().unwrap();
        assert_eq!((request, used), (vec![b"PING".to_vec(), b"x".to_vec()], 9));
    }

    #[test]
    fn refuses_malformed_requests() {
        assert!(parse(b"*x\r\n").is_err());
        assert!(parse(b"*1\r\n:1\r\n").is_err());
        assert!(parse(b"*1\r\n$-5\r\n").is_err());
        assert!(parse(b"*1\r\n$1\r\nab\r\n").is_err());
    }

    #[test]
    fn encodes_every_reply() {
        let mut out = Vec::new();
        Reply::Array(vec![
            Reply::OK,
            Reply::Error("ERR bad\r\nthing".into()),
            Reply::Integer(-3),
            Reply::Bulk(None),
            Reply::Bulk(Some(b"hi".to_vec())),
        ])
        .encode(&mut out);
        assert_eq!(
            out,
            b"*5\r\n+OK\r\n-ERR bad  thing\r\n:-3\r\n$-1\r\n$2\r\nhi\r\n"
        );
    }
}
