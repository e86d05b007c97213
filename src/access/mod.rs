//! Access control (SPEC §6): API keys and their roles, the keys file, TLS configuration and
//! per-key ingest rate limits. Knows nothing of tonic or sled: the api layer checks calls
//! against it, the server wires it to the listener.

pub(crate) mod keys;
pub(crate) mod rate;
pub(crate) mod tls;

use std::fmt;

/// What a key may do. `admin` may do everything; `ingest` and `read` only their own calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// TrackEvent, TrackEvents and the HTTP ingest endpoints.
    Ingest,
    /// Every read, SubscribeActions and AckActions.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    /// Whether a key of this role may make a call that needs `needed`.
    pub(crate) fn allows(self, needed: Role) -> bool {
        self == Role::Admin || self == needed
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who makes a call: the key's name and role (every call is allowed, as `anonymous`, when the
/// server runs without a keys file). Put in the request's extensions by the gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    /// Shared: a caller is cloned on every call (into the request, out of it).
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) role: Role,
    /// The address the call came from, when known (for the audit line).
    pub(crate) peer: Option<std::net::SocketAddr>,
}

static ANONYMOUS: std::sync::LazyLock<Caller> = std::sync::LazyLock::new(|| Caller {
    name: "anonymous".into(),
    role: Role::Admin,
    peer: None,
});

impl Caller {
    /// The caller of a server without keys (no allocation: every call of such a server is one).
    pub(crate) fn anonymous() -> Self {
        ANONYMOUS.clone()
    }
}

/// The access configuration of a running server: the keys (reloaded on SIGHUP) and the ingest
/// rate limits.
pub(crate) struct Access {
    keys_file: Option<std::path::PathBuf>,
    /// `None`: no keys file, every call allowed.
    keys: parking_lot::RwLock<Option<std::sync::Arc<keys::Keys>>>,
    pub(crate) ingest: rate::IngestLimits,
}

/// Why the ingest rate limit refused a call, with the message to answer.
#[derive(Debug)]
pub(crate) enum Limited {
    /// Over the rate: RESOURCE_EXHAUSTED (HTTP 429) with this wait.
    RetryAfter {
        wait: std::time::Duration,
        message: String,
    },
    /// More than the burst: INVALID_ARGUMENT (HTTP 400).
    TooLarge(String),
}

/// Why a credential was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No credential, or one no key has.
    Unauthenticated,
    /// A known key without the role the call needs.
    PermissionDenied { key: String, has: Role, needs: Role },
}

impl Access {
    /// Loads the keys file, if any (an error names the file).
    pub(crate) fn new(keys_file: Option<std::path::PathBuf>, rate: u32, burst: u32) -> Result<Self, String> {
        let keys = match &keys_file {
            Some(path) => Some(std::sync::Arc::new(keys::load(path)?)),
            None => None,
        };
        Ok(Self {
            keys_file,
            keys: parking_lot::RwLock::new(keys),
            ingest: rate::IngestLimits::new(rate, burst),
        })
    }

    /// Admits `events` events of `caller` under the ingest rate limit, whole or not at all. A
    /// refusal is counted (`engage_events_rejected_total`) and explained; `field` names what
    /// the count is of (`events`, `batch`).
    pub(crate) fn admit(&self, caller: &Caller, field: &str, events: usize) -> Result<(), Limited> {
        let refusal = match self.ingest.admit(&caller.name, events) {
            Ok(()) => return Ok(()),
            Err(r) => r,
        };
        use crate::telemetry::{rejected, Rejection};
        Err(match refusal {
            rate::Refusal::RetryAfter(wait) => {
                rejected(Rejection::RateLimited, events as u64);
                let wait = wait.max(std::time::Duration::from_millis(1));
                Limited::RetryAfter {
                    wait,
                    message: format!(
                        "rate limit: key {:?} may send {} events per second (ingest_rate_per_key); retry in {} ms",
                        caller.name,
                        self.ingest.rate(),
                        wait.as_millis()
                    ),
                }
            }
            // Never admissible whole: a limit of the call, answered and counted as one.
            rate::Refusal::LargerThanBurst(burst) => {
                rejected(Rejection::Limit, events as u64);
                Limited::TooLarge(format!(
                    "{field}: {events} events, more than the ingest burst of {burst} (ingest_burst) a call may ever send; split it"
                ))
            }
        })
    }

    /// Whether calls need a key.
    pub(crate) fn has_keys(&self) -> bool {
        self.keys_file.is_some()
    }

    /// Re-reads the keys file; on failure the keys in force stay. Answers how many keys.
    pub(crate) fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.keys_file else {
            return Ok(0);
        };
        let keys = keys::load(path)?;
        let n = keys.len();
        *self.keys.write() = Some(std::sync::Arc::new(keys));
        Ok(n)
    }

    /// The caller presenting `secret`, allowed a call that needs `needs`.
    pub(crate) fn check(&self, secret: Option<&str>, needs: Role) -> Result<Caller, Denied> {
        let keys = self.keys.read().clone();
        let Some(keys) = keys else {
            return Ok(Caller::anonymous());
        };
        let caller = secret
            .and_then(|s| keys.lookup(s))
            .ok_or(Denied::Unauthenticated)?;
        if caller.role.allows(needs) {
            Ok(caller)
        } else {
            Err(Denied::PermissionDenied {
                key: caller.name.to_string(),
                has: caller.role,
                needs,
            })
        }
    }
}

/// The secret of an `authorization` header: `Bearer SECRET`, or HTTP Basic with the secret as
/// the user name (what Segment SDKs send; the password is ignored).
pub(crate) fn secret_of(authorization: &str) -> Option<String> {
    let (scheme, rest) = authorization.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
        return Some(user.to_string());
    }
    None
}
