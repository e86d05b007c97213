//! SchemaService: DefineAttribute, ListAttributes, ListEventNames.

use tonic::{Request, Response, Status};

use crate::api::convert;
use crate::domain::rules;
use crate::engine::Ingest;
use crate::proto;
use crate::proto::schema_service_server::SchemaService;

/// The SchemaService handlers.
pub(crate) struct SchemaApi {
    pub(crate) ingest: Ingest,
}

#[tonic::async_trait]
impl SchemaService for SchemaApi {
    async fn define_attribute(
        &self,
        request: Request<proto::DefineAttributeRequest>,
    ) -> Result<Response<proto::AttributeDefinition>, Status> {
        let r = request.into_inner();
        rules::check_attribute_name(
            || "name".into(),
            &r.name,
            self.ingest.limits().max_attribute_name_chars,
        )?;
        let attribute_type = convert::attribute_type("type", r.r#type)?;
        rules::check_description("description", &r.description)?;
        let def = self
            .ingest
            .define_attribute(r.name, attribute_type, r.description)
            .await?;
        Ok(Response::new(convert::to_proto_definition(&def)))
    }

    async fn list_attributes(
        &self,
        _request: Request<proto::ListAttributesRequest>,
    ) -> Result<Response<proto::ListAttributesResponse>, Status> {
        let attributes = self
            .ingest
            .attributes()
            .iter()
            .map(convert::to_proto_definition)
            .collect();
        Ok(Response::new(proto::ListAttributesResponse { attributes }))
    }

    async fn list_event_names(
        &self,
        _request: Request<proto::ListEventNamesRequest>,
    ) -> Result<Response<proto::ListEventNamesResponse>, Status> {
        let event_names = self
            .ingest
            .event_names()
            .iter()
            .map(|(name, stats)| convert::to_proto_name_summary(name, stats))
            .collect();
        Ok(Response::new(proto::ListEventNamesResponse { event_names }))
    }
}
