//! Errors about keys (loading them, creating the development key, signing)
//! and the service's own errors, with the one place that decides each
//! error's gRPC status.
//!
//! Refused tokens are not errors of either kind; they are
//! [`Rejection`](crate::Rejection)s, answered with `valid = false`.

use std::path::{Path, PathBuf};

use streamer_api::errors::{Failure, Reason};
use streamer_core::store::StoreError;
use tonic::Code;

/// Why keys could not be loaded, created or used for signing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The configuration names no key path and no JWKS URL.
    #[error(
        "no keys configured: pass at least one PEM file, JWKS file or directory of keys, \
         or an issuer's JWKS URL"
    )]
    NoKeyPaths,
    /// A JWKS URL that cannot be fetched.
    #[error("the JWKS URL of issuer {issuer:?}: {reason}")]
    JwksUrl {
        /// The issuer it is configured for.
        issuer: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two JWKS URLs for one issuer.
    #[error("issuer {0:?} is given two JWKS URLs; an issuer has one")]
    DuplicateJwksIssuer(String),
    /// The required issuer of the key files is also a JWKS issuer, so no
    /// token could ever pass it.
    #[error(
        "the required issuer {0:?} is also a JWKS issuer: its tokens are verified only with \
         its JWKS, never with the key files the required issuer applies to"
    )]
    IssuerIsJwks(String),
    /// A required issuer with no key files for it to apply to.
    #[error(
        "a required issuer applies to tokens verified with key files, and none are configured; \
         a JWKS issuer's tokens always carry their issuer"
    )]
    IssuerWithoutKeyFiles,
    /// A refresh schedule that cannot work.
    #[error("the JWKS refresh interval and fetch timeout must be longer than zero")]
    InvalidRefresh,
    /// The HTTP client for JWKS URLs could not be built.
    #[error("cannot set up the HTTP client for JWKS URLs: {0}")]
    HttpClient(String),
    /// Every configured path was read and none gave a usable key.
    #[error(
        "no usable verification key in {}: {}",
        list_paths(paths),
        problems.join("; ")
    )]
    NoUsableKeys {
        /// The configured key paths.
        paths: Vec<PathBuf>,
        /// One entry per file or directory that failed, naming it.
        problems: Vec<String>,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something that is not a usable key.
    #[error("{}: {reason}", path.display())]
    InvalidKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The development key has not been created yet.
    #[error(
        "no development key at {}: run `streamer all` once to create it, or point \
         --data-dir (STREAMER_DATA_DIR) at the data directory of the `streamer all` that \
         made it",
        path.display()
    )]
    DevKeyMissing {
        /// Where the private key was expected.
        path: PathBuf,
    },
    /// Generating the development RSA key failed.
    #[error("generating the development key failed: {0}")]
    Generate(#[source] rsa::Error),
    /// Signing a token failed.
    #[error("signing the token failed: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

impl KeyError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::InvalidKey {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why an AuthService call failed (a refused token is not one of these).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A field of the call is missing or out of range.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument {
        /// The field, as the proto names it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The revocation list could not be read or written. A token with a
    /// `jti` gets no verdict rather than one that may be wrong.
    #[error("the revocation list is unavailable: {0}")]
    Store(String),
}

impl AuthError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for AuthError {
    fn from(error: StoreError) -> Self {
        // The deny-list is written without conditions, so a conflict is as
        // unexpected as a backend failure, and as retryable.
        Self::Store(error.to_string())
    }
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> Self {
        let message = error.to_string();
        let failure = match error {
            AuthError::InvalidArgument { field, reason } => {
                Failure::invalid_argument(field, reason)
            }
            AuthError::Store(_) => {
                Failure::new(Code::Unavailable, Reason::StoreUnavailable, message)
            }
        };
        failure.into()
    }
}
