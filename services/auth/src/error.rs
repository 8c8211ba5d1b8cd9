//! Errors about keys: loading them, creating the development key, signing.
//!
//! Refused tokens are not errors of this kind; they are
//! [`Rejection`](crate::Rejection)s.

use std::path::{Path, PathBuf};

/// Why keys could not be loaded, created or used for signing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The configuration names no key path at all.
    #[error("no key paths configured: pass at least one PEM file, JWKS file or directory of keys")]
    NoKeyPaths,
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
        "no development key at {}: run `streamer all` once to create it, or pass a key",
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
