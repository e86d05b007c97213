//! Destinations (SPEC §9): HTTP endpoints engage delivers fired actions to, their validation
//! rules, the state of one action's delivery, and the retry and health schedule. Pure rules: the
//! HTTP client and the private-address check of resolved hosts live in `deliver`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::domain::model::Timestamp;
use crate::error::{invalid, Error};

/// Defaults of SPEC §9.
pub(crate) const DEFAULT_TIMEOUT_MS: u64 = 10_000;
pub(crate) const DEFAULT_MAX_ATTEMPTS: u32 = 12;
pub(crate) const DEFAULT_MAX_RETRY_AGE_SECS: u64 = 24 * 3600;
pub(crate) const DEFAULT_CONCURRENCY: u32 = 8;

/// Limits of a destination's settings (engage's choice, README "Destinations").
pub(crate) const MAX_TIMEOUT_MS: u64 = 120_000;
pub(crate) const MAX_ATTEMPTS: u32 = 100;
/// As long as the action log keeps actions by default (`--action-retention-secs`); retention
/// holds the log for pending retries, so a longer age would only make the log grow.
pub(crate) const MAX_RETRY_AGE_SECS: u64 = 7 * 24 * 3600;
pub(crate) const MAX_CONCURRENCY: u32 = 256;
pub(crate) const MAX_HEADERS: usize = 64;
pub(crate) const MAX_URL_BYTES: usize = 2048;
pub(crate) const MAX_NAME_CHARS: usize = 128;
pub(crate) const MAX_SECRET_BYTES: usize = 1024;
pub(crate) const MAX_HEADER_VALUE_BYTES: usize = 4096;

/// Failed attempts in a row after which a destination is FAILING.
pub(crate) const FAILING_AFTER: u32 = 5;
/// The longest nominal delay between attempts, and between probes of a suspended destination.
pub(crate) const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;

/// Headers engage sets itself on every delivery: a destination may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "host",
    "te",
    "upgrade",
    "user-agent",
    "engage-sequence",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// A destination as stored (health is the delivery engine's, not stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Destination {
    pub id: String,
    pub name: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    /// Empty: deliveries are not signed.
    pub signing_secret: String,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub max_retry_age_secs: u64,
    pub concurrency: u32,
    pub paused: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Destination {
    /// The key the signature is computed with: the bytes after `whsec_` decoded from base64, or
    /// the secret's own bytes (validated at submission, so the base64 decodes).
    pub(crate) fn signing_key(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        if self.signing_secret.is_empty() {
            return None;
        }
        match self.signing_secret.strip_prefix("whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).ok(),
            None => Some(self.signing_secret.as_bytes().to_vec()),
        }
    }
}

/// How a destination is doing (the wire's DestinationHealth).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum Health {
    #[default]
    Healthy,
    Failing,
    Suspended,
}

/// The state of one action's delivery to one destination once an attempt failed: a pending
/// retry, or (with `next_at` unused) a dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeliveryState {
    pub attempts: u32,
    /// 0 when no HTTP answer came.
    pub last_status: i32,
    pub last_error: String,
    pub first_attempt_at: Timestamp,
    pub last_attempt_at: Timestamp,
    pub next_at: Timestamp,
}

/// What one attempt ended with.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Attempt {
    /// A 2xx answer.
    Delivered,
    /// 408, 429, 5xx, a timeout or a connection error: worth another attempt. `retry_after`
    /// in seconds when the answer said so.
    Failed {
        status: i32,
        error: String,
        retry_after: Option<u64>,
    },
    /// Any other answer: retrying would not help.
    Refused { status: i32, error: String },
}

impl Attempt {
    /// The outcome of an HTTP answer with `status` (Retry-After already parsed).
    pub(crate) fn of_status(status: u16, error: String, retry_after: Option<u64>) -> Attempt {
        match status {
            200..=299 => Attempt::Delivered,
            408 | 429 | 500..=599 => Attempt::Failed {
                status: i32::from(status),
                error,
                retry_after,
            },
            _ => Attempt::Refused {
                status: i32::from(status),
                error,
            },
        }
    }
}

/// The nominal delay before retry number `n` (1 for the first retry): 1 s, 2 s, 4 s, ... at
/// most [`MAX_BACKOFF_MS`], scaled by `base_ms` / 1000 (tests shorten it).
pub(crate) fn nominal_backoff_ms(n: u32, base_ms: u64) -> u64 {
    let doublings = n.saturating_sub(1).min(30);
    base_ms
        .saturating_mul(1u64 << doublings)
        .min(MAX_BACKOFF_MS.max(base_ms))
}

