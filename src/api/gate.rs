//! The gate every call passes first (a tower layer on the whole listener): which role each RPC
//! needs, the caller's key checked against it before anything else about the call, and the
//! per-call metrics (`engage_grpc_requests_total` by method and code, and the duration).
//!
//! [`METHOD_ROLES`] is the one table of roles: a test walks every method of every service in
//! the descriptor set and fails on one missing here. A path not in it (none of engage's
//! services) needs `admin`; health and reflection need no key.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;
use tonic::Status;

use crate::access::{secret_of, Access, Denied, Role};
use crate::telemetry::{self, Rejection};

/// Every engage RPC, with the role it needs.
pub(crate) const METHOD_ROLES: &[(&str, Role)] = &[
    ("engage.v1.EventService/TrackEvent", Role::Ingest),
    ("engage.v1.EventService/TrackEvents", Role::Ingest),
    ("engage.v1.EventService/GetUserTimeline", Role::Read),
    ("engage.v1.EventService/DeleteUser", Role::Admin),
    ("engage.v1.SchemaService/DefineAttribute", Role::Admin),
    ("engage.v1.SchemaService/ListAttributes", Role::Read),
    ("engage.v1.SchemaService/ListEventNames", Role::Read),
    ("engage.v1.TriggerService/CreateTrigger", Role::Admin),
    ("engage.v1.TriggerService/GetTrigger", Role::Read),
    ("engage.v1.TriggerService/ListTriggers", Role::Read),
    ("engage.v1.TriggerService/UpdateTrigger", Role::Admin),
    ("engage.v1.TriggerService/DeleteTrigger", Role::Admin),
    ("engage.v1.ActionService/SubscribeActions", Role::Read),
    ("engage.v1.ActionService/AckActions", Role::Read),
    ("engage.v1.ActionService/ListFiredActions", Role::Read),
    ("engage.v1.ActionService/ListConsumers", Role::Read),
    ("engage.v1.ActionService/GetActionStats", Role::Read),
    ("engage.v1.QueryService/FilterUsers", Role::Read),
    ("engage.v1.QueryService/GetEventStats", Role::Read),
    ("engage.v1.DestinationService/CreateDestination", Role::Admin),
    ("engage.v1.DestinationService/GetDestination", Role::Read),
    ("engage.v1.DestinationService/ListDestinations", Role::Read),
    ("engage.v1.DestinationService/UpdateDestination", Role::Admin),
    ("engage.v1.DestinationService/DeleteDestination", Role::Admin),
    ("engage.v1.DestinationService/ListDeadLetters", Role::Read),
    ("engage.v1.DestinationService/RedriveDeadLetters", Role::Admin),
];

/// The HTTP endpoints (SPEC §7), with the role each needs.
pub(crate) const HTTP_ROLES: &[(&str, Role)] = &[
    ("/v1/track", Role::Ingest),
    ("/v1/page", Role::Ingest),
    ("/v1/screen", Role::Ingest),
    ("/v1/identify", Role::Ingest),
    ("/v1/group", Role::Ingest),
    ("/v1/alias", Role::Ingest),
    ("/v1/batch", Role::Ingest),
];

/// HTTP paths anyone may fetch.
const OPEN_HTTP: &[&str] = &["/snippet.js"];

/// Services anyone may call (load balancers' health checks, grpcurl's reflection).
const OPEN_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What a request is, for the gate.
#[derive(Clone, Copy)]
enum Route {
    /// Health, reflection: no key.
    Open,
    /// An open HTTP path (counted by path).
    OpenHttp(&'static str),
    /// A gRPC method (or an unknown path asked as gRPC) and the role it needs.
    Grpc(&'static str, Role),
    /// An HTTP endpoint (or an unknown path asked as plain HTTP) and the role it needs.
    Http(&'static str, Role),
}

fn route_of(path: &str, grpc: bool) -> Route {
    if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Route::Open;
    }
    if let Some(p) = OPEN_HTTP.iter().find(|p| **p == path) {
        return Route::OpenHttp(p);
    }
    if let Some((p, role)) = HTTP_ROLES.iter().find(|(p, _)| *p == path) {
        return Route::Http(p, *role);
    }
    let name = path.strip_prefix('/').unwrap_or(path);
    if let Some((m, role)) = METHOD_ROLES.iter().find(|(m, _)| *m == name) {
        return Route::Grpc(m, *role);
    }
    // Anything else needs the highest role (it answers "not found" or UNIMPLEMENTED).
    if grpc {
        Route::Grpc("unknown", Role::Admin)
    } else {
        Route::Http("other", Role::Admin)
    }
}

/// An HTTP answer for a refused credential (what §6 says: 401, 403, JSON).
fn http_refusal(status: &Status) -> http::Response<tonic::body::Body> {
    let code = match status.code() {
        tonic::Code::Unauthenticated => http::StatusCode::UNAUTHORIZED,
        _ => http::StatusCode::FORBIDDEN,
    };
    let body = serde_json::json!({ "error": status.message() }).to_string();
    let mut response = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(
        bytes::Bytes::from(body),
    )));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if code == http::StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer, Basic realm=\"engage\""),
        );
    }
    response
}

/// The status of a refused credential (never quoting the credential).
fn refusal(denied: Denied, needs: Role) -> (Status, Rejection) {
    match denied {
        Denied::Unauthenticated => (
            Status::unauthenticated(format!(
                "authorization: this call needs an API key with the {needs} role (authorization: Bearer <secret>); none was given or the key is unknown"
            )),
            Rejection::Unauthenticated,
        ),
        Denied::PermissionDenied { key, has, needs } => (
            Status::permission_denied(format!(
                "this call needs the {needs} role; key {key:?} has the {has} role"
            )),
            Rejection::PermissionDenied,
        ),
    }
}

