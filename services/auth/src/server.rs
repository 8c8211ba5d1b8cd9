//! The gRPC face of the validator: `streamer.v1.AuthService`.
//!
//! A refused token is an answer, not an RPC error, so this adapter never
//! returns a `Status`: every outcome is a `ValidateTokenResponse`.

use prost_types::Timestamp;
use streamer_api::v1::auth_service_server::{AuthService, AuthServiceServer};
use streamer_api::v1::{Claims, TokenFailure, ValidateTokenRequest, ValidateTokenResponse};
use tonic::{Request, Response, Status};

use crate::{Rejection, TokenValidator, VerifiedClaims};

/// Serves `ValidateToken` with a [`TokenValidator`].
#[derive(Debug, Clone)]
pub struct AuthServer {
    validator: TokenValidator,
}

impl AuthServer {
    /// A server answering with `validator`'s verdicts.
    pub fn new(validator: TokenValidator) -> Self {
        Self { validator }
    }

    /// The tonic service, ready to add to a router.
    pub fn into_service(self) -> AuthServiceServer<AuthServer> {
        AuthServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AuthService for AuthServer {
    async fn validate_token(
        &self,
        request: Request<ValidateTokenRequest>,
    ) -> Result<Response<ValidateTokenResponse>, Status> {
        let token = request.into_inner().token;
        // Runs on the async thread: a verification is tens of microseconds of
        // CPU, and key files are re-read at most once a second, which does
        // not justify a hop to the blocking pool per call.
        let response = match self.validator.validate(&token) {
            Ok(claims) => ValidateTokenResponse::from(claims),
            Err(rejection) => ValidateTokenResponse::from(rejection),
        };
        Ok(Response::new(response))
    }
}

impl From<VerifiedClaims> for Claims {
    fn from(claims: VerifiedClaims) -> Self {
        Self {
            user_id: claims.user_id,
            tenant_id: claims.tenant_id,
            permissions: claims.permissions,
            expires_at: Some(timestamp(claims.expires_at)),
            issued_at: claims.issued_at.map(timestamp),
            issuer: claims.issuer.unwrap_or_default(),
            key_id: claims.key_id.unwrap_or_default(),
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

    fn server() -> (tempfile::TempDir, AuthServer) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(&dir.path().join("rsa.pem"), &test_support::rsa().pkix_pem);
        let validator = TokenValidator::new(AuthConfig::new([dir.path()])).expect("validator");
        (dir, AuthServer::new(validator))
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
        use streamer_api::v1::auth_service_client::AuthServiceClient;

        let (_dir, server) = server();
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

        let mut client = AuthServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
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
}
