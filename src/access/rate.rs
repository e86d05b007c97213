//! Per-key ingest rate limits (SPEC §6): events per second per key with a burst, by the GCRA of
//! `governor`. A call is admitted whole or refused whole: a batch of n events takes n cells at
//! once or none.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// The ingest limits of a server (none when the rate is 0).
pub(crate) struct IngestLimits {
    /// One state per key name (the names come from the keys file, so their number is bounded).
    limiter: Option<RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>>,
    rate: u32,
    burst: u32,
}

/// Why a call was refused.
#[derive(Debug, PartialEq)]
pub(crate) enum Refusal {
    /// Over the rate: admitted after this wait.
    RetryAfter(Duration),
    /// More events than the burst: never admitted whole.
    LargerThanBurst(u32),
}

impl IngestLimits {
    /// `rate` events per second per key (0: no limit), `burst` events at once (0: one second's
    /// worth).
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        let Some(per_second) = NonZeroU32::new(rate) else {
            return Self {
                limiter: None,
                rate: 0,
                burst: 0,
            };
        };
        let burst = NonZeroU32::new(burst).unwrap_or(per_second);
        Self {
            limiter: Some(RateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            )),
            rate,
            burst: burst.get(),
        }
    }

    /// Admits `events` events for the key named `key`, or says why not.
    pub(crate) fn admit(&self, key: &str, events: usize) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let n = u32::try_from(events.max(1)).unwrap_or(u32::MAX);
        let Some(cells) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match limiter.check_key_n(&key.to_string(), cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::RetryAfter(
                not_until.wait_time_from(limiter.clock().now()),
            )),
            Err(_) => Err(Refusal::LargerThanBurst(self.burst)),
        }
    }

    /// The rate, events per second per key (0: none).
    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_admitted_whole_or_refused_whole() {
        let limits = IngestLimits::new(10, 10);
        assert_eq!(limits.admit("a", 8), Ok(()));
        // 2 cells left: a batch of 3 takes none of them.
        assert!(matches!(limits.admit("a", 3), Err(Refusal::RetryAfter(_))));
        assert_eq!(limits.admit("a", 2), Ok(()));
        assert_eq!(limits.admit("a", 11), Err(Refusal::LargerThanBurst(10)));
        // Another key has its own budget.
        assert_eq!(limits.admit("b", 10), Ok(()));
        assert_eq!(IngestLimits::new(0, 0).admit("a", 1_000_000), Ok(()));
    }
}
