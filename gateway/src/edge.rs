//! The edge's state: the sockets it holds, and its Attach streams, one to
//! each ConnectionService replica, kept open (and re-opened with backoff)
//! for the life of the process. The replicas are found by resolving the
//! configured URLs again and again (a Kubernetes headless Service resolves
//! to every replica), so the edge follows them as they come and go.
//!
//! Deliveries come down any stream. Each event about a connection goes up
//! one stream, chosen by rendezvous hashing of the connection id over the
//! open streams: the same one for as long as the set of replicas holds, so
//! one connection's frames keep their order, and a replica coming or going
//! moves only the connections it gains or loses. A replica that is
//! stopping says so (`drain`): its stream is taken out of that choice at
//! once, answered `drained`, and kept open for the answers it still sends.
//!
//! Each socket has a bounded outbound queue. A delivery that finds the queue
//! full does not wait: the client is a slow consumer, so it is closed with
//! 1008 and the delivery reports THROTTLED. Nobody else is ever stalled.
//! (A conflated topic's message instead takes the place of the waiting
//! message of its key; see [`crate::outbox`].)
//!
//! Tenant, user and topic deliveries come down as one `fanout` command
//! each: the edge finds the sockets in its own indexes ([`crate::audience`])
//! and writes the one encoded frame to each.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use prost::Message as _;
use streamer_api::v1::{
    self, AttachRequest, AttachResponse, DeliveryOutcome, DeliveryResult, attach_request::Event,
    attach_response::Command, edge_service_client::EdgeServiceClient,
};
use streamer_core::ids::{ConnectionId, EdgeId, TenantId, UserId};
use streamer_core::shutdown::Shutdown;
use streamer_core::trace;
use streamer_core::trust::AuthedChannel;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::audience::{self, Directory, Subscribers, TopicKey, TopicMessage};
use crate::outbox::{OutboxReceiver, OutboxSender, TrySendError, outbox};
use crate::sequences::{self, SequenceWindow};

/// What a socket's writer task is asked to do.
#[derive(Debug)]
pub enum Outbound {
    Message(Message),
    Close { code: u16, reason: String },
}

#[derive(Debug)]
struct LocalConnection {
    outbound: OutboxSender,
    /// Cancelled to close the socket at once with 1008, skipping whatever
    /// is still queued (a slow consumer).
    evict: CancellationToken,
    /// Its record as announced, less the connection id (the table's key)
    /// and the edge id (this edge's), protobuf-encoded: it is read only to
    /// announce the connection again and when it closes, and encoded it
    /// takes one small allocation where the record took a dozen fields
    /// inline in this table and an allocation per string.
    record: Box<[u8]>,
    /// The token the client last presented, which ConnectionService
    /// verifies again whenever the connection is announced.
    token: Box<str>,
    /// What was written of each sequenced stream. A std mutex, held only
    /// across the check and the non-blocking queue write that it guards.
    sequences: Mutex<SequenceWindow>,
}

impl LocalConnection {
    fn new(
        outbound: OutboxSender,
        evict: CancellationToken,
        record: &v1::Connection,
        token: &str,
    ) -> Self {
        let record = v1::Connection {
            connection_id: String::new(),
            edge_id: String::new(),
            ..record.clone()
        };
        Self {
            outbound,
            evict,
            record: record.encode_to_vec().into_boxed_slice(),
            token: token.into(),
            sequences: Mutex::default(),
        }
    }

    /// Its record as announced, with the ids filled in again.
    fn record(&self, connection_id: &ConnectionId, edge_id: &EdgeId) -> v1::Connection {
        // It was encoded by `new`: decoding cannot fail.
        let record = v1::Connection::decode(&*self.record).unwrap_or_default();
        v1::Connection {
            connection_id: connection_id.to_string(),
            edge_id: edge_id.to_string(),
            ..record
        }
    }

    fn owner(&self) -> (TenantId, UserId) {
        let identity = v1::Connection::decode(&*self.record)
            .ok()
            .and_then(|record| record.identity)
            .unwrap_or_default();
        (
            TenantId::from(identity.tenant_id),
            UserId::from(identity.user_id),
        )
    }
}

