//! The development key pair and token minting, so that a local setup works
//! without an identity provider.
//!
//! `<data_dir>/keys/dev.key` is an RSA 2048 private key (PKCS#8 PEM, mode
//! 0600) and `<data_dir>/keys/dev.pem` its public key (PKIX PEM), which a
//! validator given `<data_dir>/keys` (or the file) loads with kid `dev`.
//! The private key has the `.key` extension precisely so that a validator
//! scanning the directory skips it.
//!
//! Creation is safe against a concurrent creator: the private key is written
//! to a temporary file and hard-linked into place, which fails if another
//! process won, in which case its key is used; the public key is always
//! derived from whichever private key is in place.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding};

use crate::KeyError;
use crate::validator::unix_now;

/// The kid of the development key.
pub const DEV_KID: &str = "dev";
const KEY_BITS: usize = 2048;
const PRIVATE_FILE: &str = "dev.key";
const PUBLIC_FILE: &str = "dev.pem";

/// The directory holding the development key pair, `<data_dir>/keys`.
pub fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

/// The development public key, `<data_dir>/keys/dev.pem`, for
/// [`AuthConfig::key_paths`](crate::AuthConfig::key_paths).
pub fn public_key_path(data_dir: &Path) -> PathBuf {
    keys_dir(data_dir).join(PUBLIC_FILE)
}

/// The development key pair, able to mint tokens.
#[derive(Clone)]
pub struct DevKey {
    /// Always [`DEV_KID`].
    pub kid: String,
    /// `<data_dir>/keys/dev.key`.
    pub private_key_path: PathBuf,
    /// `<data_dir>/keys/dev.pem`.
    pub public_key_path: PathBuf,
    encoding: EncodingKey,
}

impl std::fmt::Debug for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKey")
            .field("kid", &self.kid)
            .field("private_key_path", &self.private_key_path)
            .field("public_key_path", &self.public_key_path)
            .finish_non_exhaustive()
    }
}

/// What to put in a minted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintOptions {
    /// `sub`.
    pub sub: String,
    /// `tenant_id`.
    pub tenant: String,
    /// `permissions`.
    pub permissions: Vec<String>,
    /// `topics`: patterns of the topics the client may subscribe itself
    /// to; left out when empty.
    pub topics: Vec<String>,
    /// `exp` is this long after `iat` (now).
    pub ttl: Duration,
    /// Mint a token that expired an hour ago (`iat` two hours ago); `ttl`
    /// is then ignored.
    pub expired: bool,
    /// Set `nbf` this far in the future.
    pub not_before: Option<Duration>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `aud`.
    pub audience: Option<String>,
}

impl Default for MintOptions {
    fn default() -> Self {
        Self {
            sub: "demo-user".to_owned(),
            tenant: "demo-tenant".to_owned(),
            permissions: vec!["read".to_owned(), "write".to_owned()],
            topics: Vec::new(),
            ttl: Duration::from_secs(3600),
            expired: false,
            not_before: None,
            issuer: None,
            audience: None,
        }
    }
}

impl DevKey {
    /// Mints an RS256 token with header kid [`DEV_KID`].
    pub fn mint(&self, opts: &MintOptions) -> Result<String, KeyError> {
        let now = unix_now();
        let (iat, exp) = if opts.expired {
            (now.saturating_sub(2 * 3600), now.saturating_sub(3600))
        } else {
            (now, now.saturating_add(opts.ttl.as_secs()))
        };
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), opts.sub.clone().into());
        claims.insert("tenant_id".into(), opts.tenant.clone().into());
        claims.insert("permissions".into(), opts.permissions.clone().into());
        if !opts.topics.is_empty() {
            claims.insert("topics".into(), opts.topics.clone().into());
        }
        claims.insert("iat".into(), iat.into());
        claims.insert("exp".into(), exp.into());
        // A random id, so a development token can be revoked like any other.
        let jti: [u8; 16] = rand::random();
        claims.insert("jti".into(), URL_SAFE_NO_PAD.encode(jti).into());
        if let Some(delay) = opts.not_before {
            claims.insert("nbf".into(), now.saturating_add(delay.as_secs()).into());
        }
        if let Some(issuer) = &opts.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        if let Some(audience) = &opts.audience {
            claims.insert("aud".into(), audience.clone().into());
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(KeyError::Sign)
    }
}

