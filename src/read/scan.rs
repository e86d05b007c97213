//! Reading the by-name index over a time span: the blocks of the hours it touches, and their
//! rows inside it. Shared by segments and statistics.

use crate::domain::model::Timestamp;
use crate::error::Error;
use crate::store::columns::{hour_of, Block, Row};
use crate::store::Store;

/// A time range of events: `[from, to]`, or `[from, to)` unless `inclusive_to`.
#[derive(Clone, Copy)]
pub(super) struct Span {
    pub(super) from: Option<Timestamp>,
    pub(super) to: Timestamp,
    pub(super) inclusive_to: bool,
}

impl Span {
    pub(super) fn until(from: Option<Timestamp>, to: Timestamp) -> Self {
        Span {
            from,
            to,
            inclusive_to: false,
        }
    }

    /// The last instant inside the span.
    pub(super) fn last(self) -> Timestamp {
        if self.inclusive_to {
            self.to
        } else {
            Timestamp::from_nanos(self.to.as_nanos() - 1)
        }
    }

    /// The first and last hour the span touches.
    pub(super) fn hours(self) -> (i64, i64) {
        (self.from.map_or(i64::MIN, hour_of), hour_of(self.last()))
    }

    /// True when no instant is inside the span.
    pub(super) fn is_empty(self) -> bool {
        self.from.is_some_and(|f| {
            if self.inclusive_to {
                f > self.to
            } else {
                f >= self.to
            }
        })
    }

    pub(super) fn contains(self, at: Timestamp) -> bool {
        // Not through `last()`: an empty span [t, t) at the earliest time would contain t.
        let before_end = if self.inclusive_to {
            at <= self.to
        } else {
            at < self.to
        };
        before_end && self.from.is_none_or(|f| at >= f)
    }
}

/// The blocks of `name` for the hours `span` touches.
pub(super) fn blocks(store: &Store, name: &str, span: Span) -> Result<Vec<Block>, Error> {
    let (from_hour, to_hour) = span.hours();
    Ok(store.blocks(name, from_hour, to_hour)?)
}

/// Calls `f` for every row of `blocks` inside `span`, block by block (rows of one hour are not
/// in global time order); blocks entirely outside the span are skipped undecoded.
pub(super) fn each_row<'a>(
    blocks: &'a [Block],
    span: Span,
    f: &mut dyn FnMut(Row<'a>) -> Result<(), Error>,
) -> Result<(), Error> {
    let last = span.last();
    for block in blocks {
        for r in block.rows(span.from, last)? {
            if span.contains(r.occurred_at) {
                f(r)?;
            }
        }
    }
    Ok(())
}
