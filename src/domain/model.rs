//! Domain types of engage: what the service stores and answers, independent of gRPC and sled.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::bytes::{from_sortable_i64, sortable_i64};

/// A point in time with nanosecond precision (seconds since the Unix epoch, UTC).
///
/// Ordered chronologically; the range is that of `google.protobuf.Timestamp`
/// (0001-01-01 to 9999-12-31), checked by [`Timestamp::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// Seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the protobuf Timestamp range.
const MIN_SECS: i64 = -62_135_596_800;
const MAX_SECS: i64 = 253_402_300_799;

impl Timestamp {
    /// The earliest representable time, 0001-01-01T00:00:00Z.
    pub const MIN: Timestamp = Timestamp {
        secs: MIN_SECS,
        nanos: 0,
    };

    /// A valid timestamp, or `None` when out of the protobuf range or `nanos` is not below 1e9.
    pub fn new(secs: i64, nanos: i32) -> Option<Self> {
        if !(MIN_SECS..=MAX_SECS).contains(&secs) || !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        Some(Self {
            secs,
            nanos: nanos as u32,
        })
    }

    /// The current time.
    pub fn now() -> Self {
        let now = jiff::Timestamp::now();
        Self {
            secs: now.as_second(),
            nanos: now.subsec_nanosecond().max(0) as u32,
        }
    }

    /// Nanoseconds since the epoch (fits: the range is ±2^68 ns at most, i128 holds it).
    pub fn as_nanos(self) -> i128 {
        self.secs as i128 * 1_000_000_000 + self.nanos as i128
    }

    /// The timestamp `nanos` nanoseconds since the epoch, clamped to the valid range.
    pub fn from_nanos(nanos: i128) -> Self {
        let secs = nanos.div_euclid(1_000_000_000);
        let sub = nanos.rem_euclid(1_000_000_000) as u32;
        if secs < MIN_SECS as i128 {
            Self {
                secs: MIN_SECS,
                nanos: 0,
            }
        } else if secs > MAX_SECS as i128 {
            Self {
                secs: MAX_SECS,
                nanos: 999_999_999,
            }
        } else {
            Self {
                secs: secs as i64,
                nanos: sub,
            }
        }
    }

    /// This time plus `secs` seconds (clamped to the valid range).
    pub fn plus_secs(self, secs: i64) -> Self {
        Self::from_nanos(self.as_nanos() + secs as i128 * 1_000_000_000)
    }

    /// 12 bytes whose byte order is time order: seconds (order-preserving, see
    /// [`sortable_i64`]) then nanoseconds, both big-endian.
    pub fn sort_key(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&sortable_i64(self.secs));
        out[8..].copy_from_slice(&self.nanos.to_be_bytes());
        out
    }

    /// The inverse of [`Timestamp::sort_key`] (no range check: the bytes are our own).
    pub fn from_sort_key(bytes: [u8; 12]) -> Self {
        let mut secs = [0u8; 8];
        secs.copy_from_slice(&bytes[..8]);
        let mut nanos = [0u8; 4];
        nanos.copy_from_slice(&bytes[8..]);
        Self {
            secs: from_sortable_i64(secs),
            nanos: u32::from_be_bytes(nanos),
        }
    }

    fn to_jiff(self) -> Option<jiff::Timestamp> {
        jiff::Timestamp::new(self.secs, self.nanos as i32).ok()
    }

    /// Parses RFC 3339 (`2026-01-31T10:00:00+01:00`) or a bare date (`2026-01-31`, midnight UTC).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if !rfc3339_fields_in_range(text) {
            return None;
        }
        let ts = if let Ok(ts) = text.parse::<jiff::Timestamp>() {
            ts
        } else {
            let date = text.parse::<jiff::civil::Date>().ok()?;
            if text.len() != 10 {
                return None;
            }
            date.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp()
        };
        Self::new(ts.as_second(), ts.subsec_nanosecond())
    }
}

/// Checks what the parser is lenient about: RFC 3339 offsets are at most 23:59 either way, and a
/// second is 00-59 (a leap second `:60` cannot be represented, and is refused rather than moved).
fn rfc3339_fields_in_range(text: &str) -> bool {
    let b = text.as_bytes();
    // YYYY-MM-DDTHH:MM:SS...
    if b.len() >= 19 && matches!(b[10], b'T' | b't' | b' ') && b[16] == b':' && &b[17..19] >= b"60".as_slice()
    {
        return false;
    }
    // ...+HH:MM or ...+HHMM at the end.
    let offset_hours = |at: usize| {
        b.get(at).is_some_and(|c| matches!(c, b'+' | b'-'))
            && b.get(at + 1..at + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_digit) && h > b"23".as_slice())
    };
    let with_colon = b.len() >= 6 && b[b.len() - 3] == b':' && offset_hours(b.len() - 6);
    let without =
        b.len() >= 5 && b[b.len() - 4..].iter().all(u8::is_ascii_digit) && offset_hours(b.len() - 5);
    b.len() < 19 || !(with_colon || without)
}

