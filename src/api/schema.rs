//! SchemaService: DefineAttribute, ListAttributes, ListEventNames.

use tonic::{Request, Response, Status};

use crate::api::convert;
use crate::error::invalid;
use crate::ingest::Ingest;
use crate::proto;
use crate::proto::schema_service_server::SchemaService;
use crate::schema;

/// Longest attribute description, in characters.
const MAX_DESCRIPTION_CHARS: usize = 1024;

/// The SchemaService handlers.
pub struct SchemaApi {
    pub ingest: Ingest,
}

#[tonic::async_trait]
impl SchemaService for SchemaApi {
    async fn define_attribute(
        &self,
        request: Request<proto::DefineAttributeRequest>,
    ) -> Result<Response<proto::AttributeDefinition>, Status> {
        let r = request.into_inner();
        schema::check_attribute_name(
            || "name".into(),
            &r.name,
            self.ingest.limits().max_attribute_name_chars,
        )?;
        let attribute_type = convert::attribute_type("type", r.r#type)?;
        let chars = r.description.chars().count();
        if chars > MAX_DESCRIPTION_CHARS {
            return Err(invalid(format!(
                "description: {chars} characters, at most {MAX_DESCRIPTION_CHARS} allowed"
            ))
            .into());
        }
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