/// The sockets held, and who they belong to.
#[derive(Debug, Default)]
struct Sockets {
    by_id: audience::HashMap<ConnectionId, LocalConnection>,
    directory: Directory,
}

/// What became of one message queued for one socket.
enum Queued {
    Yes,
    /// The socket had it already (a sequenced message written before).
    Duplicate,
    Gone,
    /// Its queue is full: a slow consumer, to be evicted once the locks
    /// are released.
    Slow(CancellationToken),
}

impl Queued {
    fn outcome(&self) -> DeliveryOutcome {
        match self {
            Queued::Yes | Queued::Duplicate => DeliveryOutcome::Delivered,
            Queued::Gone => DeliveryOutcome::NotFound,
            Queued::Slow(_) => DeliveryOutcome::Throttled,
        }
    }
}

/// A registered connection's half that the socket task owns.
#[derive(Debug)]
pub struct Registered {
    pub outbound: OutboxReceiver,
    pub evict: CancellationToken,
}

/// Why registering a new connection failed.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// No Attach stream is open right now.
    Detached,
    /// ConnectionService refused or did not answer in time.
    Refused,
}

/// Shared by the HTTP handlers, the socket tasks and the Attach loop.
pub struct Edge {
    pub edge_id: EdgeId,
    /// A std RwLock: looked up per delivery, written per connect and
    /// disconnect; never held across an await.
    connections: RwLock<Sockets>,
    /// Topic subscriptions. A std mutex, taken before `connections` when
    /// both are held, never across an await.
    subscribers: Mutex<Subscribers>,
    /// The open Attach streams' senders by replica address; empty while
    /// attached to no replica.
    upstreams: RwLock<BTreeMap<SocketAddr, mpsc::Sender<AttachRequest>>>,
    /// The actions each attached replica has routers for.
    routes: RwLock<HashMap<SocketAddr, std::collections::HashSet<String>>>,
    /// Registrations awaiting a replica's answer, with the replica asked.
    registrations: Mutex<HashMap<ConnectionId, (SocketAddr, oneshot::Sender<bool>)>>,
    /// This edge is AWS API Gateway's integration: it holds no sockets and
    /// announces the connections API Gateway holds (see
    /// [`crate::apigateway`]).
    apigateway: bool,
    outbound_queue: usize,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("edge_id", &self.edge_id)
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update of a plain map;
    // the map is still consistent, so keep serving.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The text a payload becomes on the socket.
pub fn payload_message(payload: Option<v1::Payload>) -> Option<Message> {
    match payload?.body? {
        v1::payload::Body::Json(value) => Some(Message::Text(Utf8Bytes::from(
            streamer_api::json::from_proto(value).to_string(),
        ))),
        v1::payload::Body::Text(text) => Some(Message::Text(Utf8Bytes::from(text))),
        v1::payload::Body::Binary(bytes) => Some(Message::Binary(bytes::Bytes::from(bytes))),
    }
}

impl Edge {
    pub fn new(edge_id: EdgeId, outbound_queue: usize) -> Arc<Self> {
        Self::build(edge_id, outbound_queue, false)
    }

    /// The edge of API Gateway's integration, which holds no sockets.
    pub fn integration(edge_id: EdgeId) -> Arc<Self> {
        Self::build(edge_id, 0, true)
    }

    fn build(edge_id: EdgeId, outbound_queue: usize, apigateway: bool) -> Arc<Self> {
        Arc::new(Self {
            edge_id,
            connections: RwLock::default(),
            subscribers: Mutex::default(),
            upstreams: RwLock::new(BTreeMap::new()),
            routes: RwLock::new(HashMap::new()),
            registrations: Mutex::new(HashMap::new()),
            apigateway,
            outbound_queue,
        })
    }

    /// Whether this is API Gateway's integration (no sockets of its own).
    pub fn is_integration(&self) -> bool {
        self.apigateway
    }

    pub fn is_attached(&self) -> bool {
        !read(&self.upstreams).is_empty()
    }

    pub fn connection_count(&self) -> usize {
        read(&self.connections).by_id.len()
    }

