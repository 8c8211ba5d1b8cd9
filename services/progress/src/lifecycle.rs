//! The request lifecycle: every state change, the dispatcher that hands
//! PENDING work to processors, the sweeper that takes back lapsed leases,
//! and the poller that finds in the store what other replicas left there.
//!
//! Invariants:
//! - Every change is a conditional write on the record's version; a lost
//!   write is retried on a fresh read, so two writers (or two replicas)
//!   never both win.
//! - Within this process, changes to one request are serialised by a
//!   striped async lock held across read, write and the client
//!   notification, so the outbox sees updates in the order they were
//!   stored (a progress update can never be queued after the final one).
//! - The in-memory indexes (`Registry`) mirror the store and are rebuilt
//!   from it at start; the store stays the truth. Work submitted through
//!   another replica, and leases another replica let lapse (it died), are
//!   found by querying the store every `store_poll`: every replica may try
//!   to hand out or take back the same request, and the conditional write
//!   lets exactly one of them do it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};
use streamer_api::v1;
use streamer_core::client;
use streamer_core::ids::{ClientRequestId, RequestId};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::{
    Durability, ProgressState, RequestError, RequestRecord, RequestStatus, SharedStore, StoreError,
    now_ms,
};
use streamer_core::trust::Caller;
use tokio::sync::{Notify, OwnedMutexGuard, broadcast, mpsc};
use tokio_util::task::TaskTracker;

use crate::ProgressConfig;
use crate::connections::ConnectionDirectory;
use crate::error::ProgressError;
use crate::model::{
    self, Cancel, Claim, Complete, Fail, Lookup, Refused, Report, Selector, Submit,
};
use crate::outbox::Outboxes;

/// How often lapsed leases are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How long the replica that records a request's end has to deliver its
/// final message before another replica may take the delivery over (the
/// first one died, say). A takeover while the first still tries sends the
/// same message with the same sequence, which the edge writes once.
const FINAL_DELIVERY_LEASE: Duration = Duration::from_secs(5);
/// Requests read per query of the store's pending and lapsed indexes.
const POLL_BATCH: usize = 100;
/// Reads and writes before a contended change gives up with ABORTED.
const CONFLICT_RETRIES: usize = 5;
/// Per-request locks; more stripes, fewer unrelated requests waiting on
/// each other.
const STRIPES: usize = 64;

/// What the client and the processor are told after a change.
#[derive(Debug, Default)]
struct Effects {
    /// Queue the record's latest progress for the client.
    progress: bool,
    /// Queue the record's final message for the client.
    final_message: bool,
    /// Tell this processor to stop working on the request, and why.
    stop_processor: Option<(String, v1::CancelReason)>,
    /// The change only moves where the client's messages go: it is no
    /// change of the request, so `updated_at` (and with it the final
    /// message's timestamp) stays as it was.
    binding_only: bool,
}

impl Effects {
    fn none() -> Self {
        Self::default()
    }
    fn final_message(stop_processor: Option<(String, v1::CancelReason)>) -> Self {
        Self {
            final_message: true,
            stop_processor,
            ..Self::default()
        }
    }
}

/// A request handed to a session, before (`attempt: None`) and after its
/// PROCESSING write.
#[derive(Debug, Clone, Copy)]
struct Hold {
    session: u64,
    attempt: Option<u32>,
}

/// One open Claim stream.
struct Session {
    processor_id: String,
    actions: HashSet<String>,
    max_in_flight: usize,
    lease: Duration,
    in_flight: HashSet<RequestId>,
    tx: mpsc::UnboundedSender<v1::ClaimResponse>,
}

/// What the dispatcher decided: hand `id` to `session`.
struct Assignment {
    id: RequestId,
    session: u64,
    processor_id: String,
    lease: Duration,
}

#[derive(Default)]
struct Registry {
    /// Actions Submit accepts.
    known_actions: HashSet<String>,
    sessions: BTreeMap<u64, Session>,
    next_session: u64,
    /// Round robin: the next session id to prefer among equal candidates.
    next_turn: u64,
    /// PENDING requests, FIFO by creation: (created_at_ms, id) -> action.
    pending: BTreeMap<(u64, RequestId), String>,
    pending_since: HashMap<RequestId, u64>,
    /// PROCESSING requests: id -> lease expiry (ms).
    leases: HashMap<RequestId, u64>,
    /// Finished requests whose final message is not known to be delivered:
    /// id -> delivery lease expiry (ms).
    undelivered: HashMap<RequestId, u64>,
    holds: HashMap<RequestId, Hold>,
}

impl Registry {
    fn remove_pending(&mut self, id: &RequestId) {
        if let Some(created) = self.pending_since.remove(id) {
            self.pending.remove(&(created, id.clone()));
        }
    }

    fn insert_pending(&mut self, record: &RequestRecord) {
        self.remove_pending(&record.id);
        self.pending.insert(
            (record.created_at_ms, record.id.clone()),
            record.action.clone(),
        );
        self.pending_since
            .insert(record.id.clone(), record.created_at_ms);
    }

    fn release_hold(&mut self, id: &RequestId) {
        if let Some(hold) = self.holds.remove(id)
            && let Some(session) = self.sessions.get_mut(&hold.session)
        {
            session.in_flight.remove(id);
        }
    }

