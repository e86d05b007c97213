//! User timelines: one user's events by `occurred_at` (ties by `sequence`), paged with opaque
//! tokens. A read touches only the requested user's keys (see `store`): with an `event_name`
//! filter exactly one range, without it one range per name the user has, merged.

use std::ops::Bound;

use crate::error::{invalid, Error};
use crate::model::{Event, Timestamp};
use crate::store::{Store, TimelinePos};

/// Default and largest page sizes (SPEC §3).
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// A validated timeline request.
#[derive(Clone, Debug, Default)]
pub struct TimelineQuery {
    pub user_id: String,
    /// Normalised event name, or empty for all.
    pub event_name: String,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub page_size: usize,
    pub page_token: String,
    pub oldest_first: bool,
}

/// One page of a timeline.
#[derive(Debug, Default)]
pub struct TimelinePage {
    pub events: Vec<Event>,
    pub next_page_token: String,
}

const TOKEN_VERSION: u8 = 1;

/// FNV-1a: binds a page token to the request it continues, so a token replayed against another
/// user or filter is refused instead of silently skipping events.
fn fingerprint(q: &TimelineQuery) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    feed(q.user_id.as_bytes());
    feed(q.event_name.as_bytes());
    feed(&[q.oldest_first as u8]);
    for ts in [q.from, q.to] {
        match ts {
            Some(t) => feed(&crate::store::encode_ts(t)),
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
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(q: &TimelineQuery) -> Result<Option<TimelinePos>, Error> {
    if q.page_token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token: not a token this request issued");
    let text = q.page_token.as_bytes();
    if text.len() != 58 {
        return Err(bad());
    }
    let mut bytes = Vec::with_capacity(29);
    for pair in text.chunks(2) {
        let s = std::str::from_utf8(pair).map_err(|_| bad())?;
        bytes.push(u8::from_str_radix(s, 16).map_err(|_| bad())?);
    }
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
pub fn read(store: &Store, q: &TimelineQuery) -> Result<TimelinePage, Error> {
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
    let name = (!q.event_name.is_empty()).then_some(q.event_name.as_str());
    for event in store.timeline(&q.user_id, name, lower, upper, !q.oldest_first)? {
        let event = event?;
        if events.len() == size {
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
