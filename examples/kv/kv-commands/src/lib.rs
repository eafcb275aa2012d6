//! The kv example server's command handlers. Each is a hot function (`#[evolve::hot]` when built
//! with the `evolve` feature): a patch built from an edited copy of this crate replaces them in the
//! running server. `examples/kv/patches/` holds two such edits.

use kv_core::{Reply, Store};

mod keys;
mod server;
mod strings;

/// The version `INFO` reports (`kv_version`), so clients can see which code serves them.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn version() -> &'static str {
    "1.0.0"
}

/// Executes one request (command name first) against `store`.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn execute(store: &Store, request: &[Vec<u8>]) -> Reply {
    let Some((name, args)) = request.split_first() else {
        return Reply::error("empty command");
    };
    let mut upper = [0u8; 16];
    let command = match upper.get_mut(..name.len()) {
        Some(slot) => {
            slot.copy_from_slice(name);
            slot.make_ascii_uppercase();
            &*slot
        }
        None => b"",
    };
    match command {
        b"PING" => server::ping(args),
        b"ECHO" => server::echo(args),
        b"GET" => strings::get(store, args),
        b"SET" => strings::set(store, args),
        b"INCR" => strings::incr_by(store, args, 1, "incr"),
        b"DECR" => strings::incr_by(store, args, -1, "decr"),
        b"MGET" => strings::mget(store, args),
        b"MSET" => strings::mset(store, args),
        b"DEL" => keys::del(store, args),
        b"EXISTS" => keys::exists(store, args),
        b"EXPIRE" => keys::expire(store, args),
        b"TTL" => keys::ttl(store, args),
        b"KEYS" => keys::keys(store, args),
        b"DBSIZE" => keys::dbsize(store, args),
        b"FLUSHALL" => keys::flushall(store, args),
        b"INFO" => server::info(store, args),
        b"CONFIG" => server::config(args),
        b"COMMAND" => Reply::Array(Vec::new()),
        b"SELECT" => server::select(args),
        b"QUIT" => Reply::Goodbye,
        _ => Reply::error(format_args!(
            "unknown command '{}'",
            String::from_utf8_lossy(name)
        )),
    }
}

/// Parses a decimal integer argument as Redis does (no spaces, no `+`, fits in `i64`).
fn integer(bytes: &[u8]) -> Option<i64> {
    if bytes.first() == Some(&b'+') {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// The error Redis gives for a value or argument that is not an integer.
fn not_an_integer() -> Reply {
    Reply::error("value is not an integer or out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &Store, words: &str) -> Reply {
        let request: Vec<Vec<u8>> = words.split(' ').map(|w| w.as_bytes().to_vec()).collect();
        execute(store, &request)
    }

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(Some(text.as_bytes().to_vec()))
    }

    #[test]
    fn strings_and_counters() {
        let store = Store::new();
        assert_eq!(run(&store, "ping"), Reply::Simple("PONG"));
        assert_eq!(run(&store, "SET a 1"), Reply::OK);
        assert_eq!(run(&store, "INCR a"), Reply::Integer(2));
        assert_eq!(run(&store, "DECR a"), Reply::Integer(1));
        assert_eq!(run(&store, "GET a"), bulk("1"));
        assert_eq!(run(&store, "GET nothing"), Reply::Bulk(None));
        assert_eq!(run(&store, "MSET b x c y"), Reply::OK);
        assert_eq!(
            run(&store, "MGET a b zz c"),
            Reply::Array(vec![bulk("1"), bulk("x"), Reply::Bulk(None), bulk("y")])
        );
        assert_eq!(run(&store, "SET a 1 NX"), Reply::Bulk(None));
        assert_eq!(run(&store, "SET new 1 XX"), Reply::Bulk(None));
        assert!(run(&store, "SET a").is_error());
        assert!(run(&store, "MSET a").is_error());
        assert!(run(&store, "NOSUCH").is_error());
    }

    #[test]
    fn keys_and_expiry() {
        let store = Store::new();
        run(&store, "MSET user:1 a user:2 b other c");
        assert_eq!(run(&store, "EXISTS user:1 user:1 none"), Reply::Integer(2));
        assert_eq!(run(&store, "DBSIZE"), Reply::Integer(3));
        let Reply::Array(mut found) = run(&store, "KEYS user:*") else {
            panic!("KEYS returns an array")
        };
        found.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(found, vec![bulk("user:1"), bulk("user:2")]);
        assert_eq!(run(&store, "TTL other"), Reply::Integer(-1));
        assert_eq!(run(&store, "TTL none"), Reply::Integer(-2));
        assert_eq!(run(&store, "EXPIRE other 100"), Reply::Integer(1));
        assert_eq!(run(&store, "TTL other"), Reply::Integer(100));
        assert_eq!(run(&store, "EXPIRE other 0"), Reply::Integer(1));
        assert_eq!(run(&store, "GET other"), Reply::Bulk(None));
        assert_eq!(run(&store, "SET t v EX 50"), Reply::OK);
        assert_eq!(run(&store, "TTL t"), Reply::Integer(50));
        assert_eq!(run(&store, "DEL user:1 user:2 none"), Reply::Integer(2));
        assert_eq!(run(&store, "FLUSHALL"), Reply::OK);
        assert_eq!(run(&store, "DBSIZE"), Reply::Integer(0));
    }

    #[test]
    fn info_reports_the_version() {
        let Reply::Bulk(Some(text)) = run(&Store::new(), "INFO") else {
            panic!("INFO returns a bulk string")
        };
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("kv_version:1.0.0\r\n"), "{text}");
    }

    /// The bug `patches/01-incr-type-check.diff` fixes: `INCR` on a value that is not a number
    /// treats it as 0 and overwrites it, where Redis refuses with an error.
    #[test]
    fn version_1_0_0_overwrites_non_integers_on_incr() {
        let store = Store::new();
        run(&store, "SET name alice");
        assert_eq!(run(&store, "INCR name"), Reply::Integer(1));
        assert_eq!(run(&store, "GET name"), bulk("1"));
    }
}
