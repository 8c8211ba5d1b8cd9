//! Per-request outboxes: the one place that decides what a client is sent,
//! and when.
//!
//! Each request with something to say has one task that sends strictly in
//! order, awaiting each `Send` before the next:
//!
//! 1. the acknowledgment, first;
//! 2. progress, at most `progress_rate` per second, coalesced in a single
//!    latest-wins slot (a newer update replaces an unsent older one);
//! 3. the final `complete` or `error`, which is never dropped, discards any
//!    unsent progress, and ends the task: nothing follows it;
//! 4. every message carries its identity, the request and its sequence
//!    number (the acknowledgment's is 0), and a retry carries the same one.
//!    A send whose outcome is unknown (the edge did not confirm in time) is
//!    retried; the edge writes each number at most once per socket and
//!    never after a higher one (`gateway/src/sequences.rs` says why there),
//!    so a retry cannot reach the client twice.
//!
//! Messages go to the request's connection as stored *at send time*, so a
//! client that resumed on a new connection gets what follows there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use streamer_core::store::RequestRecord;
use streamer_core::trace::TraceContext;
use tracing::Instrument as _;

use serde_json::Value;
use streamer_core::ids::{ConnectionId, RequestId, TenantId};
use streamer_core::shutdown::Shutdown;
use streamer_core::store::SharedStore;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::connections::{ConnectionDirectory, Delivery};

/// Attempts at an acknowledgment or final message while ConnectionService,
/// or the client's edge, is unavailable: with the backoff below about a
/// minute, long enough to ride out a restart or an edge re-attaching.
const IMPORTANT_ATTEMPTS: u32 = 35;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Acknowledgment,
    Progress,
    Final,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Acknowledgment => "acknowledgment",
            Kind::Progress => "progress",
            Kind::Final => "final",
        }
    }
}

/// What is waiting to be sent for one request.
#[derive(Default)]
struct Slots {
    /// Always sequence 0.
    acknowledgment: Option<Traced>,
    /// Latest wins; with its sequence, so an older update arriving late
    /// never replaces a newer one.
    progress: Option<(u64, Traced)>,
    /// The highest progress sequence accepted so far.
    progress_sequence: u64,
    final_message: Option<(u64, Traced)>,
    /// Set once the final message was taken: later pushes are ignored.
    closed: bool,
}

/// A message, with the trace of the span that queued it (its delivery
/// continues that trace).
struct Traced {
    message: Value,
    trace: TraceContext,
}

impl Traced {
    /// `message` about `record`, in the current span's trace when that is
    /// the request's own (a processor that passed the context on), else in
    /// the trace the request was accepted in.
    fn new(message: Value, record: &RequestRecord) -> Self {
        Traced {
            message,
            trace: streamer_core::trace::current_within(&record.trace_context),
        }
    }
}

struct Mailbox {
    slots: Mutex<Slots>,
    wake: Notify,
}

impl Mailbox {
    /// The slots' lock guards a few field assignments and is never held
    /// across an await; a poisoned one still holds consistent data.
    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Context {
    store: SharedStore,
    connections: ConnectionDirectory,
    /// `None`: progress is not rate-limited.
    min_interval: Option<Duration>,
    shutdown: Shutdown,
    tasks: TaskTracker,
}

/// Every live outbox, by request id. A cheap-to-clone handle.
#[derive(Clone)]
pub(crate) struct Outboxes {
    ctx: Arc<Context>,
    // A plain mutex: lookups and inserts only, never held across an await.
    live: Arc<Mutex<HashMap<RequestId, Arc<Mailbox>>>>,
}

impl Outboxes {
    pub fn new(
        store: SharedStore,
        connections: ConnectionDirectory,
        progress_rate: f64,
        shutdown: Shutdown,
        tasks: TaskTracker,
    ) -> Self {
        let min_interval = (progress_rate.is_finite() && progress_rate > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / progress_rate));
        Self {
            ctx: Arc::new(Context {
                store,
                connections,
                min_interval,
                shutdown,
                tasks,
            }),
            live: Arc::default(),
        }
    }

