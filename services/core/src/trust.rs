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
use streamer_api::errors::{Failure, Reason};
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Status};

use crate::ids::{EdgeId, TenantId};
use crate::tls::{PeerIdentity, Tls};

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
/// A method not listed is refused to every role (a method added to the
/// contract is closed until it is given its roles here; a test checks that
/// every method of the contract is).
pub fn access(path: &str) -> Access {
    use Role::*;
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Roles(&[]);
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
            "Send" | "Broadcast" | "IsActive" | "GetConnection" | "ListConnections" | "Disconnect"
            | "Subscribe" | "Unsubscribe" | "Publish" | "ListSubscriptions",
        ) => Access::Roles(&[Backend]),
        ("streamer.v1.ProgressService", "Claim" | "Report" | "Complete" | "Fail") => {
            Access::Roles(&[Processor])
        }
        ("streamer.v1.ProgressService", "Submit" | "Get" | "Watch" | "Cancel") => {
            Access::Roles(&[Backend])
        }
        _ => Access::Roles(&[]),
    }
}

/// An authenticated caller, as the services see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The credential's holder (`sub`); empty in mode `none`.
    pub subject: String,
    pub roles: BTreeSet<Role>,
    /// The tenants it may reach; `None`: every tenant.
    pub tenants: Option<BTreeSet<TenantId>>,
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

    /// A caller with no credential where one is checked: health and
    /// reflection only, reaching no tenant.
    pub fn nobody() -> Self {
        Self {
            subject: String::new(),
            roles: BTreeSet::new(),
            tenants: Some(BTreeSet::new()),
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
    pub fn reaches(&self, tenant_id: &TenantId) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant_id))
    }

    /// The caller of a request: the one the trust layer put there, or
    /// `anyone` where nothing is checked (mode `none` inserts nothing, so
    /// it costs no allocation per call).
    /// Whether this caller may attach as the edge `edge_id`: its own name,
    /// or a name under it (`gateway/pod-1` for the certificate `gateway`,
    /// which every replica of a Deployment shares). Unauthenticated callers
    /// exist only in mode `none`, where anyone may.
    pub fn may_attach_as(&self, edge_id: &EdgeId) -> bool {
        let edge_id = edge_id.as_str();
        !self.authenticated
            || edge_id == self.subject
            || edge_id
                .strip_prefix(self.subject.as_str())
                .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
    }

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
            .map_err(|e| invalid_credentials(format!("invalid service token: {e}")))?
            .claims;
        if claims.sub.is_empty() || claims.roles.is_empty() {
            return Err(invalid_credentials(
                "invalid service token: it names no holder or no role",
            ));
        }
        Ok(Caller {
            subject: claims.sub,
            roles: claims.roles.into_iter().collect(),
            tenants: claims
                .tenants
                .map(|t| t.into_iter().map(TenantId::from).collect()),
            authenticated: true,
        })
    }
}

/// A client certificate's URI names that grant a role:
/// `urn:streamer:role:backend`.
pub const ROLE_URI_PREFIX: &str = "urn:streamer:role:";
/// A client certificate's URI names that bind it to tenants:
/// `urn:streamer:tenant:acme`. None: every tenant.
pub const TENANT_URI_PREFIX: &str = "urn:streamer:tenant:";

