//! SchemaService: DefineAttribute, ListAttributes, ListEventNames.

use tonic::{Request, Response, Status};

use crate::api::{audit, caller, convert, fitting, PageToken};
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
        let caller = caller(&request);
        let r = request.into_inner();
        let target = format!("attribute {:?}", r.name);
        let result = async {
            rules::check_attribute_name(
                || "name".into(),
                &r.name,
                self.ingest.limits().max_attribute_name_chars,
            )?;
            let attribute_type = convert::attribute_type("type", r.r#type)?;
            rules::check_description("description", &r.description)?;
            Ok::<_, Status>(
                self.ingest
                    .define_attribute(r.name, attribute_type, r.description)
                    .await?,
            )
        }
        .await;
        audit(
            &caller,
            "engage.v1.SchemaService/DefineAttribute",
            &target,
            &result,
        );
        Ok(Response::new(convert::to_proto_definition(&result?)))
    }

    async fn list_attributes(
        &self,
        request: Request<proto::ListAttributesRequest>,
    ) -> Result<Response<proto::ListAttributesResponse>, Status> {
        let r = request.into_inner();
        let defs = self.ingest.attributes();
        let (attributes, next_page_token) = self.page(
            &defs,
            |d| &d.name,
            convert::to_proto_definition,
            ("attributes", r.page_size, &r.page_token),
        )?;
        Ok(Response::new(proto::ListAttributesResponse {
            attributes,
            next_page_token,
        }))
    }

    async fn list_event_names(
        &self,
        request: Request<proto::ListEventNamesRequest>,
    ) -> Result<Response<proto::ListEventNamesResponse>, Status> {
        let r = request.into_inner();
        let names = self.ingest.event_names();
        let (event_names, next_page_token) = self.page(
            &names,
            |(n, _)| n,
            |(name, stats)| convert::to_proto_name_summary(name, stats),
            ("event_names", r.page_size, &r.page_token),
        )?;
        Ok(Response::new(proto::ListEventNamesResponse {
            event_names,
            next_page_token,
        }))
    }
}

impl SchemaApi {
    /// One page of a listing sorted by name: after the token's name, at most `page_size` (0: as
    /// many as fit one message), and never more than fit one message. `paging` is the listing's
    /// token scope, the requested page size and the token.
    fn page<T, P: prost::Message>(
        &self,
        all: &[T],
        name: impl Fn(&T) -> &String,
        to_proto: impl Fn(&T) -> P,
        paging: (&str, u32, &str),
    ) -> Result<(Vec<P>, String), Status> {
        let (scope, page_size, token) = paging;
        let start = match PageToken::decode(token, scope)? {
            Some(after) => all.partition_point(|item| name(item).as_str() <= after.as_str()),
            None => 0,
        };
        let rest = &all[start.min(all.len())..];
        let wanted = match page_size {
            0 => rest.len(),
            n => rules::page_size(n, rest.len()),
        };
        let mut page: Vec<P> = rest.iter().take(wanted).map(to_proto).collect();
        page.truncate(fitting(&page, self.ingest.limits().max_item_bytes()));
        let next = match rest.get(page.len().wrapping_sub(1)) {
            Some(last) if page.len() < rest.len() => PageToken::encode(name(last), scope),
            _ => String::new(),
        };
        Ok((page, next))
    }
}
