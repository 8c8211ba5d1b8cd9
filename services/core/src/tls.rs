//! TLS for every gRPC server and client (rustls, ring).
//!
//! Rules:
//! 1. A process has one certificate and key. It serves with them and
//!    presents them as a client, so the certificate of a role is also its
//!    identity toward the others (see [`crate::trust`] for what a client
//!    certificate's names grant).
//! 2. Peers are verified against one CA bundle, in both directions. A client
//!    certificate is optional at the handshake, but one that is presented
//!    must chain to the CA: a wrong-CA certificate never gets a connection.
//!    Whether a call needs a certificate is the trust mode's decision, made
//!    per method, so health probes and reflection work without one.
//! 3. The certificate and key are re-read when their files change (checked
//!    at most every [`RELOAD_CHECK`], on the next handshake), so a rotation by
//!    cert-manager or by hand needs no restart. A file that cannot be read or
//!    parsed keeps the previous pair in force, with a warning. The CA bundle is
//!    read at start.
//! 4. Handshakes run beside the accept loop, at most [`MAX_HANDSHAKES`] at a
//!    time, each within [`HANDSHAKE_TIMEOUT`]: a client that opens a socket and
//!    sends nothing costs one slot for ten seconds, never the listener.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::trust::Caller;

/// How often a handshake may check whether the certificate files changed.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener.
pub const MAX_HANDSHAKES: usize = 256;
/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a process's certificate, key and CA bundle are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of the CA certificates that sign every peer.
    pub ca: PathBuf,
}

