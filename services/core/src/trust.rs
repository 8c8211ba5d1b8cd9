//! Who may call what: caller authentication for every gRPC server, and the
//! one table of the methods each role may call.
//!
//! Rules:
//! 1. Every call carries a credential, except health and reflection (probes
//!    and `grpcurl list` need none). The mode decides what a credential is:
//!    - `none`: nothing is checked; every caller may do everything. Only
//!      for loopback, where any local process is trusted (`streamer all`'s
//!      default), or behind a network that admits nothing else.
//!    - `token`: a service token in `authorization: Bearer …`, a JWT signed
//!      (HS256) with the secret every Streamer process shares. It names its
//!      holder (`sub`), its roles, and optionally the tenants it may reach.
//!      Backends get tokens (`streamer token --service`), never the secret.
//! 2. A caller without a valid credential is UNAUTHENTICATED; a caller
//!    whose roles do not include one that [`access`] lists for the method
//!    is PERMISSION_DENIED. Nothing else runs for either.
//! 3. An accepted caller's [`Caller`] is in the request's extensions; each
//!    service narrows what it does by it (the tenants a backend may reach,
//!    the work a processor holds, the edge id an edge may use).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::metadata::AsciiMetadataValue;

/// What a caller is allowed to be.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A WebSocket edge: the edge stream, and token validation.
    Edge,
    /// A router: receives client frames (`Receive`).
    Router,
    /// A processor: claims work and reports on the work it holds.
    Processor,
    /// A backend: delivers to clients, queues and looks up requests.
    Backend,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Router => "router",
            Role::Processor => "processor",
            Role::Backend => "backend",
        }
    }
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with no credential: health and reflection.
    Open,
    /// A caller holding one of these roles.
    Roles(&'static [Role]),
}

/// The one table: which roles may call each method, by its gRPC path.
/// A method not listed needs any valid credential (and is then most likely
/// UNIMPLEMENTED).
pub fn access(path: &str) -> Access {
    use Role::*;
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Roles(&[Edge, Router, Processor, Backend]);
    };
    match (service, method) {
        ("grpc.health.v1.Health", _)
        | ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _) => Access::Open,
        // The edge validates before the upgrade; a backend may check a
        // token it was handed.
        ("streamer.v1.AuthService", "ValidateToken") => Access::Roles(&[Edge, Backend]),
        // Revoking a client's token is a backend's decision.
        ("streamer.v1.AuthService", "RevokeToken") => Access::Roles(&[Backend]),
        ("streamer.v1.EdgeService", "Attach") => Access::Roles(&[Edge]),
        ("streamer.v1.ConnectionService", "Receive") => Access::Roles(&[Router]),
        (
            "streamer.v1.ConnectionService",
            "Send" | "Broadcast" | "IsActive" | "GetConnection" | "ListConnections" | "Disconnect",
        ) => Access::Roles(&[Backend]),
        ("streamer.v1.ProgressService", "Claim" | "Report" | "Complete" | "Fail") => {
            Access::Roles(&[Processor])
        }
        ("streamer.v1.ProgressService", "Submit" | "Get" | "Watch" | "Cancel") => {
            Access::Roles(&[Backend])
        }
        _ => Access::Roles(&[Edge, Router, Processor, Backend]),
    }
}

/// An authenticated caller, as the services see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The credential's holder (`sub`); empty in mode `none`.
    pub subject: String,
    pub roles: BTreeSet<Role>,
    /// The tenants it may reach; `None`: every tenant.
    pub tenants: Option<BTreeSet<String>>,
    /// False in mode `none`, where nobody proved who they are.
    pub authenticated: bool,
}

impl Caller {
    /// Mode `none`: anyone may do anything.
    pub fn anyone() -> Self {
        Self {
            subject: String::new(),
            roles: [Role::Edge, Role::Router, Role::Processor, Role::Backend].into(),
            tenants: None,
            authenticated: false,
        }
    }

