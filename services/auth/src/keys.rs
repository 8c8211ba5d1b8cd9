//! Turning PEM and JWKS documents (files, or fetched from a URL) into
//! verification keys.
//!
//! Keys are parsed here rather than by jsonwebtoken's PEM helpers because
//! those classify a key by the first OID they meet and do not look at the
//! curve. Here the SPKI algorithm and curve are read exactly, and each key
//! is checked once at load time (RSA: its size and exponent, by the `rsa`
//! crate; EC and Ed25519: the point, by handing it to jsonwebtoken) so that
//! anything unusable is reported now, against its file, rather than as a
//! refused token later.
//!
//! Signatures are verified with ring, from the key's bytes kept in the form
//! ring reads (it parses them again with each token, a small cost beside
//! the signature check). Its RSA verification is several times faster than
//! that of the RustCrypto `rsa` crate, which jsonwebtoken would use (see
//! `auth/validate_rs256` in BENCHMARKS.md), and every WebSocket upgrade
//! pays for one. What ring would refuse per token, the load-time checks
//! refuse first: an RSA exponent that is even, below 3 or above 2^33 - 1, a
//! modulus that is even or shorter than 2,048 bits, a point off its curve.
//! A PSS salt must be as long as the hash (RFC 7518 §3.5).

use std::io::Read as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use ring::signature::{self as ring_signature, UnparsedPublicKey, VerificationAlgorithm};
use rsa::BigUint;
use rsa::pkcs1::EncodeRsaPublicKey as _;
use rsa::pkcs1::der::Decode as _;
use rsa::pkcs8::{ObjectIdentifier, SubjectPublicKeyInfoRef};
use serde::Deserialize;

/// `rsaEncryption` (RFC 8017).
const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-ecPublicKey` (RFC 5480).
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1`, alias P-256.
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// `secp384r1`, alias P-384.
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// `id-Ed25519` (RFC 8410).
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// Below this an RSA signature is forgeable with public resources.
const MIN_RSA_BITS: usize = 2048;
/// The `rsa` crate's check of a public key, made at load time, stops here
/// (ring would verify up to 8,192 bits); better to refuse a larger key at
/// load time than every token it signs.
const MAX_RSA_BITS: usize = rsa::RsaPublicKey::MAX_SIZE;

/// A stray large file in a key directory (or a JWKS URL answering with
/// something huge) is refused rather than read whole; a JWKS with dozens of
/// RSA keys is still far below this.
pub(crate) const MAX_KEY_FILE_LEN: u64 = 1024 * 1024;

/// The kind of a key, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Every algorithm a key of this kind can verify.
    pub(crate) fn algorithms(self) -> &'static [Algorithm] {
        match self {
            Self::Rsa => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            Self::EcP256 => &[Algorithm::ES256],
            Self::EcP384 => &[Algorithm::ES384],
            Self::Ed25519 => &[Algorithm::EdDSA],
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Rsa => "an RSA key",
            Self::EcP256 => "an EC P-256 key",
            Self::EcP384 => "an EC P-384 key",
            Self::Ed25519 => "an Ed25519 key",
        }
    }
}

/// A public key that verifies token signatures.
pub(crate) struct VerificationKey {
    pub(crate) kid: String,
    pub(crate) kind: KeyKind,
    /// A JWK's `alg`: when present the key verifies this algorithm only
    /// (RFC 7517 §4.4), which stops e.g. an RS256 key being used for PS256.
    pub(crate) pinned_alg: Option<Algorithm>,
    /// The public key as ring reads it for `kind`: an RSA key's PKCS#1
    /// `RSAPublicKey` DER, an EC key's SEC 1 uncompressed point, an Ed25519
    /// key's 32 bytes.
    public: Vec<u8>,
}

impl VerificationKey {
    pub(crate) fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.algorithms().contains(&alg) && self.pinned_alg.is_none_or(|pinned| pinned == alg)
    }

    /// Whether `signature` is this key's signature of `message` by `alg`;
    /// never, for an algorithm the key does not accept.
    pub(crate) fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        self.accepts(alg)
            && verification_algorithm(alg).is_some_and(|algorithm| {
                UnparsedPublicKey::new(algorithm, &self.public)
                    .verify(message, signature)
                    .is_ok()
            })
    }
}

