//! Recent FilterUsers results, so that the pages after the first are served without
//! evaluating the filter again. `as_of` is pinned by the first page, so a cached answer is the
//! same but for events that arrived since with an earlier `occurred_at`; first pages are always
//! evaluated afresh. Every entry is tagged with the number of erasures the engine had completed
//! when its key was taken: after an erasure no earlier entry is used, so an erased user never
//! comes back from here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Results kept, and for how long.
const CACHED_RESULTS: usize = 8;
const CACHE_FOR: Duration = Duration::from_secs(60);

/// What identifies a cached evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResultKey {
    /// The filter and requested `as_of`, as the page token binds them.
    pub(crate) scope: String,
    /// The pinned reference time, in nanoseconds.
    pub(crate) as_of_nanos: i128,
    /// Erasures completed when the key was taken.
    pub(crate) erasures: u64,
}

struct Entry {
    key: ResultKey,
    at: Instant,
    users: Arc<Vec<String>>,
}

/// The cache (see the module documentation).
#[derive(Default)]
pub(crate) struct ResultCache {
    entries: Mutex<VecDeque<Entry>>,
}

impl ResultCache {
    /// The users of a cached evaluation, if still fresh.
    pub(crate) fn get(&self, key: &ResultKey) -> Option<Arc<Vec<String>>> {
        let mut entries = self.entries.lock();
        entries.retain(|e| e.at.elapsed() < CACHE_FOR);
        entries.iter().find(|e| &e.key == key).map(|e| e.users.clone())
    }

    /// Remembers an evaluation, forgetting the oldest when full.
    pub(crate) fn put(&self, key: ResultKey, users: Arc<Vec<String>>) {
        let mut entries = self.entries.lock();
        if entries.len() >= CACHED_RESULTS {
            entries.pop_front();
        }
        entries.push_back(Entry {
            key,
            at: Instant::now(),
            users,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(erasures: u64) -> ResultKey {
        ResultKey {
            scope: "f".into(),
            as_of_nanos: 5,
            erasures,
        }
    }

    #[test]
    fn an_entry_from_before_an_erasure_is_never_used() {
        let cache = ResultCache::default();
        cache.put(key(0), Arc::new(vec!["ann".into()]));
        assert_eq!(cache.get(&key(0)).as_deref(), Some(&vec!["ann".to_string()]));
        assert!(cache.get(&key(1)).is_none());
    }

    #[test]
    fn the_oldest_entry_goes_first() {
        let cache = ResultCache::default();
        for i in 0..=CACHED_RESULTS as u64 {
            cache.put(key(i), Arc::new(Vec::new()));
        }
        assert!(cache.get(&key(0)).is_none());
        assert!(cache.get(&key(CACHED_RESULTS as u64)).is_some());
    }
}