    /// `anyone`, for work a service does on its own behalf.
    pub fn everyone() -> &'static Arc<Caller> {
        static EVERYONE: std::sync::LazyLock<Arc<Caller>> =
            std::sync::LazyLock::new(|| Arc::new(Caller::anyone()));
        &EVERYONE
    }

    /// Whether this caller may reach `tenant_id`'s connections and requests.
    pub fn reaches(&self, tenant_id: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant_id))
    }

    /// The caller of a request: the one the trust layer put there, or
    /// `anyone` where nothing is checked (mode `none` inserts nothing, so
    /// it costs no allocation per call).
    pub fn of<T>(request: &tonic::Request<T>) -> Arc<Self> {
        request
            .extensions()
            .get::<Arc<Caller>>()
            .unwrap_or_else(|| Self::everyone())
            .clone()
    }
}

/// The claims of a service token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceClaims {
    pub sub: String,
    pub roles: Vec<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
    pub iat: u64,
    pub exp: u64,
    pub aud: String,
}

/// The audience of every service token, so a client JWT (or any other
/// token signed with the same secret by mistake) is never taken for one.
pub const SERVICE_AUDIENCE: &str = "streamer-services";
/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// Mints and verifies service tokens with the shared secret.
#[derive(Clone)]
pub struct ServiceTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceTokens(<secret>)")
    }
}

