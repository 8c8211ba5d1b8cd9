//! The edges attached to this ConnectionService and the deliveries in
//! flight to them.
//!
//! Each edge holds one `Attach` stream. Commands go down an mpsc channel
//! that feeds the stream; a `deliver`, `watch` or `fanout` command carries
//! an id, and the edge's report with that id resolves the waiting caller,
//! so `Send`, `Broadcast` and `Publish` report what really happened.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use streamer_api::v1::{
    self, AttachResponse, DeliveryOutcome, DeliveryResult, attach_response::Command,
};
use streamer_core::ids::{ConnectionId, EdgeId, TenantId};
use streamer_core::store::APIGATEWAY_EDGE_ID;
use tokio::sync::{mpsc, oneshot};

/// Longest wait for room in an edge's command queue.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What flows down an Attach stream.
pub type CommandSender = mpsc::Sender<Result<AttachResponse, tonic::Status>>;

/// One attached edge.
#[derive(Debug)]
pub struct EdgeLink {
    pub edge_id: EdgeId,
    /// The edge is AWS API Gateway's integration (see `EdgeHello`): it
    /// speaks for the connections API Gateway holds.
    pub apigateway: bool,
    /// Distinguishes a re-attached edge from its previous stream.
    pub generation: u64,
    commands: CommandSender,
    /// Commands awaiting the edge's report. A std mutex: held only to
    /// insert or remove one entry, never across an await.
    pending: Arc<Mutex<Pending>>,
}

/// Commands awaiting a report, by delivery id.
type Pending = HashMap<u64, oneshot::Sender<Report>>;

/// An edge's answer to a command that wants one.
#[derive(Debug)]
pub enum Report {
    /// To `deliver` and `watch`: one result per socket.
    Delivered(Vec<DeliveryResult>),
    /// To `fanout`: counts.
    FannedOut(v1::FanoutReport),
}

