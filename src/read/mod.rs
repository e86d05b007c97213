//! The read paths: everything that answers from the store without going through the writer.
//!
//! - [`timeline`]: one user's events, paged.
//! - [`segments`]: FilterUsers, from the by-name index.
//! - [`stats`]: GetEventStats, from the statistics buckets and the index.
//! - [`cache`]: recent FilterUsers results, for the pages after the first.
//! - [`actions`]: delivery of fired actions (subscriptions, listing, retention).

pub(crate) mod actions;
pub(crate) mod cache;
mod scan;
pub(crate) mod segments;
pub(crate) mod stats;
pub(crate) mod timeline;
