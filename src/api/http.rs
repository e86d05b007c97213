//! The plain-HTTP side of the listener: the Segment tracking API, the browser snippet, and the
//! answer for paths nothing serves (a gRPC UNIMPLEMENTED to gRPC clients, a JSON 404 otherwise).

use axum::body::Body;
use axum::response::Response;
use http::StatusCode;

use crate::api::segment::{self, answer, SegmentApi};

/// The browser snippet (SPEC §7), served as is.
const SNIPPET: &str = include_str!("snippet.js");

/// Every HTTP route.
pub(crate) fn router(api: SegmentApi) -> axum::Router {
    segment::router(api)
        .route("/snippet.js", axum::routing::get(snippet))
        .fallback(nothing_here)
}

async fn snippet() -> Response {
    let mut response = Response::new(Body::from(SNIPPET));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/javascript; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("public, max-age=300"),
    );
    response
}

async fn nothing_here(request: http::Request<Body>) -> Response {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("{}: no such method", request.uri().path())).into_http();
    }
    answer(
        StatusCode::NOT_FOUND,
        serde_json::json!({ "error": format!("{}: not found", request.uri().path()) }),
    )
}

/// grpc-web for requests that are grpc-web, everything else untouched: tonic-web's own layer
/// answers 400 to any other HTTP/1.1 request, which would shut out the HTTP endpoints.
#[derive(Clone, Default)]
pub(crate) struct GrpcWebOnlyLayer;

impl<S: Clone> tower_layer::Layer<S> for GrpcWebOnlyLayer {
    type Service = GrpcWebOnly<S>;
    fn layer(&self, inner: S) -> GrpcWebOnly<S> {
        GrpcWebOnly {
            web: tower_layer::Layer::layer(&tonic_web::GrpcWebLayer::new(), inner.clone()),
            plain: inner,
        }
    }
}

/// See [`GrpcWebOnlyLayer`].
#[derive(Clone)]
pub(crate) struct GrpcWebOnly<S> {
    web: tonic_web::GrpcWebService<S>,
    plain: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for GrpcWebOnly<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let web = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc-web"));
        if web {
            let mut service = self.web.clone();
            Box::pin(async move {
                std::future::poll_fn(|cx| {
                    <tonic_web::GrpcWebService<S> as tower_service::Service<http::Request<B>>>::poll_ready(
                        &mut service,
                        cx,
                    )
                })
                .await?;
                service.call(request).await
            })
        } else {
            let mut service = self.plain.clone();
            std::mem::swap(&mut service, &mut self.plain);
            Box::pin(service.call(request.map(tonic::body::Body::new)))
        }
    }
}
