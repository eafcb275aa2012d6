//! etcd access: the few operations the fleet needs, each counted.
//!
//! Every request goes through [`Store`], which counts it (the benchmark's
//! `etcd_requests_per_node_step`). Watches resume from a revision: [`Store::watch`] starts at
//! `from` and reports a compaction as [`WatchEvent::Compacted`], after which the caller re-lists
//! ([`Store::list`]) and watches again from the list's revision.

use crate::error::{Error, Result};
use crate::keys::Keys;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A key's value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// The revision that created it.
    pub create_revision: i64,
}

impl Entry {
    fn from_kv(kv: &etcd_client::KeyValue) -> Entry {
        Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        }
    }

    /// The value as JSON of type `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.value)
            .map_err(|e| Error::invalid(format!("etcd key {} holds bad JSON: {e}", self.key)))
    }
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was written.
    Put(Entry),
    /// A key was deleted (or its lease expired) at `revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: i64,
    },
    /// Nothing changed up to this revision (etcd's progress notification).
    Progress(i64),
    /// The revision asked for was compacted away: re-list, then watch from the list's revision.
    Compacted(i64),
}

/// A connection to etcd with the fleet's key layout.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    requests: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("keys", &self.keys).finish()
    }
}

/// A compare-and-swap that lost: someone else wrote first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

impl Store {
    /// Connects to `endpoints` (`http://127.0.0.1:2379`, …).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Store> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| Error::etcd(format!("connect to {}", endpoints.join(",")), e))?;
        Ok(Store {
            client,
            keys: Keys::new(prefix),
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A handle sharing the connection, with its own request counter.
    pub fn with_own_counter(&self) -> Store {
        Store {
            client: self.client.clone(),
            keys: self.keys.clone(),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Requests sent so far through this handle (and its clones).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count(&self) -> Client {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.client.clone()
    }

    /// Every key under `prefix`, and the revision of the read.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64)> {
        let response = self
            .count()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| Error::etcd(format!("list {prefix}"), e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((
            response.kvs().iter().map(Entry::from_kv).collect(),
            revision,
        ))
    }

    /// Every key under `prefix` as it was at `revision` (history; fails once compacted).
    pub async fn list_at(&self, prefix: &str, revision: i64) -> Result<Vec<Entry>> {
        let response = self
            .count()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_revision(revision)),
            )
            .await
            .map_err(|e| Error::etcd(format!("list {prefix} at revision {revision}"), e))?;
        Ok(response.kvs().iter().map(Entry::from_kv).collect())
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let response = self
            .count()
            .get(key, None)
            .await
            .map_err(|e| Error::etcd(format!("get {key}"), e))?;
        Ok(response.kvs().first().map(Entry::from_kv))
    }

    /// Writes `key`, attached to `lease` if given; returns the revision.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<i64> {
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let response = self
            .count()
            .put(key, value, options)
            .await
            .map_err(|e| Error::etcd(format!("put {key}"), e))?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.count()
            .delete(key, None)
            .await
            .map_err(|e| Error::etcd(format!("delete {key}"), e))?;
        Ok(())
    }

    /// Writes every `(key, value)` if every `(key, mod_revision)` still holds (0: the key does
    /// not exist) and, if `leader` is given, that election key still exists with that create
    /// revision. `Ok(Err(Conflict))` when a condition failed: nothing was written.
    pub async fn compare_and_swap(
        &self,
        expect: &[(String, i64)],
        leader: Option<(&[u8], i64)>,
        writes: Vec<(String, Vec<u8>)>,
    ) -> Result<std::result::Result<i64, Conflict>> {
        let mut compares: Vec<Compare> = expect
            .iter()
            .map(|(key, revision)| Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision))
            .collect();
        if let Some((key, revision)) = leader {
            compares.push(Compare::create_revision(
                key.to_vec(),
                CompareOp::Equal,
                revision,
            ));
        }
        let puts: Vec<TxnOp> = writes
            .into_iter()
            .map(|(key, value)| TxnOp::put(key, value, None))
            .collect();
        let response = self
            .count()
            .txn(Txn::new().when(compares).and_then(puts))
            .await
            .map_err(|e| Error::etcd("compare-and-swap", e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(if response.succeeded() {
            Ok(revision)
        } else {
            Err(Conflict)
        })
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        let response = self
            .count()
            .lease_grant(ttl, None)
            .await
            .map_err(|e| Error::etcd("lease grant", e))?;
        Ok(response.id())
    }

    /// Refreshes `lease` once; `false` if it no longer exists (expired).
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool> {
        let (mut keeper, mut stream) = self
            .count()
            .lease_keep_alive(lease)
            .await
            .map_err(|e| Error::etcd("lease keep-alive", e))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| Error::etcd("lease keep-alive", e))?;
        match stream.message().await {
            Ok(Some(response)) => Ok(response.ttl() > 0),
            Ok(None) => Ok(false),
            Err(e) => Err(Error::etcd("lease keep-alive", e)),
        }
    }

    /// Revokes `lease` (its keys vanish now).
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        self.count()
            .lease_revoke(lease)
            .await
            .map_err(|e| Error::etcd("lease revoke", e))?;
        Ok(())
    }

