//! Wires storage, the domain and the gRPC services together, and runs them until shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use std::sync::Arc;

use crate::access::tls::TlsFiles;
use crate::access::Access;
use crate::api::actions::ActionApi;
use crate::api::destinations::DestinationApi;
use crate::api::events::EventApi;
use crate::api::gate::GateLayer;
use crate::api::query::QueryApi;
use crate::api::schema::SchemaApi;
use crate::api::triggers::TriggerApi;
use crate::config::ServeArgs;
use crate::engine::{Ingest, IngestThreads};
use crate::proto;
use crate::proto::action_service_server::ActionServiceServer;
use crate::proto::destination_service_server::DestinationServiceServer;
use crate::proto::event_service_server::EventServiceServer;
use crate::proto::query_service_server::QueryServiceServer;
use crate::proto::schema_service_server::SchemaServiceServer;
use crate::proto::trigger_service_server::TriggerServiceServer;
use crate::read::actions::ActionLog;
use crate::store::Store;

/// Any start-up or shutdown failure of the server.
pub type ServerError = Box<dyn std::error::Error + Send + Sync>;

/// The fully-qualified names of the engage services, as health and reflection know them.
const SERVICE_NAMES: &[&str] = &[
    <EventServiceServer<EventApi> as NamedService>::NAME,
    <SchemaServiceServer<SchemaApi> as NamedService>::NAME,
    <TriggerServiceServer<TriggerApi> as NamedService>::NAME,
    <ActionServiceServer<ActionApi> as NamedService>::NAME,
    <QueryServiceServer<QueryApi> as NamedService>::NAME,
    <DestinationServiceServer<DestinationApi> as NamedService>::NAME,
];

/// A generated service server with the largest message accepted and sent set to `max` bytes.
macro_rules! limited {
    ($server:ident, $api:expr, $max:expr) => {
        $server::new($api)
            .max_decoding_message_size($max)
            .max_encoding_message_size($max)
    };
}

/// HTTP/2 receive windows. hyper's 64 KiB default makes a 100 KiB TrackEvents batch wait for
/// window updates (measured: batched ingest was bound by round trips, not CPU).
pub const STREAM_WINDOW: Option<u32> = Some(2 * 1024 * 1024);
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: Option<u32> = Some(8 * 1024 * 1024);

/// Binds `args.listen` and serves until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), ServerError> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    serve(listener, args, shutdown_signal()).await
}

