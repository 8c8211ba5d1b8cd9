//! Keys fetched from an issuer's JWKS URL.
//!
//! Every issuer configured with a URL has its own [`IssuerKeys`]: its own
//! key set, schedule and fetches. One issuer's keys therefore never verify
//! another issuer's tokens, and a slow or failing URL holds up no other.
//!
//! The rules, each enforced below:
//!
//! 1. The keys are fetched as soon as the refresher runs. A fetch that fails
//!    leaves the set as it was (empty at start: the issuer's tokens are
//!    refused UNKNOWN_KEY until a fetch succeeds) and is retried after 1 s,
//!    2 s, 4 s, … up to the refresh interval, and never more than a minute
//!    apart.
//! 2. A successful fetch replaces the whole set, so a key removed from the
//!    document is retired. The next fetch is due after the refresh
//!    interval, or the response's `Cache-Control: max-age` when that is
//!    shorter (but not below the unknown-kid interval).
//! 3. A token naming a kid the set lacks asks for a fetch at once, unless
//!    one started less than the unknown-kid interval ago: then it is
//!    refused without one. A token that arrives while a fetch is asked for
//!    or running waits for that fetch (no longer than the fetch timeout) and
//!    is checked again once. However many made-up kids arrive, they cost an
//!    issuer at most one fetch per unknown-kid interval.
//! 4. A response must be a success, at most [`MAX_KEY_FILE_LEN`] bytes
//!    (refused unread beyond), and a JWKS with at least one usable key under
//!    the same rules as a JWKS file (`use` other than `sig` is not a
//!    signature key, `oct` is never loaded, `alg` pins the algorithm).
//!    Anything else, or no answer within the timeout, is a failed fetch
//!    (rule 1). An `https` URL is verified against the webpki roots, and a
//!    redirect from `https` to `http` is refused.
//!
//! Fetches run only on the refresher ([`IssuerKeys::run`], one per issuer,
//! driven by `TokenValidator::refresh_jwks`), never on a validating call, so
//! a client that goes away mid-fetch cancels nothing and no queue of fetches
//! can form: a request is a flag and a doorbell.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use reqwest::header::{ACCEPT, CACHE_CONTROL, HeaderMap};
use streamer_core::shutdown::Shutdown;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::KeyError;
use crate::config::JwksRefresh;
use crate::key_store::KeySet;
use crate::keys::{self, MAX_KEY_FILE_LEN};

/// The first retry after a failed fetch; it doubles per failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between retries, whatever the refresh interval.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Redirects followed before a fetch fails.
const MAX_REDIRECTS: usize = 5;

/// One issuer's keys, and when to fetch them again. Shared by the
/// validator (reads, asks) and the refresher (fetches).
pub(crate) struct IssuerKeys {
    issuer: String,
    url: reqwest::Url,
    timing: JwksRefresh,
    /// Validations take the read lock only to clone the `Arc`, and a fetch
    /// takes the write lock only to swap it, so neither waits on the network.
    keys: RwLock<Arc<KeySet>>,
    /// Whether a fetch is asked for or running, and when the last one
    /// started. A plain mutex: it is held for a comparison, never across an
    /// `.await`.
    schedule: Mutex<Schedule>,
    /// Rung when a token asks for a fetch; `schedule.requested` says whether
    /// a ring still stands (a permit left from an earlier ring does not).
    doorbell: Notify,
    /// Counts finished fetches, failed ones too; waiters wait for it to move.
    fetches: watch::Sender<u64>,
}

impl std::fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("issuer", &self.issuer)
            .field("url", &self.url.as_str())
            .field("kids", &self.current().kids())
            .finish_non_exhaustive()
    }
}

/// What a token with an unknown kid gets (rule 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// A fetch is asked for or running: wait for it.
    Wait,
    /// One started less than the unknown-kid interval ago: no fetch.
    Refused,
}

/// The decisions of rule 3, with the clock passed in.
#[derive(Debug, Default)]
struct Schedule {
    /// When the last fetch started.
    last_started: Option<Instant>,
    /// A token asked for a fetch that has not started yet.
    requested: bool,
    /// A fetch is running.
    running: bool,
}

impl Schedule {
    /// A token named an unknown kid at `now`. Returns the answer, and
    /// whether the refresher must be woken for it.
    fn unknown_kid(&mut self, now: Instant, min_interval: Duration) -> (Ask, bool) {
        if self.requested || self.running {
            return (Ask::Wait, false);
        }
        if self
            .last_started
            .is_some_and(|started| now.saturating_duration_since(started) < min_interval)
        {
            return (Ask::Refused, false);
        }
        self.requested = true;
        (Ask::Wait, true)
    }

