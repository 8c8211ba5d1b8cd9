//! Whose connection an edge announces: ConnectionService's own check.
//!
//! Rules:
//! 1. An edge's word is not enough. Unless the trust mode is `none` (where
//!    nobody's credential is checked and any caller could attach as an edge
//!    anyway), every announced connection (`opened`, and each one a `hello`
//!    re-announces) carries the client's token, and this service has
//!    AuthService verify it again. A token that is not valid, or that names
//!    another user or tenant than the edge announced, gets the connection
//!    refused: an edge credential alone cannot speak for anyone.
//! 2. The recorded permissions and topic patterns are the token's, not the
//!    edge's.
//! 3. When AuthService cannot answer, nothing is recorded on the edge's word:
//!    an `opened` is refused as unavailable (the client may retry), and a
//!    `hello` fails as a whole, so the edge attaches again later without
//!    losing a socket.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use streamer_api::v1::{self, auth_service_client::AuthServiceClient};
use streamer_core::grpc::Balanced;
use streamer_core::ids::ConnectionId;
use streamer_core::shutdown::Shutdown;
use streamer_core::store::ConnectionRecord;
use streamer_core::trust::{AuthedChannel, Check, Role};

use crate::service::ConnectionConfig;

/// Longest a verification may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Verifications in flight at once for one `hello`.
const HELLO_CONCURRENCY: usize = 32;

/// Why an announced connection was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The token is not valid, or is someone else's: close 1008.
    NotVerified(String),
    /// AuthService did not answer: close 1011, the client may retry.
    Unavailable(String),
}

impl Refusal {
    /// The WebSocket close code and reason the edge closes the socket with.
    pub fn close(&self) -> (u32, String) {
        match self {
            Refusal::NotVerified(why) => (1008, format!("identity not verified: {why}")),
            Refusal::Unavailable(_) => (1011, "cannot verify the token now".into()),
        }
    }
}

/// Verifies the identities edges announce (rule 1), or, in mode `none`,
/// takes them as announced.
#[derive(Clone)]
pub struct IdentityCheck {
    auth: Option<Arc<Balanced<AuthServiceClient<AuthedChannel>>>>,
}

impl IdentityCheck {
    /// Follows every AuthService replica the configuration names until
    /// `shutdown` (none in trust mode none).
    pub async fn new(config: &ConnectionConfig, shutdown: &Shutdown) -> anyhow::Result<Self> {
        if let Check::None = config.trust.check() {
            return Ok(Self { auth: None });
        }
        let list = config.auth_endpoint.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "ConnectionService verifies the tokens edges announce (trust mode {}): give it \
                 AuthService's URL (--auth-url)",
                config.trust.name()
            )
        })?;
        let credentials = config
            .trust
            .credentials("connection-service", &[Role::Backend]);
        let auth = Balanced::follow_list(
            list,
            &config.trust,
            (VERIFY_TIMEOUT, Some(VERIFY_TIMEOUT)),
            move |channel| AuthServiceClient::with_interceptor(channel, credentials.clone()),
            shutdown.clone(),
        )
        .await?;
        Ok(Self { auth: Some(auth) })
    }

    /// The record to keep for a connection announced with `token`.
    pub async fn verify(
        &self,
        mut record: ConnectionRecord,
        token: &str,
    ) -> Result<ConnectionRecord, Refusal> {
        let Some(auth) = &self.auth else {
            return Ok(record);
        };
        if token.is_empty() {
            return Err(Refusal::NotVerified("the edge sent no token".into()));
        }
        // A replica that does not answer (it may have just gone) is
        // followed by one more.
        let answer = auth
            .call(2, Duration::ZERO, |mut client| async move {
                client
                    .validate_token(v1::ValidateTokenRequest {
                        token: token.to_owned(),
                    })
                    .await
            })
            .await
            .map_err(|status| Refusal::Unavailable(status.message().to_owned()))?
            .into_inner();
        let claims = match answer.claims {
            Some(claims) if answer.valid => claims,
            _ => return Err(Refusal::NotVerified(answer.message)),
        };
        if record.user_id != *claims.user_id || record.tenant_id != *claims.tenant_id {
            return Err(Refusal::NotVerified(
                "the token names another user or tenant".into(),
            ));
        }
        record.permissions = claims.permissions;
        record.topics = claims.topics;
        Ok(record)
    }

    /// Verifies every connection a `hello` re-announces. Refused ones come
    /// back apart, to be closed; an unavailable AuthService fails the whole
    /// hello (rule 3).
    pub async fn verify_all(
        &self,
        announced: Vec<(ConnectionRecord, String)>,
    ) -> Result<(Vec<ConnectionRecord>, Vec<(ConnectionId, Refusal)>), Refusal> {
        let results: Vec<_> = futures::stream::iter(announced)
            .map(|(record, token)| async move {
                let id = record.connection_id.clone();
                match self.verify(record, &token).await {
                    Ok(record) => Ok(Ok(record)),
                    Err(unavailable @ Refusal::Unavailable(_)) => Err(unavailable),
                    Err(refusal) => Ok(Err((id, refusal))),
                }
            })
            .buffered(HELLO_CONCURRENCY)
            .try_collect()
            .await?;
        let mut kept = Vec::new();
        let mut refused = Vec::new();
        for result in results {
            match result {
                Ok(record) => kept.push(record),
                Err(refusal) => refused.push(refusal),
            }
        }
        Ok((kept, refused))
    }
}
