//! The store-cost scenario: the DynamoDB calls each product operation makes,
//! and the request units they would be billed on AWS (on-demand).
//!
//! The system runs in this process on the DynamoDB store, on tables of a
//! local moto server (the one the tests use), and the scenario drives it
//! through phases, one product operation at a time: clients connect, tenant
//! broadcasts (at each tenant size), one user's connections listed, `Send`
//! to one connection, requests run from submit to their client's
//! `complete`, clients disconnect, then the system idles. After each phase
//! it waits until the store has been quiet, so what a phase set off is
//! counted in it.
//!
//! What is measured. Every call goes through a small HTTP relay in front of
//! moto that records it: API, table, index, outcome, the items read, and
//! for every write the item before and after (the relay reads both from
//! moto around the write; writes pass it one at a time, so nothing comes
//! between). The store's own counter, `streamer_dynamodb_calls_total`, must
//! move by the same calls; each phase checks it. Calls are sorted by what
//! they are (see [`Kind`]): health pings (`DescribeTable`), sweeps (`Scan`)
//! and the other periodic calls ([`BACKGROUND_TARGETS`]) never count
//! against an operation, nor do touches (a connection's keep-alive write,
//! a cost per connection and minute), which are reported apart.
//!
//! What is derived. The request units, from those records and the on-demand
//! rules (see [`Cost`]); and the per-operation figures, which are a phase's
//! totals divided by its operations.
//!
//! The same phases then run on moto without the relay and on the embedded
//! store, for their timings. moto serves one request at a time: its
//! latencies say nothing about DynamoDB's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use streamer::StoreChoice;
use streamer_api::v1::{self, connection_service_client::ConnectionServiceClient};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::DynamoStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

use super::{
    ACTION, Args, MAX_IN_PROCESS_CLIENTS, ProcessorCounters, Scenario, Summary, Target, Ws,
    json_payload, next_json, per_second, spawn_processor,
};

/// The calls of the table's columns; any other is "other".
const COLUMNS: [&str; 6] = [
    "GetItem",
    "Query",
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "TransactWriteItems",
];

/// Tables and indexes only periodic tasks use: the edges' leases (renewed
/// every 10 s, lapsed ones looked for as often) and ProgressService's store
/// poller (pending work of its processors' actions and lapsed leases,
/// every 500 ms).
const BACKGROUND_TARGETS: [&str; 4] = [
    "edges",
    "edges[by_lease]",
    "requests[pending]",
    "requests[leased]",
];

/// How long the store must be quiet (no operation call) before an audited
/// phase ends, with `--bench`.
const AUDITED_QUIET: Duration = Duration::from_secs(7);

/// How long a phase waits for the store to be quiet before it gives up
/// (and reports it: a periodic call this scenario does not know?).
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// Connects in flight at once: moto serves one call at a time, and the edge
/// gives a connect's control-plane calls 3 s.
const MAX_CONNECTING: usize = 8;

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- request units (derived) -------------------------------------------------

/// Request units, by DynamoDB's on-demand rules:
///
/// - a read (`GetItem`, a `Query` page) costs 1 RRU per 4 KB read (at least
///   one), half of that when eventually consistent (every index query);
///   the size of a `Query` is the sum of the items it returns (a `Scan`'s
///   figure is a floor: it is billed for every item it reads, and only
///   those it returns are seen);
/// - a write (`PutItem`, `UpdateItem`, `DeleteItem`) costs 1 WRU per KB of
///   the larger of the item before and after (at least one; a write whose
///   condition failed costs the same), plus, for each global secondary
///   index, 1 WRU per KB of the projected item when the item enters or
///   leaves the index, or stays with projected attributes changed, and 2
///   when it moves to another index key (a delete and a put);
/// - each item of `TransactWriteItems` costs twice the table write; its
///   index writes are counted as ordinary ones (an assumption);
/// - `DescribeTable` and the other control-plane calls are not billed.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    rru: f64,
    /// Table and index writes together.
    wru: f64,
    /// The index writes within `wru`.
    gsi_wru: f64,
    /// The largest item read or written, in bytes (DynamoDB's measure).
    largest: u64,
}

impl Cost {
    fn add(&mut self, other: Cost) {
        self.rru += other.rru;
        self.wru += other.wru;
        self.gsi_wru += other.gsi_wru;
        self.largest = self.largest.max(other.largest);
    }

    /// A read of `bytes` in all, whose largest item is `largest`.
    fn read(bytes: u64, largest: u64, consistent: bool) -> Self {
        let units = bytes.div_ceil(4096).max(1) as f64;
        Self {
            rru: if consistent { units } else { units / 2.0 },
            largest,
            ..Self::default()
        }
    }
}

fn write_units(bytes: u64) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}

/// An item's size as DynamoDB counts it: attribute names plus values.
fn item_size(item: &Map<String, Value>) -> u64 {
    item.iter()
        .map(|(name, value)| name.len() as u64 + value_size(value))
        .sum()
}

fn value_size(value: &Value) -> u64 {
    let Some((kind, v)) = value.as_object().and_then(|o| o.iter().next()) else {
        return 0;
    };
    let strings = || v.as_array().into_iter().flatten().filter_map(Value::as_str);
    match kind.as_str() {
        "S" => v.as_str().map_or(0, |s| s.len() as u64),
        "N" => v.as_str().map_or(0, number_size),
        "B" => v.as_str().map_or(0, |s| s.len() as u64 * 3 / 4),
        "BOOL" | "NULL" => 1,
        "SS" => strings().map(|s| s.len() as u64).sum(),
        "NS" => strings().map(number_size).sum(),
        "BS" => strings().map(|s| s.len() as u64 * 3 / 4).sum(),
        "M" => {
            3 + v.as_object().map_or(0, |m| {
                m.iter()
                    .map(|(k, v)| k.len() as u64 + value_size(v) + 1)
                    .sum()
            })
        }
        "L" => {
            3 + v
                .as_array()
                .map_or(0, |l| l.iter().map(|v| value_size(v) + 1).sum())
        }
        _ => 0,
    }
}

/// A number: one byte per two significant digits, plus one.
fn number_size(text: &str) -> u64 {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len() as u64;
    significant.div_ceil(2) + 1
}

// ---- the relay ---------------------------------------------------------------

