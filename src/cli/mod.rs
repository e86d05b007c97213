//! The command-line client: `engage track`, `timeline`, `triggers`, `tail`, `stats`, `users`,
//! `erase`, through the generated gRPC client and the public API only.
//!
//! Output is for people by default, one JSON object a line with `--json` (protobuf's JSON
//! mapping, the one grpcurl prints, read and written through the descriptor set the server
//! embeds). Errors are one line on stderr, `engage: CODE: message`, and the exit code says what
//! went wrong, so scripts can rely on it:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | any other error the server answered |
//! | 2 | bad command line, or a file that cannot be read or parsed |
//! | 3 | the server cannot be reached, or is unavailable |
//! | 4 | NOT_FOUND |
//! | 5 | INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS |
//! | 6 | UNAUTHENTICATED, PERMISSION_DENIED |
//! | 7 | RESOURCE_EXHAUSTED (a rate limit: retry later) |

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub use commands::{ClientCommand, TriggersAction};

/// How the client reaches the server (every client subcommand takes these).
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The server: host:port, or a URL (https:// for TLS).
    #[arg(long, env = "ENGAGE_SERVER", default_value = "127.0.0.1:50051")]
    pub server: String,
    /// An API key (`engage keys create`), sent as `authorization: Bearer KEY`.
    #[arg(long, env = "ENGAGE_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// A CA certificate (PEM) the server's certificate must be signed by (implies TLS).
    #[arg(long, env = "ENGAGE_CA")]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM) for servers that require one (mTLS), with --client-key.
    #[arg(long, env = "ENGAGE_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "ENGAGE_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// One JSON object a line (protobuf JSON), for scripts.
    #[arg(long)]
    pub json: bool,
}

/// A failure: its message and the exit code it maps to.
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => 3,
            Code::NotFound => 4,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::AlreadyExists => 5,
            Code::Unauthenticated | Code::PermissionDenied => 6,
            Code::ResourceExhausted => 7,
            _ => 1,
        };
        let name = crate::telemetry::code_name(s.code() as i32);
        Failure {
            code,
            message: format!("{name}: {}", s.message().replace('\n', " ")),
        }
    }
}

/// Writes one line to standard output; a closed pipe (`engage tail | head -1`) ends the
/// command quietly with success.
pub(crate) fn emit(line: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure {
            code: 0,
            message: String::new(),
        }),
        Err(e) => Err(Failure {
            code: 1,
            message: format!("standard output: {e}"),
        }),
    }
}

/// Runs one client command; answers the process's exit code.
pub fn run(command: ClientCommand) -> ExitCode {
    let client = command.client().clone();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("engage: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let connection = Connection::open(&client).await?;
        commands::run(&connection, command).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.message.is_empty() => ExitCode::from(f.code),
        Err(f) => {
            eprintln!("engage: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A connected client: the channel, the key, the output mode and the descriptors.
pub(crate) struct Connection {
    pub(crate) channel: Channel,
    key: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    pub(crate) json: bool,
    pool: DescriptorPool,
}

impl Connection {
    async fn open(a: &ClientArgs) -> Result<Self, Failure> {
        let tls = a.ca.is_some() || a.client_cert.is_some() || a.server.starts_with("https://");
        if tls && a.server.starts_with("http://") {
            return Err(Failure::usage(format!(
                "--server {:?}: TLS options (--ca, --client-cert) need https://, not http://",
                a.server
            )));
        }
        let url = if a.server.contains("://") {
            a.server.clone()
        } else if tls {
            format!("https://{}", a.server)
        } else {
            format!("http://{}", a.server)
        };
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|e| Failure::usage(format!("--server {:?}: {e}", a.server)))?
            .connect_timeout(std::time::Duration::from_secs(10));
        if tls {
            let mut config = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &a.ca {
                let pem =
                    std::fs::read(ca).map_err(|e| Failure::usage(format!("--ca {}: {e}", ca.display())))?;
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&a.client_cert, &a.client_key) {
                let c = std::fs::read(cert)
                    .map_err(|e| Failure::usage(format!("--client-cert {}: {e}", cert.display())))?;
                let k = std::fs::read(key)
                    .map_err(|e| Failure::usage(format!("--client-key {}: {e}", key.display())))?;
                config = config.identity(Identity::from_pem(c, k));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| Failure::usage(format!("TLS: {e}")))?;
        }
        let key = match &a.key {
            Some(k) => Some(
                format!("Bearer {k}")
                    .parse()
                    .map_err(|_| Failure::usage("--key: not a valid key"))?,
            ),
            None => None,
        };
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| Failure::usage(format!("descriptors: {e}")))?;
        let channel = endpoint.connect().await.map_err(|e| Failure {
            code: 3,
            message: format!(
                "UNAVAILABLE: cannot connect to {url}: {}",
                crate::error::chain(&e)
            ),
        })?;
        Ok(Connection {
            channel,
            key,
            json: a.json,
            pool,
        })
    }

    /// A request with the key attached.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(k) = &self.key {
            r.metadata_mut().insert("authorization", k.clone());
        }
        r
    }

    /// `message` as one line of protobuf JSON (`name`: its full name, `engage.v1.Event`).
    pub(crate) fn to_json<T: prost::Message>(&self, name: &str, message: &T) -> String {
        let Some(desc) = self.pool.get_message_by_name(name) else {
            return "{}".into();
        };
        let mut dynamic = DynamicMessage::new(desc);
        if dynamic.transcode_from(message).is_err() {
            return "{}".into();
        }
        serde_json::to_string(&dynamic).unwrap_or_else(|_| "{}".into())
    }

    /// Parses protobuf JSON (what `--json` prints, and what grpcurl takes) as message `name`.
    pub(crate) fn parse_json<T: prost::Message + Default>(
        &self,
        name: &str,
        text: &str,
    ) -> Result<T, String> {
        let desc = self
            .pool
            .get_message_by_name(name)
            .ok_or_else(|| format!("no message {name}"))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let dynamic = DynamicMessage::deserialize(desc, &mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        dynamic.transcode_to::<T>().map_err(|e| e.to_string())
    }
}
