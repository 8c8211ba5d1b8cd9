//! `streamer-auth`: the AuthService. It verifies the JWTs that WebSocket
//! clients present, against public keys that rotate without a restart, and it
//! mints development tokens so a local setup works with no identity provider.
//!
//! # Layout
//!
//! - [`config`]: [`AuthConfig`], what the validator is told (key paths,
//!   expected issuer and audience, tenant allow-list, clock leeway).
//! - `keys`: turning PEM and JWKS files into verification keys. Every key is
//!   checked when it is loaded, so a broken file is reported against its path
//!   instead of as a mysterious failure on some later token.
//! - `key_store`: the current key set and the rules for re-reading the files.
//! - [`validator`]: [`TokenValidator`], the rules a token must pass, each
//!   refusal named by a [`TokenFailure`].
//! - [`server`]: [`AuthServer`], the thin gRPC adapter.
//! - [`dev`]: the development key pair and token minting.
//!
//! # Invariants
//!
//! - Only asymmetric algorithms verify tokens (RS*, PS*, ES256, ES384,
//!   EdDSA). `none` and HMAC are refused before any key is looked at, so a
//!   public key can never be misused as an HMAC secret; a JWKS `oct` key is
//!   never loaded.
//! - A token's algorithm must belong to the selected key's family (and curve,
//!   and a JWK's pinned `alg`); jsonwebtoken is only ever asked to verify
//!   such a pair.
//! - No claim is judged before the signature is verified, so an unsigned
//!   token cannot probe the claim rules.
//! - A key file that becomes unreadable or invalid keeps the keys it last
//!   gave; only a file removed from a key directory retires its keys.
//! - Nothing from a token is logged, and refusal messages are fixed texts
//!   that are safe to show the client.
//!
//! [`TokenFailure`]: streamer_api::v1::TokenFailure

#![forbid(unsafe_code)]

pub mod config;
pub mod dev;
mod error;
mod key_store;
mod keys;
pub mod server;
pub mod validator;

#[cfg(test)]
mod test_support;

pub use config::AuthConfig;
pub use error::KeyError;
pub use server::AuthServer;
pub use validator::{Rejection, TokenValidator, VerifiedClaims};
