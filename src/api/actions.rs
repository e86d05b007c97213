//! ActionService: SubscribeActions, AckActions, ListFiredActions, and the operator reads
//! ListConsumers and GetActionStats (SPEC §11).

use std::pin::Pin;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::api::{convert, PageToken};
use crate::domain::rules::{self, page_size};
use crate::engine::Ingest;
use crate::error::invalid;
use crate::proto;
use crate::proto::action_service_server::ActionService;
use crate::read::actions::{ActionLog, Filter, StartFrom};

/// The ActionService handlers.
pub(crate) struct ActionApi {
    pub(crate) ingest: Ingest,
    pub(crate) log: ActionLog,
    pub(crate) store: crate::store::Store,
    /// Shared with QueryService: GetActionStats scans the log.
    pub(crate) permits: std::sync::Arc<tokio::sync::Semaphore>,
}

#[tonic::async_trait]
impl ActionService for ActionApi {
    type SubscribeActionsStream =
        Pin<Box<dyn Stream<Item = Result<proto::FiredAction, Status>> + Send + 'static>>;

    async fn subscribe_actions(
        &self,
        request: Request<proto::SubscribeActionsRequest>,
    ) -> Result<Response<Self::SubscribeActionsStream>, Status> {
        let r = request.into_inner();
        let consumer = if r.consumer.is_empty() {
            None
        } else {
            rules::check_consumer("consumer", &r.consumer)?;
            Some(r.consumer)
        };
        let start = match proto::StartFrom::try_from(r.start) {
            Ok(proto::StartFrom::Unspecified) => StartFrom::Unspecified,
            Ok(proto::StartFrom::Latest) => StartFrom::Latest,
            Ok(proto::StartFrom::Earliest) => StartFrom::Earliest,
            Ok(proto::StartFrom::Sequence) => StartFrom::After(r.after_sequence),
            Err(_) => return Err(invalid(format!("start: unknown start {}", r.start)).into()),
        };
        if r.after_sequence != 0 && start != StartFrom::After(r.after_sequence) {
            return Err(invalid("after_sequence: only allowed with start START_FROM_SEQUENCE").into());
        }
        let filter = Filter {
            trigger_ids: r.trigger_ids.into_iter().collect(),
            action_types: r.action_types.into_iter().collect(),
        };
        let rx = self.log.subscribe(consumer, start, filter).await?;
        let max = self.ingest.limits().max_item_bytes();
        let stream = ReceiverStream::new(rx).map(move |item| match item {
            Ok(delivered) => Ok(convert::to_proto_action(&delivered.action, max)),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack_actions(
        &self,
        request: Request<proto::AckActionsRequest>,
    ) -> Result<Response<proto::AckActionsResponse>, Status> {
        let r = request.into_inner();
        if r.consumer.is_empty() {
            return Err(invalid("consumer: required").into());
        }
        rules::check_consumer("consumer", &r.consumer)?;
        let acked_sequence = self.ingest.ack(r.consumer, r.up_to_sequence).await?;
        Ok(Response::new(proto::AckActionsResponse { acked_sequence }))
    }

    async fn list_fired_actions(
        &self,
        request: Request<proto::ListFiredActionsRequest>,
    ) -> Result<Response<proto::ListFiredActionsResponse>, Status> {
        let r = request.into_inner();
        if !r.user_id.is_empty() {
            rules::check_user_id("user_id", &r.user_id)?;
        }
        let size = page_size(r.page_size, 50);
        let scope = format!("actions|{}|{}", r.user_id, r.trigger_id);
        let before = match PageToken::decode(&r.page_token, &scope)? {
            Some(seq) => seq
                .parse::<u64>()
                .map_err(|_| invalid("page_token: not a token this request issued"))?,
            None => 0,
        };
        let log = self.log.clone();
        let (user, trigger) = (r.user_id, r.trigger_id);
        // One more than a page tells whether another page exists.
        let max = self.ingest.limits().max_item_bytes();
        let (mut page, cut) = crate::api::blocking(move || {
            let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
            log.list(
                some(&user).as_deref(),
                some(&trigger).as_deref(),
                before,
                size + 1,
                max,
            )
        })
        .await?;
        let more = cut || page.len() > size;
        page.truncate(size);
        // The read stopped the page before `max` (an upper bound of the encoded size).
        let actions: Vec<proto::FiredAction> =
            page.iter().map(|a| convert::to_proto_action(a, max)).collect();
        let next_page_token = match actions.last() {
            Some(last) if more => PageToken::encode(&last.sequence.to_string(), &scope),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListFiredActionsResponse {
            actions,
            next_page_token,
        }))
    }

    async fn list_consumers(
        &self,
        _request: Request<proto::ListConsumersRequest>,
    ) -> Result<Response<proto::ListConsumersResponse>, Status> {
        let store = self.store.clone();
        let records = crate::api::blocking(move || Ok(store.consumer_records()?)).await?;
        let head = *self.ingest.durable_actions().borrow();
        let consumers = records
            .into_iter()
            .map(|c| proto::Consumer {
                lag: head.saturating_sub(c.acked),
                acked_sequence: c.acked,
                created_at: c.created_at.map(convert::to_proto_ts),
                last_acked_at: c.last_acked_at.map(convert::to_proto_ts),
                name: c.name,
            })
            .collect();
        Ok(Response::new(proto::ListConsumersResponse { consumers }))
    }

    async fn get_action_stats(
        &self,
        request: Request<proto::GetActionStatsRequest>,
    ) -> Result<Response<proto::GetActionStatsResponse>, Status> {
        let r = request.into_inner();
        let (from, to, granularity) = crate::api::query::stats_range(&r.from, &r.to, r.granularity)?;
        let _permit = crate::api::query::permit(&self.permits).await?;
        let store = self.store.clone();
        let trigger = r.trigger_id;
        let stats = crate::api::blocking(move || {
            let trigger = (!trigger.is_empty()).then_some(trigger.as_str());
            crate::read::stats::action_stats(&store, trigger, from, to, granularity)
        })
        .await?;
        let (buckets, total) = convert::to_proto_stats(stats);
        Ok(Response::new(proto::GetActionStatsResponse { buckets, total }))
    }
}