/// Serves on an already-bound listener until `shutdown` completes, then shuts down gracefully:
/// health turns NOT_SERVING, new connections are refused, in-flight calls get
/// `shutdown_grace_secs` to finish, every accepted write is flushed. Tests call this directly
/// with a pre-bound ephemeral port.
pub async fn serve(
    listener: TcpListener,
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = listener.local_addr()?;
    // First of all: a SIGHUP sent while the server starts (an operator's reload) must not find
    // the default action, which ends the process.
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let hup = None::<()>;
    if args.max_message_bytes < 64 * 1024 {
        return Err(format!(
            "--max-message-bytes {} is below 65536: nothing useful fits such messages",
            args.max_message_bytes
        )
        .into());
    }
    let access = Arc::new(
        Access::new(
            args.api_keys_file.clone(),
            args.ingest_rate_per_key,
            args.ingest_burst,
        )
        .map_err(|e| format!("--api-keys-file: {e}"))?,
    );
    let cors = cors(&args.cors_allowed_origins)?;
    warn_about_rate_limits(&args);
    if !access.has_keys() && !addr.ip().is_loopback() && !args.insecure {
        return Err(format!(
            "refusing to listen on {addr} without --api-keys-file: anyone reaching it could read and erase every user's data; create keys with `engage keys create`, or pass --insecure"
        )
        .into());
    }
    let tls_files = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca.clone(),
        });
    let tls = match &tls_files {
        Some(files) => Some(Arc::new(parking_lot::RwLock::new(
            crate::access::tls::load(files).map_err(|e| format!("TLS: {e}"))?,
        ))),
        None => None,
    };
    let metrics = match args.metrics_listen {
        Some(at) => Some(bind_metrics(at).await?),
        None => None,
    };
    let store = open_store(&args)?;
    let (ingest, threads) = Ingest::start(store.clone(), args.limits())?;
    // Before anyone reads: no user a stop left half erased is ever served.
    ingest.resume_erasures().await?;
    let keeper = ingest.keep_rollups();

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let (stop_streams, streams_stopped) = tokio::sync::watch::channel(false);
    let log = ActionLog::new(
        store.clone(),
        ingest.clone(),
        &args.delivery(),
        streams_stopped.clone(),
    );
    let (deliveries, delivery_engine) = crate::deliver::Deliveries::start(
        &ingest,
        store.clone(),
        args.destinations(),
        streams_stopped.clone(),
    )?;
    let retention = tokio::spawn(expire_actions(
        log.clone(),
        Duration::from_secs(args.retention_check_secs.max(1)),
        streams_stopped,
    ));

    // The handler is registered before the pid file names this process: a SIGUSR1 never finds
    // the default action (which would end the server).
    #[cfg(unix)]
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
    #[cfg(not(unix))]
    let usr1 = None;
    let backups = tokio::spawn(serve_backups(ingest.clone(), args.data_dir.clone(), usr1));
    let pid_file = PidFile::write(args.data_dir.join(PID_FILE));
    let metrics_addr = metrics
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let reloads = tokio::spawn(serve_reloads(hup, access.clone(), tls_files.clone(), tls.clone()));
    let metrics_server = metrics.map(|(listener, handle)| {
        let scrape = Scrape {
            handle,
            ingest: ingest.clone(),
            store: store.clone(),
            log: log.clone(),
            data_dir: args.data_dir.clone(),
        };
        tokio::spawn(serve_metrics(listener, scrape))
    });

    tracing::info!(
        listen = %addr,
        tls = tls.is_some(),
        mtls = args.tls_client_ca.is_some(),
        keys = access.has_keys(),
        metrics_listen = %metrics_addr,
        config = ?args,
        "engage started"
    );

    // When shutdown began: the one deadline of calls and engine together is a grace period later.
    let (started_tx, started_rx) = tokio::sync::watch::channel(None::<tokio::time::Instant>);
    let health_on_stop = health.clone();
    let on_shutdown = async move {
        shutdown.await;
        tracing::info!("shutdown requested; refusing new calls");
        set_health(&health_on_stop, ServingStatus::NotServing).await;
        // Open streams would hold graceful shutdown forever: end them now.
        let _ = stop_streams.send(true);
        let _ = started_tx.send(Some(tokio::time::Instant::now()));
    };
    // Outermost first: CORS answers preflights, grpc-web becomes gRPC, then the gate.
    let mut builder = Server::builder()
        .accept_http1(true)
        .layer(cors)
        .layer(crate::api::http::GrpcWebOnlyLayer)
        .layer(GateLayer {
            access: access.clone(),
        })
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let http = crate::api::http::router(crate::api::segment::SegmentApi {
        ingest: ingest.clone(),
        access: access.clone(),
        max_body_bytes: args.max_message_bytes,
    });
    let server = builder
        .add_routes(tonic::service::Routes::from(http))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // `log` moves into the action service: no handle to the engine outlives the services here
    // but `ingest`, which `stop_engine` drops.
    let server = engage_services(
        server,
        &ingest,
        &store,
        log,
        &deliveries,
        &access,
        args.max_message_bytes,
    )
    .serve_with_incoming_shutdown(crate::net::incoming(listener, tls), on_shutdown);

    // One grace period for the whole shutdown, calls and engine together.
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let grace_over = {
        let mut started = started_rx.clone();
        async move {
            match started.wait_for(Option::is_some).await.map(|s| *s) {
                Ok(Some(at)) => tokio::time::sleep_until(at + grace).await,
                _ => std::future::pending().await,
            }
        }
    };
    tokio::select! {
        result = server => result?,
        _ = grace_over => tracing::warn!(grace_secs = args.shutdown_grace_secs, "grace period over; closing remaining calls"),
    }

    retention.abort();
    delivery_engine.abort();
    backups.abort();
    reloads.abort();
    keeper.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    drop(pid_file);
    let left = || {
        started_rx.borrow().map_or(grace, |at| {
            (at + grace).saturating_duration_since(tokio::time::Instant::now())
        })
    };
    // Destinations record what they delivered before the engine stops, in at most half of
    // what is left of the grace period (an attempt cut off repeats after the next start).
    deliveries.stop(left() / 2).await;
    let left = left();
    stop_engine(ingest, threads, &store, left).await?;
    tracing::info!("engage stopped");
    Ok(())
}

