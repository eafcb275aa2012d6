//! The kv example server's foundation: the sharded in-memory store, the RESP2 wire format and the
//! server's statistics. The command handlers that use them live in `kv-commands` (hot functions:
//! that is the code patches change); this crate is shared by every version of them.

pub mod resp;
pub mod stats;
pub mod store;

pub use resp::{Reply, Request};
pub use store::{Entry, Store};