/// A loaded TLS setup: what servers accept with and clients connect with.
pub struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The subject of this process's own certificate, when it has one.
    subject: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads and checks every file now, so a mistake stops the process at
    /// start with a message naming the file.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<Self>> {
        let provider = provider();
        let identity = Arc::new(ReloadingKey::open(
            files.cert.clone(),
            files.key.clone(),
            provider.clone(),
        )?);
        let mut roots = RootCertStore::empty();
        let ca = read_certificates(&files.ca)?;
        let (added, _ignored) = roots.add_parsable_certificates(ca);
        anyhow::ensure!(
            added > 0,
            "{}: no usable CA certificate in the bundle",
            files.ca.display()
        );
        let roots = Arc::new(roots);

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| anyhow::anyhow!("{}: {e}", files.ca.display()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity.clone());
        server.alpn_protocols = vec![b"h2".to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(identity.clone());
        client.alpn_protocols = vec![b"h2".to_vec()];

        let subject = identity
            .current()
            .cert
            .first()
            .and_then(|leaf| crate::trust::certificate_caller(leaf).ok())
            .map(|caller| caller.subject)
            .filter(|s| !s.is_empty());
        Ok(Arc::new(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            subject,
        }))
    }

    /// The subject (common name) of this process's own certificate.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// What a client dials with: TCP, then TLS with this process's
    /// certificate, checking the server's name against the URL's host.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector {
            config: self.client.clone(),
            address: None,
        }
    }

    /// Accepted, handshaken connections on `listener`.
    pub(crate) fn accept(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> impl futures::Stream<Item = io::Result<ServerIo>> + Send + 'static {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        accepted(listener)
            .map(move |tcp| {
                let acceptor = acceptor.clone();
                async move {
                    let peer = tcp.peer_addr().ok();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => Some(ServerIo::tls(stream)),
                        Ok(Err(error)) => {
                            handshake_failed(peer, &error.to_string());
                            None
                        }
                        Err(_) => {
                            handshake_failed(peer, "timed out");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(MAX_HANDSHAKES)
            .filter_map(|io| async move { io.map(Ok) })
    }
}

fn handshake_failed(peer: Option<SocketAddr>, error: &str) {
    metrics::counter!("streamer_grpc_tls_handshake_failures_total").increment(1);
    tracing::warn!(peer = ?peer, error, "TLS handshake failed");
}

/// Plain accepted TCP sockets, with Nagle off. An accept error (such as
/// running out of descriptors) pauses accepting for a moment instead of
/// spinning on it.
pub(crate) fn accepted(
    listener: TcpListener,
) -> impl futures::Stream<Item = TcpStream> + Send + 'static {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    // Deliveries are small and latency-bound: Nagle's
                    // algorithm stalls them by up to 40 ms (measured in
                    // BENCHMARKS.md).
                    let _ = socket.set_nodelay(true);
                    return Some((socket, listener));
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a gRPC connection; pausing accepts for 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate file: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(certs)
}

fn read_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = read_certificates(cert)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{}: no usable PEM private key: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, der, provider).map_err(|e| {
        anyhow::anyhow!(
            "{} and {} do not make a usable pair: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// What tells a check that a file changed: its size and modification time.
type Fingerprint = Option<(u64, SystemTime)>;

fn modified(path: &Path) -> Fingerprint {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// This process's certificate and key, re-read when their files change.
#[derive(Debug)]
struct ReloadingKey {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// When the files were last looked at, and what they looked like.
    seen: Mutex<(Instant, Fingerprint, Fingerprint)>,
}

impl ReloadingKey {
    fn open(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let current = read_key(&cert, &key, &provider)?;
        let seen = (Instant::now(), modified(&cert), modified(&key));
        Ok(Self {
            cert,
            key,
            provider,
            current: RwLock::new(current),
            seen: Mutex::new(seen),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.reload_if_changed();
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reload_if_changed(&self) {
        // A handshake that finds another one checking goes on with the
        // pair in force.
        let Ok(mut seen) = self.seen.try_lock() else {
            return;
        };
        if seen.0.elapsed() < RELOAD_CHECK {
            return;
        }
        let now = (Instant::now(), modified(&self.cert), modified(&self.key));
        if (now.1, now.2) == (seen.1, seen.2) {
            seen.0 = now.0;
            return;
        }
        match read_key(&self.cert, &self.key, &self.provider) {
            Ok(fresh) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                *seen = now;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                // Keep the pair in force; look again after the interval
                // (a rotation may be half written).
                seen.0 = now.0;
                tracing::warn!(%error, "cannot reload the TLS certificate; keeping the previous one");
            }
        }
    }
}

impl ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Dials `host:port` of a URI (or one address it resolves to, see
/// [`TlsConnector::to_address`]) and speaks TLS over it, verifying the
/// server's certificate against the URI's host (tonic's custom connector,
/// see [`crate::grpc::channel`]).
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    address: Option<std::net::SocketAddr>,
}

impl TlsConnector {
    /// Dials `address` instead of resolving the URI's host: one replica
    /// behind a name that resolves to several, still verified as that name.
    pub fn to_address(mut self, address: std::net::SocketAddr) -> Self {
        self.address = Some(address);
        self
    }
}

type ConnectFuture<T> =
    Pin<Box<dyn std::future::Future<Output = Result<T, io::Error>> + Send + 'static>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let address = self.address;
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
            let host = crate::grpc::host_of(&uri)
                .ok_or_else(|| invalid("the URL names no host"))?
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("the URL's host is not a valid TLS server name"))?;
            let tcp = match address {
                Some(address) => TcpStream::connect(address).await?,
                None => TcpStream::connect((host.as_str(), port)).await?,
            };
            tcp.set_nodelay(true)?;
            let stream = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// An accepted gRPC connection, plain or TLS.
pub enum ServerIo {
    Plain(TcpStream),
    Tls {
        stream: Box<tokio_rustls::server::TlsStream<TcpStream>>,
        peer: PeerIdentity,
    },
}

/// Who the client certificate of a connection says its holder is, worked
/// out once per connection. Tonic puts it in every call's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    /// `None`: no certificate was presented, or its names grant nothing
    /// (`refusal` says why).
    pub caller: Option<Arc<Caller>>,
    pub refusal: Option<Arc<str>>,
}

impl ServerIo {
    pub(crate) fn plain(stream: TcpStream) -> Self {
        ServerIo::Plain(stream)
    }

    fn tls(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        let peer = match leaf.map(|der| crate::trust::certificate_caller(der)) {
            None => PeerIdentity::default(),
            Some(Ok(caller)) => PeerIdentity {
                caller: Some(Arc::new(caller)),
                refusal: None,
            },
            Some(Err(why)) => PeerIdentity {
                caller: None,
                refusal: Some(why.into()),
            },
        };
        ServerIo::Tls {
            stream: Box::new(stream),
            peer,
        }
    }
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            ServerIo::Plain(_) => PeerIdentity::default(),
            ServerIo::Tls { peer, .. } => peer.clone(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls { stream, .. } => stream.is_write_vectored(),
        }
    }
}

/// Certificates for trying Streamer with TLS: a CA and the certificates it
/// signs, in the layout cert-manager writes (`tls.crt`, `tls.key`,
/// `ca.crt`). `streamer certs` and the tests use it; production
/// certificates come from the operator's own CA.
pub mod issue {
    use std::net::IpAddr;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    use crate::trust::{ROLE_URI_PREFIX, Role, TENANT_URI_PREFIX};

    /// A PEM certificate and its PEM key.
    #[derive(Debug, Clone)]
    pub struct Pem {
        pub cert: String,
        pub key: String,
    }

    /// A certificate authority that signs role certificates.
    pub struct Authority {
        pub pem: Pem,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Authority {
        /// A new self-signed CA named `name`.
        pub fn new(name: &str) -> anyhow::Result<Self> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            let pem = Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            };
            Ok(Self {
                pem,
                issuer: Issuer::new(params, key),
            })
        }

        /// A certificate for `subject` holding `roles` (and bound to
        /// `tenants`, when given), valid as a server for `hosts` (DNS names
        /// or IP addresses) and as a client.
        pub fn issue(
            &self,
            subject: &str,
            roles: &[Role],
            tenants: &[String],
            hosts: &[String],
        ) -> anyhow::Result<Pem> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, subject);
            for host in hosts {
                params.subject_alt_names.push(match host.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(host.as_str().try_into()?),
                });
            }
            for role in roles {
                let uri = format!("{ROLE_URI_PREFIX}{}", role.as_str());
                params.subject_alt_names.push(SanType::URI(uri.try_into()?));
            }
            for tenant in tenants {
                let uri = format!("{TENANT_URI_PREFIX}{tenant}");
                params.subject_alt_names.push(SanType::URI(uri.try_into()?));
            }
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &self.issuer)?;
            Ok(Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::issue::Authority;
    use super::*;
    use crate::trust::{Role, certificate_caller};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_certificate_names_its_holder_roles_and_tenants() {
        let ca = Authority::new("test CA").unwrap();
        let pem = ca
            .issue(
                "billing",
                &[Role::Backend, Role::Router],
                &["acme".into()],
                &["localhost".into()],
            )
            .unwrap();
        let caller = certificate_caller(&der(&pem.cert)).unwrap();
        assert_eq!(caller.subject, "billing");
        assert_eq!(caller.roles, [Role::Backend, Role::Router].into());
        assert!(caller.reaches(&"acme".into()) && !caller.reaches(&"globex".into()));
        assert!(caller.authenticated);

        let everywhere = ca.issue("ops", &[Role::Backend], &[], &[]).unwrap();
        assert!(
            certificate_caller(&der(&everywhere.cert))
                .unwrap()
                .reaches(&"globex".into())
        );
    }

    #[test]
    fn a_certificate_without_a_role_or_with_an_unknown_one_grants_nothing() {
        let ca = Authority::new("test CA").unwrap();
        let server_only = ca.issue("auth", &[], &[], &["localhost".into()]).unwrap();
        let why = certificate_caller(&der(&server_only.cert)).unwrap_err();
        assert!(why.contains("no urn:streamer:role"), "{why}");

        let mut params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "urn:streamer:role:root".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let odd = params.self_signed(&key).unwrap();
        let why = certificate_caller(odd.der()).unwrap_err();
        assert!(why.contains("names no Streamer role"), "{why}");

        assert!(certificate_caller(b"not a certificate").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_certificate_is_served_after_the_check_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let ca = Authority::new("test CA").unwrap();
        let first = ca.issue("one", &[Role::Edge], &[], &[]).unwrap();
        std::fs::write(&cert, &first.cert).unwrap();
        std::fs::write(&key, &first.key).unwrap();
        let reloading = ReloadingKey::open(cert.clone(), key.clone(), provider()).unwrap();
        let subject = |k: &ReloadingKey| certificate_caller(&k.current().cert[0]).unwrap().subject;
        assert_eq!(subject(&reloading), "one");

        // A half-written rotation keeps the pair in force.
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        tokio::time::advance(RELOAD_CHECK + Duration::from_secs(1)).await;
        assert_eq!(subject(&reloading), "one");

        let second = ca.issue("two-longer", &[Role::Edge], &[], &[]).unwrap();
        std::fs::write(&cert, &second.cert).unwrap();
        std::fs::write(&key, &second.key).unwrap();
        assert_eq!(
            subject(&reloading),
            "one",
            "checked again only after the interval"
        );
        tokio::time::advance(RELOAD_CHECK + Duration::from_secs(1)).await;
        assert_eq!(subject(&reloading), "two-longer");
    }
}
