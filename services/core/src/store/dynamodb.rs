//! The DynamoDB backend: the store several replicas share.
//!
//! Tables (one set per `table_prefix`, made by [`DynamoStore::create_tables`];
//! every one on-demand, with DynamoDB's TTL on `expires_at`, epoch seconds):
//!
//! | table | key | attributes and indexes |
//! |---|---|---|
//! | `<prefix>connections` | `connection_id` | `record` (the JSON record), `tenant_id`, `tenant_user`, `edge_id`, `last_seen_ms`, `expires_at` (24 h after the last activity), `topics` (string set: the topics it is subscribed to, so its deletion removes them). GSIs `by_tenant` (`tenant_id`, `connection_id`), `by_tenant_user` (`tenant_user`, `connection_id`), `by_edge` (`edge_id`, `connection_id`, keys only) |
//! | `<prefix>edges` | `edge_id` | an edge's liveness lease: `started_at_ms`, `heartbeat_at_ms`, `lease_expires_at_ms`, `lease_shard` = `edges`, `expires_at` (a day after the lease). GSI `by_lease` (`lease_shard`, `lease_expires_at_ms`) |
//! | `<prefix>requests` | `id` | a request: `record`, `version`, `created_at_ms`, `expires_at` (7 days after its last change); `unfinished` = `1` while PENDING or PROCESSING, `pending_action` = its action while PENDING, `leased` = `1` and `lease_expires_at_ms` while PROCESSING: three sparse GSIs, `unfinished` (`unfinished`, `created_at_ms`), `pending` (`pending_action`, `created_at_ms`), `leased` (`leased`, `lease_expires_at_ms`). A client-id guard: `id` = `client␟<tenant>␟<user>␟<client id>`, `request_id` |
//! | `<prefix>subscriptions` | `topic_key` = `<tenant>␟<topic>`, `connection_id` | `record` |
//! | `<prefix>topics` | `topic_key`, `topic_offset` | offset 0: the position, `topic_epoch` and `latest_offset`; offset n > 0: message n, `record`. `expires_at`: a message's end of retention; the position's a day later |
//! | `<prefix>revoked-tokens` | `jti` | `expires_at_ms`, `expires_at` |
//!
//! Rules:
//! 1. Every state change is a conditional write: a request's update on its
//!    `version` (a claim is one), its creation on the absence of both the
//!    request and its client-id guard (one transaction), a touch on the
//!    record existing, an edge's heartbeat on its lease being live (or
//!    lapsed, to start a new one) and its removal on the lease read, a
//!    subscription on its connection being live (one transaction with the
//!    connection's `topics`), a topic's append on its latest offset (one
//!    transaction with the message, so offsets have no holes).
//!    A lost condition is [`StoreError::Conflict`] (or, for a create, the
//!    existing request).
//! 2. Reads by key are strongly consistent. Lists through a GSI are
//!    eventually consistent (DynamoDB offers nothing else there): a record
//!    written a moment ago may be missing from a list, never from a get.
//! 3. Expiry is decided on read (`last_seen_ms`, `updated_at`), as in the
//!    embedded store; DynamoDB's TTL deletes the items later on its own.
//!    The sweeps scan with a filter and delete on a condition, so they are
//!    for the periodic housekeeping only, never on a request's path.
//! 4. Throttling, timeouts, 5xx and unreachable endpoints are retried by the
//!    SDK (standard mode: up to 4 attempts, exponential backoff with
//!    jitter from 50 ms to 2 s); what is left is [`StoreError::Unavailable`]
//!    (retryable). Anything else is [`StoreError::Backend`] with the SDK's
//!    error as its source.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, TransactWriteItem, Update,
};

use super::{
    CONNECTION_TTL, ClientRequestId, ConnectionId, ConnectionRecord, ConnectionStore, Created,
    Durability, EdgeRecord, EdgeStore, Heartbeat, REQUEST_TTL, Recovery, RequestRecord,
    RequestStatus, RequestStore, Retention, Store, StoreError, StoreResult, Subscription,
    SubscriptionStore, TokenStore, TopicMessage, TopicPosition, TopicStore, now_ms,
};
use crate::ids::{EdgeId, RequestId, TenantId, UserId};

type Item = HashMap<String, AttributeValue>;

/// Separates the parts of a composite key (ids never contain it).
const SEP: char = '\u{1f}';

/// Where the tables are and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoConfig {
    /// Prepended to every table name (`streamer-` gives
    /// `streamer-connections`, …): several deployments can share an account.
    pub table_prefix: String,
    /// The AWS region; None: the standard chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Another endpoint than AWS's, such as a local DynamoDB-protocol server.
    pub endpoint_url: Option<String>,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            table_prefix: "streamer-".into(),
            region: None,
            endpoint_url: None,
        }
    }
}

