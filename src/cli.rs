//! The command line: one binary, a subcommand per role.
//!
//! Every flag has a `STREAMER_*` environment variable, so the same image is
//! configured by flags in a terminal and by environment in Kubernetes.
//! Parsing turns flags into the typed configs of each crate; anything
//! invalid stops the process at start with a message naming the flag.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use streamer_auth::dev::MintOptions;
use streamer_auth::{AuthConfig, JwksRefresh, JwksSource};
use streamer_connection::apigateway::{ApiGatewayConfig, SdkManagementApi};
use streamer_connection::{ConnectionConfig, TopicsConfig};
use streamer_core::ids::{EdgeId, TenantId};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::Retention;
use streamer_core::store::{DynamoConfig, DynamoStore};
use streamer_core::telemetry::LogFormat;
use streamer_core::tls::{Tls, TlsFiles};
use streamer_core::trust::{Check, Role, ServiceTokens, Trust};
use streamer_gateway::GatewayConfig;
use streamer_gateway::apigateway::IntegrationConfig;
use streamer_progress::ProgressConfig;

use crate::{StoreChoice, SystemAddrs, SystemConfig, SystemListeners, dial_addr};

#[derive(Debug, Parser)]
#[command(
    name = "streamer",
    version,
    about = "Streamer: a control plane for real-time WebSocket applications",
    long_about = "Streamer holds your clients' WebSockets and lets your backends reach them over gRPC.\n\n\
                  Run `streamer all` for the whole system in one process, or one role per process \
                  (auth, connection, progress, gateway) for a deployment.",
    after_help = "Logs: STREAMER_LOG chooses which are written, as a filter such as `info` (the \
                  default) or `warn,streamer_gateway=debug`; --log-format (STREAMER_LOG_FORMAT) \
                  chooses how."
)]
pub struct Cli {
    /// Log format: `auto` writes coloured human-readable lines to a terminal
    /// and one JSON object per line anywhere else (a file, a pipe, a
    /// container's log); `json` and `plain` force one (colour only ever on a
    /// terminal). Which logs: the STREAMER_LOG filter, e.g. `info` or
    /// `warn,streamer_gateway=debug` (default info).
    #[arg(
        long,
        env = "STREAMER_LOG_FORMAT",
        value_enum,
        default_value = "auto",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run AuthService (gRPC, default 0.0.0.0:50051).
    Auth(AuthCmd),
    /// Run ConnectionService (gRPC, default 0.0.0.0:50052).
    Connection(ConnectionCmd),
    /// Run ProgressService (gRPC, default 0.0.0.0:50053).
    Progress(ProgressCmd),
    /// Run the WebSocket edge (HTTP/WS, default 0.0.0.0:8080).
    Gateway(Box<GatewayCmd>),
    /// Run all four roles in one process with the embedded store (on
    /// 127.0.0.1 unless told otherwise).
    All(Box<AllCmd>),
    /// Mint a JWT with the local development key (for demos and tests).
    Token(TokenCmd),
    /// Mint a service token for a backend, router or processor (mode
    /// `--trust token`), signed with the shared service secret.
    ServiceToken(ServiceTokenCmd),
    /// DynamoDB store administration.
    #[command(subcommand)]
    Dynamodb(DynamodbCmd),
    /// Issue a new CA and a certificate for each role, to try mode `mtls`
    /// (development and tests; production certificates come from your CA).
    Certs(CertsCmd),
    /// Print every metric family the roles export, one a line: name, type,
    /// labels, roles, HELP (separated by tabs).
    Metrics,
}

/// How gRPC callers are authenticated (see the README's "Trust").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrustMode {
    /// No credential is checked: any caller may call every method.
    None,
    /// Every call carries a service token signed with the shared secret.
    Token,
    /// Every call comes over TLS with a client certificate signed by the
    /// CA; the certificate's names grant its roles.
    Mtls,
}

#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// How gRPC callers are authenticated: `mtls` (client certificates
    /// signed by --tls-ca), `token` (service tokens signed with the secret in
    /// --service-secret-file) or `none` (anyone who reaches a port may call
    /// everything). Default: `token` when a secret file is given, else
    /// `mtls` when TLS files are; otherwise `none`, which is refused on a
    /// non-loopback address unless given explicitly.
    #[arg(long, env = "STREAMER_TRUST", value_enum)]
    pub trust: Option<TrustMode>,
    /// The secret every Streamer process shares in mode `token` (a file of
    /// at least 32 bytes). Backends get tokens minted with it
    /// (`streamer service-token`), never the secret itself.
    #[arg(long, env = "STREAMER_SERVICE_SECRET_FILE")]
    pub service_secret_file: Option<PathBuf>,
    /// This process's PEM certificate chain: gRPC servers serve TLS with it
    /// and clients present it (re-read when the file changes). With
    /// --tls-key and --tls-ca; every gRPC URL is then https://.
    #[arg(long, env = "STREAMER_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "STREAMER_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of the CA that signs every Streamer certificate: servers
    /// and clients are verified against it.
    #[arg(long, env = "STREAMER_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TrustArgs {
    /// The trust of a process that serves gRPC on `listens`.
    pub fn trust(&self, listens: &[SocketAddr]) -> anyhow::Result<Trust> {
        let tls = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(Tls::load(&TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })?),
            _ => None,
        };
        let mode = match (self.trust, &self.service_secret_file, &tls) {
            (Some(mode), _, _) => mode,
            (None, Some(_), _) => TrustMode::Token,
            (None, None, Some(_)) => TrustMode::Mtls,
            (None, None, None) => {
                if let Some(open) = listens.iter().find(|a| !a.ip().is_loopback()) {
                    anyhow::bail!(
                        "{open} is not a loopback address and no caller authentication is set: \
                         give --trust mtls with --tls-cert, --tls-key and --tls-ca, or --trust \
                         token with --service-secret-file, or --trust none to let anyone who \
                         reaches the port call everything"
                    );
                }
                TrustMode::None
            }
        };
        let trust = match (mode, &self.service_secret_file) {
            (TrustMode::None | TrustMode::Mtls, Some(_)) => {
                anyhow::bail!("--service-secret-file is used only with --trust token")
            }
            (TrustMode::None, None) => Trust::none(),
            (TrustMode::Token, None) => {
                anyhow::bail!("--trust token needs --service-secret-file")
            }
            (TrustMode::Token, Some(path)) => Trust::token(ServiceTokens::from_file(path)?),
            (TrustMode::Mtls, None) => {
                let tls = tls.clone().ok_or_else(|| {
                    anyhow::anyhow!("--trust mtls needs --tls-cert, --tls-key and --tls-ca")
                })?;
                Trust::mtls(tls)
            }
        };
        Ok(match tls {
            Some(tls) => trust.with_tls(tls),
            None => trust,
        })
    }
}