    /// The replicas this edge is attached to now.
    pub fn attached_replicas(&self) -> usize {
        read(&self.upstreams).len()
    }

    /// The stream that carries an event about `connection_id`: among the
    /// open streams (for a frame of an action some replicas have routers
    /// for, among theirs), the one whose address ranks highest for the
    /// connection (rendezvous hashing). The id is an event's, as the wire
    /// has it.
    fn upstream_for(
        &self,
        connection_id: &str,
        action: Option<&str>,
    ) -> Option<(SocketAddr, mpsc::Sender<AttachRequest>)> {
        let rank = |address: &SocketAddr| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (address, connection_id).hash(&mut hasher);
            hasher.finish()
        };
        let routed: Option<std::collections::HashSet<SocketAddr>> = action.and_then(|action| {
            let routes = read(&self.routes);
            let with_router: std::collections::HashSet<SocketAddr> = routes
                .iter()
                .filter(|(_, actions)| actions.contains(action))
                .map(|(address, _)| *address)
                .collect();
            (!with_router.is_empty()).then_some(with_router)
        });
        read(&self.upstreams)
            .iter()
            .filter(|(address, _)| routed.as_ref().is_none_or(|r| r.contains(address)))
            .max_by_key(|(address, _)| rank(address))
            .map(|(address, tx)| (*address, tx.clone()))
    }

    /// The connection an event is about, and for a frame its action.
    fn subject(event: &Event) -> (&str, Option<&str>) {
        match event {
            Event::Opened(o) => (o.connection.as_ref().map_or("", |c| &c.connection_id), None),
            Event::Closed(c) => (&c.connection_id, None),
            Event::Frame(f) => (&f.connection_id, Some(&f.action)),
            Event::Reply(r) => (&r.connection_id, None),
            Event::Hello(_) | Event::Delivered(_) | Event::Drained(_) | Event::FannedOut(_) => {
                ("", None)
            }
        }
    }

    /// Sends an event up without ever blocking the caller (the command
    /// loop must keep draining commands, or this edge and ConnectionService
    /// could each wait on the other's full queue). Returns false when
    /// detached.
    pub fn emit_nowait(&self, event: Event) -> bool {
        let (connection_id, action) = Self::subject(&event);
        match self.upstream_for(connection_id, action) {
            Some((_, tx)) => send_nowait(&tx, event),
            None => false,
        }
    }

    /// Sends an event up, if attached.
    pub async fn emit(&self, event: Event) -> bool {
        let (connection_id, action) = Self::subject(&event);
        match self.upstream_for(connection_id, action) {
            Some((_, tx)) => tx.send(AttachRequest { event: Some(event) }).await.is_ok(),
            None => false,
        }
    }

    /// Announces a new connection and waits until ConnectionService has
    /// recorded it, so that a client told "connected" can be found at once.
    /// On success the connection is held locally and its outbound queue's
    /// receiver is returned.
    pub async fn register(
        &self,
        record: v1::Connection,
        token: String,
        timeout: Duration,
    ) -> Result<Registered, RegisterError> {
        let id = ConnectionId::from(record.connection_id.as_str());
        let (tx, rx) = outbox(self.outbound_queue);
        let evict = CancellationToken::new();
        // Held locally before the announcement so a delivery that races the
        // registration answer already finds the queue.
        let connection = LocalConnection::new(tx, evict.clone(), &record, &token);
        let identity = record.identity.as_ref();
        let tenant = TenantId::from(identity.map_or("", |i| i.tenant_id.as_str()));
        let user = UserId::from(identity.map_or("", |i| i.user_id.as_str()));
        {
            let mut sockets = write(&self.connections);
            sockets.directory.insert(&tenant, &user, id.clone());
            if let Some(replaced) = sockets.by_id.insert(id.clone(), connection) {
                let (tenant, user) = replaced.owner();
                sockets.directory.remove(&tenant, &user, &id);
            }
        }
        self.announce(record, token, timeout).await?;
        metrics::gauge!("streamer_gateway_connections", "state" => "open")
            .set(self.connection_count() as f64);
        Ok(Registered {
            outbound: rx,
            evict,
        })
    }