/// ring's verifier for each algorithm of [`asymmetric_algorithm`]. ring's
/// RSA verifiers take moduli of 2,048 to 8,192 bits, around the range
/// [`rsa_key`] lets in.
fn verification_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => &ring_signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &ring_signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &ring_signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &ring_signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &ring_signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &ring_signature::RSA_PSS_2048_8192_SHA512,
        // JWS ECDSA signatures are r || s at the curve's size (RFC 7518
        // §3.4), not DER.
        Algorithm::ES256 => &ring_signature::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &ring_signature::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &ring_signature::ED25519,
        _ => return None,
    })
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("pinned_alg", &self.pinned_alg)
            .finish_non_exhaustive()
    }
}

/// What one file (or one JWKS document) gave.
#[derive(Debug)]
pub(crate) struct FileKeys {
    pub(crate) keys: Vec<VerificationKey>,
    /// Keys inside a JWKS that were skipped, each with its reason. The file
    /// as a whole is still usable.
    pub(crate) skipped: Vec<String>,
}

/// Reads one key file. A file whose content starts with `{` is a JWKS
/// document, anything else must be a single PEM public key.
///
/// The error is a reason to show next to the path.
pub(crate) fn load_key_file(path: &Path) -> Result<FileKeys, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_KEY_FILE_LEN + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(format!(
            "larger than {MAX_KEY_FILE_LEN} bytes, which no key file needs"
        ));
    }
    let trimmed = bytes.trim_ascii();
    if trimmed.starts_with(b"{") {
        return parse_jwks(trimmed);
    }
    let kid = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| !stem.is_empty())
        .ok_or("the file name does not give a kid (it needs a UTF-8 stem)")?;
    let key = parse_pem(kid, trimmed)?;
    Ok(FileKeys {
        keys: vec![key],
        skipped: Vec::new(),
    })
}

/// Parses one PEM public key; `kid` names it.
pub(crate) fn parse_pem(kid: &str, pem: &[u8]) -> Result<VerificationKey, String> {
    let (label, der) =
        rsa::pkcs1::pem::decode_vec(pem).map_err(|e| format!("not a PEM document: {e}"))?;
    match label {
        "RSA PUBLIC KEY" => {
            let (n, e) = rsa_components_from_pkcs1(&der)?;
            rsa_key(kid, n, e)
        }
        "PUBLIC KEY" => parse_spki(kid, &der),
        "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" | "ENCRYPTED PRIVATE KEY" => Err(
            "this is a private key; give the validator the public key instead \
             (`openssl pkey -in KEY -pubout`)"
                .into(),
        ),
        "CERTIFICATE" => Err("certificates are not accepted; extract the public key \
             (`openssl x509 -in CERT -pubkey -noout`)"
            .into()),
        other => Err(format!("unsupported PEM type `{other}`")),
    }
}

fn parse_spki(kid: &str, der: &[u8]) -> Result<VerificationKey, String> {
    let spki = SubjectPublicKeyInfoRef::from_der(der)
        .map_err(|e| format!("not a valid SubjectPublicKeyInfo: {e}"))?;
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the public key bit string is not byte-aligned")?;
    match spki.algorithm.oid {
        OID_RSA => {
            let (n, e) = rsa_components_from_pkcs1(bits)?;
            rsa_key(kid, n, e)
        }
        OID_EC => {
            let curve = spki
                .algorithm
                .parameters_oid()
                .map_err(|_| "the EC key does not name its curve")?;
            let kind = match curve {
                OID_P256 => KeyKind::EcP256,
                OID_P384 => KeyKind::EcP384,
                other => {
                    return Err(format!(
                        "EC curve {other} is not supported (only P-256 and P-384)"
                    ));
                }
            };
            ec_key(kid, kind, bits)
        }
        OID_ED25519 => ed25519_key(kid, None, bits),
        other => Err(format!(
            "key algorithm {other} is not supported (RSA, EC P-256/P-384 and Ed25519 are)"
        )),
    }
}

