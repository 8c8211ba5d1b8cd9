//! What the token validator is told.

use std::path::PathBuf;
use std::time::Duration;

/// The clock skew allowed by default when checking `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Configuration of a [`TokenValidator`](crate::TokenValidator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// PEM files (PKCS#1 "RSA PUBLIC KEY", PKIX "PUBLIC KEY" for RSA, EC
    /// P-256/P-384 and Ed25519), JWKS JSON files, or directories containing
    /// such files (`*.pem`, `*.json`, not recursive).
    ///
    /// The kid of a PEM file is its file stem (`keys/dev-2026.pem` has kid
    /// `dev-2026`); the kid of a JWKS key is its `kid`. When two keys claim
    /// the same kid, the one found first (in this order, then by file name
    /// within a directory) wins and the other is ignored with a warning.
    pub key_paths: Vec<PathBuf>,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, a token's `aud` (a string or a list) must contain it.
    pub audience: Option<String>,
    /// When set, a token's `tenant_id` must be one of these. `None` allows
    /// every tenant.
    pub allowed_tenants: Option<Vec<String>>,
    /// Clock skew allowance for `exp`, `nbf` and `iat`; whole seconds count.
    pub leeway: Duration,
}

impl AuthConfig {
    /// A configuration that reads keys from `key_paths` and checks nothing
    /// beyond the signature, the time claims and the required claims.
    pub fn new(key_paths: impl IntoIterator<Item = impl Into<PathBuf>>) -> Self {
        Self {
            key_paths: key_paths.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            key_paths: Vec::new(),
            issuer: None,
            audience: None,
            allowed_tenants: None,
            leeway: DEFAULT_LEEWAY,
        }
    }
}