/// Creates `<data_dir>/keys/dev.key` and `dev.pem` unless the private key
/// exists, then loads the pair. An existing private key is reused, and a
/// missing or stale `dev.pem` is rewritten from it.
pub fn ensure_dev_key(data_dir: &Path) -> Result<DevKey, KeyError> {
    let dir = keys_dir(data_dir);
    create_private_dir(&dir)?;
    let private_path = dir.join(PRIVATE_FILE);
    if !private_path.exists() {
        tracing::info!(path = %private_path.display(), "creating the development key");
        let key =
            RsaPrivateKey::new(&mut rand::thread_rng(), KEY_BITS).map_err(KeyError::Generate)?;
        let pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::invalid(&private_path, e.to_string()))?;
        install_private_key(&private_path, pem.as_bytes())?;
    }
    let private = read_private_key(&private_path)?;
    let public_path = dir.join(PUBLIC_FILE);
    let public_pem = public_pem(&private, &public_path)?;
    if fs::read_to_string(&public_path).ok().as_deref() != Some(public_pem.as_str()) {
        write_replacing(&public_path, public_pem.as_bytes())?;
    }
    dev_key(&private, private_path, public_path)
}

/// Loads an existing development key pair without creating anything.
pub fn load_dev_key(data_dir: &Path) -> Result<DevKey, KeyError> {
    let dir = keys_dir(data_dir);
    let private_path = dir.join(PRIVATE_FILE);
    if !private_path.exists() {
        return Err(KeyError::DevKeyMissing { path: private_path });
    }
    let private = read_private_key(&private_path)?;
    let public_path = dir.join(PUBLIC_FILE);
    let expected = public_pem(&private, &public_path)?;
    match fs::read_to_string(&public_path) {
        Ok(found) if found == expected => {}
        Ok(_) => {
            return Err(KeyError::invalid(
                &public_path,
                "does not match dev.key, so tokens minted with it would not verify; \
                 delete both files and run `streamer all` once to create a new pair",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::invalid(
                &public_path,
                "is missing; run `streamer all` once to recreate it from dev.key",
            ));
        }
        Err(e) => return Err(KeyError::io(&public_path, e)),
    }
    dev_key(&private, private_path, public_path)
}

fn dev_key(
    private: &RsaPrivateKey,
    private_key_path: PathBuf,
    public_key_path: PathBuf,
) -> Result<DevKey, KeyError> {
    let der = private
        .to_pkcs1_der()
        .map_err(|e| KeyError::invalid(&private_key_path, e.to_string()))?;
    Ok(DevKey {
        kid: DEV_KID.to_owned(),
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        private_key_path,
        public_key_path,
    })
}

fn public_pem(private: &RsaPrivateKey, public_path: &Path) -> Result<String, KeyError> {
    private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::invalid(public_path, e.to_string()))
}

fn read_private_key(path: &Path) -> Result<RsaPrivateKey, KeyError> {
    let pem = fs::read_to_string(path).map_err(|e| KeyError::io(path, e))?;
    warn_if_readable_by_others(path);
    RsaPrivateKey::from_pkcs8_pem(&pem)
        .map_err(|e| KeyError::invalid(path, format!("not an RSA private key in PKCS#8 PEM: {e}")))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the development private key is readable by other users"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| KeyError::io(dir, e))
}

/// A temporary file next to `path`, unique to this process and call.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce: u64 = rand::random();
    path.with_file_name(format!(".{name}.{}.{nonce:x}.tmp", std::process::id()))
}

/// Writes a new file with `mode`, complete and synced, at a temporary path.
fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, KeyError> {
    let temp = temp_path(path);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = options.open(&temp).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&temp);
        return Err(KeyError::io(&temp, e));
    }
    Ok(temp)
}

/// Puts the private key in place unless one already is; it is never
/// visible half-written, and never replaces a key another process created.
fn install_private_key(path: &Path, pem: &[u8]) -> Result<(), KeyError> {
    let temp = write_temp(path, pem, 0o600)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(()),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(KeyError::io(path, e)),
    }
}

