//! Command-line flags; each flag can also come from an `ENGAGE_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::domain::rules::Limits;
use crate::store::StoreOptions;

/// engage: user events and event-triggered automations over gRPC.
#[derive(Parser, Debug)]
#[command(name = "engage", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the gRPC server.
    Serve(Box<ServeArgs>),
    /// Rewrites a data directory with only its live data, so that nothing removed (an erased
    /// user's events included) is left in its files. The server must be stopped.
    Compact(CompactArgs),
    /// Asks the server running on a data directory for a consistent backup into an empty
    /// directory (SIGUSR1 with a request file), and waits for it.
    Backup(BackupArgs),
    /// Copies a backup into an empty data directory and checks that it opens.
    Restore(RestoreArgs),
    /// Manages the API keys file: create (prints the new secret once), list, revoke.
    Keys(KeysArgs),
    #[command(flatten)]
    Client(crate::cli::ClientCommand),
}

/// `engage keys`.
#[derive(clap::Args, Debug, Clone)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
}

/// What `engage keys` does.
#[derive(Subcommand, Debug, Clone)]
pub enum KeysAction {
    /// Adds a key (creating the file if missing) and prints its secret, the only line on stdout.
    Create {
        /// The keys file.
        #[arg(long, env = "ENGAGE_API_KEYS_FILE")]
        file: PathBuf,
        /// 1 to 64 letters, digits, `_`, `.` or `-`; unique in the file.
        #[arg(long)]
        name: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        role: crate::access::Role,
    },
    /// Lists the keys: name, role and creation time, one a line (never a secret).
    List {
        /// The keys file.
        #[arg(long, env = "ENGAGE_API_KEYS_FILE")]
        file: PathBuf,
    },
    /// Removes a key (a running server drops it on SIGHUP).
    Revoke {
        /// The keys file.
        #[arg(long, env = "ENGAGE_API_KEYS_FILE")]
        file: PathBuf,
        /// The key's name.
        #[arg(long)]
        name: String,
    },
}

/// Flags of `engage backup`.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupArgs {
    /// The running server's data directory.
    #[arg(long, env = "ENGAGE_DATA_DIR", default_value = "./engage-data")]
    pub data_dir: PathBuf,
    /// Where the backup goes (missing or empty).
    #[arg(long)]
    pub to: PathBuf,
    /// Longest wait for the server to answer, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait_secs: u64,
}

/// Flags of `engage restore`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup (a directory `engage backup` wrote).
    #[arg(long)]
    pub from: PathBuf,
    /// The data directory to restore into (missing or empty).
    #[arg(long, env = "ENGAGE_DATA_DIR", default_value = "./engage-data")]
    pub data_dir: PathBuf,
}

/// Flags of `engage compact`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompactArgs {
    /// The data directory to compact (in place).
    #[arg(long, env = "ENGAGE_DATA_DIR", default_value = "./engage-data")]
    pub data_dir: PathBuf,
    /// How the compacted copy is stored (see `engage serve --compression`).
    #[arg(long, env = "ENGAGE_COMPRESSION", value_enum, default_value_t = Compression::Zstd)]
    pub compression: Compression,
}