    /// Announces a connection this edge holds no socket of (API Gateway's)
    /// and waits for ConnectionService to record it.
    pub async fn register_remote(
        &self,
        record: v1::Connection,
        token: String,
        timeout: Duration,
    ) -> Result<(), RegisterError> {
        self.announce(record, token, timeout).await
    }

    /// Announces a connection and waits for ConnectionService's answer; if
    /// it is refused, or the caller gives up waiting (the client left), the
    /// connection is forgotten and reported closed.
    async fn announce(
        &self,
        record: v1::Connection,
        token: String,
        timeout: Duration,
    ) -> Result<(), RegisterError> {
        let id = ConnectionId::from(record.connection_id.as_str());
        let (done, answer) = oneshot::channel();
        let upstream = self.upstream_for(id.as_str(), None);
        if let Some((address, _)) = &upstream {
            self.lock_registrations()
                .insert(id.clone(), (*address, done));
        }
        let mut guard = RegistrationGuard {
            edge: self,
            connection_id: id,
            armed: true,
        };
        let attempt = async {
            let opened = Event::Opened(v1::ConnectionOpened {
                connection: Some(record),
                token,
            });
            if !upstream.is_some_and(|(_, tx)| send_nowait(&tx, opened)) {
                return Err(RegisterError::Detached);
            }
            match answer.await {
                Ok(true) => Ok(()),
                _ => Err(RegisterError::Refused),
            }
        };
        let outcome = tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(Err(RegisterError::Refused));
        if outcome.is_ok() {
            guard.armed = false;
        }
        outcome
    }

    /// Drops a connection from the local table and its subscriptions (its
    /// socket is done).
    pub fn forget(&self, connection_id: &ConnectionId) -> bool {
        self.lock_subscribers().forget(connection_id);
        let removed = {
            let mut sockets = write(&self.connections);
            let removed = sockets.by_id.remove(connection_id);
            if let Some(connection) = &removed {
                let (tenant, user) = connection.owner();
                sockets.directory.remove(&tenant, &user, connection_id);
            }
            // A table a crowd of sockets grew is given back once most of
            // them are gone (halving keeps the shrinking amortized).
            if sockets.by_id.capacity() > 64 && sockets.by_id.len() < sockets.by_id.capacity() / 4 {
                let keep = sockets.by_id.len() * 2;
                sockets.by_id.shrink_to(keep);
            }
            removed.is_some()
        };
        metrics::gauge!("streamer_gateway_connections", "state" => "open")
            .set(self.connection_count() as f64);
        removed
    }

    /// Closes a slow consumer at once with 1008, skipping whatever is still
    /// queued (called with no lock held).
    fn evict(&self, connection_id: &ConnectionId, evict: CancellationToken) {
        metrics::counter!("streamer_gateway_slow_consumer_closes_total").increment(1);
        tracing::warn!(
            connection_id = connection_id.as_str(),
            "outbound queue full; closing slow consumer"
        );
        // The queue is full, so a close cannot wait behind it: eviction
        // makes the writer close with 1008 at once.
        evict.cancel();
        self.forget(connection_id);
    }

    /// Queues a message on one socket without waiting (under the caller's
    /// read lock; the caller evicts a slow one after releasing it).
    fn queue(
        connection: &LocalConnection,
        out: Outbound,
        sequence: Option<&v1::Sequence>,
        conflation: Option<&Arc<str>>,
    ) -> Queued {
        // A sequenced message is checked and queued under the socket's own
        // lock, so two deliveries of it (from two Attach streams) cannot
        // both be written; any other message needs no lock of its own.
        let _checked = match sequence {
            Some(sequence) => {
                let mut sequences = connection
                    .sequences
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if sequences.admit(&sequence.stream, sequence.number) == sequences::Admission::Drop
                {
                    return Queued::Duplicate;
                }
                Some(sequences)
            }
            None => None,
        };
        let sent = match (conflation, out) {
            (Some(key), Outbound::Message(message)) => {
                connection.outbound.try_send_conflated(message, key)
            }
            (_, out) => connection.outbound.try_send(out),
        };
        match sent {
            Ok(()) => Queued::Yes,
            Err(TrySendError::Closed) => Queued::Gone,
            Err(TrySendError::Full) => Queued::Slow(connection.evict.clone()),
        }
    }