    fn fetch_started(&mut self, now: Instant) {
        self.requested = false;
        self.running = true;
        self.last_started = Some(now);
    }

    fn fetch_finished(&mut self) {
        self.running = false;
    }
}

/// How long after a successful fetch the next one is due (rule 2).
fn after_success(max_age: Option<Duration>, timing: &JwksRefresh) -> Duration {
    match max_age {
        Some(max_age) => timing
            .interval
            .min(max_age.max(timing.unknown_kid_interval)),
        None => timing.interval,
    }
}

/// How long after the `failures`-th failure in a row the next try is due
/// (rule 1).
fn after_failure(failures: u32, timing: &JwksRefresh) -> Duration {
    let cap = timing.interval.min(MAX_RETRY);
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(cap)
}

/// A usable answer.
struct Fetched {
    keys: keys::FileKeys,
    max_age: Option<Duration>,
}

impl IssuerKeys {
    pub(crate) fn new(issuer: String, url: &str, timing: JwksRefresh) -> Result<Self, KeyError> {
        let url = crate::config::check_jwks_url(url).map_err(|reason| KeyError::JwksUrl {
            issuer: issuer.clone(),
            reason,
        })?;
        Ok(Self {
            issuer,
            url,
            timing,
            keys: RwLock::new(Arc::new(KeySet::default())),
            schedule: Mutex::new(Schedule::default()),
            doorbell: Notify::new(),
            fetches: watch::Sender::new(0),
        })
    }

    /// The keys in force now.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn lock_schedule(&self) -> MutexGuard<'_, Schedule> {
        // Every method leaves the schedule consistent between statements.
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A token named a kid the set lacks: asks for a fetch unless rule 3
    /// forbids one, without waiting for it.
    pub(crate) fn ask_for_fetch(&self) -> Ask {
        let (ask, ring) = self
            .lock_schedule()
            .unknown_kid(Instant::now(), self.timing.unknown_kid_interval);
        if ring {
            self.doorbell.notify_one();
        }
        ask
    }

    /// A token named a kid the set lacks: asks for a fetch and waits for the
    /// one asked for or running to finish, or returns at once when rule 3
    /// allows none. The caller looks the kid up again either way.
    pub(crate) async fn fetch_for_unknown_kid(&self) {
        // Subscribed before asking, so a fetch that finishes in between is
        // not missed.
        let mut finished = self.fetches.subscribe();
        if self.ask_for_fetch() == Ask::Refused {
            return;
        }
        // The fetch itself gives up after the timeout; the margin covers
        // its parsing. Beyond that no refresher is answering.
        let limit = self.timing.timeout + Duration::from_secs(1);
        if tokio::time::timeout(limit, finished.changed())
            .await
            .is_err()
        {
            tracing::warn!(issuer = %self.issuer, "no JWKS fetch finished in time for a token");
        }
    }

    /// The refresher: fetches now, then as rules 1 to 3 say, until
    /// `shutdown`.
    pub(crate) async fn run(&self, client: &reqwest::Client, shutdown: Shutdown) {
        let mut next = Instant::now();
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
                () = self.doorbell.notified() => {
                    if !self.lock_schedule().requested {
                        // A permit left from a ring that a scheduled fetch
                        // already answered.
                        continue;
                    }
                }
            }
            self.lock_schedule().fetch_started(Instant::now());
            let outcome = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                outcome = tokio::time::timeout(self.timing.timeout, fetch(client, &self.url)) => {
                    outcome.unwrap_or_else(|_| {
                        Err(format!("no complete answer within {:?}", self.timing.timeout))
                    })
                }
            };
            let now = Instant::now();
            match outcome {
                Ok(fetched) => {
                    failures = 0;
                    next = now + after_success(fetched.max_age, &self.timing);
                    self.install(fetched.keys);
                }
                Err(reason) => {
                    failures = failures.saturating_add(1);
                    let retry = after_failure(failures, &self.timing);
                    next = now + retry;
                    tracing::warn!(
                        issuer = %self.issuer,
                        url = %self.url,
                        %reason,
                        kept_keys = self.current().len(),
                        failures,
                        retry_in_secs = retry.as_secs_f64(),
                        "JWKS fetch failed; keeping the previous keys"
                    );
                }
            }
            self.lock_schedule().fetch_finished();
            self.fetches
                .send_modify(|count| *count = count.wrapping_add(1));
        }
    }

    fn install(&self, fetched: keys::FileKeys) {
        let set = KeySet::from_keys(fetched.keys, self.url.as_str());
        let changed = set.kids() != self.current().kids();
        if changed {
            for reason in &fetched.skipped {
                tracing::warn!(issuer = %self.issuer, url = %self.url, %reason, "JWKS key skipped");
            }
            tracing::info!(
                issuer = %self.issuer,
                keys = set.len(),
                kids = ?set.kids(),
                "JWKS keys loaded"
            );
        }
        // Swapped even when the kids are the same: a key may have changed
        // under its kid.
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }
}