fn rsa_components_from_pkcs1(der: &[u8]) -> Result<(BigUint, BigUint), String> {
    let key = rsa::pkcs1::RsaPublicKey::from_der(der)
        .map_err(|e| format!("not a valid PKCS#1 RSA public key: {e}"))?;
    Ok((
        BigUint::from_bytes_be(key.modulus.as_bytes()),
        BigUint::from_bytes_be(key.public_exponent.as_bytes()),
    ))
}

fn rsa_key(kid: &str, n: BigUint, e: BigUint) -> Result<VerificationKey, String> {
    let bits = n.bits();
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "the RSA key has {bits} bits; at most {MAX_RSA_BITS} are supported"
        ));
    }
    // Checks the exponent and that the modulus is odd, the same checks
    // ring makes per token.
    let key =
        rsa::RsaPublicKey::new(n, e).map_err(|err| format!("not a valid RSA public key: {err}"))?;
    let pkcs1 = key
        .to_pkcs1_der()
        .map_err(|err| format!("the RSA key cannot be encoded: {err}"))?;
    Ok(VerificationKey {
        kid: kid.to_owned(),
        kind: KeyKind::Rsa,
        pinned_alg: None,
        public: pkcs1.into_vec(),
    })
}

fn ed25519_key(
    kid: &str,
    pinned_alg: Option<Algorithm>,
    public: &[u8],
) -> Result<VerificationKey, String> {
    // jsonwebtoken slices the first 32 bytes without checking the length, so
    // a short key must never reach it.
    if public.len() != 32 {
        return Err(format!(
            "an Ed25519 public key has 32 bytes, this one has {}",
            public.len()
        ));
    }
    probe(KeyKind::Ed25519, &DecodingKey::from_ed_der(public))?;
    Ok(VerificationKey {
        kid: kid.to_owned(),
        kind: KeyKind::Ed25519,
        pinned_alg,
        public: public.to_vec(),
    })
}

/// `point` is SEC 1 uncompressed, on the curve `kind` names.
fn ec_key(kid: &str, kind: KeyKind, point: &[u8]) -> Result<VerificationKey, String> {
    probe(kind, &DecodingKey::from_ec_der(point))?;
    Ok(VerificationKey {
        kid: kid.to_owned(),
        kind,
        pinned_alg: None,
        public: point.to_vec(),
    })
}