/// The CORS policy of `--cors-allowed-origins`: none, a list, or `*` for any origin. Requests
/// carry keys in `authorization`, never cookies, so no credentials mode is needed. An entry that
/// is not an origin (`scheme://host[:port]`, as browsers send it: no path, no trailing `/`)
/// would never match, so it refuses the start.
fn cors(origins: &str) -> Result<tower_http::cors::CorsLayer, String> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let mut list = Vec::new();
    let mut any = false;
    for o in origins.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if o == "*" {
            any = true;
            continue;
        }
        let uri: http::Uri = o
            .parse()
            .map_err(|_| format!("--cors-allowed-origins: {o:?} is not an origin"))?;
        let origin_only = matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.authority().is_some()
            && uri
                .path_and_query()
                .is_none_or(|p| matches!(p.as_str(), "" | "/"))
            && !o.ends_with('/');
        if !origin_only {
            return Err(format!(
                "--cors-allowed-origins: {o:?} is not an origin (scheme://host[:port], no path)"
            ));
        }
        list.push(
            http::HeaderValue::from_str(o)
                .map_err(|_| format!("--cors-allowed-origins: {o:?} is not an origin"))?,
        );
    }
    let allow = if any {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(list)
    };
    // Named, not `*`: the Fetch standard does not let a wildcard cover `authorization`.
    let headers = [
        "authorization",
        "content-type",
        "content-encoding",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ]
    .map(http::HeaderName::from_static);
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([http::Method::GET, http::Method::POST, http::Method::OPTIONS])
        .allow_headers(headers)
        .expose_headers([
            http::HeaderName::from_static("grpc-status"),
            http::HeaderName::from_static("grpc-message"),
            http::HeaderName::from_static("grpc-status-details-bin"),
            http::header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(3600)))
}

/// Adds engage's own services to `router`, each limited to messages of `max` bytes.
fn engage_services<L>(
    router: Router<L>,
    ingest: &Ingest,
    store: &Store,
    log: ActionLog,
    deliveries: &crate::deliver::Deliveries,
    access: &Arc<Access>,
    max: usize,
) -> Router<L> {
    let permits = crate::api::query::query_permits();
    let events = limited!(
        EventServiceServer,
        EventApi {
            ingest: ingest.clone(),
            store: store.clone(),
            access: access.clone(),
        },
        max
    );
    let schema = limited!(
        SchemaServiceServer,
        SchemaApi {
            ingest: ingest.clone()
        },
        max
    );
    let triggers = limited!(
        TriggerServiceServer,
        TriggerApi {
            ingest: ingest.clone()
        },
        max
    );
    let actions = limited!(
        ActionServiceServer,
        ActionApi {
            ingest: ingest.clone(),
            log,
            store: store.clone(),
            permits: permits.clone(),
        },
        max
    );
    let queries = limited!(
        QueryServiceServer,
        QueryApi::new(ingest.clone(), store.clone(), permits),
        max
    );
    let destinations = limited!(
        DestinationServiceServer,
        DestinationApi {
            ingest: ingest.clone(),
            store: store.clone(),
            deliveries: deliveries.clone(),
        },
        max
    );
    router
        .add_service(destinations)
        .add_service(events)
        .add_service(schema)
        .add_service(triggers)
        .add_service(actions)
        .add_service(queries)
}

/// Opens the store in the data directory, creating the directory if missing.
fn open_store(args: &ServeArgs) -> Result<Store, ServerError> {
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", args.data_dir.display()))?;
    Ok(Store::open(&args.data_dir, &args.store_options())
        .map_err(|e| format!("cannot open storage in {}: {e}", args.data_dir.display()))?)
}

/// Drops the last handle to the engine and waits for its threads: the writer drains what it
/// accepted, the committer flushes it and both threads end; then a final flush.
async fn stop_engine(
    ingest: Ingest,
    threads: IngestThreads,
    store: &Store,
    grace: Duration,
) -> Result<(), ServerError> {
    drop(ingest);
    let joined = tokio::time::timeout(grace, tokio::task::spawn_blocking(move || threads.join())).await;
    if joined.is_err() {
        tracing::warn!("ingest threads still busy after the grace period");
    }
    store.flush().map_err(|e| format!("final flush failed: {e}"))?;
    Ok(())
}