/// The layer, for `Server::layer`.
#[derive(Clone)]
pub(crate) struct GateLayer {
    pub(crate) access: Arc<Access>,
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            access: self.access.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub(crate) struct Gate<S> {
    inner: S,
    access: Arc<Access>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Gate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"));
        let (method, needs, is_grpc) = match route_of(request.uri().path(), grpc) {
            Route::Open => {
                let mut inner = self.inner.clone();
                std::mem::swap(&mut inner, &mut self.inner);
                return Box::pin(inner.call(request));
            }
            Route::OpenHttp(path) => {
                let mut inner = self.inner.clone();
                std::mem::swap(&mut inner, &mut self.inner);
                if !telemetry::enabled() {
                    return Box::pin(inner.call(request));
                }
                return Box::pin(async move {
                    let response = inner.call(request).await?;
                    record_http(path, response.status());
                    Ok(response)
                });
            }
            Route::Grpc(method, needs) => (method, needs, true),
            Route::Http(path, needs) => (path, needs, false),
        };
        let secret = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(secret_of);
        match self.access.check(secret.as_deref(), needs) {
            Ok(mut caller) => {
                caller.peer = peer(&request);
                request.extensions_mut().insert(caller);
            }
            Err(denied) => {
                if needs == Role::Admin {
                    audit_refusal(&denied, method, &request);
                }
                let (status, why) = refusal(denied, needs);
                if needs == Role::Ingest {
                    // Refused before the request is read: counted once per call.
                    telemetry::rejected(why, 1);
                }
                if !is_grpc {
                    let response = http_refusal(&status);
                    record_http(method, response.status());
                    return Box::pin(std::future::ready(Ok(response)));
                }
                record(method, status.code() as i32, started);
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        if !telemetry::enabled() {
            // No recorder: nothing to observe, no wrapper around the answer's body.
            return Box::pin(inner.call(request));
        }
        if !is_grpc {
            return Box::pin(async move {
                let response = inner.call(request).await?;
                record_http(method, response.status());
                Ok(response)
            });
        }
        Box::pin(async move {
            // A call dropped before it answers (a deadline, a client gone) is still counted.
            let mut pending = Pending {
                method,
                started,
                done: false,
            };
            let response = inner.call(request).await;
            pending.done = true;
            let response = response?;
            // A trailers-only answer (an error) carries its status in the headers.
            if let Some(code) = grpc_status(response.headers()) {
                record(method, code, started);
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(Observed {
                    inner: body,
                    method,
                    started,
                    done: false,
                })
            }))
        })
    }
}

/// The audit line of a refused attempt at a change or an erasure.
fn audit_refusal<B>(denied: &Denied, method: &str, request: &http::Request<B>) {
    let (key, role, outcome) = match denied {
        Denied::PermissionDenied { key, has, .. } => (key.as_str(), Some(*has), "PERMISSION_DENIED"),
        Denied::Unauthenticated => ("", None, "UNAUTHENTICATED"),
    };
    crate::api::audit_line(key, role, peer(request), method, "", outcome);
}

/// The address a request came from.
fn peer<B>(request: &http::Request<B>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<crate::net::ConnInfo>()
        .and_then(|c| c.remote)
}

fn record_http(path: &'static str, status: http::StatusCode) {
    if !telemetry::enabled() {
        return;
    }
    metrics::counter!(telemetry::HTTP_REQUESTS, "path" => path, "status" => status.as_u16().to_string())
        .increment(1);
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn record(method: &'static str, code: i32, started: Instant) {
    if !telemetry::enabled() {
        return;
    }
    metrics::counter!(telemetry::GRPC_REQUESTS, "method" => method, "code" => telemetry::code_name(code))
        .increment(1);
    metrics::histogram!(telemetry::GRPC_DURATION, "method" => method).record(started.elapsed().as_secs_f64());
}

/// Records a call as CANCELLED when its future is dropped before it answers.
struct Pending {
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            record(self.method, tonic::Code::Cancelled as i32, self.started);
        }
    }
}

/// A response body that records the call's code when its trailers pass (or CANCELLED when the
/// client goes before them).
struct Observed {
    inner: tonic::body::Body,
    method: &'static str,
    started: Instant,
    done: bool,
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            match frame {
                Some(Ok(f)) => {
                    if let Some(code) = f.trailers_ref().and_then(grpc_status) {
                        this.done = true;
                        record(this.method, code, this.started);
                    }
                }
                Some(Err(_)) | None => {
                    if !this.done {
                        this.done = true;
                        record(this.method, tonic::Code::Unknown as i32, this.started);
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if !self.done {
            record(self.method, tonic::Code::Cancelled as i32, self.started);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of every engage service in the descriptor set has a role here.
    #[test]
    fn every_rpc_has_a_role() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in set.file.iter().filter(|f| f.package() == "engage.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("engage.v1.{}/{}", service.name(), method.name());
                    assert!(
                        METHOD_ROLES.iter().any(|(m, _)| *m == path),
                        "{path} has no role in METHOD_ROLES"
                    );
                    seen += 1;
                }
            }
        }
        assert_eq!(
            seen,
            METHOD_ROLES.len(),
            "METHOD_ROLES names a method that does not exist"
        );
    }
}
