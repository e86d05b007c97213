//! EventService: TrackEvent, TrackEvents, GetUserTimeline, DeleteUser.

use tonic::{Request, Response, Status};

use crate::api::{audit, blocking, caller, check_batch_size, convert, limited_status};
use crate::domain::model::Timestamp;
use crate::domain::rules::{self, page_size, PreparedEvent};
use crate::engine::Ingest;
use crate::error::{invalid, Error};
use crate::proto;
use crate::proto::event_service_server::EventService;
use crate::read::timeline::{self, TimelineQuery};
use crate::store::Store;

/// The EventService handlers.
pub(crate) struct EventApi {
    pub(crate) ingest: Ingest,
    pub(crate) store: Store,
    pub(crate) access: std::sync::Arc<crate::access::Access>,
}

impl EventApi {
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
        self.access
            .admit(&caller(&request), "events", 1)
            .map_err(limited_status)?;
        // A refused event goes the writer's way too: the engine counts every event's outcome
        // in one place (see `Ingest::track`).
        let prepared = match request.into_inner().event {
            None => Err(invalid(": required")),
            Some(event) => self.prepare(event, Timestamp::now()),
        };
        let mut results = self.ingest.track(vec![prepared]).await?;
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
        check_batch_size("events", events.len(), self.ingest.limits())?;
        if events.is_empty() {
            return Ok(Response::new(proto::TrackEventsResponse::default()));
        }
        self.access
            .admit(&caller, "events", events.len())
            .map_err(limited_status)?;
        let now = Timestamp::now();
        let prepared = events.into_iter().map(|e| self.prepare(e, now)).collect();
        let results = self.ingest.track(prepared).await?;
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
