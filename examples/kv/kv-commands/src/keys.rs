//! Key-space commands: DEL, EXISTS, EXPIRE, TTL, KEYS, DBSIZE, FLUSHALL.

use crate::{integer, not_an_integer};
use kv_core::{Reply, Store};
use std::time::{Duration, Instant};

/// `DEL key [key ...]`: the number of keys removed.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn del(store: &Store, args: &[Vec<u8>]) -> Reply {
    if args.is_empty() {
        return Reply::arity("del");
    }
    let removed = args
        .iter()
        .filter(|key| store.shard(key).remove(key))
        .count();
    Reply::Integer(removed as i64)
}

/// `EXISTS key [key ...]`: how many of the keys exist (a key named twice counts twice).
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn exists(store: &Store, args: &[Vec<u8>]) -> Reply {
    if args.is_empty() {
        return Reply::arity("exists");
    }
    let found = args
        .iter()
        .filter(|key| store.shard(key).entry(key).is_some())
        .count();
    Reply::Integer(found as i64)
}

/// `EXPIRE key seconds`: 1 if the key exists (a time ≤ 0 deletes it), else 0.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn expire(store: &Store, args: &[Vec<u8>]) -> Reply {
    let [key, seconds] = args else {
        return Reply::arity("expire");
    };
    let Some(seconds) = integer(seconds) else {
        return not_an_integer();
    };
    let mut shard = store.shard(key);
    let Some(entry) = shard.entry(key) else {
        return Reply::Integer(0);
    };
    if seconds <= 0 {
        shard.remove(key);
    } else {
        entry.expires_at = Some(Instant::now() + Duration::from_secs(seconds as u64));
    }
    Reply::Integer(1)
}

/// `TTL key`: seconds left (rounded up), -1 without expiry, -2 if the key does not exist.
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn ttl(store: &Store, args: &[Vec<u8>]) -> Reply {
    let [key] = args else {
        return Reply::arity("ttl");
    };
    match store.shard(key).entry(key) {
        None => Reply::Integer(-2),
        Some(entry) => match entry.expires_at {
            None => Reply::Integer(-1),
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                Reply::Integer(left.as_millis().div_ceil(1000) as i64)
            }
        },
    }
}

/// `KEYS pattern`: the keys matching a glob pattern (`*`, `?`, `[abc]`, `[a-z]`, `\x`).
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn keys(store: &Store, args: &[Vec<u8>]) -> Reply {
    let [pattern] = args else {
        return Reply::arity("keys");
    };
    Reply::Array(
        store
            .keys()
            .into_iter()
            .filter(|key| glob(pattern, key))
            .map(|key| Reply::Bulk(Some(key)))
            .collect(),
    )
}

/// `DBSIZE`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn dbsize(store: &Store, args: &[Vec<u8>]) -> Reply {
    if !args.is_empty() {
        return Reply::arity("dbsize");
    }
    Reply::Integer(store.len() as i64)
}

/// `FLUSHALL`
#[cfg_attr(feature = "evolve", evolve::hot)]
pub fn flushall(store: &Store, args: &[Vec<u8>]) -> Reply {
    // Redis accepts ASYNC / SYNC; both mean "now" here.
    if args.len() > 1 {
        return Reply::error("syntax error");
    }
    store.clear();
    Reply::OK
}

/// Redis's glob matching.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((b'[', rest)) => {
            let Some(close) = rest.iter().position(|&b| b == b']') else {
                return text.first() == Some(&b'[') && glob(rest, &text[1..]);
            };
            let Some(&c) = text.first() else {
                return false;
            };
            let (class, negated) = match &rest[..close] {
                [b'^', class @ ..] => (class, true),
                class => (class, false),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= (class[i]..=class[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negated && glob(&rest[close + 1..], &text[1..])
        }
        Some((b'\\', [escaped, rest @ ..])) => {
            text.first() == Some(escaped) && glob(rest, &text[1..])
        }
        Some((&literal, rest)) => text.first() == Some(&literal) && glob(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_as_in_redis() {
        for (pattern, text, expected) in [
            ("*", "anything", true),
            ("user:*", "user:42", true),
            ("user:*", "users", false),
            ("h?llo", "hello", true),
            ("h[ae]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-c]llo", "hbllo", true),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
        ] {
            assert_eq!(
                glob(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} vs {text}"
            );
        }
    }
}