/// Where state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A file in the data directory, owned by one process.
    Embedded,
    /// DynamoDB tables that every replica shares.
    Dynamodb,
}

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Where state lives: `embedded` (a file in the data directory; one
    /// process) or `dynamodb` (tables shared by every replica; make them
    /// with `streamer dynamodb create-tables`).
    #[arg(long, env = "STREAMER_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    #[command(flatten)]
    pub dynamodb: DynamoArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DynamoArgs {
    /// Prefix of the DynamoDB table names (`<prefix>connections`, ...).
    #[arg(
        long = "dynamodb-table-prefix",
        env = "STREAMER_DYNAMODB_TABLE_PREFIX",
        default_value = "streamer-"
    )]
    pub table_prefix: String,
    /// AWS region of the tables; default: the standard chain (AWS_REGION,
    /// the profile).
    #[arg(long = "dynamodb-region", env = "STREAMER_DYNAMODB_REGION")]
    pub region: Option<String>,
    /// Another endpoint than AWS's, such as a local DynamoDB-protocol server
    /// (`http://127.0.0.1:8000`). Credentials come from the standard chain
    /// (AWS_ACCESS_KEY_ID, ...) either way.
    #[arg(long = "dynamodb-endpoint-url", env = "STREAMER_DYNAMODB_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
}

impl DynamoArgs {
    pub fn config(&self) -> DynamoConfig {
        DynamoConfig {
            table_prefix: self.table_prefix.clone(),
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
        }
    }
}

impl StoreArgs {
    pub fn choice(&self) -> StoreChoice {
        match self.store {
            StoreKind::Embedded => StoreChoice::Embedded,
            StoreKind::Dynamodb => StoreChoice::DynamoDb(self.dynamodb.config()),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Directory for the embedded store and the development key.
    #[arg(long, env = "STREAMER_DATA_DIR", default_value = ".streamer")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// Public keys that verify tokens: PEM files (RSA PKCS#1 or PKIX, EC,
    /// Ed25519), JWKS files, or directories of them; comma-separated. Files
    /// are re-read when they change. They verify every token whose `iss` is
    /// not an --auth-jwks issuer. Default: the development key in the data
    /// directory, created on first run, unless --auth-jwks is given.
    #[arg(long = "auth-keys", env = "STREAMER_AUTH_KEYS", value_delimiter = ',')]
    pub keys: Vec<PathBuf>,
    /// Issuers whose keys are fetched from a JWKS URL, as ISSUER=URL;
    /// comma-separated or repeated. A token whose `iss` is one of them is
    /// verified only with that issuer's keys, fetched at start, every
    /// --auth-jwks-refresh-secs, and at once (at most every 10 s) for an
    /// unknown `kid`. Without --auth-keys, only these issuers' tokens are
    /// accepted and no development key is used.
    #[arg(
        long = "auth-jwks",
        env = "STREAMER_AUTH_JWKS",
        value_delimiter = ',',
        value_name = "ISSUER=URL"
    )]
    pub jwks: Vec<JwksSource>,
    /// Seconds between scheduled fetches of each JWKS URL; a shorter
    /// `Cache-Control: max-age` in the answer wins.
    #[arg(
        long = "auth-jwks-refresh-secs",
        env = "STREAMER_AUTH_JWKS_REFRESH_SECS",
        default_value_t = 300
    )]
    pub jwks_refresh_secs: u64,
    /// Required `iss` claim of the tokens verified with --auth-keys, when
    /// set.
    #[arg(long = "auth-issuer", env = "STREAMER_AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long = "auth-audience", env = "STREAMER_AUTH_AUDIENCE")]
    pub audience: Option<String>,
    /// Tenants allowed to connect, comma-separated; default: every tenant.
    #[arg(long, env = "STREAMER_ALLOWED_TENANTS", value_delimiter = ',')]
    pub allowed_tenants: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    #[arg(
        long = "auth-leeway-secs",
        env = "STREAMER_AUTH_LEEWAY_SECS",
        default_value_t = 30
    )]
    pub leeway_secs: u64,
}

impl KeyArgs {
    /// Whether tokens are verified with the development key: neither key
    /// files nor JWKS URLs are given.
    pub fn uses_dev_key(&self) -> bool {
        self.keys.is_empty() && self.jwks.is_empty()
    }