/// The actual delay: the nominal one times `jitter` in [0.5, 1.5) (SPEC: within ±50 %), and
/// never sooner than a `Retry-After` of up to [`MAX_BACKOFF_MS`].
pub(crate) fn backoff_ms(n: u32, base_ms: u64, jitter: f64, retry_after_secs: Option<u64>) -> u64 {
    let nominal = nominal_backoff_ms(n, base_ms) as f64;
    let jittered = (nominal * jitter.clamp(0.5, 1.5)) as u64;
    match retry_after_secs {
        Some(s) => jittered.max(s.saturating_mul(1000).min(MAX_BACKOFF_MS)),
        None => jittered,
    }
}

/// What to do with an action after a failed attempt: retry at `next_at`, or dead-letter it
/// (out of attempts, or the next attempt would come after `max_retry_age`).
pub(crate) fn after_failure(
    destination: &Destination,
    state: &DeliveryState,
    now: Timestamp,
    delay_ms: u64,
) -> Option<Timestamp> {
    if state.attempts >= destination.max_attempts {
        return None;
    }
    let next = Timestamp::from_nanos(now.as_nanos() + delay_ms as i128 * 1_000_000);
    let deadline = state
        .first_attempt_at
        .plus_secs(destination.max_retry_age_secs.min(i64::MAX as u64) as i64);
    if next > deadline {
        return None;
    }
    Some(next)
}

/// True for addresses a destination may not reach unless private destinations are allowed:
/// loopback, private, link-local, unique-local, shared (CGNAT), unspecified, broadcast and
/// multicast, IPv4-mapped IPv6 ones included.
pub(crate) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() || v6.is_unspecified() {
                return true;
            }
            // IPv4-mapped and -compatible (::ffff:a.b.c.d, ::a.b.c.d), NAT64 (64:ff9b::/96)
            // and 6to4 (2002::/16) addresses reach the IPv4 address they embed.
            if let Some(v4) = v6.to_ipv4() {
                return is_private(IpAddr::V4(v4));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_private(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            if s[0] == 0x2002 {
                let [a, b] = s[1].to_be_bytes();
                let [c, d] = s[2].to_be_bytes();
                return is_private(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
        }
    }
}

/// A validated URL's parts the delivery needs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub host: String,
    /// The host as an address when it is one (brackets of IPv6 removed).
    pub ip: Option<IpAddr>,
    pub port: u16,
}

/// Checks a destination URL: absolute http or https with a host, no credentials, no fragment,
/// at most [`MAX_URL_BYTES`]. `f` is the field path.
pub(crate) fn check_url(f: &str, url: &str) -> Result<Target, Error> {
    if url.is_empty() {
        return Err(invalid(format!("{f}: required")));
    }
    if url.len() > MAX_URL_BYTES {
        return Err(invalid(format!(
            "{f}: {} bytes, at most {MAX_URL_BYTES} allowed",
            url.len()
        )));
    }
    if url.contains('#') {
        return Err(invalid(format!(
            "{f}: a fragment (#...) is not sent to a server; remove it"
        )));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(format!("{f}: {url:?} is not a URL: {e}")))?;
    let port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err(invalid(format!("{f}: {url:?}: the scheme must be http or https"))),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| invalid(format!("{f}: {url:?} has no host")))?;
    if authority.as_str().contains('@') {
        return Err(invalid(format!(
            "{f}: credentials in the URL are not allowed; send them in `headers`"
        )));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(invalid(format!("{f}: {url:?} has no host")));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Target {
        host: bare.to_string(),
        ip: bare.parse().ok(),
        port: authority.port_u16().unwrap_or(port),
    })
}

/// Checks a destination's name, headers and secret (`f` is `destination`).
pub(crate) fn check_settings(
    f: &str,
    name: &str,
    headers: &BTreeMap<String, String>,
    secret: &str,
) -> Result<(), Error> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(invalid(format!("{f}.name: required")));
    }
    if chars > MAX_NAME_CHARS {
        return Err(invalid(format!(
            "{f}.name: {chars} characters, at most {MAX_NAME_CHARS} allowed"
        )));
    }
    if headers.len() > MAX_HEADERS {
        return Err(invalid(format!(
            "{f}.headers: {} headers, at most {MAX_HEADERS} allowed",
            headers.len()
        )));
    }
    for (k, v) in headers {
        let field = format!("{f}.headers[{k:?}]");
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| invalid(format!("{field}: not a valid HTTP header name")))?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(invalid(format!(
                "{field}: set by engage on every delivery; it cannot be replaced"
            )));
        }
        if v.len() > MAX_HEADER_VALUE_BYTES {
            return Err(invalid(format!(
                "{field}: {} bytes, at most {MAX_HEADER_VALUE_BYTES} allowed",
                v.len()
            )));
        }
        http::HeaderValue::from_str(v).map_err(|_| {
            invalid(format!(
                "{field}: not a valid HTTP header value (visible ASCII and spaces)"
            ))
        })?;
    }
    if secret.len() > MAX_SECRET_BYTES {
        return Err(invalid(format!(
            "{f}.signing_secret: {} bytes, at most {MAX_SECRET_BYTES} allowed",
            secret.len()
        )));
    }
    if let Some(b64) = secret.strip_prefix("whsec_") {
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(key) if !key.is_empty() => {}
            _ => {
                return Err(invalid(format!(
                    "{f}.signing_secret: after \"whsec_\" must come the key in base64 (standard alphabet, padded)"
                )))
            }
        }
    }
    Ok(())
}

