//! The rules a token must pass.
//!
//! They run in this order, and the first that fails names the refusal:
//!
//! 1. Shape of the header: a token is present ([`Missing`]), has three
//!    dot-separated parts, and a base64url JSON header with a string `alg`
//!    and no `crit` ([`Malformed`]).
//! 2. Algorithm: one of RS256/384/512, PS256/384/512, ES256, ES384, EdDSA;
//!    `none` (in any case) and HMAC are refused ([`UnsupportedAlgorithm`]).
//! 3. Shape of the rest: the payload is a base64url JSON object and the
//!    signature non-empty base64url ([`Malformed`]).
//! 4. Key. The payload's `iss` picks the key set: a JWKS issuer's tokens
//!    meet only the keys fetched from its URL, every other token only the
//!    key files (none configured: [`UnknownKey`]). Choosing by a claim not
//!    yet verified is safe because the signature must then verify with a
//!    key of that set, and rule 8 holds the claim to the same value. In the
//!    set, the header's `kid` selects the key, or the only key when the
//!    token names none ([`UnknownKey`]); its family, curve and any JWK `alg`
//!    must fit the token's algorithm ([`UnsupportedAlgorithm`]). An unknown
//!    kid re-reads the key files or re-fetches the JWKS, rate-limited (see
//!    `key_store` and `jwks`); only [`TokenValidator::validate_with_refresh`]
//!    waits for a fetch.
//! 5. Signature ([`BadSignature`]). No claim is looked at before it passes.
//! 6. Claim types: `exp`, `nbf`, `iat` are non-negative numbers (fractions
//!    are dropped) no later than year 9999; `sub`, `tenant_id`, `iss`, `jti`
//!    are strings; `aud` a string or list of strings; `permissions` a list
//!    of strings. A claim of the wrong type is [`Malformed`] (it is there,
//!    just not usable), while `exp`, `sub` or `tenant_id` being absent,
//!    `null` or blank is [`MissingClaim`]. `permissions` is optional (absent
//!    is empty).
//! 7. Time, with the configured leeway: `exp` ([`Expired`]), `nbf` and `iat`
//!    ([`NotYetValid`]).
//! 8. `iss` ([`WrongIssuer`]): a token verified with the key files must
//!    have the configured issuer, when one is; a JWKS issuer's token has its
//!    issuer by rule 4. `aud` ([`WrongAudience`]) when configured, for every
//!    token. A token without the claim fails the check.
//! 9. The tenant allow-list ([`TenantNotAllowed`]).
//!
//! Revocation (`jti` on the deny-list) is checked after all of these, by
//! the [`AuthServer`](crate::AuthServer), which holds the store.
//!
//! [`Missing`]: TokenFailure::Missing
//! [`Malformed`]: TokenFailure::Malformed
//! [`UnsupportedAlgorithm`]: TokenFailure::UnsupportedAlgorithm
//! [`UnknownKey`]: TokenFailure::UnknownKey
//! [`BadSignature`]: TokenFailure::BadSignature
//! [`MissingClaim`]: TokenFailure::MissingClaim
//! [`Expired`]: TokenFailure::Expired
//! [`NotYetValid`]: TokenFailure::NotYetValid
//! [`WrongIssuer`]: TokenFailure::WrongIssuer
//! [`WrongAudience`]: TokenFailure::WrongAudience
//! [`TenantNotAllowed`]: TokenFailure::TenantNotAllowed

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};
use streamer_api::v1::TokenFailure;
use streamer_core::ids::{TenantId, UserId};
use streamer_core::shutdown::Shutdown;

use crate::jwks::IssuerKeys;
use crate::key_store::{KeySet, KeyStore};
use crate::keys::VerificationKey;
use crate::{AuthConfig, KeyError};

/// Longer tokens are refused unread: real ones are a few hundred bytes to a
/// few kilobytes, and this bounds the work a caller can ask for.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The last second protobuf's `Timestamp` can express (9999-12-31T23:59:59Z);
/// later dates in a token are refused as malformed.
const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

/// The claims of a token that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClaims {
    /// `sub`.
    pub user_id: UserId,
    /// `tenant_id`.
    pub tenant_id: TenantId,
    /// `permissions`, in token order; empty when the token has none.
    pub permissions: Vec<String>,
    /// `topics`, in token order: patterns of the topics the client may
    /// subscribe itself to (see `streamer_core::topics`); empty when the
    /// token has none.
    pub topics: Vec<String>,
    /// `exp`, in Unix seconds.
    pub expires_at: u64,
    /// `iat`, in Unix seconds, when present.
    pub issued_at: Option<u64>,
    /// `iss`, when present.
    pub issuer: Option<String>,
    /// The kid of the key that verified the token, when the token named one.
    pub key_id: Option<String>,
    /// `jti`, when present: what a revocation names.
    pub jti: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// The rule that failed.
    pub failure: TokenFailure,
    /// A human-readable explanation, safe to show the client: it never
    /// echoes claim values or says what was expected instead.
    pub message: String,
}

impl Rejection {
    fn new(failure: TokenFailure, message: impl Into<String>) -> Self {
        Self {
            failure,
            message: message.into(),
        }
    }
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::new(TokenFailure::Malformed, message)
}

fn unsupported(message: impl Into<String>) -> Rejection {
    Rejection::new(TokenFailure::UnsupportedAlgorithm, message)
}

/// Verifies tokens. Cloning is cheap and clones share the keys and their
/// reloads.
#[derive(Clone)]
pub struct TokenValidator {
    shared: Arc<Shared>,
}

struct Shared {
    /// The key files; `None` when only JWKS issuers are configured.
    keys: Option<KeyStore>,
    /// Each JWKS issuer's own keys, by issuer.
    jwks: HashMap<String, Arc<IssuerKeys>>,
    /// Shared by the JWKS refreshers; `None` without JWKS issuers.
    http: Option<reqwest::Client>,
    issuer: Option<String>,
    audience: Option<String>,
    allowed_tenants: Option<HashSet<TenantId>>,
    leeway_secs: u64,
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenValidator")
            .field("kids", &self.key_ids())
            .field("jwks", &self.shared.jwks)
            .field("issuer", &self.shared.issuer)
            .field("audience", &self.shared.audience)
            .field("allowed_tenants", &self.shared.allowed_tenants)
            .field("leeway_secs", &self.shared.leeway_secs)
            .finish()
    }
}

