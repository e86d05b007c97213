//! User timelines: one user's events by `occurred_at` (ties by `sequence`), paged with opaque
//! tokens. A read touches only the requested user's keys (see `store::events`): with an `event_name`
//! filter exactly one range, without it one range per name the user has, merged.

use std::ops::Bound;

use crate::domain::bytes::{fnv1a_from, hex, unhex, FNV_OFFSET};
use crate::domain::model::{Event, Timestamp};
use crate::domain::rules::MAX_PAGE_SIZE;
use crate::error::{invalid, Error};
use crate::store::{Store, TimelinePos};

/// The page size when a request asks for none.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;

/// A validated timeline request.
#[derive(Clone, Debug, Default)]
pub(crate) struct TimelineQuery {
    pub(crate) user_id: String,
    /// Normalised event name, or empty for all.
    pub(crate) event_name: String,
    pub(crate) from: Option<Timestamp>,
    pub(crate) to: Option<Timestamp>,
    pub(crate) page_size: usize,
    pub(crate) page_token: String,
    pub(crate) oldest_first: bool,
    /// Stop the page before its events hold more than this many bytes (0: no limit).
    pub(crate) max_bytes: usize,
}

/// One page of a timeline.
#[derive(Debug, Default)]
pub(crate) struct TimelinePage {
    pub(crate) events: Vec<Event>,
    pub(crate) next_page_token: String,
}

const TOKEN_VERSION: u8 = 1;

/// FNV-1a: binds a page token to the request it continues, so a token replayed against another
/// user or filter is refused instead of silently skipping events.
fn fingerprint(q: &TimelineQuery) -> u64 {
    let mut h = FNV_OFFSET;
    // Each part ends with 0xff, which no part's own bytes can imitate at a part boundary.
    let mut feed = |bytes: &[u8]| h = fnv1a_from(fnv1a_from(h, bytes), &[0xff]);
    feed(q.user_id.as_bytes());
    feed(q.event_name.as_bytes());
    feed(&[q.oldest_first as u8]);
    for ts in [q.from, q.to] {
        match ts {
            Some(t) => feed(&t.sort_key()),
            None => feed(b"-"),
        }
    }
    h
}

fn encode_token(q: &TimelineQuery, pos: TimelinePos) -> String {
    let mut bytes = Vec::with_capacity(29);
    bytes.push(TOKEN_VERSION);
    bytes.extend_from_slice(&pos.0.secs.to_be_bytes());
    bytes.extend_from_slice(&pos.0.nanos.to_be_bytes());
    bytes.extend_from_slice(&pos.1.to_be_bytes());
    bytes.extend_from_slice(&fingerprint(q).to_be_bytes());
    hex(&bytes)
}

fn decode_token(q: &TimelineQuery) -> Result<Option<TimelinePos>, Error> {
    if q.page_token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token: not a token this request issued");
    let bytes = unhex(&q.page_token).filter(|b| b.len() == 29).ok_or_else(bad)?;
    let num = |range: std::ops::Range<usize>| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[8 - range.len()..].copy_from_slice(&bytes[range]);
        a
    };
    if bytes[0] != TOKEN_VERSION || u64::from_be_bytes(num(21..29)) != fingerprint(q) {
        return Err(bad());
    }
    let secs = i64::from_be_bytes(num(1..9));
    let nanos = u32::from_be_bytes([bytes[9], bytes[10], bytes[11], bytes[12]]);
    let ts = Timestamp::new(secs, nanos as i32).ok_or_else(bad)?;
    Ok(Some((ts, u64::from_be_bytes(num(13..21)))))
}

/// Reads one page of a user's timeline: `page_size` + 1 events read (the extra one tells whether
/// another page exists), plus, without a name filter, a scan of the user's event names.
pub(crate) fn read(store: &Store, q: &TimelineQuery) -> Result<TimelinePage, Error> {
    if let (Some(from), Some(to)) = (q.from, q.to) {
        if from >= to {
            return Err(invalid(format!("from: {from} must be before to: {to}")));
        }
    }
    let cursor = decode_token(q)?;
    // `(ts, 0)` sorts before every event at `ts`: sequences start at 1.
    let mut lower = q.from.map_or(Bound::Unbounded, |t| Bound::Included((t, 0)));
    let mut upper = q.to.map_or(Bound::Unbounded, |t| Bound::Excluded((t, 0)));
    if let Some(pos) = cursor {
        if q.oldest_first {
            lower = Bound::Excluded(pos);
        } else {
            upper = Bound::Excluded(pos);
        }
    }
    if range_is_empty(&lower, &upper) {
        return Ok(TimelinePage::default());
    }
    let size = q.page_size.clamp(1, MAX_PAGE_SIZE);
    let mut events = Vec::with_capacity(size.min(64));
    let mut more = false;
    let mut bytes = 0;
    let name = (!q.event_name.is_empty()).then_some(q.event_name.as_str());
    for event in store.timeline(&q.user_id, name, lower, upper, !q.oldest_first)? {
        let event = event?;
        bytes += event.approx_size();
        let over_budget = q.max_bytes > 0 && bytes > q.max_bytes && !events.is_empty();
        if events.len() == size || over_budget {
            more = true;
            break;
        }
        events.push(event);
    }
    let next_page_token = match (more, events.last()) {
        (true, Some(last)) => encode_token(q, (last.occurred_at, last.sequence)),
        _ => String::new(),
    };
    Ok(TimelinePage {
        events,
        next_page_token,
    })
}

fn range_is_empty(lower: &Bound<TimelinePos>, upper: &Bound<TimelinePos>) -> bool {
    match (lower, upper) {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
        | (Bound::Excluded(a), Bound::Included(b)) => a >= b,
        _ => false,
    }
}