/// The store on DynamoDB. Cloning is cheap (the SDK client is shared).
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    connections: String,
    edges: String,
    requests: String,
    subscriptions: String,
    topics: String,
    revoked: String,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl DynamoStore {
    /// Connects with the standard AWS credential chain (environment,
    /// profile, web identity, container and instance roles).
    pub async fn connect(config: &DynamoConfig) -> anyhow::Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http_client())
            .retry_config(retry_config())
            .timeout_config(timeout_config());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        anyhow::ensure!(
            shared.region().is_some(),
            "no AWS region: set AWS_REGION (or --dynamodb-region)"
        );
        let sdk = aws_sdk_dynamodb::config::Builder::from(&shared)
            .interceptor(Metered)
            .build();
        Ok(Self::with_client(
            Client::from_conf(sdk),
            &config.table_prefix,
        ))
    }

    /// A store on a local DynamoDB-protocol server, with fixed credentials
    /// (such servers accept any): for tests and local trials.
    pub fn local(endpoint_url: &str, table_prefix: &str) -> Self {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint_url)
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "local", "local", None, None, "local",
            ))
            .http_client(http_client())
            .retry_config(retry_config())
            .timeout_config(timeout_config())
            .interceptor(Metered)
            .build();
        Self::with_client(Client::from_conf(config), table_prefix)
    }

    fn with_client(client: Client, prefix: &str) -> Self {
        Self {
            client,
            connections: format!("{prefix}connections"),
            edges: format!("{prefix}edges"),
            requests: format!("{prefix}requests"),
            subscriptions: format!("{prefix}subscriptions"),
            topics: format!("{prefix}topics"),
            revoked: format!("{prefix}revoked-tokens"),
        }
    }

    /// The table names, in the order [`DynamoStore::create_tables`] makes them.
    pub fn table_names(&self) -> [&str; 6] {
        [
            &self.connections,
            &self.edges,
            &self.requests,
            &self.subscriptions,
            &self.topics,
            &self.revoked,
        ]
    }

    /// Creates the tables that do not exist yet, waits until each is
    /// ACTIVE and turns its TTL on. Safe to run again.
    pub async fn create_tables(&self) -> StoreResult<()> {
        let s = |name: &str| attribute(name, ScalarAttributeType::S);
        let n = |name: &str| attribute(name, ScalarAttributeType::N);
        self.create_table(
            &self.connections,
            ("connection_id", None),
            vec![
                s("connection_id"),
                s("tenant_id"),
                s("tenant_user"),
                s("edge_id"),
            ],
            vec![
                index(
                    "by_tenant",
                    "tenant_id",
                    Some("connection_id"),
                    ProjectionType::All,
                )?,
                index(
                    "by_tenant_user",
                    "tenant_user",
                    Some("connection_id"),
                    ProjectionType::All,
                )?,
                index(
                    "by_edge",
                    "edge_id",
                    Some("connection_id"),
                    ProjectionType::KeysOnly,
                )?,
            ],
        )
        .await?;
        self.create_table(
            &self.edges,
            ("edge_id", None),
            vec![s("edge_id"), s("lease_shard"), n("lease_expires_at_ms")],
            vec![index(
                "by_lease",
                "lease_shard",
                Some("lease_expires_at_ms"),
                ProjectionType::All,
            )?],
        )
        .await?;
        self.create_table(
            &self.requests,
            ("id", None),
            vec![
                s("id"),
                s("unfinished"),
                n("created_at_ms"),
                s("pending_action"),
                s("leased"),
                n("lease_expires_at_ms"),
            ],
            vec![
                index(
                    "unfinished",
                    "unfinished",
                    Some("created_at_ms"),
                    ProjectionType::All,
                )?,
                index(
                    "pending",
                    "pending_action",
                    Some("created_at_ms"),
                    ProjectionType::All,
                )?,
                index(
                    "leased",
                    "leased",
                    Some("lease_expires_at_ms"),
                    ProjectionType::All,
                )?,
            ],
        )
        .await?;
        self.create_table(
            &self.subscriptions,
            ("topic_key", Some("connection_id")),
            vec![s("topic_key"), s("connection_id")],
            vec![],
        )
        .await?;
        self.create_table(
            &self.topics,
            ("topic_key", Some("topic_offset")),
            vec![s("topic_key"), n("topic_offset")],
            vec![],
        )
        .await?;
        self.create_table(&self.revoked, ("jti", None), vec![s("jti")], vec![])
            .await?;
        Ok(())
    }

    async fn create_table(
        &self,
        name: &str,
        (hash_key, range_key): (&str, Option<&str>),
        attributes: Vec<StoreResult<AttributeDefinition>>,
        indexes: Vec<GlobalSecondaryIndex>,
    ) -> StoreResult<()> {
        let attributes = attributes.into_iter().collect::<StoreResult<Vec<_>>>()?;
        let created = self
            .client
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(attributes))
            .set_key_schema(Some(
                std::iter::once(key(hash_key, KeyType::Hash))
                    .chain(range_key.map(|r| key(r, KeyType::Range)))
                    .collect::<StoreResult<Vec<_>>>()?,
            ))
            .set_global_secondary_indexes((!indexes.is_empty()).then_some(indexes))
            .send()
            .await;
        match created {
            Ok(_) => tracing::info!(table = name, "table created"),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                tracing::info!(table = name, "table exists");
            }
            Err(error) => return Err(classify(&format!("create table {name}"), error)),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let described = self
                .client
                .describe_table()
                .table_name(name)
                .send()
                .await
                .map_err(|e| classify(&format!("describe table {name}"), e))?;
            let status = described.table().and_then(|t| t.table_status().cloned());
            if status == Some(TableStatus::Active) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StoreError::backend(format!(
                    "table {name} is still {status:?} after two minutes"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let ttl = self
            .client
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name("expires_at")
                    .build()
                    .map_err(|e| StoreError::backend_from("TTL specification", e))?,
            )
            .send()
            .await;
        match ttl {
            Ok(_) => Ok(()),
            // Already on (DynamoDB refuses to turn it on twice).
            Err(error) if error.code() == Some("ValidationException") => Ok(()),
            Err(error) => Err(classify(&format!("turn on TTL of {name}"), error)),
        }
    }

    /// Up to `limit` items matching a key condition, in sort-key order,
    /// following DynamoDB's pages. Queries of the table itself read
    /// consistently; of an index (`index`), eventually (rule 2).
    async fn query(
        &self,
        table: &str,
        index: Option<&str>,
        condition: &str,
        values: Vec<(&str, AttributeValue)>,
        limit: usize,
    ) -> StoreResult<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        while items.len() < limit {
            let mut query = self
                .client
                .query()
                .table_name(table)
                .set_index_name(index.map(str::to_owned))
                .consistent_read(index.is_none())
                .key_condition_expression(condition)
                .set_exclusive_start_key(start.take())
                .limit(i32::try_from(limit - items.len()).unwrap_or(i32::MAX));
            for (name, value) in &values {
                query = query.expression_attribute_values(*name, value.clone());
            }
            let page = query
                .send()
                .await
                .map_err(|e| classify(&format!("query {table}"), e))?;
            items.extend(page.items().iter().cloned());
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(items)
    }

    /// Deletes a connection's subscription items (`topics` from its record).
    async fn delete_subscriptions(
        &self,
        tenant_id: &TenantId,
        connection_id: &ConnectionId,
        topics: &[String],
    ) -> StoreResult<()> {
        for topic in topics {
            self.client
                .delete_item()
                .table_name(&self.subscriptions)
                .key("topic_key", AttributeValue::S(topic_key(tenant_id, topic)))
                .key(
                    "connection_id",
                    AttributeValue::S(connection_id.to_string()),
                )
                .send()
                .await
                .map_err(|e| classify("delete a subscription", e))?;
        }
        Ok(())
    }

    /// A topic's position item (offset 0), if it has one.
    async fn read_position(&self, topic: &str) -> StoreResult<Option<TopicPosition>> {
        let item = self
            .client
            .get_item()
            .table_name(&self.topics)
            .key("topic_key", AttributeValue::S(topic.to_owned()))
            .key("topic_offset", number(0))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("read a topic", e))?
            .item;
        item.map(|item| {
            Ok(TopicPosition {
                epoch: string(&item, "topic_epoch")?,
                offset: integer(&item, "latest_offset")?,
            })
        })
        .transpose()
    }

    /// The keys of the items of `table` whose `attribute` is at most
    /// `bound`: a filtered scan, for the periodic sweeps only (rule 3).
    async fn scan_at_most(
        &self,
        table: &str,
        key_name: &str,
        attribute: &str,
        bound: u64,
    ) -> StoreResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(table)
                .filter_expression("#a <= :bound")
                .expression_attribute_names("#a", attribute)
                .expression_attribute_values(":bound", number(bound))
                .projection_expression("#k")
                .expression_attribute_names("#k", key_name)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify(&format!("scan {table}"), e))?;
            keys.extend(page.items().iter().filter_map(|i| string(i, key_name).ok()));
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(keys),
            }
        }
    }

    /// Deletes the item `key` of `table` if its `attribute` is still at
    /// most `bound`; whether it did.
    async fn delete_if_at_most(
        &self,
        table: &str,
        key_name: &str,
        key: String,
        attribute: &str,
        bound: u64,
    ) -> StoreResult<bool> {
        let deleted = self
            .client
            .delete_item()
            .table_name(table)
            .key(key_name, AttributeValue::S(key))
            .condition_expression("#a <= :bound")
            .expression_attribute_names("#a", attribute)
            .expression_attribute_values(":bound", number(bound))
            .send()
            .await;
        written(&format!("delete from {table}"), deleted)
    }

    /// The item of the requests table whose key is `id`: a request's id, or
    /// a client-id guard's ([`client_guard_id`]).
    async fn get_request_item(&self, id: &str) -> StoreResult<Option<Item>> {
        Ok(self
            .client
            .get_item()
            .table_name(&self.requests)
            .key("id", AttributeValue::S(id.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("get request", e))?
            .item)
    }
}

