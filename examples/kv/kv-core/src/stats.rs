//! Server statistics, and the example's multiverse switch.
//!
//! Counting every command costs an atomic add on a shared cache line per request. Operators
//! usually leave statistics on; when they turn them off (`evolve switch PID set COMMAND_STATS
//! false` then `evolve commit PID`), multiverse replaces every call of [`count_command`] with a
//! 5-byte NOP — the check disappears from the hot path instead of being a branch on every
//! command. Built without the `evolve` feature, the switch is a plain atomic read at run time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Connections accepted since start.
pub static CONNECTIONS_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// Connections open now.
pub static CONNECTED_CLIENTS: AtomicU64 = AtomicU64::new(0);
/// Connections closed because of an I/O error (not a client's `QUIT` or end of input).
pub static CONNECTIONS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Requests that could not be parsed (the connection is closed after the error reply).
pub static PROTOCOL_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Commands executed, counted only while `COMMAND_STATS` is on.
pub static COMMANDS_PROCESSED: AtomicU64 = AtomicU64::new(0);
/// Error replies sent.
pub static ERROR_REPLIES: AtomicU64 = AtomicU64::new(0);

/// Whether commands are counted (`INFO`'s `total_commands_processed`).
#[cfg(feature = "evolve")]
#[evolve::switch]
pub static COMMAND_STATS: bool = true;

/// Whether commands are counted (`INFO`'s `total_commands_processed`).
#[cfg(not(feature = "evolve"))]
pub static COMMAND_STATS: plain::Flag = plain::Flag::new(true);

/// Counts one executed command, if statistics are on.
#[cfg_attr(feature = "evolve", evolve::multiverse(COMMAND_STATS))]
#[inline(never)]
pub fn count_command() {
    if COMMAND_STATS.get() {
        COMMANDS_PROCESSED.fetch_add(1, Relaxed);
    }
}

/// Counts one error reply. Never inlined: it is the probe point for error replies
/// (`evolve probe PID add kv_core::stats::count_error --count`, a fleet rollout's probe gate).
#[inline(never)]
pub fn count_error() {
    ERROR_REPLIES.fetch_add(1, Relaxed);
}

#[cfg(not(feature = "evolve"))]
mod plain {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

    /// A run-time flag with the switch's interface.
    pub struct Flag(AtomicBool);

    impl Flag {
        pub const fn new(value: bool) -> Flag {
            Flag(AtomicBool::new(value))
        }
        pub fn get(&self) -> bool {
            self.0.load(Relaxed)
        }
        pub fn set(&self, value: bool) {
            self.0.store(value, Relaxed)
        }
    }
}