    /// Mirrors a stored record in the indexes.
    fn track(&mut self, record: &RequestRecord) {
        match record.status {
            RequestStatus::Pending => {
                self.insert_pending(record);
                self.leases.remove(&record.id);
                // A reservation still waiting for its PROCESSING write keeps
                // its place; only a confirmed hold ended.
                if self
                    .holds
                    .get(&record.id)
                    .is_some_and(|h| h.attempt.is_some())
                {
                    self.release_hold(&record.id);
                }
            }
            RequestStatus::Processing => {
                self.remove_pending(&record.id);
                self.leases.insert(
                    record.id.clone(),
                    record.lease_expires_at_ms.unwrap_or_else(now_ms),
                );
                // Confirms the dispatcher's reservation, when this write was
                // that hand-out (and not, say, another replica's).
                if let Some(hold) = self.holds.get_mut(&record.id)
                    && self.sessions.get(&hold.session).is_some_and(|s| {
                        record.processor_id.as_deref() == Some(s.processor_id.as_str())
                    })
                {
                    hold.attempt = Some(record.attempts);
                }
            }
            RequestStatus::Completed | RequestStatus::Failed | RequestStatus::Cancelled => {
                self.remove_pending(&record.id);
                self.leases.remove(&record.id);
                match record.held_until_ms() {
                    Some(lease) => self.undelivered.insert(record.id.clone(), lease),
                    None => self.undelivered.remove(&record.id),
                };
                self.release_hold(&record.id);
            }
        }
        metrics::gauge!("streamer_progress_queue_depth", "state" => "pending")
            .set(self.pending.len() as f64);
        metrics::gauge!("streamer_progress_queue_depth", "state" => "processing")
            .set(self.leases.len() as f64);
    }

    /// Matches PENDING requests (oldest first) with sessions that run their
    /// action and have room, reserving each match.
    fn plan(&mut self) -> Vec<Assignment> {
        let mut out = Vec::new();
        for (id, action) in self.pending.iter().map(|((_, id), a)| (id, a)) {
            let candidates: Vec<u64> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.actions.contains(action) && s.in_flight.len() < s.max_in_flight)
                .map(|(sid, _)| *sid)
                .collect();
            let Some(&chosen) = candidates
                .iter()
                .find(|sid| **sid >= self.next_turn)
                .or_else(|| candidates.first())
            else {
                continue;
            };
            self.next_turn = chosen + 1;
            let Some(session) = self.sessions.get_mut(&chosen) else {
                continue;
            };
            session.in_flight.insert(id.clone());
            self.holds.insert(
                id.clone(),
                Hold {
                    session: chosen,
                    attempt: None,
                },
            );
            out.push(Assignment {
                id: id.clone(),
                session: chosen,
                processor_id: session.processor_id.clone(),
                lease: session.lease,
            });
        }
        for a in &out {
            self.remove_pending(&a.id);
        }
        out
    }
}

/// Everything the service shares; reached through an `Arc`.
pub(crate) struct Lifecycle {
    store: SharedStore,
    config: ProgressConfig,
    connections: ConnectionDirectory,
    outboxes: Outboxes,
    shutdown: Shutdown,
    tasks: TaskTracker,
    // A plain mutex: every critical section is a few map operations and
    // none awaits, so an async lock would only add cost. Dispatcher,
    // sweeper and RPCs all share it.
    registry: Mutex<Registry>,
    stripes: Vec<Arc<tokio::sync::Mutex<()>>>,
    dispatch: Notify,
    updates: broadcast::Sender<RequestRecord>,
}

/// The result of a change: the record as stored now, and whether this call
/// wrote it.
struct Changed {
    record: RequestRecord,
    written: bool,
}

/// How handing out one request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AssignOutcome {
    /// Handed out, or no longer ours to hand out.
    Done,
    /// The store failed; the request stays queued.
    StoreFailed,
}

impl Lifecycle {
    pub fn new(
        store: SharedStore,
        config: ProgressConfig,
        connections: ConnectionDirectory,
        shutdown: Shutdown,
        tasks: TaskTracker,
    ) -> Self {
        let outboxes = Outboxes::new(
            store.clone(),
            connections.clone(),
            config.progress_rate,
            shutdown.clone(),
            tasks.clone(),
        );
        let registry = Registry {
            known_actions: config.async_actions.iter().cloned().collect(),
            ..Registry::default()
        };
        Self {
            store,
            config,
            connections,
            outboxes,
            shutdown,
            tasks,
            registry: Mutex::new(registry),
            stripes: (0..STRIPES).map(|_| Arc::default()).collect(),
            dispatch: Notify::new(),
            updates: broadcast::channel(1024).0,
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Poisoning would mean a panic mid-update of plain maps; they are
        // still usable, and the store stays the truth.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock(&self, id: &RequestId) -> OwnedMutexGuard<()> {
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        let stripe = (hasher.finish() % STRIPES as u64) as usize;
        self.stripes[stripe].clone().lock_owned().await
    }

    /// Loads unfinished requests and starts the dispatcher and sweeper.
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        let unfinished = self
            .store
            .unfinished_requests()
            .await
            .map_err(|e| anyhow::anyhow!("cannot load unfinished requests: {e}"))?;
        {
            let mut registry = self.registry();
            for record in &unfinished {
                registry.known_actions.insert(record.action.clone());
                registry.track(record);
            }
            tracing::info!(
                pending = registry.pending.len(),
                processing = registry.leases.len(),
                "unfinished requests loaded"
            );
        }
        let this = self.clone();
        self.tasks.spawn(async move { this.dispatcher().await });
        let this = self.clone();
        self.tasks.spawn(async move { this.sweeper().await });
        let this = self.clone();
        self.tasks.spawn(async move { this.store_poller().await });
        let this = self.clone();
        self.tasks.spawn(async move {
            this.shutdown.cancelled().await;
            // Dropping the senders ends every Claim stream. Their leases
            // stay in the store, so a processor that reconnects to the next
            // process can still complete its work.
            let sessions = std::mem::take(&mut this.registry().sessions);
            drop(sessions);
        });
        self.dispatch.notify_one();
        Ok(())
    }