/// The next id of a command that wants a report (unique per process, so
/// that a report can never be taken for another command's).
fn next_delivery_id() -> u64 {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl EdgeLink {
    /// The edge id of the connections this edge speaks for: its own, or,
    /// for API Gateway's integration, [`APIGATEWAY_EDGE_ID`].
    pub fn holder(&self) -> EdgeId {
        if self.apigateway {
            EdgeId::from(APIGATEWAY_EDGE_ID)
        } else {
            self.edge_id.clone()
        }
    }

    /// The same outcome for every one of `ids`.
    pub fn outcome_all(ids: &[ConnectionId], outcome: DeliveryOutcome) -> Vec<DeliveryResult> {
        ids.iter()
            .map(|id| DeliveryResult {
                connection_id: id.to_string(),
                outcome: outcome as i32,
            })
            .collect()
    }

    /// Hands a payload to the edge for these sockets and waits for its
    /// report. An edge whose stream is closed, or that does not answer in
    /// `timeout`, leaves every target UNAVAILABLE:
    /// the payload may or may not have been written (a slow edge may write
    /// it after the wait ends), the sockets may well be there, and so
    /// their records stay. Senders that retry pass a `sequence`, so a retry
    /// of something the edge did write is not written again.
    pub async fn deliver(
        &self,
        connection_ids: Vec<ConnectionId>,
        payload: v1::Payload,
        sequence: Option<v1::Sequence>,
        timeout: Duration,
    ) -> Vec<DeliveryResult> {
        let command = |delivery_id| {
            Command::Deliver(v1::Deliver {
                delivery_id,
                connection_ids: connection_ids.iter().map(ToString::to_string).collect(),
                payload: Some(payload),
                sequence,
                trace_context: streamer_core::trace::current(),
            })
        };
        match self.ask(command, timeout).await {
            Some(Report::Delivered(results)) => self.reconcile(&connection_ids, results),
            _ => Self::outcome_all(&connection_ids, DeliveryOutcome::Unavailable),
        }
    }

    /// Subscribes these sockets to a topic on the edge and waits for its
    /// report (UNAVAILABLE for each when none comes in `timeout`).
    pub async fn watch(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        connection_ids: Vec<ConnectionId>,
        timeout: Duration,
    ) -> Vec<DeliveryResult> {
        let command = |delivery_id| {
            Command::Watch(v1::Watch {
                delivery_id,
                tenant_id: tenant_id.to_string(),
                topic: topic.to_owned(),
                connection_ids: connection_ids.iter().map(ToString::to_string).collect(),
            })
        };
        match self.ask(command, timeout).await {
            Some(Report::Delivered(results)) => self.reconcile(&connection_ids, results),
            _ => Self::outcome_all(&connection_ids, DeliveryOutcome::Unavailable),
        }
    }

    /// Hands the edge a payload for every socket a selector picks, and
    /// returns once the command is queued on the stream (so commands
    /// dispatched one after another reach the edge in that order), with
    /// the wait for the edge's counts: `None` when none came in `timeout`.
    pub async fn dispatch_fan_out(
        &self,
        selector: v1::fanout::Selector,
        payload: v1::Payload,
        timeout: Duration,
    ) -> impl Future<Output = Option<v1::FanoutReport>> + Send + 'static {
        let command = |delivery_id| {
            Command::Fanout(v1::Fanout {
                delivery_id,
                selector: Some(selector),
                payload: Some(payload),
                trace_context: streamer_core::trace::current(),
            })
        };
        let report = self.send_asking(command, timeout).await;
        async move {
            match report.await {
                Some(Report::FannedOut(report)) => Some(report),
                _ => None,
            }
        }
    }

    /// Sends the command `make` builds around a fresh delivery id and waits
    /// for the edge's report on it (see [`Self::send_asking`]).
    async fn ask(&self, make: impl FnOnce(u64) -> Command, timeout: Duration) -> Option<Report> {
        self.send_asking(make, timeout).await.await
    }

    /// Queues the command `make` builds around a fresh delivery id, and
    /// returns the wait for the edge's report on it: `None` when the
    /// stream is closed or full, or no report comes in `timeout` (the
    /// command may or may not have been carried out).
    async fn send_asking(
        &self,
        make: impl FnOnce(u64) -> Command,
        timeout: Duration,
    ) -> impl Future<Output = Option<Report>> + Send + 'static {
        let delivery_id = next_delivery_id();
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(delivery_id, tx);
        let command = AttachResponse {
            command: Some(make(delivery_id)),
        };
        let sent = tokio::time::timeout(timeout, self.commands.send(Ok(command))).await;
        let edge_id = self.edge_id.clone();
        let queued = matches!(sent, Ok(Ok(())));
        if !queued {
            self.lock_pending().remove(&delivery_id);
            tracing::warn!(edge_id = %edge_id, "edge stream closed or full; delivery unavailable");
        }
        let pending = self.pending.clone();
        async move {
            if !queued {
                return None;
            }
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(report)) => Some(report),
                Ok(Err(_)) => {
                    // The stream ended before the report came (see `abandon`).
                    tracing::info!(edge_id = %edge_id, delivery_id, "edge detached before reporting a delivery");
                    None
                }
                Err(_) => {
                    lock(&pending).remove(&delivery_id);
                    metrics::counter!("streamer_delivery_report_timeouts_total").increment(1);
                    tracing::warn!(edge_id = %edge_id, delivery_id, "edge did not report a delivery in time");
                    None
                }
            }
        }
    }

    /// An edge's report, taken for what it was asked about only: one result
    /// per asked id, in the asked order; an asked id the report leaves out
    /// is UNAVAILABLE, and a result for an id that was not asked is
    /// dropped (an edge speaks only for its own sockets: a GONE it made up
    /// for another edge's connection would have that record removed).
    fn reconcile(
        &self,
        asked: &[ConnectionId],
        reported: Vec<DeliveryResult>,
    ) -> Vec<DeliveryResult> {
        let mut outcomes: HashMap<&str, Option<i32>> =
            asked.iter().map(|id| (id.as_str(), None)).collect();
        for result in reported {
            match outcomes.get_mut(result.connection_id.as_str()) {
                Some(outcome) => *outcome = Some(result.outcome),
                None => {
                    tracing::warn!(edge_id = %self.edge_id, connection_id = %result.connection_id, "edge reported on a connection it was not asked about; ignored");
                }
            }
        }
        asked
            .iter()
            .map(|id| DeliveryResult {
                connection_id: id.to_string(),
                outcome: outcomes
                    .get(id.as_str())
                    .copied()
                    .flatten()
                    .unwrap_or(DeliveryOutcome::Unavailable as i32),
            })
            .collect()
    }

    /// The stream is gone: every delivery still waiting for a report is
    /// answered UNAVAILABLE now rather than when its wait runs out.
    pub fn abandon(&self) {
        self.lock_pending().clear();
    }

    /// Resolves a waiting command with the edge's report.
    pub fn report(&self, delivery_id: u64, report: Report) {
        if let Some(waiter) = self.lock_pending().remove(&delivery_id) {
            let _ = waiter.send(report);
        }
    }

    /// Queues a command without ever blocking the caller: the event loop
    /// that calls this must keep reading the edge's events, or the edge and
    /// this service could each wait for the other's full queue.
    pub fn command_nowait(&self, command: Command) {
        let command = AttachResponse {
            command: Some(command),
        };
        match self.commands.try_send(Ok(command)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(command)) => {
                let commands = self.commands.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), commands.send(command)).await;
                });
            }
        }
    }

    /// Ends the stream with `status` (after what is queued): the edge
    /// attaches again, and announces what it holds.
    pub fn end(&self, status: tonic::Status) {
        if let Err(mpsc::error::TrySendError::Full(ended)) = self.commands.try_send(Err(status)) {
            let commands = self.commands.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(COMMAND_TIMEOUT, commands.send(ended)).await;
            });
        }
    }

    /// Resolves when the stream has ended.
    pub async fn closed(&self) {
        self.commands.closed().await;
    }

    /// Queues a command that needs no answer.
    pub async fn command(&self, command: Command) -> bool {
        let send = self.commands.send(Ok(AttachResponse {
            command: Some(command),
        }));
        matches!(
            tokio::time::timeout(COMMAND_TIMEOUT, send).await,
            Ok(Ok(()))
        )
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        lock(&self.pending)
    }
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // A poisoned map only means a panic elsewhere mid-insert; the map
    // itself is still consistent, so keep using it.
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every attached edge by id. An edge may hold more than one stream to this
/// replica for a moment (a re-attach before the old stream's end is seen,
/// or a name resolving to this replica twice): deliveries take its newest,
/// and it stays attached until its last stream ends.
#[derive(Debug, Default)]
pub struct EdgeRegistry {
    /// A std RwLock: lookups on every delivery, writes only on attach and
    /// detach; never held across an await.
    edges: RwLock<HashMap<EdgeId, Vec<Arc<EdgeLink>>>>,
    generations: AtomicU64,
}