/// A table's keys and indexes, as moto describes them.
struct Table {
    keys: Vec<String>,
    indexes: Vec<Index>,
}

struct Index {
    keys: Vec<String>,
    /// None: every attribute (`ALL`); else the non-key attributes it keeps.
    projected: Option<Vec<String>>,
}

impl Index {
    /// The item's entry in this index (its index key and projected item),
    /// or None when the item lacks an index key attribute (a sparse index).
    fn entry(
        &self,
        item: &Map<String, Value>,
        table_keys: &[String],
    ) -> Option<(Vec<Value>, Map<String, Value>)> {
        let key = self
            .keys
            .iter()
            .map(|k| item.get(k).cloned())
            .collect::<Option<Vec<_>>>()?;
        let projected = match &self.projected {
            None => item.clone(),
            Some(extra) => item
                .iter()
                .filter(|(name, _)| {
                    self.keys.contains(name) || table_keys.contains(name) || extra.contains(name)
                })
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        };
        Some((key, projected))
    }

    /// What a write that turns `before` into `after` costs this index.
    fn write_cost(
        &self,
        table_keys: &[String],
        before: Option<&Map<String, Value>>,
        after: Option<&Map<String, Value>>,
    ) -> f64 {
        let entry =
            |item: Option<&Map<String, Value>>| item.and_then(|i| self.entry(i, table_keys));
        match (entry(before), entry(after)) {
            (None, None) => 0.0,
            (Some((_, old)), None) => write_units(item_size(&old)),
            (None, Some((_, new))) => write_units(item_size(&new)),
            (Some((old_key, old)), Some((new_key, new))) if old_key != new_key => {
                write_units(item_size(&old)) + write_units(item_size(&new))
            }
            (Some((_, old)), Some((_, new))) if old != new => write_units(item_size(&new)),
            _ => 0.0,
        }
    }
}

/// Whose a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An operation's.
    Operation,
    /// A connection's keep-alive: an `UpdateItem` of only `last_seen_ms`
    /// and `expires_at`, which ConnectionService writes when a connection
    /// in use was last seen over a minute ago. What it costs is per
    /// connection and minute, not per operation.
    Touch,
    /// No operation's: health pings (`DescribeTable`), sweeps (`Scan`),
    /// and the periodic calls of [`BACKGROUND_TARGETS`].
    Background,
}

/// One call as the relay saw it.
struct Call {
    api: String,
    /// Its table, without the run's prefix (tables joined by `+` for a
    /// transaction), and `[index]` when it read one.
    target: String,
    kind: Kind,
    /// The key a touch wrote.
    touched: Option<String>,
    /// The error DynamoDB answered, if any.
    error: Option<String>,
    cost: Cost,
}

impl Call {
    fn signature(&self) -> String {
        match &self.error {
            None => format!("{} {}", self.api, self.target),
            Some(error) => format!("{} {} ({error})", self.api, self.target),
        }
    }
}