/// The HTTP client every issuer's refresher shares.
pub(crate) fn http_client(timing: &JwksRefresh) -> Result<reqwest::Client, KeyError> {
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|url| url.scheme() == "https");
        if downgrade {
            attempt.error("a redirect from https to http")
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .connect_timeout(timing.timeout)
        .redirect(redirects)
        .user_agent(concat!("streamer/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| KeyError::HttpClient(error_chain(&e)))
}

async fn fetch(client: &reqwest::Client, url: &reqwest::Url) -> Result<Fetched, String> {
    let mut response = client
        .get(url.clone())
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("answered HTTP {status}"));
    }
    let too_large = || format!("the answer is larger than {MAX_KEY_FILE_LEN} bytes");
    if response
        .content_length()
        .is_some_and(|len| len > MAX_KEY_FILE_LEN)
    {
        return Err(too_large());
    }
    let max_age = max_age(response.headers());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if (body.len() + chunk.len()) as u64 > MAX_KEY_FILE_LEN {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let keys = keys::parse_jwks(&body)?;
    Ok(Fetched { keys, max_age })
}

/// `max-age` of a `Cache-Control` header, when it has a usable one.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').find_map(|directive| {
        let (name, seconds) = directive.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        let seconds: u64 = seconds.trim().trim_matches('"').parse().ok()?;
        Some(Duration::from_secs(seconds))
    })
}