    fn config(&self, data_dir: &Path) -> anyhow::Result<AuthConfig> {
        if self.jwks_refresh_secs == 0 {
            anyhow::bail!("--auth-jwks-refresh-secs must be at least 1");
        }
        let key_paths = if self.uses_dev_key() {
            streamer_auth::dev::ensure_dev_key(data_dir)
                .context("cannot create the development key")?;
            tracing::warn!(
                path = %streamer_auth::dev::public_key_path(data_dir).display(),
                "no --auth-keys or --auth-jwks given; using the development key (not for production)"
            );
            vec![streamer_auth::dev::public_key_path(data_dir)]
        } else {
            if self.keys.is_empty() {
                tracing::info!(
                    issuers = ?self.jwks.iter().map(|j| &j.issuer).collect::<Vec<_>>(),
                    "no --auth-keys given; only the --auth-jwks issuers' tokens are accepted"
                );
            }
            self.keys.clone()
        };
        Ok(AuthConfig {
            key_paths,
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            allowed_tenants: (!self.allowed_tenants.is_empty()).then(|| {
                self.allowed_tenants
                    .iter()
                    .map(|t| TenantId::from(t.as_str()))
                    .collect()
            }),
            leeway: Duration::from_secs(self.leeway_secs),
            jwks: self.jwks.clone(),
            jwks_refresh: JwksRefresh {
                interval: Duration::from_secs(self.jwks_refresh_secs),
                ..JwksRefresh::default()
            },
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// Messages of each topic's history kept for clients that reconnect
    /// and recover what they missed.
    #[arg(long, env = "STREAMER_TOPIC_HISTORY_MESSAGES", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub topic_history_messages: u64,
    /// How long, in seconds, a topic's messages are kept for recovery.
    #[arg(long, env = "STREAMER_TOPIC_HISTORY_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    pub topic_history_secs: u64,
    /// Topic patterns every client may subscribe itself to, comma-separated,
    /// beside those its token's `topics` claim allows (`*` one segment,
    /// a last `**` the rest, `{user_id}` the client's user:
    /// `users/{user_id}/**`).
    #[arg(long, env = "STREAMER_CLIENT_TOPICS", value_delimiter = ',')]
    pub client_topics: Vec<String>,
    /// Topic patterns whose slow consumers are conflated rather than
    /// closed: while a socket is behind, only the latest message of each key
    /// waits for it. Comma-separated.
    #[arg(long, env = "STREAMER_CONFLATE_TOPICS", value_delimiter = ',')]
    pub conflate_topics: Vec<String>,
}

impl TopicArgs {
    fn config(&self) -> anyhow::Result<TopicsConfig> {
        for (flag, patterns) in [
            ("--client-topics", &self.client_topics),
            ("--conflate-topics", &self.conflate_topics),
        ] {
            for pattern in patterns {
                if let Some(why) = streamer_core::topics::unusable_pattern(pattern) {
                    anyhow::bail!("{flag}: pattern {pattern:?} {why}");
                }
            }
        }
        Ok(TopicsConfig {
            retention: Retention {
                max_messages: self.topic_history_messages,
                max_age: Duration::from_secs(self.topic_history_secs),
            },
            client_topics: self.client_topics.clone(),
            conflated: self.conflate_topics.clone(),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ProgressArgs {
    /// Most progress messages per second sent to a client per request
    /// (newer progress replaces unsent older progress).
    #[arg(long, env = "STREAMER_PROGRESS_RATE", default_value_t = 10.0)]
    pub progress_rate: f64,
    /// Lease given to processors that ask for none, in seconds.
    #[arg(long, env = "STREAMER_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// Times a request is handed out before it fails for good.
    #[arg(long, env = "STREAMER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Actions queued as requests even before a processor has declared them,
    /// comma-separated. With several ProgressService replicas, list every
    /// async action: a replica otherwise accepts only the actions of the
    /// processors connected to it.
    #[arg(long, env = "STREAMER_ASYNC_ACTIONS", value_delimiter = ',')]
    pub async_actions: Vec<String>,
    /// How often, in milliseconds, the store is asked for work submitted
    /// through other replicas and for leases lapsed anywhere.
    #[arg(long, env = "STREAMER_STORE_POLL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub store_poll_ms: u64,
}

impl ProgressArgs {
    fn config(&self, connection_endpoint: String) -> anyhow::Result<ProgressConfig> {
        if !(self.progress_rate.is_finite()
            && (self.progress_rate == 0.0 || self.progress_rate >= 1.0 / 60.0))
        {
            anyhow::bail!("--progress-rate must be 0 (unlimited) or at least 1/60 (one a minute)");
        }
        if self.lease_secs == 0 || self.lease_secs > 3600 {
            anyhow::bail!("--lease-secs must be between 1 and 3600");
        }
        if self.max_attempts == 0 {
            anyhow::bail!("--max-attempts must be at least 1");
        }
        Ok(ProgressConfig {
            connection_endpoint,
            progress_rate: self.progress_rate,
            default_lease: Duration::from_secs(self.lease_secs),
            max_attempts: self.max_attempts,
            async_actions: self.async_actions.clone(),
            store_poll: Duration::from_millis(self.store_poll_ms),
            trust: Trust::none(),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct EdgeArgs {
    /// Largest client frame accepted, in bytes, enforced as it arrives: a
    /// larger one closes the socket with 1009.
    #[arg(long, env = "STREAMER_MAX_FRAME_BYTES", default_value_t = 1024 * 1024)]
    pub max_frame_bytes: usize,
    /// Messages per second one socket may send (a token bucket); 0: no
    /// limit. Past it, RATE_LIMITED; a client that keeps on is closed (1008).
    #[arg(long, env = "STREAMER_MESSAGE_RATE", default_value_t = 100.0)]
    pub message_rate: f64,
    /// Messages one socket may send at once, above the rate.
    #[arg(long, env = "STREAMER_MESSAGE_BURST", default_value_t = 200)]
    pub message_burst: u32,
    /// Most sockets this edge holds; past it, new clients get 503. Lowered
    /// to fit the process's open-file limit.
    #[arg(long, env = "STREAMER_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most clients being authenticated at once; past it, 503.
    #[arg(long, env = "STREAMER_MAX_HANDSHAKES", default_value_t = 1_000)]
    pub max_handshakes: usize,
    /// Seconds between the edge's pings to each socket.
    #[arg(long, env = "STREAMER_PING_INTERVAL_SECS", default_value_t = 30)]
    pub ping_interval_secs: u64,
    /// Seconds a socket may stay silent (not even a pong) before it is
    /// closed with 1001.
    #[arg(long, env = "STREAMER_IDLE_TIMEOUT_SECS", default_value_t = 75)]
    pub idle_timeout_secs: u64,
    /// New connections per second from one client IP address (loopback is
    /// exempt); 0: no limit. Past it, 503.
    #[arg(long, env = "STREAMER_CONNECTION_RATE_PER_IP", default_value_t = 20.0)]
    pub connection_rate_per_ip: f64,
    /// New connections one address may open at once, above the rate.
    #[arg(long, env = "STREAMER_CONNECTION_BURST_PER_IP", default_value_t = 100)]
    pub connection_burst_per_ip: u32,
    /// Seconds a client may take to send its request headers before the
    /// connection is closed.
    #[arg(long, env = "STREAMER_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Origins browsers may connect from, comma-separated (for example
    /// `https://app.example.com`); default: any.
    #[arg(long, env = "STREAMER_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Messages queued per socket before its client counts as a slow
    /// consumer and is closed (1008).
    #[arg(long, env = "STREAMER_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// The kernel's send buffer per socket, in bytes (default: the kernel
    /// tunes it, on Linux up to 4 MiB): how much a client that stops
    /// reading holds before its queue fills and it counts as slow.
    #[arg(long, env = "STREAMER_SOCKET_SEND_BUFFER", value_parser = clap::value_parser!(u64).range(4096..=64 * 1024 * 1024))]
    pub socket_send_buffer: Option<u64>,
    /// This edge's id (unique per process). Default: a random one.
    #[arg(long, env = "STREAMER_EDGE_ID")]
    pub edge_id: Option<String>,
}

impl EdgeArgs {
    fn config(
        &self,
        auth_endpoint: String,
        connection_endpoint: String,
    ) -> anyhow::Result<GatewayConfig> {
        if self.max_frame_bytes == 0 || self.outbound_queue == 0 {
            anyhow::bail!("--max-frame-bytes and --outbound-queue must be at least 1");
        }
        if !(self.message_rate.is_finite() && self.message_rate >= 0.0) || self.message_burst == 0 {
            anyhow::bail!("--message-rate must be 0 or more and --message-burst at least 1");
        }
        if !(self.connection_rate_per_ip.is_finite() && self.connection_rate_per_ip >= 0.0) {
            anyhow::bail!("--connection-rate-per-ip must be 0 or more");
        }
        if self.max_connections == 0 || self.max_handshakes == 0 {
            anyhow::bail!("--max-connections and --max-handshakes must be at least 1");
        }
        if self.ping_interval_secs == 0 || self.idle_timeout_secs <= self.ping_interval_secs {
            anyhow::bail!(
                "--ping-interval-secs must be at least 1 and --idle-timeout-secs longer than it"
            );
        }
        let defaults = GatewayConfig::default();
        Ok(GatewayConfig {
            auth_endpoint,
            connection_endpoint,
            edge_id: self
                .edge_id
                .as_deref()
                .map_or(defaults.edge_id, EdgeId::from),
            limits: streamer_gateway::limits::SocketLimits {
                max_frame_bytes: self.max_frame_bytes,
                message_rate: self.message_rate,
                message_burst: self.message_burst,
                ping_interval: Duration::from_secs(self.ping_interval_secs),
                idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            },
            max_connections: fit_descriptor_limit(self.max_connections),
            max_handshakes: self.max_handshakes,
            allowed_origins: self.allowed_origins.clone(),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            connection_rate_per_ip: self.connection_rate_per_ip,
            connection_burst_per_ip: self.connection_burst_per_ip.max(1),
            outbound_queue: self.outbound_queue,
            send_buffer: self.socket_send_buffer.map(|b| b as usize),
            control_plane_timeout: defaults.control_plane_timeout,
            trust: Trust::none(),
            apigateway: None,
        })
    }
}

/// Descriptors kept for everything that is not a client socket: listeners,
/// gRPC channels, the store, logs.
const RESERVED_DESCRIPTORS: u64 = 512;

/// `wanted` sockets, or fewer if the process's open-file limit could not
/// hold them: past the limit every accept fails, health and metrics
/// included, so the edge must say 503 before it gets there.
fn fit_descriptor_limit(wanted: usize) -> usize {
    let Some(limit) = open_file_limit() else {
        return wanted;
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    if wanted > room {
        tracing::warn!(
            wanted,
            open_file_limit = limit,
            max_connections = room.max(1),
            "--max-connections lowered to fit the open-file limit"
        );
    }
    wanted.min(room.max(1))
}

/// The soft limit on open files, where the system says (Linux).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Debug, Args)]
pub struct AuthCmd {
    /// Address to listen on.
    #[arg(
        long = "listen",
        env = "STREAMER_AUTH_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    pub listen: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "STREAMER_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    pub metrics_listen: SocketAddr,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub trust: TrustArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Debug, Args)]
pub struct ConnectionCmd {
    /// Address to listen on.
    #[arg(
        long = "listen",
        env = "STREAMER_CONNECTION_LISTEN",
        default_value = "0.0.0.0:50052"
    )]
    pub listen: SocketAddr,
    /// Address of the internal edge stream (`EdgeService`), which only the
    /// WebSocket edges need to reach.
    #[arg(
        long = "edge-listen",
        env = "STREAMER_CONNECTION_EDGE_LISTEN",
        default_value = "0.0.0.0:50054"
    )]
    pub edge_listen: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "STREAMER_METRICS_LISTEN", default_value = "0.0.0.0:9092")]
    pub metrics_listen: SocketAddr,
    /// ProgressService, for async actions and the request actions: one URL,
    /// a DNS name that resolves to every replica, or a comma-separated list
    /// of URLs (calls go to each in turn, and on to the next when one does
    /// not answer).
    #[arg(
        long,
        env = "STREAMER_PROGRESS_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub progress_url: String,
    /// AuthService, where the token of every connection an edge announces
    /// is verified again (except in trust mode none): one URL, a DNS name
    /// that resolves to every replica, or a comma-separated list of URLs.
    #[arg(
        long,
        env = "STREAMER_AUTH_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub auth_url: String,
    /// How long an edge counts as alive after a replica last heard from
    /// it; an edge gone for longer has its connections removed.
    #[arg(long, env = "STREAMER_EDGE_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub edge_lease_secs: u64,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub apigateway: ApiGatewayArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// Delivery to the connections AWS API Gateway holds (see the README's
/// "Behind AWS API Gateway").
#[derive(Debug, Clone, Args)]
pub struct ApiGatewayArgs {
    /// Deliver to connections AWS API Gateway holds, through its management
    /// API (`PostToConnection`), and accept API Gateway's integration (an
    /// edge run with --apigateway-secret-file). AWS credentials and region
    /// come from the standard chain.
    #[arg(long, env = "STREAMER_APIGATEWAY")]
    pub apigateway: bool,
    /// The management endpoint of a connection: `{domain}` and `{stage}`
    /// are replaced by the connection's (for a custom domain, for example
    /// `https://abc123.execute-api.eu-west-1.amazonaws.com/{stage}`).
    #[arg(
        long,
        env = "STREAMER_APIGATEWAY_ENDPOINT",
        default_value = "https://{domain}/{stage}"
    )]
    pub apigateway_endpoint: String,
    /// The AWS region of the WebSocket API (default: from the environment).
    #[arg(long, env = "STREAMER_APIGATEWAY_REGION")]
    pub apigateway_region: Option<String>,
    /// Posts to API Gateway in flight at once.
    #[arg(long, env = "STREAMER_APIGATEWAY_WORKERS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub apigateway_workers: u64,
}

impl ApiGatewayArgs {
    async fn config(&self) -> anyhow::Result<Option<ApiGatewayConfig>> {
        if !self.apigateway {
            return Ok(None);
        }
        let endpoint = &self.apigateway_endpoint;
        anyhow::ensure!(
            endpoint.starts_with("https://") || endpoint.starts_with("http://"),
            "--apigateway-endpoint must be an http(s) URL, not {endpoint:?}"
        );
        let api = SdkManagementApi::from_environment(self.apigateway_region.clone()).await?;
        Ok(Some(ApiGatewayConfig {
            endpoint: endpoint.clone(),
            workers: usize::try_from(self.apigateway_workers).unwrap_or(64),
            ..ApiGatewayConfig::new(std::sync::Arc::new(api))
        }))
    }
}

#[derive(Debug, Args)]
pub struct ProgressCmd {
    /// Address to listen on.
    #[arg(
        long = "listen",
        env = "STREAMER_PROGRESS_LISTEN",
        default_value = "0.0.0.0:50053"
    )]
    pub listen: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "STREAMER_METRICS_LISTEN", default_value = "0.0.0.0:9093")]
    pub metrics_listen: SocketAddr,
    /// ConnectionService, for identities and delivery: one URL, a DNS name
    /// that resolves to every replica, or a comma-separated list of URLs
    /// (calls go to each in turn, and on to the next when one does not
    /// answer).
    #[arg(
        long,
        env = "STREAMER_CONNECTION_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub connection_url: String,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub trust: TrustArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

#[derive(Debug, Args)]
pub struct GatewayCmd {
    /// Address to listen on.
    #[arg(
        long = "listen",
        env = "STREAMER_GATEWAY_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "STREAMER_METRICS_LISTEN", default_value = "0.0.0.0:9094")]
    pub metrics_listen: SocketAddr,
    /// AuthService URL: one, or several separated by commas. Each host is
    /// resolved again every 5 s and token checks go to every address in
    /// turn (every AuthService replica), falling back to the next one when
    /// a replica does not answer.
    #[arg(
        long,
        env = "STREAMER_AUTH_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub auth_url: String,
    /// ConnectionService's internal edge stream (its `--edge-listen`): one
    /// URL, or several separated by commas. Each host is resolved again
    /// every 5 s and the edge attaches to every address (every replica
    /// behind a Kubernetes headless Service).
    #[arg(
        long,
        env = "STREAMER_CONNECTION_EDGE_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    pub connection_edge_url: String,
    /// Serve AWS API Gateway's integration endpoints (`POST
    /// /apigateway/connect`, `/disconnect`, `/default`) instead of
    /// WebSockets; each request must carry one of the secrets in this file
    /// (one per line, at least 32 bytes) in `x-streamer-apigateway-secret`.
    #[arg(long, env = "STREAMER_APIGATEWAY_SECRET_FILE")]
    pub apigateway_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub edge: EdgeArgs,
    #[command(flatten)]
    pub trust: TrustArgs,
}

#[derive(Debug, Args)]
pub struct AllCmd {
    /// AuthService address (loopback by default: see --trust).
    #[arg(long, env = "STREAMER_AUTH_LISTEN", default_value = "127.0.0.1:50051")]
    pub auth_listen: SocketAddr,
    /// ConnectionService address.
    #[arg(
        long,
        env = "STREAMER_CONNECTION_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    pub connection_listen: SocketAddr,
    /// ConnectionService's internal edge stream address.
    #[arg(
        long,
        env = "STREAMER_CONNECTION_EDGE_LISTEN",
        default_value = "127.0.0.1:50054"
    )]
    pub connection_edge_listen: SocketAddr,
    /// ProgressService address.
    #[arg(
        long,
        env = "STREAMER_PROGRESS_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    pub progress_listen: SocketAddr,
    /// WebSocket edge address.
    #[arg(
        long,
        env = "STREAMER_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub gateway_listen: SocketAddr,
    /// Prometheus metrics address.
    #[arg(
        long,
        env = "STREAMER_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub trust: TrustArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub edge: EdgeArgs,
}

