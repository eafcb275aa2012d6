//! The journal: an append-only record of every change made through the agent.
//!
//! Each request that changes the process (`apply`, `revert`, `switch_set`, `commit`,
//! `revert_switches`, `gc`, `probe_add`, `probe_rm`) adds one entry after it finishes: when, by which uid and pid, what
//! was asked and what became of it, including refusals. Entries are kept in memory (the
//! `history` request returns them) and appended, one JSON line each, to `<dir>/<pid>.journal`
//! (mode 0600), which outlives the process for post-mortems. Entries are never changed or
//! removed; a failure to write the file is reported on the process's stderr once and does not
//! fail the operation it records.
//!
//! There is one journal per process ([`Journal::of_process`]): an agent stopped by `evolve
//! detach` and started again by the next `evolve attach` (or a linked program that starts its
//! agent twice) goes on with the same history, numbering and file. Only a new process starts
//! afresh, truncating a file left by an earlier process with the same pid.

use crate::protocol::JournalEntry;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Who asked for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid.
    pub pid: u32,
}

/// The journal of this process.
pub struct Journal {
    entries: Mutex<Vec<JournalEntry>>,
    file: Mutex<Option<File>>,
    path: Option<PathBuf>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This process's journal, once an agent has started.
static PROCESS_JOURNAL: Mutex<Option<Arc<Journal>>> = Mutex::new(None);

/// Creates `path` afresh (mode 0600) with `entries` in it.
fn create(path: &PathBuf, entries: &[JournalEntry]) -> Option<File> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| eprintln!("evolve agent: journal {}: {e}", path.display()))
        .ok()?;
    for entry in entries {
        let line = serde_json::to_string(entry).expect("entries serialize");
        writeln!(file, "{line}")
            .map_err(|e| eprintln!("evolve agent: journal {}: {e}", path.display()))
            .ok()?;
    }
    Some(file)
}

impl Journal {
    /// A journal appending to `path` (created afresh: a file of the same name belongs to an
    /// earlier process with the same pid), or kept in memory only.
    pub fn new(path: Option<PathBuf>) -> Journal {
        let file = path.as_ref().and_then(|p| create(p, &[]));
        Journal {
            entries: Mutex::new(Vec::new()),
            path: if file.is_some() { path } else { None },
            file: Mutex::new(file),
        }
    }

    /// This process's journal: the one its first agent created at `path`, kept for every
    /// later agent of the process, so the history survives a detach and a new attach. If a
    /// later agent journals to another path (another socket directory), the history so far is
    /// written there first and the journal goes on there.
    ///
    /// # Example
    /// ```
    /// use evolve_agent::journal::{Client, Journal};
    /// let dir = std::env::temp_dir().join(format!("evolve-journal-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let first = Journal::of_process(dir.join("1.journal"));
    /// first.record(Client { uid: 0, pid: 1 }, "probe_add", "f".into(), Ok(String::new()));
    /// let again = Journal::of_process(dir.join("1.journal"));
    /// assert_eq!(again.entries().len(), 1, "the second agent goes on with the history");
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn of_process(path: PathBuf) -> Arc<Journal> {
        let mut process = PROCESS_JOURNAL.lock().unwrap_or_else(|p| p.into_inner());
        let journal = match process.take() {
            None => Arc::new(Journal::new(Some(path))),
            Some(j) if j.path.as_ref() == Some(&path) => j,
            Some(j) => {
                let entries = j.entries();
                let file = create(&path, &entries);
                Arc::new(Journal {
                    entries: Mutex::new(entries),
                    path: if file.is_some() { Some(path) } else { None },
                    file: Mutex::new(file),
                })
            }
        };
        *process = Some(journal.clone());
        journal
    }

    /// Appends an entry.
    pub fn record(&self, client: Client, op: &str, target: String, result: Result<String, String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (outcome, detail) = match result {
            Ok(d) => ("ok", d),
            Err(e) => ("failed", e),
        };
        let entry = JournalEntry {
            seq: entries.len() as u64 + 1,
            at_ms: now_ms(),
            uid: client.uid,
            client_pid: client.pid,
            op: op.to_string(),
            target,
            outcome: outcome.to_string(),
            detail,
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = file.as_mut() {
            let line = serde_json::to_string(&entry).expect("entries serialize");
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("evolve agent: journal write failed, keeping it in memory only: {e}");
                *file = None;
            }
        }
        entries.push(entry);
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<JournalEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The file it appends to.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }
}