impl EdgeRegistry {
    /// Registers one of an edge's streams.
    pub fn attach(
        &self,
        edge_id: EdgeId,
        apigateway: bool,
        commands: CommandSender,
    ) -> Arc<EdgeLink> {
        let link = Arc::new(EdgeLink {
            edge_id: edge_id.clone(),
            apigateway,
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            commands,
            pending: Arc::default(),
        });
        self.write().entry(edge_id).or_default().push(link.clone());
        metrics::gauge!("streamer_edges_attached").set(self.len() as f64);
        link
    }

    /// Removes one stream of an edge. Returns whether the edge has no
    /// stream left.
    pub fn detach(&self, link: &EdgeLink) -> bool {
        let mut edges = self.write();
        let gone = match edges.get_mut(&link.edge_id) {
            Some(links) => {
                links.retain(|l| l.generation != link.generation);
                links.is_empty()
            }
            None => false,
        };
        if gone {
            edges.remove(&link.edge_id);
        }
        drop(edges);
        metrics::gauge!("streamer_edges_attached").set(self.len() as f64);
        gone
    }

    /// Every attached edge's newest stream.
    pub fn all(&self) -> Vec<Arc<EdgeLink>> {
        self.read()
            .values()
            .filter_map(|links| links.last().cloned())
            .collect()
    }

    pub fn get(&self, edge_id: &EdgeId) -> Option<Arc<EdgeLink>> {
        self.read()
            .get(edge_id)
            .and_then(|links| links.last().cloned())
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<EdgeId, Vec<Arc<EdgeLink>>>> {
        self.edges.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<EdgeId, Vec<Arc<EdgeLink>>>> {
        self.edges.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An edge answers for the sockets it was asked about and nothing else:
    /// a GONE it reports for another connection is dropped (it would have
    /// that connection's record removed), and an asked one it leaves out
    /// counts as UNAVAILABLE.
    #[tokio::test]
    async fn a_report_counts_only_for_the_connections_asked_about() {
        let registry = EdgeRegistry::default();
        let (tx, mut commands) = mpsc::channel(4);
        let link = registry.attach(EdgeId::from("edge-1"), false, tx);
        let edge = link.clone();
        tokio::spawn(async move {
            let Some(Ok(AttachResponse {
                command: Some(Command::Deliver(deliver)),
            })) = commands.recv().await
            else {
                panic!("expected a deliver command");
            };
            assert_eq!(deliver.connection_ids, ["mine", "silent"]);
            let result = |id: &str, outcome: DeliveryOutcome| DeliveryResult {
                connection_id: id.into(),
                outcome: outcome as i32,
            };
            edge.report(
                deliver.delivery_id,
                Report::Delivered(vec![
                    result("someone-elses", DeliveryOutcome::Gone),
                    result("mine", DeliveryOutcome::Delivered),
                ]),
            );
        });
        let results = link
            .deliver(
                vec![ConnectionId::from("mine"), ConnectionId::from("silent")],
                v1::Payload::default(),
                None,
                Duration::from_secs(5),
            )
            .await;
        let outcomes: Vec<(String, DeliveryOutcome)> = results
            .into_iter()
            .map(|r| (r.connection_id.clone(), r.outcome()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("mine".to_owned(), DeliveryOutcome::Delivered),
                ("silent".to_owned(), DeliveryOutcome::Unavailable),
            ]
        );
    }
}