    /// Compacts etcd's history up to `revision` (tests and maintenance).
    pub async fn compact(&self, revision: i64) -> Result<()> {
        self.count()
            .compact(revision, None)
            .await
            .map_err(|e| Error::etcd(format!("compact to {revision}"), e))?;
        Ok(())
    }

    /// Campaigns in the controllers' election with `lease`; returns when this candidate
    /// leads, with the leader key's name and create revision.
    pub async fn campaign(&self, value: &str, lease: i64) -> Result<(Vec<u8>, i64)> {
        let response = self
            .count()
            .campaign(self.keys.leader(), value, lease)
            .await
            .map_err(|e| Error::etcd("campaign", e))?;
        let leader = response
            .leader()
            .ok_or_else(|| Error::etcd("campaign", "no leader key in the reply"))?;
        Ok((leader.key().to_vec(), leader.rev()))
    }

    /// The current leader's value, if any.
    pub async fn leader(&self) -> Result<Option<String>> {
        match self.count().leader(self.keys.leader()).await {
            Ok(response) => Ok(response
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(Error::etcd("leader", e)),
        }
    }

    /// Watches every key under `prefix` from revision `from` (inclusive); events arrive on
    /// the returned channel until the watch fails (then the channel closes; the caller resumes
    /// from the last revision it saw).
    pub async fn watch(
        &self,
        prefix: &str,
        from: i64,
    ) -> Result<tokio::sync::mpsc::Receiver<Vec<WatchEvent>>> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream = self
            .count()
            .watch(prefix, Some(options))
            .await
            .map_err(|e| Error::etcd(format!("watch {prefix}"), e))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let message = match stream.message().await {
                    Ok(Some(message)) => message,
                    _ => return,
                };
                if message.compact_revision() > 0 {
                    let _ = sender
                        .send(vec![WatchEvent::Compacted(message.compact_revision())])
                        .await;
                    return;
                }
                if message.canceled() {
                    return;
                }
                let revision = message.header().map_or(0, |h| h.revision());
                let mut events: Vec<WatchEvent> = message
                    .events()
                    .iter()
                    .filter_map(|event| {
                        let kv = event.kv()?;
                        Some(match event.event_type() {
                            EventType::Put => WatchEvent::Put(Entry::from_kv(kv)),
                            EventType::Delete => WatchEvent::Delete {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                revision: kv.mod_revision(),
                            },
                        })
                    })
                    .collect();
                if events.is_empty() {
                    if message.created() {
                        continue;
                    }
                    events.push(WatchEvent::Progress(revision));
                }
                if sender.send(events).await.is_err() {
                    return;
                }
            }
        });
        Ok(receiver)
    }
}
