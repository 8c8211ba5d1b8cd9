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
    ConnectionRecord, Created, Durability, RequestRecord, Store, StoreError, StoreResult, now_ms,
};

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
        Ok(Self {
            path: Arc::new(path),
            db: Arc::new(RwLock::new(Some(Arc::new(db)))),
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

    async fn write<T, F>(&self, durability: Durability, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> StoreResult<T> + Send + 'static,
    {
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(backend)?;
            if durability == Durability::Relaxed {
                txn.set_durability(redb::Durability::None)
                    .map_err(backend)?;
            }
            let out = f(&txn)?;
            txn.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }
}

fn remove_connection_in(
    txn: &WriteTransaction,
    connection_id: &str,
) -> StoreResult<Option<ConnectionRecord>> {
    let mut table = txn.open_table(CONNECTIONS).map_err(backend)?;
    let old = match table.remove(connection_id).map_err(backend)? {
        Some(bytes) => Some(decode::<ConnectionRecord>(bytes.value())?),
        None => None,
    };
    if let Some(old) = &old {
        let id = old.connection_id.as_str();
        txn.open_table(CONNECTIONS_BY_TENANT)
            .map_err(backend)?
            .remove(key(&[&old.tenant_id, id]).as_str())
            .map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_USER)
            .map_err(backend)?
            .remove(key(&[&old.tenant_id, &old.user_id, id]).as_str())
            .map_err(backend)?;
        txn.open_table(CONNECTIONS_BY_EDGE)
            .map_err(backend)?
            .remove(key(&[&old.edge_id, id]).as_str())
            .map_err(backend)?;
    }
    Ok(old)
}

fn put_request_in(txn: &WriteTransaction, record: &RequestRecord) -> StoreResult<()> {
    txn.open_table(REQUESTS)
        .map_err(backend)?
        .insert(record.id.as_str(), encode(record)?.as_slice())
        .map_err(backend)?;
    let mut unfinished = txn.open_table(REQUESTS_UNFINISHED).map_err(backend)?;
    if record.status.is_final() {
        unfinished.remove(record.id.as_str()).map_err(backend)?;
    } else {
        unfinished.insert(record.id.as_str(), ()).map_err(backend)?;
    }
    Ok(())
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

    async fn put_connection(&self, record: ConnectionRecord) -> StoreResult<()> {
        self.write(Durability::Relaxed, move |txn| {
            remove_connection_in(txn, &record.connection_id)?;
            let id = record.connection_id.as_str();
            txn.open_table(CONNECTIONS)
                .map_err(backend)?
                .insert(id, encode(&record)?.as_slice())
                .map_err(backend)?;
            txn.open_table(CONNECTIONS_BY_TENANT)
                .map_err(backend)?
                .insert(key(&[&record.tenant_id, id]).as_str(), ())
                .map_err(backend)?;
            txn.open_table(CONNECTIONS_BY_USER)
                .map_err(backend)?
                .insert(key(&[&record.tenant_id, &record.user_id, id]).as_str(), ())
                .map_err(backend)?;
            txn.open_table(CONNECTIONS_BY_EDGE)
                .map_err(backend)?
                .insert(key(&[&record.edge_id, id]).as_str(), ())
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get_connection(&self, connection_id: &str) -> StoreResult<Option<ConnectionRecord>> {
        let id = connection_id.to_owned();
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
        connection_id: &str,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let id = connection_id.to_owned();
        self.write(Durability::Relaxed, move |txn| {
            remove_connection_in(txn, &id)
        })
        .await
    }

    async fn touch_connection(&self, connection_id: &str, now_ms: u64) -> StoreResult<bool> {
        let id = connection_id.to_owned();
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
        tenant_id: &str,
        user_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let tenant = tenant_id.to_owned();
        let user = user_id.map(str::to_owned);
        let after = after.map(str::to_owned);
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

    async fn connections_of_edge(&self, edge_id: &str) -> StoreResult<Vec<String>> {
        let prefix = format!("{edge_id}{SEP}");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(CONNECTIONS_BY_EDGE).map_err(backend)?;
            suffixes_after(&table, &prefix, None, usize::MAX)
        })
        .await
    }

    async fn connection_edges(&self) -> StoreResult<Vec<String>> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(CONNECTIONS_BY_EDGE).map_err(backend)?;
            let mut edges: Vec<String> = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (k, ()) = entry.map_err(backend).map(|(k, v)| (k, v.value()))?;
                let edge = k.value().split(SEP).next().unwrap_or_default().to_owned();
                if edges.last() != Some(&edge) {
                    edges.push(edge);
                }
            }
            Ok(edges)
        })
        .await
    }

    async fn sweep_connections(&self, now_ms: u64) -> StoreResult<usize> {
        self.write(Durability::Relaxed, move |txn| {
            let expired: Vec<String> = {
                let table = txn.open_table(CONNECTIONS).map_err(backend)?;
                let mut ids = Vec::new();
                for entry in table.iter().map_err(backend)? {
                    let (k, v) = entry.map_err(backend)?;
                    let record: ConnectionRecord = decode(v.value())?;
                    if record.is_expired(now_ms) {
                        ids.push(k.value().to_owned());
                    }
                }
                ids
            };
            for id in &expired {
                remove_connection_in(txn, id)?;
            }
            Ok(expired.len())
        })
        .await
    }

    async fn create_request(&self, record: RequestRecord) -> StoreResult<Created> {
        self.write(Durability::Immediate, move |txn| {
            let client_key = key(&[
                &record.tenant_id,
                &record.user_id,
                &record.client_request_id,
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
            put_request_in(txn, &record)?;
            Ok(Created {
                record,
                duplicate: false,
            })
        })
        .await
    }

    async fn get_request(&self, id: &str) -> StoreResult<Option<RequestRecord>> {
        let id = id.to_owned();
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
        tenant_id: &str,
        user_id: &str,
        client_request_id: &str,
    ) -> StoreResult<Option<RequestRecord>> {
        let client_key = key(&[tenant_id, user_id, client_request_id]);
        let id = self
            .blocking(move |db| {
                let txn = db.begin_read().map_err(backend)?;
                let table = txn.open_table(REQUESTS_BY_CLIENT_ID).map_err(backend)?;
                Ok(table
                    .get(client_key.as_str())
                    .map_err(backend)?
                    .map(|v| v.value().to_owned()))
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
            match current {
                Some(current) if current.version == record.version => {}
                _ => return Err(StoreError::Conflict),
            }
            let record = RequestRecord {
                version: record.version + 1,
                ..record
            };
            put_request_in(txn, &record)?;
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
                store.get_connection("c1").await,
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
        assert!(store.get_connection("c1").await.unwrap().is_some());
        store
            .put_connection(connection("c3", "t1", "carol"))
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert!(store.get_connection("c3").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            store.create_request(request("r1", "job-1")).await.unwrap();
            let mut r = store.get_request("r1").await.unwrap().unwrap();
            r.sequence = 7;
            store.update_request(r, Durability::Relaxed).await.unwrap();
            store.revoke_token("jti", u64::MAX).await.unwrap();
            store.flush().await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(store.get_request("r1").await.unwrap().unwrap().sequence, 7);
        assert!(store.is_token_revoked("jti", now_ms()).await.unwrap());
    }
}
