//! The key space: shards of `HashMap`s behind mutexes (threads serving different keys rarely
//! contend), values as bytes, optional expiry checked lazily on access.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

const SHARDS: usize = 64;

/// The keys of one shard.
type Map = HashMap<Vec<u8>, Entry>;

/// A value and its expiry time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// When the key disappears, if it has a time to live.
    pub expires_at: Option<Instant>,
}

impl Entry {
    /// A value without expiry.
    pub fn new(value: Vec<u8>) -> Entry {
        Entry {
            value,
            expires_at: None,
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// One shard of the key space, locked.
pub struct Shard<'a> {
    map: MutexGuard<'a, Map>,
    now: Instant,
}

impl Shard<'_> {
    /// The live entry of `key` (an expired one is removed first).
    pub fn entry(&mut self, key: &[u8]) -> Option<&mut Entry> {
        if self.map.get(key).is_some_and(|e| !e.live(self.now)) {
            self.map.remove(key);
        }
        self.map.get_mut(key)
    }

    /// Stores `entry` under `key`, replacing any value.
    pub fn insert(&mut self, key: Vec<u8>, entry: Entry) {
        self.map.insert(key, entry);
    }

    /// Removes `key`; whether a live entry was there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let now = self.now;
        self.map.remove(key).is_some_and(|e| e.live(now))
    }
}

/// The whole key space.
pub struct Store {
    shards: Box<[Mutex<Map>]>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn index(key: &[u8]) -> usize {
        // FNV-1a: cheap, and spreads redis-benchmark's `key:000000012345` keys well.
        let hash = key.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        (hash % SHARDS as u64) as usize
    }

    fn lock(&self, index: usize) -> Shard<'_> {
        Shard {
            // A handler that panicked while holding a shard left it consistent (every update is a
            // single map operation), so a poisoned lock is still usable.
            map: self.shards[index]
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
            now: Instant::now(),
        }
    }

    /// The locked shard holding `key`.
    pub fn shard(&self, key: &[u8]) -> Shard<'_> {
        self.lock(Self::index(key))
    }

    /// A copy of `key`'s live value.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shard(key).entry(key).map(|e| e.value.clone())
    }

    /// Sets `key` to `value` without expiry.
    pub fn set(&self, key: &[u8], value: &[u8]) {
        self.shard(key)
            .insert(key.to_vec(), Entry::new(value.to_vec()));
    }

    /// Every live key (in no particular order).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        for index in 0..SHARDS {
            let shard = self.lock(index);
            let now = shard.now;
            keys.extend(
                shard
                    .map
                    .iter()
                    .filter(|(_, e)| e.live(now))
                    .map(|(k, _)| k.clone()),
            );
        }
        keys
    }

    /// The number of live keys.
    pub fn len(&self) -> usize {
        (0..SHARDS)
            .map(|index| {
                let shard = self.lock(index);
                let now = shard.now;
                shard.map.values().filter(|e| e.live(now)).count()
            })
            .sum()
    }

    /// Whether no live key exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every key.
    pub fn clear(&self) {
        for index in 0..SHARDS {
            self.lock(index).map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn expired_keys_vanish_on_access() {
        let store = Store::new();
        store.set(b"a", b"1");
        store.shard(b"b").insert(
            b"b".to_vec(),
            Entry {
                value: b"2".to_vec(),
                expires_at: Some(Instant::now() - Duration::from_millis(1)),
            },
        );
        assert_eq!(store.get(b"a"), Some(b"1".to_vec()));
        assert_eq!(store.get(b"b"), None);
        assert_eq!(store.len(), 1);
        assert_eq!(store.keys(), vec![b"a".to_vec()]);
        assert!(!store.shard(b"b").remove(b"b"));
        store.clear();
        assert!(store.is_empty());
    }
}
