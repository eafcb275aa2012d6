//! String commands: GET, SET, INCR/DECR, MGET, MSET.

use crate::{integer, not_an_integer};
use kv_core::{Entry, Reply, Store};
use std::time::{Duration, Instant};

/// `GET key`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn get(store: &Store, args: &[Vec<u8>]) -> Reply {
    let [key] = args else {
        return Reply::arity("get");
    };
    Reply::Bulk(store.get(key))
}

/// `SET key value [EX seconds | PX milliseconds] [NX | XX]`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn set(store: &Store, args: &[Vec<u8>]) -> Reply {
    let [key, value, options @ ..] = args else {
        return Reply::arity("set");
    };
    let mut expires_at = None;
    let (mut only_new, mut only_existing) = (false, false);
    let mut options = options.iter();
    while let Some(option) = options.next() {
        let option = option.to_ascii_uppercase();
        match option.as_slice() {
            b"NX" => only_new = true,
            b"XX" => only_existing = true,
            b"EX" | b"PX" => {
                let Some(amount) = options.next().and_then(|a| integer(a)).filter(|&n| n > 0)
                else {
                    return Reply::error("invalid expire time in 'set' command");
                };
                let amount = amount as u64;
                let ttl = if option == b"EX" {
                    Duration::from_secs(amount)
                } else {
                    Duration::from_millis(amount)
                };
                expires_at = Some(Instant::now() + ttl);
            }
            _ => return Reply::error("syntax error"),
        }
    }
    if only_new && only_existing {
        return Reply::error("syntax error");
    }
    let mut shard = store.shard(key);
    let exists = shard.entry(key).is_some();
    if (only_new && exists) || (only_existing && !exists) {
        return Reply::Bulk(None);
    }
    shard.insert(
        key.clone(),
        Entry {
            value: value.clone(),
            expires_at,
        },
    );
    Reply::OK
}

/// `INCR key` / `DECR key`: adds `delta` to the integer stored at `key` (0 if absent).
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn incr_by(store: &Store, args: &[Vec<u8>], delta: i64, command: &str) -> Reply {
    let [key] = args else {
        return Reply::arity(command);
    };
    let mut shard = store.shard(key);
    let current = match shard.entry(key) {
        // Version 1.0.0's bug: a value that is not a number counts as 0 (and is overwritten).
        Some(entry) => integer(&entry.value).unwrap_or(0),
        None => 0,
    };
    let Some(next) = current.checked_add(delta) else {
        return not_an_integer();
    };
    let bytes = next.to_string().into_bytes();
    match shard.entry(key) {
        Some(entry) => entry.value = bytes,
        None => shard.insert(key.clone(), Entry::new(bytes)),
    }
    Reply::Integer(next)
}

/// `MGET key [key ...]`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn mget(store: &Store, args: &[Vec<u8>]) -> Reply {
    if args.is_empty() {
        return Reply::arity("mget");
    }
    Reply::Array(args.iter().map(|key| Reply::Bulk(store.get(key))).collect())
}

/// `MSET key value [key value ...]`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn mset(store: &Store, args: &[Vec<u8>]) -> Reply {
    if args.is_empty() || !args.len().is_multiple_of(2) {
        return Reply::arity("mset");
    }
    for pair in args.chunks_exact(2) {
        store.set(&pair[0], &pair[1]);
    }
    Reply::OK
}
