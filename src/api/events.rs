//! EventService: TrackEvent, TrackEvents, GetUserTimeline, DeleteUser.

use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::access::rate::Refusal;
use crate::access::Caller;
use crate::api::{audit, blocking, caller, convert};
use crate::domain::model::Timestamp;
use crate::domain::rules::{self, page_size, PreparedEvent};
use crate::engine::Ingest;
use crate::error::{invalid, Error};
use crate::proto;
use crate::proto::event_service_server::EventService;
use crate::read::timeline::{self, TimelineQuery};
use crate::store::Store;
use crate::telemetry::{self, Rejection};

/// The EventService handlers.
pub(crate) struct EventApi {
    pub(crate) ingest: Ingest,
    pub(crate) store: Store,
    pub(crate) access: std::sync::Arc<crate::access::Access>,
}

impl EventApi {
    /// Admits `events` events for `caller` under the ingest rate limit, whole or not at all.
    fn admit(&self, caller: &Caller, events: usize) -> Result<(), Status> {
        match self.access.ingest.admit(&caller.name, events) {
            Ok(()) => Ok(()),
            Err(refusal) => {
                let why = match refusal {
                    Refusal::RetryAfter(_) => Rejection::RateLimited,
                    // Answered INVALID_ARGUMENT: a batch limit, counted as one.
                    Refusal::LargerThanBurst(_) => Rejection::Limit,
                };
                telemetry::rejected(why, events as u64);
                Err(match refusal {
                    Refusal::RetryAfter(wait) => {
                        let wait = wait.max(std::time::Duration::from_millis(1));
                        Status::with_error_details(
                            Code::ResourceExhausted,
                            format!(
                                "rate limit: key {:?} may send {} events per second (ingest_rate_per_key); retry in {} ms",
                                caller.name,
                                self.access.ingest.rate(),
                                wait.as_millis().max(1)
                            ),
                            ErrorDetails::with_retry_info(Some(wait)),
                        )
                    }
                    Refusal::LargerThanBurst(burst) => Status::invalid_argument(format!(
                        "events: {events} events, more than the ingest burst of {burst} (ingest_burst) a call may ever send; split the batch"
                    )),
                })
            }
        }
    }

    /// Converts and checks one wire event on the caller's task (off the writer thread).
    fn prepare(&self, e: proto::Event, now: Timestamp) -> Result<PreparedEvent, Error> {
        let event = convert::new_event(e)?;
        rules::prepare(event, self.ingest.limits(), now)
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    async fn track_event(
        &self,
        request: Request<proto::TrackEventRequest>,
    ) -> Result<Response<proto::TrackEventResponse>, Status> {
        self.admit(&caller(&request), 1)?;
        let prepared = match request.into_inner().event {
            None => Err(invalid("event: required")),
            Some(event) => self
                .prepare(event, Timestamp::now())
                .map_err(|e| e.within("event")),
        }
        .inspect_err(|e| telemetry::rejected(Rejection::of(e), 1))?;
        let mut results = self.ingest.track(vec![Ok(prepared)]).await.inspect_err(|e| {
            telemetry::rejected(Rejection::of(e), 1);
        })?;
        let tracked = results
            .pop()
            .ok_or_else(|| Error::Internal("no result for a tracked event".into()))?
            .map_err(|e| e.within("event"))?;
        Ok(Response::new(proto::TrackEventResponse {
            event_id: tracked.event_id,
            sequence: tracked.sequence,
            duplicate: tracked.duplicate,
            actions_fired: tracked.actions_fired,
        }))
    }

    async fn track_events(
        &self,
        request: Request<proto::TrackEventsRequest>,
    ) -> Result<Response<proto::TrackEventsResponse>, Status> {
        let caller = caller(&request);
        let events = request.into_inner().events;
        let limit = self.ingest.limits().max_batch_events;
        if events.len() > limit {
            telemetry::rejected(Rejection::Limit, events.len() as u64);
            return Err(invalid(format!(
                "events: {} events, limit is {limit} (max_batch_events)",
                events.len()
            ))
            .into());
        }
        if events.is_empty() {
            return Ok(Response::new(proto::TrackEventsResponse::default()));
        }
        self.admit(&caller, events.len())?;
        let now = Timestamp::now();
        let n = events.len() as u64;
        let prepared = events.into_iter().map(|e| self.prepare(e, now)).collect();
        let results = self.ingest.track(prepared).await.inspect_err(|e| {
            telemetry::rejected(Rejection::of(e), n);
        })?;
        let results = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| match r {
                Ok(t) => proto::TrackEventResult {
                    event_id: t.event_id,
                    sequence: t.sequence,
                    duplicate: t.duplicate,
                    actions_fired: t.actions_fired,
                    accepted: true,
                    error: String::new(),
                },
                Err(e) => proto::TrackEventResult {
                    error: Status::from(e.within(&format!("events[{i}]")))
                        .message()
                        .to_string(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(proto::TrackEventsResponse { results }))
    }

    async fn get_user_timeline(
        &self,
        request: Request<proto::GetUserTimelineRequest>,
    ) -> Result<Response<proto::GetUserTimelineResponse>, Status> {
        let r = request.into_inner();
        rules::check_user_id("user_id", &r.user_id)?;
        let event_name = rules::optional_event_name("event_name", &r.event_name)?;
        let query = TimelineQuery {
            user_id: r.user_id,
            event_name,
            from: convert::opt_timestamp("from", &r.from)?,
            to: convert::opt_timestamp("to", &r.to)?,
            page_size: page_size(r.page_size, timeline::DEFAULT_PAGE_SIZE),
            page_token: r.page_token,
            oldest_first: r.oldest_first,
            max_bytes: self.ingest.limits().max_item_bytes(),
        };
        let store = self.store.clone();
        let page = blocking(move || timeline::read(&store, &query)).await?;
        // The read stopped the page before `max_bytes` (an upper bound of the encoded size).
        Ok(Response::new(proto::GetUserTimelineResponse {
            events: page.events.iter().map(convert::to_proto_event).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn delete_user(
        &self,
        request: Request<proto::DeleteUserRequest>,
    ) -> Result<Response<proto::DeleteUserResponse>, Status> {
        let caller = caller(&request);
        let user_id = request.into_inner().user_id;
        let target = format!("user {user_id:?}");
        let result = async {
            rules::check_user_id("user_id", &user_id)?;
            Ok::<_, Status>(self.ingest.delete_user(user_id).await?)
        }
        .await;
        audit(&caller, "engage.v1.EventService/DeleteUser", &target, &result);
        Ok(Response::new(proto::DeleteUserResponse {
            events_deleted: result?,
        }))
    }
}
