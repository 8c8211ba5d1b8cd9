//! The edges attached to this ConnectionService and the deliveries in
//! flight to them.
//!
//! Each edge holds one `Attach` stream. Commands go down an mpsc channel
//! that feeds the stream; a `deliver` command carries an id, and the edge's
//! `DeliveryReport` with that id resolves the waiting caller, so `Send` and
//! `Broadcast` report what really happened to each socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use streamer_api::v1::{self, DeliveryOutcome, DeliveryResult, EdgeCommand, edge_command::Command};
use streamer_core::ids::{ConnectionId, EdgeId};
use tokio::sync::{mpsc, oneshot};

/// Longest wait for room in an edge's command queue.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What flows down an Attach stream.
pub type CommandSender = mpsc::Sender<Result<EdgeCommand, tonic::Status>>;

/// One attached edge.
#[derive(Debug)]
pub struct EdgeLink {
    pub edge_id: EdgeId,
    /// Distinguishes a re-attached edge from its previous stream.
    pub generation: u64,
    commands: CommandSender,
    /// Deliveries awaiting the edge's report. A std mutex: held only to
    /// insert or remove one entry, never across an await.
    pending: Mutex<HashMap<u64, oneshot::Sender<Vec<DeliveryResult>>>>,
}

impl EdgeLink {
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let delivery_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(delivery_id, tx);
        let command = EdgeCommand {
            command: Some(Command::Deliver(v1::Deliver {
                delivery_id,
                connection_ids: connection_ids.iter().map(ToString::to_string).collect(),
                payload: Some(payload),
                sequence,
            })),
        };
        let sent = tokio::time::timeout(timeout, self.commands.send(Ok(command))).await;
        if !matches!(sent, Ok(Ok(()))) {
            self.lock_pending().remove(&delivery_id);
            tracing::warn!(edge_id = %self.edge_id, "edge stream closed or full; delivery unavailable");
            return Self::outcome_all(&connection_ids, DeliveryOutcome::Unavailable);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(results)) => self.reconcile(&connection_ids, results),
            Ok(Err(_)) => {
                // The stream ended before the report came (see `abandon`).
                tracing::info!(edge_id = %self.edge_id, delivery_id, "edge detached before reporting a delivery");
                Self::outcome_all(&connection_ids, DeliveryOutcome::Unavailable)
            }
            Err(_) => {
                self.lock_pending().remove(&delivery_id);
                metrics::counter!("streamer_delivery_report_timeouts_total").increment(1);
                tracing::warn!(edge_id = %self.edge_id, delivery_id, "edge did not report a delivery in time");
                Self::outcome_all(&connection_ids, DeliveryOutcome::Unavailable)
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

    /// Resolves a waiting delivery with the edge's report.
    pub fn report(&self, report: v1::DeliveryReport) {
        if let Some(waiter) = self.lock_pending().remove(&report.delivery_id) {
            let _ = waiter.send(report.results);
        }
    }

    /// Queues a command without ever blocking the caller: the event loop
    /// that calls this must keep reading the edge's events, or the edge and
    /// this service could each wait for the other's full queue.
    pub fn command_nowait(&self, command: Command) {
        let command = EdgeCommand {
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
        let send = self.commands.send(Ok(EdgeCommand {
            command: Some(command),
        }));
        matches!(
            tokio::time::timeout(COMMAND_TIMEOUT, send).await,
            Ok(Ok(()))
        )
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Vec<DeliveryResult>>>> {
        // A poisoned map only means a panic elsewhere mid-insert; the map
        // itself is still consistent, so keep using it.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    pub fn attach(&self, edge_id: EdgeId, commands: CommandSender) -> Arc<EdgeLink> {
        let link = Arc::new(EdgeLink {
            edge_id: edge_id.clone(),
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            commands,
            pending: Mutex::new(HashMap::new()),
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
        let link = registry.attach(EdgeId::from("edge-1"), tx);
        let edge = link.clone();
        tokio::spawn(async move {
            let Some(Ok(EdgeCommand {
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
            edge.report(v1::DeliveryReport {
                delivery_id: deliver.delivery_id,
                results: vec![
                    result("someone-elses", DeliveryOutcome::Gone),
                    result("mine", DeliveryOutcome::Delivered),
                ],
            });
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
