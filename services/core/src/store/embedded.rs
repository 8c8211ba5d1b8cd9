//! The embedded backend: one redb file in the data directory.
//!
//! redb is synchronous, so every call runs on tokio's blocking pool. Records
//! are JSON; secondary indexes are separate tables whose keys are the index
//! fields joined by NUL (which no id, user or tenant may contain), so a
//! prefix range lists one tenant or one user in id order.
//!
//! redb serialises write transactions, which is what makes each
//! read-check-write below (idempotent create, versioned update) atomic.
//!
//! After an I/O error (a full disk, a file made read-only for a moment),
//! redb refuses every further write until the database is re-opened. The
//! health check ([`Store::ping`]) finds that, lets go of the database and
//! re-opens it once the file can be written again; meanwhile every call is
//! [`StoreError::Unavailable`] and health says NOT_SERVING.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{
    ClientRequestId, ConnectionId, ConnectionRecord, ConnectionStore, Created, Durability,
    EdgeRecord, EdgeStore, Heartbeat, Recovery, RequestRecord, RequestStatus, RequestStore,
    Retention, Store, StoreError, StoreResult, Subscription, SubscriptionStore, TokenStore,
    TopicMessage, TopicPosition, TopicStore, now_ms,
};
use crate::ids::{EdgeId, RequestId, TenantId, UserId};

const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("connections");
/// `tenant \0 connection_id`
const CONNECTIONS_BY_TENANT: TableDefinition<&str, ()> =
    TableDefinition::new("connections_by_tenant");
/// `tenant \0 user \0 connection_id`
const CONNECTIONS_BY_USER: TableDefinition<&str, ()> = TableDefinition::new("connections_by_user");
/// `edge \0 connection_id`
const CONNECTIONS_BY_EDGE: TableDefinition<&str, ()> = TableDefinition::new("connections_by_edge");
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
/// `tenant \0 user \0 client_request_id` -> request id
const REQUESTS_BY_CLIENT_ID: TableDefinition<&str, &str> =
    TableDefinition::new("requests_by_client_id");
/// ids of requests that are not final
const REQUESTS_UNFINISHED: TableDefinition<&str, ()> = TableDefinition::new("requests_unfinished");
/// `(action, created_at_ms, id)` of every PENDING request: work by age.
const REQUESTS_PENDING: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("requests_pending");
/// `(lease_expires_at_ms, id)` of every PROCESSING request.
const REQUESTS_LEASED: TableDefinition<(u64, &str), ()> = TableDefinition::new("requests_leased");
/// `edge_id` -> its lease record
const EDGES: TableDefinition<&str, &[u8]> = TableDefinition::new("edges");
/// `(lease_expires_at_ms, edge_id)`
const EDGES_BY_LEASE: TableDefinition<(u64, &str), ()> = TableDefinition::new("edges_by_lease");
/// `(tenant \0 topic, connection_id)` -> the subscription
const SUBSCRIPTIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("subscriptions");
/// `(connection_id, tenant \0 topic)`
const SUBSCRIPTIONS_BY_CONNECTION: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("subscriptions_by_connection");
/// `tenant \0 topic` -> its [`TopicPosition`]
const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// `(tenant \0 topic, offset)` -> the message
const TOPIC_MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("topic_messages");
/// `jti` -> when its revocation expires (ms)
const REVOKED_TOKENS: TableDefinition<&str, u64> = TableDefinition::new("revoked_tokens");
/// `(expires_at_ms, jti)`: the deny-list in expiry order, so a sweep reads
/// only what it removes.
const REVOKED_TOKENS_BY_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("revoked_tokens_by_expiry");

const SEP: char = '\0';

/// A cheap-to-clone handle to the database file.
#[derive(Clone)]
pub struct EmbeddedStore {
    path: Arc<PathBuf>,
    /// None while the database is being re-opened after an I/O error.
    db: Arc<RwLock<Option<Arc<Database>>>>,
    writer: Arc<GroupCommit>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::backend(e.to_string())
}

fn encode<T: serde::Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(backend)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::backend_from("corrupt record", e))
}

fn key(parts: &[&str]) -> String {
    parts.join(&SEP.to_string())
}