#[derive(Debug, Args)]
pub struct TokenCmd {
    /// `sub`: the user id.
    #[arg(long, default_value = "demo-user")]
    pub sub: String,
    /// `tenant_id`.
    #[arg(long, default_value = "demo-tenant")]
    pub tenant: String,
    /// `permissions`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "read,write")]
    pub permissions: Vec<String>,
    /// `topics`, comma-separated: patterns of the topics the client may
    /// subscribe itself to (`orders/*`, `users/{user_id}/**`).
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Lifetime, in seconds (default 24 h, as the banner's demo token).
    #[arg(long, default_value_t = 24 * 3600)]
    pub ttl: u64,
    /// Mint a token that expired an hour ago.
    #[arg(long)]
    pub expired: bool,
    /// Set `nbf` this many seconds in the future (a not-yet-valid token).
    #[arg(long)]
    pub not_before: Option<u64>,
    /// `iss`.
    #[arg(long)]
    pub issuer: Option<String>,
    /// `aud`.
    #[arg(long)]
    pub audience: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    streamer_core::grpc::bind(addr).await
}

fn spawn_metrics(addr: SocketAddr, shutdown: Shutdown) {
    tokio::spawn(async move {
        if let Err(error) = streamer_core::telemetry::serve_metrics(addr, shutdown).await {
            tracing::error!(error = %format!("{error:#}"), "metrics endpoint failed");
        }
    });
}

/// Runs the parsed command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token(cmd) = cli.command {
        return token(cmd);
    }
    if let Command::ServiceToken(cmd) = cli.command {
        return service_token(cmd);
    }
    if let Command::Certs(cmd) = cli.command {
        return certs(cmd);
    }
    if let Command::Metrics = cli.command {
        print!("{}", streamer_core::metrics::catalogue_text());
        return Ok(());
    }
    if let Command::Dynamodb(cmd) = cli.command {
        streamer_core::telemetry::init_logs(cli.log_format, "warn");
        return dynamodb(cmd).await;
    }
    let service = match &cli.command {
        Command::Auth(_) => "streamer-auth",
        Command::Connection(_) => "streamer-connection",
        Command::Progress(_) => "streamer-progress",
        Command::Gateway(_) => "streamer-gateway",
        _ => "streamer",
    };
    let traces = streamer_core::telemetry::init(cli.log_format, "info", service)?;
    let shutdown = Shutdown::new();
    streamer_core::shutdown::cancel_on_signal(shutdown.clone());
    let result = serve(cli.command, shutdown).await;
    // The last spans, those of the shutdown among them.
    traces.shutdown().await;
    result
}