/// The JOSE header members this crate reads.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// Why [`TokenValidator::evaluate`] did not accept a token.
enum Refusal {
    /// A rule failed.
    Rejected(Rejection),
    /// A JWKS issuer's keys lack the token's kid (or are not fetched yet):
    /// a fetch may bring it.
    KeyNotFetched(Arc<IssuerKeys>),
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Self {
        Self::Rejected(rejection)
    }
}

impl Refusal {
    /// The refusal as it stands, with no fetch waited for.
    fn into_rejection(self) -> Rejection {
        match self {
            Self::Rejected(rejection) => rejection,
            Self::KeyNotFetched(_) => Rejection::new(
                TokenFailure::UnknownKey,
                "no key of the token's issuer has the token's `kid`",
            ),
        }
    }
}

impl TokenValidator {
    /// Loads the key files and prepares an empty key set per JWKS issuer,
    /// which [`refresh_jwks`](Self::refresh_jwks) fills. Files that cannot
    /// be used are skipped with a warning; the error is for a configuration
    /// that gives no usable key file at all (naming every path and what was
    /// wrong with it), or that contradicts itself.
    pub fn new(config: AuthConfig) -> Result<Self, KeyError> {
        if config.key_paths.is_empty() && config.jwks.is_empty() {
            return Err(KeyError::NoKeyPaths);
        }
        let mut jwks = HashMap::new();
        for source in config.jwks {
            if jwks.contains_key(&source.issuer) {
                return Err(KeyError::DuplicateJwksIssuer(source.issuer));
            }
            let keys = IssuerKeys::new(source.issuer.clone(), &source.url, config.jwks_refresh)?;
            jwks.insert(source.issuer, Arc::new(keys));
        }
        if let Some(issuer) = &config.issuer {
            if jwks.contains_key(issuer) {
                return Err(KeyError::IssuerIsJwks(issuer.clone()));
            }
            if config.key_paths.is_empty() {
                return Err(KeyError::IssuerWithoutKeyFiles);
            }
        }
        let http = if jwks.is_empty() {
            None
        } else {
            let refresh = &config.jwks_refresh;
            if refresh.interval.is_zero() || refresh.timeout.is_zero() {
                return Err(KeyError::InvalidRefresh);
            }
            Some(crate::jwks::http_client(refresh)?)
        };
        let keys = if config.key_paths.is_empty() {
            None
        } else {
            Some(KeyStore::open(config.key_paths)?)
        };
        Ok(Self {
            shared: Arc::new(Shared {
                keys,
                jwks,
                http,
                issuer: config.issuer,
                audience: config.audience,
                allowed_tenants: config.allowed_tenants.map(|t| t.into_iter().collect()),
                leeway_secs: config.leeway.as_secs(),
            }),
        })
    }

    /// Checks a token, with or without a leading `Bearer `, against the keys
    /// in hand. It never waits: a JWKS issuer's token with an unknown kid
    /// asks for a fetch and is refused meanwhile. Serving code uses
    /// [`validate_with_refresh`](Self::validate_with_refresh).
    pub fn validate(&self, token: &str) -> Result<VerifiedClaims, Rejection> {
        let result = self.validate_at(token, unix_now());
        log_verdict(&result);
        result
    }

    /// Checks a token like [`validate`](Self::validate), except that a JWKS
    /// issuer's token with an unknown kid waits for the fetch it asks for
    /// (when the rate limit allows one, or one is already running) and is
    /// then checked once more. Key files are never waited on: they are
    /// re-read on the spot.
    pub async fn validate_with_refresh(&self, token: &str) -> Result<VerifiedClaims, Rejection> {
        let result = match self.evaluate(token, unix_now()) {
            Err(Refusal::KeyNotFetched(issuer)) => {
                issuer.fetch_for_unknown_kid().await;
                self.evaluate(token, unix_now())
                    .map_err(Refusal::into_rejection)
            }
            other => other.map_err(Refusal::into_rejection),
        };
        log_verdict(&result);
        result
    }

    /// Keeps every JWKS issuer's keys fresh until `shutdown`: fetches them
    /// at once, then on schedule and whenever a token asks (see `jwks`).
    /// Until this runs, JWKS issuers have no keys. Resolves at once when no
    /// JWKS issuer is configured.
    pub async fn refresh_jwks(&self, shutdown: Shutdown) {
        let Some(client) = &self.shared.http else {
            return;
        };
        let mut refreshers = tokio::task::JoinSet::new();
        for issuer in self.shared.jwks.values() {
            let (issuer, client, shutdown) = (Arc::clone(issuer), client.clone(), shutdown.clone());
            refreshers.spawn(async move { issuer.run(&client, shutdown).await });
        }
        while let Some(joined) = refreshers.join_next().await {
            if let Err(error) = joined
                && error.is_panic()
            {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }

    /// The clock skew allowed on `exp`, `nbf` and `iat`.
    pub fn leeway(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.shared.leeway_secs)
    }

    /// The kids of the key files in force, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        self.shared
            .keys
            .as_ref()
            .map(|keys| keys.current().kids())
            .unwrap_or_default()
    }

    /// The kids of a JWKS issuer's keys in force, sorted; `None` when the
    /// issuer has no JWKS URL.
    pub fn jwks_key_ids(&self, issuer: &str) -> Option<Vec<String>> {
        self.shared
            .jwks
            .get(issuer)
            .map(|keys| keys.current().kids())
    }

    /// Re-reads every key file now, regardless of the automatic schedule
    /// (e.g. from a SIGHUP handler). Returns how many keys are in force.
    pub fn reload_keys(&self) -> usize {
        let Some(keys) = &self.shared.keys else {
            return 0;
        };
        keys.reload();
        keys.current().len()
    }

    /// [`validate`](Self::validate) at a given time, without the log line.
    fn validate_at(&self, token: &str, now: u64) -> Result<VerifiedClaims, Rejection> {
        self.evaluate(token, now).map_err(|refusal| {
            if let Refusal::KeyNotFetched(issuer) = &refusal {
                issuer.ask_for_fetch();
            }
            refusal.into_rejection()
        })
    }

