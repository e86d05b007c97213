//! TriggerService: CreateTrigger, GetTrigger, ListTriggers, UpdateTrigger, DeleteTrigger.

use tonic::{Request, Response, Status};

use crate::api::{audit, caller, convert, fitting, PageToken};
use crate::domain::condition::Place;
use crate::domain::model::{AbsenceCheck, ActionTemplate, Timestamp, Trigger};
use crate::domain::rules::{self, page_size};
use crate::engine::Ingest;
use crate::error::{invalid, Error};
use crate::proto;
use crate::proto::trigger_service_server::TriggerService;

/// The TriggerService handlers.
pub(crate) struct TriggerApi {
    pub(crate) ingest: Ingest,
}

impl TriggerApi {
    /// Validates a submitted trigger into its stored form; `field` is `trigger`.
    fn validate(&self, t: proto::Trigger) -> Result<Trigger, Error> {
        let f = "trigger";
        // Stored, the trigger must still fit one answer (GetTrigger, ListTriggers).
        let bytes = prost::Message::encoded_len(&t);
        let max = self.ingest.limits().max_item_bytes();
        if bytes > max {
            return Err(invalid(format!(
                "{f}: {bytes} bytes encoded, at most {max} allowed (max_message_bytes less room for the answer)"
            )));
        }
        rules::check_trigger_name(f, &t.name)?;
        let event_name = rules::normalize_event_name(&format!("{f}.event_name"), &t.event_name)?;
        let action = t.action.ok_or_else(|| invalid(format!("{f}.action: required")))?;
        rules::check_action(f, &action.r#type, &action.payload_template)?;
        let (raw_condition, condition) = match &t.condition {
            Some(c) => {
                let (raw, valid) =
                    convert::validated_condition(&self.ingest, &format!("{f}.condition"), c, Place::Trigger)?;
                (Some(raw), Some(valid))
            }
            None => (None, None),
        };
        let cooldown_nanos = t
            .cooldown
            .as_ref()
            .map(|d| convert::positive_duration(&format!("{f}.cooldown"), d))
            .transpose()?;
        let delay_nanos = t
            .delay
            .as_ref()
            .map(|d| convert::positive_duration(&format!("{f}.delay"), d))
            .transpose()?;
        let unless = match &t.unless {
            Some(u) => Some(self.absence_check(u)?),
            None => None,
        };
        let epoch = Timestamp { secs: 0, nanos: 0 };
        Ok(Trigger {
            id: t.id,
            name: t.name,
            paused: t.paused,
            event_name,
            raw_condition,
            condition,
            action: ActionTemplate {
                action_type: action.r#type,
                payload_template: action.payload_template,
            },
            cooldown_nanos,
            once_per_user: t.once_per_user,
            created_at: epoch,
            updated_at: epoch,
            delay_nanos,
            unless,
            destination_id: action.destination_id,
        })
    }

    /// Validates `trigger.unless`: the cancelling event's name, its optional condition
    /// (attribute conditions on the cancelling event, combined with all/any/not) and the window.
    fn absence_check(&self, u: &proto::AbsenceCheck) -> Result<AbsenceCheck, Error> {
        let f = "trigger.unless";
        let event_name = rules::normalize_event_name(&format!("{f}.event_name"), &u.event_name)?;
        let within = u
            .within
            .as_ref()
            .ok_or_else(|| invalid(format!("{f}.within: required")))?;
        let within_nanos = convert::positive_duration(&format!("{f}.within"), within)?;
        let (raw_condition, condition) = match &u.condition {
            Some(c) => {
                let (raw, valid) =
                    convert::validated_condition(&self.ingest, &format!("{f}.condition"), c, Place::Where)?;
                (Some(raw), Some(valid))
            }
            None => (None, None),
        };
        Ok(AbsenceCheck {
            event_name,
            raw_condition,
            condition,
            within_nanos,
        })
    }
}

#[tonic::async_trait]
impl TriggerService for TriggerApi {
    async fn create_trigger(
        &self,
        request: Request<proto::CreateTriggerRequest>,
    ) -> Result<Response<proto::Trigger>, Status> {
        let caller = caller(&request);
        let t = request.into_inner().trigger;
        let name = t.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let result = async {
            let trigger = self.validate(t.ok_or_else(|| invalid("trigger: required"))?)?;
            Ok::<_, Status>(self.ingest.create_trigger(trigger).await?)
        }
        .await;
        let target = match &result {
            Ok(created) => format!("trigger {} ({:?})", created.id, created.name),
            Err(_) => format!("trigger named {name:?}"),
        };
        audit(
            &caller,
            "engage.v1.TriggerService/CreateTrigger",
            &target,
            &result,
        );
        Ok(Response::new(convert::to_proto_trigger(&result?)))
    }

