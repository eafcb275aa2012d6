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
//! | `functions` | `symbols`? (a glob over the process's function symbols) | [`Functions`]: hot functions with versions, multiverse functions, the matching symbols |
//! | `apply` | `path`, `atomic` (bool), `trial_ms`?, `safe_point_timeout_ms`? | [`Applied`] |
//! | `revert` | `target`? (patch or function; none = last patch), `version`? (for a function) | [`Reverted`] |
//! | `history` | — | [`History`]: the journal |
//! | `switch_set` | `name`, `value` (`true`, `false` or an integer, as a string) | [`SwitchInfo`] after the change |
//! | `commit` | `switch`? (none = every switch) | [`Committed`] |
//! | `revert_switches` | `switch`? | [`Committed`] |
//! | `gc` | — | `{unloaded, kept: [{patch, references}], resident, max_pause_us, bytes_scanned}`: reclamation with the `scan` policy |
//! | `probe_add` | `pattern`, `kind` ([`ProbeKindName`]), `arg` (for `hist`), `expr` (for `when`, see [`WhenExpr`]) | [`ProbeList`]: the probes added, one per matching function |
//! | `probe_list` | — | [`ProbeList`]: every probe, attached or kept for its reading |
//! | `probe_rm` | exactly one of `probe` (an id), `pattern` (a probe's pattern, or a glob over function names), `all: true` | [`ProbeList`]: the probes removed |
//! | `probe_read` | `probe`? (an id; none = every probe) | [`ProbeReadings`] |
//! | `detach` | `revert` (bool) | [`Detached`]: an attached agent removes its probes (refusing while patches are applied, unless `revert`) and stops |
//! | `canary_start` | `path`, `split` (`calls`, `threads` or `connections`), `fraction` (0-1), `errors` (the functions whose calls count as errors) | [`CanaryInfo`]: the new version serves that fraction |
//! | `canary_read` | — | [`CanaryInfo`]: calls and errors per version so far |
//! | `canary_finish` | `max_ratio` | [`CanaryInfo`]: promoted (the new version serves everything, as after `apply`) if its error rate is at most `max_ratio` times the old one's, else rolled back |
//!
//! For example `{"v":1,"id":7,"op":"probe_add","pattern":"kv::*","kind":"when","expr":"arg1 >= 4096"}`
//! or `{"v":1,"op":"probe_rm","all":true}`. A probe's id travels as `probe` (the envelope's `id`
//! is the request's).
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
//! A probe request with a bad expression or a kind without its argument is a `bad_request`; a
//! pattern matching no function, or a function the probes library refuses (e.g. a prologue that
//! cannot be relocated), is `failed` with the library's reason.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

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
    /// Hot and multiverse functions, and the process's function symbols matching a glob.
    Functions {
        /// A `*`/`?` glob (or an exact name) over the function symbols of the executable and
        /// its libraries (`.symtab`, `.dynsym`, and separate debug files); none: no symbols.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        symbols: Option<String>,
    },
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
    /// Attach a probe to every function matching a pattern.
    ProbeAdd {
        /// An exact symbol name (demangled Rust path or C name) or a `*`/`?` glob.
        pattern: String,
        /// What the probe records.
        kind: ProbeKindName,
        /// For `hist`: the argument (0-5: `rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arg: Option<usize>,
        /// For `when`: the predicate, e.g. `arg0 == 0` (see [`WhenExpr`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expr: Option<String>,
    },
    /// Every probe.
    ProbeList,
    /// Remove probes: by id, by pattern, or all (exactly one).
    ProbeRm {
        /// A probe's id (`probe`: the envelope's `id` is the request's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probe: Option<u64>,
        /// The pattern a probe was added with, or a glob over probed functions' names.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<String>,
        /// Every probe.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all: bool,
    },
    /// Remove every probe and stop an attached agent (`evolve detach`).
    Detach {
        /// Revert applied patches instead of refusing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        revert: bool,
    },
    /// What probes recorded.
    ProbeRead {
        /// One probe's id; none: every probe.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probe: Option<u64>,
    },
    /// Start an in-process canary: the patch's version serves a fraction of the work.
    CanaryStart {
        /// The patch (absolute).
        path: String,
        /// `calls`, `threads` or `connections`.
        split: String,
        /// The fraction the new version serves, 0 < f < 1.
        fraction: f64,
        /// The functions (name or glob) whose calls count as errors.
        errors: String,
    },
    /// The running canary's calls and errors per version.
    CanaryRead,
    /// End the canary: promote the new version, or roll it back if its error rate exceeds
    /// `max_ratio` times the old one's.
    CanaryFinish {
        /// How much worse the new version may be.
        max_ratio: f64,
    },
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
        "probe_add",
        "probe_list",
        "probe_rm",
        "probe_read",
        "detach",
        "canary_start",
        "canary_read",
        "canary_finish",
    ];

    /// Its `op` name.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Status => "status",
            Request::Functions { .. } => "functions",
            Request::Apply { .. } => "apply",
            Request::Revert { .. } => "revert",
            Request::History => "history",
            Request::SwitchSet { .. } => "switch_set",
            Request::Commit { .. } => "commit",
            Request::RevertSwitches { .. } => "revert_switches",
            Request::Gc => "gc",
            Request::ProbeAdd { .. } => "probe_add",
            Request::ProbeList => "probe_list",
            Request::ProbeRm { .. } => "probe_rm",
            Request::ProbeRead { .. } => "probe_read",
            Request::Detach { .. } => "detach",
            Request::CanaryStart { .. } => "canary_start",
            Request::CanaryRead => "canary_read",
            Request::CanaryFinish { .. } => "canary_finish",
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