/// Hands an EC or Ed25519 key to jsonwebtoken once with a dummy signature:
/// building its verifier parses the key (the EC point must be on the
/// curve, the Ed25519 point must decompress), so an unusable key fails here
/// and not per token. ring cannot be asked: it parses the key only with a
/// signature, and one failure looks like any other.
fn probe(kind: KeyKind, decoding: &DecodingKey) -> Result<(), String> {
    jsonwebtoken::crypto::verify("", b"", decoding, kind.algorithms()[0])
        .map(|_| ())
        .map_err(|e| format!("{} that cannot be used: {e}", kind.describe()))
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

/// The JWK members this crate reads (RFC 7517, RFC 7518 §6, RFC 8037).
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    key_use: Option<String>,
    key_ops: Option<Vec<String>>,
    alg: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

/// Parses a JWKS document, from a file or a URL. Keys that cannot be used
/// are skipped with a reason; a document with no usable signature key at all
/// is an error.
pub(crate) fn parse_jwks(json: &[u8]) -> Result<FileKeys, String> {
    let document: JwksDocument = serde_json::from_slice(json)
        .map_err(|e| format!("not a JWKS document (an object with a `keys` array): {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (index, value) in document.keys.into_iter().enumerate() {
        match parse_jwk(value) {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => {}
            Err((name, reason)) => {
                let name = name.unwrap_or_else(|| format!("#{index}"));
                skipped.push(format!("key {name}: {reason}"));
            }
        }
    }
    if keys.is_empty() {
        let detail = if skipped.is_empty() {
            "it holds no signature keys".to_owned()
        } else {
            skipped.join("; ")
        };
        return Err(format!("no usable key in the JWKS: {detail}"));
    }
    Ok(FileKeys { keys, skipped })
}

/// `Ok(None)` is a key that is fine but not for signatures (`use: enc`).
/// The error carries the key's kid when it has one.
fn parse_jwk(
    value: serde_json::Value,
) -> Result<Option<VerificationKey>, (Option<String>, String)> {
    let jwk: RawJwk = serde_json::from_value(value).map_err(|e| (None, e.to_string()))?;
    let kid = jwk.kid.clone();
    parse_raw_jwk(jwk).map_err(|reason| (kid, reason))
}

fn parse_raw_jwk(jwk: RawJwk) -> Result<Option<VerificationKey>, String> {
    if jwk.key_use.as_deref().is_some_and(|u| u != "sig")
        || jwk
            .key_ops
            .as_ref()
            .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
    {
        return Ok(None);
    }
    if jwk.kty == "oct" {
        return Err("symmetric (`oct`) keys are never accepted".into());
    }
    let kid = jwk
        .kid
        .as_deref()
        .filter(|kid| !kid.is_empty())
        .ok_or("it has no `kid`, so no token could select it")?;
    let pinned_alg = jwk
        .alg
        .as_deref()
        .map(|alg| {
            asymmetric_algorithm(alg).ok_or_else(|| format!("`alg` {alg:?} is not accepted"))
        })
        .transpose()?;
    let key = match jwk.kty.as_str() {
        "RSA" => {
            let n = decode_member("n", jwk.n.as_deref())?;
            let e = decode_member("e", jwk.e.as_deref())?;
            rsa_key(kid, BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))?
        }
        "EC" => {
            let (kind, size) = match jwk.crv.as_deref() {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                other => {
                    return Err(format!(
                        "EC curve {other:?} is not supported (only P-256 and P-384)"
                    ));
                }
            };
            let x = decode_member("x", jwk.x.as_deref())?;
            let y = decode_member("y", jwk.y.as_deref())?;
            if x.len() != size || y.len() != size {
                return Err(format!("`x` and `y` must be {size} bytes each"));
            }
            // SEC 1 uncompressed point: 0x04 || x || y.
            let mut point = Vec::with_capacity(1 + 2 * size);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            ec_key(kid, kind, &point)?
        }
        "OKP" => {
            if jwk.crv.as_deref() != Some("Ed25519") {
                return Err(format!(
                    "OKP curve {:?} is not supported (only Ed25519)",
                    jwk.crv
                ));
            }
            let x = decode_member("x", jwk.x.as_deref())?;
            ed25519_key(kid, None, &x)?
        }
        other => return Err(format!("key type `{other}` is not supported")),
    };
    if let Some(alg) = pinned_alg
        && !key.kind.algorithms().contains(&alg)
    {
        return Err(format!(
            "its `alg` {alg:?} does not fit {}",
            key.kind.describe()
        ));
    }
    Ok(Some(VerificationKey { pinned_alg, ..key }))
}

fn decode_member(name: &str, value: Option<&str>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("`{name}` is missing"))?;
    // Some issuers pad their base64url; RFC 7515 says not to, but the bytes
    // are unambiguous either way.
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| format!("`{name}` is not base64url"))
}