/// An error with its causes: reqwest's own message rarely says more than
/// "error sending request".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> JwksRefresh {
        JwksRefresh::default()
    }

    mod served {
        //! The refreshers against a real HTTP server on 127.0.0.1:0, which
        //! counts what it is asked. Waiting is on those counts and on the
        //! validator's own answers, never on time.

        use std::time::Duration;

        use jsonwebtoken::Algorithm;
        use serde_json::{Value, json};
        use streamer_api::v1::TokenFailure;
        use streamer_core::shutdown::Shutdown;

        use crate::config::{JwksRefresh, JwksSource};
        use crate::test_support::{
            JwksAnswer, JwksServer, claims_with, ec_key, fixture, jwk, jwks, sign, write_file,
        };
        use crate::{AuthConfig, TokenValidator};

        const ISSUER_A: &str = "https://a.example/";
        const ISSUER_B: &str = "https://b.example/";

        /// Nothing scheduled fires during a test: only what a test asks for.
        fn quiet() -> JwksRefresh {
            JwksRefresh {
                interval: Duration::from_secs(3600),
                unknown_kid_interval: Duration::from_secs(3600),
                timeout: Duration::from_secs(10),
            }
        }

        fn config(issuers: &[(&str, &JwksServer)], refresh: JwksRefresh) -> AuthConfig {
            AuthConfig {
                jwks: issuers
                    .iter()
                    .map(|(issuer, server)| JwksSource {
                        issuer: (*issuer).to_owned(),
                        url: server.url.clone(),
                    })
                    .collect(),
                jwks_refresh: refresh,
                ..AuthConfig::default()
            }
        }

        /// A validator whose refreshers run until this is dropped.
        struct Refreshing {
            validator: TokenValidator,
            shutdown: Shutdown,
        }

        impl Drop for Refreshing {
            fn drop(&mut self) {
                self.shutdown.cancel();
            }
        }

        fn refreshing(config: AuthConfig) -> Refreshing {
            let validator = TokenValidator::new(config).expect("validator");
            let shutdown = Shutdown::new();
            tokio::spawn({
                let (validator, shutdown) = (validator.clone(), shutdown.clone());
                async move { validator.refresh_jwks(shutdown).await }
            });
            Refreshing {
                validator,
                shutdown,
            }
        }

        /// An ES256 token claiming `issuer`, signed with `es256-<key>.key`.
        fn token(issuer: &str, kid: &str, key: &str) -> String {
            sign(
                Algorithm::ES256,
                Some(kid),
                &claims_with(json!({ "iss": issuer })),
                &ec_key(&format!("es256-{key}.key")),
            )
        }

        fn document(keys: &[(&str, &str)]) -> JwksAnswer {
            let keys: Vec<Value> = keys
                .iter()
                .map(|(key, kid)| jwk(&format!("jwks-ec-{key}"), kid))
                .collect();
            JwksAnswer::Document(jwks(&keys))
        }

        async fn failure(validator: &TokenValidator, token: &str) -> TokenFailure {
            match validator.validate_with_refresh(token).await {
                Ok(claims) => panic!("token accepted: {claims:?}"),
                Err(rejection) => rejection.failure,
            }
        }

        #[tokio::test]
        async fn an_unknown_kid_triggers_exactly_one_fetch_and_then_validates() {
            let server = JwksServer::start(document(&[("a", "a-2025")])).await;
            let refresh = JwksRefresh {
                unknown_kid_interval: Duration::ZERO,
                ..quiet()
            };
            let keys = refreshing(config(&[(ISSUER_A, &server)], refresh));
            let validator = &keys.validator;

            // The first token waits for the fetch at start.
            let old = token(ISSUER_A, "a-2025", "a");
            let verified = validator
                .validate_with_refresh(&old)
                .await
                .expect("old key");
            assert_eq!(verified.issuer.as_deref(), Some(ISSUER_A));
            assert_eq!(server.fetches(), 1);

            // The issuer rotates: its new key is unknown until fetched.
            server.answer(document(&[("a", "a-2025"), ("b", "b-2026")]));
            let new = token(ISSUER_A, "b-2026", "b");
            let verified = validator
                .validate_with_refresh(&new)
                .await
                .expect("new key");
            assert_eq!(verified.key_id.as_deref(), Some("b-2026"));
            assert_eq!(server.fetches(), 2, "one fetch for the unknown kid");

            // Known kids cost nothing more.
            for token in [&old, &new, &old] {
                assert!(validator.validate_with_refresh(token).await.is_ok());
            }
            assert_eq!(server.fetches(), 2);
            assert_eq!(
                validator.jwks_key_ids(ISSUER_A),
                Some(vec!["a-2025".to_owned(), "b-2026".to_owned()])
            );
        }

        #[tokio::test]
        async fn a_flood_of_unknown_kids_costs_at_most_one_fetch_per_interval() {
            let server = JwksServer::start(document(&[("a", "a-key")])).await;
            let validator =
                TokenValidator::new(config(&[(ISSUER_A, &server)], quiet())).expect("validator");

            // A hundred made-up kids before the first fetch: they ask, and
            // all wait for the one fetch the refresher runs when it starts.
            let mut flood = tokio::task::JoinSet::new();
            for n in 0..100 {
                let validator = validator.clone();
                let token = token(ISSUER_A, &format!("made-up-{n}"), "a");
                flood.spawn(async move { validator.validate_with_refresh(&token).await });
            }
            let shutdown = Shutdown::new();
            let refresher = tokio::spawn({
                let (validator, shutdown) = (validator.clone(), shutdown.clone());
                async move { validator.refresh_jwks(shutdown).await }
            });
            while let Some(verdict) = flood.join_next().await {
                let rejection = verdict.expect("task").expect_err("a made-up kid");
                assert_eq!(rejection.failure, TokenFailure::UnknownKey);
            }
            assert_eq!(server.fetches(), 1);

            // A hundred more within the interval: refused, no fetch at all.
            for n in 0..100 {
                let token = token(ISSUER_A, &format!("again-{n}"), "a");
                assert_eq!(failure(&validator, &token).await, TokenFailure::UnknownKey);
            }
            assert_eq!(server.fetches(), 1);
            let real = token(ISSUER_A, "a-key", "a");
            assert!(validator.validate_with_refresh(&real).await.is_ok());

            shutdown.cancel();
            refresher.await.expect("the refresher stops on shutdown");
        }

        #[tokio::test]
        async fn a_key_removed_from_the_jwks_stops_validating_after_the_next_refresh() {
            let server = JwksServer::start(document(&[("a", "stays"), ("b", "goes")])).await;
            let refresh = JwksRefresh {
                interval: Duration::from_millis(20),
                ..quiet()
            };
            let keys = refreshing(config(&[(ISSUER_A, &server)], refresh));
            let validator = &keys.validator;
            let stays = token(ISSUER_A, "stays", "a");
            let goes = token(ISSUER_A, "goes", "b");
            assert!(validator.validate_with_refresh(&stays).await.is_ok());
            assert!(validator.validate_with_refresh(&goes).await.is_ok());

            server.answer(document(&[("a", "stays")]));
            // Fetches run one after another, so once the second after the
            // change arrives, the first has been installed.
            server.wait_for_fetches(server.fetches() + 2).await;
            assert_eq!(failure(validator, &goes).await, TokenFailure::UnknownKey);
            assert!(validator.validate_with_refresh(&stays).await.is_ok());
        }

        #[tokio::test]
        async fn a_failed_or_garbage_fetch_keeps_the_previous_keys() {
            let server = JwksServer::start(document(&[("a", "a-key")])).await;
            let refresh = JwksRefresh {
                interval: Duration::from_millis(20),
                ..quiet()
            };
            let keys = refreshing(config(&[(ISSUER_A, &server)], refresh));
            let validator = &keys.validator;
            let token = token(ISSUER_A, "a-key", "a");
            assert!(validator.validate_with_refresh(&token).await.is_ok());

            let huge = format!("{{\"keys\": [], \"padding\": \"{}\"}}", "x".repeat(1 << 20));
            for answer in [
                JwksAnswer::Status(503),
                JwksAnswer::Raw("<html>not a JWKS</html>".into()),
                JwksAnswer::Document(
                    json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}),
                ),
                JwksAnswer::Document(json!({"keys": []})),
                JwksAnswer::Raw(huge),
            ] {
                server.answer(answer);
                server.wait_for_fetches(server.fetches() + 2).await;
                assert!(validator.validate(&token).is_ok(), "the previous key stays");
            }
        }

        #[tokio::test]
        async fn an_issuers_keys_never_verify_another_issuers_tokens() {
            let a = JwksServer::start(document(&[("a", "a-key")])).await;
            let b = JwksServer::start(document(&[("b", "b-key")])).await;
            let dir = tempfile::tempdir().expect("tempdir");
            write_file(&dir.path().join("file-a.pem"), &fixture("es256-a.pem"));
            let keys = refreshing(AuthConfig {
                key_paths: vec![dir.path().to_path_buf()],
                ..config(&[(ISSUER_A, &a), (ISSUER_B, &b)], quiet())
            });
            let validator = &keys.validator;

            assert!(
                validator
                    .validate_with_refresh(&token(ISSUER_A, "a-key", "a"))
                    .await
                    .is_ok()
            );
            assert!(
                validator
                    .validate_with_refresh(&token(ISSUER_B, "b-key", "b"))
                    .await
                    .is_ok()
            );
            // A's key, with a token that claims B: B's keys do not have it,
            // and B's key under A's signature does not verify.
            let cases = [
                (token(ISSUER_B, "a-key", "a"), TokenFailure::UnknownKey),
                (token(ISSUER_B, "b-key", "a"), TokenFailure::BadSignature),
                // A JWKS issuer's token never meets the key files.
                (token(ISSUER_A, "file-a", "a"), TokenFailure::UnknownKey),
                // Any other issuer meets only the key files.
                (
                    token("https://other.example/", "a-key", "a"),
                    TokenFailure::UnknownKey,
                ),
            ];
            for (token, expected) in &cases {
                assert_eq!(failure(validator, token).await, *expected);
            }
            let other = token("https://other.example/", "file-a", "a");
            assert!(validator.validate_with_refresh(&other).await.is_ok());
        }

        #[tokio::test]
        async fn a_url_down_at_start_is_refused_unknown_key_until_it_answers() {
            let server = JwksServer::start(JwksAnswer::Status(503)).await;
            let keys = refreshing(config(&[(ISSUER_A, &server)], quiet()));
            let validator = &keys.validator;
            let token = token(ISSUER_A, "a-key", "a");

            server.wait_for_fetches(1).await;
            assert_eq!(failure(validator, &token).await, TokenFailure::UnknownKey);
            let rejection = validator.validate(&token).expect_err("no keys yet");
            assert_eq!(rejection.failure, TokenFailure::UnknownKey);

            // The retry after the failure finds the URL answering.
            server.answer(document(&[("a", "a-key")]));
            server.wait_for_fetches(server.fetches() + 1).await;
            let verified = validator
                .validate_with_refresh(&token)
                .await
                .expect("once up");
            assert_eq!(verified.key_id.as_deref(), Some("a-key"));
        }

        #[test]
        fn jwks_configurations_that_contradict_themselves_are_refused() {
            let source = |issuer: &str| JwksSource {
                issuer: issuer.to_owned(),
                url: "https://id.example/jwks.json".to_owned(),
            };
            let only_jwks = AuthConfig {
                jwks: vec![source(ISSUER_A)],
                ..AuthConfig::default()
            };
            assert!(
                TokenValidator::new(only_jwks.clone()).is_ok(),
                "JWKS alone is fine"
            );

            let twice = AuthConfig {
                jwks: vec![source(ISSUER_A), source(ISSUER_A)],
                ..only_jwks.clone()
            };
            let issuer_without_files = AuthConfig {
                issuer: Some(ISSUER_B.to_owned()),
                ..only_jwks.clone()
            };
            let issuer_is_jwks = AuthConfig {
                key_paths: vec!["/unused".into()],
                issuer: Some(ISSUER_A.to_owned()),
                ..only_jwks.clone()
            };
            let bad_url = AuthConfig {
                jwks: vec![JwksSource {
                    issuer: ISSUER_A.to_owned(),
                    url: "file:///etc/keys.json".to_owned(),
                }],
                ..AuthConfig::default()
            };
            for (config, expected) in [
                (twice, "two JWKS URLs"),
                (issuer_without_files, "none are configured"),
                (issuer_is_jwks, "also a JWKS issuer"),
                (bad_url, "not an http:// or https:// URL"),
                (AuthConfig::default(), "no keys configured"),
            ] {
                let error = TokenValidator::new(config).expect_err(expected);
                assert!(error.to_string().contains(expected), "{error}");
            }
        }
    }

    #[test]
    fn an_unknown_kid_asks_once_then_waits_then_is_refused_until_the_interval_passes() {
        let min = Duration::from_secs(10);
        let start = Instant::now();
        let mut schedule = Schedule::default();

        assert_eq!(schedule.unknown_kid(start, min), (Ask::Wait, true));
        // Asked for, not started: later tokens wait without ringing again.
        assert_eq!(schedule.unknown_kid(start, min), (Ask::Wait, false));
        schedule.fetch_started(start);
        assert_eq!(schedule.unknown_kid(start, min), (Ask::Wait, false));
        schedule.fetch_finished();

        let soon = start + Duration::from_secs(9);
        for _ in 0..100 {
            assert_eq!(schedule.unknown_kid(soon, min), (Ask::Refused, false));
        }
        assert_eq!(schedule.unknown_kid(start + min, min), (Ask::Wait, true));
    }

    #[test]
    fn a_scheduled_fetch_counts_for_the_interval() {
        let min = Duration::from_secs(10);
        let start = Instant::now();
        let mut schedule = Schedule::default();
        schedule.fetch_started(start);
        schedule.fetch_finished();
        assert_eq!(
            schedule.unknown_kid(start + Duration::from_secs(1), min),
            (Ask::Refused, false)
        );
    }

    #[test]
    fn the_next_fetch_honours_max_age_within_bounds() {
        let timing = timing();
        assert_eq!(after_success(None, &timing), timing.interval);
        assert_eq!(
            after_success(Some(Duration::from_secs(60)), &timing),
            Duration::from_secs(60)
        );
        assert_eq!(
            after_success(Some(Duration::ZERO), &timing),
            timing.unknown_kid_interval,
            "never below the unknown-kid interval"
        );
        assert_eq!(
            after_success(Some(Duration::from_secs(86_400)), &timing),
            timing.interval,
            "never beyond the refresh interval"
        );
    }

    #[test]
    fn failures_back_off_to_a_minute_or_the_interval() {
        let timing = timing();
        let waits: Vec<u64> = (1..=8)
            .map(|n| after_failure(n, &timing).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(after_failure(u32::MAX, &timing).as_secs(), 60);
        let short = JwksRefresh {
            interval: Duration::from_secs(5),
            ..timing
        };
        assert_eq!(after_failure(4, &short).as_secs(), 5);
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        let parse = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CACHE_CONTROL, value.parse().expect("header value"));
            max_age(&headers)
        };
        assert_eq!(
            parse("public, max-age=3600, must-revalidate"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse("Max-Age = \"120\""), Some(Duration::from_secs(120)));
        assert_eq!(parse("no-cache"), None);
        assert_eq!(parse("max-age=soon"), None);
        assert_eq!(max_age(&HeaderMap::new()), None);
    }
}