impl ServiceTokens {
    pub fn from_secret(secret: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_BYTES,
            "the service secret must be at least {MIN_SECRET_BYTES} bytes (it has {})",
            secret.len()
        );
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        })
    }

    /// Reads the secret from a file (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!("cannot read the service secret {}: {e}", path.display())
        })?;
        let text = String::from_utf8_lossy(&bytes);
        Self::from_secret(text.trim().as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn mint(
        &self,
        subject: &str,
        roles: &[Role],
        tenants: Option<Vec<String>>,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let now = unix_now();
        let claims = ServiceClaims {
            sub: subject.to_owned(),
            roles: roles.to_vec(),
            tenants,
            iat: now,
            exp: now + ttl.as_secs(),
            aud: SERVICE_AUDIENCE.to_owned(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<Caller, Status> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[SERVICE_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = 30;
        let claims = jsonwebtoken::decode::<ServiceClaims>(token, &self.decoding, &validation)
            .map_err(|e| Status::unauthenticated(format!("invalid service token: {e}")))?
            .claims;
        if claims.sub.is_empty() || claims.roles.is_empty() {
            return Err(Status::unauthenticated(
                "invalid service token: it names no holder or no role",
            ));
        }
        Ok(Caller {
            subject: claims.sub,
            roles: claims.roles.into_iter().collect(),
            tenants: claims.tenants.map(|t| t.into_iter().collect()),
            authenticated: true,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a server authenticates its callers, and how a client presents
/// itself: one value per process, cheap to clone.
#[derive(Debug, Clone)]
pub enum Trust {
    None,
    Token(Arc<ServiceTokens>),
}

/// Two trusts are the same when they are the same mode with the same
/// secret (one loaded once and shared).
impl PartialEq for Trust {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Trust::None, Trust::None) => true,
            (Trust::Token(a), Trust::Token(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Default for Trust {
    /// Mode `none`, for loopback.
    fn default() -> Self {
        Trust::None
    }
}

impl Trust {
    pub fn name(&self) -> &'static str {
        match self {
            Trust::None => "none",
            Trust::Token(_) => "token",
        }
    }

    /// Rule 2: the caller of a call to `path` with these headers.
    pub fn authorize(&self, path: &str, headers: &http::HeaderMap) -> Result<Caller, Status> {
        let access = access(path);
        let Trust::Token(tokens) = self else {
            return Ok(Caller::anyone());
        };
        let Access::Roles(roles) = access else {
            return Ok(Caller {
                subject: String::new(),
                roles: BTreeSet::new(),
                tenants: Some(BTreeSet::new()),
                authenticated: false,
            });
        };
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "a service token is required: send `authorization: Bearer <token>`",
                )
            })?;
        let caller = tokens.verify(token.trim())?;
        if !roles.iter().any(|r| caller.roles.contains(r)) {
            let needed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "{path} needs the role {}; this token ({}) has {:?}",
                needed.join(" or "),
                caller.subject,
                caller.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>()
            )));
        }
        Ok(caller)
    }

    /// What a Streamer process presents when it calls another one.
    pub fn credentials(&self, subject: &str, roles: &[Role]) -> CallCredentials {
        CallCredentials {
            trust: self.clone(),
            subject: subject.to_owned(),
            roles: roles.to_vec(),
            cached: Arc::default(),
        }
    }
}

/// The tower layer every gRPC server runs its services behind (rule 2).
#[derive(Debug, Clone)]
pub struct TrustLayer(pub Trust);

impl<S> tower::Layer<S> for TrustLayer {
    type Service = TrustService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TrustService {
            trust: self.0.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrustService<S> {
    trust: Trust,
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for TrustService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Trust::None = self.trust {
            return Box::pin(self.inner.call(request));
        }
        match self
            .trust
            .authorize(request.uri().path(), request.headers())
        {
            Ok(caller) => {
                request.extensions_mut().insert(Arc::new(caller));
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                metrics::counter!("streamer_grpc_refused_total", "code" => format!("{:?}", status.code()))
                    .increment(1);
                tracing::warn!(path = %request.uri().path(), code = ?status.code(), error = status.message(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// A client-side interceptor that presents this process's credential on
/// every call: in mode `token`, a service token it mints itself and renews
/// well before it expires.
#[derive(Debug, Clone)]
pub struct CallCredentials {
    trust: Trust,
    subject: String,
    roles: Vec<Role>,
    /// The current header value and when to mint the next.
    cached: Arc<Mutex<Option<(AsciiMetadataValue, u64)>>>,
}

/// Lifetime of the tokens a process mints for itself.
const SELF_TOKEN_TTL: Duration = Duration::from_secs(3600);

impl CallCredentials {
    fn header(&self) -> Result<Option<AsciiMetadataValue>, Status> {
        let Trust::Token(tokens) = &self.trust else {
            return Ok(None);
        };
        let now = unix_now();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((value, renew_at)) = cached.as_ref()
            && now < *renew_at
        {
            return Ok(Some(value.clone()));
        }
        let token = tokens
            .mint(&self.subject, &self.roles, None, SELF_TOKEN_TTL)
            .map_err(|e| Status::internal(format!("cannot mint a service token: {e}")))?;
        let value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| Status::internal(format!("cannot send a service token: {e}")))?;
        *cached = Some((value.clone(), now + SELF_TOKEN_TTL.as_secs() / 2));
        Ok(Some(value))
    }
}

impl tonic::service::Interceptor for CallCredentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = self.header()? {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A channel that presents this process's credential on every call.
pub type AuthedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, CallCredentials>;

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> ServiceTokens {
        ServiceTokens::from_secret(&[7u8; 32]).unwrap()
    }

    fn headers(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn every_streamer_method_has_its_roles_and_probes_are_open() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access("/streamer.v1.EdgeService/Attach"),
            Access::Roles(&[Role::Edge])
        );
        assert_eq!(
            access("/streamer.v1.ConnectionService/Receive"),
            Access::Roles(&[Role::Router])
        );
        assert_eq!(
            access("/streamer.v1.ProgressService/Complete"),
            Access::Roles(&[Role::Processor])
        );
        assert_eq!(
            access("/streamer.v1.ConnectionService/Send"),
            Access::Roles(&[Role::Backend])
        );
    }

    #[test]
    fn mode_none_lets_anyone_do_anything() {
        let caller = Trust::None
            .authorize("/streamer.v1.EdgeService/Attach", &http::HeaderMap::new())
            .unwrap();
        assert_eq!(caller, Caller::anyone());
        assert!(caller.reaches("any"));
    }

    #[test]
    fn mode_token_checks_the_token_then_the_role() {
        let tokens = tokens();
        let trust = Trust::Token(Arc::new(tokens.clone()));
        let send = "/streamer.v1.ConnectionService/Send";

        let missing = trust.authorize(send, &http::HeaderMap::new()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);

        let forged = ServiceTokens::from_secret(&[8u8; 32])
            .unwrap()
            .mint("billing", &[Role::Backend], None, Duration::from_secs(60))
            .unwrap();
        let wrong_key = trust.authorize(send, &headers(&forged)).unwrap_err();
        assert_eq!(wrong_key.code(), tonic::Code::Unauthenticated);

        let router = tokens
            .mint("r", &[Role::Router], None, Duration::from_secs(60))
            .unwrap();
        let denied = trust.authorize(send, &headers(&router)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("backend"), "{denied:?}");

        let backend = tokens
            .mint(
                "billing",
                &[Role::Backend],
                Some(vec!["acme".into()]),
                Duration::from_secs(60),
            )
            .unwrap();
        let caller = trust.authorize(send, &headers(&backend)).unwrap();
        assert_eq!(caller.subject, "billing");
        assert!(caller.reaches("acme"));
        assert!(!caller.reaches("globex"));

        // Probes need nothing, and get no power from it.
        let probe = trust
            .authorize("/grpc.health.v1.Health/Check", &http::HeaderMap::new())
            .unwrap();
        assert!(probe.roles.is_empty() && !probe.reaches("acme"));
    }

    #[test]
    fn expired_tokens_and_short_secrets_are_refused() {
        let tokens = tokens();
        let trust = Trust::Token(Arc::new(tokens.clone()));
        let mut claims = ServiceClaims {
            sub: "old".into(),
            roles: vec![Role::Backend],
            tenants: None,
            iat: 0,
            exp: 1,
            aud: SERVICE_AUDIENCE.into(),
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        let refused = trust
            .authorize("/streamer.v1.ConnectionService/Send", &headers(&expired))
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);

        // A token for another audience (say, a client JWT) is not one.
        claims.exp = unix_now() + 60;
        claims.aud = "clients".into();
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        assert!(
            trust
                .authorize("/streamer.v1.ConnectionService/Send", &headers(&other))
                .is_err()
        );

        assert!(ServiceTokens::from_secret(b"short").is_err());
    }

    #[test]
    fn credentials_present_a_token_that_the_servers_accept() {
        use tonic::service::Interceptor as _;
        let trust = Trust::Token(Arc::new(tokens()));
        let mut credentials = trust.credentials("edge-1", &[Role::Edge]);
        let request = credentials.call(tonic::Request::new(())).unwrap();
        let value = request.metadata().get("authorization").unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            value.to_str().unwrap().parse().unwrap(),
        );
        let caller = trust
            .authorize("/streamer.v1.EdgeService/Attach", &headers)
            .unwrap();
        assert_eq!(caller.subject, "edge-1");

        let mut none = Trust::None.credentials("edge-1", &[Role::Edge]);
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    proptest::proptest! {
        /// Any header a caller sends is refused or accepted, never a panic;
        /// in mode `token` nothing but a token signed with the secret gets in.
        #[test]
        fn any_authorization_header_is_refused_without_the_secret(value in "[ -~]{0,300}") {
            let trust = Trust::Token(Arc::new(tokens()));
            let mut headers = http::HeaderMap::new();
            if let Ok(value) = value.parse() {
                headers.insert(http::header::AUTHORIZATION, value);
            }
            proptest::prop_assert!(
                trust.authorize("/streamer.v1.ConnectionService/Send", &headers).is_err()
            );
        }
    }
}