    /// Reads, changes and conditionally writes one request, retrying lost
    /// writes. `change` returns `None` to leave the record as it is.
    /// The returned guard keeps the request's lock, for callers that must
    /// act before any other change.
    async fn change<F>(
        &self,
        id: &RequestId,
        durability: Durability,
        mut change: F,
    ) -> Result<(Changed, OwnedMutexGuard<()>), ProgressError>
    where
        F: FnMut(&mut RequestRecord, u64) -> Result<Option<Effects>, ProgressError>,
    {
        let guard = self.lock(id).await;
        for _ in 0..CONFLICT_RETRIES {
            let current = self
                .store
                .get_request(id)
                .await?
                .ok_or(ProgressError::RequestNotFound)?;
            let mut record = current.clone();
            let now = now_ms();
            let Some(effects) = change(&mut record, now)? else {
                self.registry().track(&current);
                return Ok((
                    Changed {
                        record: current,
                        written: false,
                    },
                    guard,
                ));
            };
            if !effects.binding_only {
                record.updated_at_ms = now;
            }
            if effects.final_message {
                // Settled only once the outbox has delivered it (see
                // `final_delivered`); until then it is leased for delivery.
                record.final_pending = true;
                record.lease_expires_at_ms = Some(now + FINAL_DELIVERY_LEASE.as_millis() as u64);
            }
            match self.store.update_request(record, durability).await {
                Ok(stored) => {
                    self.after_change(&stored, effects);
                    return Ok((
                        Changed {
                            record: stored,
                            written: true,
                        },
                        guard,
                    ));
                }
                Err(StoreError::Conflict) => {
                    tracing::debug!(request = id.as_str(), "conditional write lost; re-reading");
                    continue;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ProgressError::Contended(format!("request {id}")))
    }

    fn after_change(&self, record: &RequestRecord, effects: Effects) {
        {
            let mut registry = self.registry();
            if let Some((processor_id, reason)) = &effects.stop_processor {
                let notice = cancel_notice(&record.id, *reason);
                match registry.holds.get(&record.id) {
                    Some(hold) => {
                        if let Some(session) = registry.sessions.get(&hold.session) {
                            let _ = session.tx.send(notice);
                        }
                    }
                    // Held by no open stream of ours (say, after a restart):
                    // tell every stream of that processor.
                    None => {
                        for session in registry.sessions.values() {
                            if &session.processor_id == processor_id {
                                let _ = session.tx.send(notice.clone());
                            }
                        }
                    }
                }
            }
            registry.track(record);
        }
        if matches!(
            record.status,
            RequestStatus::Pending
                | RequestStatus::Completed
                | RequestStatus::Failed
                | RequestStatus::Cancelled
        ) {
            // New work, or a processor with room again.
            self.dispatch.notify_one();
        }
        if effects.progress
            && let Some(message) = client::progress(record)
        {
            let sequence = record.progress.as_ref().map_or(0, |p| p.sequence);
            self.outboxes.progress(record, sequence, message);
        }
        if effects.final_message
            && let Some(message) = client::final_message(record, false)
        {
            if !effects.binding_only {
                metrics::counter!("streamer_progress_requests_finished_total", "status" => crate::error::status_name(record.status)).increment(1);
            }
            self.outboxes
                .final_message(record, record.sequence, message);
        }
        // No receivers is normal: nobody is watching.
        let _ = self.updates.send(record.clone());
    }

    // ---- RPCs ----

    pub async fn submit(
        &self,
        cmd: Submit,
        caller: &Caller,
    ) -> Result<(RequestRecord, bool), ProgressError> {
        if self.shutdown.is_cancelled() {
            return Err(ProgressError::ShuttingDown);
        }
        let identity = self.connections.identity(&cmd.connection_id).await?;
        if !caller.reaches(&identity.tenant_id) {
            return Err(ProgressError::ConnectionNotFound(cmd.connection_id));
        }
        if !self.registry().known_actions.contains(&cmd.action) {
            return Err(ProgressError::UnknownAction(cmd.action));
        }
        let now = now_ms();
        let record = RequestRecord {
            id: RequestId::from(uuid::Uuid::now_v7().to_string()),
            client_request_id: cmd
                .request_id
                .unwrap_or_else(|| ClientRequestId::from(uuid::Uuid::new_v4().to_string())),
            user_id: identity.user_id,
            tenant_id: identity.tenant_id,
            connection_id: cmd.connection_id.clone(),
            action: cmd.action,
            payload: cmd.payload,
            metadata: cmd.metadata,
            status: RequestStatus::Pending,
            attempts: 0,
            max_attempts: self.config.max_attempts,
            processor_id: None,
            lease_expires_at_ms: None,
            progress: None,
            result: None,
            error: None,
            created_at_ms: now,
            updated_at_ms: now,
            sequence: 0,
            final_pending: false,
            // Its later work (dispatch, progress, the outcome) joins the
            // trace it was submitted in.
            trace_context: streamer_core::trace::current(),
            version: 0,
        };
        let guard = self.lock(&record.id).await;
        let created = self.store.create_request(record).await?;
        let record = created.record;
        if created.duplicate {
            // The caller learns it from the answer. A Submit made again for
            // the same connection is most often ConnectionService's retry of
            // one whose answer was lost (the replica that queued it died),
            // and that replica may have died before acknowledging: the
            // acknowledgment is queued again. It carries the same sequence
            // number (0), so the edge writes it only if the socket has had
            // nothing about this request yet: never twice. A client asking
            // again from another connection hears nothing new (it asks with
            // `get_request`).
            tracing::debug!(request = %record.id, "duplicate submit");
            if record.connection_id == cmd.connection_id && !record.status.is_final() {
                self.outboxes
                    .acknowledgment(&record, client::acknowledgment(&record));
            }
            return Ok((record, true));
        }
        tracing::info!(request = %record.id, action = %record.action, tenant = %record.tenant_id, "request queued");
        metrics::counter!("streamer_progress_requests_submitted_total").increment(1);
        // The acknowledgment is queued before anyone can see the request,
        // so it is the first thing the client hears about it.
        self.outboxes
            .acknowledgment(&record, client::acknowledgment(&record));
        self.after_change(&record, Effects::none());
        drop(guard);
        Ok((record, false))
    }

    /// Registers a processor; the receiver yields its work until the stream
    /// is dropped (which releases its work) or the server shuts down.
    pub fn claim(
        self: &Arc<Self>,
        cmd: Claim,
    ) -> Result<(mpsc::UnboundedReceiver<v1::ClaimResponse>, SessionGuard), ProgressError> {
        if self.shutdown.is_cancelled() {
            return Err(ProgressError::ShuttingDown);
        }
        // Bounded by the session itself: it is sent at most `max_in_flight`
        // requests it has not finished, a cancellation for each, and the
        // registration.
        let (tx, rx) = mpsc::unbounded_channel();
        let lease = cmd.lease.unwrap_or(self.config.default_lease);
        // First on the stream; the processor reads it only after this call
        // returned, when its actions are registered.
        let registered = v1::ProcessorRegistered {
            processor_id: cmd.processor_id.clone(),
            actions: cmd.actions.clone(),
            lease_seconds: u32::try_from(lease.as_secs()).unwrap_or(u32::MAX),
            max_in_flight: u32::try_from(cmd.max_in_flight).unwrap_or(u32::MAX),
        };
        let _ = tx.send(v1::ClaimResponse {
            item: Some(v1::claim_response::Item::Registered(registered)),
            ..Default::default()
        });
        let session_id = {
            let mut registry = self.registry();
            registry.next_session += 1;
            let session_id = registry.next_session;
            for action in &cmd.actions {
                registry.known_actions.insert(action.clone());
            }
            registry.sessions.insert(
                session_id,
                Session {
                    processor_id: cmd.processor_id.clone(),
                    actions: cmd.actions.iter().cloned().collect(),
                    max_in_flight: cmd.max_in_flight,
                    lease,
                    in_flight: HashSet::new(),
                    tx,
                },
            );
            session_id
        };
        tracing::info!(processor = %cmd.processor_id, actions = ?cmd.actions, max_in_flight = cmd.max_in_flight, lease_s = lease.as_secs(), "processor claiming");
        metrics::gauge!("streamer_progress_processors").increment(1.0);
        self.dispatch.notify_one();
        Ok((
            rx,
            SessionGuard {
                lifecycle: self.clone(),
                session: session_id,
            },
        ))
    }

    fn session_ended(self: &Arc<Self>, session_id: u64) {
        metrics::gauge!("streamer_progress_processors").decrement(1.0);
        let Some(session) = self.registry().sessions.remove(&session_id) else {
            return;
        };
        let lost: Vec<(RequestId, Option<u32>)> = {
            let mut registry = self.registry();
            session
                .in_flight
                .iter()
                .filter_map(|id| match registry.holds.get(id) {
                    Some(hold) if hold.session == session_id => {
                        let attempt = hold.attempt;
                        registry.holds.remove(id);
                        Some((id.clone(), attempt))
                    }
                    _ => None,
                })
                .collect()
        };
        tracing::info!(processor = %session.processor_id, in_flight = lost.len(), "processor stream ended");
        if self.shutdown.is_cancelled() || lost.is_empty() {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            for (id, attempt) in lost {
                let processor_id = session.processor_id.clone();
                let result = this
                    .change(&id, Durability::Immediate, |r, _| {
                        let same_attempt = attempt.is_none_or(|a| a == r.attempts);
                        if r.status != RequestStatus::Processing
                            || r.processor_id.as_deref() != Some(processor_id.as_str())
                            || !same_attempt
                        {
                            return Ok(None);
                        }
                        Ok(Some(requeue_or_fail(
                            r,
                            "PROCESSOR_LOST",
                            "the processor's stream ended",
                            false,
                        )))
                    })
                    .await;
                if let Err(error) = result {
                    tracing::warn!(request = %id, %error, "cannot release request of a lost processor; its lease will lapse");
                }
            }
        });
    }

    /// Records one progress update. A report the caller may not make is
    /// refused without failing the caller's stream (`Ok(Some(why))`).
    pub async fn report(&self, cmd: Report) -> Result<Option<Refused>, ProgressError> {
        let lease = {
            let registry = self.registry();
            registry
                .holds
                .get(&cmd.id)
                .and_then(|h| registry.sessions.get(&h.session))
                .map_or(self.config.default_lease, |s| s.lease)
        };
        let result = self
            .change(&cmd.id, Durability::Relaxed, |r, now| {
                holds_lease(r, &cmd.processor_id)?;
                r.sequence += 1;
                r.progress = Some(ProgressState {
                    percentage: cmd.percentage,
                    message: cmd.message.clone(),
                    metadata: cmd.metadata.clone(),
                    updated_at_ms: now,
                    sequence: r.sequence,
                });
                r.lease_expires_at_ms = Some(now + lease.as_millis() as u64);
                Ok(Some(Effects {
                    progress: true,
                    ..Effects::none()
                }))
            })
            .await;
        let error = match result {
            Ok(_) => return Ok(None),
            Err(error) => error,
        };
        let refused = match error {
            ProgressError::RequestNotFound => Refused::NotFound,
            ProgressError::NotLeaseHolder { .. } => Refused::LeaseNotHeld,
            ProgressError::AlreadyFinished { .. } => Refused::AlreadyFinished,
            error => return Err(error),
        };
        self.refused_holder(&error, &cmd.id, &cmd.processor_id);
        Ok(Some(refused))
    }

    /// After a Report, Complete or Fail refused because the caller no
    /// longer holds the request: see [`Lifecycle::no_longer_held`].
    fn refused_holder(&self, error: &ProgressError, id: &RequestId, processor_id: &str) {
        let reason = match error {
            ProgressError::NotLeaseHolder { .. } => v1::CancelReason::LeaseNotHeld,
            ProgressError::AlreadyFinished { status, .. } if *status == "cancelled" => {
                v1::CancelReason::Cancelled
            }
            ProgressError::AlreadyFinished { .. } | ProgressError::RequestNotFound => {
                v1::CancelReason::Finished
            }
            _ => return,
        };
        self.no_longer_held(id, processor_id, reason);
    }

    /// A processor worked on a request that is no longer its own: cancelled
    /// or taken back through another replica, which could not tell this
    /// replica's stream. Tells the processor to stop now (as a cancel made
    /// here would have) and frees its slot.
    fn no_longer_held(&self, id: &RequestId, processor_id: &str, reason: v1::CancelReason) {
        let mut registry = self.registry();
        let Some(hold) = registry.holds.get(id).copied() else {
            return;
        };
        if let Some(session) = registry.sessions.get(&hold.session)
            && session.processor_id == processor_id
        {
            let _ = session.tx.send(cancel_notice(id, reason));
            registry.release_hold(id);
        }
    }

    pub async fn complete(&self, cmd: Complete) -> Result<RequestRecord, ProgressError> {
        let (changed, _) = self
            .change(&cmd.id, Durability::Immediate, |r, _| {
                holds_lease(r, &cmd.processor_id)?;
                r.status = RequestStatus::Completed;
                r.result = Some(cmd.result.clone());
                r.lease_expires_at_ms = None;
                r.sequence += 1;
                Ok(Some(Effects::final_message(None)))
            })
            .await
            .inspect_err(|e| self.refused_holder(e, &cmd.id, &cmd.processor_id))?;
        tracing::info!(request = %cmd.id, processor = %cmd.processor_id, "request completed");
        Ok(changed.record)
    }

    pub async fn fail(&self, cmd: Fail) -> Result<RequestRecord, ProgressError> {
        let (changed, _) = self
            .change(&cmd.id, Durability::Immediate, |r, _| {
                holds_lease(r, &cmd.processor_id)?;
                r.lease_expires_at_ms = None;
                if cmd.retryable && r.attempts < r.max_attempts {
                    r.status = RequestStatus::Pending;
                    r.processor_id = None;
                    return Ok(Some(Effects::none()));
                }
                r.status = RequestStatus::Failed;
                r.error = Some(cmd.error.clone());
                r.sequence += 1;
                Ok(Some(Effects::final_message(None)))
            })
            .await
            .inspect_err(|e| self.refused_holder(e, &cmd.id, &cmd.processor_id))?;
        tracing::info!(request = %cmd.id, processor = %cmd.processor_id, code = %cmd.error.code, retryable = cmd.retryable, status = crate::error::status_name(changed.record.status), "request failed");
        Ok(changed.record)
    }

    pub async fn cancel(
        &self,
        cmd: Cancel,
        caller: &Caller,
    ) -> Result<RequestRecord, ProgressError> {
        let (changed, _) = self
            .change(&cmd.id, Durability::Immediate, |r, _| {
                if cmd.owner.as_ref().is_some_and(|o| !o.owns(r)) || !caller.reaches(&r.tenant_id) {
                    return Err(ProgressError::RequestNotFound);
                }
                if r.status.is_final() {
                    return Err(ProgressError::already_finished(&r.id, r.status));
                }
                let stop = (r.status == RequestStatus::Processing)
                    .then(|| r.processor_id.clone())
                    .flatten()
                    .map(|processor| (processor, v1::CancelReason::Cancelled));
                let mut details = Map::new();
                if !cmd.reason.is_empty() {
                    details.insert("reason".to_owned(), Value::from(cmd.reason.clone()));
                }
                r.status = RequestStatus::Cancelled;
                r.error = Some(RequestError {
                    code: "CANCELLED".to_owned(),
                    message: if cmd.reason.is_empty() {
                        "request cancelled".to_owned()
                    } else {
                        cmd.reason.clone()
                    },
                    details,
                });
                r.lease_expires_at_ms = None;
                r.sequence += 1;
                Ok(Some(Effects::final_message(stop)))
            })
            .await?;
        tracing::info!(request = %cmd.id, "request cancelled");
        Ok(changed.record)
    }

    /// The request a lookup names, if its owner (when given) and the
    /// caller's tenants admit it; NOT_FOUND otherwise, so nobody learns of
    /// requests they may not see.
    async fn find(&self, lookup: &Lookup, caller: &Caller) -> Result<RequestRecord, ProgressError> {
        let record = match &lookup.selector {
            Selector::Id(id) => self.store.get_request(id).await?,
            Selector::Client {
                tenant_id,
                user_id,
                request_id,
            } => {
                self.store
                    .find_request(tenant_id, user_id, request_id)
                    .await?
            }
        };
        match record {
            Some(r)
                if lookup.owner.as_ref().is_none_or(|o| o.owns(&r))
                    && caller.reaches(&r.tenant_id) =>
            {
                Ok(r)
            }
            _ => Err(ProgressError::RequestNotFound),
        }
    }

    pub async fn get(
        &self,
        lookup: Lookup,
        caller: &Caller,
    ) -> Result<RequestRecord, ProgressError> {
        let record = self.find(&lookup, caller).await?;
        let Some(connection_id) = lookup.deliver_to else {
            return Ok(record);
        };
        let identity = match self.connections.identity(&connection_id).await {
            Ok(identity) => identity,
            Err(ProgressError::ConnectionNotFound(_)) => {
                return Err(ProgressError::RequestNotFound);
            }
            Err(error) => return Err(error),
        };
        if identity.tenant_id != record.tenant_id || identity.user_id != record.user_id {
            return Err(ProgressError::RequestNotFound);
        }
        let (changed, guard) = self
            .change(&record.id, Durability::Immediate, |r, _| {
                if r.connection_id == connection_id {
                    return Ok(None);
                }
                r.connection_id = connection_id.clone();
                Ok(Some(Effects {
                    binding_only: true,
                    ..Effects::none()
                }))
            })
            .await?;
        // Written only when the binding really moved (under the request's
        // lock), so two concurrent resumes do not both re-send.
        let moved = changed.written;
        let record = changed.record;
        if moved && let Some(message) = client::final_message(&record, true) {
            // A client that resumed on a new connection may have missed the
            // outcome: it gets it again there, as the same message (same
            // sequence and timestamp) marked as a replay. The connection
            // that was bound already had it; were the binding to move back
            // there, its edge would not write that sequence again.
            self.outboxes
                .final_message(&record, record.sequence, message);
        }
        drop(guard);
        tracing::info!(request = %record.id, connection_id = %record.connection_id, "delivery resumed on a new connection");
        Ok(record)
    }

    /// The request now, then each change, until it finishes.
    pub async fn watch(
        &self,
        lookup: Lookup,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<RequestRecord>, ProgressError> {
        // Subscribe first, so no change between the read and the
        // subscription is missed.
        let mut updates = self.updates.subscribe();
        let record = self.find(&lookup, caller).await?;
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let id = record.id.clone();
            let mut version = record.version;
            let mut finished = record.status.is_final();
            if tx.send(record).await.is_err() {
                return;
            }
            while !finished {
                let next = tokio::select! {
                    next = updates.recv() => next,
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                };
                let record = match next {
                    Ok(record) if record.id == id => record,
                    Ok(_) => continue,
                    // Missed some: the store has the latest.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match store.get_request(&id).await {
                            Ok(Some(record)) => record,
                            _ => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if record.version <= version {
                    continue;
                }
                version = record.version;
                finished = record.status.is_final();
                if tx.send(record).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    // ---- background ----

    async fn dispatcher(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.dispatch.notified() => {}
                () = self.shutdown.cancelled() => return,
            }
            loop {
                let plan = self.registry().plan();
                if plan.is_empty() {
                    break;
                }
                let results =
                    futures::future::join_all(plan.into_iter().map(|a| self.assign(a))).await;
                if self.shutdown.is_cancelled() {
                    return;
                }
                if results.contains(&AssignOutcome::StoreFailed) {
                    // The store is failing: re-planning at once would spin.
                    // Wait for the next notification (the sweeper's tick
                    // sends one) before trying again.
                    break;
                }
            }
        }
    }

    async fn assign(&self, a: Assignment) -> AssignOutcome {
        let result = self
            .change(&a.id, Durability::Immediate, |r, now| {
                if r.status != RequestStatus::Pending {
                    return Ok(None);
                }
                r.status = RequestStatus::Processing;
                r.attempts += 1;
                r.processor_id = Some(a.processor_id.clone());
                r.lease_expires_at_ms = Some(now + a.lease.as_millis() as u64);
                r.error = None;
                Ok(Some(Effects::none()))
            })
            .await;
        let (changed, guard) = match result {
            Ok(ok) => ok,
            Err(error) => {
                tracing::warn!(request = %a.id, %error, "cannot hand out request; it stays queued");
                // Still PENDING in the store: back in the queue, and the
                // sweeper's next tick tries again.
                self.registry().release_hold(&a.id);
                match self.store.get_request(&a.id).await {
                    Ok(Some(record)) => self.registry().track(&record),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(request = %a.id, %error, "cannot re-read request; it is queued again at the next start");
                    }
                }
                return AssignOutcome::StoreFailed;
            }
        };
        if !changed.written {
            // Someone else moved it first (cancelled, or another replica).
            let mut registry = self.registry();
            if registry
                .holds
                .get(&a.id)
                .is_some_and(|h| h.session == a.session)
            {
                registry.release_hold(&a.id);
            }
            return AssignOutcome::Done;
        }
        let record = changed.record;
        let span = streamer_core::trace::child_of(&record.trace_context, || {
            tracing::info_span!(
                "progress.dispatch",
                otel.kind = "producer",
                id = %record.id,
                request_id = %record.client_request_id,
                tenant_id = %record.tenant_id,
                processor_id = %a.processor_id,
                attempt = record.attempts,
            )
        });
        let sent = span.in_scope(|| {
            let registry = self.registry();
            registry.sessions.get(&a.session).is_some_and(|s| {
                s.tx.send(v1::ClaimResponse {
                    item: Some(v1::claim_response::Item::Work(model::request_to_proto(
                        record.clone(),
                    ))),
                    ..Default::default()
                })
                .is_ok()
            })
        });
        if sent {
            span.in_scope(|| tracing::info!(request = %record.id, processor = %a.processor_id, attempt = record.attempts, "request handed out"));
            metrics::counter!("streamer_progress_requests_dispatched_total").increment(1);
            return AssignOutcome::Done;
        }
        // The stream ended while the write was in flight: give it back.
        drop(guard);
        let result = self
            .change(&a.id, Durability::Immediate, |r, _| {
                if r.status != RequestStatus::Processing
                    || r.processor_id.as_deref() != Some(a.processor_id.as_str())
                    || r.attempts != record.attempts
                {
                    return Ok(None);
                }
                r.status = RequestStatus::Pending;
                r.processor_id = None;
                r.lease_expires_at_ms = None;
                r.attempts = r.attempts.saturating_sub(1);
                Ok(Some(Effects::none()))
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(request = %a.id, %error, "cannot give back request; its lease will lapse");
        }
        AssignOutcome::Done
    }

    /// Mirrors what the store knows and this replica may not: PENDING work
    /// of the actions its processors run, and lapsed leases (which the
    /// sweeper then takes back).
    async fn store_poller(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.store_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let actions: HashSet<String> = self
                .registry()
                .sessions
                .values()
                .flat_map(|s| s.actions.iter().cloned())
                .collect();
            let mut found = false;
            for action in actions {
                match self.store.pending_requests(&action, POLL_BATCH).await {
                    Ok(records) => {
                        let mut registry = self.registry();
                        for record in &records {
                            // One being handed out here is ours already.
                            if !registry.holds.contains_key(&record.id)
                                && !registry.pending_since.contains_key(&record.id)
                            {
                                registry.track(record);
                                found = true;
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%action, %error, "cannot look for pending work"),
                }
            }
            match self.store.lapsed_leases(now_ms(), POLL_BATCH).await {
                Ok(records) => {
                    let mut registry = self.registry();
                    for record in &records {
                        registry.track(record);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot look for lapsed leases"),
            }
            if found {
                self.dispatch.notify_one();
            }
        }
    }

    async fn sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let now = now_ms();
            let (lapsed, has_pending) = {
                let registry = self.registry();
                let lapsed: Vec<RequestId> = registry
                    .leases
                    .iter()
                    .filter(|(_, expiry)| **expiry <= now)
                    .map(|(id, _)| id.clone())
                    .collect();
                (lapsed, !registry.pending.is_empty())
            };
            for id in lapsed {
                let result = self
                    .change(&id, Durability::Immediate, |r, now| {
                        if r.status != RequestStatus::Processing
                            || r.lease_expires_at_ms.is_some_and(|expiry| expiry > now)
                        {
                            // Renewed or finished: `change` re-syncs the index.
                            return Ok(None);
                        }
                        tracing::info!(request = %r.id, processor = ?r.processor_id, attempt = r.attempts, "lease lapsed");
                        Ok(Some(requeue_or_fail(
                            r,
                            "TIMEOUT",
                            "the processor's lease lapsed",
                            true,
                        )))
                    })
                    .await;
                match result {
                    // Counted once written: a conflict runs the change again.
                    Ok((changed, _)) if changed.written => {
                        metrics::counter!("streamer_progress_leases_lapsed_total").increment(1);
                    }
                    Ok(_) => {}
                    Err(ProgressError::RequestNotFound) => {
                        self.registry().leases.remove(&id);
                    }
                    Err(error) => {
                        tracing::warn!(request = %id, %error, "cannot take back lapsed lease")
                    }
                }
            }
            let undelivered: Vec<RequestId> = self
                .registry()
                .undelivered
                .iter()
                .filter(|(_, expiry)| **expiry <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in undelivered {
                self.take_over_delivery(&id).await;
            }
            if has_pending {
                // Covers hand-outs that failed on a store error.
                self.dispatch.notify_one();
            }
        }
    }

    /// A final message whose delivery lease lapsed (the replica that had it
    /// died, or could not reach the client for the whole lease): this
    /// replica takes the lease (a conditional write, so one replica does)
    /// and sends the message again.
    async fn take_over_delivery(&self, id: &RequestId) {
        let result = self
            .change(id, Durability::Immediate, |r, now| {
                if !r.final_pending || r.lease_expires_at_ms.is_some_and(|expiry| expiry > now) {
                    return Ok(None);
                }
                tracing::info!(request = %r.id, "final message not confirmed delivered; sending it again");
                Ok(Some(Effects {
                    final_message: true,
                    binding_only: true,
                    ..Effects::none()
                }))
            })
            .await;
        match result {
            Ok(_) => {}
            Err(ProgressError::RequestNotFound) => {
                self.registry().undelivered.remove(id);
            }
            Err(error) => tracing::warn!(request = %id, %error, "cannot take over a final message"),
        }
    }
}

/// The outbox delivered a final message (or learned the connection is gone,
/// so the client finds it with `get_request`): the request is settled, its
/// delivery lease released. A conditional write like every other change;
/// when it cannot be made, the lease lapses and the message is sent again.
pub(crate) async fn final_delivered(store: &SharedStore, id: &RequestId, sequence: u64) {
    for _ in 0..CONFLICT_RETRIES {
        let mut record = match store.get_request(id).await {
            Ok(Some(record)) if record.final_pending && record.sequence == sequence => record,
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(request = %id, %error, "cannot record a final message as delivered");
                return;
            }
        };
        record.final_pending = false;
        record.lease_expires_at_ms = None;
        match store.update_request(record, Durability::Relaxed).await {
            Ok(_) => return,
            Err(StoreError::Conflict) => continue,
            Err(error) => {
                tracing::warn!(request = %id, %error, "cannot record a final message as delivered");
                return;
            }
        }
    }
}

/// The caller must hold the lease of a PROCESSING request.
fn holds_lease(r: &RequestRecord, processor_id: &str) -> Result<(), ProgressError> {
    if r.status.is_final() {
        return Err(ProgressError::already_finished(&r.id, r.status));
    }
    if r.status != RequestStatus::Processing || r.processor_id.as_deref() != Some(processor_id) {
        return Err(ProgressError::NotLeaseHolder {
            id: r.id.clone(),
            processor_id: processor_id.to_owned(),
        });
    }
    Ok(())
}

/// Tells a processor to stop working on a request.
fn cancel_notice(id: &RequestId, reason: v1::CancelReason) -> v1::ClaimResponse {
    v1::ClaimResponse {
        item: Some(v1::claim_response::Item::Cancelled(id.to_string())),
        cancel_reason: reason.into(),
    }
}

/// Takes a request back from its processor: queued again while attempts
/// remain, else failed with `code`.
fn requeue_or_fail(
    r: &mut RequestRecord,
    code: &str,
    message: &str,
    tell_processor: bool,
) -> Effects {
    let processor = r
        .processor_id
        .take()
        .filter(|_| tell_processor)
        .map(|processor| (processor, v1::CancelReason::LeaseLapsed));
    r.lease_expires_at_ms = None;
    if r.attempts < r.max_attempts {
        r.status = RequestStatus::Pending;
        return Effects {
            stop_processor: processor,
            ..Effects::none()
        };
    }
    let mut details = Map::new();
    details.insert("attempts".to_owned(), Value::from(r.attempts));
    r.status = RequestStatus::Failed;
    r.error = Some(RequestError {
        code: code.to_owned(),
        message: format!("{message} after {} attempts", r.attempts),
        details,
    });
    r.sequence += 1;
    Effects::final_message(processor)
}

/// Ends a Claim session when dropped (tonic drops the response stream when
/// the processor goes away or the call is cancelled).
pub(crate) struct SessionGuard {
    lifecycle: Arc<Lifecycle>,
    session: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.lifecycle.session_ended(self.session);
    }
}
