//! The gRPC face of AuthService: `streamer.v1.AuthService`.
//!
//! A refused token is an answer, not an RPC error: `ValidateToken` answers
//! every verdict with a `ValidateTokenResponse`, and fails (UNAVAILABLE)
//! only when it cannot reach one, i.e. when the revocation list of a token
//! with a `jti` cannot be read.

use prost_types::Timestamp;
use streamer_api::v1::auth_service_server::{AuthService, AuthServiceServer};
use streamer_api::v1::{
    Claims, RevokeTokenRequest, RevokeTokenResponse, TokenFailure, ValidateTokenRequest,
    ValidateTokenResponse,
};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::{SharedStore, now_ms};
use streamer_core::trust::Caller;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::error::AuthError;
use crate::revocation::{Revocations, Revoke};
use crate::{Rejection, TokenValidator, VerifiedClaims};

/// Serves AuthService: a [`TokenValidator`]'s verdicts, then the deny-list.
#[derive(Debug, Clone)]
pub struct AuthServer {
    validator: TokenValidator,
    revocations: Revocations,
}

impl AuthServer {
    /// A server answering with `validator`'s verdicts and the deny-list in
    /// `store`.
    pub fn new(validator: TokenValidator, store: SharedStore) -> Self {
        let revocations = Revocations::new(store, validator.leeway());
        Self {
            validator,
            revocations,
        }
    }

    /// The tonic service, ready to add to a router.
    pub fn into_service(self) -> AuthServiceServer<AuthServer> {
        AuthServiceServer::new(self)
    }

    /// What keeps the server's state current, until `shutdown`: the JWKS
    /// refreshers and the sweep of expired revocations. Must run alongside
    /// the service, or JWKS issuers never get keys.
    pub async fn maintain(&self, shutdown: Shutdown) {
        tokio::join!(
            self.validator.refresh_jwks(shutdown.clone()),
            self.revocations.sweep(shutdown),
        );
    }