/// The result of `detach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    /// How many probes were removed.
    pub probes_removed: usize,
    /// The patches reverted (with `revert`).
    pub reverted: Vec<String>,
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
    /// Whether the agent was brought in by `evolve attach` (the program never linked it).
    #[serde(default)]
    pub attached: bool,
    /// In an attached agent: the offset from the thread pointer of the static-TLS block its
    /// probes' fast paths address (see `evolve_code::attached::static_tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_tls_offset: Option<i64>,
    /// In an attached agent without that block: why (its probes take their slow path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_tls_refused: Option<String>,
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
    /// The function symbols matching the request's `symbols` glob (at most
    /// [`MAX_SYMBOLS`]), in image and address order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<FunctionSymbol>,
    /// More symbols matched than were returned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub symbols_truncated: bool,
}

/// At most this many symbols in one `functions` reply.
pub const MAX_SYMBOLS: usize = 10_000;

/// A function symbol of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSymbol {
    /// Demangled name.
    pub name: String,
    /// Runtime address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// The image (executable or library) that defines it.
    pub image: String,
    /// The separate debug file its image's symbols came from (the image is stripped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_file: Option<String>,
    /// Its versions, oldest first: `program` (its own code), then the name of each applied
    /// patch that replaced it; the last one runs. Empty from agents older than this field.
    #[serde(default)]
    pub versions: Vec<String>,
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
    /// Of which: reading and verifying the manifest.
    #[serde(default)]
    pub verify_ms: f64,
    /// Loading and binding the object.
    #[serde(default)]
    pub load_ms: f64,
    /// Switching the functions (the only part that touches running code).
    #[serde(default)]
    pub switch_ms: f64,
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

/// The result of `gc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// Patches unloaded now.
    pub unloaded: Vec<String>,
    /// Patches kept because something still refers to them.
    pub kept: Vec<KeptPatch>,
    /// Patches still loaded afterwards.
    pub resident: usize,
    /// The longest time the process's threads were stopped, in microseconds.
    pub max_pause_us: u64,
    /// Bytes of memory scanned.
    pub bytes_scanned: usize,
}

/// A patch `gc` kept, and what still refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptPatch {
    /// The patch's name.
    pub patch: String,
    /// Where references to it were found (a thread's registers or stack, a memory word).
    pub references: Vec<String>,
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