/// Runs one of the serving commands until `shutdown`.
async fn serve(command: Command, shutdown: Shutdown) -> anyhow::Result<()> {
    match command {
        Command::Token(_)
        | Command::ServiceToken(_)
        | Command::Certs(_)
        | Command::Dynamodb(_)
        | Command::Metrics => Ok(()),
        Command::Auth(cmd) => {
            let config = cmd.keys.config(&cmd.data.data_dir)?;
            let trust = cmd.trust.trust(&[cmd.listen])?;
            // The deny-list of revoked tokens.
            let store = cmd
                .store
                .choice()
                .open(&cmd.data.data_dir.join("auth"))
                .await?;
            let listener = bind(cmd.listen).await?;
            spawn_metrics(cmd.metrics_listen, shutdown.clone());
            let result = crate::run_auth(listener, store.clone(), config, trust, shutdown).await;
            store.flush().await?;
            result
        }
        Command::Connection(cmd) => {
            let store = cmd
                .store
                .choice()
                .open(&cmd.data.data_dir.join("connection"))
                .await?;
            let config = ConnectionConfig {
                progress_endpoint: Some(cmd.progress_url),
                auth_endpoint: Some(cmd.auth_url),
                edge_lease: Duration::from_secs(cmd.edge_lease_secs),
                trust: cmd.trust.trust(&[cmd.listen, cmd.edge_listen])?,
                topics: cmd.topics.config()?,
                apigateway: cmd.apigateway.config().await?,
                ..ConnectionConfig::default()
            };
            let listener = bind(cmd.listen).await?;
            let edge_listener = bind(cmd.edge_listen).await?;
            spawn_metrics(cmd.metrics_listen, shutdown.clone());
            let result =
                crate::run_connection(listener, edge_listener, store.clone(), config, shutdown)
                    .await;
            store.flush().await?;
            result
        }
        Command::Progress(cmd) => {
            let store = cmd
                .store
                .choice()
                .open(&cmd.data.data_dir.join("progress"))
                .await?;
            let config = cmd.progress.config(cmd.connection_url)?;
            let config = ProgressConfig {
                trust: cmd.trust.trust(&[cmd.listen])?,
                ..config
            };
            let listener = bind(cmd.listen).await?;
            spawn_metrics(cmd.metrics_listen, shutdown.clone());
            let result = crate::run_progress(listener, store.clone(), config, shutdown).await;
            store.flush().await?;
            result
        }
        Command::Gateway(cmd) => {
            // The edge serves no gRPC: its trust is only how it presents
            // itself to the control plane.
            let config = GatewayConfig {
                trust: cmd.trust.trust(&[])?,
                apigateway: cmd
                    .apigateway_secret_file
                    .as_deref()
                    .map(IntegrationConfig::from_file)
                    .transpose()?,
                ..cmd.edge.config(cmd.auth_url, cmd.connection_edge_url)?
            };
            let listener = bind(cmd.listen).await?;
            spawn_metrics(cmd.metrics_listen, shutdown.clone());
            crate::run_gateway(listener, config, shutdown).await
        }
        Command::All(cmd) => all(*cmd, shutdown).await,
    }
}

