//! DestinationService: destinations (webhooks engage delivers itself), their dead letters and
//! redrive (SPEC §9).

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};

use crate::api::{audit, caller, convert, fitting, PageToken};
use crate::deliver::Deliveries;
use crate::domain::destination::{self as rules, Destination, Health};
use crate::domain::model::Timestamp;
use crate::domain::rules::page_size;
use crate::engine::Ingest;
use crate::error::{invalid, Error};
use crate::proto;
use crate::proto::destination_service_server::DestinationService;
use crate::store::Store;

/// The DestinationService handlers.
pub(crate) struct DestinationApi {
    pub(crate) ingest: Ingest,
    pub(crate) store: Store,
    pub(crate) deliveries: Deliveries,
}

/// A duration setting in whole milliseconds: unset means `default`, else within (0, `max`].
fn millis(f: &str, d: Option<&prost_types::Duration>, default: u64, max: u64) -> Result<u64, Error> {
    let Some(d) = d else {
        return Ok(default);
    };
    let nanos = convert::positive_duration(f, d)?;
    let ms = (nanos / 1_000_000).max(1);
    if ms > max as i128 {
        return Err(invalid(format!("{f}: at most {} ms allowed", max)));
    }
    Ok(ms as u64)
}

impl DestinationApi {
    /// Validates a submitted destination into its stored form; `f` is `destination`.
    async fn validate(&self, d: proto::Destination) -> Result<Destination, Error> {
        let f = "destination";
        rules::check_url(&format!("{f}.url"), &d.url)?;
        self.deliveries
            .check_host(&d.url)
            .await
            .map_err(|e| invalid(format!("{f}.url: {e}")))?;
        let headers: BTreeMap<String, String> = d
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        rules::check_settings(f, &d.name, &headers, &d.signing_secret)?;
        let timeout_ms = millis(
            &format!("{f}.timeout"),
            d.timeout.as_ref(),
            rules::DEFAULT_TIMEOUT_MS,
            rules::MAX_TIMEOUT_MS,
        )?;
        let max_retry_age_secs = millis(
            &format!("{f}.max_retry_age"),
            d.max_retry_age.as_ref(),
            rules::DEFAULT_MAX_RETRY_AGE_SECS * 1000,
            rules::MAX_RETRY_AGE_SECS * 1000,
        )?
        .div_ceil(1000);
        let epoch = Timestamp { secs: 0, nanos: 0 };
        Ok(Destination {
            id: d.id,
            name: d.name,
            url: d.url,
            headers,
            signing_secret: d.signing_secret,
            timeout_ms,
            max_attempts: rules::setting_or_default(
                &format!("{f}.max_attempts"),
                d.max_attempts,
                rules::DEFAULT_MAX_ATTEMPTS,
                rules::MAX_ATTEMPTS,
            )?,
            max_retry_age_secs,
            concurrency: rules::setting_or_default(
                &format!("{f}.concurrency"),
                d.concurrency,
                rules::DEFAULT_CONCURRENCY,
                rules::MAX_CONCURRENCY,
            )?,
            paused: d.paused,
            created_at: epoch,
            updated_at: epoch,
        })
    }

    /// A destination on the wire: no secret, `signed`, and the engine's health.
    fn to_proto(&self, d: &Destination) -> proto::Destination {
        let health = match self.deliveries.health(&d.id) {
            Health::Healthy => proto::DestinationHealth::Healthy,
            Health::Failing => proto::DestinationHealth::Failing,
            Health::Suspended => proto::DestinationHealth::Suspended,
        };
        proto::Destination {
            id: d.id.clone(),
            name: d.name.clone(),
            url: d.url.clone(),
            headers: d.headers.clone().into_iter().collect(),
            signing_secret: String::new(),
            timeout: Some(convert::to_proto_duration(d.timeout_ms as i128 * 1_000_000)),
            max_attempts: d.max_attempts,
            max_retry_age: Some(convert::to_proto_duration(
                d.max_retry_age_secs as i128 * 1_000_000_000,
            )),
            concurrency: d.concurrency,
            paused: d.paused,
            created_at: Some(convert::to_proto_ts(d.created_at)),
            updated_at: Some(convert::to_proto_ts(d.updated_at)),
            health: health as i32,
            signed: !d.signing_secret.is_empty(),
        }
    }

