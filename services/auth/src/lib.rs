//! `streamer-auth`: the AuthService. It verifies the JWTs that WebSocket
//! clients present, against public keys that rotate without a restart (key
//! files, and JWKS documents fetched per issuer), keeps a deny-list of
//! revoked tokens, and mints development tokens so a local setup works with
//! no identity provider.
//!
//! # Layout
//!
//! - [`config`]: [`AuthConfig`], what the validator is told (key paths, JWKS
//!   issuers and their refresh schedule, expected issuer and audience,
//!   tenant allow-list, clock leeway).
//! - `keys`: turning PEM and JWKS documents into verification keys, and
//!   verifying a signature with one (ring). Every key is checked when it is
//!   loaded, so a broken file is reported against its path instead of as a
//!   mysterious failure on some later token.
//! - `key_store`: the key files' current key set and the rules for
//!   re-reading them.
//! - `jwks`: one key set per JWKS issuer, and the rules for fetching it.
//! - [`validator`]: [`TokenValidator`], the rules a token must pass, each
//!   refusal named by a [`TokenFailure`].
//! - [`revocation`]: the deny-list of revoked `jti`s, in the store.
//! - [`server`]: [`AuthServer`], the validator and the deny-list behind the
//!   thin gRPC adapter.
//! - [`dev`]: the development key pair and token minting.
//!
//! # Invariants
//!
//! - Only asymmetric algorithms verify tokens (RS*, PS*, ES256, ES384,
//!   EdDSA). `none` and HMAC are refused before any key is looked at, so a
//!   public key can never be misused as an HMAC secret; a JWKS `oct` key is
//!   never loaded.
//! - A token's algorithm must belong to the selected key's family (and curve,
//!   and a JWK's pinned `alg`); ring is only ever asked to verify such a
//!   pair.
//! - A token whose `iss` is a JWKS issuer meets only that issuer's keys;
//!   any other token meets only the key files.
//! - No claim is judged before the signature is verified, so an unsigned
//!   token cannot probe the claim rules; the deny-list is read last.
//! - A key file that becomes unreadable or invalid keeps the keys it last
//!   gave, and so does a JWKS URL that fails or answers garbage; only a file
//!   removed from a key directory, or a key removed from a JWKS document
//!   that is otherwise fine, retires keys.
//! - However many unknown kids arrive, key files are re-read at most once a
//!   second and a JWKS URL fetched at most once per its unknown-kid
//!   interval.
//! - Nothing from a presented token is logged, and refusal messages are
//!   fixed texts that are safe to show the client.
//!
//! [`TokenFailure`]: streamer_api::v1::TokenFailure

#![forbid(unsafe_code)]

pub mod config;
pub mod dev;
mod error;
mod jwks;
mod key_store;
mod keys;
pub mod revocation;
pub mod server;
pub mod validator;

#[cfg(test)]
mod test_support;

pub use config::{AuthConfig, JwksRefresh, JwksSource};
pub use error::{AuthError, KeyError};
pub use server::AuthServer;
pub use validator::{Rejection, TokenValidator, VerifiedClaims};
