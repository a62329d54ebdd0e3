//! ferry moves virtual-machine disk images out of a spool directory into object
//! storage, in every region at once, reading each image once and checking every
//! byte with CRC32C. See `README.md` for the operator's view and
//! `ARCHITECTURE.md` for the map of the code.
//!
//! The library holds everything; `main.rs` only parses arguments and calls it.

pub mod bandwidth;
pub mod chunk;
pub mod config;
pub mod crc;
pub mod daemon;
pub mod error;
pub mod events;
pub mod failpoint;
pub mod http;
pub mod image;
pub mod import;
pub mod journal;
pub mod lock;
pub mod manifest;
pub mod mapping;
pub mod metrics;
pub mod oci;
pub mod priority;
pub mod progress;
pub mod push;
pub mod shutdown;
pub mod source;
pub mod spool;
pub mod status;
pub mod store;
pub mod transfer;
pub mod view;

/// ferry's version, as written into manifests and metrics.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