/// Sets every engage service, and the server as a whole, to `status`.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES.iter().chain(&[""]) {
        health.set_service_status(*name, status).await;
    }
}

/// A reflection service builder over engage's and health's descriptors (for v1 and v1alpha).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Accepted connections with Nagle's algorithm off: `serve_with_incoming` does not apply the
/// builder's `tcp_nodelay`, and with Nagle on every reply waited ~40 ms for a delayed ACK.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Deletes expired actions every `every` until `stopped` turns true.
async fn expire_actions(log: ActionLog, every: Duration, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        match log.expire().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired fired actions"),
            Err(e) => tracing::error!(error = %e, "expiring fired actions failed"),
        }
    }
}

/// The running server's process id, in its data directory (for `engage backup`).
const PID_FILE: &str = "engage.pid";
/// Where `engage backup` leaves the target directory for the server: `backup.request.ID`, one
/// file per request (`ID` is the requesting process), answered in `backup.result.ID`.
const BACKUP_REQUEST: &str = "backup.request";
/// Where the server answers a backup request: `ok` and the backup's description, or `error: ...`.
const BACKUP_RESULT: &str = "backup.result";

/// Takes a backup whenever SIGUSR1 arrives with a request in the data directory (see
/// `engage backup`), and answers it there.
/// The pid file of a running server, removed however `serve` returns.
struct PidFile(std::path::PathBuf);

