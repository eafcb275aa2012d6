//! The control protocol: line-delimited JSON over the agent's Unix socket.
//!
//! # Framing
//!
//! A client connects, writes one request per line (a JSON object followed by `\n`) and reads one
//! reply line per request, in order. A connection may carry any number of requests. A line longer
//! than [`MAX_LINE`] bytes is answered with an `oversized` error and the connection is closed (the
//! stream cannot be resynchronised); every other bad line gets an error reply and the connection
//! stays open.
//!
//! # Version
//!
//! Every request and reply carries `"v": 1` ([`VERSION`]). A request with another version is
//! refused with `unsupported_version`; a client that sees a reply of another version stops.
//! Fields may be added to replies within a version; clients ignore fields they do not know.
//!
//! # Requests
//!
//! `{"v":1,"id":N,"op":OP, ...arguments}`; `id` (any JSON value, optional) is echoed in the reply.
//!
//! | `op` | arguments | `result` of the reply |
//! |---|---|---|
//! | `hello` | — | [`Hello`]: pid, program, protocol and agent versions, uid |
//! | `status` | — | [`Status`]: hot functions and versions, patches, reclamation, switches, multiverse |
//! | `functions` | — | [`Functions`]: hot functions with versions, multiverse functions |
//! | `apply` | `path`, `atomic` (bool), `trial_ms`?, `safe_point_timeout_ms`? | [`Applied`] |
//! | `revert` | `target`? (patch or function; none = last patch), `version`? (for a function) | [`Reverted`] |
//! | `history` | — | [`History`]: the journal |
//! | `switch_set` | `name`, `value` (`true`, `false` or an integer, as a string) | [`SwitchInfo`] after the change |
//! | `commit` | `switch`? (none = every switch) | [`Committed`] |
//! | `revert_switches` | `switch`? | [`Committed`] |
//! | `gc` | — | error `unavailable` until reclamation lands |
//!
//! # Replies
//!
//! Success: `{"v":1,"id":N,"ok":true,"result":{...}}`.
//! Failure: `{"v":1,"id":N,"ok":false,"error":{"kind":KIND,"message":TEXT}}` where `KIND` is
//! one of [`ErrorKind`] in snake case: `malformed` (not a JSON object, not UTF-8), `oversized`,
//! `unsupported_version`, `unknown_request` (no or unknown `op`), `bad_request` (missing or
//! ill-typed argument), `permission_denied` (peer uid is neither the owner's nor root; sent once,
//! then the connection closes), `busy` (too many connections), `failed` (the operation was
//! refused: the message names the cause, e.g. the hot-update error), `unavailable` (the
//! capability is not in this build), `internal` (the agent caught a panic while serving).

use serde::{Deserialize, Serialize};

/// The protocol version this agent and CLI speak.
pub const VERSION: u32 = 1;

/// The longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// A request: the operation and its arguments (the envelope's `v` and `id` are separate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Who is there.
    Hello,
    /// Versions, patches, reclamation, switches.
    Status,
    /// Hot and multiverse functions.
    Functions,
    /// Apply a patch file (a path the agent's process can read).
    Apply {
        /// The patch (absolute: the agent's working directory is not the client's).
        path: String,
        /// Switch all functions at once, with safe-point threads held.
        #[serde(default)]
        atomic: bool,
        /// Revert automatically if the patch's code panics within this many milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trial_ms: Option<u64>,
        /// How long to wait for safe points (default 5000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        safe_point_timeout_ms: Option<u64>,
    },
    /// Revert a patch (by name), a function (by name), or the last patch.
    Revert {
        /// A patch name or a hot function's name; none: the last active patch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// For a function: the version to return to (default: the one below the current).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<usize>,
    },
    /// The journal.
    History,
    /// Set a switch's value (takes effect on the code at the next commit).
    SwitchSet {
        /// The switch's declared name.
        name: String,
        /// `true`, `false`, or an integer.
        value: String,
    },
    /// Commit the functions reading one switch, or all.
    Commit {
        /// A switch name; none: every multiversed function.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switch: Option<String>,
    },
    /// Restore the generic code of the functions reading one switch, or all.
    RevertSwitches {
        /// A switch name; none: every multiversed function.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switch: Option<String>,
    },
    /// Reclaim unreachable patches.
    Gc,
}

impl Request {
    /// The `op` names the agent knows.
    pub const OPS: &'static [&'static str] = &[
        "hello",
        "status",
        "functions",
        "apply",
        "revert",
        "history",
        "switch_set",
        "commit",
        "revert_switches",
        "gc",
    ];

    /// Its `op` name.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Status => "status",
            Request::Functions => "functions",
            Request::Apply { .. } => "apply",
            Request::Revert { .. } => "revert",
            Request::History => "history",
            Request::SwitchSet { .. } => "switch_set",
            Request::Commit { .. } => "commit",
            Request::RevertSwitches { .. } => "revert_switches",
            Request::Gc => "gc",
        }
    }

    /// The request line (with `id`), without the trailing newline.
    pub fn to_line(&self, id: u64) -> String {
        let mut value = serde_json::to_value(self).expect("requests serialize");
        let object = value.as_object_mut().expect("requests are objects");
        object.insert("v".into(), VERSION.into());
        object.insert("id".into(), id.into());
        serde_json::to_string(&value).expect("values serialize")
    }
}