/// How a new data directory stores its pages. Chosen when the directory is created: an
/// existing one keeps what it was made with (sled refuses to change it), and `engage compact
/// --compression ...` rewrites it with another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// zstd level 1 on every page sled writes: about a quarter of the disk, at some cost in
    /// batched ingest (BENCHMARKS.md, issue 14).
    Zstd,
    /// Pages stored as they are: the fastest ingest, about four times the disk.
    None,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Flags of `engage serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A TOML file of settings, one `name = value` per flag (`listen = "0.0.0.0:50051"`,
    /// `max_batch_events = 500`); environment variables and flags override it.
    #[arg(long, env = "ENGAGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the start line logs the real one).
    #[arg(long, env = "ENGAGE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Directory of the embedded sled database (created if missing).
    #[arg(long, env = "ENGAGE_DATA_DIR", default_value = "./engage-data")]
    pub data_dir: PathBuf,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "ENGAGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// sled page cache size in MiB.
    #[arg(long, env = "ENGAGE_CACHE_MB", default_value_t = 256)]
    pub cache_mb: u64,
    /// sled background flush interval in ms (acknowledged writes are flushed explicitly anyway).
    #[arg(long, env = "ENGAGE_FLUSH_EVERY_MS", default_value_t = 500)]
    pub flush_every_ms: u64,
    /// How a data directory created by this start stores its pages (an existing one keeps its
    /// own; see `engage compact`).
    #[arg(long, env = "ENGAGE_COMPRESSION", value_enum, default_value_t = Compression::Zstd)]
    pub compression: Compression,
    /// Longest wait for in-flight calls on shutdown, in seconds.
    #[arg(long, env = "ENGAGE_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "ENGAGE_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Most attributes one event may carry.
    #[arg(long, env = "ENGAGE_MAX_ATTRIBUTES_PER_EVENT", default_value_t = 100)]
    pub max_attributes_per_event: usize,
    /// Longest attribute name, in characters.
    #[arg(long, env = "ENGAGE_MAX_ATTRIBUTE_NAME_CHARS", default_value_t = 128)]
    pub max_attribute_name_chars: usize,
    /// Largest STRING value, in bytes.
    #[arg(long, env = "ENGAGE_MAX_STRING_VALUE_BYTES", default_value_t = 8 * 1024)]
    pub max_string_value_bytes: usize,
    /// Largest JSON value, in bytes.
    #[arg(long, env = "ENGAGE_MAX_JSON_VALUE_BYTES", default_value_t = 64 * 1024)]
    pub max_json_value_bytes: usize,
    /// Most events in one TrackEvents call.
    #[arg(long, env = "ENGAGE_MAX_BATCH_EVENTS", default_value_t = 1000)]
    pub max_batch_events: usize,
    /// How long fired actions are kept in the log, in seconds (default 7 days).
    #[arg(long, env = "ENGAGE_ACTION_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub action_retention_secs: u64,
    /// How often expired actions are deleted, in seconds.
    #[arg(long, env = "ENGAGE_RETENTION_CHECK_SECS", default_value_t = 60)]
    pub retention_check_secs: u64,
    /// Most SubscribeActions streams open at once (more answer RESOURCE_EXHAUSTED).
    #[arg(long, env = "ENGAGE_MAX_SUBSCRIBERS", default_value_t = 1024)]
    pub max_subscribers: usize,
    /// Serve a data directory that lost acknowledged writes (its high-water mark says more was
    /// acknowledged than it holds) instead of refusing to start; the mark is reset to what it holds.
    #[arg(long, env = "ENGAGE_ACCEPT_DATA_LOSS")]
    pub accept_data_loss: bool,
    /// Most of a user's events one write group of DeleteUser erases: other writes go on between
    /// such slices.
    #[arg(long, env = "ENGAGE_MAX_ERASE_EVENTS_PER_GROUP", default_value_t = 10_000)]
    pub max_erase_events_per_group: usize,
    /// Most of a user's stored events one event's evaluation reads (history conditions with a
    /// window or `where`, and absence checks, together); an event that would need more is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ENGAGE_MAX_HISTORY_EVENTS", default_value_t = 100_000)]
    pub max_history_events: usize,
    /// Most history reads one write group does: once reached, a TrackEvents batch goes on in the
    /// next group, so other writes go through between its slices.
    #[arg(long, env = "ENGAGE_MAX_GROUP_HISTORY_READS", default_value_t = 100_000)]
    pub max_group_history_reads: usize,
    /// Bytes of actions one subscriber may hold between the log and its client (read, and
    /// waiting to be sent).
    #[arg(long, env = "ENGAGE_MAX_SUBSCRIBER_BUFFER_BYTES", default_value_t = 256 * 1024)]
    pub max_subscriber_buffer_bytes: usize,
    /// Bytes of actions all subscribers together may hold waiting to be sent.
    #[arg(long, env = "ENGAGE_MAX_SUBSCRIBERS_BUFFER_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_subscribers_buffer_bytes: usize,
    /// Keys a backup copies per slice: writes wait while a slice is copied and go on between.
    #[arg(long, env = "ENGAGE_BACKUP_SLICE_KEYS", default_value_t = 10_000)]
    pub backup_slice_keys: usize,
    /// Most conditions (nodes) in one trigger condition, absence check or filter.
    #[arg(long, env = "ENGAGE_MAX_CONDITION_NODES", default_value_t = 1000)]
    pub max_condition_nodes: usize,
    /// Deepest nesting of all/any/not/where in one condition.
    #[arg(long, env = "ENGAGE_MAX_CONDITION_DEPTH", default_value_t = 16)]
    pub max_condition_depth: usize,
    /// Most history conditions in one trigger or filter (each reads the user's history).
    #[arg(long, env = "ENGAGE_MAX_HISTORY_CONDITIONS", default_value_t = 50)]
    pub max_history_conditions: usize,
    /// The API keys file (`engage keys`): with it every call but health and reflection needs a
    /// key with the right role; without it every call is allowed (loopback only, unless
    /// `--insecure`). Re-read on SIGHUP.
    #[arg(long, env = "ENGAGE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Allow a non-loopback listen address without a keys file (anyone reaching the port may do
    /// everything).
    #[arg(long, env = "ENGAGE_INSECURE")]
    pub insecure: bool,
    /// The server's certificate chain (PEM): serve TLS on the listener (with --tls-key).
    /// Re-read on SIGHUP.
    #[arg(long, env = "ENGAGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, env = "ENGAGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM) every client certificate must be signed by: mTLS, clients without one are
    /// refused at the handshake.
    #[arg(long, env = "ENGAGE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Events per second each key may send (TrackEvent, TrackEvents); 0 means no limit. Without
    /// keys one limit applies to all callers.
    #[arg(long, env = "ENGAGE_INGEST_RATE_PER_KEY", default_value_t = 0)]
    pub ingest_rate_per_key: u32,
    /// Events a key may send at once above its rate; 0 means one second's worth.
    #[arg(long, env = "ENGAGE_INGEST_BURST", default_value_t = 0)]
    pub ingest_burst: u32,
    /// Origins whose browsers may call the HTTP endpoints and grpc-web (comma-separated; `*`
    /// allows any; none by default), preflight included.
    #[arg(long, env = "ENGAGE_CORS_ALLOWED_ORIGINS", default_value = "")]
    pub cors_allowed_origins: String,
    /// Serve Prometheus metrics at GET /metrics on this address (no keys: bind it privately).
    #[arg(long, env = "ENGAGE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Let destinations reach loopback, private and link-local addresses (refused by default, at
    /// creation and at every delivery: a webhook must not become a way into the private network).
    #[arg(long, env = "ENGAGE_ALLOW_PRIVATE_DESTINATIONS")]
    pub allow_private_destinations: bool,
    /// The first retry's nominal delay of a delivery, in milliseconds (SPEC: 1 s; for tests).
    #[arg(
        long,
        env = "ENGAGE_DELIVERY_BACKOFF_BASE_MS",
        default_value_t = 1000,
        hide = true
    )]
    pub delivery_backoff_base_ms: u64,
    /// How long a destination fails before it is suspended, in seconds (SPEC: 5 min; for tests).
    #[arg(
        long,
        env = "ENGAGE_DELIVERY_SUSPEND_AFTER_SECS",
        default_value_t = 300,
        hide = true
    )]
    pub delivery_suspend_after_secs: u64,
    /// How far in the future occurred_at may be, in seconds.
    #[arg(long, env = "ENGAGE_MAX_FUTURE_SKEW_SECS", default_value_t = 24 * 3600)]
    pub max_future_skew_secs: i64,
}

/// Applies the config file named on `args` (`--config F`, `--config=F`) or by `ENGAGE_CONFIG`,
/// if any, before the flags are parsed: each setting becomes its flag's `ENGAGE_*` variable
/// unless that variable is already set, so the environment and then the flags override the
/// file. A setting no flag of `engage serve` has is an error naming it.
pub fn apply_config_file(args: &[String]) -> Result<(), String> {
    let named = args.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_string)
        }
    });
    let Some(path) = named.or_else(|| std::env::var("ENGAGE_CONFIG").ok()) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?;
    for (variable, value) in settings(&path, &text)? {
        if std::env::var_os(&variable).is_none() {
            std::env::set_var(&variable, &value);
        }
    }
    Ok(())
}

/// The file's settings as (variable, value).
fn settings(path: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    use clap::Args;
    let table: toml::Table = text.parse().map_err(|e| format!("--config {path}: {e}"))?;
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut out = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let env = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .ok_or_else(|| format!("--config {path}: {key:?} is not a setting of engage serve"))?;
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "--config {path}: {key}: a string, number or boolean, not {}",
                    other.type_str()
                ))
            }
        };
        out.push((env, value));
    }
    Ok(out)
}

impl ServeArgs {
    /// The defaults, as `engage serve` with no flags and no environment would use them.
    pub fn defaults() -> Self {
        /// `engage serve`'s flags alone.
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        Serve::parse_from(["engage"]).args
    }

    /// The event and batch limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_attributes_per_event: self.max_attributes_per_event,
            max_attribute_name_chars: self.max_attribute_name_chars,
            max_string_value_bytes: self.max_string_value_bytes,
            max_json_value_bytes: self.max_json_value_bytes,
            max_batch_events: self.max_batch_events,
            max_future_skew_secs: self.max_future_skew_secs,
            max_message_bytes: self.max_message_bytes,
            max_condition_nodes: self.max_condition_nodes,
            max_condition_depth: self.max_condition_depth,
            max_history_conditions: self.max_history_conditions,
            max_erase_events_per_group: self.max_erase_events_per_group,
            max_history_events: self.max_history_events,
            max_group_history_reads: self.max_group_history_reads,
        }
    }

    /// The action delivery options.
    pub fn delivery(&self) -> crate::read::actions::DeliveryOptions {
        crate::read::actions::DeliveryOptions {
            max_subscribers: self.max_subscribers,
            retention_secs: self.action_retention_secs,
            buffer_bytes: self.max_subscriber_buffer_bytes,
            total_buffer_bytes: self.max_subscribers_buffer_bytes,
        }
    }

    /// The settings of the delivery engine (destinations).
    pub(crate) fn destinations(&self) -> crate::deliver::DeliverySettings {
        crate::deliver::DeliverySettings {
            allow_private: self.allow_private_destinations,
            backoff_base_ms: self.delivery_backoff_base_ms.max(1),
            suspend_after: std::time::Duration::from_secs(self.delivery_suspend_after_secs),
        }
    }

    /// The storage options.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            cache_capacity: self.cache_mb * 1024 * 1024,
            flush_every_ms: self.flush_every_ms,
            compress_new: self.compression == Compression::Zstd,
            accept_data_loss: self.accept_data_loss,
            backup_slice_keys: self.backup_slice_keys,
        }
    }
}
