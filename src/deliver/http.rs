//! One delivery attempt: the POST of SPEC §9 (Standard Webhooks headers and signature,
//! `engage-sequence`, the destination's headers, content type by payload), over one pooled
//! client shared by every destination (connections are reused per host), with the private
//! address check applied to every address a host resolves to, at every attempt.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::domain::destination::{check_url, is_private, Attempt, Destination};
use crate::domain::model::{FiredAction, Timestamp};

/// The most of an answer's body read (for the dead letter's `last_error`); the rest is dropped.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The most of an answer's body quoted in `last_error`.
const QUOTED_BYTES: usize = 256;

/// Resolves host names with the system resolver and refuses private addresses (unless allowed):
/// the connector calls it for every new connection, so a name that starts resolving to a
/// private address later is refused then too.
#[derive(Clone)]
struct Resolver {
    allow_private: bool,
}

type Resolving = Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(a) = addrs.iter().find(|a| is_private(a.ip())) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        PrivateAddress(refusal(&host, a.ip())),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Why a host is refused: it is, or resolves to, the private address `ip`.
fn refusal(host: &str, ip: std::net::IpAddr) -> String {
    if host == ip.to_string() {
        format!("{ip} is a loopback, private or link-local address (see --allow-private-destinations)")
    } else {
        format!("{host} resolves to the private address {ip} (see --allow-private-destinations)")
    }
}

/// The resolver's refusal of a private address (told apart from other I/O errors).
#[derive(Debug)]
struct PrivateAddress(String);

impl std::fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrivateAddress {}

type Https = hyper_rustls::HttpsConnector<HttpConnector<Resolver>>;

/// The HTTP side of deliveries; cheap to clone.
#[derive(Clone)]
pub(crate) struct Sender {
    client: Client<Https, Full<Bytes>>,
    allow_private: bool,
}

impl Sender {
    pub(crate) fn new(allow_private: bool) -> Result<Self, String> {
        let mut http = HttpConnector::new_with_resolver(Resolver { allow_private });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("TLS for destinations: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(https);
        Ok(Sender {
            client,
            allow_private,
        })
    }

    /// Whether a destination's URL may be used: a host that is (or, when `resolve`, resolves to)
    /// a private address is refused unless private destinations are allowed. A name that does
    /// not resolve now is accepted (deliveries check again at each attempt). `Err` names why.
    pub(crate) async fn check_host(&self, url: &str, resolve: bool) -> Result<(), String> {
        if self.allow_private {
            return Ok(());
        }
        let target = check_url("url", url).map_err(|e| e.to_string())?;
        if let Some(ip) = target.ip {
            return if is_private(ip) {
                Err(refusal(&target.host, ip))
            } else {
                Ok(())
            };
        }
        if resolve {
            if let Ok(addrs) = tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                if let Some(a) = addrs.into_iter().find(|a| is_private(a.ip())) {
                    return Err(refusal(&target.host, a.ip()));
                }
            }
        }
        Ok(())
    }

    /// One attempt to deliver `action` to `d`.
    pub(crate) async fn post(&self, d: &Destination, action: &FiredAction) -> Attempt {
        if let Err(e) = self.check_host(&d.url, false).await {
            return Attempt::Refused { status: 0, error: e };
        }
        let request = match request(d, action, Timestamp::now().secs) {
            Ok(r) => r,
            Err(e) => return Attempt::Refused { status: 0, error: e },
        };
        let timeout = Duration::from_millis(d.timeout_ms.max(1));
        let attempt = async {
            let answer = self.client.request(request).await.map_err(|e| {
                // A host resolving to a private address is refused, not retried.
                let refused = refused_by_resolver(&e);
                (crate::error::chain(&e), refused)
            })?;
            let status = answer.status().as_u16();
            let retry_after = answer
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let body = match Limited::new(answer.into_body(), MAX_ANSWER_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            Ok::<_, (String, bool)>((status, retry_after, body))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Err(_) => Attempt::Failed {
                status: 0,
                error: format!("no answer within {} ms (timeout)", d.timeout_ms),
                retry_after: None,
            },
            Ok(Err((error, true))) => Attempt::Refused { status: 0, error },
            Ok(Err((error, false))) => Attempt::Failed {
                status: 0,
                error,
                retry_after: None,
            },
            Ok(Ok((status, retry_after, body))) => {
                let mut quoted = String::from_utf8_lossy(&body[..body.len().min(QUOTED_BYTES)]).into_owned();
                quoted = quoted.replace(['\r', '\n'], " ");
                let error = if quoted.trim().is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {}", quoted.trim())
                };
                Attempt::of_status(status, error, retry_after)
            }
        }
    }
}

/// Whether the connection was refused by [`Resolver`] (a private address).
fn refused_by_resolver(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<PrivateAddress>().is_some()
            || s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<PrivateAddress>().is_some())
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// The Standard Webhooks signature header value: `v1,` and the base64 of
/// HMAC-SHA256(key, "{id}.{timestamp}.{body}").
pub(crate) fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    // HMAC takes a key of any length.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The request of one attempt at Unix second `now`.
fn request(d: &Destination, a: &FiredAction, now: i64) -> Result<http::Request<Full<Bytes>>, String> {
    let body = Bytes::from(a.payload.clone());
    let json = serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
    let mut r = http::Request::post(d.url.as_str())
        .header(
            http::header::CONTENT_TYPE,
            if json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            },
        )
        .header(
            http::header::USER_AGENT,
            concat!("engage/", env!("CARGO_PKG_VERSION")),
        )
        .header("engage-sequence", a.sequence.to_string())
        .header("webhook-id", a.action_id.as_str())
        .header("webhook-timestamp", now.to_string());
    if let Some(key) = d.signing_key() {
        r = r.header("webhook-signature", signature(&key, &a.action_id, now, &body));
    }
    for (k, v) in &d.headers {
        r = r.header(k.as_str(), v.as_str());
    }
    r.body(Full::new(body))
        .map_err(|e| format!("the request could not be built: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn the_signature_matches_the_standard_webhooks_example() {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