/// RFC 3339 in UTC, with a fraction only when the time has one (`2026-01-31T09:00:00Z`).
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_jiff() {
            Some(ts) => write!(f, "{ts}"),
            None => write!(f, "{}s", self.secs),
        }
    }
}

/// The type of an attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum AttributeType {
    String,
    Number,
    Date,
    Boolean,
    Json,
}

impl AttributeType {
    /// The name users see, as in the proto enum without its prefix.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AttributeType::String => "STRING",
            AttributeType::Number => "NUMBER",
            AttributeType::Date => "DATE",
            AttributeType::Boolean => "BOOLEAN",
            AttributeType::Json => "JSON",
        }
    }
}

impl fmt::Display for AttributeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attribute value: as a client sent it, or, once coerced, as stored for its type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    String(String),
    Number(f64),
    Bool(bool),
    Date(Timestamp),
    /// Compact JSON text once stored; any JSON text on input.
    Json(String),
}

/// A stored event: one thing a user did, with its typed attributes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub user_id: String,
    pub name: String,
    pub occurred_at: Timestamp,
    pub received_at: Timestamp,
    pub sequence: u64,
    pub attributes: BTreeMap<String, Value>,
}

impl Event {
    /// An upper bound of the event's encoded size (on the wire or on disk): its strings, each
    /// attribute's name and value, and the framing of every field.
    pub fn approx_size(&self) -> usize {
        approx_event_size(&self.event_id, &self.user_id, &self.name, &self.attributes)
    }
}

/// [`Event::approx_size`] of an event's parts.
pub(crate) fn approx_event_size(
    event_id: &str,
    user_id: &str,
    name: &str,
    attributes: &BTreeMap<String, Value>,
) -> usize {
    let values: usize = attributes
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    Value::String(s) | Value::Json(s) => s.len(),
                    _ => 16,
                }
                + 24
        })
        .sum();
    event_id.len().max(26) + user_id.len() + name.len() + 128 + values
}

/// An event as a client submits it, before validation and coercion.
#[derive(Clone, Debug, PartialEq, Default)]
pub(crate) struct NewEvent {
    /// Empty means "generate one".
    pub event_id: String,
    pub user_id: String,
    pub name: String,
    pub occurred_at: Option<Timestamp>,
    pub attributes: Vec<(String, Value)>,
}

/// A global attribute definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AttributeDefinition {
    pub name: String,
    pub attribute_type: AttributeType,
    pub description: String,
    pub auto_created: bool,
    pub created_at: Timestamp,
}

/// What the server knows of one event name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventNameStats {
    pub count: u64,
    /// Earliest `occurred_at` seen.
    pub first_seen: Timestamp,
    /// Latest `occurred_at` seen.
    pub last_seen: Timestamp,
}

impl EventNameStats {
    /// Stats of a name seen once, at `at`.
    pub(crate) fn first(at: Timestamp) -> Self {
        Self {
            count: 1,
            first_seen: at,
            last_seen: at,
        }
    }

    /// Counts one more event at `at`.
    pub(crate) fn record(&mut self, at: Timestamp) {
        self.count += 1;
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
    }
}

/// What a trigger fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ActionTemplate {
    pub action_type: String,
    pub payload_template: String,
}

/// A trigger rule as stored: the condition as submitted (to answer reads) and as validated (to
/// evaluate; validation coerced its comparison values with the types known at submission).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Trigger {
    pub id: String,
    pub name: String,
    pub paused: bool,
    pub event_name: String,
    pub raw_condition: Option<crate::domain::condition::RawCondition>,
    pub condition: Option<crate::domain::condition::Condition>,
    pub action: ActionTemplate,
    /// Nanoseconds; `None` when unset.
    pub cooldown_nanos: Option<i128>,
    pub once_per_user: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Fire this long after the triggering event (nanoseconds).
    pub delay_nanos: Option<i128>,
    /// Fire `within` after the triggering event unless the user tracks the named event.
    pub unless: Option<AbsenceCheck>,
    /// The destination every action of the trigger is delivered to (empty: none). Last, so a
    /// trigger stored before destinations existed decodes as the older form (`store::migrate`).
    pub destination_id: String,
}