    /// The rules, in order.
    fn evaluate(&self, token: &str, now: u64) -> Result<VerifiedClaims, Refusal> {
        let token = strip_bearer(token);
        if token.is_empty() {
            return Err(Rejection::new(TokenFailure::Missing, "no token was presented").into());
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(
                malformed(format!("the token is longer than {MAX_TOKEN_LEN} bytes")).into(),
            );
        }

        // 1. Shape of the header.
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not a JWT: a JWT has three dot-separated parts").into());
        };
        let header: RawHeader = decode_json(header_b64, "header")?;
        if header.crit.is_some() {
            return Err(malformed(
                "the token's header marks extensions as critical, and none are supported",
            )
            .into());
        }

        // 2. Algorithm, before the signature's shape: an `alg: none` token
        // has an empty signature, and should be told that `none` is refused.
        let alg = accepted_algorithm(&header.alg)?;

        // 3. Shape of the payload and signature.
        let payload: Map<String, Value> = decode_json(payload_b64, "payload")?;
        let signature = match URL_SAFE_NO_PAD.decode(signature_b64) {
            Ok(signature) if !signature.is_empty() => signature,
            _ => return Err(malformed("the token's signature is not base64url").into()),
        };

        // 4. Key, from the set the claimed issuer picks.
        let jwks_issuer = payload
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| self.shared.jwks.get(iss));
        let key = match jwks_issuer {
            Some(issuer) => jwks_key(issuer, header.kid.as_deref())?,
            None => self.file_key(header.kid.as_deref())?,
        };
        if !key.accepts(alg) {
            return Err(unsupported(format!(
                "the token's algorithm {alg:?} does not fit its key, which is {}{}",
                key.kind.describe(),
                key.pinned_alg
                    .map(|pinned| format!(" for {pinned:?} only"))
                    .unwrap_or_default()
            ))
            .into());
        }

        // 5. Signature, over `header.payload`.
        let signed_len = header_b64.len() + 1 + payload_b64.len();
        let Some(message) = token.as_bytes().get(..signed_len) else {
            return Err(malformed("not a JWT: a JWT has three dot-separated parts").into());
        };
        if !key.verify(alg, message, &signature) {
            return Err(Rejection::new(
                TokenFailure::BadSignature,
                "the token's signature does not verify",
            )
            .into());
        }

        // 6. Claim types and required claims.
        let claims = ClaimSet::parse(&payload)?;

        // 7. Time.
        let leeway = self.shared.leeway_secs;
        if now >= claims.exp.saturating_add(leeway) {
            return Err(Rejection::new(TokenFailure::Expired, "the token has expired").into());
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(leeway))
        {
            return Err(Rejection::new(
                TokenFailure::NotYetValid,
                "the token is not valid yet (`nbf` is in the future)",
            )
            .into());
        }
        if claims
            .iat
            .is_some_and(|iat| iat > now.saturating_add(leeway))
        {
            return Err(Rejection::new(
                TokenFailure::NotYetValid,
                "the token was issued in the future (`iat`)",
            )
            .into());
        }

        // 8. Issuer (of the key files' tokens) and audience.
        if jwks_issuer.is_none()
            && let Some(expected) = &self.shared.issuer
            && claims.iss != Some(expected.as_str())
        {
            return Err(Rejection::new(
                TokenFailure::WrongIssuer,
                "the token's issuer is not accepted",
            )
            .into());
        }
        if let Some(expected) = &self.shared.audience
            && !claims.aud.iter().any(|aud| aud == expected)
        {
            return Err(Rejection::new(
                TokenFailure::WrongAudience,
                "the token is not meant for this audience",
            )
            .into());
        }

        // 9. Tenant.
        if let Some(allowed) = &self.shared.allowed_tenants
            && !allowed.contains(claims.tenant_id)
        {
            return Err(Rejection::new(
                TokenFailure::TenantNotAllowed,
                "the token's tenant is not allowed",
            )
            .into());
        }

        Ok(VerifiedClaims {
            user_id: UserId::from(claims.sub),
            tenant_id: TenantId::from(claims.tenant_id),
            permissions: claims.permissions,
            topics: claims.topics,
            expires_at: claims.exp,
            issued_at: claims.iat,
            issuer: claims.iss.map(str::to_owned),
            key_id: header.kid,
            jti: claims.jti.map(str::to_owned),
        })
    }

    /// The key file key for `kid`, re-reading the files when it is unknown.
    fn file_key(&self, kid: Option<&str>) -> Result<Arc<VerificationKey>, Rejection> {
        let Some(store) = &self.shared.keys else {
            return Err(Rejection::new(
                TokenFailure::UnknownKey,
                "no configured key verifies tokens of the token's issuer",
            ));
        };
        store.refresh_if_due();
        let Some(kid) = kid else {
            return store.current().only_key().cloned().ok_or_else(|| {
                Rejection::new(
                    TokenFailure::UnknownKey,
                    "the token names no key (`kid`) and more than one key is configured",
                )
            });
        };
        if let Some(key) = store.current().get(kid) {
            return Ok(Arc::clone(key));
        }
        // The key may have been published moments ago.
        if store.reload_for_unknown_kid()
            && let Some(key) = store.current().get(kid)
        {
            return Ok(Arc::clone(key));
        }
        Err(Rejection::new(
            TokenFailure::UnknownKey,
            "no configured key has the token's `kid`",
        ))
    }
}

/// A JWKS issuer's key for `kid`; a key it lacks may still be fetched.
fn jwks_key(issuer: &Arc<IssuerKeys>, kid: Option<&str>) -> Result<Arc<VerificationKey>, Refusal> {
    let keys: Arc<KeySet> = issuer.current();
    let found = match kid {
        Some(kid) => keys.get(kid),
        None if keys.len() > 1 => {
            return Err(Rejection::new(
                TokenFailure::UnknownKey,
                "the token names no key (`kid`) and its issuer has more than one",
            )
            .into());
        }
        None => keys.only_key(),
    };
    match found {
        Some(key) => Ok(Arc::clone(key)),
        None => Err(Refusal::KeyNotFetched(Arc::clone(issuer))),
    }
}