async fn all(cmd: AllCmd, shutdown: Shutdown) -> anyhow::Result<()> {
    let data_dir = cmd.data.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let dev_key = streamer_auth::dev::ensure_dev_key(&data_dir)
        .context("cannot create the development key")?;
    let placeholder = String::new();
    let config = SystemConfig {
        auth: cmd.keys.config(&data_dir)?,
        connection: ConnectionConfig {
            topics: cmd.topics.config()?,
            ..ConnectionConfig::default()
        },
        progress: cmd.progress.config(placeholder.clone())?,
        gateway: cmd.edge.config(placeholder.clone(), placeholder)?,
        data_dir: data_dir.clone(),
        store: cmd.store.choice(),
        trust: cmd.trust.trust(&[
            cmd.auth_listen,
            cmd.connection_listen,
            cmd.connection_edge_listen,
            cmd.progress_listen,
        ])?,
    };
    let mut trust_note = match config.trust.check() {
        Check::None => "Trust: none. Any caller that reaches the gRPC ports may call every method \
                        (they listen on loopback unless told otherwise)."
            .to_owned(),
        Check::Token(_) => "Trust: token. Every gRPC call needs a service token \
                            (`streamer service-token --help`)."
            .to_owned(),
        Check::Certificate => "Trust: mtls. Every gRPC call needs a client certificate signed \
                               by --tls-ca that names its role (`streamer certs --help`)."
            .to_owned(),
    };
    if config.trust.tls().is_some() {
        trust_note.push_str(" gRPC is served over TLS (https://).");
    }
    let listeners = SystemListeners {
        auth: bind(cmd.auth_listen).await?,
        connection: bind(cmd.connection_listen).await?,
        edge: bind(cmd.connection_edge_listen).await?,
        progress: bind(cmd.progress_listen).await?,
        gateway: bind(cmd.gateway_listen).await?,
    };
    let metrics = bind(cmd.metrics_listen).await?;
    let metrics_addr = metrics.local_addr()?;
    drop(metrics);
    let system = crate::start_system(listeners, config, shutdown.clone()).await?;
    // Only once the system runs: a start that fails says nothing more.
    spawn_metrics(metrics_addr, shutdown);
    let demo = dev_key.mint(&MintOptions {
        ttl: Duration::from_secs(24 * 3600),
        ..MintOptions::default()
    })?;
    let text = banner(
        &system.addrs,
        metrics_addr,
        &data_dir,
        &demo,
        cmd.keys.uses_dev_key(),
        &trust_note,
    );
    // A closed stdout (a pipe whose reader left) must not stop the system.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
    system.join().await
}

