//! Posting to one connection that AWS API Gateway holds: its management API
//! (`PostToConnection`, `DeleteConnection`, `GetConnection`) with the
//! retries, the limits and the circuit breaker that delivery needs.
//!
//! Rules:
//! 1. A message over API Gateway's 128 KB limit ([`MAX_MESSAGE_BYTES`]) is
//!    refused before any call ([`PostOutcome::Rejected`]).
//! 2. What an answer means ([`classify`]): 2xx delivered; 410 the client is
//!    gone (the caller removes the connection); 429, 5xx, a timeout or a
//!    failed connection are worth another attempt; 403, 413 and any other
//!    4xx are final.
//! 3. Retries: at most [`PostPolicy::attempts`] attempts in all, after
//!    exponential waits (base 100 ms, doubling, capped at 5 s, each ±25%
//!    at random: [`PostPolicy::backoff`]).
//! 4. One breaker per connection ([`Breakers`]): three failed posts in a
//!    row (retries exhausted, or 403) open it; while open, posts fail at once
//!    as unavailable without a call, so a broken connection costs a
//!    broadcast nothing; after 30 s one post is let through (half-open),
//!    and its outcome closes or re-opens it. A delivered post or a 410
//!    forgets the connection's failures.
//! 5. Time (the waits, the breaker's clock) comes from a [`Clock`], so tests
//!    control it instead of sleeping.
//!
//! Each post is a call of its own (the SDK's own retries are off: rule 3
//! is the only retry policy).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_apigatewaymanagement::Client;
use aws_sdk_apigatewaymanagement::config::retry::RetryConfig;
use aws_sdk_apigatewaymanagement::config::timeout::TimeoutConfig;
use aws_sdk_apigatewaymanagement::error::SdkError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use bytes::Bytes;

/// API Gateway's limit on one message to a WebSocket client.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// Where a connection is reached: the management endpoint of its API and
/// stage (`https://{domain}/{stage}`) and API Gateway's connection id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub endpoint: String,
    pub connection_id: String,
}

/// How a call failed: the HTTP status when there was an answer, none for a
/// timeout or a connection that could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub status: Option<u16>,
    pub message: String,
}

/// The management API's three operations on one connection.
#[async_trait]
pub trait ManagementApi: Send + Sync {
    async fn post(&self, target: &Target, data: Bytes) -> Result<(), CallError>;
    async fn delete(&self, target: &Target) -> Result<(), CallError>;
    /// Whether API Gateway still holds the connection (a 410 is `Ok(false)`).
    async fn get(&self, target: &Target) -> Result<bool, CallError>;
}

/// Time for the retries and the breakers.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The process's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Retries, the breaker and the time a call may take.
#[derive(Debug, Clone, PartialEq)]
pub struct PostPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// The share a wait may move either way at random.
    pub jitter: f64,
    /// Failed posts in a row that open a connection's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before one post is let through.
    pub breaker_cooldown: Duration,
    /// Longest one call may take.
    pub attempt_timeout: Duration,
}

impl Default for PostPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            jitter: 0.25,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(3),
        }
    }
}

impl PostPolicy {
    /// The wait after failed attempt `attempt` (1-based): `base × 2^(n-1)`,
    /// moved by up to `jitter` either way, never over `cap`.
    pub fn backoff(&self, attempt: u32, rng: &mut impl rand::Rng) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let nominal = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        let factor = if self.jitter > 0.0 {
            rng.gen_range(1.0 - self.jitter..=1.0 + self.jitter)
        } else {
            1.0
        };
        nominal.mul_f64(factor).min(self.cap)
    }
}

/// What became of one post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    Delivered,
    /// API Gateway no longer holds the connection (410).
    Gone,
    /// Refused for good: too large, forbidden (403), or another 4xx.
    /// Sending the same message again would fail the same way.
    Rejected(String),
    /// Not delivered now: the retries ran out, or the connection's breaker
    /// is open. The caller may try again later.
    Unavailable(String),
}

/// What one call's answer means (rule 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Gone,
    Retry,
    Reject,
}

/// Rule 2.
pub fn classify(answer: &Result<(), CallError>) -> Verdict {
    match answer {
        Ok(()) => Verdict::Delivered,
        Err(CallError { status: None, .. }) => Verdict::Retry,
        Err(CallError {
            status: Some(status),
            ..
        }) => match status {
            410 => Verdict::Gone,
            429 | 500..=599 => Verdict::Retry,
            _ => Verdict::Reject,
        },
    }
}

/// One connection's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    /// Failed posts in a row, fewer than the limit.
    Closed(u32),
    /// No post until then.
    Open(Instant),
    /// One post is on its way; any other fails at once.
    Trying,
}

/// Whether a post may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// The one post of a half-open breaker.
    Trial,
    /// The breaker is open.
    Refused,
}