    /// The verdict on a token: every rule of the validator (waiting for a
    /// JWKS fetch when a kid is unknown), then, for a token with a `jti`,
    /// the deny-list. An error means no verdict could be reached.
    pub async fn check(&self, token: &str) -> Result<Result<VerifiedClaims, Rejection>, AuthError> {
        let claims = match self.validator.validate_with_refresh(token).await {
            Ok(claims) => claims,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if let Some(jti) = claims.jti.as_deref().filter(|jti| !jti.is_empty())
            && self.revocations.is_revoked(jti, now_ms()).await?
        {
            tracing::debug!(
                valid = false,
                failure = "TOKEN_FAILURE_REVOKED",
                "token refused"
            );
            return Ok(Err(Rejection {
                failure: TokenFailure::Revoked,
                message: "the token has been revoked".to_owned(),
            }));
        }
        Ok(Ok(claims))
    }
}

#[tonic::async_trait]
impl AuthService for AuthServer {
    async fn validate_token(
        &self,
        request: Request<ValidateTokenRequest>,
    ) -> Result<Response<ValidateTokenResponse>, Status> {
        let span = streamer_core::trace::server_span(
            &request,
            tracing::info_span!(
                "auth.validate_token",
                otel.kind = "server",
                valid = tracing::field::Empty,
                tenant_id = tracing::field::Empty,
            ),
        );
        let token = request.into_inner().token;
        // Runs on the async thread: a verification is tens of microseconds of
        // CPU, and key files are re-read at most once a second, which does
        // not justify a hop to the blocking pool per call. JWKS fetches run
        // on their refreshers; a call only waits for one.
        let checked = self.check(&token).instrument(span.clone()).await?;
        span.record("valid", checked.is_ok());
        let response = match checked {
            Ok(claims) => {
                span.record("tenant_id", claims.tenant_id.as_str());
                metrics::counter!("streamer_auth_validations_total", "result" => "valid")
                    .increment(1);
                ValidateTokenResponse::from(claims)
            }
            Err(rejection) => {
                metrics::counter!("streamer_auth_validations_total", "result" => "refused")
                    .increment(1);
                metrics::counter!("streamer_auth_failures_total", "reason" => streamer_core::metrics::token_failure(rejection.failure))
                    .increment(1);
                ValidateTokenResponse::from(rejection)
            }
        };
        Ok(Response::new(response))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = Caller::of(&request);
        let revoke: Revoke = request.into_inner().try_into()?;
        self.revocations
            .revoke(revoke, &caller.subject, now_ms())
            .await?;
        metrics::counter!("streamer_auth_revocations_total").increment(1);
        Ok(Response::new(RevokeTokenResponse {}))
    }
}

impl From<VerifiedClaims> for Claims {
    fn from(claims: VerifiedClaims) -> Self {
        Self {
            user_id: claims.user_id.into(),
            tenant_id: claims.tenant_id.into(),
            permissions: claims.permissions,
            topics: claims.topics,
            expires_at: Some(timestamp(claims.expires_at)),
            issued_at: claims.issued_at.map(timestamp),
            issuer: claims.issuer.unwrap_or_default(),
            key_id: claims.key_id.unwrap_or_default(),
            jti: claims.jti.unwrap_or_default(),
        }
    }
}

impl From<VerifiedClaims> for ValidateTokenResponse {
    fn from(claims: VerifiedClaims) -> Self {
        Self {
            valid: true,
            claims: Some(claims.into()),
            failure: TokenFailure::Unspecified.into(),
            message: String::new(),
        }
    }
}

impl From<Rejection> for ValidateTokenResponse {
    fn from(rejection: Rejection) -> Self {
        Self {
            valid: false,
            claims: None,
            failure: rejection.failure.into(),
            message: rejection.message,
        }
    }
}

fn timestamp(unix_seconds: u64) -> Timestamp {
    Timestamp {
        // The validator refuses dates past year 9999, so this never saturates
        // for a verified token.
        seconds: i64::try_from(unix_seconds).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthConfig;
    use crate::test_support::{self, claims, claims_with, write_file};
    use jsonwebtoken::Algorithm;
    use serde_json::json;
    use streamer_api::v1::auth_service_client::AuthServiceClient;

    /// A server verifying with the shared RSA key (kid `rsa`), with its
    /// store in the same temporary directory.
    fn server() -> (tempfile::TempDir, AuthServer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        write_file(&keys.join("rsa.pem"), &test_support::rsa().pkix_pem);
        let validator = TokenValidator::new(AuthConfig::new([keys])).expect("validator");
        let store =
            streamer_core::store::EmbeddedStore::open(&dir.path().join("store")).expect("store");
        (dir, AuthServer::new(validator, std::sync::Arc::new(store)))
    }

    fn rs256(claims: &serde_json::Value) -> String {
        test_support::sign(
            Algorithm::RS256,
            Some("rsa"),
            claims,
            &test_support::rsa().encoding,
        )
    }

    /// `server` served over gRPC on 127.0.0.1:0 until the sender is used or
    /// dropped.
    async fn serve(
        server: AuthServer,
    ) -> (
        AuthServiceClient<tonic::transport::Channel>,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server.into_service())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        let client = AuthServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        (client, stop, serving)
    }

    async fn call(server: &AuthServer, token: &str) -> ValidateTokenResponse {
        server
            .validate_token(Request::new(ValidateTokenRequest {
                token: token.to_owned(),
            }))
            .await
            .expect("a refusal is not an RPC error")
            .into_inner()
    }

    #[tokio::test]
    async fn a_refused_token_is_an_answer_naming_the_failure() {
        let (_dir, server) = server();
        let rsa = test_support::rsa();

        let expired = test_support::sign(
            Algorithm::RS256,
            Some("rsa"),
            &claims_with(json!({"iat": 1_000, "exp": 2_000})),
            &rsa.encoding,
        );
        let response = call(&server, &expired).await;
        assert!(!response.valid);
        assert_eq!(response.failure(), TokenFailure::Expired);
        assert!(response.claims.is_none());
        assert_eq!(response.message, "the token has expired");

        let response = call(&server, "").await;
        assert!(!response.valid);
        assert_eq!(response.failure(), TokenFailure::Missing);
    }

    #[tokio::test]
    async fn a_valid_token_carries_its_claims_and_timestamps() {
        let (_dir, server) = server();
        let claims = claims();
        let token = test_support::sign(
            Algorithm::RS256,
            Some("rsa"),
            &claims,
            &test_support::rsa().encoding,
        );
        let response = call(&server, &format!("Bearer {token}")).await;
        assert!(response.valid, "{}", response.message);
        assert_eq!(response.failure(), TokenFailure::Unspecified);
        let got = response.claims.expect("claims set");
        assert_eq!(got.user_id, "user-1");
        assert_eq!(got.tenant_id, "tenant-1");
        assert_eq!(got.permissions, ["read", "write"]);
        assert_eq!(got.key_id, "rsa");
        assert_eq!(got.issuer, "");
        assert_eq!(got.expires_at.map(|t| t.seconds), claims["exp"].as_i64(),);
        assert_eq!(got.issued_at.map(|t| t.seconds), claims["iat"].as_i64());
    }

    #[tokio::test]
    async fn the_service_answers_over_grpc() {
        let (_dir, server) = server();
        let (mut client, stop, serving) = serve(server).await;
        let response = client
            .validate_token(ValidateTokenRequest {
                token: "not-a-jwt".into(),
            })
            .await
            .expect("a refusal is not an RPC error")
            .into_inner();
        assert!(!response.valid);
        assert_eq!(response.failure(), TokenFailure::Malformed);

        let _ = stop.send(());
        serving.await.expect("server task").expect("server ran");
    }

    #[tokio::test]
    async fn a_revoked_jti_is_refused_and_other_tokens_are_not() {
        let (_dir, server) = server();
        let (mut client, stop, serving) = serve(server).await;
        let exp = claims()["exp"].as_i64().expect("exp");
        let revoked = rs256(&claims_with(json!({"jti": "jti-revoked"})));
        let other = rs256(&claims_with(json!({"jti": "jti-other"})));
        let without = rs256(&claims());

        let verdict = client
            .validate_token(ValidateTokenRequest {
                token: revoked.clone(),
            })
            .await
            .expect("answered")
            .into_inner();
        assert!(verdict.valid, "{}", verdict.message);
        assert_eq!(verdict.claims.expect("claims").jti, "jti-revoked");

        client
            .revoke_token(RevokeTokenRequest {
                jti: "jti-revoked".into(),
                expires_at: Some(Timestamp {
                    seconds: exp,
                    nanos: 0,
                }),
            })
            .await
            .expect("revoked");

        let verdict = client
            .validate_token(ValidateTokenRequest { token: revoked })
            .await
            .expect("a refusal is not an RPC error")
            .into_inner();
        assert!(!verdict.valid);
        assert!(verdict.claims.is_none());
        assert_eq!(verdict.failure(), TokenFailure::Revoked);
        assert_eq!(verdict.message, "the token has been revoked");
        for token in [other, without] {
            let verdict = client
                .validate_token(ValidateTokenRequest { token })
                .await
                .expect("answered")
                .into_inner();
            assert!(verdict.valid, "{}", verdict.message);
        }

        let _ = stop.send(());
        serving.await.expect("server task").expect("server ran");
    }

    #[tokio::test]
    async fn revoking_needs_a_jti_and_a_future_expiry() {
        let (_dir, server) = server();
        let (mut client, stop, serving) = serve(server).await;
        let future = Some(Timestamp {
            seconds: claims()["exp"].as_i64().expect("exp"),
            nanos: 0,
        });
        let past = Some(Timestamp {
            seconds: 1_000,
            nanos: 0,
        });
        for (jti, expires_at, field) in [
            ("", future, "jti"),
            ("jti", None, "expires_at"),
            ("jti", past, "expires_at"),
        ] {
            let status = client
                .revoke_token(RevokeTokenRequest {
                    jti: jti.into(),
                    expires_at,
                })
                .await
                .expect_err("invalid");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(
                status
                    .message()
                    .starts_with(&format!("invalid argument `{field}`")),
                "{status:?}"
            );
            assert_eq!(
                streamer_api::errors::reason_of(&status).as_deref(),
                Some("INVALID_ARGUMENT")
            );
        }

        let _ = stop.send(());
        serving.await.expect("server task").expect("server ran");
    }

    #[tokio::test]
    async fn a_revocation_outlasts_the_leeway_of_the_token_it_names() {
        let (dir, server) = server();
        let now = now_ms();
        let exp_ms = now + 60_000;
        server
            .revocations
            .revoke(
                Revoke {
                    jti: "jti".into(),
                    expires_at_ms: exp_ms,
                },
                "test",
                now,
            )
            .await
            .expect("revoked");
        drop(server);
        // The store itself says how long it keeps the entry: the token is
        // accepted for the leeway (30 s) past its `exp`, and so refused.
        let store =
            streamer_core::store::EmbeddedStore::open(&dir.path().join("store")).expect("store");
        use streamer_core::store::TokenStore as _;
        let leeway_ms = 30_000;
        assert!(
            store
                .is_token_revoked("jti", exp_ms + leeway_ms - 1)
                .await
                .expect("read")
        );
        assert!(
            !store
                .is_token_revoked("jti", exp_ms + leeway_ms)
                .await
                .expect("read")
        );
    }
}
