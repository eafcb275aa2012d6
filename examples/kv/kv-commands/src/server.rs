//! Connection and server commands: PING, ECHO, INFO, CONFIG GET, SELECT.

use kv_core::stats;
use kv_core::{Reply, Store};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// `PING [message]`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn ping(args: &[Vec<u8>]) -> Reply {
    match args {
        [] => Reply::Simple("PONG"),
        [message] => Reply::Bulk(Some(message.clone())),
        _ => Reply::arity("ping"),
    }
}

/// `ECHO message`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn echo(args: &[Vec<u8>]) -> Reply {
    match args {
        [message] => Reply::Bulk(Some(message.clone())),
        _ => Reply::arity("echo"),
    }
}

/// `INFO [section]`: one section with the version, the process and its counters.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn info(store: &Store, args: &[Vec<u8>]) -> Reply {
    if args.len() > 1 {
        return Reply::error("syntax error");
    }
    let mut text = String::from("# Server\r\n");
    let _ = write!(
        text,
        "kv_version:{}\r\nevolve:{}\r\nprocess_id:{}\r\n",
        crate::version(),
        if cfg!(feature = "evolve") {
            "yes"
        } else {
            "no"
        },
        std::process::id()
    );
    text.push_str("# Stats\r\n");
    for (name, counter) in [
        ("total_connections_received", &stats::CONNECTIONS_RECEIVED),
        ("connected_clients", &stats::CONNECTED_CLIENTS),
        ("dropped_connections", &stats::CONNECTIONS_DROPPED),
        ("protocol_errors", &stats::PROTOCOL_ERRORS),
        ("total_commands_processed", &stats::COMMANDS_PROCESSED),
        ("total_error_replies", &stats::ERROR_REPLIES),
    ] {
        let _ = write!(text, "{name}:{}\r\n", counter.load(Relaxed));
    }
    let _ = write!(
        text,
        "command_stats:{}\r\n# Keyspace\r\nkeys:{}\r\n",
        if stats::COMMAND_STATS.get() {
            "on"
        } else {
            "off"
        },
        store.len()
    );
    Reply::Bulk(Some(text.into_bytes()))
}

/// `CONFIG GET parameter`: the server persists nothing, so `save` is empty and `appendonly` is
/// `no` (`redis-benchmark` asks for both at start); other names are unknown (an empty list, as
/// Redis answers).
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn config(args: &[Vec<u8>]) -> Reply {
    let [sub, name] = args else {
        return Reply::error("only CONFIG GET parameter is supported");
    };
    if !sub.eq_ignore_ascii_case(b"GET") {
        return Reply::error("only CONFIG GET parameter is supported");
    }
    let value: &[u8] = match name.to_ascii_lowercase().as_slice() {
        b"save" => b"",
        b"appendonly" => b"no",
        _ => return Reply::Array(Vec::new()),
    };
    Reply::Array(vec![
        Reply::Bulk(Some(name.to_ascii_lowercase())),
        Reply::Bulk(Some(value.to_vec())),
    ])
}

/// `SELECT index`: there is one database, 0.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn select(args: &[Vec<u8>]) -> Reply {
    match args {
        [index] if index.as_slice() == b"0" => Reply::OK,
        [_] => Reply::error("DB index is out of range"),
        _ => Reply::arity("select"),
    }
}
