//! Services whose RPCs later issues build: they answer UNIMPLEMENTED with a clear message.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto;

/// UNIMPLEMENTED for `rpc`, naming the issue that builds it.
pub fn unimplemented(rpc: &str, issue: u32) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented yet (planned in issue {issue})"))
}

/// TriggerService until the trigger engine lands.
pub struct PendingTriggers;

#[tonic::async_trait]
impl proto::trigger_service_server::TriggerService for PendingTriggers {
    async fn create_trigger(
        &self,
        _: Request<proto::CreateTriggerRequest>,
    ) -> Result<Response<proto::Trigger>, Status> {
        Err(unimplemented("TriggerService.CreateTrigger", 3))
    }
    async fn get_trigger(
        &self,
        _: Request<proto::GetTriggerRequest>,
    ) -> Result<Response<proto::Trigger>, Status> {
        Err(unimplemented("TriggerService.GetTrigger", 3))
    }
    async fn list_triggers(
        &self,
        _: Request<proto::ListTriggersRequest>,
    ) -> Result<Response<proto::ListTriggersResponse>, Status> {
        Err(unimplemented("TriggerService.ListTriggers", 3))
    }
    async fn update_trigger(
        &self,
        _: Request<proto::UpdateTriggerRequest>,
    ) -> Result<Response<proto::Trigger>, Status> {
        Err(unimplemented("TriggerService.UpdateTrigger", 3))
    }
    async fn delete_trigger(
        &self,
        _: Request<proto::DeleteTriggerRequest>,
    ) -> Result<Response<proto::DeleteTriggerResponse>, Status> {
        Err(unimplemented("TriggerService.DeleteTrigger", 3))
    }
}

/// ActionService until the trigger engine lands.
pub struct PendingActions;

#[tonic::async_trait]
impl proto::action_service_server::ActionService for PendingActions {
    type SubscribeActionsStream =
        Pin<Box<dyn Stream<Item = Result<proto::FiredAction, Status>> + Send + 'static>>;

    async fn subscribe_actions(
        &self,
        _: Request<proto::SubscribeActionsRequest>,
    ) -> Result<Response<Self::SubscribeActionsStream>, Status> {
        Err(unimplemented("ActionService.SubscribeActions", 3))
    }
    async fn ack_actions(
        &self,
        _: Request<proto::AckActionsRequest>,
    ) -> Result<Response<proto::AckActionsResponse>, Status> {
        Err(unimplemented("ActionService.AckActions", 3))
    }
    async fn list_fired_actions(
        &self,
        _: Request<proto::ListFiredActionsRequest>,
    ) -> Result<Response<proto::ListFiredActionsResponse>, Status> {
        Err(unimplemented("ActionService.ListFiredActions", 3))
    }
}

/// QueryService until segments and statistics land.
pub struct PendingQueries;

#[tonic::async_trait]
impl proto::query_service_server::QueryService for PendingQueries {
    async fn filter_users(
        &self,
        _: Request<proto::FilterUsersRequest>,
    ) -> Result<Response<proto::FilterUsersResponse>, Status> {
        Err(unimplemented("QueryService.FilterUsers", 4))
    }
    async fn get_event_stats(
        &self,
        _: Request<proto::GetEventStatsRequest>,
    ) -> Result<Response<proto::GetEventStatsResponse>, Status> {
        Err(unimplemented("QueryService.GetEventStats", 4))
    }
}
