//! Revoked tokens: a deny-list of `jti`s, kept in the store.
//!
//! - A revocation is written durably before `RevokeToken` answers, and every
//!   validation of a token that carries a `jti` reads the store, after the
//!   signature and every other rule passed. Nothing is cached, so a
//!   revocation is in force from the moment the call returns, in every
//!   AuthService that reads the same store. The read is one redb lookup
//!   (microseconds), far below the signature check before it.
//! - An entry is kept until the requested expiry (the token's `exp`) plus
//!   the validator's clock leeway, since a token is accepted that long past
//!   its `exp`; after that the token is refused as expired anyway, the
//!   entry stops counting, and a sweep every [`SWEEP_INTERVAL`] deletes it.
//! - A `jti` names no tenant, so any caller allowed to revoke (the `backend`
//!   role) may revoke any `jti` it knows. Revoking only ever denies, and a
//!   `jti` is known only to whoever holds or validated the token.

use std::time::Duration;

use prost_types::Timestamp;
use streamer_api::v1::RevokeTokenRequest;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::SharedStore;

use crate::error::AuthError;

/// The longest `jti` that can be revoked.
pub const MAX_JTI_LEN: usize = 1024;
/// How often expired entries are deleted. They stop counting at their
/// expiry; the sweep only reclaims their space.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// A validated `RevokeToken` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoke {
    /// The token id.
    pub jti: String,
    /// Until when, in milliseconds since the epoch.
    pub expires_at_ms: u64,
}

impl TryFrom<RevokeTokenRequest> for Revoke {
    type Error = AuthError;

    fn try_from(request: RevokeTokenRequest) -> Result<Self, Self::Error> {
        if request.jti.is_empty() {
            return Err(AuthError::invalid("jti", "is required"));
        }
        if request.jti.len() > MAX_JTI_LEN {
            return Err(AuthError::invalid(
                "jti",
                format!("must be at most {MAX_JTI_LEN} bytes"),
            ));
        }
        let expires_at = request
            .expires_at
            .ok_or_else(|| AuthError::invalid("expires_at", "is required"))?;
        Ok(Self {
            jti: request.jti,
            expires_at_ms: timestamp_ms(&expires_at)?,
        })
    }
}

/// Milliseconds since the epoch; a time before 1970 is in the past anyway.
fn timestamp_ms(timestamp: &Timestamp) -> Result<u64, AuthError> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(AuthError::invalid(
            "expires_at",
            "nanos must be between 0 and 999,999,999",
        ));
    }
    let seconds = u64::try_from(timestamp.seconds)
        .map_err(|_| AuthError::invalid("expires_at", "must be in the future"))?;
    // `nanos` was checked to fit, so this is at most 999.
    let millis = u64::try_from(timestamp.nanos / 1_000_000).unwrap_or(0);
    seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(millis))
        .ok_or_else(|| AuthError::invalid("expires_at", "is too far in the future"))
}

/// The deny-list. Cloning is cheap (the store is shared).
#[derive(Clone)]
pub struct Revocations {
    store: SharedStore,
    /// The validator's clock leeway: how long past its expiry an entry
    /// must still deny.
    leeway: Duration,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Revocations {
    /// The deny-list in `store`, for a validator with `leeway`.
    pub fn new(store: SharedStore, leeway: Duration) -> Self {
        Self { store, leeway }
    }

    /// Puts `revoke.jti` on the deny-list. `by` names the caller in the log.
    pub async fn revoke(&self, revoke: Revoke, by: &str, now_ms: u64) -> Result<(), AuthError> {
        if revoke.expires_at_ms <= now_ms {
            return Err(AuthError::invalid("expires_at", "must be in the future"));
        }
        let leeway_ms = u64::try_from(self.leeway.as_millis()).unwrap_or(u64::MAX);
        let kept_until = revoke.expires_at_ms.saturating_add(leeway_ms);
        self.store.revoke_token(&revoke.jti, kept_until).await?;
        tracing::info!(
            jti = %revoke.jti,
            revoked_by = by,
            kept_until_ms = kept_until,
            "token revoked"
        );
        Ok(())
    }

    /// Whether `jti` is revoked at `now_ms`.
    pub async fn is_revoked(&self, jti: &str, now_ms: u64) -> Result<bool, AuthError> {
        Ok(self.store.is_token_revoked(jti, now_ms).await?)
    }

    /// Deletes expired entries every [`SWEEP_INTERVAL`] until `shutdown`.
    pub async fn sweep(&self, shutdown: Shutdown) {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self
                .store
                .sweep_revoked_tokens(streamer_core::store::now_ms())
                .await
            {
                Ok(0) => {}
                Ok(swept) => tracing::debug!(swept, "expired revocations deleted"),
                Err(error) => tracing::warn!(%error, "sweeping expired revocations failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(jti: &str, expires_at: Option<Timestamp>) -> RevokeTokenRequest {
        RevokeTokenRequest {
            jti: jti.to_owned(),
            expires_at,
        }
    }

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    #[test]
    fn a_request_needs_a_jti_and_an_expiry() {
        let revoke = Revoke::try_from(request("abc", at(1_700_000_000, 250_000_000)))
            .expect("valid request");
        assert_eq!(revoke.jti, "abc");
        assert_eq!(revoke.expires_at_ms, 1_700_000_000_250);

        let cases = [
            (request("", at(1, 0)), "invalid argument `jti`: is required"),
            (
                request(&"j".repeat(MAX_JTI_LEN + 1), at(1, 0)),
                "invalid argument `jti`: must be at most 1024 bytes",
            ),
            (
                request("abc", None),
                "invalid argument `expires_at`: is required",
            ),
            (
                request("abc", at(-5, 0)),
                "invalid argument `expires_at`: must be in the future",
            ),
            (
                request("abc", at(1, -1)),
                "invalid argument `expires_at`: nanos must",
            ),
            (
                request("abc", at(i64::MAX, 0)),
                "invalid argument `expires_at`: is too far in the future",
            ),
        ];
        for (request, expected) in cases {
            let error = Revoke::try_from(request).expect_err(expected);
            assert!(matches!(error, AuthError::InvalidArgument { .. }));
            assert!(error.to_string().starts_with(expected), "{error}");
        }
    }
}