    fn live(&self) -> MutexGuard<'_, HashMap<RequestId, Arc<Mailbox>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The request's mailbox, starting its sender task if it has none.
    /// With `reopen`, a mailbox whose final message is already on its way
    /// is replaced by a new one (and task): a final sent again to a client
    /// that resumed elsewhere must not be lost to that race. The old task
    /// finishes its own send; each goes to one socket, in order there.
    fn mailbox(
        &self,
        id: &RequestId,
        tenant_id: &TenantId,
        connection_id: &ConnectionId,
        reopen: bool,
    ) -> Arc<Mailbox> {
        let mut live = self.live();
        if let Some(mailbox) = live.get(id)
            && !(reopen && mailbox.slots().closed)
        {
            return mailbox.clone();
        }
        let mailbox = Arc::new(Mailbox {
            slots: Mutex::default(),
            wake: Notify::new(),
        });
        live.insert(id.clone(), mailbox.clone());
        drop(live);
        let sender = Sender {
            outboxes: self.clone(),
            mailbox: mailbox.clone(),
            id: id.clone(),
            tenant_id: tenant_id.clone(),
            connection_id: connection_id.clone(),
        };
        self.ctx.tasks.spawn(sender.run());
        mailbox
    }

    pub fn acknowledgment(&self, record: &RequestRecord, message: Value) {
        let mailbox = self.mailbox(&record.id, &record.tenant_id, &record.connection_id, false);
        let mut slots = mailbox.slots();
        if slots.closed {
            return;
        }
        slots.acknowledgment = Some(Traced::new(message, record));
        drop(slots);
        mailbox.wake.notify_one();
    }

    pub fn progress(&self, record: &RequestRecord, sequence: u64, message: Value) {
        let mailbox = self.mailbox(&record.id, &record.tenant_id, &record.connection_id, false);
        let mut slots = mailbox.slots();
        if slots.closed || slots.final_message.is_some() || sequence <= slots.progress_sequence {
            return;
        }
        slots.progress_sequence = sequence;
        if slots
            .progress
            .replace((sequence, Traced::new(message, record)))
            .is_some()
        {
            metrics::counter!("streamer_progress_coalesced_total").increment(1);
        }
        drop(slots);
        mailbox.wake.notify_one();
    }

    pub fn final_message(&self, record: &RequestRecord, sequence: u64, message: Value) {
        let mailbox = self.mailbox(&record.id, &record.tenant_id, &record.connection_id, true);
        let mut slots = mailbox.slots();
        if slots.closed {
            return;
        }
        if slots.progress.take().is_some() {
            metrics::counter!("streamer_progress_coalesced_total").increment(1);
        }
        slots.final_message = Some((sequence, Traced::new(message, record)));
        drop(slots);
        mailbox.wake.notify_one();
    }

    fn remove(&self, id: &RequestId, mailbox: &Arc<Mailbox>) {
        let mut live = self.live();
        if live.get(id).is_some_and(|m| Arc::ptr_eq(m, mailbox)) {
            live.remove(id);
        }
    }
}

enum Next {
    Send(Kind, u64, Traced),
    WaitUntil(Instant),
    Idle,
}

/// The task behind one mailbox.
struct Sender {
    outboxes: Outboxes,
    mailbox: Arc<Mailbox>,
    id: RequestId,
    tenant_id: TenantId,
    /// The connection known when the mailbox opened; used only when the
    /// store cannot say which one is current.
    connection_id: ConnectionId,
}