impl PidFile {
    fn write(path: std::path::PathBuf) -> Self {
        if let Err(e) = std::fs::write(&path, std::process::id().to_string()) {
            tracing::warn!(error = %e, path = %path.display(), "cannot write the pid file; engage backup will not find this server");
        }
        Self(path)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(unix)]
type Usr1 = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Usr1 = Option<()>;

async fn serve_backups(ingest: Ingest, data_dir: std::path::PathBuf, usr1: Usr1) {
    #[cfg(unix)]
    {
        let Some(mut signals) = usr1 else {
            tracing::warn!("cannot listen for SIGUSR1: engage backup is unavailable");
            return;
        };
        while signals.recv().await.is_some() {
            for (id, target) in backup_requests(&data_dir) {
                answer_backup(&ingest, &data_dir, &id, target).await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (ingest, data_dir, usr1);
        std::future::pending::<()>().await
    }
}

/// The backup requests waiting in a data directory (taken: their files are removed), by id.
fn backup_requests(data_dir: &std::path::Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    let prefix = format!("{BACKUP_REQUEST}.");
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix(&prefix) else {
            continue;
        };
        if let Ok(target) = std::fs::read_to_string(entry.path()) {
            let _ = std::fs::remove_file(entry.path());
            out.push((id.to_string(), std::path::PathBuf::from(target.trim())));
        }
    }
    out.sort();
    out
}

/// Takes one requested backup and leaves the answer where its requester waits.
async fn answer_backup(ingest: &Ingest, data_dir: &std::path::Path, id: &str, target: std::path::PathBuf) {
    tracing::info!(target = %target.display(), "backup requested");
    let answer = match ingest.backup(target.clone()).await {
        Ok(b) => {
            tracing::info!(target = %target.display(), events = b.event_seq, keys = b.keys, bytes = b.bytes, ms = b.millis, "backup taken");
            format!("ok {}", serde_json::to_string(&b).unwrap_or_default())
        }
        Err(e) => {
            tracing::error!(error = %e, target = %target.display(), "backup failed");
            // For the operator, on this machine: the whole reason.
            format!("error: {e}")
        }
    };
    let tmp = data_dir.join(format!("{BACKUP_RESULT}.{id}.tmp"));
    if std::fs::write(&tmp, answer)
        .and_then(|_| std::fs::rename(&tmp, data_dir.join(format!("{BACKUP_RESULT}.{id}"))))
        .is_err()
    {
        tracing::error!("cannot write the backup result");
    }
}

/// The pid in a data directory's pid file, if it names a running `engage serve` (a stale file
/// from a killed server may name an unrelated process, which must never be signalled).
fn running_server(data_dir: &std::path::Path) -> Result<u32, ServerError> {
    let text = std::fs::read_to_string(data_dir.join(PID_FILE))
        .map_err(|e| format!("no server runs on {} ({e})", data_dir.display()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("{}: not a process id", data_dir.join(PID_FILE).display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_engage =
        args.first().is_some_and(|a| a.ends_with(b"engage")) && args.contains(&b"serve".as_slice());
    if !is_engage {
        return Err(format!(
            "no server runs on {} (its pid file names process {pid}, which is not engage serve)",
            data_dir.display()
        )
        .into());
    }
    Ok(pid)
}

/// `engage backup`: asks the server running on a data directory for a backup, and waits for it.
pub fn backup(args: &crate::config::BackupArgs) -> Result<String, ServerError> {
    let pid = running_server(&args.data_dir)?.to_string();
    let target = std::path::absolute(&args.to).map_err(|e| format!("{}: {e}", args.to.display()))?;
    let id = std::process::id();
    let result = args.data_dir.join(format!("{BACKUP_RESULT}.{id}"));
    let _ = std::fs::remove_file(&result);
    // Written beside, then renamed: the server never reads half a request.
    let request = args.data_dir.join(format!("{BACKUP_REQUEST}.{id}"));
    let tmp = args.data_dir.join(format!(".{BACKUP_REQUEST}.{id}"));
    std::fs::write(&tmp, target.display().to_string())
        .and_then(|_| std::fs::rename(&tmp, &request))
        .map_err(|e| format!("cannot write the backup request: {e}"))?;
    let signalled = std::process::Command::new("kill")
        .args(["-USR1", pid.trim()])
        .status()
        .map_err(|e| format!("cannot signal the server: {e}"))?;
    if !signalled.success() {
        return Err(format!("cannot signal the server (pid {})", pid.trim()).into());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(args.wait_secs);
    loop {
        if let Ok(answer) = std::fs::read_to_string(&result) {
            let _ = std::fs::remove_file(&result);
            return match answer.strip_prefix("ok ") {
                Some(description) => Ok(description.to_string()),
                None => Err(answer.into()),
            };
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no answer from the server within {} s", args.wait_secs).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `engage restore`: copies a backup into an empty data directory and checks it.
pub fn restore(args: &crate::config::RestoreArgs) -> Result<String, ServerError> {
    let backup = crate::store::restore(&args.from, &args.data_dir).map_err(|e| {
        format!(
            "cannot restore {} into {}: {e}",
            args.from.display(),
            args.data_dir.display()
        )
    })?;
    Ok(serde_json::to_string(&backup).unwrap_or_default())
}

/// `engage compact`: compacts a stopped server's data directory (see `store::compact`).
pub fn compact(args: &crate::config::CompactArgs) -> Result<(), ServerError> {
    let compress = args.compression == crate::config::Compression::Zstd;
    let done = crate::store::compact(&args.data_dir, compress)
        .map_err(|e| format!("cannot compact {}: {e}", args.data_dir.display()))?;
    tracing::info!(
        keys = done.keys,
        bytes_before = done.bytes_before,
        bytes_after = done.bytes_after,
        "data directory compacted"
    );
    Ok(())
}

/// `engage keys`: manages a keys file.
pub fn keys(args: &crate::config::KeysArgs) -> Result<String, ServerError> {
    use crate::access::keys;
    use crate::config::KeysAction;
    Ok(match &args.action {
        KeysAction::Create { file, name, role } => keys::create(file, name, *role)?,
        KeysAction::List { file } => keys::list(file)?,
        KeysAction::Revoke { file, name } => {
            keys::revoke(file, name)?;
            format!("revoked {name:?}; a running server drops it on SIGHUP")
        }
    })
}

/// Re-reads the keys file and the TLS files on every SIGHUP; a file that fails to load keeps
/// what is in force (logged). Open connections and streams are not touched.
#[cfg(unix)]
type Hup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hup = Option<()>;

async fn serve_reloads(
    hup: Hup,
    access: Arc<Access>,
    files: Option<TlsFiles>,
    tls: Option<crate::net::TlsConfig>,
) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else {
            tracing::warn!("cannot listen for SIGHUP: keys and certificates are not reloaded");
            return;
        };
        while hup.recv().await.is_some() {
            match access.reload() {
                Ok(_) if !access.has_keys() => {}
                Ok(n) => tracing::info!(keys = n, "keys file reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "keys file not reloaded; the previous keys stay in force")
                }
            }
            if let (Some(files), Some(tls)) = (&files, &tls) {
                match crate::access::tls::load(files) {
                    Ok(config) => {
                        *tls.write() = config;
                        tracing::info!("TLS files reloaded; new connections use them");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS files not reloaded; the previous ones stay in force")
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (hup, access, files, tls);
    }
}

/// Rate-limit settings that are legal but probably not what the operator meant.
fn warn_about_rate_limits(args: &ServeArgs) {
    let rate = args.ingest_rate_per_key;
    let burst = if args.ingest_burst == 0 {
        rate
    } else {
        args.ingest_burst
    };
    if rate == 0 && args.ingest_burst != 0 {
        tracing::warn!("--ingest-burst has no effect without --ingest-rate-per-key");
    } else if rate > 0 && (burst as usize) < args.max_batch_events {
        tracing::warn!(
            burst,
            max_batch_events = args.max_batch_events,
            "a TrackEvents batch or /v1/batch body larger than the ingest burst is never admitted (INVALID_ARGUMENT, HTTP 400): Segment SDKs send up to 100 messages a batch by default, the snippet 20 (it splits refused batches); raise --ingest-burst or lower --max-batch-events"
        );
    }
}

/// Binds the metrics listener and installs the recorder.
async fn bind_metrics(
    at: std::net::SocketAddr,
) -> Result<(TcpListener, metrics_exporter_prometheus::PrometheusHandle), ServerError> {
    let listener = TcpListener::bind(at)
        .await
        .map_err(|e| format!("--metrics-listen {at}: {e}"))?;
    let handle = crate::telemetry::install()?;
    Ok((listener, handle))
}

/// Most named consumers a scrape exports (those furthest behind first).
const MAX_CONSUMER_SERIES: usize = 1000;

/// What a scrape reads.
#[derive(Clone)]
struct Scrape {
    handle: metrics_exporter_prometheus::PrometheusHandle,
    ingest: Ingest,
    store: Store,
    log: ActionLog,
    data_dir: std::path::PathBuf,
}

impl Scrape {
    /// The text format, with the state gauges set from the state now.
    fn render(&self) -> String {
        use crate::telemetry as t;
        let head = *self.ingest.durable_actions().borrow();
        metrics::gauge!(t::TIMERS_PENDING).set(self.ingest.pending_timers() as f64);
        metrics::gauge!(t::LOG_HEAD).set(head as f64);
        metrics::gauge!(t::SUBSCRIPTIONS_OPEN).set(self.log.open_subscriptions() as f64);
        match self.store.consumers() {
            Ok(mut consumers) => {
                // Bounded label sets: the consumers furthest behind, at most this many.
                consumers.sort_by_key(|(_, acked)| *acked);
                consumers.truncate(MAX_CONSUMER_SERIES);
                for (name, acked) in consumers {
                    metrics::gauge!(t::CONSUMER_ACKED, "consumer" => name.clone()).set(acked as f64);
                    metrics::gauge!(t::CONSUMER_LAG, "consumer" => name)
                        .set(head.saturating_sub(acked) as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the consumers"),
        }
        metrics::gauge!(t::STORAGE_BYTES).set(t::dir_bytes(&self.data_dir) as f64);
        self.handle.render()
    }
}

/// Serves `GET /metrics` (HTTP/1.1) until aborted.
async fn serve_metrics(listener: TcpListener, scrape: Scrape) {
    // Histogram samples are kept until drained: drained every few seconds whether or not
    // anyone scrapes, so memory does not grow with traffic while no scraper runs.
    let upkeep = {
        let handle = scrape.handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    };
    let _upkeep = AbortOnDrop(upkeep);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let scrape = scrape.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" && req.method() == http::Method::GET {
                        let text = tokio::task::spawn_blocking(move || scrape.render())
                            .await
                            .unwrap_or_default();
                        http::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                b"not found\n",
                            )))
                    };
                    response.map_err(|e| e.to_string())
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service)
                .await;
        });
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: a SIGTERM that arrives right after the start line (a supervisor,
/// a test) must stop the server gracefully, not kill it by the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        async move {
            tokio::select! {
                _ = recv(term) => {}
                _ = recv(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_must_be_origins() {
        assert!(cors("").is_ok());
        assert!(cors("*").is_ok());
        assert!(cors("https://shop.example, http://127.0.0.1:8080").is_ok());
        for bad in [
            "https://shop.example/",
            "https://shop.example/app",
            "shop.example",
            "ftp://x",
            "https://",
        ] {
            let e = cors(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains("--cors-allowed-origins") && e.contains(bad), "{e}");
        }
    }
}