/// The keys of an index table that start with `prefix`, strictly after
/// `prefix + after` when given, with the prefix stripped.
fn suffixes_after<T: ReadableTable<&'static str, ()>>(
    table: &T,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<String>> {
    let start = match after {
        Some(after) => Bound::Excluded(format!("{prefix}{after}")),
        None => Bound::Included(prefix.to_owned()),
    };
    let start = match &start {
        Bound::Excluded(s) => Bound::Excluded(s.as_str()),
        Bound::Included(s) => Bound::Included(s.as_str()),
        Bound::Unbounded => Bound::Unbounded,
    };
    let mut out = Vec::new();
    for entry in table
        .range::<&str>((start, Bound::Unbounded))
        .map_err(backend)?
    {
        let (k, ()) = entry.map_err(backend).map(|(k, v)| (k, v.value()))?;
        let Some(rest) = k.value().strip_prefix(prefix) else {
            break;
        };
        out.push(rest.to_owned());
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// Opens (or creates) the database file, with every table.
fn open_database(path: &Path) -> StoreResult<Database> {
    let db = Database::create(path)
        .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
    let txn = db.begin_write().map_err(backend)?;
    {
        // Create every table up front so readers never meet a missing one.
        txn.open_table(CONNECTIONS).map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_TENANT).map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_USER).map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_EDGE).map_err(backend)?;
        txn.open_table(REQUESTS).map_err(backend)?;
        txn.open_table(REQUESTS_BY_CLIENT_ID).map_err(backend)?;
        txn.open_table(REQUESTS_UNFINISHED).map_err(backend)?;
        txn.open_table(REVOKED_TOKENS).map_err(backend)?;
        txn.open_table(REVOKED_TOKENS_BY_EXPIRY).map_err(backend)?;
        txn.open_table(REQUESTS_PENDING).map_err(backend)?;
        txn.open_table(REQUESTS_LEASED).map_err(backend)?;
        txn.open_table(EDGES).map_err(backend)?;
        txn.open_table(EDGES_BY_LEASE).map_err(backend)?;
        txn.open_table(SUBSCRIPTIONS).map_err(backend)?;
        txn.open_table(SUBSCRIPTIONS_BY_CONNECTION)
            .map_err(backend)?;
        txn.open_table(TOPICS).map_err(backend)?;
        txn.open_table(TOPIC_MESSAGES).map_err(backend)?;
        // A file written before the pending and leased indexes existed:
        // index its unfinished requests (a no-op when they are indexed).
        let unfinished: Vec<RequestRecord> = {
            let ids = txn.open_table(REQUESTS_UNFINISHED).map_err(backend)?;
            let table = txn.open_table(REQUESTS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in ids.iter().map_err(backend)? {
                let (id, ()) = entry.map_err(backend).map(|(k, v)| (k, v.value()))?;
                if let Some(bytes) = table.get(id.value()).map_err(backend)? {
                    out.push(decode(bytes.value())?);
                }
            }
            out
        };
        for record in &unfinished {
            index_request_in(&txn, record, true)?;
        }
    }
    txn.commit().map_err(backend)?;
    Ok(db)
}

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/streamer.redb`, creating `dir` if needed.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            backend(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("streamer.redb");
        let db = open_database(&path)?;
        let db = Arc::new(RwLock::new(Some(Arc::new(db))));
        let writer = Arc::new(GroupCommit::start(db.clone())?);
        Ok(Self {
            path: Arc::new(path),
            db,
            writer,
        })
    }

    fn current(&self) -> StoreResult<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable {
                message: "the embedded store is being re-opened after an I/O error".into(),
                source: None,
            })
    }

    /// The health probe, on the blocking pool: a write transaction begun and
    /// abandoned (no I/O) tells whether redb still accepts writes; if it
    /// does not, or the database was let go, re-open it.
    fn probe(&self) -> StoreResult<()> {
        if let Ok(db) = self.current() {
            match db.begin_write() {
                Ok(txn) => return txn.abort().map_err(backend),
                Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {
                    tracing::error!(path = %self.path.display(), "the embedded store failed an I/O; re-opening it");
                    *self.db.write().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(error) => return Err(backend(error)),
            }
        }
        // Calls still running hold the old database; until they end (and
        // while the file cannot be written) opening fails, and the next
        // probe tries again.
        let db = open_database(&self.path).map_err(|e| StoreError::Unavailable {
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "the embedded store is open again");
        Ok(())
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> StoreResult<T> + Send + 'static,
    {
        let db = self.current()?;
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| backend(format!("store task failed: {e}")))?
    }

    /// Runs `f` in a write transaction, committed with (at least)
    /// `durability`, through the store's one writer: writes that arrive
    /// together share a transaction (see [`GroupCommit`]). `f` may run twice
    /// (alone, after a shared transaction failed), so it takes its inputs by
    /// reference.
    async fn write<T, F>(&self, durability: Durability, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Box::new(Typed {
            durability,
            f,
            out: None,
            reply: Some(reply),
        });
        self.writer
            .queue
            .as_ref()
            .ok_or_else(|| backend("the store's writer has stopped"))?
            .send(job)
            .await
            .map_err(|_| backend("the store's writer has stopped"))?;
        answer
            .await
            .map_err(|_| backend("the store's writer dropped a write"))?
    }
}

/// Most writes one transaction takes: enough to pay one commit for a burst
/// of connects, few enough that a write's wait behind the others stays
/// short.
const GROUP_COMMIT_MAX: usize = 64;

/// Writes waiting for the writer; past this, `write` waits for room
/// (backpressure on the caller, nothing dropped).
const GROUP_COMMIT_QUEUE: usize = 1024;

/// The store's writer: one thread that takes the writes waiting, runs them
/// in one redb transaction and commits once (group commit).
///
/// redb admits one write transaction at a time, so writes from the blocking
/// pool queued on its lock, each paying a thread wake-up and a commit
/// (page allocation, checksums) of its own: about a quarter of the CPU
/// of a connect at 2,000 connects per second. Here a burst pays one.
///
/// A write that fails in a shared transaction must not take the others
/// with it, nor leave half of itself behind: the shared transaction is
/// abandoned and each write runs again alone. The batch is committed with
/// the strongest durability any of its writes asked for.
///
/// The last handle of the store to go stops the thread and waits for it,
/// so the file is free to open again as soon as the store is dropped.
struct GroupCommit {
    queue: Option<tokio::sync::mpsc::Sender<Box<dyn Job>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has answered what was
        // queued.
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl GroupCommit {
    fn start(db: Arc<RwLock<Option<Arc<Database>>>>) -> StoreResult<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Box<dyn Job>>(GROUP_COMMIT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(GROUP_COMMIT_MAX);
                // Ends when every handle of the store is gone.
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while batch.len() < GROUP_COMMIT_MAX {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let current = db.read().unwrap_or_else(|e| e.into_inner()).clone();
                    match current {
                        Some(db) => Self::commit(&db, &mut batch),
                        None => {
                            for job in batch.drain(..) {
                                job.finish(Err(StoreError::Unavailable {
                                    message:
                                        "the embedded store is being re-opened after an I/O error"
                                            .into(),
                                    source: None,
                                }));
                            }
                        }
                    }
                }
            })
            .map_err(|e| backend(format!("cannot start the store's writer: {e}")))?;
        Ok(Self {
            queue: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs and commits `batch` (emptying it), together when every write
    /// succeeds, else each alone.
    fn commit(db: &Database, batch: &mut Vec<Box<dyn Job>>) {
        let durability = if batch
            .iter()
            .any(|j| j.durability() == Durability::Immediate)
        {
            Durability::Immediate
        } else {
            Durability::Relaxed
        };
        // When one of them fails, the shared transaction is dropped (rolled
        // back) and each runs again alone below.
        if batch.len() > 1
            && let Ok(committed) = Self::run(db, durability, batch.as_mut_slice())
        {
            for job in batch.drain(..) {
                job.finish(committed.clone().map_err(|e| backend(e.0)));
            }
            return;
        }
        for mut job in batch.drain(..) {
            let durability = job.durability();
            let committed = Self::run(db, durability, std::slice::from_mut(&mut job));
            // A failed write answers with its own error.
            job.finish(committed.unwrap_or(Ok(())).map_err(|e| backend(e.0)));
        }
    }

    /// One transaction over `jobs`: `Err(())` when a job failed (its error
    /// is kept in it; nothing was committed), else the commit's outcome.
    fn run(
        db: &Database,
        durability: Durability,
        jobs: &mut [Box<dyn Job>],
    ) -> Result<Result<(), SharedError>, ()> {
        let mut txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(e) => return Ok(Err(SharedError(e.to_string()))),
        };
        if durability == Durability::Relaxed
            && let Err(e) = txn.set_durability(redb::Durability::None)
        {
            return Ok(Err(SharedError(e.to_string())));
        }
        for job in jobs.iter_mut() {
            if !job.run(&txn) {
                return Err(());
            }
        }
        Ok(txn.commit().map_err(|e| SharedError(e.to_string())))
    }
}

/// A commit's failure, told to every write of its transaction.
#[derive(Debug, Clone)]
struct SharedError(String);

/// A write for [`GroupCommit`], its result type erased.
trait Job: Send {
    fn durability(&self) -> Durability;
    /// Runs the write in `txn`, keeping its result; whether it succeeded.
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Answers the caller: the kept result once `committed`, else the
    /// commit's error.
    fn finish(self: Box<Self>, committed: StoreResult<()>);
}

/// A write of `T`: its closure, its result once run, and its caller.
struct Typed<T, F> {
    durability: Durability,
    f: F,
    out: Option<StoreResult<T>>,
    reply: Option<tokio::sync::oneshot::Sender<StoreResult<T>>>,
}

impl<T, F> Job for Typed<T, F>
where
    T: Send,
    F: FnMut(&WriteTransaction) -> StoreResult<T> + Send,
{
    fn durability(&self) -> Durability {
        self.durability
    }

    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let out = (self.f)(txn);
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(mut self: Box<Self>, committed: StoreResult<()>) {
        let answer = match committed {
            Ok(()) => self
                .out
                .take()
                .unwrap_or_else(|| Err(backend("the write was not run"))),
            Err(e) => Err(e),
        };
        if let Some(reply) = self.reply.take() {
            // The caller may have gone (its request was dropped); the write
            // stands either way.
            let _ = reply.send(answer);
        }
    }
}

/// Removes a connection record and its index entries (not its
/// subscriptions: a replaced record keeps them).
fn unindex_connection_in(
    txn: &WriteTransaction,
    connection_id: &ConnectionId,
) -> StoreResult<Option<ConnectionRecord>> {
    let mut table = txn.open_table(CONNECTIONS).map_err(backend)?;
    let old = match table.remove(connection_id.as_str()).map_err(backend)? {
        Some(bytes) => Some(decode::<ConnectionRecord>(bytes.value())?),
        None => None,
    };
    if let Some(old) = &old {
        let id = old.connection_id.as_str();
        txn.open_table(CONNECTIONS_BY_TENANT)
            .map_err(backend)?
            .remove(key(&[old.tenant_id.as_str(), id]).as_str())
            .map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_USER)
            .map_err(backend)?
            .remove(key(&[old.tenant_id.as_str(), old.user_id.as_str(), id]).as_str())
            .map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_EDGE)
            .map_err(backend)?
            .remove(key(&[old.edge_id.as_str(), id]).as_str())
            .map_err(backend)?;
    }
    Ok(old)
}

/// Writes a request, moving its index entries from `old` (the version it
/// replaces) to its new state.
fn put_request_in(
    txn: &WriteTransaction,
    old: Option<&RequestRecord>,
    record: &RequestRecord,
) -> StoreResult<()> {
    txn.open_table(REQUESTS)
        .map_err(backend)?
        .insert(record.id.as_str(), encode(record)?.as_slice())
        .map_err(backend)?;
    if let Some(old) = old {
        index_request_in(txn, old, false)?;
    }
    index_request_in(txn, record, true)
}

/// Adds (`present`) or removes a request's entries in the unfinished,
/// pending and leased indexes, as its status says.
fn index_request_in(
    txn: &WriteTransaction,
    record: &RequestRecord,
    present: bool,
) -> StoreResult<()> {
    let id = record.id.as_str();
    let mut unfinished = txn.open_table(REQUESTS_UNFINISHED).map_err(backend)?;
    if present && record.is_unsettled() {
        unfinished.insert(id, ()).map_err(backend)?;
    } else {
        unfinished.remove(id).map_err(backend)?;
    }
    if record.status == RequestStatus::Pending {
        let mut pending = txn.open_table(REQUESTS_PENDING).map_err(backend)?;
        let key = (record.action.as_str(), record.created_at_ms, id);
        if present {
            pending.insert(key, ()).map_err(backend)?;
        } else {
            pending.remove(key).map_err(backend)?;
        }
    }
    if let Some(lease) = record.held_until_ms() {
        let mut leased = txn.open_table(REQUESTS_LEASED).map_err(backend)?;
        if present {
            leased.insert((lease, id), ()).map_err(backend)?;
        } else {
            leased.remove((lease, id)).map_err(backend)?;
        }
    }
    Ok(())
}

fn topic_key(tenant_id: &TenantId, topic: &str) -> String {
    key(&[tenant_id.as_str(), topic])
}

/// Removes every subscription of a connection.
fn unsubscribe_all_in(txn: &WriteTransaction, connection_id: &ConnectionId) -> StoreResult<()> {
    let connection_id = connection_id.as_str();
    let mut by_connection = txn
        .open_table(SUBSCRIPTIONS_BY_CONNECTION)
        .map_err(backend)?;
    let topics: Vec<String> = {
        let mut topics = Vec::new();
        for entry in by_connection
            .range((connection_id, "")..)
            .map_err(backend)?
        {
            let (k, _) = entry.map_err(backend)?;
            let (connection, topic) = k.value();
            if connection != connection_id {
                break;
            }
            topics.push(topic.to_owned());
        }
        topics
    };
    let mut subscriptions = txn.open_table(SUBSCRIPTIONS).map_err(backend)?;
    for topic in &topics {
        by_connection
            .remove((connection_id, topic.as_str()))
            .map_err(backend)?;
        subscriptions
            .remove((topic.as_str(), connection_id))
            .map_err(backend)?;
    }
    Ok(())
}

fn set_edge_lease_in(
    txn: &WriteTransaction,
    old: Option<&EdgeRecord>,
    record: Option<&EdgeRecord>,
) -> StoreResult<()> {
    let mut edges = txn.open_table(EDGES).map_err(backend)?;
    let mut by_lease = txn.open_table(EDGES_BY_LEASE).map_err(backend)?;
    if let Some(old) = old {
        by_lease
            .remove((old.lease_expires_at_ms, old.edge_id.as_str()))
            .map_err(backend)?;
        edges.remove(old.edge_id.as_str()).map_err(backend)?;
    }
    if let Some(record) = record {
        edges
            .insert(record.edge_id.as_str(), encode(record)?.as_slice())
            .map_err(backend)?;
        by_lease
            .insert((record.lease_expires_at_ms, record.edge_id.as_str()), ())
            .map_err(backend)?;
    }
    Ok(())
}

fn edge_in<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    edge_id: &EdgeId,
) -> StoreResult<Option<EdgeRecord>> {
    table
        .get(edge_id.as_str())
        .map_err(backend)?
        .map(|bytes| decode(bytes.value()))
        .transpose()
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> StoreResult<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.probe())
            .await
            .map_err(|e| backend(format!("store task failed: {e}")))?
    }

    async fn flush(&self) -> StoreResult<()> {
        // An empty immediate commit makes every earlier relaxed one durable.
        self.write(Durability::Immediate, |_| Ok(())).await
    }
}

#[async_trait::async_trait]
impl ConnectionStore for EmbeddedStore {
    async fn put_connection(&self, record: ConnectionRecord) -> StoreResult<()> {
        self.write(Durability::Relaxed, move |txn| {
            unindex_connection_in(txn, &record.connection_id)?;
            let id = record.connection_id.as_str();
            txn.open_table(CONNECTIONS)
                .map_err(backend)?
                .insert(id, encode(&record)?.as_slice())
                .map_err(backend)?;
            let (tenant, user) = (record.tenant_id.as_str(), record.user_id.as_str());
            txn.open_table(CONNECTIONS_BY_TENANT)
                .map_err(backend)?
                .insert(key(&[tenant, id]).as_str(), ())
                .map_err(backend)?;
            txn.open_table(CONNECTIONS_BY_USER)
                .map_err(backend)?
                .insert(key(&[tenant, user, id]).as_str(), ())
                .map_err(backend)?;
            txn.open_table(CONNECTIONS_BY_EDGE)
                .map_err(backend)?
                .insert(key(&[record.edge_id.as_str(), id]).as_str(), ())
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let id = connection_id.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(CONNECTIONS).map_err(backend)?;
            let Some(bytes) = table.get(id.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            let record: ConnectionRecord = decode(bytes.value())?;
            Ok((!record.is_expired(now_ms())).then_some(record))
        })
        .await
    }

    async fn delete_connection(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let id = connection_id.clone();
        self.write(Durability::Relaxed, move |txn| {
            let old = unindex_connection_in(txn, &id)?;
            unsubscribe_all_in(txn, &id)?;
            Ok(old)
        })
        .await
    }

    async fn touch_connection(
        &self,
        connection_id: &ConnectionId,
        now_ms: u64,
    ) -> StoreResult<bool> {
        let id = connection_id.clone();
        self.write(Durability::Relaxed, move |txn| {
            let mut table = txn.open_table(CONNECTIONS).map_err(backend)?;
            let record = match table.get(id.as_str()).map_err(backend)? {
                Some(bytes) => decode::<ConnectionRecord>(bytes.value())?,
                None => return Ok(false),
            };
            let record = ConnectionRecord {
                last_seen_ms: now_ms.max(record.last_seen_ms),
                ..record
            };
            table
                .insert(id.as_str(), encode(&record)?.as_slice())
                .map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn list_connections(
        &self,
        tenant_id: &TenantId,
        user_id: Option<&UserId>,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let tenant = tenant_id.clone();
        let user = user_id.cloned();
        let after = after.map(|id| id.as_str().to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let records = txn.open_table(CONNECTIONS).map_err(backend)?;
            let now = now_ms();
            let mut out = Vec::new();
            let mut cursor = after;
            // Expired records are skipped, so read index pages until the
            // page is full or the index runs out.
            loop {
                let ids = match &user {
                    Some(user) => suffixes_after(
                        &txn.open_table(CONNECTIONS_BY_USER).map_err(backend)?,
                        &format!("{tenant}{SEP}{user}{SEP}"),
                        cursor.as_deref(),
                        limit,
                    )?,
                    None => suffixes_after(
                        &txn.open_table(CONNECTIONS_BY_TENANT).map_err(backend)?,
                        &format!("{tenant}{SEP}"),
                        cursor.as_deref(),
                        limit,
                    )?,
                };
                let exhausted = ids.len() < limit;
                for id in &ids {
                    if let Some(bytes) = records.get(id.as_str()).map_err(backend)? {
                        let record: ConnectionRecord = decode(bytes.value())?;
                        if !record.is_expired(now) && out.len() < limit {
                            out.push(record);
                        }
                    }
                }
                cursor = ids.last().cloned();
                if exhausted || out.len() >= limit {
                    return Ok(out);
                }
            }
        })
        .await
    }

    async fn connections_of_edge(&self, edge_id: &EdgeId) -> StoreResult<Vec<ConnectionId>> {
        let prefix = format!("{edge_id}{SEP}");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(CONNECTIONS_BY_EDGE).map_err(backend)?;
            Ok(suffixes_after(&table, &prefix, None, usize::MAX)?
                .into_iter()
                .map(ConnectionId::from)
                .collect())
        })
        .await
    }

    async fn connection_edges(&self) -> StoreResult<Vec<EdgeId>> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(CONNECTIONS_BY_EDGE).map_err(backend)?;
            let mut edges: Vec<EdgeId> = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (k, ()) = entry.map_err(backend).map(|(k, v)| (k, v.value()))?;
                let edge = k.value().split(SEP).next().unwrap_or_default();
                if edges.last().is_none_or(|last| last != edge) {
                    edges.push(EdgeId::from(edge));
                }
            }
            Ok(edges)
        })
        .await
    }

    async fn sweep_connections(&self, now_ms: u64) -> StoreResult<usize> {
        self.write(Durability::Relaxed, move |txn| {
            let expired: Vec<ConnectionId> = {
                let table = txn.open_table(CONNECTIONS).map_err(backend)?;
                let mut ids = Vec::new();
                for entry in table.iter().map_err(backend)? {
                    let (k, v) = entry.map_err(backend)?;
                    let record: ConnectionRecord = decode(v.value())?;
                    if record.is_expired(now_ms) {
                        ids.push(ConnectionId::from(k.value()));
                    }
                }
                ids
            };
            for id in &expired {
                unindex_connection_in(txn, id)?;
                unsubscribe_all_in(txn, id)?;
            }
            Ok(expired.len())
        })
        .await
    }
}

#[async_trait::async_trait]
impl RequestStore for EmbeddedStore {
    async fn create_request(&self, record: RequestRecord) -> StoreResult<Created> {
        self.write(Durability::Immediate, move |txn| {
            let client_key = key(&[
                record.tenant_id.as_str(),
                record.user_id.as_str(),
                record.client_request_id.as_str(),
            ]);
            let mut by_client = txn.open_table(REQUESTS_BY_CLIENT_ID).map_err(backend)?;
            let existing_id = by_client
                .get(client_key.as_str())
                .map_err(backend)?
                .map(|v| v.value().to_owned());
            if let Some(existing_id) = existing_id {
                let table = txn.open_table(REQUESTS).map_err(backend)?;
                if let Some(bytes) = table.get(existing_id.as_str()).map_err(backend)? {
                    return Ok(Created {
                        record: decode(bytes.value())?,
                        duplicate: true,
                    });
                }
            }
            by_client
                .insert(client_key.as_str(), record.id.as_str())
                .map_err(backend)?;
            put_request_in(txn, None, &record)?;
            Ok(Created {
                record: record.clone(),
                duplicate: false,
            })
        })
        .await
    }

    async fn get_request(&self, id: &RequestId) -> StoreResult<Option<RequestRecord>> {
        let id = id.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(REQUESTS).map_err(backend)?;
            match table.get(id.as_str()).map_err(backend)? {
                Some(bytes) => {
                    let record: RequestRecord = decode(bytes.value())?;
                    Ok((record.expires_at_ms() > now_ms()).then_some(record))
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn find_request(
        &self,
        tenant_id: &TenantId,
        user_id: &UserId,
        client_request_id: &ClientRequestId,
    ) -> StoreResult<Option<RequestRecord>> {
        let client_key = key(&[
            tenant_id.as_str(),
            user_id.as_str(),
            client_request_id.as_str(),
        ]);
        let id = self
            .blocking(move |db| {
                let txn = db.begin_read().map_err(backend)?;
                let table = txn.open_table(REQUESTS_BY_CLIENT_ID).map_err(backend)?;
                Ok(table
                    .get(client_key.as_str())
                    .map_err(backend)?
                    .map(|v| RequestId::from(v.value())))
            })
            .await?;
        match id {
            Some(id) => self.get_request(&id).await,
            None => Ok(None),
        }
    }

    async fn update_request(
        &self,
        record: RequestRecord,
        durability: Durability,
    ) -> StoreResult<RequestRecord> {
        self.write(durability, move |txn| {
            let current: Option<RequestRecord> = {
                let table = txn.open_table(REQUESTS).map_err(backend)?;
                let bytes = table.get(record.id.as_str()).map_err(backend)?;
                bytes.map(|b| decode(b.value())).transpose()?
            };
            let current = match current {
                Some(current) if current.version == record.version => current,
                _ => return Err(StoreError::Conflict),
            };
            let record = RequestRecord {
                version: record.version + 1,
                ..record.clone()
            };
            put_request_in(txn, Some(&current), &record)?;
            Ok(record)
        })
        .await
    }

    async fn unfinished_requests(&self) -> StoreResult<Vec<RequestRecord>> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let ids = txn.open_table(REQUESTS_UNFINISHED).map_err(backend)?;
            let table = txn.open_table(REQUESTS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in ids.iter().map_err(backend)? {
                let (id, ()) = entry.map_err(backend).map(|(k, v)| (k, v.value()))?;
                if let Some(bytes) = table.get(id.value()).map_err(backend)? {
                    out.push(decode(bytes.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn pending_requests(
        &self,
        action: &str,
        limit: usize,
    ) -> StoreResult<Vec<RequestRecord>> {
        let action = action.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let pending = txn.open_table(REQUESTS_PENDING).map_err(backend)?;
            let table = txn.open_table(REQUESTS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in pending.range((action.as_str(), 0, "")..).map_err(backend)? {
                let (k, _) = entry.map_err(backend)?;
                let (of, _, id) = k.value();
                if of != action || out.len() >= limit {
                    break;
                }
                if let Some(bytes) = table.get(id).map_err(backend)? {
                    out.push(decode(bytes.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn lapsed_leases(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<RequestRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let leased = txn.open_table(REQUESTS_LEASED).map_err(backend)?;
            let table = txn.open_table(REQUESTS).map_err(backend)?;
            let mut out = Vec::new();
            let upper = (now_ms.saturating_add(1), "");
            for entry in leased.range(..upper).map_err(backend)? {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = entry.map_err(backend)?;
                let (_, id) = k.value();
                if let Some(bytes) = table.get(id).map_err(backend)? {
                    out.push(decode(bytes.value())?);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait::async_trait]
impl TokenStore for EmbeddedStore {
    async fn revoke_token(&self, jti: &str, expires_at_ms: u64) -> StoreResult<()> {
        let jti = jti.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let mut tokens = txn.open_table(REVOKED_TOKENS).map_err(backend)?;
            let mut by_expiry = txn.open_table(REVOKED_TOKENS_BY_EXPIRY).map_err(backend)?;
            let previous = tokens
                .get(jti.as_str())
                .map_err(backend)?
                .map(|v| v.value());
            if previous.is_some_and(|previous| previous >= expires_at_ms) {
                return Ok(());
            }
            if let Some(previous) = previous {
                by_expiry
                    .remove((previous, jti.as_str()))
                    .map_err(backend)?;
            }
            tokens
                .insert(jti.as_str(), expires_at_ms)
                .map_err(backend)?;
            by_expiry
                .insert((expires_at_ms, jti.as_str()), ())
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn is_token_revoked(&self, jti: &str, now_ms: u64) -> StoreResult<bool> {
        let jti = jti.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let tokens = txn.open_table(REVOKED_TOKENS).map_err(backend)?;
            let expires_at = tokens.get(jti.as_str()).map_err(backend)?;
            Ok(expires_at.is_some_and(|expires_at| expires_at.value() > now_ms))
        })
        .await
    }

    async fn sweep_revoked_tokens(&self, now_ms: u64) -> StoreResult<usize> {
        self.write(Durability::Relaxed, move |txn| {
            let mut by_expiry = txn.open_table(REVOKED_TOKENS_BY_EXPIRY).map_err(backend)?;
            let expired: Vec<(u64, String)> = {
                let mut expired = Vec::new();
                // Every key with an expiry up to `now_ms`, whatever its jti
                // (`""` is the least string).
                let upper = (now_ms.saturating_add(1), "");
                for entry in by_expiry.range(..upper).map_err(backend)? {
                    let (k, _) = entry.map_err(backend)?;
                    let (expires_at, jti) = k.value();
                    expired.push((expires_at, jti.to_owned()));
                }
                expired
            };
            let mut tokens = txn.open_table(REVOKED_TOKENS).map_err(backend)?;
            for (expires_at, jti) in &expired {
                by_expiry
                    .remove((*expires_at, jti.as_str()))
                    .map_err(backend)?;
                tokens.remove(jti.as_str()).map_err(backend)?;
            }
            Ok(expired.len())
        })
        .await
    }
}

#[async_trait::async_trait]
impl EdgeStore for EmbeddedStore {
    async fn heartbeat_edge(
        &self,
        edge_id: &EdgeId,
        now_ms: u64,
        lease: std::time::Duration,
    ) -> StoreResult<Heartbeat> {
        let edge_id = edge_id.clone();
        self.write(Durability::Immediate, move |txn| {
            let old = edge_in(&txn.open_table(EDGES).map_err(backend)?, &edge_id)?;
            let until = now_ms + lease.as_millis() as u64;
            let (record, outcome) = match &old {
                Some(old) if old.lease_expires_at_ms > now_ms => (
                    EdgeRecord {
                        heartbeat_at_ms: now_ms.max(old.heartbeat_at_ms),
                        lease_expires_at_ms: until.max(old.lease_expires_at_ms),
                        ..old.clone()
                    },
                    Heartbeat::Extended,
                ),
                _ => (
                    EdgeRecord {
                        edge_id: edge_id.clone(),
                        started_at_ms: now_ms,
                        heartbeat_at_ms: now_ms,
                        lease_expires_at_ms: until,
                    },
                    Heartbeat::Started,
                ),
            };
            set_edge_lease_in(txn, old.as_ref(), Some(&record))?;
            Ok(outcome)
        })
        .await
    }

    async fn get_edge(&self, edge_id: &EdgeId) -> StoreResult<Option<EdgeRecord>> {
        let edge_id = edge_id.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            edge_in(&txn.open_table(EDGES).map_err(backend)?, &edge_id)
        })
        .await
    }

    async fn lapsed_edges(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<EdgeRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let by_lease = txn.open_table(EDGES_BY_LEASE).map_err(backend)?;
            let edges = txn.open_table(EDGES).map_err(backend)?;
            let mut out = Vec::new();
            for entry in by_lease
                .range(..(now_ms.saturating_add(1), ""))
                .map_err(backend)?
            {
                if out.len() >= limit {
                    break;
                }
                let (k, _) = entry.map_err(backend)?;
                if let Some(record) = edge_in(&edges, &EdgeId::from(k.value().1))? {
                    out.push(record);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn remove_edge(&self, edge_id: &EdgeId, lease_expires_at_ms: u64) -> StoreResult<bool> {
        let edge_id = edge_id.clone();
        self.write(Durability::Immediate, move |txn| {
            let old = edge_in(&txn.open_table(EDGES).map_err(backend)?, &edge_id)?;
            match old {
                Some(old) if old.lease_expires_at_ms == lease_expires_at_ms => {
                    set_edge_lease_in(txn, Some(&old), None)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    async fn release_edge(&self, edge_id: &EdgeId) -> StoreResult<()> {
        let edge_id = edge_id.clone();
        self.write(Durability::Immediate, move |txn| {
            let old = edge_in(&txn.open_table(EDGES).map_err(backend)?, &edge_id)?;
            set_edge_lease_in(txn, old.as_ref(), None)
        })
        .await
    }
}

#[async_trait::async_trait]
impl SubscriptionStore for EmbeddedStore {
    async fn subscribe(&self, subscription: Subscription) -> StoreResult<bool> {
        self.write(Durability::Immediate, move |txn| {
            let live = {
                let connections = txn.open_table(CONNECTIONS).map_err(backend)?;
                match connections
                    .get(subscription.connection_id.as_str())
                    .map_err(backend)?
                {
                    Some(bytes) => {
                        let record: ConnectionRecord = decode(bytes.value())?;
                        record.tenant_id == subscription.tenant_id && !record.is_expired(now_ms())
                    }
                    None => false,
                }
            };
            if !live {
                return Ok(false);
            }
            let topic = topic_key(&subscription.tenant_id, &subscription.topic);
            let connection = subscription.connection_id.as_str();
            let mut subscriptions = txn.open_table(SUBSCRIPTIONS).map_err(backend)?;
            if subscriptions
                .get((topic.as_str(), connection))
                .map_err(backend)?
                .is_none()
            {
                subscriptions
                    .insert(
                        (topic.as_str(), connection),
                        encode(&subscription)?.as_slice(),
                    )
                    .map_err(backend)?;
                txn.open_table(SUBSCRIPTIONS_BY_CONNECTION)
                    .map_err(backend)?
                    .insert((connection, topic.as_str()), ())
                    .map_err(backend)?;
            }
            Ok(true)
        })
        .await
    }

    async fn unsubscribe(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        connection_id: &ConnectionId,
    ) -> StoreResult<bool> {
        let topic = topic_key(tenant_id, topic);
        let connection = connection_id.clone();
        self.write(Durability::Immediate, move |txn| {
            let removed = txn
                .open_table(SUBSCRIPTIONS)
                .map_err(backend)?
                .remove((topic.as_str(), connection.as_str()))
                .map_err(backend)?
                .is_some();
            txn.open_table(SUBSCRIPTIONS_BY_CONNECTION)
                .map_err(backend)?
                .remove((connection.as_str(), topic.as_str()))
                .map_err(backend)?;
            Ok(removed)
        })
        .await
    }

    async fn subscribers(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        after: Option<&ConnectionId>,
        limit: usize,
    ) -> StoreResult<Vec<Subscription>> {
        let topic = topic_key(tenant_id, topic);
        let after = after.cloned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(SUBSCRIPTIONS).map_err(backend)?;
            let start = match &after {
                Some(after) => Bound::Excluded((topic.as_str(), after.as_str())),
                None => Bound::Included((topic.as_str(), "")),
            };
            let mut out = Vec::new();
            for entry in table
                .range::<(&str, &str)>((start, Bound::Unbounded))
                .map_err(backend)?
            {
                let (k, v) = entry.map_err(backend)?;
                if k.value().0 != topic || out.len() >= limit {
                    break;
                }
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn subscriptions_of(
        &self,
        connection_id: &ConnectionId,
    ) -> StoreResult<Vec<Subscription>> {
        let connection = connection_id.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let by_connection = txn
                .open_table(SUBSCRIPTIONS_BY_CONNECTION)
                .map_err(backend)?;
            let table = txn.open_table(SUBSCRIPTIONS).map_err(backend)?;
            let mut out = Vec::new();
            for entry in by_connection
                .range((connection.as_str(), "")..)
                .map_err(backend)?
            {
                let (k, _) = entry.map_err(backend)?;
                let (of, topic) = k.value();
                if connection != of {
                    break;
                }
                if let Some(bytes) = table.get((topic, of)).map_err(backend)? {
                    out.push(decode(bytes.value())?);
                }
            }
            Ok(out)
        })
        .await
    }
}

/// A topic's position, made (with a new epoch) if it has none.
fn position_in(txn: &WriteTransaction, topic: &str) -> StoreResult<TopicPosition> {
    let mut topics = txn.open_table(TOPICS).map_err(backend)?;
    let existing = topics
        .get(topic)
        .map_err(backend)?
        .map(|bytes| decode(bytes.value()))
        .transpose()?;
    match existing {
        Some(position) => Ok(position),
        None => {
            let position = TopicPosition {
                epoch: super::new_epoch(),
                offset: 0,
            };
            topics
                .insert(topic, encode(&position)?.as_slice())
                .map_err(backend)?;
            Ok(position)
        }
    }
}

#[async_trait::async_trait]
impl TopicStore for EmbeddedStore {
    async fn append_topic(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        payload: serde_json::Value,
        now_ms: u64,
        retention: Retention,
    ) -> StoreResult<TopicPosition> {
        let topic = topic_key(tenant_id, topic);
        self.write(Durability::Immediate, move |txn| {
            let mut position = position_in(txn, &topic)?;
            position.offset += 1;
            txn.open_table(TOPICS)
                .map_err(backend)?
                .insert(topic.as_str(), encode(&position)?.as_slice())
                .map_err(backend)?;
            let mut messages = txn.open_table(TOPIC_MESSAGES).map_err(backend)?;
            let message = TopicMessage {
                offset: position.offset,
                payload: payload.clone(),
                published_at_ms: now_ms,
            };
            messages
                .insert(
                    (topic.as_str(), position.offset),
                    encode(&message)?.as_slice(),
                )
                .map_err(backend)?;
            // Drop what the retention no longer keeps, oldest first.
            let oldest = retention.oldest_kept(position.offset);
            let dropped: Vec<u64> = {
                let mut dropped = Vec::new();
                for entry in messages
                    .range((topic.as_str(), 0)..(topic.as_str(), position.offset))
                    .map_err(backend)?
                {
                    let (k, v) = entry.map_err(backend)?;
                    let offset = k.value().1;
                    let old: TopicMessage = decode(v.value())?;
                    if offset >= oldest && retention.keeps(old.published_at_ms, now_ms) {
                        break;
                    }
                    dropped.push(offset);
                }
                dropped
            };
            for offset in dropped {
                messages.remove((topic.as_str(), offset)).map_err(backend)?;
            }
            Ok(position)
        })
        .await
    }

    async fn topic_position(
        &self,
        tenant_id: &TenantId,
        topic: &str,
    ) -> StoreResult<TopicPosition> {
        let topic = topic_key(tenant_id, topic);
        self.write(Durability::Immediate, move |txn| position_in(txn, &topic))
            .await
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
        let topic = topic_key(tenant_id, topic);
        let since = since.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let messages = txn.open_table(TOPIC_MESSAGES).map_err(backend)?;
            let mut read = Vec::new();
            if since.epoch == position.epoch {
                for entry in messages
                    .range(
                        (topic.as_str(), since.offset.saturating_add(1))
                            ..=(topic.as_str(), position.offset),
                    )
                    .map_err(backend)?
                {
                    let (_, v) = entry.map_err(backend)?;
                    read.push(decode(v.value())?);
                }
            }
            Ok(Recovery::of(position, &since, read, retention, now_ms))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::request;

    async fn fresh() -> (crate::store::SharedStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        (store, dir)
    }

    crate::store_conformance_suite!(fresh());

    /// chattr(1) makes the file immutable, as an operator or a backup tool
    /// might for a moment: redb's next write fails, and it refuses writes
    /// until re-opened.
    fn immutable(path: &std::path::Path, on: bool) {
        let status = std::process::Command::new("chattr")
            .arg(if on { "+i" } else { "-i" })
            .arg(path)
            .status()
            .expect("chattr runs");
        assert!(status.success(), "chattr {on} on {}", path.display());
    }

    #[tokio::test]
    async fn an_io_error_makes_the_store_unavailable_until_the_file_can_be_written_again() {
        use crate::store::conformance::connection;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("streamer.redb");
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .put_connection(connection("c1", "t1", "alice"))
            .await
            .unwrap();
        store.flush().await.unwrap();
        store.ping().await.unwrap();

        immutable(&file, true);
        let failed = store.flush().await;
        // The write fails; so does every later one until a re-open, and the
        // probe says so (health NOT_SERVING) without letting go of the fault.
        let outcome = async {
            assert!(failed.is_err(), "a write to an immutable file failed");
            assert!(
                store
                    .put_connection(connection("c2", "t1", "bob"))
                    .await
                    .is_err()
            );
            let down = store.ping().await.unwrap_err();
            assert!(down.is_retryable(), "{down:?}");
            assert!(store.ping().await.unwrap_err().is_retryable());
            assert!(matches!(
                store.get_connection(&"c1".into()).await,
                Err(StoreError::Unavailable { .. })
            ));
        };
        let checked = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
        immutable(&file, false);
        if let Err(panic) = checked {
            std::panic::resume_unwind(panic);
        }

        // Once the file can be written, the next probe re-opens it; what
        // was written before the fault is there, and writes work again.
        store.ping().await.unwrap();
        assert!(store.get_connection(&"c1".into()).await.unwrap().is_some());
        store
            .put_connection(connection("c3", "t1", "carol"))
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert!(store.get_connection(&"c3".into()).await.unwrap().is_some());
    }

    /// A write that fails inside a shared transaction leaves nothing of
    /// itself behind and takes none of the others with it.
    #[test]
    fn a_failed_write_in_a_group_commit_undoes_only_itself() {
        const T: TableDefinition<&str, &str> = TableDefinition::new("group_commit_test");
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(&dir.path().join("streamer.redb")).unwrap();
        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
        let job = |name: &'static str, fail: bool| -> Box<dyn Job> {
            let (reply, answer) = tokio::sync::oneshot::channel();
            answers.send((name, answer)).unwrap();
            Box::new(Typed {
                durability: Durability::Relaxed,
                f: move |txn: &WriteTransaction| {
                    txn.open_table(T)
                        .map_err(backend)?
                        .insert(name, "written")
                        .map_err(backend)?;
                    if fail {
                        return Err(StoreError::Conflict);
                    }
                    Ok(name)
                },
                out: None,
                reply: Some(reply),
            })
        };
        let mut batch = vec![job("a", false), job("b", true), job("c", false)];
        GroupCommit::commit(&db, &mut batch);
        assert!(batch.is_empty());
        drop(answers);
        let mut outcomes = Vec::new();
        while let Ok((name, mut answer)) = answered.try_recv() {
            outcomes.push((name, answer.try_recv().unwrap().map_err(|e| e.to_string())));
        }
        assert_eq!(
            outcomes,
            vec![
                ("a", Ok("a")),
                ("b", Err(StoreError::Conflict.to_string())),
                ("c", Ok("c")),
            ]
        );
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(T).unwrap();
        assert!(table.get("a").unwrap().is_some());
        assert!(
            table.get("b").unwrap().is_none(),
            "the failed write left nothing"
        );
        assert!(table.get("c").unwrap().is_some());
    }

    /// Writes that arrive together are answered each with its own result,
    /// and all of them are in the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_each_get_their_own_answer() {
        use crate::store::conformance::connection;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.create_request(request("r1", "job-1")).await.unwrap();
        let stale = store.get_request(&"r1".into()).await.unwrap().unwrap();
        let writes = (0..200).map(|i| {
            let store = store.clone();
            let stale = stale.clone();
            async move {
                if i % 10 == 5 {
                    // Every tenth write is an update of a version that one
                    // of the others made stale: all but the first conflict.
                    store
                        .update_request(stale, Durability::Relaxed)
                        .await
                        .map(|_| ())
                } else {
                    let id = format!("c{i}");
                    store.put_connection(connection(&id, "t1", "alice")).await
                }
            }
        });
        let outcomes = futures::future::join_all(writes).await;
        let updated = outcomes
            .iter()
            .enumerate()
            .filter(|(i, o)| i % 10 == 5 && o.is_ok())
            .count();
        assert_eq!(updated, 1, "exactly one update of the same version wins");
        for (i, outcome) in outcomes.iter().enumerate() {
            if i % 10 == 5 {
                assert!(
                    outcome.is_ok() || matches!(outcome, Err(StoreError::Conflict)),
                    "{outcome:?}"
                );
            } else {
                outcome.as_ref().unwrap();
                let id = format!("c{i}");
                assert!(
                    store
                        .get_connection(&id.as_str().into())
                        .await
                        .unwrap()
                        .is_some()
                );
            }
        }
        let r1 = store.get_request(&"r1".into()).await.unwrap().unwrap();
        assert_eq!(r1.version, stale.version + 1);
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.create_request(request("r1", "job-1")).await.unwrap();
            let mut r = store.get_request(&"r1".into()).await.unwrap().unwrap();
            r.sequence = 7;
            store.update_request(r, Durability::Relaxed).await.unwrap();
            store.revoke_token("jti", u64::MAX).await.unwrap();
            store.flush().await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            store
                .get_request(&"r1".into())
                .await
                .unwrap()
                .unwrap()
                .sequence,
            7
        );
        assert!(store.is_token_revoked("jti", now_ms()).await.unwrap());
    }
}
