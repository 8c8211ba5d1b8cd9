//! What the token validator is told.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use streamer_core::ids::TenantId;

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
    ///
    /// These keys verify every token whose `iss` is not one of the
    /// [`jwks`](Self::jwks) issuers. Empty: only those issuers' tokens are
    /// accepted.
    pub key_paths: Vec<PathBuf>,
    /// When set, a token verified with the key files must have this `iss`.
    /// (A JWKS issuer's tokens have their issuer by construction.)
    pub issuer: Option<String>,
    /// When set, a token's `aud` (a string or a list) must contain it.
    pub audience: Option<String>,
    /// When set, a token's `tenant_id` must be one of these. `None` allows
    /// every tenant.
    pub allowed_tenants: Option<Vec<TenantId>>,
    /// Clock skew allowance for `exp`, `nbf` and `iat`; whole seconds count.
    pub leeway: Duration,
    /// Issuers whose keys are fetched from a JWKS URL. A token whose `iss`
    /// equals one of them is verified only with the keys from its URL,
    /// never with the key files or another issuer's keys.
    pub jwks: Vec<JwksSource>,
    /// When the JWKS URLs are fetched again.
    pub jwks_refresh: JwksRefresh,
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
            jwks: Vec::new(),
            jwks_refresh: JwksRefresh::default(),
        }
    }
}

/// An issuer and the URL of its JWKS document, written `ISSUER=URL`.
///
/// The issuer is compared with a token's `iss` exactly (a trailing `/`
/// matters). The URL is `http` or `https`; `https` is verified against the
/// webpki roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSource {
    /// The `iss` of the tokens these keys verify.
    pub issuer: String,
    /// Where the JWKS document is fetched from.
    pub url: String,
}

impl FromStr for JwksSource {
    type Err = String;

    /// Splits at the last `=` that starts an `http://` or `https://` URL, so
    /// an issuer may itself contain `=`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let split = ["=https://", "=http://"]
            .iter()
            .filter_map(|marker| text.rfind(marker))
            .max()
            .ok_or_else(|| format!("{text:?} is not ISSUER=URL with an http:// or https:// URL"))?;
        let (issuer, url) = (&text[..split], &text[split + 1..]);
        if issuer.trim().is_empty() {
            return Err(format!("{text:?} names no issuer before the `=`"));
        }
        check_jwks_url(url)?;
        Ok(Self {
            issuer: issuer.to_owned(),
            url: url.to_owned(),
        })
    }
}

/// The URL parsed, or why it cannot be a JWKS URL.
pub(crate) fn check_jwks_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host().is_some() => Ok(parsed),
        _ => Err(format!(
            "{url:?} is not an http:// or https:// URL with a host"
        )),
    }
}

/// The default [`JwksRefresh::interval`]: five minutes.
pub const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// The default [`JwksRefresh::unknown_kid_interval`].
///
/// Ten seconds: a flood of made-up kids costs an issuer six fetches a
/// minute at most, far below what identity providers rate-limit, while a
/// key that starts signing right after a refresh is refused for at most ten
/// seconds (its first token triggers the fetch at once unless one ran in
/// the last ten seconds, and a client's retry after that succeeds).
pub const DEFAULT_JWKS_UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(10);
/// The default [`JwksRefresh::timeout`].
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(10);

/// When JWKS URLs are fetched again. Every issuer has its own schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksRefresh {
    /// Between two scheduled fetches. A response's `Cache-Control: max-age`
    /// shortens it (never below `unknown_kid_interval`); a failed fetch is
    /// retried sooner, backing off from one second up to this interval (at
    /// most a minute).
    pub interval: Duration,
    /// The least time between the start of one fetch and a fetch that a
    /// token with an unknown `kid` asks for.
    pub unknown_kid_interval: Duration,
    /// A fetch that has not completed in this time fails.
    pub timeout: Duration,
}

impl Default for JwksRefresh {
    fn default() -> Self {
        Self {
            interval: DEFAULT_JWKS_REFRESH_INTERVAL,
            unknown_kid_interval: DEFAULT_JWKS_UNKNOWN_KID_INTERVAL,
            timeout: DEFAULT_JWKS_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwks_source_is_issuer_equals_url() {
        let source: JwksSource = "https://id.example/=https://id.example/.well-known/jwks.json"
            .parse()
            .expect("valid");
        assert_eq!(source.issuer, "https://id.example/");
        assert_eq!(source.url, "https://id.example/.well-known/jwks.json");

        let odd: JwksSource = "urn:issuer?a=b=http://127.0.0.1:8080/keys?x=1"
            .parse()
            .expect("an issuer with `=`");
        assert_eq!(odd.issuer, "urn:issuer?a=b");
        assert_eq!(odd.url, "http://127.0.0.1:8080/keys?x=1");

        for bad in [
            "https://id.example",
            "=https://id.example/jwks",
            "issuer=ftp://id.example/jwks",
            "issuer=https://",
        ] {
            assert!(bad.parse::<JwksSource>().is_err(), "{bad}");
        }
    }
}