// ---- the SDK's setup ----

/// Counts every DynamoDB call, by API operation (`get_item`) and outcome, in
/// `streamer_dynamodb_calls_total`: on AWS each one is billed, so this is
/// what the store costs (retries of one call count once).
#[derive(Debug)]
struct Metered;

impl aws_sdk_dynamodb::config::Intercept for Metered {
    fn name(&self) -> &'static str {
        "streamer-metered"
    }

    fn read_after_execution(
        &self,
        context: &aws_sdk_dynamodb::config::interceptors::FinalizerInterceptorContextRef<'_>,
        _components: &aws_sdk_dynamodb::config::RuntimeComponents,
        cfg: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let operation = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map_or_else(|| "unknown".to_owned(), |m| snake_case(m.name()));
        let outcome = match context.output_or_error() {
            Some(Ok(_)) => "ok",
            _ => "error",
        };
        metrics::counter!(
            "streamer_dynamodb_calls_total",
            "operation" => operation,
            "outcome" => outcome
        )
        .increment(1);
        Ok(())
    }
}

/// An API operation's name as a label value: `GetItem` is `get_item`.
fn snake_case(name: &str) -> String {
    let mut snake = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    snake
}

fn http_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

fn retry_config() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(4)
        .with_initial_backoff(Duration::from_millis(50))
        .with_max_backoff(Duration::from_secs(2))
}

fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(3))
        .operation_timeout(Duration::from_secs(10))
        .build()
}

/// Rule 4: what a failed call means to the caller.
fn classify<E, R>(what: &str, error: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let transient = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => matches!(
            service.err().code(),
            Some(
                "ProvisionedThroughputExceededException"
                    | "ThrottlingException"
                    | "RequestLimitExceeded"
                    | "InternalServerError"
                    | "ServiceUnavailable"
                    | "TransactionInProgressException"
            )
        ),
        _ => false,
    };
    let message = format!(
        "{what}: {}",
        error.code().or(error.message()).unwrap_or("no detail")
    );
    if transient {
        StoreError::unavailable_from(message, error)
    } else {
        StoreError::backend_from(message, error)
    }
}

/// A conditional write's outcome: whether it was written (false: its
/// condition did not hold); any other failure is an error (rule 4).
fn written<T, E, R>(what: &str, result: Result<T, SdkError<E, R>>) -> StoreResult<bool>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(error) if error.code() == Some("ConditionalCheckFailedException") => Ok(false),
        Err(error) => Err(classify(what, error)),
    }
}

fn attribute(name: &str, kind: ScalarAttributeType) -> StoreResult<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(|e| StoreError::backend_from("attribute definition", e))
}

fn key(name: &str, kind: KeyType) -> StoreResult<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| StoreError::backend_from("key schema", e))
}

fn index(
    name: &str,
    hash: &str,
    range: Option<&str>,
    projection: ProjectionType,
) -> StoreResult<GlobalSecondaryIndex> {
    let mut schema = vec![key(hash, KeyType::Hash)?];
    if let Some(range) = range {
        schema.push(key(range, KeyType::Range)?);
    }
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .set_key_schema(Some(schema))
        .projection(Projection::builder().projection_type(projection).build())
        .build()
        .map_err(|e| StoreError::backend_from("index", e))
}

// ---- items ----

fn number(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn string(item: &Item, name: &str) -> StoreResult<String> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value.clone()),
        _ => Err(StoreError::backend(format!("item without string {name}"))),
    }
}