/// The breakers of the connections that failed lately (rule 4). A
/// connection has an entry only while it has failures, and loses it on a
/// delivered post, a 410 or [`Breakers::forget`], so the map is bounded by
/// the connections that are failing.
#[derive(Debug, Default)]
pub struct Breakers {
    by_connection: Mutex<HashMap<Target, Breaker>>,
}

impl Breakers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Breaker>> {
        self.by_connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn admit(&self, target: &Target, now: Instant) -> Admission {
        let mut map = self.lock();
        match map.get(target).copied() {
            None | Some(Breaker::Closed(_)) => Admission::Go,
            Some(Breaker::Open(until)) if now >= until => {
                map.insert(target.clone(), Breaker::Trying);
                Admission::Trial
            }
            Some(Breaker::Open(_) | Breaker::Trying) => Admission::Refused,
        }
    }

    /// Whether posts to `target` fail at once now (for `IsActive` and
    /// broadcasts that skip broken connections).
    pub fn is_open(&self, target: &Target, now: Instant) -> bool {
        match self.lock().get(target) {
            Some(Breaker::Open(until)) => now < *until,
            Some(Breaker::Trying) => true,
            _ => false,
        }
    }

    pub fn succeeded(&self, target: &Target) {
        self.lock().remove(target);
    }

    pub fn forget(&self, target: &Target) {
        self.lock().remove(target);
    }

    pub fn failed(&self, target: &Target, now: Instant, policy: &PostPolicy) {
        let mut map = self.lock();
        let failures = match map.get(target) {
            Some(Breaker::Closed(n)) => n + 1,
            // A half-open trial that failed opens it again at once.
            Some(Breaker::Trying | Breaker::Open(_)) => policy.breaker_failures,
            None => 1,
        };
        let state = if failures >= policy.breaker_failures {
            metrics::counter!("streamer_apigateway_breaker_opened_total").increment(1);
            Breaker::Open(now + policy.breaker_cooldown)
        } else {
            Breaker::Closed(failures)
        };
        map.insert(target.clone(), state);
    }
}

/// Posts messages to API Gateway's connections under rules 1 to 5.
pub struct Poster {
    api: Arc<dyn ManagementApi>,
    clock: Arc<dyn Clock>,
    policy: PostPolicy,
    breakers: Breakers,
}

impl std::fmt::Debug for Poster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poster")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Poster {
    pub fn new(api: Arc<dyn ManagementApi>, clock: Arc<dyn Clock>, policy: PostPolicy) -> Self {
        Self {
            api,
            clock,
            policy,
            breakers: Breakers::default(),
        }
    }

    pub fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// Posts `data` to `target`, retrying what is worth retrying.
    pub async fn post(&self, target: &Target, data: Bytes) -> PostOutcome {
        if data.len() > MAX_MESSAGE_BYTES {
            metrics::counter!("streamer_apigateway_posts_total", "outcome" => "too_large")
                .increment(1);
            return PostOutcome::Rejected(format!(
                "a message of {} bytes is over API Gateway's limit of {MAX_MESSAGE_BYTES} bytes",
                data.len()
            ));
        }
        if self.breakers.admit(target, self.clock.now()) == Admission::Refused {
            metrics::counter!("streamer_apigateway_posts_total", "outcome" => "breaker_open")
                .increment(1);
            return PostOutcome::Unavailable(
                "posts to this connection are failing; the next try is after the breaker's cooldown"
                    .into(),
            );
        }
        let mut attempt = 1;
        loop {
            let answer = self.call(self.api.post(target, data.clone())).await;
            let outcome = match classify(&answer) {
                Verdict::Delivered => {
                    self.breakers.succeeded(target);
                    PostOutcome::Delivered
                }
                Verdict::Gone => {
                    self.breakers.forget(target);
                    PostOutcome::Gone
                }
                Verdict::Reject => {
                    let error = answer.err().unwrap_or_else(|| CallError {
                        status: None,
                        message: String::new(),
                    });
                    // A 413 is this message's fault; a 403 or another 4xx
                    // is the connection's (or the credentials').
                    if error.status != Some(413) {
                        self.breakers.failed(target, self.clock.now(), &self.policy);
                    }
                    PostOutcome::Rejected(describe(&error))
                }
                Verdict::Retry if attempt < self.policy.attempts => {
                    let wait = self.policy.backoff(attempt, &mut rand::thread_rng());
                    self.clock.sleep(wait).await;
                    attempt += 1;
                    continue;
                }
                Verdict::Retry => {
                    self.breakers.failed(target, self.clock.now(), &self.policy);
                    let error = answer.err().map(|e| describe(&e)).unwrap_or_default();
                    PostOutcome::Unavailable(format!("after {attempt} attempts: {error}"))
                }
            };
            let label = match &outcome {
                PostOutcome::Delivered => "delivered",
                PostOutcome::Gone => "gone",
                PostOutcome::Rejected(_) => "rejected",
                PostOutcome::Unavailable(_) => "unavailable",
            };
            metrics::counter!("streamer_apigateway_posts_total", "outcome" => label).increment(1);
            return outcome;
        }
    }

    /// Ends the client's connection (`DeleteConnection`); a connection
    /// already gone counts as ended.
    pub async fn delete(&self, target: &Target) -> Result<(), CallError> {
        self.breakers.forget(target);
        match self.call(self.api.delete(target)).await {
            Err(CallError {
                status: Some(410), ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Whether API Gateway still holds the connection: false while its
    /// breaker is open or when API Gateway answers 410.
    pub async fn is_active(&self, target: &Target) -> Result<bool, CallError> {
        if self.breakers.is_open(target, self.clock.now()) {
            return Ok(false);
        }
        self.call(self.api.get(target)).await
    }

    /// One call, within the attempt timeout.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.policy.attempt_timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(CallError {
                status: None,
                message: format!("no answer within {:?}", self.policy.attempt_timeout),
            }),
        }
    }
}