impl Trigger {
    /// How long after the triggering event's `occurred_at` a timed trigger fires: the longer of
    /// `delay` and `unless.within` (an absence is known only once its window has closed).
    /// `None` for a trigger that fires at once.
    pub(crate) fn timer_nanos(&self) -> Option<i128> {
        match (self.delay_nanos, &self.unless) {
            (None, None) => None,
            (d, u) => Some(d.unwrap_or(0).max(u.as_ref().map_or(0, |u| u.within_nanos))),
        }
    }
}

/// What cancels a pending firing (the wire's AbsenceCheck), validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AbsenceCheck {
    pub event_name: String,
    pub raw_condition: Option<crate::domain::condition::RawCondition>,
    pub condition: Option<crate::domain::condition::Condition>,
    pub within_nanos: i128,
}

/// A pending firing of a timed trigger for one user: due at `due`, rendered from `event`.
/// `generation` is the trigger's `updated_at` when armed: a timer of an older generation was
/// cancelled by the change and never fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Timer {
    pub trigger_id: String,
    pub due: Timestamp,
    pub generation: Timestamp,
    pub event: Event,
}

/// What the (trigger, user) index says of a pending timer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PendingTimer {
    pub due: Timestamp,
    /// The arming event's `occurred_at`.
    pub armed_at: Timestamp,
    pub generation: Timestamp,
}

/// The durable record of a fired action. After the user's erasure `user_id`, `payload` and
/// `event` are empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FiredAction {
    pub sequence: u64,
    pub action_id: String,
    pub trigger_id: String,
    pub trigger_name: String,
    pub action_type: String,
    pub user_id: String,
    pub event_id: String,
    pub fired_at: Timestamp,
    pub payload: String,
    pub event: Option<Event>,
    /// The destination the action is delivered to, as its trigger said when it fired (empty:
    /// none). Kept by the action log's chunks, not by this record's own encoding (the layout
    /// of the log before chunks stored this record).
    #[serde(skip)]
    pub destination_id: String,
}

impl FiredAction {
    /// An upper bound of the action's encoded size (on the wire or on disk), and about what it
    /// holds in memory: its strings, its event's, and the framing of every field.
    pub(crate) fn approx_size(&self) -> usize {
        self.action_id.len()
            + self.trigger_id.len()
            + self.trigger_name.len()
            + self.action_type.len()
            + self.user_id.len()
            + self.event_id.len()
            + self.payload.len()
            + self.event.as_ref().map_or(0, Event::approx_size)
            + 128
    }
}

/// Running aggregates of one NUMBER attribute.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct NumberAggregate {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl NumberAggregate {
    /// Adds one number.
    pub(crate) fn add(&mut self, n: f64) {
        if self.count == 0 {
            self.min = n;
            self.max = n;
        } else {
            self.min = self.min.min(n);
            self.max = self.max.max(n);
        }
        self.count += 1;
        self.sum += n;
    }

    /// Adds every number of `other`.
    pub(crate) fn merge(&mut self, other: &NumberAggregate) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// Everything-so-far aggregates of one user's events of one name, maintained on ingest for the
/// names that all-history trigger conditions use, so that evaluating one costs one read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct UserNameAggregate {
    /// The maintenance epoch of the name it was built in; a record from an older epoch (the name
    /// stopped being maintained for a while) is stale and rebuilt from the events.
    pub epoch: u64,
    pub count: u64,
    /// Latest `occurred_at` included: the aggregate answers "all history up to T" only when
    /// `last_occurred_at <= T`.
    pub last_occurred_at: Option<Timestamp>,
    pub numbers: BTreeMap<String, NumberAggregate>,
}

impl UserNameAggregate {
    /// Adds one event.
    pub(crate) fn add(&mut self, event: &Event) {
        self.count += 1;
        self.last_occurred_at = Some(
            self.last_occurred_at
                .map_or(event.occurred_at, |t| t.max(event.occurred_at)),
        );
        for (name, value) in &event.attributes {
            if let Value::Number(n) = value {
                self.numbers.entry(name.clone()).or_default().add(*n);
            }
        }
    }
}

/// Per trigger and user: how often and when it last fired (for cooldown and once_per_user).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct FiringState {
    pub firings: u64,
    pub last_fired_at: Option<Timestamp>,
}