/// What `streamer all` prints once everything listens: where things are, a
/// token that works, and commands to paste.
pub fn banner(
    addrs: &SystemAddrs,
    metrics: SocketAddr,
    data_dir: &Path,
    demo_token: &str,
    dev_key_in_use: bool,
    trust_note: &str,
) -> String {
    let ws = dial_addr(addrs.gateway);
    let conn = dial_addr(addrs.connection);
    let key_note = if dev_key_in_use {
        format!(
            "Tokens are verified with the development key in {} (`streamer token` mints more).",
            data_dir.join("keys").display()
        )
    } else {
        "Tokens are verified with the keys given by --auth-keys; the demo token below is signed \
         with the development key and is refused unless that key is among them."
            .to_owned()
    };
    let everything = [
        addrs.auth,
        addrs.connection,
        addrs.edge,
        addrs.progress,
        addrs.gateway,
        metrics,
    ];
    let reach = if everything.iter().all(|a| a.ip().is_loopback()) {
        "Everything listens on loopback: reachable from this machine only (the --*-listen \
         flags change that)."
    } else {
        "Some ports listen beyond loopback: other machines can reach them."
    };
    let data = data_dir.display();
    let auth = dial_addr(addrs.auth);
    let progress = dial_addr(addrs.progress);
    let metrics = dial_addr(metrics);
    let token = demo_token;
    [
        String::new(),
        format!("Streamer is running (embedded store in {data})"),
        reach.to_owned(),
        String::new(),
        format!("  WebSocket          ws://{ws}/?Authorization=<token>"),
        format!("  AuthService        {auth}"),
        format!("  ConnectionService  {conn}"),
        format!("  ProgressService    {progress}"),
        format!("  Metrics            http://{metrics}/metrics"),
        String::new(),
        key_note,
        trust_note.to_owned(),
        "Demo token (user demo-user, tenant demo-tenant, valid 24 h):".to_owned(),
        String::new(),
        format!("  {token}"),
        String::new(),
        "Try it:".to_owned(),
        format!("  python3 -m websockets 'ws://{ws}/?Authorization={token}'"),
        format!(
            "  grpcurl -plaintext -d '{{\"tenant_id\":\"demo-tenant\"}}' {conn} streamer.v1.ConnectionService/ListConnections"
        ),
        format!(
            "  grpcurl -plaintext -d '{{\"tenant\":{{\"tenant_id\":\"demo-tenant\"}},\"payload\":{{\"json\":{{\"hello\":\"world\"}}}}}}' {conn} streamer.v1.ConnectionService/Broadcast"
        ),
        String::new(),
    ]
    .join("\n")
}