fn log_verdict(result: &Result<VerifiedClaims, Rejection>) {
    match result {
        Ok(claims) => tracing::debug!(
            valid = true,
            kid = claims.key_id.as_deref(),
            "token validated"
        ),
        Err(rejection) => tracing::debug!(
            valid = false,
            failure = rejection.failure.as_str_name(),
            "token refused"
        ),
    }
}

/// The token without surrounding whitespace and without an optional
/// `Bearer` scheme (any case, RFC 9110 §11.1), so that a whole
/// `Authorization` header value may be passed.
fn strip_bearer(token: &str) -> &str {
    let token = token.trim();
    match (token.get(..6), token.get(6..)) {
        (Some(scheme), Some(rest))
            if scheme.eq_ignore_ascii_case("bearer")
                && rest.chars().next().is_none_or(char::is_whitespace) =>
        {
            rest.trim_start()
        }
        _ => token,
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str, name: &str) -> Result<T, Rejection> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| malformed(format!("the token's {name} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|_| {
        malformed(format!(
            "the token's {name} is not the expected JSON object"
        ))
    })
}

/// The algorithms a token may use. Everything else, `none` and HMAC above
/// all, is refused before a key is even looked up.
fn accepted_algorithm(name: &str) -> Result<Algorithm, Rejection> {
    if let Some(alg) = crate::keys::asymmetric_algorithm(name) {
        return Ok(alg);
    }
    Err(match name {
        "HS256" | "HS384" | "HS512" => {
            unsupported("HMAC-signed tokens are not accepted; sign with RSA, ECDSA or EdDSA")
        }
        _ if name.eq_ignore_ascii_case("none") => {
            unsupported("unsigned tokens (`alg: none`) are not accepted")
        }
        _ => unsupported(
            "the token's algorithm is not accepted (RS256/384/512, PS256/384/512, ES256, ES384 and EdDSA are)",
        ),
    })
}

/// The claims of a payload, typed.
struct ClaimSet<'a> {
    sub: &'a str,
    tenant_id: &'a str,
    exp: u64,
    nbf: Option<u64>,
    iat: Option<u64>,
    iss: Option<&'a str>,
    jti: Option<&'a str>,
    aud: Vec<&'a str>,
    permissions: Vec<String>,
    topics: Vec<String>,
}

impl<'a> ClaimSet<'a> {
    fn parse(claims: &'a Map<String, Value>) -> Result<Self, Rejection> {
        let exp = numeric_date(claims, "exp")?;
        let nbf = numeric_date(claims, "nbf")?;
        let iat = numeric_date(claims, "iat")?;
        let sub = string_claim(claims, "sub")?;
        let tenant_id = string_claim(claims, "tenant_id")?;
        let iss = string_claim(claims, "iss")?;
        let jti = string_claim(claims, "jti")?;
        let aud = match claims.get("aud") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(aud)) => vec![aud.as_str()],
            Some(Value::Array(items)) => items
                .iter()
                .map(Value::as_str)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed("`aud` must be a string or a list of strings"))?,
            Some(_) => return Err(malformed("`aud` must be a string or a list of strings")),
        };
        let permissions = string_list(claims, "permissions")?;
        let topics = string_list(claims, "topics")?;
        if let Some((pattern, why)) = topics
            .iter()
            .find_map(|p| streamer_core::topics::unusable_pattern(p).map(|why| (p, why)))
        {
            return Err(malformed(format!("`topics` pattern {pattern:?} {why}")));
        }

        let missing = |name: &str| {
            Rejection::new(
                TokenFailure::MissingClaim,
                format!("the token has no `{name}` claim"),
            )
        };
        let present = |value: Option<&'a str>| value.filter(|v| !v.trim().is_empty());
        // Identities become registry keys (see `streamer_core::ids::unusable`).
        let usable = |name: &str, value: &'a str| match streamer_core::ids::unusable(value) {
            Some(why) => Err(malformed(format!("`{name}` {why}"))),
            None => Ok(value),
        };
        Ok(Self {
            exp: exp.ok_or_else(|| missing("exp"))?,
            sub: usable("sub", present(sub).ok_or_else(|| missing("sub"))?)?,
            tenant_id: usable(
                "tenant_id",
                present(tenant_id).ok_or_else(|| missing("tenant_id"))?,
            )?,
            nbf,
            iat,
            iss,
            jti,
            aud,
            permissions,
            topics,
        })
    }
}

/// An optional claim that is a list of strings (absent or null: empty).
fn string_list(claims: &Map<String, Value>, name: &str) -> Result<Vec<String>, Rejection> {
    let invalid = || malformed(format!("`{name}` must be a list of strings"));
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid),
        Some(_) => Err(invalid()),
    }
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly with a
/// fraction, which is dropped.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Rejection> {
    let invalid = || malformed(format!("`{name}` must be a date in seconds since 1970"));
    let seconds = match claims.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(secs), _) => secs,
            // Truncation is the intent: a fractional date counts from its
            // whole second.
            (None, Some(secs)) if secs.is_finite() && secs >= 0.0 => secs as u64,
            _ => return Err(invalid()),
        },
        Some(_) => return Err(invalid()),
    };
    if seconds > MAX_NUMERIC_DATE {
        return Err(invalid());
    }
    Ok(Some(seconds))
}

fn string_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, Rejection> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(malformed(format!("`{name}` must be a string"))),
    }
}