/// The one list of accepted algorithms, for tokens and for the keys that
/// pin one: the RSA, RSA-PSS, ECDSA and EdDSA families. HMAC and `none` are
/// not among them.
pub(crate) fn asymmetric_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "PS384" => Some(Algorithm::PS384),
        "PS512" => Some(Algorithm::PS512),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{self, fixture};

    #[test]
    fn pkix_and_pkcs1_rsa_pems_parse_as_rsa() {
        let rsa = test_support::rsa();
        for pem in [&rsa.pkix_pem, &rsa.pkcs1_pem] {
            let key = parse_pem("k", pem.as_bytes()).expect("RSA public key loads");
            assert_eq!(key.kind, KeyKind::Rsa);
            assert!(key.accepts(Algorithm::PS512));
            assert!(!key.accepts(Algorithm::ES256));
        }
    }

    #[test]
    fn ec_and_ed25519_pems_are_classified_by_curve() {
        let cases = [
            ("es256-a.pem", KeyKind::EcP256),
            ("es384.pem", KeyKind::EcP384),
            ("ed25519.pem", KeyKind::Ed25519),
        ];
        for (file, kind) in cases {
            let key = parse_pem("k", fixture(file).as_bytes()).expect(file);
            assert_eq!(key.kind, kind, "{file}");
        }
        let p256 = parse_pem("k", fixture("es256-a.pem").as_bytes()).expect("p256");
        assert!(p256.accepts(Algorithm::ES256));
        assert!(!p256.accepts(Algorithm::ES384));
    }

    #[test]
    fn private_keys_and_garbage_are_refused_with_a_reason() {
        let err = parse_pem("k", fixture("es256-a.key").as_bytes()).expect_err("private key");
        assert!(err.contains("private key"), "{err}");
        let err = parse_pem("k", b"hello").expect_err("garbage");
        assert!(err.contains("not a PEM document"), "{err}");
    }

    #[test]
    fn short_rsa_keys_are_refused() {
        let small = test_support::rsa_1024_pkix_pem();
        let err = parse_pem("k", small.as_bytes()).expect_err("1024-bit key");
        assert!(err.contains("at least 2048"), "{err}");
    }

    #[test]
    fn jwks_keys_load_and_unusable_ones_are_skipped_with_reasons() {
        let mut doc: serde_json::Value =
            serde_json::from_str(&fixture("jwks.json")).expect("fixture is JSON");
        let keys = doc["keys"].as_array_mut().expect("keys array");
        keys.push(serde_json::json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}));
        keys.push(
            serde_json::json!({"kty": "EC", "crv": "P-521", "kid": "big", "x": "AA", "y": "AA"}),
        );
        keys.push(serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "short", "x": "AAAA"}));
        keys.push(
            serde_json::json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}),
        );
        keys.push(serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}));
        let loaded = parse_jwks(doc.to_string().as_bytes()).expect("JWKS loads");

        let kids: Vec<_> = loaded.keys.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, ["jwks-ec-a", "jwks-ec-b", "jwks-ed"]);
        assert_eq!(loaded.keys[0].pinned_alg, Some(Algorithm::ES256));
        let skipped = loaded.skipped.join("\n");
        assert!(skipped.contains("key hmac: symmetric"), "{skipped}");
        assert!(skipped.contains("key big: EC curve"), "{skipped}");
        assert!(
            skipped.contains("key short: an Ed25519 public key has 32 bytes"),
            "{skipped}"
        );
        assert!(skipped.contains("no `kid`"), "{skipped}");
        // The `use: enc` key is silently not a signature key.
        assert_eq!(loaded.skipped.len(), 4, "{skipped}");
    }

    #[test]
    fn a_jwks_without_usable_keys_is_an_error() {
        let err = parse_jwks(br#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#)
            .expect_err("only an HMAC key");
        assert!(err.contains("symmetric"), "{err}");
        let err = parse_jwks(br#"{"kty":"RSA"}"#).expect_err("a bare JWK");
        assert!(err.contains("`keys` array"), "{err}");
    }

    #[test]
    fn an_oversized_file_is_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("huge.pem");
        std::fs::write(&path, vec![b'A'; 2 * 1024 * 1024]).expect("write");
        let err = load_key_file(&path).expect_err("too large");
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn a_pinned_alg_must_fit_the_key() {
        let doc = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "ES256",
            "x": "oDSRajpcQbzkXNYQSe539RBxrjLRPephnwFMxXkB0DY"
        }]});
        let err = parse_jwks(doc.to_string().as_bytes()).expect_err("mismatched alg");
        assert!(err.contains("does not fit an Ed25519 key"), "{err}");
    }
}
