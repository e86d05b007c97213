//! engage: a gRPC service for user events and event-triggered automations.
//!
//! The crate is layered, and each layer uses only the ones before it (see `docs/architecture.md`):
//!
//! 1. [`error`]: the service's error type.
//! 2. `domain`: types, typing, validation rules, the condition language, templates; no tokio,
//!    sled or tonic.
//! 3. `store`: the only code that knows sled and the key layouts.
//! 4. `engine`: the write path (one writer thread, group commit, triggers, timers, erasure).
//! 5. `read`: the read paths (timelines, segments, statistics, delivery of actions);
//!    `deliver`, beside it: the webhooks engage delivers to destinations itself.
//! 6. `api`: the gRPC handlers, thin: convert, check, call, map errors.
//! 7. [`server`]: wires everything together and serves it; [`config`] holds its flags.
//! 8. [`cli`]: the command-line client (`engage track`, `triggers`, `tail`, ...), over the
//!    generated gRPC client only.
//!
//! The library exports what the binary, the tests and the benchmarks need, no more.

#![warn(unreachable_pub)]

mod access;
mod api;
pub mod cli;
pub mod config;
mod deliver;
mod domain;
mod engine;
pub mod error;
mod net;
mod read;
pub mod server;
mod store;
mod telemetry;

/// Generated protobuf and gRPC code of `engage.v1`.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("engage.v1");

    /// The encoded descriptor set of every engage proto file (and its imports), for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/engage_descriptor.bin"));
}

/// The domain types clients of the library build and read (the benchmarks build stored
/// events with them).
pub mod model {
    pub use crate::domain::model::{Event, Timestamp, Value};
}

/// engage's on-disk encoding of events, for the benchmarks' raw-sled baseline (which writes
/// the same keys and values as engage, without engage).
pub mod layout {
    use crate::domain::model::Event;

    /// The key engage stores `event` under.
    pub fn event_key(event: &Event) -> Vec<u8> {
        crate::store::event_key(event)
    }

    /// The value engage stores for `event`.
    pub fn encode_event(event: &Event) -> Vec<u8> {
        crate::store::encode_event(event)
    }
}