fn integer(item: &Item, name: &str) -> StoreResult<u64> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value
            .parse()
            .map_err(|e| StoreError::backend_from(format!("{name} is not an integer"), e)),
        _ => Err(StoreError::backend(format!("item without number {name}"))),
    }
}

fn json<T: serde::Serialize>(value: &T) -> StoreResult<AttributeValue> {
    serde_json::to_string(value)
        .map(AttributeValue::S)
        .map_err(|e| StoreError::backend_from("cannot encode a record", e))
}

fn from_json<T: serde::de::DeserializeOwned>(item: &Item) -> StoreResult<T> {
    serde_json::from_str(&string(item, "record")?)
        .map_err(|e| StoreError::backend_from("corrupt record", e))
}

fn epoch_seconds(ms: u64) -> AttributeValue {
    number(ms.div_ceil(1000))
}

fn tenant_user(tenant_id: &TenantId, user_id: &UserId) -> String {
    format!("{tenant_id}{SEP}{user_id}")
}

fn connection_item(record: &ConnectionRecord) -> StoreResult<Item> {
    Ok(HashMap::from([
        (
            "connection_id".into(),
            AttributeValue::S(record.connection_id.to_string()),
        ),
        (
            "tenant_id".into(),
            AttributeValue::S(record.tenant_id.to_string()),
        ),
        (
            "tenant_user".into(),
            AttributeValue::S(tenant_user(&record.tenant_id, &record.user_id)),
        ),
        (
            "edge_id".into(),
            AttributeValue::S(record.edge_id.to_string()),
        ),
        ("last_seen_ms".into(), number(record.last_seen_ms)),
        ("expires_at".into(), epoch_seconds(record.expires_at_ms())),
        ("record".into(), json(record)?),
    ]))
}

/// The record, with the activity a touch wrote beside it.
fn connection_of(item: &Item) -> StoreResult<ConnectionRecord> {
    let mut record: ConnectionRecord = from_json(item)?;
    record.last_seen_ms = integer(item, "last_seen_ms")?;
    Ok(record)
}

fn request_item(record: &RequestRecord) -> StoreResult<Item> {
    let mut item = HashMap::from([
        ("id".into(), AttributeValue::S(record.id.to_string())),
        ("version".into(), number(record.version)),
        ("created_at_ms".into(), number(record.created_at_ms)),
        ("expires_at".into(), epoch_seconds(record.expires_at_ms())),
        ("record".into(), json(record)?),
    ]);
    if record.is_unsettled() {
        item.insert("unfinished".into(), AttributeValue::S("1".into()));
    }
    if record.status == RequestStatus::Pending {
        item.insert(
            "pending_action".into(),
            AttributeValue::S(record.action.clone()),
        );
    }
    if let Some(lease) = record.held_until_ms() {
        item.insert("leased".into(), AttributeValue::S("1".into()));
        item.insert("lease_expires_at_ms".into(), number(lease));
    }
    Ok(item)
}

fn topic_key(tenant_id: &TenantId, topic: &str) -> String {
    format!("{tenant_id}{SEP}{topic}")
}

/// The topics a connection item lists as subscribed.
fn topics_of(item: &Item) -> Vec<String> {
    match item.get("topics") {
        Some(AttributeValue::Ss(topics)) => topics.clone(),
        _ => Vec::new(),
    }
}

fn edge_of(item: &Item) -> StoreResult<EdgeRecord> {
    Ok(EdgeRecord {
        edge_id: string(item, "edge_id")?.into(),
        started_at_ms: integer(item, "started_at_ms")?,
        heartbeat_at_ms: integer(item, "heartbeat_at_ms")?,
        lease_expires_at_ms: integer(item, "lease_expires_at_ms")?,
    })
}

/// How long an edge's record outlives its lease before DynamoDB's TTL
/// removes it (by then its connections have expired too).
const EDGE_RECORD_TTL: Duration = CONNECTION_TTL;

/// The one partition of the edges' lease index: edges are few (one item
/// per edge process), so one partition holds them all.
const EDGE_SHARD: &str = "edges";

fn client_guard_id(
    tenant_id: &TenantId,
    user_id: &UserId,
    client_request_id: &ClientRequestId,
) -> String {
    format!("client{SEP}{tenant_id}{SEP}{user_id}{SEP}{client_request_id}")
}

fn live_request(item: Option<Item>) -> StoreResult<Option<RequestRecord>> {
    let Some(item) = item else {
        return Ok(None);
    };
    let record: RequestRecord = from_json(&item)?;
    Ok((record.expires_at_ms() > now_ms()).then_some(record))
}

#[async_trait::async_trait]
impl Store for DynamoStore {
    async fn ping(&self) -> StoreResult<()> {
        for table in self.table_names() {
            self.client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|e| classify(&format!("describe table {table}"), e))?;
        }
        Ok(())
    }

    async fn flush(&self) -> StoreResult<()> {
        // Every write is durable when DynamoDB acknowledges it.
        Ok(())
    }
}

#[async_trait::async_trait]
impl ConnectionStore for DynamoStore {
    async fn put_connection(&self, record: ConnectionRecord) -> StoreResult<()> {
        // An update, not a put: the record's `topics` (its subscriptions)
        // stay when it is replaced.
        let mut item = connection_item(&record)?;
        item.remove("connection_id");
        let mut update = self.client.update_item().table_name(&self.connections).key(
            "connection_id",
            AttributeValue::S(record.connection_id.to_string()),
        );
        let mut sets = Vec::new();
        for (i, (name, value)) in item.into_iter().enumerate() {
            sets.push(format!("#a{i} = :a{i}"));
            update = update
                .expression_attribute_names(format!("#a{i}"), name)
                .expression_attribute_values(format!(":a{i}"), value);
        }
        update
            .update_expression(format!("SET {}", sets.join(", ")))
            .send()
            .await
            .map_err(|e| classify("put connection", e))?;
        Ok(())
    }