    /// Queues a message for one socket without waiting. A message with a
    /// `sequence` is queued only if the socket has not had it (see
    /// [`crate::sequences`]); one it had already counts as DELIVERED.
    pub fn push(
        &self,
        connection_id: &ConnectionId,
        out: Outbound,
        sequence: Option<&v1::Sequence>,
    ) -> DeliveryOutcome {
        let queued = match read(&self.connections).by_id.get(connection_id) {
            Some(connection) => Self::queue(connection, out, sequence, None),
            None => Queued::Gone,
        };
        self.settle(connection_id, queued)
    }

    /// The outcome of a message queued with no lock held any more: a
    /// duplicate is counted, a slow consumer evicted.
    fn settle(&self, connection_id: &ConnectionId, queued: Queued) -> DeliveryOutcome {
        let outcome = queued.outcome();
        match queued {
            Queued::Duplicate => {
                metrics::counter!("streamer_gateway_duplicates_dropped_total").increment(1);
                tracing::debug!(
                    connection_id = connection_id.as_str(),
                    "already written; dropped"
                );
            }
            Queued::Slow(evict) => self.evict(connection_id, evict),
            Queued::Yes | Queued::Gone => {}
        }
        outcome
    }

    /// Writes one payload to every socket a selector picks; returns how
    /// many got it and how many were slow consumers, closed instead.
    fn fan_out(&self, fanout: v1::Fanout) -> v1::FanoutReport {
        use v1::fanout::Selector;
        let mut report = v1::FanoutReport {
            delivery_id: fanout.delivery_id,
            ..Default::default()
        };
        let Some(message) = payload_message(fanout.payload) else {
            return report;
        };
        let mut slow: Vec<(ConnectionId, CancellationToken)> = Vec::new();
        let mut tally = |id: &ConnectionId, queued: Queued| match queued {
            Queued::Yes | Queued::Duplicate => report.delivered += 1,
            Queued::Slow(evict) => {
                report.throttled += 1;
                slow.push((id.clone(), evict));
            }
            Queued::Gone => {}
        };
        match fanout.selector {
            Some(Selector::Tenant(t)) => {
                let sockets = read(&self.connections);
                for id in sockets.directory.tenant(&TenantId::from(t.tenant_id)) {
                    if let Some(connection) = sockets.by_id.get(id) {
                        let out = Outbound::Message(message.clone());
                        tally(id, Self::queue(connection, out, None, None));
                    }
                }
            }
            Some(Selector::User(u)) => {
                let sockets = read(&self.connections);
                let (tenant, user) = (TenantId::from(u.tenant_id), UserId::from(u.user_id));
                for id in sockets.directory.user(&tenant, &user) {
                    if let Some(connection) = sockets.by_id.get(id) {
                        let out = Outbound::Message(message.clone());
                        tally(id, Self::queue(connection, out, None, None));
                    }
                }
            }
            Some(Selector::Topic(t)) => {
                let topic: TopicKey = (TenantId::from(t.tenant_id), t.topic);
                let conflation = (!t.conflation_key.is_empty())
                    .then(|| Arc::<str>::from(t.conflation_key.as_str()));
                let message = TopicMessage {
                    epoch: Arc::from(t.epoch),
                    offset: t.offset,
                    message,
                };
                let mut subscribers = self.lock_subscribers();
                let Some(members) = subscribers.members(&topic) else {
                    return report;
                };
                let sockets = read(&self.connections);
                for (id, cursor) in members {
                    let Some(connection) = sockets.by_id.get(id) else {
                        continue;
                    };
                    match cursor.admit(&message) {
                        audience::Admission::Write => {
                            let out = Outbound::Message(message.message.clone());
                            tally(id, Self::queue(connection, out, None, conflation.as_ref()));
                        }
                        // It had it: it counts as reached.
                        audience::Admission::Skip | audience::Admission::Held => {
                            tally(id, Queued::Duplicate);
                        }
                        audience::Admission::Overflow => {
                            tally(id, Queued::Slow(connection.evict.clone()));
                        }
                    }
                }
            }
            None => {}
        }
        for (id, evict) in slow {
            self.evict(&id, evict);
        }
        report
    }