impl Sender {
    async fn run(self) {
        let ctx = self.outboxes.ctx.clone();
        let mut last_progress: Option<Instant> = None;
        loop {
            let next = {
                let mut slots = self.mailbox.slots();
                if let Some(message) = slots.acknowledgment.take() {
                    Next::Send(Kind::Acknowledgment, 0, message)
                } else if let Some((sequence, message)) = slots.final_message.take() {
                    slots.closed = true;
                    Next::Send(Kind::Final, sequence, message)
                } else if slots.progress.is_some() {
                    let due = match (last_progress, ctx.min_interval) {
                        (Some(last), Some(interval)) => last + interval,
                        _ => Instant::now(),
                    };
                    if due <= Instant::now() {
                        match slots.progress.take() {
                            Some((sequence, message)) => {
                                Next::Send(Kind::Progress, sequence, message)
                            }
                            None => Next::Idle,
                        }
                    } else {
                        Next::WaitUntil(due)
                    }
                } else {
                    Next::Idle
                }
            };
            match next {
                Next::Send(kind, sequence, message) => {
                    if kind == Kind::Progress {
                        last_progress = Some(Instant::now());
                    }
                    let span = streamer_core::trace::child_of(&message.trace, || {
                        tracing::info_span!(
                            "progress.deliver",
                            otel.kind = "producer",
                            id = %self.id,
                            tenant_id = %self.tenant_id,
                            kind = kind.label(),
                            sequence,
                        )
                    });
                    let settled = self
                        .deliver(kind, sequence, message.message)
                        .instrument(span)
                        .await;
                    if kind == Kind::Final {
                        if settled {
                            crate::lifecycle::final_delivered(&ctx.store, &self.id, sequence).await;
                        }
                        break;
                    }
                }
                Next::WaitUntil(due) => {
                    tokio::select! {
                        () = self.mailbox.wake.notified() => {}
                        () = tokio::time::sleep_until(due) => {}
                        () = ctx.shutdown.cancelled() => break,
                    }
                }
                Next::Idle => {
                    tokio::select! {
                        () = self.mailbox.wake.notified() => {}
                        () = ctx.shutdown.cancelled() => break,
                    }
                }
            }
        }
        {
            // Whatever is still queued stays in the store, where a client
            // that asks again finds it.
            let mut slots = self.mailbox.slots();
            slots.closed = true;
        }
        self.outboxes.remove(&self.id, &self.mailbox);
    }

    /// The connection the request's updates go to now.
    async fn current_connection(&self) -> ConnectionId {
        match self.outboxes.ctx.store.get_request(&self.id).await {
            Ok(Some(record)) => record.connection_id,
            Ok(None) => self.connection_id.clone(),
            Err(error) => {
                tracing::warn!(request = %self.id, %error, "cannot read request; sending to its last known connection");
                self.connection_id.clone()
            }
        }
    }

    /// Sends one message, retrying while its outcome is unknown; whether
    /// that settled it (delivered, or the connection is known to be gone).
    async fn deliver(&self, kind: Kind, sequence: u64, message: Value) -> bool {
        let ctx = &self.outboxes.ctx;
        let attempts = if kind == Kind::Progress {
            // A newer update will follow, or the final one will.
            1
        } else {
            IMPORTANT_ATTEMPTS
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=attempts {
            let connection_id = self.current_connection().await;
            match ctx
                .connections
                .send(
                    &connection_id,
                    &self.tenant_id,
                    (&self.id, sequence),
                    message.clone(),
                )
                .await
            {
                Delivery::Delivered => {
                    metrics::counter!("streamer_progress_delivered_total", "kind" => kind.label())
                        .increment(1);
                    return true;
                }
                Delivery::Gone => {
                    // The state is stored: the client can resume with Get.
                    tracing::debug!(request = %self.id, connection_id = connection_id.as_str(), kind = kind.label(), "connection gone; message dropped");
                    metrics::counter!("streamer_progress_dropped_total", "kind" => kind.label())
                        .increment(1);
                    return true;
                }
                Delivery::Unavailable if attempt < attempts && !ctx.shutdown.is_cancelled() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Delivery::Unavailable => {
                    tracing::warn!(request = %self.id, connection_id = connection_id.as_str(), kind = kind.label(), attempt, "connection service unavailable; message dropped");
                    break;
                }
            }
        }
        metrics::counter!("streamer_progress_dropped_total", "kind" => kind.label()).increment(1);
        false
    }
}