fn describe(error: &CallError) -> String {
    match error.status {
        Some(status) => format!("API Gateway answered {status}: {}", error.message),
        None => error.message.clone(),
    }
}

/// The management API through the AWS SDK: SigV4-signed calls to
/// `{endpoint}/@connections/{id}`, one client per endpoint.
pub struct SdkManagementApi {
    base: aws_sdk_apigatewaymanagement::Config,
    clients: Mutex<HashMap<String, Client>>,
}

impl std::fmt::Debug for SdkManagementApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkManagementApi").finish_non_exhaustive()
    }
}

impl SdkManagementApi {
    /// With the standard AWS credential chain and region (`region` when
    /// given).
    pub async fn from_environment(region: Option<String>) -> anyhow::Result<Self> {
        // The credential chain's own calls (web identity, container and
        // instance roles) need the HTTP client too.
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(https_client());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        let shared = loader.load().await;
        anyhow::ensure!(
            shared.region().is_some(),
            "no AWS region for API Gateway's management API: set AWS_REGION"
        );
        Ok(Self::with_config(
            aws_sdk_apigatewaymanagement::config::Builder::from(&shared),
        ))
    }

    /// With fixed credentials, for a local stand-in of the management API
    /// (moto, or a test server), which accepts any signature.
    pub fn local() -> Self {
        Self::with_config(
            aws_sdk_apigatewaymanagement::Config::builder()
                .behavior_version(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_apigatewaymanagement::config::Credentials::new(
                    "local", "local", None, None, "local",
                )),
        )
    }

    fn with_config(builder: aws_sdk_apigatewaymanagement::config::Builder) -> Self {
        let base = builder
            .http_client(https_client())
            // Rule 3 is the only retry policy; the attempt timeout is the
            // poster's.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .build(),
            )
            .build();
        Self {
            base,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, endpoint: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(endpoint.to_owned())
            .or_insert_with(|| {
                Client::from_conf(self.base.to_builder().endpoint_url(endpoint).build())
            })
            .clone()
    }
}

/// The SDK's HTTP client: rustls with ring, as everywhere in Streamer.
fn https_client() -> aws_sdk_apigatewaymanagement::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The status and message of a failed SDK call: no status for a timeout or
/// a connection that could not be made.
fn call_error<E>(error: SdkError<E, HttpResponse>) -> CallError
where
    E: std::error::Error + Send + Sync + 'static,
{
    CallError {
        status: error.raw_response().map(|r| r.status().as_u16()),
        message: error_chain(&error),
    }
}

/// An error and its sources, one after the other.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[async_trait]
impl ManagementApi for SdkManagementApi {
    async fn post(&self, target: &Target, data: Bytes) -> Result<(), CallError> {
        self.client(&target.endpoint)
            .post_to_connection()
            .connection_id(&target.connection_id)
            .data(Blob::new(data.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(call_error)
    }

    async fn delete(&self, target: &Target) -> Result<(), CallError> {
        self.client(&target.endpoint)
            .delete_connection()
            .connection_id(&target.connection_id)
            .send()
            .await
            .map(|_| ())
            .map_err(call_error)
    }

    async fn get(&self, target: &Target) -> Result<bool, CallError> {
        match self
            .client(&target.endpoint)
            .get_connection()
            .connection_id(&target.connection_id)
            .send()
            .await
            .map_err(call_error)
        {
            Ok(_) => Ok(true),
            // Only the status matters here: a 2xx whose body the SDK could
            // not read (moto answers `connectedAt` as a number) still says
            // the connection is there.
            Err(CallError {
                status: Some(200..=299),
                ..
            }) => Ok(true),
            Err(CallError {
                status: Some(410), ..
            }) => Ok(false),
            Err(error) => Err(error),
        }
    }
}
