//! engage: a gRPC service for user events and event-triggered automations.
//!
//! Layers: `proto` (generated from `proto/engage/v1`) → `api` (one file per service: convert,
//! validate, call the domain, map errors) → domain modules (`schema`, `ingest`, `timeline`) that
//! know nothing of tonic → `store`, the only code that knows sled and the key layouts.

pub mod actions;
pub mod api;
pub mod condition;
pub mod config;
pub mod error;
pub mod ingest;
pub mod model;
pub mod query;
pub mod schema;
pub mod server;
pub mod store;
pub mod template;
pub mod timeline;
pub mod timers;

/// Generated protobuf and gRPC code of `engage.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("engage.v1");

    /// The encoded descriptor set of every engage proto file (and its imports), for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/engage_descriptor.bin"));
}