/// Who a client certificate (DER, already verified against the CA) names:
/// its subject is the common name (else its first DNS name), its roles and
/// tenants come from its `urn:streamer:…` URI names. A certificate that
/// names no role, or a role Streamer does not know, grants nothing.
pub fn certificate_caller(der: &[u8]) -> Result<Caller, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("it cannot be parsed: {e}"))?;
    let names: Vec<GeneralName<'_>> = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.clone(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(format!(
                "its subject alternative names cannot be parsed: {e}"
            ));
        }
    };
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let dns_name = names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    });
    let subject = common_name
        .or(dns_name)
        .filter(|s| !s.is_empty())
        .ok_or("it has neither a common name nor a DNS name")?;
    let mut roles = BTreeSet::new();
    let mut tenants = BTreeSet::new();
    for name in &names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
            let role = <Role as clap::ValueEnum>::from_str(role, false)
                .map_err(|_| format!("{uri} names no Streamer role"))?;
            roles.insert(role);
        } else if let Some(tenant) = uri.strip_prefix(TENANT_URI_PREFIX) {
            tenants.insert(TenantId::from(tenant));
        }
    }
    if roles.is_empty() {
        return Err(format!(
            "{subject:?} has no {ROLE_URI_PREFIX}<role> name; it may serve, not call"
        ));
    }
    Ok(Caller {
        subject,
        roles,
        tenants: (!tenants.is_empty()).then_some(tenants),
        authenticated: true,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a server authenticates its callers, and how a client presents
/// itself: one value per process, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    check: Check,
    tls: Option<Arc<Tls>>,
}

/// What a server checks of a caller (rule 1).
#[derive(Debug, Clone, Default)]
pub enum Check {
    /// Nothing.
    #[default]
    None,
    /// A service token signed with the shared secret.
    Token(Arc<ServiceTokens>),
    /// A client certificate signed by the CA, whose names grant the roles
    /// (see [`certificate_caller`]).
    Certificate,
}

/// Two trusts are the same when they are the same mode with the same
/// secret and certificates (each loaded once and shared).
impl PartialEq for Trust {
    fn eq(&self, other: &Self) -> bool {
        let same_check = match (&self.check, &other.check) {
            (Check::None, Check::None) | (Check::Certificate, Check::Certificate) => true,
            (Check::Token(a), Check::Token(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let same_tls = match (&self.tls, &other.tls) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_check && same_tls
    }
}

impl Trust {
    /// Mode `none`, in plain text: for loopback.
    pub fn none() -> Self {
        Self::default()
    }

    /// Mode `token`: every call carries a service token.
    pub fn token(tokens: ServiceTokens) -> Self {
        Self {
            check: Check::Token(Arc::new(tokens)),
            tls: None,
        }
    }

    /// Mode `mtls`: every call comes over TLS with a client certificate
    /// signed by the CA of `tls`.
    pub fn mtls(tls: Arc<Tls>) -> Self {
        Self {
            check: Check::Certificate,
            tls: Some(tls),
        }
    }

    /// The same check, over TLS.
    pub fn with_tls(self, tls: Arc<Tls>) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }

    pub fn name(&self) -> &'static str {
        match self.check {
            Check::None => "none",
            Check::Token(_) => "token",
            Check::Certificate => "mtls",
        }
    }

    pub fn check(&self) -> &Check {
        &self.check
    }

    /// The TLS setup servers accept with and clients dial with, if any.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// The id an edge attaches with: `edge_id` as given, except that in
    /// mode `mtls` it is put under the certificate's name (see
    /// [`Caller::may_attach_as`]) unless it already is.
    pub fn edge_id(&self, edge_id: &EdgeId) -> EdgeId {
        match (&self.check, self.tls.as_ref().and_then(|t| t.subject())) {
            (Check::Certificate, Some(subject))
                if edge_id != subject && !edge_id.as_str().starts_with(&format!("{subject}/")) =>
            {
                EdgeId::from(format!("{subject}/{edge_id}"))
            }
            _ => edge_id.clone(),
        }
    }

    /// Rule 2: the caller of a call to `path` with these headers, over a
    /// connection whose client certificate said `peer`.
    pub fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&PeerIdentity>,
    ) -> Result<Caller, Status> {
        let Access::Roles(roles) = access(path) else {
            return Ok(match self.check {
                Check::None => Caller::anyone(),
                _ => Caller::nobody(),
            });
        };
        let caller = match &self.check {
            Check::None => return Ok(Caller::anyone()),
            Check::Token(tokens) => {
                let token = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Status::from(Failure::new(
                            Code::Unauthenticated,
                            Reason::CredentialsMissing,
                            "a service token is required: send `authorization: Bearer <token>`",
                        ))
                    })?;
                tokens.verify(token.trim())?
            }
            Check::Certificate => match peer {
                Some(PeerIdentity {
                    caller: Some(caller),
                    ..
                }) => Caller::clone(caller),
                Some(PeerIdentity {
                    refusal: Some(why), ..
                }) => {
                    return Err(invalid_credentials(format!(
                        "the client certificate grants nothing: {why}"
                    )));
                }
                _ => {
                    return Err(Failure::new(
                        Code::Unauthenticated,
                        Reason::CredentialsMissing,
                        "a client certificate signed by the Streamer CA is required",
                    )
                    .into());
                }
            },
        };
        if !roles.iter().any(|r| caller.roles.contains(r)) {
            let needed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(Failure::new(
                Code::PermissionDenied,
                Reason::RoleNotAllowed,
                format!(
                    "{path} needs the role {}; this credential ({}) has {:?}",
                    if needed.is_empty() {
                        "that no credential has (it is not part of the API)".to_owned()
                    } else {
                        needed.join(" or ")
                    },
                    caller.subject,
                    caller.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>()
                ),
            )
            .into());
        }
        Ok(caller)
    }

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
        if let Check::None = self.trust.check {
            return Box::pin(self.inner.call(request));
        }
        let peer = request.extensions().get::<PeerIdentity>();
        match self
            .trust
            .authorize(request.uri().path(), request.headers(), peer)
        {
            Ok(caller) => {
                request.extensions_mut().insert(Arc::new(caller));
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                metrics::counter!("streamer_grpc_refused_total", "code" => crate::metrics::grpc_code(status.code()))
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
        let Check::Token(tokens) = &self.trust.check else {
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
            .map_err(|e| internal(format!("cannot mint a service token: {e}")))?;
        let value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| internal(format!("cannot send a service token: {e}")))?;
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

/// UNAUTHENTICATED: a credential was presented and is no good.
fn invalid_credentials(message: impl Into<String>) -> Status {
    Failure::new(Code::Unauthenticated, Reason::CredentialsInvalid, message).into()
}

/// INTERNAL: this process cannot do what it must (a broken deployment).
fn internal(message: impl Into<String>) -> Status {
    Failure::new(Code::Internal, Reason::Internal, message).into()
}

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
    fn every_method_of_the_contract_is_given_its_roles() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(streamer_api::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut methods = 0;
        for file in set.file.iter().filter(|f| f.package() == "streamer.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/streamer.v1.{}/{}", service.name(), method.name());
                    methods += 1;
                    assert_ne!(
                        access(&path),
                        Access::Roles(&[]),
                        "{path} is refused to every role: give it its roles in `access`"
                    );
                }
            }
        }
        assert!(
            methods > 20,
            "the contract's methods were found ({methods})"
        );
        assert_eq!(
            access("/streamer.v1.ConnectionService/Publish"),
            Access::Roles(&[Role::Backend])
        );
        assert_eq!(
            access("/streamer.v1.ConnectionService/NoSuchMethod"),
            Access::Roles(&[]),
            "closed unless listed"
        );
    }

    #[test]
    fn mode_none_lets_anyone_do_anything() {
        let caller = Trust::none()
            .authorize(
                "/streamer.v1.EdgeService/Attach",
                &http::HeaderMap::new(),
                None,
            )
            .unwrap();
        assert_eq!(caller, Caller::anyone());
        assert!(caller.reaches(&"any".into()));
    }

    #[test]
    fn mode_token_checks_the_token_then_the_role() {
        let tokens = tokens();
        let trust = Trust::token(tokens.clone());
        let send = "/streamer.v1.ConnectionService/Send";

        let missing = trust
            .authorize(send, &http::HeaderMap::new(), None)
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);

        let forged = ServiceTokens::from_secret(&[8u8; 32])
            .unwrap()
            .mint("billing", &[Role::Backend], None, Duration::from_secs(60))
            .unwrap();
        let wrong_key = trust.authorize(send, &headers(&forged), None).unwrap_err();
        assert_eq!(wrong_key.code(), tonic::Code::Unauthenticated);

        let router = tokens
            .mint("r", &[Role::Router], None, Duration::from_secs(60))
            .unwrap();
        let denied = trust.authorize(send, &headers(&router), None).unwrap_err();
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
        let caller = trust.authorize(send, &headers(&backend), None).unwrap();
        assert_eq!(caller.subject, "billing");
        assert!(caller.reaches(&"acme".into()));
        assert!(!caller.reaches(&"globex".into()));

        // Probes need nothing, and get no power from it.
        let probe = trust
            .authorize(
                "/grpc.health.v1.Health/Check",
                &http::HeaderMap::new(),
                None,
            )
            .unwrap();
        assert!(probe.roles.is_empty() && !probe.reaches(&"acme".into()));
    }

    #[test]
    fn expired_tokens_and_short_secrets_are_refused() {
        let tokens = tokens();
        let trust = Trust::token(tokens.clone());
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
            .authorize(
                "/streamer.v1.ConnectionService/Send",
                &headers(&expired),
                None,
            )
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
                .authorize(
                    "/streamer.v1.ConnectionService/Send",
                    &headers(&other),
                    None
                )
                .is_err()
        );

        assert!(ServiceTokens::from_secret(b"short").is_err());
    }

    #[test]
    fn credentials_present_a_token_that_the_servers_accept() {
        use tonic::service::Interceptor as _;
        let trust = Trust::token(tokens());
        let mut credentials = trust.credentials("edge-1", &[Role::Edge]);
        let request = credentials.call(tonic::Request::new(())).unwrap();
        let value = request.metadata().get("authorization").unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            value.to_str().unwrap().parse().unwrap(),
        );
        let caller = trust
            .authorize("/streamer.v1.EdgeService/Attach", &headers, None)
            .unwrap();
        assert_eq!(caller.subject, "edge-1");

        let mut none = Trust::none().credentials("edge-1", &[Role::Edge]);
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    proptest::proptest! {
        /// Any header a caller sends is refused or accepted, never a panic;
        /// in mode `token` nothing but a token signed with the secret gets in.
        #[test]
        fn any_authorization_header_is_refused_without_the_secret(value in "[ -~]{0,300}") {
            let trust = Trust::token(tokens());
            let mut headers = http::HeaderMap::new();
            if let Ok(value) = value.parse() {
                headers.insert(http::header::AUTHORIZATION, value);
            }
            proptest::prop_assert!(
                trust.authorize("/streamer.v1.ConnectionService/Send", &headers, None).is_err()
            );
        }
    }
}
