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
        return tonic::Status::unimplemented(format!("{}: no such method", request.uri().path()))
            .into_http();
    }
    answer(
        StatusCode::NOT_FOUND,
        serde_json::json!({ "error": format!("{}: not found", request.uri().path()) }),
    )
}