    async fn get_trigger(
        &self,
        request: Request<proto::GetTriggerRequest>,
    ) -> Result<Response<proto::Trigger>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(invalid("id: required").into());
        }
        let triggers = self.ingest.triggers();
        let t = triggers
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("id: no trigger {id:?}")))?;
        Ok(Response::new(convert::to_proto_trigger(t)))
    }

    async fn list_triggers(
        &self,
        request: Request<proto::ListTriggersRequest>,
    ) -> Result<Response<proto::ListTriggersResponse>, Status> {
        let r = request.into_inner();
        let event_name = rules::optional_event_name("event_name", &r.event_name)?;
        let size = page_size(r.page_size, 50);
        let scope = format!("triggers|{event_name}");
        let after = PageToken::decode(&r.page_token, &scope)?;
        let triggers = self.ingest.triggers();
        let range = match &after {
            Some(id) => {
                triggers.range::<String, _>((std::ops::Bound::Excluded(id), std::ops::Bound::Unbounded))
            }
            None => triggers.range::<String, _>(..),
        };
        let mut triggers: Vec<proto::Trigger> = range
            .map(|(_, t)| t)
            .filter(|t| event_name.is_empty() || t.event_name == event_name)
            .take(size + 1)
            .map(|t| convert::to_proto_trigger(t))
            .collect();
        let more = triggers.len() > size;
        triggers.truncate(size);
        // A page ends early rather than outgrow one message.
        let fit = fitting(&triggers, self.ingest.limits().max_item_bytes());
        let more = more || fit < triggers.len();
        triggers.truncate(fit);
        let next_page_token = match triggers.last() {
            Some(last) if more => PageToken::encode(&last.id, &scope),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListTriggersResponse {
            triggers,
            next_page_token,
        }))
    }

    async fn update_trigger(
        &self,
        request: Request<proto::UpdateTriggerRequest>,
    ) -> Result<Response<proto::Trigger>, Status> {
        let caller = caller(&request);
        let t = request.into_inner().trigger;
        let id = t.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        let result = async {
            let t = t.ok_or_else(|| invalid("trigger: required"))?;
            if t.id.is_empty() {
                return Err(invalid("trigger.id: required").into());
            }
            let trigger = self.validate(t)?;
            Ok::<_, Status>(self.ingest.update_trigger(trigger).await?)
        }
        .await;
        audit(
            &caller,
            "engage.v1.TriggerService/UpdateTrigger",
            &format!("trigger {id:?}"),
            &result,
        );
        Ok(Response::new(convert::to_proto_trigger(&result?)))
    }

    async fn delete_trigger(
        &self,
        request: Request<proto::DeleteTriggerRequest>,
    ) -> Result<Response<proto::DeleteTriggerResponse>, Status> {
        let caller = caller(&request);
        let id = request.into_inner().id;
        let result = async {
            if id.is_empty() {
                return Err(invalid("id: required").into());
            }
            Ok::<_, Status>(self.ingest.delete_trigger(id.clone()).await?)
        }
        .await;
        audit(
            &caller,
            "engage.v1.TriggerService/DeleteTrigger",
            &format!("trigger {id:?}"),
            &result,
        );
        result?;
        Ok(Response::new(proto::DeleteTriggerResponse {}))
    }
}