#[derive(Debug, Args)]
pub struct ServiceTokenCmd {
    /// Who holds the token (`sub`): a name for logs; a processor's work is
    /// bound to it, and an edge's id must equal it.
    #[arg(long)]
    pub sub: String,
    /// Its roles, comma-separated: edge, router, processor, backend.
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    pub roles: Vec<Role>,
    /// The only tenants it may reach, comma-separated; default: every one.
    #[arg(long, value_delimiter = ',')]
    pub tenants: Vec<String>,
    /// Lifetime, in seconds (default 30 days).
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    pub ttl: u64,
    /// The shared service secret.
    #[arg(long, env = "STREAMER_SERVICE_SECRET_FILE")]
    pub service_secret_file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DynamodbCmd {
    /// Create the tables the DynamoDB store uses (those missing; safe to run
    /// again), wait until they are active and turn their TTL on.
    CreateTables(DynamoArgs),
}

async fn dynamodb(cmd: DynamodbCmd) -> anyhow::Result<()> {
    match cmd {
        DynamodbCmd::CreateTables(args) => {
            let store = DynamoStore::connect(&args.config()).await?;
            store.create_tables().await?;
            println!("Tables ready: {}", store.table_names().join(", "));
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub struct CertsCmd {
    /// Directory to write to: `ca.crt`, and one directory per holder with
    /// `tls.crt`, `tls.key` and `ca.crt` (the layout cert-manager writes).
    #[arg(long, default_value = ".streamer/tls")]
    pub out: PathBuf,
    /// Names and addresses the servers are dialled by, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
}

/// Who `streamer certs` issues a certificate to, and the roles it names.
const CERT_HOLDERS: &[(&str, &[Role])] = &[
    // `streamer all`: its edge attaches, its services call each other.
    ("streamer", &[Role::Edge, Role::Backend]),
    ("auth", &[]),
    ("connection", &[Role::Backend]),
    ("progress", &[Role::Backend]),
    ("gateway", &[Role::Edge]),
    ("router", &[Role::Router]),
    ("processor", &[Role::Processor]),
    ("backend", &[Role::Backend]),
];

fn certs(cmd: CertsCmd) -> anyhow::Result<()> {
    use streamer_core::tls::issue::Authority;
    let write = |path: PathBuf, text: &str| {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    let ca = Authority::new("Streamer development CA")?;
    std::fs::create_dir_all(&cmd.out)
        .with_context(|| format!("cannot create {}", cmd.out.display()))?;
    write(cmd.out.join("ca.crt"), &ca.pem.cert)?;
    for (holder, roles) in CERT_HOLDERS {
        let pem = ca.issue(holder, roles, &[], &cmd.hosts)?;
        let dir = cmd.out.join(holder);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        write(dir.join("tls.crt"), &pem.cert)?;
        write(dir.join("tls.key"), &pem.key)?;
        write(dir.join("ca.crt"), &ca.pem.cert)?;
        set_private(&dir.join("tls.key"))?;
    }
    println!(
        "Wrote a CA and certificates for {} to {}",
        CERT_HOLDERS
            .iter()
            .map(|(holder, _)| *holder)
            .collect::<Vec<_>>()
            .join(", "),
        cmd.out.display()
    );
    Ok(())
}

#[cfg(unix)]
fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

#[cfg(not(unix))]
fn set_private(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

fn service_token(cmd: ServiceTokenCmd) -> anyhow::Result<()> {
    let tokens = ServiceTokens::from_file(&cmd.service_secret_file)?;
    let tenants = (!cmd.tenants.is_empty()).then_some(cmd.tenants);
    let token = tokens.mint(&cmd.sub, &cmd.roles, tenants, Duration::from_secs(cmd.ttl))?;
    println!("{token}");
    Ok(())
}

fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    let key = streamer_auth::dev::load_dev_key(&cmd.data.data_dir)?;
    let token = key.mint(&MintOptions {
        sub: cmd.sub,
        tenant: cmd.tenant,
        permissions: cmd.permissions,
        topics: cmd.topics,
        ttl: Duration::from_secs(cmd.ttl),
        expired: cmd.expired,
        not_before: cmd.not_before.map(Duration::from_secs),
        issuer: cmd.issuer,
        audience: cmd.audience,
    })?;
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_into_configs() {
        let cli = Cli::try_parse_from([
            "streamer",
            "all",
            "--progress-rate",
            "5",
            "--async-actions",
            "generate_report,export",
            "--allowed-tenants",
            "a,b",
        ])
        .unwrap();
        let Command::All(cmd) = cli.command else {
            panic!("expected all");
        };
        let progress = cmd.progress.config("http://x".into()).unwrap();
        assert_eq!(progress.progress_rate, 5.0);
        assert_eq!(progress.async_actions, ["generate_report", "export"]);
        assert_eq!(cmd.keys.allowed_tenants, ["a", "b"]);
    }

    /// `streamer all` is for one machine: with no flags, nothing it opens
    /// is reachable from elsewhere. The roles run alone (in containers)
    /// listen on every interface.
    #[test]
    fn streamer_all_listens_only_on_loopback_by_default() {
        let Command::All(all) = Cli::try_parse_from(["streamer", "all"]).unwrap().command else {
            panic!("expected all");
        };
        for address in [
            all.auth_listen,
            all.connection_listen,
            all.connection_edge_listen,
            all.progress_listen,
            all.gateway_listen,
            all.metrics_listen,
        ] {
            assert!(address.ip().is_loopback(), "{address}");
        }
        let Command::Gateway(gateway) = Cli::try_parse_from(["streamer", "gateway"])
            .unwrap()
            .command
        else {
            panic!("expected gateway");
        };
        assert!(gateway.listen.ip().is_unspecified());
    }

    #[test]
    fn invalid_values_are_refused_with_the_flag_named() {
        let cli = Cli::try_parse_from(["streamer", "progress", "--lease-secs", "0"]).unwrap();
        let Command::Progress(cmd) = cli.command else {
            panic!("expected progress");
        };
        let err = cmd.progress.config("http://x".into()).unwrap_err();
        assert!(err.to_string().contains("--lease-secs"), "{err}");
        assert!(Cli::try_parse_from(["streamer", "gateway", "--listen", "nope"]).is_err());
    }
}