/// Checks a number setting: 0 means the default, else within `1..=max`.
pub(crate) fn setting_or_default(f: &str, value: u32, default: u32, max: u32) -> Result<u32, Error> {
    match value {
        0 => Ok(default),
        v if v > max => Err(invalid(format!("{f}: {v}, at most {max} allowed"))),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination() -> Destination {
        Destination {
            id: "d".into(),
            name: "n".into(),
            url: "https://example.com/hook".into(),
            headers: BTreeMap::new(),
            signing_secret: String::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_attempts: 3,
            max_retry_age_secs: 60,
            concurrency: 1,
            paused: false,
            created_at: Timestamp::now(),
            updated_at: Timestamp::now(),
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_ten_minutes_within_half_either_way() {
        let nominal: Vec<u64> = (1..=12).map(|n| nominal_backoff_ms(n, 1000)).collect();
        assert_eq!(&nominal[..4], &[1000, 2000, 4000, 8000]);
        assert_eq!(nominal[10], MAX_BACKOFF_MS);
        assert_eq!(nominal_backoff_ms(40, 1000), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(3, 1000, 0.5, None), 2000);
        assert_eq!(backoff_ms(3, 1000, 1.4999, None), 5999);
        // Retry-After is never undercut, up to the cap.
        assert_eq!(backoff_ms(1, 1000, 1.0, Some(30)), 30_000);
        assert_eq!(backoff_ms(1, 1000, 1.0, Some(100_000)), MAX_BACKOFF_MS);
    }

    #[test]
    fn a_failure_is_retried_until_attempts_or_age_run_out() {
        let d = destination();
        let now = Timestamp::now();
        let mut s = DeliveryState {
            attempts: 1,
            last_status: 500,
            last_error: String::new(),
            first_attempt_at: now,
            last_attempt_at: now,
            next_at: now,
        };
        assert!(after_failure(&d, &s, now, 1000).is_some());
        // The next attempt would come after max_retry_age.
        assert_eq!(after_failure(&d, &s, now, 61_000), None);
        s.attempts = 3;
        assert_eq!(after_failure(&d, &s, now, 1000), None);
    }

    #[test]
    fn outcomes_follow_the_status() {
        assert_eq!(Attempt::of_status(204, String::new(), None), Attempt::Delivered);
        for s in [408, 429, 500, 503] {
            assert!(matches!(
                Attempt::of_status(s, String::new(), None),
                Attempt::Failed { .. }
            ));
        }
        for s in [301, 400, 404, 410] {
            assert!(matches!(
                Attempt::of_status(s, String::new(), None),
                Attempt::Refused { .. }
            ));
        }
    }

    #[test]
    fn private_addresses_are_recognised() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "fec0::1",
            "198.18.0.1",
        ] {
            assert!(is_private(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_private(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn urls_are_checked() {
        let t = check_url("u", "http://[::1]:8080/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.ip, Some("::1".parse().unwrap()));
        assert_eq!(check_url("u", "https://example.com/").unwrap().port, 443);
        for bad in [
            "",
            "ftp://x/",
            "/relative",
            "http://user:pw@example.com/",
            "https://x/#f",
        ] {
            assert!(check_url("u", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_whsec_secret_is_its_base64_key() {
        let mut d = destination();
        d.signing_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
        assert_eq!(d.signing_key().unwrap().len(), 24);
        d.signing_secret = "plain".into();
        assert_eq!(d.signing_key().unwrap(), b"plain");
        assert!(check_settings("d", "n", &BTreeMap::new(), "whsec_!!").is_err());
        let reserved = BTreeMap::from([("Webhook-Id".to_string(), "x".to_string())]);
        assert!(check_settings("d", "n", &reserved, "").is_err());
    }
}
