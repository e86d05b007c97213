//! QueryService: FilterUsers and GetEventStats (the work is in `read::segments` and
//! `read::stats`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::api::{blocking, convert, PageToken};
use crate::domain::condition::{Aggregate, Place};
use crate::domain::model::Timestamp;
use crate::domain::rules::{self, page_size};
use crate::engine::Ingest;
use crate::error::{invalid, Error};
use crate::proto;
use crate::proto::query_service_server::QueryService;
use crate::read::cache::{ResultCache, ResultKey};
use crate::read::segments;
use crate::read::stats::{self, Granularity, StatsQuery, MAX_BUCKETS};
use crate::store::Store;

/// FilterUsers' default page size.
const DEFAULT_PAGE_SIZE: usize = 100;

/// Queries evaluated at once; more wait their turn (each may use two threads).
const CONCURRENT_QUERIES: usize = 4;

/// The QueryService handlers.
pub(crate) struct QueryApi {
    ingest: Ingest,
    store: Store,
    results: ResultCache,
    permits: Arc<Semaphore>,
}

/// The range and bucket size of a statistics request (GetEventStats, GetActionStats):
/// `from` and `to` required, `from` before `to`, at most [`MAX_BUCKETS`] buckets.
pub(crate) fn stats_range(
    from: &Option<prost_types::Timestamp>,
    to: &Option<prost_types::Timestamp>,
    granularity: i32,
) -> Result<(Timestamp, Timestamp, Granularity), Error> {
    let from = convert::opt_timestamp("from", from)?.ok_or_else(|| invalid("from: required"))?;
    let to = convert::opt_timestamp("to", to)?.ok_or_else(|| invalid("to: required"))?;
    if from >= to {
        return Err(invalid(format!("from: {from} must be before to: {to}")));
    }
    let granularity = match proto::Granularity::try_from(granularity) {
        Ok(proto::Granularity::Unspecified | proto::Granularity::Hour) => Granularity::Hour,
        Ok(proto::Granularity::Minute) => Granularity::Minute,
        Ok(proto::Granularity::Day) => Granularity::Day,
        Err(_) => {
            return Err(invalid(format!(
                "granularity: unknown granularity {}",
                granularity
            )))
        }
    };
    let (_, buckets) = stats::bucket_span(from, to, granularity);
    if buckets > MAX_BUCKETS {
        return Err(invalid(format!(
            "to: [from, to) spans {buckets} buckets of this granularity, at most {MAX_BUCKETS} allowed"
        )));
    }
    Ok((from, to, granularity))
}

/// The permits of the reads that scan much (FilterUsers, GetEventStats, GetActionStats):
/// shared by the services that run them.
pub(crate) fn query_permits() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(CONCURRENT_QUERIES))
}

/// Waits for one of `permits` (UNAVAILABLE once the server shuts down).
pub(crate) async fn permit(permits: &Arc<Semaphore>) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
    permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Unavailable("the server is shutting down".into()))
}

impl QueryApi {
    pub(crate) fn new(ingest: Ingest, store: Store, permits: Arc<Semaphore>) -> Self {
        Self {
            ingest,
            store,
            results: ResultCache::default(),
            permits,
        }
    }

    fn stats_query(&self, r: proto::GetEventStatsRequest) -> Result<StatsQuery, Error> {
        let event_name = rules::normalize_event_name("event_name", &r.event_name)?;
        let (from, to, granularity) = stats_range(&r.from, &r.to, r.granularity)?;
        let aggregate = convert::aggregate("aggregate", r.aggregate)?.unwrap_or(Aggregate::Count);
        let attribute = match aggregate {
            Aggregate::Count | Aggregate::DistinctUsers => String::new(),
            Aggregate::Sum | Aggregate::Min | Aggregate::Max | Aggregate::Avg => {
                rules::check_number_attribute(
                    "attribute",
                    aggregate,
                    &r.attribute,
                    &|name| self.ingest.attribute_type(name),
                    self.ingest.limits().max_attribute_name_chars,
                )?;
                r.attribute
            }
        };
        Ok(StatsQuery {
            event_name,
            from,
            to,
            granularity,
            aggregate,
            attribute,
        })
    }
}

/// A FilterUsers position: the reference time (pinned by the first page) and the last user.
fn encode_position(as_of: Timestamp, last_user: &str) -> String {
    format!("{}/{last_user}", as_of.as_nanos())
}

fn decode_position(position: &str) -> Result<(Timestamp, String), Error> {
    let bad = || invalid("page_token: not a token this request issued");
    let (nanos, user) = position.split_once('/').ok_or_else(bad)?;
    let nanos: i128 = nanos.parse().map_err(|_| bad())?;
    Ok((Timestamp::from_nanos(nanos), user.to_string()))
}

#[tonic::async_trait]
impl QueryService for QueryApi {
    async fn filter_users(
        &self,
        request: Request<proto::FilterUsersRequest>,
    ) -> Result<Response<proto::FilterUsersResponse>, Status> {
        let r = request.into_inner();
        let filter = r.filter.ok_or_else(|| invalid("filter: required"))?;
        let (raw, valid) = convert::validated_condition(&self.ingest, "filter", &filter, Place::Filter)?;
        let requested_as_of = convert::opt_timestamp("as_of", &r.as_of)?;
        // A token continues the listing of exactly this filter and as_of.
        let scope = format!("{raw:?}|{requested_as_of:?}");
        let (as_of, after) = match PageToken::decode(&r.page_token, &scope)? {
            Some(position) => {
                let (as_of, user) = decode_position(&position)?;
                (as_of, Some(user))
            }
            None => (requested_as_of.unwrap_or_else(Timestamp::now), None),
        };
        let size = page_size(r.page_size, DEFAULT_PAGE_SIZE);
        let key = ResultKey {
            scope: scope.clone(),
            as_of_nanos: as_of.as_nanos(),
            erasures: self.ingest.erasures(),
        };
        // Only a continuation reuses an evaluation; a first page is always evaluated afresh.
        let cached = after.as_ref().and_then(|_| self.results.get(&key));
        let users = match cached {
            Some(users) => users,
            None => {
                let _permit = self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::Unavailable("the server is shutting down".into()))?;
                let store = self.store.clone();
                let (users, stale) = blocking(move || {
                    let mut stale = BTreeSet::new();
                    let users = segments::filter_users(&store, &valid, as_of, &mut stale)?;
                    Ok((users, stale))
                })
                .await?;
                for name in stale {
                    self.ingest.request_rollup(name);
                }
                let users = Arc::new(users);
                self.results.put(key, users.clone());
                users
            }
        };
        let start = after.map_or(0, |a| users.partition_point(|u| u.as_str() <= a.as_str()));
        let page: Vec<String> = users.iter().skip(start).take(size).cloned().collect();
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < users.len() => {
                PageToken::encode(&encode_position(as_of, last), &scope)
            }
            _ => String::new(),
        };
        Ok(Response::new(proto::FilterUsersResponse {
            user_ids: page,
            next_page_token,
            total_count: users.len() as u64,
        }))
    }

    async fn get_event_stats(
        &self,
        request: Request<proto::GetEventStatsRequest>,
    ) -> Result<Response<proto::GetEventStatsResponse>, Status> {
        let q = self.stats_query(request.into_inner())?;
        let _permit = permit(&self.permits).await?;
        let store = self.store.clone();
        let stats = blocking(move || stats::event_stats(&store, &q)).await?;
        let (buckets, total) = convert::to_proto_stats(stats);
        Ok(Response::new(proto::GetEventStatsResponse { buckets, total }))
    }
}