    /// Subscribes sockets to a topic (they catch up until their replay).
    fn watch(&self, watch: v1::Watch) -> v1::DeliveryReport {
        let topic: TopicKey = (TenantId::from(watch.tenant_id), watch.topic);
        let mut subscribers = self.lock_subscribers();
        let sockets = read(&self.connections);
        let results = watch
            .connection_ids
            .into_iter()
            .map(|id| {
                let id = ConnectionId::from(id);
                let outcome = match sockets.by_id.get(&id) {
                    Some(_) => {
                        subscribers.watch(&topic, &id);
                        DeliveryOutcome::Delivered
                    }
                    None => DeliveryOutcome::NotFound,
                };
                DeliveryResult {
                    connection_id: id.into(),
                    outcome: outcome as i32,
                }
            })
            .collect();
        v1::DeliveryReport {
            delivery_id: watch.delivery_id,
            results,
        }
    }

    /// Brings one watching socket up to date: its answer, what it missed,
    /// then what was held for it.
    fn replay(&self, replay: v1::Replay) {
        let topic: TopicKey = (TenantId::from(replay.tenant_id), replay.topic);
        let id = ConnectionId::from(replay.connection_id);
        let epoch: Arc<str> = Arc::from(replay.epoch);
        let missed = replay
            .messages
            .into_iter()
            .filter_map(|frame| {
                Some(TopicMessage {
                    epoch: epoch.clone(),
                    offset: frame.offset,
                    message: payload_message(frame.payload)?,
                })
            })
            .collect();
        let conflation = (!replay.conflation_key.is_empty())
            .then(|| Arc::<str>::from(replay.conflation_key.as_str()));
        let queued = {
            let mut subscribers = self.lock_subscribers();
            // Unsubscribed meanwhile, or gone.
            let Some(cursor) = subscribers.cursor(&topic, &id) else {
                return;
            };
            let sockets = read(&self.connections);
            let Some(connection) = sockets.by_id.get(&id) else {
                return;
            };
            let answer = payload_message(replay.answer).map(Outbound::Message);
            let mut queued = answer.map_or(Queued::Yes, |a| Self::queue(connection, a, None, None));
            for message in cursor.replay(epoch, replay.offset, missed) {
                if !matches!(queued, Queued::Yes) {
                    break;
                }
                let out = Outbound::Message(message.message);
                queued = Self::queue(connection, out, None, conflation.as_ref());
            }
            queued
        };
        self.settle(&id, queued);
    }

    fn unwatch(&self, unwatch: v1::Unwatch) {
        let topic: TopicKey = (TenantId::from(unwatch.tenant_id), unwatch.topic);
        let mut subscribers = self.lock_subscribers();
        for id in unwatch.connection_ids {
            subscribers.unwatch(&topic, &ConnectionId::from(id));
        }
    }