    fn known(&self, field: &str, id: &str) -> Result<(), Error> {
        if id.is_empty() {
            return Err(invalid(format!("{field}: required")));
        }
        if !self.ingest.destinations().contains_key(id) {
            return Err(Error::NotFound(format!("{field}: no destination {id:?}")));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl DestinationService for DestinationApi {
    async fn create_destination(
        &self,
        request: Request<proto::CreateDestinationRequest>,
    ) -> Result<Response<proto::Destination>, Status> {
        let caller = caller(&request);
        let d = request.into_inner().destination;
        let name = d.as_ref().map(|d| d.name.clone()).unwrap_or_default();
        let result = async {
            let d = self
                .validate(d.ok_or_else(|| invalid("destination: required"))?)
                .await?;
            Ok::<_, Status>(self.ingest.create_destination(d).await?)
        }
        .await;
        let target = match &result {
            Ok(d) => format!("destination {} ({:?})", d.id, d.name),
            Err(_) => format!("destination named {name:?}"),
        };
        audit(
            &caller,
            "engage.v1.DestinationService/CreateDestination",
            &target,
            &result,
        );
        Ok(Response::new(self.to_proto(&result?)))
    }

    async fn get_destination(
        &self,
        request: Request<proto::GetDestinationRequest>,
    ) -> Result<Response<proto::Destination>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(invalid("id: required").into());
        }
        let all = self.ingest.destinations();
        let d = all
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("id: no destination {id:?}")))?;
        Ok(Response::new(self.to_proto(d)))
    }

    async fn list_destinations(
        &self,
        request: Request<proto::ListDestinationsRequest>,
    ) -> Result<Response<proto::ListDestinationsResponse>, Status> {
        let r = request.into_inner();
        let size = page_size(r.page_size, 50);
        let scope = "destinations";
        let after = PageToken::decode(&r.page_token, scope)?;
        let all = self.ingest.destinations();
        let range = match &after {
            Some(id) => all.range::<String, _>((std::ops::Bound::Excluded(id), std::ops::Bound::Unbounded)),
            None => all.range::<String, _>(..),
        };
        let mut destinations: Vec<proto::Destination> =
            range.take(size + 1).map(|(_, d)| self.to_proto(d)).collect();
        let more = destinations.len() > size;
        destinations.truncate(size);
        let fit = fitting(&destinations, self.ingest.limits().max_item_bytes());
        let more = more || fit < destinations.len();
        destinations.truncate(fit);
        let next_page_token = match destinations.last() {
            Some(last) if more => PageToken::encode(&last.id, scope),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListDestinationsResponse {
            destinations,
            next_page_token,
        }))
    }

    async fn update_destination(
        &self,
        request: Request<proto::UpdateDestinationRequest>,
    ) -> Result<Response<proto::Destination>, Status> {
        let caller = caller(&request);
        let d = request.into_inner().destination;
        let id = d.as_ref().map(|d| d.id.clone()).unwrap_or_default();
        let result = async {
            let d = d.ok_or_else(|| invalid("destination: required"))?;
            if d.id.is_empty() {
                return Err(invalid("destination.id: required").into());
            }
            let d = self.validate(d).await?;
            Ok::<_, Status>(self.ingest.update_destination(d).await?)
        }
        .await;
        audit(
            &caller,
            "engage.v1.DestinationService/UpdateDestination",
            &format!("destination {id:?}"),
            &result,
        );
        Ok(Response::new(self.to_proto(&result?)))
    }

    async fn delete_destination(
        &self,
        request: Request<proto::DeleteDestinationRequest>,
    ) -> Result<Response<proto::DeleteDestinationResponse>, Status> {
        let caller = caller(&request);
        let id = request.into_inner().id;
        let result = async {
            if id.is_empty() {
                return Err(invalid("id: required").into());
            }
            Ok::<_, Status>(self.ingest.delete_destination(id.clone()).await?)
        }
        .await;
        audit(
            &caller,
            "engage.v1.DestinationService/DeleteDestination",
            &format!("destination {id:?}"),
            &result,
        );
        result?;
        Ok(Response::new(proto::DeleteDestinationResponse {}))
    }

    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let r = request.into_inner();
        self.known("destination_id", &r.destination_id)?;
        let size = page_size(r.page_size, 50);
        let scope = format!("dead_letters|{}", r.destination_id);
        let from = match PageToken::decode(&r.page_token, &scope)? {
            Some(seq) => {
                seq.parse::<u64>()
                    .map_err(|_| invalid("page_token: not a token this request issued"))?
                    + 1
            }
            None => 0,
        };
        let found = self
            .store
            .dead_letters(&r.destination_id, from, size + 1)
            .map_err(Error::from)?;
        let more = found.len() > size;
        let max = self.ingest.limits().max_item_bytes();
        let mut dead_letters = Vec::with_capacity(found.len().min(size));
        for (seq, state) in found.into_iter().take(size) {
            // A dead letter whose action the log no longer holds (retention) still shows.
            let action = match self.store.action_at(seq).map_err(Error::from)? {
                Some(a) => convert::to_proto_action(&a, max),
                None => proto::FiredAction {
                    sequence: seq,
                    ..Default::default()
                },
            };
            dead_letters.push(proto::DeadLetter {
                action: Some(action),
                attempts: state.attempts,
                last_status: state.last_status,
                last_error: state.last_error,
                first_attempt_at: Some(convert::to_proto_ts(state.first_attempt_at)),
                last_attempt_at: Some(convert::to_proto_ts(state.last_attempt_at)),
            });
        }
        let fit = fitting(&dead_letters, max);
        let more = more || fit < dead_letters.len();
        dead_letters.truncate(fit);
        let next_page_token = match dead_letters.last().and_then(|d| d.action.as_ref()) {
            Some(last) if more => PageToken::encode(&last.sequence.to_string(), &scope),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListDeadLettersResponse {
            dead_letters,
            next_page_token,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<proto::RedriveDeadLettersRequest>,
    ) -> Result<Response<proto::RedriveDeadLettersResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let id = r.destination_id.clone();
        let result = async {
            self.known("destination_id", &id)?;
            // In a task of its own: a client that gives up after the redrive is written does
            // not leave the moved dead letters unknown to the delivery engine until a restart.
            let (ingest, deliveries, task_id) = (self.ingest.clone(), self.deliveries.clone(), id.clone());
            let moved = tokio::spawn(async move {
                let moved = ingest.redrive(task_id.clone(), r.sequences).await?;
                deliveries.redriven(&task_id, moved.clone());
                Ok::<_, Error>(moved)
            })
            .await
            .map_err(|e| Error::Internal(format!("redrive task: {e}")))??;
            Ok::<_, Status>(moved)
        }
        .await;
        let target = match &result {
            Ok(moved) => format!("destination {id:?}, {} dead letters", moved.len()),
            Err(_) => format!("destination {id:?}"),
        };
        audit(
            &caller,
            "engage.v1.DestinationService/RedriveDeadLetters",
            &target,
            &result,
        );
        let redriven = result?.len() as u32;
        Ok(Response::new(proto::RedriveDeadLettersResponse { redriven }))
    }
}