/// The kind of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Not a JSON object, or not UTF-8.
    Malformed,
    /// Longer than [`MAX_LINE`].
    Oversized,
    /// Another protocol version.
    UnsupportedVersion,
    /// No `op`, or one the agent does not know.
    UnknownRequest,
    /// A missing or ill-typed argument.
    BadRequest,
    /// The peer may not control this process.
    PermissionDenied,
    /// Too many connections at once.
    Busy,
    /// The operation was refused or failed.
    Failed,
    /// The capability is not available in this build.
    Unavailable,
    /// The agent caught a panic while serving the request.
    Internal,
}

/// The error of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong, in general.
    pub kind: ErrorKind,
    /// What went wrong, exactly.
    pub message: String,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The protocol version.
    pub v: u32,
    /// The request's `id`, if it had one.
    #[serde(default)]
    pub id: serde_json::Value,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result of a successful request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error of a failed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReply>,
}

impl Reply {
    /// A success.
    pub fn ok(id: serde_json::Value, result: serde_json::Value) -> Reply {
        Reply {
            v: VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub fn error(id: serde_json::Value, kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply {
            v: VERSION,
            id,
            ok: false,
            result: None,
            error: Some(ErrorReply {
                kind,
                message: message.into(),
            }),
        }
    }

    /// The reply line, without the trailing newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("replies serialize")
    }
}

/// The result of `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The process.
    pub pid: u32,
    /// Its executable's file name.
    pub program: String,
    /// [`VERSION`].
    pub protocol: u32,
    /// The agent crate's version.
    pub agent: String,
    /// The uid the process runs as.
    pub uid: u32,
    /// Seconds since the agent started.
    pub uptime_s: u64,
}

/// A hot function and its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotFunction {
    /// Its path.
    pub name: String,
    /// `program`, then the patch of each later version.
    pub versions: Vec<String>,
    /// Index of the version callers reach now.
    pub current: usize,
}

/// A multiversed function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultiverseFunction {
    /// Its name.
    pub name: String,
    /// Whether it runs a committed variant (else its generic code).
    pub committed: bool,
}

/// A switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchInfo {
    /// Its declared name.
    pub name: String,
    /// Its current value, in raw form (`value as u64`).
    pub value: u64,
    /// Its domain, in raw form.
    pub domain: Vec<u64>,
}

/// A patch as evolve-hot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchInfo {
    /// Its name.
    pub name: String,
    /// The file it came from.
    pub path: String,
    /// Unix seconds.
    pub applied_at: u64,
    /// Unix seconds, if reverted.
    pub reverted_at: Option<u64>,
    /// The functions it changed.
    pub functions: Vec<String>,
}

/// The result of `functions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Functions {
    /// Hot functions.
    pub hot: Vec<HotFunction>,
    /// Multiversed functions.
    pub multiverse: Vec<MultiverseFunction>,
    /// Per-function call counts, when a counting capability (probes) is present.
    pub call_counts: Option<Vec<(String, u64)>>,
}

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Who.
    pub hello: Hello,
    /// Hot functions and multiverse.
    pub functions: Functions,
    /// Applied patches, in order.
    pub patches: Vec<PatchInfo>,
    /// Patches waiting to be unloaded, or why that is not known.
    pub reclamation: Reclamation,
    /// Switches and their values.
    pub switches: Vec<SwitchInfo>,
    /// Journal entries so far.
    pub journal_entries: usize,
}

/// What is known about reclamation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reclamation {
    /// Whether this build can reclaim patches.
    pub available: bool,
    /// Patches waiting to be unloaded (empty when not available).
    pub pending: Vec<String>,
    /// Explanation.
    pub note: String,
}

/// The result of `apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The patch's name.
    pub patch: String,
    /// Functions now running its code.
    pub updated: Vec<String>,
    /// Functions it adds.
    pub added: Vec<String>,
    /// Functions reached through an adaptor.
    pub adapted: Vec<String>,
    /// Whether it was applied at a safe point.
    pub atomic: bool,
    /// Its trial window, if on trial.
    pub trial_ms: Option<u64>,
    /// Milliseconds, in all.
    pub total_ms: f64,
}

/// The result of `revert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reverted {
    /// What was reverted: `patch NAME`, `function NAME to version K`, `last patch`.
    pub what: String,
    /// Functions whose code changed.
    pub changed: Vec<String>,
}

/// The result of `commit` and `revert_switches`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Functions whose code changed.
    pub changed: Vec<String>,
    /// `function: switch=value` without a variant (generic code runs).
    pub unmatched: Vec<String>,
    /// Sites written.
    pub sites: usize,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// 1, 2, …
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The uid of the client.
    pub uid: u32,
    /// The pid of the client.
    pub client_pid: u32,
    /// The operation (`apply`, `revert`, `commit`, …).
    pub op: String,
    /// Its arguments, in short.
    pub target: String,
    /// `ok` or `failed`.
    pub outcome: String,
    /// What happened (the functions changed, or the error).
    pub detail: String,
}

/// The result of `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The journal, oldest first.
    pub entries: Vec<JournalEntry>,
    /// The file it is also appended to, if any.
    pub file: Option<String>,
}