/// Replaces a file atomically.
fn write_replacing(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let temp = write_temp(path, contents, 0o644)?;
    fs::rename(&temp, path).map_err(|e| {
        let _ = fs::remove_file(&temp);
        KeyError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support;
    use crate::{AuthConfig, TokenValidator};
    use streamer_api::v1::TokenFailure;

    fn validator_for(data_dir: &Path, config: AuthConfig) -> TokenValidator {
        TokenValidator::new(AuthConfig {
            key_paths: vec![keys_dir(data_dir)],
            ..config
        })
        .expect("the dev public key loads")
    }

    #[test]
    fn ensure_creates_a_private_key_only_its_owner_can_read() {
        let rsa = test_support::rsa();
        #[cfg(unix)]
        assert_eq!(rsa.created_private_mode & 0o777, 0o600);
        assert!(
            rsa.created_private_pem
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert!(rsa.pkix_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn ensure_reuses_an_existing_pair_and_repairs_the_public_key() {
        let dir = test_support::dev_data_dir();
        let private_path = dir.path().join("keys/dev.key");
        let before = fs::read(&private_path).expect("dev.key");
        fs::write(dir.path().join("keys/dev.pem"), "stale").expect("spoil dev.pem");

        let key = ensure_dev_key(dir.path()).expect("reuses the pair");
        assert_eq!(fs::read(&private_path).expect("dev.key"), before);
        assert_eq!(key.kid, "dev");
        assert_eq!(key.public_key_path, public_key_path(dir.path()));
        assert_eq!(
            fs::read_to_string(&key.public_key_path).expect("dev.pem"),
            test_support::rsa().pkix_pem
        );
        load_dev_key(dir.path()).expect("the repaired pair loads");
    }

    #[test]
    fn load_without_a_key_tells_the_user_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_dev_key(dir.path()).expect_err("nothing there");
        assert!(matches!(err, KeyError::DevKeyMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("streamer all"), "{err}");
    }

    #[test]
    fn load_refuses_a_public_key_that_does_not_match() {
        let dir = test_support::dev_data_dir();
        fs::write(
            dir.path().join("keys/dev.pem"),
            test_support::fixture("es256-a.pem"),
        )
        .expect("replace dev.pem");
        let err = load_dev_key(dir.path()).expect_err("mismatch");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn minted_tokens_verify_with_the_dev_public_key() {
        let dir = test_support::dev_data_dir();
        let key = load_dev_key(dir.path()).expect("pair loads");
        let validator = validator_for(
            dir.path(),
            AuthConfig {
                issuer: Some("streamer-dev".into()),
                audience: Some("streamer".into()),
                ..AuthConfig::default()
            },
        );
        let options = MintOptions {
            issuer: Some("streamer-dev".into()),
            audience: Some("streamer".into()),
            ..MintOptions::default()
        };
        let token = key.mint(&options).expect("mint");
        let claims = validator.validate(&token).expect("valid");
        assert_eq!(claims.user_id, "demo-user");
        assert_eq!(claims.tenant_id, "demo-tenant");
        assert_eq!(claims.permissions, ["read", "write"]);
        assert_eq!(claims.key_id.as_deref(), Some("dev"));
        assert_eq!(claims.issuer.as_deref(), Some("streamer-dev"));
        let iat = claims.issued_at.expect("iat set");
        assert_eq!(claims.expires_at, iat + 3600);
        let jti = claims.jti.expect("a jti, so the token can be revoked");
        let again = validator
            .validate(&key.mint(&options).expect("mint"))
            .expect("valid");
        assert_ne!(again.jti, Some(jti), "each token has its own");
    }

    #[test]
    fn minted_expired_and_future_tokens_are_refused() {
        let dir = test_support::dev_data_dir();
        let key = load_dev_key(dir.path()).expect("pair loads");
        let validator = validator_for(dir.path(), AuthConfig::default());

        let expired = key
            .mint(&MintOptions {
                expired: true,
                ..MintOptions::default()
            })
            .expect("mint");
        let rejection = validator.validate(&expired).expect_err("expired");
        assert_eq!(rejection.failure, TokenFailure::Expired);

        let early = key
            .mint(&MintOptions {
                not_before: Some(Duration::from_secs(600)),
                ..MintOptions::default()
            })
            .expect("mint");
        let rejection = validator.validate(&early).expect_err("not yet valid");
        assert_eq!(rejection.failure, TokenFailure::NotYetValid);
    }
}