    /// Closes every socket (shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        let ids: Vec<ConnectionId> = read(&self.connections).by_id.keys().cloned().collect();
        for id in ids {
            self.push(
                &id,
                Outbound::Close {
                    code,
                    reason: reason.to_owned(),
                },
                None,
            );
        }
    }

    /// The connections held, and each one's current token.
    pub(crate) fn snapshot(&self) -> (Vec<v1::Connection>, HashMap<String, String>) {
        let connections = &read(&self.connections).by_id;
        let records = connections
            .iter()
            .map(|(id, c)| c.record(id, &self.edge_id))
            .collect();
        let tokens = connections
            .iter()
            .map(|(id, c)| (id.to_string(), c.token.to_string()))
            .collect();
        (records, tokens)
    }

    /// Keeps the token a client refreshed its socket with, for the next
    /// announcement.
    pub fn refreshed(&self, connection_id: &ConnectionId, token: String) {
        if let Some(connection) = write(&self.connections).by_id.get_mut(connection_id) {
            connection.token = token.into();
        }
    }

    fn lock_subscribers(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[allow(clippy::type_complexity)]
    fn lock_registrations(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, (SocketAddr, oneshot::Sender<bool>)>> {
        self.registrations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out a command that came down the stream of the replica at
    /// `address` (a report goes back up the same stream, `reply`).
    fn apply(&self, command: Command, address: SocketAddr, reply: &mpsc::Sender<AttachRequest>) {
        match command {
            Command::Routes(routes) => {
                write(&self.routes).insert(address, routes.actions.into_iter().collect());
            }
            Command::Drain(v1::Drain {}) => {
                // Events go to the other replicas from now on; this stream
                // only carries the reports of this replica's deliveries.
                {
                    let mut upstreams = write(&self.upstreams);
                    if upstreams
                        .get(&address)
                        .is_some_and(|t| t.same_channel(reply))
                    {
                        upstreams.remove(&address);
                        write(&self.routes).remove(&address);
                    }
                }
                tracing::info!(edge_id = %self.edge_id, %address, "connection service replica draining");
                send_nowait(reply, Event::Drained(v1::Drained {}));
            }
            Command::Registered(r) => {
                if let Some((_, done)) = self.lock_registrations().remove(r.connection_id.as_str())
                {
                    let _ = done.send(true);
                }
            }
            Command::Close(close) => {
                let connection_id = ConnectionId::from(close.connection_id);
                if let Some((_, done)) = self.lock_registrations().remove(&connection_id) {
                    let _ = done.send(false);
                    return;
                }
                self.push(
                    &connection_id,
                    Outbound::Close {
                        code: u16::try_from(close.code).unwrap_or(1000),
                        reason: close.reason,
                    },
                    None,
                );
            }
            Command::Deliver(deliver) => {
                let span = trace::child_of(&deliver.trace_context, || {
                    tracing::info_span!("edge.deliver", otel.kind = "consumer")
                });
                let _traced = span.enter();
                let results = match payload_message(deliver.payload) {
                    Some(message) => deliver
                        .connection_ids
                        .into_iter()
                        .map(|connection_id| {
                            let connection_id = ConnectionId::from(connection_id);
                            let outcome = self.push(
                                &connection_id,
                                Outbound::Message(message.clone()),
                                deliver.sequence.as_ref(),
                            );
                            DeliveryResult {
                                connection_id: connection_id.into(),
                                outcome: outcome as i32,
                            }
                        })
                        .collect(),
                    None => Vec::new(),
                };
                if deliver.delivery_id != 0 {
                    send_nowait(
                        reply,
                        Event::Delivered(v1::DeliveryReport {
                            delivery_id: deliver.delivery_id,
                            results,
                        }),
                    );
                }
            }
            Command::Fanout(fanout) => {
                let span = trace::child_of(&fanout.trace_context, || {
                    tracing::info_span!("edge.fanout", otel.kind = "consumer")
                });
                let _traced = span.enter();
                let report = self.fan_out(fanout);
                if report.delivery_id != 0 {
                    send_nowait(reply, Event::FannedOut(report));
                }
            }
            Command::Watch(watch) => {
                send_nowait(reply, Event::Delivered(self.watch(watch)));
            }
            Command::Replay(replay) => self.replay(replay),
            Command::Unwatch(unwatch) => self.unwatch(unwatch),
        }
    }

    /// Follows the ConnectionService replicas until `shutdown` (see
    /// [`streamer_core::grpc::follow_addresses`]): keeps one Attach stream
    /// open to every address `urls` resolve to, and drops the streams of
    /// addresses that are gone.
    pub async fn follow_replicas<C>(
        self: Arc<Self>,
        urls: Vec<String>,
        connect: C,
        shutdown: Shutdown,
    ) where
        C: Fn(&str, SocketAddr) -> anyhow::Result<EdgeServiceClient<AuthedChannel>>,
    {
        let mut addresses = streamer_core::grpc::follow_addresses(urls, shutdown.clone()).await;
        let mut replicas: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        loop {
            let seen = addresses.borrow_and_update().clone();
            replicas.retain(|address, stop| {
                let kept = seen.contains_key(address);
                if !kept {
                    tracing::info!(%address, "connection service replica gone");
                    stop.cancel();
                }
                kept
            });
            for (address, url) in &seen {
                if replicas.contains_key(address) {
                    continue;
                }
                match connect(url, *address) {
                    Ok(client) => {
                        let stop = shutdown.child_token();
                        replicas.insert(*address, stop.clone());
                        tracing::info!(%url, %address, "connection service replica found");
                        tokio::spawn(self.clone().attach_to(*address, client, stop));
                    }
                    Err(error) => {
                        tracing::error!(%url, %error, "cannot reach the connection service");
                    }
                }
            }
            tokio::select! {
                changed = addresses.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Keeps the Attach stream to one replica open until `stop`,
    /// re-attaching with exponential backoff (100 ms doubling to 5 s)
    /// whenever it drops.
    async fn attach_to(
        self: Arc<Self>,
        address: SocketAddr,
        client: EdgeServiceClient<AuthedChannel>,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let (tx, rx) = mpsc::channel(4096);
            let taken_at = prost_types::Timestamp::from(std::time::SystemTime::now());
            let (connections, tokens) = self.snapshot();
            let hello = AttachRequest {
                event: Some(Event::Hello(v1::EdgeHello {
                    edge_id: self.edge_id.to_string(),
                    connections,
                    tokens,
                    taken_at: Some(taken_at),
                    apigateway: self.apigateway,
                })),
            };
            // The channel is fresh and empty, so this cannot fail.
            let _ = tx.send(hello).await;
            let mut client = client.clone();
            let attached = tokio::select! {
                r = client.attach(ReceiverStream::new(rx)) => r,
                () = stop.cancelled() => return,
            };
            match attached {
                Ok(response) => {
                    write(&self.upstreams).insert(address, tx.clone());
                    tracing::info!(edge_id = %self.edge_id, %address, "attached to connection service");
                    backoff = Duration::from_millis(100);
                    let mut commands = response.into_inner();
                    loop {
                        let next = tokio::select! {
                            next = commands.message() => next,
                            () = stop.cancelled() => break,
                        };
                        match next {
                            Ok(Some(AttachResponse { command: Some(c) })) => {
                                self.apply(c, address, &tx);
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(status) => {
                                tracing::warn!(%address, error = %status, "attach stream failed");
                                break;
                            }
                        }
                    }
                    {
                        let mut upstreams = write(&self.upstreams);
                        if upstreams.get(&address).is_some_and(|t| t.same_channel(&tx)) {
                            upstreams.remove(&address);
                            write(&self.routes).remove(&address);
                        }
                    }
                    // Registrations in flight on the dead stream will never
                    // be answered.
                    self.lock_registrations()
                        .retain(|_, (asked, _)| *asked != address);
                    tracing::warn!(edge_id = %self.edge_id, %address, "detached from connection service");
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::error!(%address, error = %status, retry_in_ms = backoff.as_millis() as u64, "cannot attach: that address does not serve the edge stream; point the edge at ConnectionService's edge listener (--edge-listen, port 50054)");
                }
                Err(status) => {
                    tracing::warn!(%address, error = %status, retry_in_ms = backoff.as_millis() as u64, "cannot attach to connection service");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Queues an event on one stream without waiting (see [`Edge::emit_nowait`]).
fn send_nowait(tx: &mpsc::Sender<AttachRequest>, event: Event) -> bool {
    match tx.try_send(AttachRequest { event: Some(event) }) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(event)) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), tx.send(event)).await;
            });
            true
        }
    }
}

/// Undoes a registration that did not complete: forgets the socket and
/// tells ConnectionService, in case it recorded it after all.
struct RegistrationGuard<'a> {
    edge: &'a Edge,
    connection_id: ConnectionId,
    armed: bool,
}

impl Drop for RegistrationGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.edge.lock_registrations().remove(&self.connection_id);
        self.edge.forget(&self.connection_id);
        self.edge.emit_nowait(Event::Closed(v1::ConnectionClosed {
            connection_id: std::mem::take(&mut self.connection_id).into(),
            code: 1011,
            reason: "registration failed".into(),
        }));
    }
}

/// The close frame for an [`Outbound::Close`].
pub fn close_message(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}
