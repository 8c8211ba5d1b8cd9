//! Keys and token builders shared by the unit tests.
//!
//! RSA key generation is slow, so the one RSA key the tests sign with is
//! created once per test run, by [`dev::ensure_dev_key`] itself, and its
//! files are kept in memory; EC and Ed25519 keys are fixed test keys in
//! `tests-data/`, generated once with openssl.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPublicKey as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _, LineEnding};
use rsa::traits::PublicKeyParts as _;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::dev;
use crate::validator::unix_now;

/// The contents of `tests-data/<name>`.
pub(crate) fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests-data")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The shared RSA key, in every form the tests need.
pub(crate) struct RsaFixture {
    pub(crate) created_private_pem: String,
    pub(crate) created_private_mode: u32,
    pub(crate) created_public_pem: String,
    pub(crate) pkix_pem: String,
    pub(crate) pkcs1_pem: String,
    /// Modulus and exponent, base64url, for JWKS documents.
    pub(crate) n: String,
    pub(crate) e: String,
    pub(crate) encoding: EncodingKey,
}

pub(crate) fn rsa() -> &'static RsaFixture {
    static RSA: OnceLock<RsaFixture> = OnceLock::new();
    RSA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dev::ensure_dev_key(dir.path()).expect("create the dev key");
        let created_private_pem =
            std::fs::read_to_string(&key.private_key_path).expect("read dev.key");
        let created_public_pem =
            std::fs::read_to_string(&key.public_key_path).expect("read dev.pem");
        let created_private_mode = file_mode(&key.private_key_path);

        let private =
            RsaPrivateKey::from_pkcs8_pem(&created_private_pem).expect("dev.key is PKCS#8");
        let public = RsaPublicKey::from(&private);
        RsaFixture {
            pkix_pem: public.to_public_key_pem(LineEnding::LF).expect("PKIX PEM"),
            pkcs1_pem: public.to_pkcs1_pem(LineEnding::LF).expect("PKCS#1 PEM"),
            n: URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            e: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            encoding: EncodingKey::from_rsa_pem(created_private_pem.as_bytes())
                .expect("jsonwebtoken reads dev.key"),
            created_private_pem,
            created_private_mode,
            created_public_pem,
        }
    })
}

#[cfg(unix)]
fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).expect("stat").permissions().mode()
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> u32 {
    0
}

/// A fresh data directory holding the shared dev key pair.
pub(crate) fn dev_data_dir() -> TempDir {
    let rsa = rsa();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("keys dir");
    write_file(&keys.join("dev.key"), &rsa.created_private_pem);
    write_file(&keys.join("dev.pem"), &rsa.created_public_pem);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(keys.join("dev.key"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    dir
}

/// A 1024-bit RSA public key, which must be refused.
pub(crate) fn rsa_1024_pkix_pem() -> String {
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("keygen");
    RsaPublicKey::from(&key)
        .to_public_key_pem(LineEnding::LF)
        .expect("PEM")
}

pub(crate) fn write_file(path: &Path, contents: &str) -> PathBuf {
    std::fs::write(path, contents).expect("write file");
    path.to_path_buf()
}

pub(crate) fn ec_key(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(fixture(name).as_bytes()).expect("EC private key")
}

pub(crate) fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(fixture("ed25519.key").as_bytes()).expect("Ed25519 private key")
}

/// Valid claims: an hour left, issued now.
pub(crate) fn claims() -> Value {
    let now = unix_now();
    json!({
        "sub": "user-1",
        "tenant_id": "tenant-1",
        "permissions": ["read", "write"],
        "iat": now,
        "exp": now + Duration::from_secs(3600).as_secs(),
    })
}

/// `claims()` with some members replaced (or removed, for `null`).
pub(crate) fn claims_with(changes: Value) -> Value {
    let mut claims = claims();
    let (Some(object), Value::Object(changes)) = (claims.as_object_mut(), changes) else {
        panic!("claims are objects");
    };
    for (name, value) in changes {
        if value.is_null() {
            object.remove(&name);
        } else {
            object.insert(name, value);
        }
    }
    claims
}

/// A token signed properly with `key`.
pub(crate) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

/// A token assembled by hand, for headers jsonwebtoken would not write.
pub(crate) fn assemble(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// A JWK of `tests-data/jwks.json`, found by its kid there and published
/// under `kid`: `jwks-ec-a` and `jwks-ec-b` verify what [`ec_key`] signs
/// with `es256-a.key` and `es256-b.key`.
pub(crate) fn jwk(fixture_kid: &str, kid: &str) -> Value {
    let document: Value = serde_json::from_str(&fixture("jwks.json")).expect("fixture JSON");
    let mut key = document["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|key| key["kid"] == fixture_kid))
        .cloned()
        .unwrap_or_else(|| panic!("no key {fixture_kid} in jwks.json"));
    key["kid"] = json!(kid);
    key
}

/// A JWKS document of `keys`.
pub(crate) fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// What [`JwksServer`] answers.
#[derive(Debug, Clone)]
pub(crate) enum JwksAnswer {
    /// 200 with this document.
    Document(Value),
    /// This status, with no body.
    Status(u16),
    /// 200 with this body.
    Raw(String),
}

struct JwksServerState {
    answer: std::sync::Mutex<JwksAnswer>,
    /// Requests received, counted as they arrive.
    fetches: tokio::sync::watch::Sender<u64>,
}

/// A JWKS URL served on 127.0.0.1:0 that counts its fetches. Stops when
/// dropped.
pub(crate) struct JwksServer {
    pub(crate) url: String,
    state: std::sync::Arc<JwksServerState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl JwksServer {
    pub(crate) async fn start(answer: JwksAnswer) -> Self {
        use axum::extract::State;
        use axum::http::StatusCode;
        use axum::response::IntoResponse;

        let state = std::sync::Arc::new(JwksServerState {
            answer: std::sync::Mutex::new(answer),
            fetches: tokio::sync::watch::Sender::new(0),
        });
        async fn serve(
            State(state): State<std::sync::Arc<JwksServerState>>,
        ) -> axum::response::Response {
            state.fetches.send_modify(|count| *count += 1);
            let answer = state.answer.lock().expect("answer lock").clone();
            match answer {
                JwksAnswer::Document(document) => axum::Json(document).into_response(),
                JwksAnswer::Status(code) => StatusCode::from_u16(code)
                    .expect("a status code")
                    .into_response(),
                JwksAnswer::Raw(body) => body.into_response(),
            }
        }
        let app = axum::Router::new()
            .route("/jwks.json", axum::routing::get(serve))
            .with_state(std::sync::Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("JWKS server");
        });
        Self {
            url: format!("http://{addr}/jwks.json"),
            state,
            _stop: stop,
        }
    }

    /// What later fetches get.
    pub(crate) fn answer(&self, answer: JwksAnswer) {
        *self.state.answer.lock().expect("answer lock") = answer;
    }

    /// Fetches received so far.
    pub(crate) fn fetches(&self) -> u64 {
        *self.state.fetches.borrow()
    }

    /// Waits until `count` fetches have arrived (failing the test after a
    /// generous while, so a missing fetch is a failure and not a hang).
    pub(crate) async fn wait_for_fetches(&self, count: u64) {
        let mut fetches = self.state.fetches.subscribe();
        tokio::time::timeout(Duration::from_secs(30), fetches.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| panic!("{count} fetches never arrived; {} did", self.fetches()))
            .expect("the server is running");
    }
}