/// What a probe records, as `probe_add` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKindName {
    /// Calls.
    Count,
    /// Entry-to-exit time.
    Latency,
    /// Log2 histogram of argument `arg`.
    Hist,
    /// Calls where `expr` holds, with the first backtraces.
    When,
    /// Whether the function ran (the probe detaches itself after the first call).
    Coverage,
}

/// A comparison of a [`WhenExpr`]. Comparisons are unsigned 64-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    /// Its symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// The predicate of a `when` probe: `argN OP VALUE`.
///
/// * `argN`: an integer argument, `arg0` to `arg5` (`rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`);
/// * `OP`: `==`, `!=`, `<`, `<=`, `>`, `>=`; the comparison is unsigned 64-bit;
/// * `VALUE`: decimal, `0x` hexadecimal, `true`/`false` (1/0), or, with `==` and `!=` only, a
///   negative decimal (compared as its two's-complement bit pattern, e.g. `-1` is `u64::MAX`).
///
/// Spaces around the operator are optional. A predicate that always holds (`>= 0`,
/// `<= 18446744073709551615`) is refused: a count probe says the same.
///
/// # Example
///
/// ```
/// use evolve_agent::protocol::{CmpOp, WhenExpr};
///
/// let e: WhenExpr = "arg1 >= 4096".parse().unwrap();
/// assert_eq!((e.arg, e.op, e.value), (1, CmpOp::Ge, 4096));
/// assert_eq!(e.to_string(), "arg1 >= 4096");
/// assert!(e.holds(5000) && !e.holds(4095));
/// assert!("arg9 == 1".parse::<WhenExpr>().is_err());
/// assert!("arg0 => 1".parse::<WhenExpr>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhenExpr {
    /// The argument, 0-5.
    pub arg: usize,
    /// The comparison.
    pub op: CmpOp,
    /// The value compared against.
    pub value: u64,
}

impl WhenExpr {
    /// Whether `argument <op> value` holds.
    pub fn holds(&self, argument: u64) -> bool {
        match self.op {
            CmpOp::Eq => argument == self.value,
            CmpOp::Ne => argument != self.value,
            CmpOp::Lt => argument < self.value,
            CmpOp::Le => argument <= self.value,
            CmpOp::Gt => argument > self.value,
            CmpOp::Ge => argument >= self.value,
        }
    }
}

impl fmt::Display for WhenExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "arg{} {} {}", self.arg, self.op.symbol(), self.value)
    }
}

impl FromStr for WhenExpr {
    type Err = String;

    fn from_str(text: &str) -> Result<WhenExpr, String> {
        let usage = "expected `argN OP VALUE` with N in 0-5, OP one of == != < <= > >=, \
                     VALUE an unsigned integer (e.g. `arg0 == 0`, `arg1 > 100`)";
        let bad = |why: String| format!("bad expression {text:?}: {why}; {usage}");
        let t = text.trim();
        let at = t
            .find(['=', '!', '<', '>'])
            .ok_or_else(|| bad("no comparison operator".into()))?;
        let (left, rest) = t.split_at(at);
        let (op, len) = [
            ("==", CmpOp::Eq),
            ("!=", CmpOp::Ne),
            ("<=", CmpOp::Le),
            (">=", CmpOp::Ge),
            ("<", CmpOp::Lt),
            (">", CmpOp::Gt),
        ]
        .iter()
        .find(|(sym, _)| rest.starts_with(sym))
        .map(|(sym, op)| (*op, sym.len()))
        .ok_or_else(|| bad(format!("unknown operator at {rest:?}")))?;
        let right = rest[len..].trim();
        if right.starts_with(['=', '!', '<', '>']) {
            return Err(bad(format!("unknown operator at {rest:?}")));
        }
        let left = left.trim();
        let arg = left
            .strip_prefix("arg")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < 6 && !left.contains('+'))
            .ok_or_else(|| bad(format!("{left:?} is not an argument arg0 to arg5")))?;
        let value = match right {
            "true" => Some(1),
            "false" => Some(0),
            _ if right.starts_with("0x") || right.starts_with("0X") => {
                u64::from_str_radix(&right[2..], 16).ok()
            }
            _ if right.starts_with('-') && matches!(op, CmpOp::Eq | CmpOp::Ne) => {
                right.parse::<i64>().ok().map(|v| v as u64)
            }
            _ if right.starts_with('-') => {
                return Err(bad(format!(
                    "comparisons are unsigned: `{}` with a negative value is not supported",
                    op.symbol()
                )))
            }
            _ if right.starts_with('+') => None,
            _ => right.parse::<u64>().ok(),
        }
        .ok_or_else(|| bad(format!("{right:?} is not an unsigned 64-bit integer")))?;
        match (op, value) {
            (CmpOp::Ge, 0) | (CmpOp::Le, u64::MAX) => {
                Err(bad("it always holds (a count probe says the same)".into()))
            }
            _ => Ok(WhenExpr { arg, op, value }),
        }
    }
}

