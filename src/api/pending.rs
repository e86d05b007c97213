//! Services whose RPCs later issues build: they answer UNIMPLEMENTED with a clear message.

use tonic::{Request, Response, Status};

use crate::proto;

/// UNIMPLEMENTED for `rpc`, naming the issue that builds it.
pub fn unimplemented(rpc: &str, issue: u32) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented yet (planned in issue {issue})"))
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