pub(crate) fn unix_now() -> u64 {
    // A clock before 1970 is broken; treating it as the end of time refuses
    // every token as expired rather than accepting any.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use jsonwebtoken::{Algorithm, EncodingKey};
    use serde_json::json;

    use super::*;
    use crate::test_support::{
        self, assemble, claims, claims_with, ec_key, ed_key, fixture, sign, write_file,
    };

    /// A validator over a fresh key directory; the directory lives as long
    /// as the returned guard.
    fn validator_with(
        files: &[(&str, &str)],
        config: AuthConfig,
    ) -> (tempfile::TempDir, TokenValidator) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, contents) in files {
            write_file(&dir.path().join(name), contents);
        }
        let validator = TokenValidator::new(AuthConfig {
            key_paths: vec![dir.path().to_path_buf()],
            ..config
        })
        .expect("validator");
        (dir, validator)
    }

    /// Keys `rsa` (PKIX), `rsa1` (PKCS#1, the same key), `ec` (P-256),
    /// `ec384`, `ed` (Ed25519).
    fn standard_validator(config: AuthConfig) -> (tempfile::TempDir, TokenValidator) {
        let rsa = test_support::rsa();
        validator_with(
            &[
                ("rsa.pem", &rsa.pkix_pem),
                ("rsa1.pem", &rsa.pkcs1_pem),
                ("ec.pem", &fixture("es256-a.pem")),
                ("ec384.pem", &fixture("es384.pem")),
                ("ed.pem", &fixture("ed25519.pem")),
            ],
            config,
        )
    }

    fn rs256(claims: &Value) -> String {
        sign(
            Algorithm::RS256,
            Some("rsa"),
            claims,
            &test_support::rsa().encoding,
        )
    }

    fn failure(validator: &TokenValidator, token: &str) -> TokenFailure {
        match validator.validate(token) {
            Ok(claims) => panic!("token accepted: {claims:?}"),
            Err(rejection) => rejection.failure,
        }
    }

    #[test]
    fn rs256_verifies_with_pkix_and_pkcs1_public_keys() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let claims = claims();
        for kid in ["rsa", "rsa1"] {
            let token = sign(
                Algorithm::RS256,
                Some(kid),
                &claims,
                &test_support::rsa().encoding,
            );
            let verified = validator.validate(&token).expect(kid);
            assert_eq!(verified.key_id.as_deref(), Some(kid));
            assert_eq!(verified.user_id, "user-1");
            assert_eq!(verified.tenant_id, "tenant-1");
            assert_eq!(verified.permissions, ["read", "write"]);
            assert_eq!(Some(verified.expires_at), claims["exp"].as_u64());
            assert_eq!(verified.issued_at, claims["iat"].as_u64());
            assert_eq!(verified.issuer, None);
        }
    }

    #[test]
    fn every_rsa_algorithm_verifies_with_an_rsa_key() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        for alg in [
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            let token = sign(alg, Some("rsa"), &claims(), &test_support::rsa().encoding);
            let verified = validator.validate(&token);
            assert!(verified.is_ok(), "{alg:?}: {verified:?}");
        }
    }

    #[test]
    fn es256_es384_and_eddsa_verify() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let cases = [
            (Algorithm::ES256, "ec", ec_key("es256-a.key")),
            (Algorithm::ES384, "ec384", ec_key("es384.key")),
            (Algorithm::EdDSA, "ed", ed_key()),
        ];
        for (alg, kid, key) in cases {
            let token = sign(alg, Some(kid), &claims(), &key);
            let verified = validator.validate(&token).expect(kid);
            assert_eq!(verified.key_id.as_deref(), Some(kid));
        }
    }

    #[test]
    fn every_algorithm_refuses_a_genuine_signature_of_other_claims() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let rsa = &test_support::rsa().encoding;
        let (ec, ec384, ed) = (ec_key("es256-a.key"), ec_key("es384.key"), ed_key());
        let cases = [
            (Algorithm::RS256, "rsa", rsa),
            (Algorithm::RS384, "rsa", rsa),
            (Algorithm::RS512, "rsa", rsa),
            (Algorithm::PS256, "rsa", rsa),
            (Algorithm::PS384, "rsa", rsa),
            (Algorithm::PS512, "rsa", rsa),
            (Algorithm::ES256, "ec", &ec),
            (Algorithm::ES384, "ec384", &ec384),
            (Algorithm::EdDSA, "ed", &ed),
        ];
        for (alg, kid, key) in cases {
            let genuine = sign(alg, Some(kid), &claims(), key);
            let other = sign(
                alg,
                Some(kid),
                &claims_with(json!({"sub": "someone-else"})),
                key,
            );
            let (signed, _) = genuine.rsplit_once('.').expect("three parts");
            let (_, signature) = other.rsplit_once('.').expect("three parts");
            assert_eq!(
                failure(&validator, &format!("{signed}.{signature}")),
                TokenFailure::BadSignature,
                "{alg:?}"
            );
        }
    }

    #[test]
    fn a_bearer_prefix_is_accepted() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let token = rs256(&claims());
        assert!(validator.validate(&format!("Bearer {token}")).is_ok());
        assert!(validator.validate(&format!("  Bearer   {token}\n")).is_ok());
        assert!(validator.validate(&format!("bearer {token}")).is_ok());
        assert_eq!(
            failure(&validator, &format!("Bearer{token}")),
            TokenFailure::Malformed,
            "the scheme needs a space"
        );
    }

    #[test]
    fn no_token_is_missing() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        for token in ["", "   ", "Bearer ", "Bearer", "bearer \t"] {
            assert_eq!(
                failure(&validator, token),
                TokenFailure::Missing,
                "{token:?}"
            );
        }
    }

    #[test]
    fn things_that_are_not_jwts_are_malformed() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let good = rs256(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let cases = [
            "not-a-jwt".to_owned(),
            "a.b".to_owned(),
            format!("{good}.extra"),
            format!("!!!.{}.{}", parts[1], parts[2]),
            format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
            format!("{}.{}.{}", b64(r#"{"kid":"rsa"}"#), parts[1], parts[2]),
            format!("{}.{}.{}", b64(r#"{"alg":5}"#), parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], b64("[1,2]"), parts[2]),
            format!("{}.{}.{}", parts[0], parts[1], "***"),
            format!("{}.{}.", parts[0], parts[1]),
            assemble(
                &json!({"alg": "RS256", "kid": "rsa", "crit": ["exp"]}),
                &claims(),
                b"sig",
            ),
            "a".repeat(MAX_TOKEN_LEN + 1),
        ];
        for token in &cases {
            assert_eq!(
                failure(&validator, token),
                TokenFailure::Malformed,
                "{token}"
            );
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        for alg in ["none", "None", "NONE"] {
            // An unsigned token has an empty signature part.
            let unsigned = assemble(&json!({"alg": alg, "kid": "rsa"}), &claims(), b"");
            assert!(unsigned.ends_with('.'), "{unsigned}");
            let rejection = validator.validate(&unsigned).expect_err(alg);
            assert_eq!(rejection.failure, TokenFailure::UnsupportedAlgorithm);
            assert!(rejection.message.contains("none"), "{}", rejection.message);
            // A signature part does not help.
            let token = assemble(&json!({"alg": alg}), &claims(), b"x");
            assert_eq!(
                failure(&validator, &token),
                TokenFailure::UnsupportedAlgorithm
            );
        }
    }

    #[test]
    fn hmac_is_refused_even_when_keyed_with_the_public_key() {
        let rsa = test_support::rsa();
        let (_dir, validator) =
            validator_with(&[("rsa.pem", &rsa.pkix_pem)], AuthConfig::default());
        for secret in [rsa.pkix_pem.as_bytes(), rsa.pkcs1_pem.as_bytes()] {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let key = EncodingKey::from_secret(secret);
                for kid in [Some("rsa"), None] {
                    let token = sign(alg, kid, &claims(), &key);
                    let rejection = validator.validate(&token).expect_err("HMAC token");
                    assert_eq!(rejection.failure, TokenFailure::UnsupportedAlgorithm);
                    assert!(rejection.message.contains("HMAC"), "{}", rejection.message);
                }
            }
        }
    }

    #[test]
    fn unknown_algorithms_are_refused() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        for alg in ["ES512", "RS1", "", "rs256"] {
            let token = assemble(&json!({"alg": alg, "kid": "rsa"}), &claims(), b"x");
            assert_eq!(
                failure(&validator, &token),
                TokenFailure::UnsupportedAlgorithm,
                "{alg:?}"
            );
        }
    }

    #[test]
    fn the_algorithm_must_fit_the_key() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let rsa = &test_support::rsa().encoding;
        let cases = [
            // An EC-signed token pointing at the RSA key.
            sign(
                Algorithm::ES256,
                Some("rsa"),
                &claims(),
                &ec_key("es256-a.key"),
            ),
            // An RSA-signed token pointing at the EC key.
            sign(Algorithm::RS256, Some("ec"), &claims(), rsa),
            // The right family, the wrong curve.
            sign(
                Algorithm::ES384,
                Some("ec"),
                &claims(),
                &ec_key("es384.key"),
            ),
            sign(
                Algorithm::ES256,
                Some("ec384"),
                &claims(),
                &ec_key("es256-a.key"),
            ),
            sign(Algorithm::EdDSA, Some("ec"), &claims(), &ed_key()),
        ];
        for token in &cases {
            assert_eq!(
                failure(&validator, token),
                TokenFailure::UnsupportedAlgorithm
            );
        }
    }

    #[test]
    fn an_unknown_kid_is_an_unknown_key() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let token = sign(
            Algorithm::RS256,
            Some("nope"),
            &claims(),
            &test_support::rsa().encoding,
        );
        let rejection = validator.validate(&token).expect_err("unknown kid");
        assert_eq!(rejection.failure, TokenFailure::UnknownKey);
    }

    #[test]
    fn a_token_without_kid_uses_the_only_key_and_only_then() {
        let rsa = test_support::rsa();
        let (_one, single) = validator_with(&[("only.pem", &rsa.pkix_pem)], AuthConfig::default());
        let token = sign(Algorithm::RS256, None, &claims(), &rsa.encoding);
        let verified = single.validate(&token).expect("the only key verifies");
        assert_eq!(verified.key_id, None);

        let (_many, several) = standard_validator(AuthConfig::default());
        assert_eq!(failure(&several, &token), TokenFailure::UnknownKey);
    }

    #[test]
    fn a_wrong_signature_is_a_bad_signature() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        // Signed by another P-256 key under the `ec` kid.
        let foreign = sign(
            Algorithm::ES256,
            Some("ec"),
            &claims(),
            &ec_key("es256-b.key"),
        );
        assert_eq!(failure(&validator, &foreign), TokenFailure::BadSignature);

        // A genuine token whose payload was swapped afterwards.
        let genuine = rs256(&claims());
        let forged_payload =
            URL_SAFE_NO_PAD.encode(claims_with(json!({"tenant_id": "other"})).to_string());
        let parts: Vec<&str> = genuine.split('.').collect();
        let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(failure(&validator, &tampered), TokenFailure::BadSignature);

        // A truncated signature.
        let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("base64url");
        signature.truncate(signature.len() - 1);
        let short = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            URL_SAFE_NO_PAD.encode(signature)
        );
        assert_eq!(failure(&validator, &short), TokenFailure::BadSignature);
    }

    #[test]
    fn claims_are_not_judged_before_the_signature() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        // Expired and without a subject, but signed by the wrong key: the
        // signature is what is reported.
        let token = sign(
            Algorithm::ES256,
            Some("ec"),
            &json!({"exp": 1}),
            &ec_key("es256-b.key"),
        );
        assert_eq!(failure(&validator, &token), TokenFailure::BadSignature);
    }

    #[test]
    fn expiry_allows_the_leeway_and_no_more() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let now = unix_now();
        let token = rs256(&claims_with(json!({"iat": now - 7200, "exp": now - 3600})));
        let rejection = validator.validate(&token).expect_err("expired");
        assert_eq!(rejection.failure, TokenFailure::Expired);

        let exp = 1_000_000;
        let token = rs256(&claims_with(json!({"iat": exp - 60, "exp": exp})));
        assert!(validator.validate_at(&token, exp - 1).is_ok());
        assert!(
            validator.validate_at(&token, exp + 29).is_ok(),
            "within 30 s of leeway"
        );
        let late = validator
            .validate_at(&token, exp + 30)
            .expect_err("past the leeway");
        assert_eq!(late.failure, TokenFailure::Expired);
    }

    #[test]
    fn nbf_and_iat_in_the_future_are_not_yet_valid() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let now = 1_000_000;
        let exp = now + 3600;
        let nbf_soon = rs256(&claims_with(
            json!({"iat": now, "nbf": now + 30, "exp": exp}),
        ));
        assert!(
            validator.validate_at(&nbf_soon, now).is_ok(),
            "within leeway"
        );
        let nbf_later = rs256(&claims_with(
            json!({"iat": now, "nbf": now + 31, "exp": exp}),
        ));
        let rejection = validator.validate_at(&nbf_later, now).expect_err("nbf");
        assert_eq!(rejection.failure, TokenFailure::NotYetValid);

        let iat_later = rs256(&claims_with(json!({"iat": now + 31, "exp": exp})));
        let rejection = validator.validate_at(&iat_later, now).expect_err("iat");
        assert_eq!(rejection.failure, TokenFailure::NotYetValid);
        let iat_soon = rs256(&claims_with(json!({"iat": now + 30, "exp": exp})));
        assert!(validator.validate_at(&iat_soon, now).is_ok());
    }

    #[test]
    fn the_leeway_is_configurable() {
        let (_dir, validator) = standard_validator(AuthConfig {
            leeway: std::time::Duration::ZERO,
            ..AuthConfig::default()
        });
        let exp = 1_000_000;
        let token = rs256(&claims_with(json!({"iat": exp - 60, "exp": exp})));
        assert!(validator.validate_at(&token, exp - 1).is_ok());
        let rejection = validator.validate_at(&token, exp).expect_err("exp reached");
        assert_eq!(rejection.failure, TokenFailure::Expired);
    }

    #[test]
    fn the_issuer_must_match_when_configured() {
        let (_dir, validator) = standard_validator(AuthConfig {
            issuer: Some("https://id.example".into()),
            ..AuthConfig::default()
        });
        let right = rs256(&claims_with(json!({"iss": "https://id.example"})));
        let verified = validator.validate(&right).expect("right issuer");
        assert_eq!(verified.issuer.as_deref(), Some("https://id.example"));

        for wrong in [
            claims_with(json!({"iss": "https://evil.example"})),
            claims(),
        ] {
            assert_eq!(
                failure(&validator, &rs256(&wrong)),
                TokenFailure::WrongIssuer
            );
        }
    }

    #[test]
    fn the_audience_must_be_contained_when_configured() {
        let (_dir, validator) = standard_validator(AuthConfig {
            audience: Some("streamer".into()),
            ..AuthConfig::default()
        });
        for right in [json!("streamer"), json!(["other", "streamer"])] {
            let token = rs256(&claims_with(json!({ "aud": right })));
            assert!(validator.validate(&token).is_ok(), "{right}");
        }
        for wrong in [
            claims_with(json!({"aud": "other"})),
            claims_with(json!({"aud": ["a", "b"]})),
            claims_with(json!({"aud": []})),
            claims(),
        ] {
            assert_eq!(
                failure(&validator, &rs256(&wrong)),
                TokenFailure::WrongAudience
            );
        }
    }

    #[test]
    fn unconfigured_issuer_and_audience_are_not_checked() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let token = rs256(&claims_with(json!({"iss": "anyone", "aud": "anything"})));
        assert!(validator.validate(&token).is_ok());
    }

    #[test]
    fn missing_or_blank_required_claims_are_missing_claims() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let cases = [
            json!({"sub": null}),
            json!({"sub": ""}),
            json!({"sub": "  "}),
            json!({"tenant_id": null}),
            json!({"tenant_id": ""}),
            json!({"exp": null}),
        ];
        for change in cases {
            let token = rs256(&claims_with(change.clone()));
            let rejection = validator.validate(&token).expect_err("missing claim");
            assert_eq!(rejection.failure, TokenFailure::MissingClaim, "{change}");
        }
        let rejection = validator
            .validate(&rs256(&claims_with(json!({"tenant_id": null}))))
            .expect_err("no tenant");
        assert_eq!(rejection.message, "the token has no `tenant_id` claim");
    }

    #[test]
    fn identities_that_cannot_be_registry_keys_are_malformed() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        for change in [
            json!({"sub": "u".repeat(streamer_core::ids::MAX_ID_BYTES + 1)}),
            json!({"tenant_id": "a\0b"}),
            // DynamoDB's key separator: `a␟b` + `c` would meet `a` + `b␟c`.
            json!({"tenant_id": "a\u{1f}b"}),
            json!({"sub": "line\nbreak"}),
        ] {
            let rejection = validator
                .validate(&rs256(&claims_with(change.clone())))
                .expect_err("unusable identity");
            assert_eq!(rejection.failure, TokenFailure::Malformed, "{change}");
        }
        let longest = json!({"sub": "u".repeat(streamer_core::ids::MAX_ID_BYTES)});
        assert!(validator.validate(&rs256(&claims_with(longest))).is_ok());
    }

    #[test]
    fn claims_of_the_wrong_type_are_malformed() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let cases = [
            json!({"sub": 42}),
            json!({"tenant_id": ["t"]}),
            json!({"exp": "tomorrow"}),
            json!({"exp": -5}),
            json!({"exp": 1e300}),
            json!({"nbf": true}),
            json!({"iss": {}}),
            json!({"aud": [1]}),
            json!({"permissions": "read"}),
            json!({"permissions": ["read", 7]}),
            json!({"topics": "orders/*"}),
            json!({"topics": ["orders/*", null]}),
            json!({"topics": ["a/**/b"]}),
            json!({"topics": [""]}),
        ];
        for change in cases {
            let token = rs256(&claims_with(change.clone()));
            let rejection = validator.validate(&token).expect_err("wrong type");
            assert_eq!(rejection.failure, TokenFailure::Malformed, "{change}");
        }
    }

    #[test]
    fn permissions_are_optional_and_fractional_dates_are_truncated() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let now = unix_now();
        let exp = now as f64 + 3600.75;
        let token = rs256(&claims_with(json!({"permissions": null, "exp": exp})));
        let verified = validator.validate(&token).expect("valid");
        assert!(verified.permissions.is_empty());
        assert_eq!(verified.expires_at, now + 3600);
    }

    #[test]
    fn topic_patterns_come_through_in_token_order() {
        let (_dir, validator) = standard_validator(AuthConfig::default());
        let token = rs256(&claims_with(
            json!({"topics": ["orders/*", "users/{user_id}/**"]}),
        ));
        let verified = validator.validate(&token).expect("valid");
        assert_eq!(verified.topics, ["orders/*", "users/{user_id}/**"]);
        let verified = validator.validate(&rs256(&claims())).expect("valid");
        assert!(verified.topics.is_empty());
    }

    #[test]
    fn the_tenant_allow_list_is_enforced() {
        let (_dir, validator) = standard_validator(AuthConfig {
            allowed_tenants: Some(vec!["tenant-1".into(), "tenant-2".into()]),
            ..AuthConfig::default()
        });
        assert!(validator.validate(&rs256(&claims())).is_ok());
        let other = rs256(&claims_with(json!({"tenant_id": "tenant-3"})));
        let rejection = validator.validate(&other).expect_err("not allowed");
        assert_eq!(rejection.failure, TokenFailure::TenantNotAllowed);
        assert!(
            !rejection.message.contains("tenant-3"),
            "no echo: {}",
            rejection.message
        );

        let (_dir, open) = standard_validator(AuthConfig::default());
        assert!(
            open.validate(&other).is_ok(),
            "no allow-list allows every tenant"
        );
    }

    #[test]
    fn a_jwks_selects_the_key_by_kid() {
        let rsa = test_support::rsa();
        let mut jwks: Value = serde_json::from_str(&fixture("jwks.json")).expect("JSON");
        jwks["keys"]
            .as_array_mut()
            .expect("keys")
            .push(json!({"kty": "RSA", "kid": "jwks-rsa", "alg": "RS256", "n": rsa.n, "e": rsa.e}));
        let (_dir, validator) =
            validator_with(&[("keys.json", &jwks.to_string())], AuthConfig::default());
        assert_eq!(
            validator.key_ids(),
            ["jwks-ec-a", "jwks-ec-b", "jwks-ed", "jwks-rsa"]
        );

        let a = sign(
            Algorithm::ES256,
            Some("jwks-ec-a"),
            &claims(),
            &ec_key("es256-a.key"),
        );
        let b = sign(
            Algorithm::ES256,
            Some("jwks-ec-b"),
            &claims(),
            &ec_key("es256-b.key"),
        );
        assert_eq!(
            validator.validate(&a).expect("a").key_id.as_deref(),
            Some("jwks-ec-a")
        );
        assert_eq!(
            validator.validate(&b).expect("b").key_id.as_deref(),
            Some("jwks-ec-b")
        );
        // Key a's signature under b's kid: the kid picked b, which refuses it.
        let crossed = sign(
            Algorithm::ES256,
            Some("jwks-ec-b"),
            &claims(),
            &ec_key("es256-a.key"),
        );
        assert_eq!(failure(&validator, &crossed), TokenFailure::BadSignature);

        let ed = sign(Algorithm::EdDSA, Some("jwks-ed"), &claims(), &ed_key());
        assert!(validator.validate(&ed).is_ok());
        let rsa_token = sign(Algorithm::RS256, Some("jwks-rsa"), &claims(), &rsa.encoding);
        assert!(validator.validate(&rsa_token).is_ok());
        // The JWK pins RS256, so PS256 with the same key is refused.
        let pss = sign(Algorithm::PS256, Some("jwks-rsa"), &claims(), &rsa.encoding);
        assert_eq!(
            failure(&validator, &pss),
            TokenFailure::UnsupportedAlgorithm
        );
    }

    #[test]
    fn a_key_added_after_start_validates_without_a_new_validator() {
        let (dir, validator) = validator_with(
            &[("ec.pem", &fixture("es256-a.pem"))],
            AuthConfig::default(),
        );
        let clone = validator.clone();
        let token = sign(Algorithm::EdDSA, Some("ed-2026"), &claims(), &ed_key());

        write_file(&dir.path().join("ed-2026.pem"), &fixture("ed25519.pem"));
        let verified = clone.validate(&token).expect("new key found by its kid");
        assert_eq!(verified.key_id.as_deref(), Some("ed-2026"));
        assert!(validator.validate(&token).is_ok(), "clones share the keys");
    }

    #[test]
    fn a_rotated_file_keeps_working_and_a_broken_one_keeps_its_old_key() {
        let (dir, validator) = validator_with(
            &[("signing.pem", &fixture("es256-a.pem"))],
            AuthConfig::default(),
        );
        let path = dir.path().join("signing.pem");
        let old = sign(
            Algorithm::ES256,
            Some("signing"),
            &claims(),
            &ec_key("es256-a.key"),
        );
        let new = sign(
            Algorithm::ES256,
            Some("signing"),
            &claims(),
            &ec_key("es256-b.key"),
        );
        assert!(validator.validate(&old).is_ok());

        std::fs::write(&path, "-----BEGIN PUBLIC KEY-----\nbroken").expect("break");
        assert_eq!(validator.reload_keys(), 1);
        assert!(validator.validate(&old).is_ok(), "the previous key stays");

        std::fs::write(&path, fixture("es256-b.pem")).expect("rotate");
        validator.reload_keys();
        assert!(validator.validate(&new).is_ok());
        assert_eq!(failure(&validator, &old), TokenFailure::BadSignature);
    }

    #[test]
    fn a_validator_needs_at_least_one_usable_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = write_file(&dir.path().join("private.pem"), &fixture("es256-a.key"));
        let err = TokenValidator::new(AuthConfig::new([private.as_path()]))
            .expect_err("a private key only");
        let message = err.to_string();
        assert!(
            message.contains(&private.display().to_string()),
            "{message}"
        );
        assert!(message.contains("private key"), "{message}");

        let missing = Path::new("/nonexistent/streamer/keys");
        let err = TokenValidator::new(AuthConfig::new([missing])).expect_err("no such path");
        assert!(
            err.to_string().contains("/nonexistent/streamer/keys"),
            "{err}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a client presents as a token, it is refused with a
        /// reason: never accepted, never a panic.
        #[test]
        fn any_string_is_refused_never_a_panic(token in ".{0,400}") {
            let (_dir, validator) = standard_validator(AuthConfig::default());
            proptest::prop_assert!(validator.validate(&token).is_err());
        }

        /// Three base64url segments of anything (headers naming any `alg`
        /// and `kid`, claims of any shape) are refused too.
        #[test]
        fn any_forged_segments_are_refused(
            header in "\\{\"alg\":\"(none|HS256|RS256|ES256|EdDSA|PS512|[A-Z]{2,5})\",\"kid\":\"[a-z./]{0,8}\"\\}",
            claims in ".{0,120}",
            signature in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
        ) {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let token = format!(
                "{}.{}.{}",
                b64.encode(header),
                b64.encode(claims),
                b64.encode(signature)
            );
            let (_dir, validator) = standard_validator(AuthConfig::default());
            proptest::prop_assert!(validator.validate(&token).is_err());
        }
    }
}