/// A probe, as `probe_add`, `probe_list` and `probe_rm` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeEntry {
    /// Its id.
    pub id: u64,
    /// The pattern it was added with (none if the program added it itself).
    pub pattern: Option<String>,
    /// The probed function (demangled).
    pub function: String,
    /// The function's address.
    pub address: usize,
    /// What it records: `count`, `latency`, `hist arg0`, `when arg1 >= 4096`, `coverage`.
    pub kind: String,
    /// Whether it is attached (a coverage probe detaches itself after the first call).
    pub attached: bool,
    /// When it was added through the agent (Unix milliseconds).
    pub added_at_ms: Option<u64>,
}

/// The result of `probe_add`, `probe_list` and `probe_rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeList {
    /// The probes, by id.
    pub probes: Vec<ProbeEntry>,
}

/// Latency figures of a latency probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Calls timed (returned or unwound).
    pub count: u64,
    /// Of those, calls a panic unwound.
    pub unwound: u64,
    /// Mean entry-to-exit time.
    pub mean_ns: f64,
    /// Median, estimated from the log2 histogram: the upper bound of the median's bucket
    /// (at most `max_ns`).
    pub p50_ns: f64,
    /// 99th percentile, estimated like `p50_ns`.
    pub p99_ns: f64,
    /// The longest.
    pub max_ns: f64,
    /// `(lower bound in ns, calls)` per non-empty log2 bucket.
    pub histogram_ns: Vec<(u64, u64)>,
}

/// What one probe has recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The probe.
    #[serde(flatten)]
    pub probe: ProbeEntry,
    /// Calls since it was added (until it was detached).
    pub calls: u64,
    /// Latency probes: the figures.
    pub latency: Option<LatencyFigures>,
    /// Histogram probes: `(lower bound, calls)` per non-empty log2 bucket: 0, 1, 2-3, 4-7, …
    pub histogram: Vec<(u64, u64)>,
    /// `when` probes: calls where the predicate held.
    pub hits: u64,
    /// `when` probes: the first backtraces captured (at most a few).
    pub backtraces: Vec<String>,
    /// Coverage probes: whether the function ran.
    pub covered: bool,
}

/// The result of `probe_read`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReadings {
    /// When the readings were taken (Unix milliseconds).
    pub at_ms: u64,
    /// One per probe, by id.
    pub readings: Vec<ProbeReport>,
}

/// An in-process canary, as `canary_start`, `canary_read` and `canary_finish` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryInfo {
    /// The patch on canary.
    pub patch: String,
    /// `calls`, `threads` or `connections`.
    pub split: String,
    /// The fraction the new version serves.
    pub fraction: f64,
    /// Calls routed to the new version.
    pub new_calls: u64,
    /// Calls routed to the old version.
    pub old_calls: u64,
    /// Errors counted on the new version's side.
    pub new_errors: u64,
    /// Errors counted on the old version's side.
    pub old_errors: u64,
    /// After `canary_finish`: whether the new version now serves everything.
    pub promoted: Option<bool>,
}