/// An HTTP relay in front of moto that records every call (see the module
/// doc). The SDK speaks HTTP/1.1 with a `Content-Length` body; moto answers
/// HTTP/1.0 and closes, so each request is one upstream connection.
struct Relay {
    url: String,
    upstream: SocketAddr,
    prefix: String,
    tables: Mutex<HashMap<String, Table>>,
    log: Mutex<Vec<Call>>,
    /// Writes pass one at a time, so the items read around one are its own.
    writes: tokio::sync::Mutex<()>,
    /// Operation (not background) calls being relayed, and when the last
    /// one ended: the phases wait for the store to be quiet.
    busy: AtomicU64,
    last_call: Mutex<Instant>,
    accept: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Relay {
    async fn start(endpoint: &str, prefix: &str) -> anyhow::Result<Arc<Self>> {
        let upstream: SocketAddr = endpoint
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("moto's endpoint {endpoint} is not host:port"))?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let relay = Arc::new(Self {
            url: format!("http://{}", listener.local_addr()?),
            upstream,
            prefix: prefix.to_owned(),
            tables: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            writes: tokio::sync::Mutex::new(()),
            busy: AtomicU64::new(0),
            last_call: Mutex::new(Instant::now()),
            accept: Mutex::new(None),
        });
        let serving = relay.clone();
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let relay = serving.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay.serve(socket).await {
                        eprintln!("store-cost relay: {e:#}");
                    }
                });
            }
        });
        *locked(&relay.accept) = Some(accept.abort_handle());
        Ok(relay)
    }

    fn stop(&self) {
        if let Some(accept) = locked(&self.accept).take() {
            accept.abort();
        }
    }

    /// Learns the tables' keys and indexes (once they exist).
    async fn learn(&self, names: &[&str]) -> anyhow::Result<()> {
        for name in names {
            let described = self
                .ask("DescribeTable", &json!({ "TableName": name }))
                .await?;
            let table = &described["Table"];
            let keys = |schema: &Value| -> Vec<String> {
                schema
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k["AttributeName"].as_str().map(str::to_owned))
                    .collect()
            };
            let indexes = table["GlobalSecondaryIndexes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|index| Index {
                    keys: keys(&index["KeySchema"]),
                    projected: match index["Projection"]["ProjectionType"].as_str() {
                        Some("ALL") => None,
                        _ => Some(
                            index["Projection"]["NonKeyAttributes"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|a| a.as_str().map(str::to_owned))
                                .collect(),
                        ),
                    },
                })
                .collect();
            let entry = Table {
                keys: keys(&table["KeySchema"]),
                indexes,
            };
            locked(&self.tables).insert((*name).to_owned(), entry);
        }
        Ok(())
    }

    fn short(&self, table: &str) -> String {
        table.strip_prefix(&self.prefix).unwrap_or(table).to_owned()
    }

    /// Calls moto directly (not through the store, so not counted).
    async fn ask(&self, api: &str, body: &Value) -> anyhow::Result<Value> {
        let body = body.to_string();
        let request = format!(
            "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-amz-json-1.0\r\n\
             X-Amz-Target: DynamoDB_20120810.{api}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=local/20200101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.upstream,
            body.len()
        );
        let response = exchange(self.upstream, request.as_bytes()).await?;
        let (status, reply) = parse_response(&response);
        if status != 200 {
            bail!("moto answered {api} with {status}: {reply}");
        }
        Ok(reply)
    }

    async fn serve(self: Arc<Self>, mut socket: TcpStream) -> anyhow::Result<()> {
        let mut buffer = Vec::new();
        while let Some((request, head)) = read_request(&mut socket, &mut buffer).await? {
            let response = self.relay(&request, head).await?;
            socket.write_all(&response).await?;
        }
        Ok(())
    }

    async fn relay(&self, request: &[u8], head: usize) -> anyhow::Result<Vec<u8>> {
        let head_text = std::str::from_utf8(&request[..head])?;
        let api = header(head_text, "x-amz-target")
            .and_then(|t| t.rsplit('.').next())
            .unwrap_or("unknown")
            .to_owned();
        let body: Value = serde_json::from_slice(&request[head..]).unwrap_or(Value::Null);
        let writes = self.written_keys(&api, &body);
        let mut tables: BTreeSet<String> = writes.iter().map(|(t, _)| self.short(t)).collect();
        if let Some(table) = body["TableName"].as_str() {
            tables.insert(self.short(table));
        }
        let mut target = tables.into_iter().collect::<Vec<_>>().join("+");
        if let Some(index) = body["IndexName"].as_str() {
            target.push_str(&format!("[{index}]"));
        }
        let kind = if matches!(
            api.as_str(),
            "DescribeTable" | "Scan" | "CreateTable" | "UpdateTimeToLive" | "ListTables"
        ) || BACKGROUND_TARGETS.contains(&target.as_str())
        {
            Kind::Background
        } else if api == "UpdateItem" && sets_only(&body, &["expires_at", "last_seen_ms"]) {
            Kind::Touch
        } else {
            Kind::Operation
        };
        let background = kind == Kind::Background;
        if !background {
            self.busy.fetch_add(1, Ordering::SeqCst);
        }
        let relayed = async {
            let turn = if writes.is_empty() {
                None
            } else {
                Some(self.writes.lock().await)
            };
            let before = self.images(&writes).await;
            let response = exchange(self.upstream, request).await?;
            let after = self.images(&writes).await;
            drop(turn);
            let (status, reply) = parse_response(&response);
            let error = (status != 200).then(|| {
                let kind = reply["__type"].as_str().unwrap_or("error");
                kind.rsplit('#').next().unwrap_or(kind).to_owned()
            });
            let cost = self.cost(&api, &body, &reply, &writes, &before, &after);
            let touched = (kind == Kind::Touch).then(|| body["Key"].to_string());
            locked(&self.log).push(Call {
                api,
                target,
                kind,
                touched,
                error,
                cost,
            });
            anyhow::Ok(response)
        }
        .await;
        if !background {
            *locked(&self.last_call) = Instant::now();
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
        relayed
    }

    /// How long no operation call has been in flight (zero while one is).
    fn quiet_for(&self) -> Duration {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        locked(&self.last_call).elapsed()
    }

    /// The items a write request changes: (table, key) each.
    fn written_keys(&self, api: &str, body: &Value) -> Vec<(String, Map<String, Value>)> {
        let one = |spec: &Value| -> Option<(String, Map<String, Value>)> {
            let table = spec["TableName"].as_str()?.to_owned();
            let key = match spec["Item"].as_object() {
                Some(item) => {
                    let tables = locked(&self.tables);
                    let keys = &tables.get(&table)?.keys;
                    item.iter()
                        .filter(|(name, _)| keys.contains(name))
                        .map(|(name, value)| (name.clone(), value.clone()))
                        .collect()
                }
                None => spec["Key"].as_object()?.clone(),
            };
            Some((table, key))
        };
        match api {
            "PutItem" | "UpdateItem" | "DeleteItem" => one(body).into_iter().collect(),
            "TransactWriteItems" => body["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| {
                    ["Put", "Update", "Delete", "ConditionCheck"]
                        .iter()
                        .find_map(|kind| item.get(*kind))
                        .and_then(one)
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The current items at these keys (None: absent, or unreadable).
    async fn images(
        &self,
        keys: &[(String, Map<String, Value>)],
    ) -> Vec<Option<Map<String, Value>>> {
        let mut items = Vec::with_capacity(keys.len());
        for (table, key) in keys {
            let read = self
                .ask(
                    "GetItem",
                    &json!({ "TableName": table, "Key": key, "ConsistentRead": true }),
                )
                .await;
            items.push(read.ok().and_then(|r| r["Item"].as_object().cloned()));
        }
        items
    }

    fn cost(
        &self,
        api: &str,
        body: &Value,
        reply: &Value,
        writes: &[(String, Map<String, Value>)],
        before: &[Option<Map<String, Value>>],
        after: &[Option<Map<String, Value>>],
    ) -> Cost {
        let consistent = body["ConsistentRead"].as_bool() == Some(true);
        match api {
            "GetItem" => {
                let bytes = reply["Item"].as_object().map_or(0, item_size);
                Cost::read(bytes, bytes, consistent)
            }
            "Query" | "Scan" => {
                let items = reply["Items"].as_array().into_iter().flatten();
                let sizes: Vec<u64> = items.filter_map(Value::as_object).map(item_size).collect();
                let (bytes, largest) = (sizes.iter().sum(), sizes.iter().copied().max());
                let consistent = consistent && body.get("IndexName").is_none();
                Cost::read(bytes, largest.unwrap_or(0), consistent)
            }
            "PutItem" | "UpdateItem" | "DeleteItem" | "TransactWriteItems" => {
                let factor = if api == "TransactWriteItems" {
                    2.0
                } else {
                    1.0
                };
                let tables = locked(&self.tables);
                let mut cost = Cost::default();
                for (((table, _), old), new) in writes.iter().zip(before).zip(after) {
                    let size =
                        |item: &Option<Map<String, Value>>| item.as_ref().map_or(0, item_size);
                    let bytes = size(old).max(size(new));
                    let gsi = tables.get(table).map_or(0.0, |t| {
                        t.indexes
                            .iter()
                            .map(|index| index.write_cost(&t.keys, old.as_ref(), new.as_ref()))
                            .sum()
                    });
                    cost.add(Cost {
                        rru: 0.0,
                        wru: factor * write_units(bytes) + gsi,
                        gsi_wru: gsi,
                        largest: bytes,
                    });
                }
                cost
            }
            _ => Cost::default(),
        }
    }

    fn len(&self) -> usize {
        locked(&self.log).len()
    }

    /// What the calls from `from` on were.
    fn tally(&self, from: usize) -> Tally {
        let log = locked(&self.log);
        let mut tally = Tally::default();
        for call in log.iter().skip(from) {
            *tally.seen.entry(call.api.clone()).or_default() += 1;
            tally.touched.extend(call.touched.clone());
            let (calls, signatures, cost) = match call.kind {
                Kind::Background => (
                    &mut tally.background_calls,
                    &mut tally.background,
                    &mut tally.background_cost,
                ),
                Kind::Touch => (
                    &mut tally.touch_calls,
                    &mut tally.touches,
                    &mut tally.touch_cost,
                ),
                Kind::Operation => (&mut tally.calls, &mut tally.signatures, &mut tally.cost),
            };
            *calls.entry(call.api.clone()).or_default() += 1;
            *signatures.entry(call.signature()).or_default() += 1;
            cost.add(call.cost);
        }
        tally
    }
}

/// The calls of a stretch of the relay's log, by kind: an operation's,
/// touches, background.
#[derive(Default)]
struct Tally {
    calls: BTreeMap<String, u64>,
    signatures: BTreeMap<String, u64>,
    cost: Cost,
    background_calls: BTreeMap<String, u64>,
    background: BTreeMap<String, u64>,
    background_cost: Cost,
    touch_calls: BTreeMap<String, u64>,
    touches: BTreeMap<String, u64>,
    touch_cost: Cost,
    /// The connections touched.
    touched: BTreeSet<String>,
    /// Every call by API, of every kind: the counter's check.
    seen: BTreeMap<String, u64>,
}

/// Sends `request` to `upstream` on a connection of its own and reads the
/// answer to its end (moto closes after each).
async fn exchange(upstream: SocketAddr, request: &[u8]) -> anyhow::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        stream.write_all(request).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .context("moto did not answer within 30 s")?
}

/// One HTTP request (raw, and the length of its head) from `buffer` and
/// the socket; None when the client ended cleanly between requests.
async fn read_request(
    socket: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> anyhow::Result<Option<(Vec<u8>, usize)>> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end])?;
            if header(head, "transfer-encoding").is_some() {
                bail!("the relay reads Content-Length bodies only");
            }
            let length: usize = header(head, "content-length").map_or(Ok(0), str::parse)?;
            let total = end + 4 + length;
            if buffer.len() >= total {
                return Ok(Some((buffer.drain(..total).collect(), end + 4)));
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let read = socket.read(&mut chunk).await?;
        if read == 0 {
            if buffer.is_empty() {
                return Ok(None);
            }
            bail!("a request cut short");
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Whether an `UpdateItem` sets exactly these attributes and does nothing
/// else (`names` sorted).
fn sets_only(body: &Value, names: &[&str]) -> bool {
    let Some(sets) = body["UpdateExpression"]
        .as_str()
        .and_then(|e| e.trim().strip_prefix("SET "))
    else {
        return false;
    };
    let aliases = &body["ExpressionAttributeNames"];
    let mut set: Vec<&str> = sets
        .split(',')
        .filter_map(|assignment| {
            let name = assignment.split_once('=')?.0.trim();
            Some(aliases[name].as_str().unwrap_or(name))
        })
        .collect();
    set.sort_unstable();
    set == names && !sets.contains(" REMOVE ") && !sets.contains(" ADD ")
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// The status and JSON body of a whole HTTP response (Null if not JSON).
fn parse_response(response: &[u8]) -> (u16, Value) {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let status = std::str::from_utf8(&response[..end])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let body = response.get(end + 4..).unwrap_or_default();
    (status, serde_json::from_slice(body).unwrap_or(Value::Null))
}

/// `streamer_dynamodb_calls_total` by operation (both outcomes), from the
/// process's Prometheus recorder.
fn counted_calls() -> BTreeMap<String, u64> {
    let text = streamer_core::telemetry::metrics_recorder().render();
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("streamer_dynamodb_calls_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let operation = labels
            .split(',')
            .find_map(|l| l.strip_prefix("operation=\""))
            .map(|o| api_name(o.trim_end_matches('"')));
        if let (Some(operation), Ok(value)) = (operation, value.trim().parse::<f64>()) {
            *calls.entry(operation).or_default() += value as u64;
        }
    }
    calls
}

/// The API's name of an operation label: `get_item` is `GetItem`.
fn api_name(label: &str) -> String {
    label
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The counter's calls that no periodic task but the edges' leases makes
/// (`Query` is left out: the store poller queries every 500 ms).
fn counted_operation_calls() -> u64 {
    counted_calls()
        .iter()
        .filter(|(api, _)| COLUMNS.contains(&api.as_str()) && api.as_str() != "Query")
        .map(|(_, n)| n)
        .sum()
}

// ---- the phases ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// DynamoDB on moto through the relay: the calls and their units.
    Audited,
    /// DynamoDB on moto directly: timings.
    Moto,
    /// The embedded store: timings.
    Embedded,
}

/// What one phase did and cost.
struct Phase {
    name: String,
    /// What one operation is ("connect", "broadcast", ...).
    unit: &'static str,
    ops: usize,
    wall: Duration,
    latency: Summary,
    tally: Tally,
    /// How `streamer_dynamodb_calls_total` moved, by operation.
    counted: BTreeMap<String, u64>,
}

impl Phase {
    fn per_op(&self, n: f64) -> f64 {
        n / self.ops.max(1) as f64
    }

    /// Operations of the counter that disagree with the relay's log.
    fn counter_mismatch(&self) -> Vec<String> {
        let apis: BTreeSet<&String> = self.counted.keys().chain(self.tally.seen.keys()).collect();
        apis.into_iter()
            .filter(|api| !matches!(api.as_str(), "DescribeTable" | "Scan"))
            .filter_map(|api| {
                let counted = self.counted.get(api).copied().unwrap_or(0);
                let seen = self.tally.seen.get(api).copied().unwrap_or(0);
                (counted != seen).then(|| format!("{api}: counter {counted}, relay {seen}"))
            })
            .collect()
    }
}

struct Mark {
    log: usize,
    counted: BTreeMap<String, u64>,
    started: Instant,
}

/// A client's socket, driven by its own task.
struct Client {
    frames: mpsc::UnboundedSender<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

/// A message a client received (or `{"type": "loadgen_closed"}` when its
/// socket ended).
struct Event {
    message: Value,
    at: Instant,
}

impl Event {
    fn is(&self, kind: &str) -> bool {
        self.message["type"].as_str() == Some(kind)
    }

    fn index(&self) -> Option<u64> {
        self.message["index"].as_u64()
    }
}

/// Writes the frames it is given (None: close) and reports every message.
async fn drive_client(
    mut ws: Ws,
    mut frames: mpsc::UnboundedReceiver<Option<String>>,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Some(text)) => {
                    if ws.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(None) | None => {
                    let _ = ws.close(None).await;
                    // Until the server's close frame ends the stream.
                    let _ = tokio::time::timeout(Duration::from_secs(10), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    break;
                }
            },
            message = next_json(&mut ws) => match message {
                Some(Ok(message)) => {
                    let _ = events.send(Event { message, at: Instant::now() });
                }
                Some(Err(_)) | None => break,
            },
        }
    }
    let _ = events.send(Event {
        message: json!({"type": "loadgen_closed"}),
        at: Instant::now(),
    });
}

/// Sends client `c`'s request `r` (what `Session::requests` waits for).
fn submit(
    frames: &mpsc::UnboundedSender<Option<String>>,
    c: usize,
    r: usize,
    submitted: &mut HashMap<String, (usize, usize, Instant)>,
) {
    let id = format!("cost-c{c}-r{r}");
    let frame = json!({"action": ACTION, "id": id, "payload": {"n": r}});
    submitted.insert(id, (c, r, Instant::now()));
    let _ = frames.send(Some(frame.to_string()));
}

/// Which fan-out a lockstep phase calls.
enum Fanout {
    Broadcast,
    Send(String),
}

struct Session<'a> {
    args: &'a Args,
    target: &'a Target,
    relay: Option<Arc<Relay>>,
    tenant: String,
    connections: ConnectionServiceClient<Channel>,
    clients: Vec<Client>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    tag: u64,
    phases: Vec<Phase>,
    /// Progress messages the clients got per request.
    delivered: f64,
    problems: Vec<String>,
}

impl<'a> Session<'a> {
    fn mark(&self) -> Mark {
        Mark {
            log: self.relay.as_ref().map_or(0, |r| r.len()),
            counted: counted_calls(),
            started: Instant::now(),
        }
    }

    /// Waits until no operation call has been made for a while (7 s when
    /// counting, 1 s for timings, 300 ms in the smoke run; at most
    /// [`SETTLE_LIMIT`]; false if it never was): through the relay, or by
    /// the counter's gets and writes (the edges' lease renewals then count
    /// as activity too; the embedded store has none).
    async fn settle(&self) -> bool {
        let quiet = match (self.args.bench, &self.relay) {
            (false, _) => Duration::from_millis(300),
            // What the counts need: longer than the 5 s delivery lease of a
            // request's final message, after which ProgressService reads
            // the request again.
            (true, Some(_)) => AUDITED_QUIET,
            // Timings need no more than phases that do not overlap.
            (true, None) => Duration::from_secs(1),
        };
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut last = counted_operation_calls();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(relay) = &self.relay {
                if relay.quiet_for() >= quiet {
                    return true;
                }
                continue;
            }
            let now = counted_operation_calls();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet {
                return true;
            }
        }
        false
    }

    async fn finish(
        &mut self,
        name: String,
        unit: &'static str,
        ops: usize,
        mark: Mark,
        wall: Duration,
        latency: Vec<Duration>,
    ) {
        if !self.settle().await {
            self.problems.push(format!(
                "{name}: the store was not quiet within {SETTLE_LIMIT:?} \
                 (a periodic call this scenario does not know as background?)"
            ));
        }
        let counted = counted_calls()
            .into_iter()
            .map(|(api, n)| {
                let before = mark.counted.get(&api).copied().unwrap_or(0);
                (api, n.saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let tally = self
            .relay
            .as_ref()
            .map_or_else(Tally::default, |r| r.tally(mark.log));
        self.phases.push(Phase {
            name,
            unit,
            ops,
            wall,
            latency: Summary::of(latency),
            tally,
            counted,
        });
    }

    /// Waits for `count` events that `wanted` picks (until the run's
    /// timeout); their times.
    async fn wait_for(
        &mut self,
        count: usize,
        mut wanted: impl FnMut(&Event) -> bool,
    ) -> Vec<Instant> {
        let deadline = Instant::now() + self.args.timeout();
        let mut times = Vec::with_capacity(count);
        while times.len() < count {
            match tokio::time::timeout_at(deadline.into(), self.events.recv()).await {
                Ok(Some(event)) if wanted(&event) => times.push(event.at),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        times
    }

    fn next_tag(&mut self) -> u64 {
        self.tag += 1;
        self.tag
    }

    async fn connect(&mut self, from: usize, to: usize) -> anyhow::Result<()> {
        let tokens = (from..to)
            .map(|c| self.target.token(&format!("cost-u{c}"), &self.tenant))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mark = self.mark();
        let target = self.target;
        let opened: Vec<(Ws, Duration)> = futures::stream::iter(tokens)
            .map(|token| async move {
                let start = Instant::now();
                let ws = target.connect(&token).await?;
                anyhow::Ok((ws, start.elapsed()))
            })
            .buffered(self.args.connect_concurrency.clamp(1, MAX_CONNECTING))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()
            .with_context(|| format!("connecting clients {}-{to}", from + 1))?;
        let wall = mark.started.elapsed();
        let mut latency = Vec::new();
        for (ws, took) in opened {
            latency.push(took);
            let (frames, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(drive_client(ws, rx, self.events_tx.clone()));
            self.clients.push(Client { frames, task });
        }
        let name = format!("connect (clients {}-{to})", from + 1);
        self.finish(name, "connect", to - from, mark, wall, latency)
            .await;
        Ok(())
    }

    /// `--broadcasts` tenant broadcasts (or `--sends` Sends), one at a
    /// time, each until every client it targets has it.
    async fn lockstep(
        &mut self,
        fanout: Fanout,
        name: String,
        unit: &'static str,
    ) -> anyhow::Result<()> {
        let (rounds, expected, kind) = match &fanout {
            Fanout::Broadcast => (
                self.args.broadcasts,
                self.clients.len(),
                "loadgen_broadcast",
            ),
            Fanout::Send(_) => (self.args.sends, 1, "loadgen_send"),
        };
        let mark = self.mark();
        let mut latency = Vec::new();
        for _ in 0..rounds {
            let tag = self.next_tag();
            let payload = json_payload(json!({"type": kind, "index": tag}));
            let start = Instant::now();
            let delivered = match &fanout {
                Fanout::Broadcast => {
                    let target = v1::broadcast_request::Target::Tenant(v1::TenantTarget {
                        tenant_id: self.tenant.clone(),
                    });
                    let request = v1::BroadcastRequest {
                        target: Some(target),
                        payload,
                        tenant_id: String::new(),
                    };
                    self.connections
                        .broadcast(request)
                        .await?
                        .into_inner()
                        .delivered as usize
                }
                Fanout::Send(connection_id) => {
                    let request = v1::SendRequest {
                        connection_id: connection_id.clone(),
                        payload,
                        tenant_id: self.tenant.clone(),
                        sequence: None,
                    };
                    let outcome = self.connections.send(request).await?.into_inner().outcome;
                    usize::from(outcome == v1::DeliveryOutcome::Delivered as i32)
                }
            };
            let got = self
                .wait_for(delivered, |e| e.is(kind) && e.index() == Some(tag))
                .await;
            match got.iter().max() {
                Some(last) if got.len() == expected => latency.push(*last - start),
                _ => self.problems.push(format!(
                    "{name}: {} of {expected} clients got message {tag} ({delivered} delivered)",
                    got.len()
                )),
            }
        }
        let wall = mark.started.elapsed();
        self.finish(name, unit, rounds, mark, wall, latency).await;
        Ok(())
    }

    /// Lists the first client's user's connections: the `Send` target.
    async fn list_one_user(&mut self) -> anyhow::Result<String> {
        let mark = self.mark();
        let listed = self
            .connections
            .list_connections(v1::ListConnectionsRequest {
                tenant_id: self.tenant.clone(),
                user_id: "cost-u0".into(),
                page: None,
            })
            .await?
            .into_inner();
        let wall = mark.started.elapsed();
        let id = listed
            .connections
            .into_iter()
            .next()
            .context("the first client's connection is not listed")?
            .connection_id;
        let name = "list one user's connections".to_owned();
        self.finish(name, "list", 1, mark, wall, vec![wall]).await;
        Ok(id)
    }

    /// Each of the first `clients` clients submits `--requests` requests,
    /// one at a time: the next when the last one's `complete` came. (All at
    /// once, moto falls so far behind that the SDK's 3 s attempts time out
    /// and are retried, which a real table would not see.)
    async fn requests(&mut self, clients: usize) -> anyhow::Result<()> {
        let mark = self.mark();
        let frames: Vec<_> = self
            .clients
            .iter()
            .take(clients)
            .map(|c| c.frames.clone())
            .collect();
        let mut submitted = HashMap::new();
        for (c, frames) in frames.iter().enumerate() {
            submit(frames, c, 0, &mut submitted);
        }
        let expected = frames.len() * self.args.requests;
        let per_client = self.args.requests;
        let (mut progress, mut errors) = (0u64, Vec::new());
        let mut latency = Vec::new();
        let done = self
            .wait_for(expected, |e| {
                let sent = e.message["request_id"]
                    .as_str()
                    .and_then(|id| submitted.get(id).copied());
                match (e.message["type"].as_str(), sent) {
                    (Some("complete"), Some((c, r, sent))) => {
                        latency.push(e.at - sent);
                        if r + 1 < per_client {
                            submit(&frames[c], c, r + 1, &mut submitted);
                        }
                        true
                    }
                    (Some("progress"), Some(_)) => {
                        progress += 1;
                        false
                    }
                    (Some("error"), _) => {
                        errors.push(e.message.to_string());
                        false
                    }
                    _ => false,
                }
            })
            .await;
        let wall = mark.started.elapsed();
        if done.len() < expected || !errors.is_empty() {
            self.problems.push(format!(
                "requests: {} of {expected} completed; errors: {errors:?}",
                done.len()
            ));
        }
        self.delivered = progress as f64 / expected.max(1) as f64;
        let name = format!("request, {} reports", self.args.updates);
        self.finish(name, "request", expected, mark, wall, latency)
            .await;
        Ok(())
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        let mark = self.mark();
        let clients = std::mem::take(&mut self.clients);
        for client in &clients {
            let _ = client.frames.send(None);
        }
        let closed = self
            .wait_for(clients.len(), |e| e.is("loadgen_closed"))
            .await;
        let wall = mark.started.elapsed();
        if closed.len() < clients.len() {
            self.problems.push(format!(
                "disconnect: {} of {} closed",
                closed.len(),
                clients.len()
            ));
        }
        let latency = closed.iter().map(|at| *at - mark.started).collect();
        for client in clients {
            let _ = client.task.await;
        }
        self.finish(
            "disconnect".to_owned(),
            "disconnect",
            closed.len(),
            mark,
            wall,
            latency,
        )
        .await;
        Ok(())
    }

    /// The whole sequence of operations.
    async fn operate(&mut self, sizes: &[usize]) -> anyhow::Result<()> {
        let mut connected = 0;
        for &size in sizes {
            self.connect(connected, size).await?;
            connected = size;
            let name = format!("broadcast to a tenant of {size}");
            self.lockstep(Fanout::Broadcast, name, "broadcast").await?;
        }
        let probe = self.list_one_user().await?;
        self.lockstep(Fanout::Send(probe), "Send to one connection".into(), "send")
            .await?;
        self.requests(sizes[0]).await?;
        self.disconnect().await
    }
}

/// One backend's run: its phases, and for the audited one what the system
/// did while idle.
struct Run {
    backend: Backend,
    phases: Vec<Phase>,
    /// Progress messages delivered per request (the rest were coalesced).
    delivered: f64,
    /// Background calls over the operations' whole span.
    during: Option<(Duration, Tally)>,
    idle: Option<(Duration, Tally)>,
    problems: Vec<String>,
}

static RUNS: AtomicU64 = AtomicU64::new(0);

async fn run_backend(
    args: &Args,
    sizes: &[usize],
    backend: Backend,
    endpoint: &str,
) -> anyhow::Result<Run> {
    let prefix = format!(
        "cost{}-{}-",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    let relay = match backend {
        Backend::Audited => Some(Relay::start(endpoint, &prefix).await?),
        Backend::Moto | Backend::Embedded => None,
    };
    let store = match backend {
        Backend::Embedded => None,
        Backend::Audited | Backend::Moto => {
            let url = relay.as_ref().map_or(endpoint, |r| r.url.as_str());
            let store = DynamoStore::local(url, &prefix);
            store.create_tables().await?;
            if let Some(relay) = &relay {
                relay.learn(&store.table_names()).await?;
            }
            Some(store)
        }
    };
    let target = Target::open(args, |config| {
        if let Some(store) = store {
            config.store = StoreChoice::Opened(Arc::new(store));
        }
        if let Some(rate) = args.progress_rate {
            config.progress.progress_rate = rate;
        }
    })
    .await?;
    let counters = Arc::new(ProcessorCounters::default());
    let stop = Shutdown::new();
    let processor_id = format!("loadgen-cost-{}", std::process::id());
    let processor =
        spawn_processor(&target, processor_id, args.updates, counters, stop.clone()).await?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut session = Session {
        args,
        target: &target,
        relay: relay.clone(),
        tenant: format!("{}-cost-{prefix}", args.tenant),
        connections: target.connection_client().await?,
        clients: Vec::new(),
        events_tx,
        events,
        tag: 0,
        phases: Vec::new(),
        delivered: 0.0,
        problems: Vec::new(),
    };
    let start = session.mark();
    let operated = session.operate(sizes).await;
    let (mut during, mut idle) = (None, None);
    if let (Some(relay), Ok(())) = (&relay, &operated) {
        during = Some((start.started.elapsed(), relay.tally(start.log)));
        let from = relay.len();
        let secs = Duration::from_secs_f64(args.store_cost_idle_secs.max(0.0));
        tokio::time::sleep(secs).await;
        idle = (!secs.is_zero()).then(|| (secs, relay.tally(from)));
    }
    let Session {
        phases,
        delivered,
        problems,
        ..
    } = session;
    stop.cancel();
    let _ = processor.await;
    target.close().await?;
    if let Some(relay) = relay {
        relay.stop();
    }
    operated.with_context(|| format!("store-cost on {backend:?}"))?;
    Ok(Run {
        backend,
        phases,
        delivered,
        during,
        idle,
        problems,
    })
}

/// Whether python3 has moto's server (which the local endpoint starts).
fn moto_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import moto.moto_server.werkzeug_app"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The scenario; None when it was skipped (part of a smoke `all` run on a
/// machine without moto).
pub(crate) async fn run_store_cost(args: &Args) -> anyhow::Result<Option<StoreCostResult>> {
    if args.external() {
        bail!(
            "store-cost starts its own systems (on DynamoDB, then embedded); it cannot target a running one"
        );
    }
    if !moto_available() {
        if args.scenario == Scenario::All {
            println!(
                "\n== store-cost: skipped (python3 cannot import moto: pip install \"moto[server]==5.2.1\")"
            );
            return Ok(None);
        }
        bail!("store-cost needs moto's DynamoDB server: pip install \"moto[server]==5.2.1\"");
    }
    let mut sizes = args.store_cost_clients.clone();
    sizes.sort_unstable();
    sizes.dedup();
    sizes.retain(|n| *n > 0);
    match sizes.last() {
        None => bail!("--store-cost-clients needs at least one size above 0"),
        Some(&n) if n > MAX_IN_PROCESS_CLIENTS => {
            bail!("--store-cost-clients: at most {MAX_IN_PROCESS_CLIENTS} in-process")
        }
        Some(_) => {}
    }
    // The store counts its calls into the recorder installed now.
    streamer_core::telemetry::metrics_recorder();
    let endpoint =
        tokio::task::spawn_blocking(streamer_core::store::conformance::local_dynamodb::endpoint)
            .await?;
    let mut runs = Vec::new();
    // The smoke run leaves out the slowest, the timings on moto.
    for backend in [Backend::Audited, Backend::Moto, Backend::Embedded] {
        if args.bench || backend != Backend::Moto {
            runs.push(run_backend(args, &sizes, backend, &endpoint).await?);
        }
    }
    Ok(Some(StoreCostResult {
        sizes,
        updates: args.updates,
        requests: args.requests,
        rate: args.progress_rate.unwrap_or(10.0),
        runs,
    }))
}

// ---- the report ------------------------------------------------------------------

pub(crate) struct StoreCostResult {
    sizes: Vec<usize>,
    updates: u32,
    requests: usize,
    rate: f64,
    runs: Vec<Run>,
}

fn cell(value: f64) -> String {
    if value == 0.0 {
        "-".to_owned()
    } else {
        format!("{value:.2}")
    }
}

/// Signatures with their counts, scaled (per operation, per minute).
fn listing(signatures: &BTreeMap<String, u64>, scale: f64) -> String {
    signatures
        .iter()
        .map(|(signature, n)| format!("{signature} x{}", cell(*n as f64 * scale)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl StoreCostResult {
    fn run(&self, backend: Backend) -> Option<&Run> {
        self.runs.iter().find(|r| r.backend == backend)
    }

    pub(crate) fn failed(&self) -> bool {
        self.runs.iter().any(|r| !r.problems.is_empty())
    }

    fn calls_of(phase: &Phase) -> (Vec<f64>, f64) {
        let columns = COLUMNS
            .iter()
            .map(|api| phase.per_op(phase.tally.calls.get(*api).copied().unwrap_or(0) as f64))
            .collect();
        let other = phase
            .tally
            .calls
            .iter()
            .filter(|(api, _)| !COLUMNS.contains(&api.as_str()))
            .map(|(_, n)| *n as f64)
            .sum();
        (columns, phase.per_op(other))
    }

    pub(crate) fn print(&self) {
        println!();
        println!(
            "== store-cost: DynamoDB calls per operation, tenant sizes {:?}, {} request(s) per client of the first size, {} progress reports each (rate limit {}/s)",
            self.sizes, self.requests, self.updates, self.rate
        );
        let Some(audited) = self.run(Backend::Audited) else {
            return;
        };
        println!(
            "  calls are measured (the relay's log, checked against streamer_dynamodb_calls_total); RRU/WRU are derived (on-demand rules)"
        );
        println!(
            "  {:<34} {:>5} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>6}",
            "per operation",
            "n",
            "Get",
            "Query",
            "Put",
            "Update",
            "Delete",
            "TxWrite",
            "other",
            "RRU",
            "WRU",
            "of GSI"
        );
        for phase in &audited.phases {
            let (columns, other) = Self::calls_of(phase);
            let cells: Vec<String> = columns
                .into_iter()
                .map(|c| format!("{:>7}", cell(c)))
                .collect();
            let cost = phase.tally.cost;
            println!(
                "  {:<34} {:>5} {} {:>7} | {:>6} {:>6} {:>6}",
                phase.name,
                phase.ops,
                cells.join(" "),
                cell(other),
                cell(phase.per_op(cost.rru)),
                cell(phase.per_op(cost.wru)),
                cell(phase.per_op(cost.gsi_wru)),
            );
        }
        println!(
            "  a request's client got {:.1} of its {} progress reports (the rest coalesced by the rate limit)",
            audited.delivered, self.updates
        );
        for phase in audited
            .phases
            .iter()
            .filter(|p| !p.tally.touches.is_empty())
        {
            println!(
                "  not counted above, in {}: {} touches of {} connections in use that were last seen over a minute before ({:.1} WRU)",
                phase.name,
                phase.tally.touch_calls.values().sum::<u64>(),
                phase.tally.touched.len(),
                phase.tally.touch_cost.wru,
            );
        }
        println!("  what the calls were (per operation; table[index]):");
        for phase in &audited.phases {
            println!(
                "    {}: {}",
                phase.name,
                listing(&phase.tally.signatures, 1.0 / phase.ops.max(1) as f64)
            );
        }
        let largest = audited
            .phases
            .iter()
            .map(|p| p.tally.cost.largest)
            .max()
            .unwrap_or(0);
        println!("  largest item read or written: {largest} bytes");
        let mismatches: Vec<String> = audited
            .phases
            .iter()
            .flat_map(|p| {
                p.counter_mismatch()
                    .into_iter()
                    .map(|m| format!("{}: {m}", p.name))
            })
            .collect();
        if mismatches.is_empty() {
            println!(
                "  counter check: streamer_dynamodb_calls_total moved by exactly the calls the relay saw, in every phase"
            );
        } else {
            println!(
                "  counter check: the counter and the relay differ (a background call across a phase boundary?):"
            );
            for m in mismatches {
                println!("    - {m}");
            }
        }
        for (label, window) in [
            ("while operating", &audited.during),
            ("idle", &audited.idle),
        ] {
            if let Some((span, tally)) = window {
                let per_minute = 60.0 / span.as_secs_f64().max(0.001);
                println!(
                    "  background {label} ({:.1} s), per minute: {} calls; {:.1} RRU, {:.1} WRU: {}",
                    span.as_secs_f64(),
                    cell(tally.background_calls.values().sum::<u64>() as f64 * per_minute),
                    tally.background_cost.rru * per_minute,
                    tally.background_cost.wru * per_minute,
                    listing(&tally.background, per_minute)
                );
            }
        }
        self.print_timings();
        for run in &self.runs {
            for problem in run.problems.iter().take(10) {
                println!("  PROBLEM ({:?}): {problem}", run.backend);
            }
        }
    }

    /// The timing runs side by side (moto's only with `--bench`).
    fn print_timings(&self) {
        let timed: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| r.backend != Backend::Audited)
            .collect();
        let Some(first) = timed.first() else {
            return;
        };
        println!();
        println!(
            "== store-cost: the same operations timed (moto serves one request at a time on this machine: its latency says nothing about DynamoDB's)"
        );
        let mut header = format!("  {:<34}", "");
        for run in &timed {
            let name = format!("{:?}", run.backend).to_lowercase();
            header.push_str(&format!(
                " | {:>14} {:>8} {:>8}",
                format!("{name} op/s"),
                "p50 ms",
                "p99 ms"
            ));
        }
        println!("{header}");
        for (i, phase) in first.phases.iter().enumerate() {
            let mut row = format!("  {:<34}", phase.name);
            for p in timed.iter().filter_map(|r| r.phases.get(i)) {
                let rate = per_second(p.ops as u64, p.wall);
                row.push_str(&format!(
                    " | {rate:>14.1} {:>8.2} {:>8.2}",
                    p.latency.p50, p.latency.p99
                ));
            }
            println!("{row}");
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let phases = |run: &Run| -> Vec<Value> {
            run.phases
                .iter()
                .map(|p| {
                    let per_op = |m: &BTreeMap<String, u64>| -> Map<String, Value> {
                        m.iter()
                            .map(|(k, n)| (k.clone(), json!(p.per_op(*n as f64))))
                            .collect()
                    };
                    json!({
                        "phase": p.name,
                        "unit": p.unit,
                        "ops": p.ops,
                        "seconds": p.wall.as_secs_f64(),
                        "ops_per_s": per_second(p.ops as u64, p.wall),
                        "latency": p.latency.to_json(),
                        "calls_per_op": per_op(&p.tally.calls),
                        "calls_per_op_by_table": per_op(&p.tally.signatures),
                        "rru_per_op": p.per_op(p.tally.cost.rru),
                        "wru_per_op": p.per_op(p.tally.cost.wru),
                        "gsi_wru_per_op": p.per_op(p.tally.cost.gsi_wru),
                        "background_calls": p.tally.background,
                        "touches": p.tally.touch_calls.values().sum::<u64>(),
                        "connections_touched": p.tally.touched.len(),
                        "touch_wru": p.tally.touch_cost.wru,
                        "counter_delta": p.counted,
                    })
                })
                .collect()
        };
        let window = |w: &Option<(Duration, Tally)>| {
            w.as_ref().map(|(span, t)| {
                json!({"seconds": span.as_secs_f64(), "calls": t.background,
                       "rru": t.background_cost.rru, "wru": t.background_cost.wru})
            })
        };
        json!({
            "scenario": "store-cost",
            "tenant_sizes": self.sizes,
            "requests_per_client": self.requests,
            "updates_per_request": self.updates,
            "progress_rate": self.rate,
            "runs": self.runs.iter().map(|r| json!({
                "backend": format!("{:?}", r.backend),
                "progress_delivered_per_request": r.delivered,
                "phases": phases(r),
                "background_while_operating": window(&r.during),
                "background_idle": window(&r.idle),
                "problems": r.problems,
            })).collect::<Vec<_>>(),
        })
    }
}
