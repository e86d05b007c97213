//! The domain: what engage stores and answers, and every rule about it, with no knowledge of
//! tokio, sled or tonic.
//!
//! - [`model`]: the types (events, values, timestamps, triggers, actions, aggregates).
//! - [`typing`]: coercion of attribute values to their defined type, canonical text.
//! - [`rules`]: every validation rule and limit (ids, names, sizes, page sizes, triggers).
//! - [`condition`]: the condition language of triggers and FilterUsers: validation, evaluation.
//! - [`destination`]: destinations (webhooks): their rules, retry schedule and health.
//! - [`template`]: action payload templates (minijinja).
//! - [`bytes`]: hashing, hex and order-preserving integer encoding, written once.

pub(crate) mod bytes;
pub(crate) mod condition;
pub(crate) mod destination;
pub(crate) mod model;
pub(crate) mod rules;
pub(crate) mod template;
pub(crate) mod typing;