    async fn get_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let item = self
            .client
            .get_item()
            .table_name(&self.connections)
            .key(
                "connection_id",
                AttributeValue::S(connection_id.to_string()),
            )
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("get connection", e))?
            .item;
        let Some(item) = item else {
            return Ok(None);
        };
        let record = connection_of(&item)?;
        Ok((!record.is_expired(now_ms())).then_some(record))
    }

    async fn delete_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let old = self
            .client
            .delete_item()
            .table_name(&self.connections)
            .key(
                "connection_id",
                AttributeValue::S(connection_id.to_string()),
            )
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| classify("delete connection", e))?
            .attributes;
        match old.filter(|item| !item.is_empty()) {
            Some(item) => {
                let record = connection_of(&item)?;
                self.delete_subscriptions(&record.tenant_id, connection_id, &topics_of(&item))
                    .await?;
                Ok(Some(record))
            }
            None => Ok(None),
        }
    }

    async fn touch_connection(
        &self,
        connection_id: &ConnectionId,
        now_ms: u64,
    ) -> StoreResult<bool> {
        let expires = now_ms + CONNECTION_TTL.as_millis() as u64;
        let touched = self
            .client
            .update_item()
            .table_name(&self.connections)
            .key(
                "connection_id",
                AttributeValue::S(connection_id.to_string()),
            )
            .update_expression("SET last_seen_ms = :now, expires_at = :expires")
            .condition_expression("attribute_exists(connection_id)")
            .expression_attribute_values(":now", number(now_ms))
            .expression_attribute_values(":expires", epoch_seconds(expires))
            .send()
            .await;
        written("touch connection", touched)
    }

    async fn list_connections(
        &self,
        tenant_id: &TenantId,
        user_id: Option<&UserId>,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let (index, partition, value) = match user_id {
            Some(user) => (
                "by_tenant_user",
                "tenant_user",
                tenant_user(tenant_id, user),
            ),
            None => ("by_tenant", "tenant_id", tenant_id.to_string()),
        };
        let now = now_ms();
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        while out.len() < limit {
            let condition = match after {
                Some(_) => format!("{partition} = :p AND connection_id > :after"),
                None => format!("{partition} = :p"),
            };
            let mut query = self
                .client
                .query()
                .table_name(&self.connections)
                .index_name(index)
                .key_condition_expression(condition)
                .expression_attribute_values(":p", AttributeValue::S(value.clone()))
                .set_exclusive_start_key(start.take())
                .limit(i32::try_from(limit - out.len()).unwrap_or(i32::MAX));
            if let Some(after) = after {
                query = query
                    .expression_attribute_values(":after", AttributeValue::S(after.to_string()));
            }
            let page = query
                .send()
                .await
                .map_err(|e| classify("list connections", e))?;
            for item in page.items() {
                let record = connection_of(item)?;
                if !record.is_expired(now) && out.len() < limit {
                    out.push(record);
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn connections_of_edge(&self, edge_id: &EdgeId) -> StoreResult<Vec<ConnectionId>> {
        self.query(
            &self.connections,
            Some("by_edge"),
            "edge_id = :e",
            vec![(":e", AttributeValue::S(edge_id.to_string()))],
            usize::MAX,
        )
        .await?
        .iter()
        .map(|item| string(item, "connection_id").map(ConnectionId::from))
        .collect()
    }

    async fn connection_edges(&self) -> StoreResult<Vec<EdgeId>> {
        // At start only: a scan of the edge index's keys.
        let mut edges = std::collections::BTreeSet::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.connections)
                .index_name("by_edge")
                .projection_expression("edge_id")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("list edges", e))?;
            for item in page.items() {
                edges.insert(EdgeId::from(string(item, "edge_id")?));
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(edges.into_iter().collect()),
            }
        }
    }

    async fn sweep_connections(&self, now_ms: u64) -> StoreResult<usize> {
        let cutoff = now_ms.saturating_sub(CONNECTION_TTL.as_millis() as u64);
        let mut removed = 0;
        for id in self
            .scan_at_most(&self.connections, "connection_id", "last_seen_ms", cutoff)
            .await?
        {
            let id = ConnectionId::from(id);
            let deleted = self
                .client
                .delete_item()
                .table_name(&self.connections)
                .key("connection_id", AttributeValue::S(id.to_string()))
                .condition_expression("last_seen_ms <= :bound")
                .expression_attribute_values(":bound", number(cutoff))
                .return_values(ReturnValue::AllOld)
                .send()
                .await;
            let old = match deleted {
                Ok(output) => output.attributes,
                Err(error) if error.code() == Some("ConditionalCheckFailedException") => None,
                Err(error) => return Err(classify("sweep a connection", error)),
            };
            if let Some(item) = old.filter(|item| !item.is_empty()) {
                let tenant = TenantId::from(string(&item, "tenant_id")?);
                self.delete_subscriptions(&tenant, &id, &topics_of(&item))
                    .await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[async_trait::async_trait]
impl RequestStore for DynamoStore {
    async fn create_request(&self, record: RequestRecord) -> StoreResult<Created> {
        let guard = client_guard_id(
            &record.tenant_id,
            &record.user_id,
            &record.client_request_id,
        );
        let guard_expires = record.created_at_ms + 2 * REQUEST_TTL.as_millis() as u64;
        let put = |item: Item, key_name: &str| -> StoreResult<TransactWriteItem> {
            Ok(TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.requests)
                        .set_item(Some(item))
                        .condition_expression(format!("attribute_not_exists({key_name})"))
                        .build()
                        .map_err(|e| StoreError::backend_from("transaction item", e))?,
                )
                .build())
        };
        let guard_item = HashMap::from([
            ("id".to_owned(), AttributeValue::S(guard.clone())),
            (
                "request_id".to_owned(),
                AttributeValue::S(record.id.to_string()),
            ),
            ("expires_at".to_owned(), epoch_seconds(guard_expires)),
        ]);
        let written = self
            .client
            .transact_write_items()
            .transact_items(put(guard_item, "id")?)
            .transact_items(put(request_item(&record)?, "id")?)
            .send()
            .await;
        match written {
            Ok(_) => Ok(Created {
                record,
                duplicate: false,
            }),
            Err(error) => {
                let guard_taken = first_condition_failed(&error);
                if !guard_taken {
                    return Err(classify("create request", error));
                }
                match self
                    .find_request(
                        &record.tenant_id,
                        &record.user_id,
                        &record.client_request_id,
                    )
                    .await?
                {
                    Some(existing) => Ok(Created {
                        record: existing,
                        duplicate: true,
                    }),
                    // The guard outlived its request: a conflict the caller
                    // retries like any other.
                    None => Err(StoreError::Conflict),
                }
            }
        }
    }

    async fn get_request(&self, id: &RequestId) -> StoreResult<Option<RequestRecord>> {
        live_request(self.get_request_item(id.as_str()).await?)
    }

    async fn find_request(
        &self,
        tenant_id: &TenantId,
        user_id: &UserId,
        client_request_id: &ClientRequestId,
    ) -> StoreResult<Option<RequestRecord>> {
        let guard = self
            .get_request_item(&client_guard_id(tenant_id, user_id, client_request_id))
            .await?;
        match guard {
            Some(guard) => {
                self.get_request(&RequestId::from(string(&guard, "request_id")?))
                    .await
            }
            None => Ok(None),
        }
    }

    async fn update_request(
        &self,
        mut record: RequestRecord,
        _durability: Durability,
    ) -> StoreResult<RequestRecord> {
        let expected = record.version;
        record.version += 1;
        let result = self
            .client
            .put_item()
            .table_name(&self.requests)
            .set_item(Some(request_item(&record)?))
            .condition_expression("version = :expected")
            .expression_attribute_values(":expected", number(expected))
            .send()
            .await;
        if written("update request", result)? {
            Ok(record)
        } else {
            Err(StoreError::Conflict)
        }
    }

    async fn unfinished_requests(&self) -> StoreResult<Vec<RequestRecord>> {
        self.query(
            &self.requests,
            Some("unfinished"),
            "unfinished = :yes",
            vec![(":yes", AttributeValue::S("1".into()))],
            usize::MAX,
        )
        .await?
        .iter()
        .map(from_json)
        .collect()
    }

    async fn pending_requests(
        &self,
        action: &str,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        self.query(
            &self.requests,
            Some("pending"),
            "pending_action = :a",
            vec![(":a", AttributeValue::S(action.to_owned()))],
            limit,
        )
        .await?
        .iter()
        .map(from_json)
        .collect()
    }

    async fn lapsed_leases(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<RequestRecord>> {
        self.query(
            &self.requests,
            Some("leased"),
            "leased = :yes AND lease_expires_at_ms <= :now",
            vec![
                (":yes", AttributeValue::S("1".into())),
                (":now", number(now_ms)),
            ],
            limit,
        )
        .await?
        .iter()
        .map(from_json)
        .collect()
    }
}

#[async_trait::async_trait]
impl TokenStore for DynamoStore {
    async fn revoke_token(&self, jti: &str, expires_at_ms: u64) -> StoreResult<()> {
        let result = self
            .client
            .put_item()
            .table_name(&self.revoked)
            .item("jti", AttributeValue::S(jti.to_owned()))
            .item("expires_at_ms", number(expires_at_ms))
            .item("expires_at", epoch_seconds(expires_at_ms))
            .condition_expression("attribute_not_exists(jti) OR expires_at_ms < :e")
            .expression_attribute_values(":e", number(expires_at_ms))
            .send()
            .await;
        // A later expiry already recorded is kept.
        written("revoke token", result).map(drop)
    }

    async fn is_token_revoked(&self, jti: &str, now_ms: u64) -> StoreResult<bool> {
        let item = self
            .client
            .get_item()
            .table_name(&self.revoked)
            .key("jti", AttributeValue::S(jti.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("read the deny-list", e))?
            .item;
        match item {
            Some(item) => Ok(integer(&item, "expires_at_ms")? > now_ms),
            None => Ok(false),
        }
    }

    async fn sweep_revoked_tokens(&self, now_ms: u64) -> StoreResult<usize> {
        let mut removed = 0;
        for jti in self
            .scan_at_most(&self.revoked, "jti", "expires_at_ms", now_ms)
            .await?
        {
            if self
                .delete_if_at_most(&self.revoked, "jti", jti, "expires_at_ms", now_ms)
                .await?
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[async_trait::async_trait]
impl EdgeStore for DynamoStore {
    async fn heartbeat_edge(
        &self,
        edge_id: &EdgeId,
        now_ms: u64,
        lease: Duration,
    ) -> StoreResult<Heartbeat> {
        let until = now_ms + lease.as_millis() as u64;
        let expires = epoch_seconds(until + EDGE_RECORD_TTL.as_millis() as u64);
        // Two conditional writes, retried when another heartbeat of the same
        // edge changed the record in between: extend a live lease, or start
        // one where none is live.
        for _ in 0..4 {
            let extended = self
                .client
                .update_item()
                .table_name(&self.edges)
                .key("edge_id", AttributeValue::S(edge_id.to_string()))
                .update_expression(
                    "SET heartbeat_at_ms = :now, lease_expires_at_ms = :until, expires_at = :x",
                )
                .condition_expression(
                    "lease_expires_at_ms > :now AND lease_expires_at_ms <= :until",
                )
                .expression_attribute_values(":now", number(now_ms))
                .expression_attribute_values(":until", number(until))
                .expression_attribute_values(":x", expires.clone())
                .send()
                .await;
            if written("extend an edge lease", extended)? {
                return Ok(Heartbeat::Extended);
            }
            let started = self
                .client
                .put_item()
                .table_name(&self.edges)
                .item("edge_id", AttributeValue::S(edge_id.to_string()))
                .item("lease_shard", AttributeValue::S(EDGE_SHARD.into()))
                .item("started_at_ms", number(now_ms))
                .item("heartbeat_at_ms", number(now_ms))
                .item("lease_expires_at_ms", number(until))
                .item("expires_at", expires.clone())
                .condition_expression(
                    "attribute_not_exists(edge_id) OR lease_expires_at_ms <= :now",
                )
                .expression_attribute_values(":now", number(now_ms))
                .send()
                .await;
            if written("start an edge lease", started)? {
                return Ok(Heartbeat::Started);
            }
            // Neither: the lease is live and already runs past `until`.
            if self
                .get_edge(edge_id)
                .await?
                .is_some_and(|edge| edge.lease_expires_at_ms > until)
            {
                return Ok(Heartbeat::Extended);
            }
        }
        Err(StoreError::Conflict)
    }

    async fn get_edge(&self, edge_id: &EdgeId) -> StoreResult<Option<EdgeRecord>> {
        self.client
            .get_item()
            .table_name(&self.edges)
            .key("edge_id", AttributeValue::S(edge_id.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("get edge", e))?
            .item
            .map(|item| edge_of(&item))
            .transpose()
    }

    async fn lapsed_edges(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<EdgeRecord>> {
        self.query(
            &self.edges,
            Some("by_lease"),
            "lease_shard = :shard AND lease_expires_at_ms <= :now",
            vec![
                (":shard", AttributeValue::S(EDGE_SHARD.into())),
                (":now", number(now_ms)),
            ],
            limit,
        )
        .await?
        .iter()
        .map(edge_of)
        .collect()
    }

    async fn remove_edge(&self, edge_id: &EdgeId, lease_expires_at_ms: u64) -> StoreResult<bool> {
        let removed = self
            .client
            .delete_item()
            .table_name(&self.edges)
            .key("edge_id", AttributeValue::S(edge_id.to_string()))
            .condition_expression("lease_expires_at_ms = :lease")
            .expression_attribute_values(":lease", number(lease_expires_at_ms))
            .send()
            .await;
        written("remove an edge", removed)
    }

    async fn release_edge(&self, edge_id: &EdgeId) -> StoreResult<()> {
        self.client
            .delete_item()
            .table_name(&self.edges)
            .key("edge_id", AttributeValue::S(edge_id.to_string()))
            .send()
            .await
            .map_err(|e| classify("release an edge", e))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl SubscriptionStore for DynamoStore {
    async fn subscribe(&self, subscription: Subscription) -> StoreResult<bool> {
        // One transaction: the topic added to the connection's `topics` (on
        // the condition that it is live and of that tenant) and the
        // subscription item, so a connection deleted meanwhile either takes
        // the subscription with it or was never subscribed.
        let cutoff = now_ms().saturating_sub(CONNECTION_TTL.as_millis() as u64);
        let mark = Update::builder()
            .table_name(&self.connections)
            .key(
                "connection_id",
                AttributeValue::S(subscription.connection_id.to_string()),
            )
            .update_expression("ADD topics :topic")
            .condition_expression(
                "attribute_exists(connection_id) AND tenant_id = :tenant AND last_seen_ms > :cutoff",
            )
            .expression_attribute_values(":topic", AttributeValue::Ss(vec![subscription.topic.clone()]))
            .expression_attribute_values(":tenant", AttributeValue::S(subscription.tenant_id.to_string()))
            .expression_attribute_values(":cutoff", number(cutoff))
            .build()
            .map_err(|e| StoreError::backend_from("transaction item", e))?;
        let item = Update::builder()
            .table_name(&self.subscriptions)
            .key(
                "topic_key",
                AttributeValue::S(topic_key(&subscription.tenant_id, &subscription.topic)),
            )
            .key(
                "connection_id",
                AttributeValue::S(subscription.connection_id.to_string()),
            )
            // Subscribing again keeps the first record.
            .update_expression("SET #record = if_not_exists(#record, :record)")
            .expression_attribute_names("#record", "record")
            .expression_attribute_values(":record", json(&subscription)?)
            .build()
            .map_err(|e| StoreError::backend_from("transaction item", e))?;
        let written = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(mark).build())
            .transact_items(TransactWriteItem::builder().update(item).build())
            .send()
            .await;
        match written {
            Ok(_) => Ok(true),
            Err(error) if first_condition_failed(&error) => Ok(false),
            Err(error) => Err(classify("subscribe", error)),
        }
    }

    async fn unsubscribe(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        connection_id: &ConnectionId,
    ) -> StoreResult<bool> {
        let old = self
            .client
            .delete_item()
            .table_name(&self.subscriptions)
            .key("topic_key", AttributeValue::S(topic_key(tenant_id, topic)))
            .key(
                "connection_id",
                AttributeValue::S(connection_id.to_string()),
            )
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| classify("unsubscribe", e))?
            .attributes;
        // The connection's list of topics only tells a deletion what to
        // remove: a topic left in it by a failure here costs one needless
        // delete later, never a delivery.
        let unmarked = self
            .client
            .update_item()
            .table_name(&self.connections)
            .key(
                "connection_id",
                AttributeValue::S(connection_id.to_string()),
            )
            .update_expression("DELETE topics :topic")
            .condition_expression("attribute_exists(connection_id)")
            .expression_attribute_values(":topic", AttributeValue::Ss(vec![topic.to_owned()]))
            .send()
            .await;
        written("unsubscribe", unmarked)?;
        Ok(old.is_some_and(|item| !item.is_empty()))
    }

    async fn subscribers(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<Subscription>> {
        let mut values = vec![(":t", AttributeValue::S(topic_key(tenant_id, topic)))];
        let condition = match after {
            Some(after) => {
                values.push((":after", AttributeValue::S(after.to_string())));
                "topic_key = :t AND connection_id > :after"
            }
            None => "topic_key = :t",
        };
        self.query(&self.subscriptions, None, condition, values, limit)
            .await?
            .iter()
            .map(from_json)
            .collect()
    }

    async fn subscriptions_of(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Vec<Subscription>> {
        let item = self
            .client
            .get_item()
            .table_name(&self.connections)
            .key(
                "connection_id",
                AttributeValue::S(connection_id.to_string()),
            )
            .projection_expression("tenant_id, topics")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("get connection", e))?
            .item;
        let Some(item) = item else {
            return Ok(Vec::new());
        };
        let tenant = TenantId::from(string(&item, "tenant_id")?);
        let mut topics = topics_of(&item);
        topics.sort();
        let mut out = Vec::new();
        for topic in topics {
            let found = self
                .client
                .get_item()
                .table_name(&self.subscriptions)
                .key("topic_key", AttributeValue::S(topic_key(&tenant, &topic)))
                .key(
                    "connection_id",
                    AttributeValue::S(connection_id.to_string()),
                )
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| classify("get a subscription", e))?
                .item;
            if let Some(found) = found {
                out.push(from_json(&found)?);
            }
        }
        Ok(out)
    }
}

/// Whether a transaction was cancelled because its first item's condition
/// failed.
fn first_condition_failed<R>(
    error: &SdkError<aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError, R>,
) -> bool {
    matches!(
        error.as_service_error(),
        Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c))
            if c.cancellation_reasons().first().and_then(|r| r.code()) == Some("ConditionalCheckFailed")
    )
}

#[async_trait::async_trait]
impl TopicStore for DynamoStore {
    async fn append_topic(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        payload: serde_json::Value,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<TopicPosition> {
        let key = topic_key(tenant_id, topic);
        let message_expires = epoch_seconds(now_ms + retention.max_age.as_millis() as u64);
        // The position outlives its messages by a day: a topic idle longer
        // than that starts a new epoch, which its clients are told.
        let position_expires = epoch_seconds(
            now_ms + retention.max_age.as_millis() as u64 + CONNECTION_TTL.as_millis() as u64,
        );
        // Offsets are contiguous: the position moves from n to n + 1 on the
        // condition that it is still n, in one transaction with message
        // n + 1. Concurrent appends to one topic retry with a short jittered
        // pause until each has its own offset.
        for attempt in 0..64u32 {
            let current = self.read_position(&key).await?;
            let (epoch, offset) = match &current {
                Some(position) => (position.epoch.clone(), position.offset + 1),
                None => (super::new_epoch(), 1),
            };
            let mut advance = Put::builder()
                .table_name(&self.topics)
                .item("topic_key", AttributeValue::S(key.clone()))
                .item("topic_offset", number(0))
                .item("topic_epoch", AttributeValue::S(epoch.clone()))
                .item("latest_offset", number(offset))
                .item("expires_at", position_expires.clone());
            advance = match &current {
                Some(position) => advance
                    .condition_expression("topic_epoch = :epoch AND latest_offset = :latest")
                    .expression_attribute_values(
                        ":epoch",
                        AttributeValue::S(position.epoch.clone()),
                    )
                    .expression_attribute_values(":latest", number(position.offset)),
                None => advance.condition_expression("attribute_not_exists(topic_key)"),
            };
            let message = TopicMessage {
                offset,
                payload: payload.clone(),
                published_at_ms: now_ms,
            };
            let put_message = Put::builder()
                .table_name(&self.topics)
                .item("topic_key", AttributeValue::S(key.clone()))
                .item("topic_offset", number(offset))
                .item("record", json(&message)?)
                .item("expires_at", message_expires.clone())
                .build()
                .map_err(|e| StoreError::backend_from("transaction item", e))?;
            let written = self
                .client
                .transact_write_items()
                .transact_items(
                    TransactWriteItem::builder()
                        .put(
                            advance
                                .build()
                                .map_err(|e| StoreError::backend_from("transaction item", e))?,
                        )
                        .build(),
                )
                .transact_items(TransactWriteItem::builder().put(put_message).build())
                .send()
                .await;
            match written {
                Ok(_) => {
                    // What the count no longer keeps: older ones went with
                    // earlier appends, and age is DynamoDB's TTL's job.
                    let oldest = retention.oldest_kept(offset);
                    if oldest > 1 {
                        self.client
                            .delete_item()
                            .table_name(&self.topics)
                            .key("topic_key", AttributeValue::S(key.clone()))
                            .key("topic_offset", number(oldest - 1))
                            .send()
                            .await
                            .map_err(|e| classify("trim a topic", e))?;
                    }
                    return Ok(TopicPosition { epoch, offset });
                }
                Err(error) if first_condition_failed(&error) => {
                    let pause = 2 + u64::from(attempt.min(8)) * 3;
                    let jitter = rand_below(pause);
                    tokio::time::sleep(Duration::from_millis(pause + jitter)).await;
                }
                Err(error) => return Err(classify("append to a topic", error)),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn topic_position(
        &self,
        tenant_id: &TenantId,
        topic: &str,
    ) -> StoreResult<TopicPosition> {
        let key = topic_key(tenant_id, topic);
        loop {
            if let Some(position) = self.read_position(&key).await? {
                return Ok(position);
            }
            let position = TopicPosition {
                epoch: super::new_epoch(),
                offset: 0,
            };
            let made = self
                .client
                .put_item()
                .table_name(&self.topics)
                .item("topic_key", AttributeValue::S(key.clone()))
                .item("topic_offset", number(0))
                .item("topic_epoch", AttributeValue::S(position.epoch.clone()))
                .item("latest_offset", number(0))
                .item(
                    "expires_at",
                    epoch_seconds(now_ms() + CONNECTION_TTL.as_millis() as u64),
                )
                .condition_expression("attribute_not_exists(topic_key)")
                .send()
                .await;
            if written("make a topic", made)? {
                return Ok(position);
            }
            // Another caller made it first: read theirs.
        }
    }

    async fn topic_since(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        since: &TopicPosition,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<Recovery> {
        let position = self.topic_position(tenant_id, topic).await?;
        let mut read = Vec::new();
        if since.epoch == position.epoch && since.offset < position.offset {
            read = self
                .query(
                    &self.topics,
                    None,
                    "topic_key = :t AND topic_offset BETWEEN :from AND :to",
                    vec![
                        (":t", AttributeValue::S(topic_key(tenant_id, topic))),
                        (":from", number(since.offset + 1)),
                        (":to", number(position.offset)),
                    ],
                    usize::MAX,
                )
                .await?
                .iter()
                .map(from_json)
                .collect::<StoreResult<Vec<TopicMessage>>>()?;
        }
        Ok(Recovery::of(position, since, read, retention, now_ms))
    }
}

/// A random number below `bound` (at least 1), for jitter.
fn rand_below(bound: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish() % bound.max(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_operations_are_labelled_in_snake_case() {
        assert_eq!(super::snake_case("GetItem"), "get_item");
        assert_eq!(
            super::snake_case("TransactWriteItems"),
            "transact_write_items"
        );
        assert_eq!(super::snake_case("Query"), "query");
    }
}
