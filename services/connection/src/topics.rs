//! Topics: subscriptions, publishing, and bringing a subscriber up to date.
//!
//! The store holds the subscriptions (for `ListSubscriptions`, and so that
//! they end with their connection) and each topic's recent history; the
//! edges hold their own subscribers' index, and a publish is one `fanout`
//! per edge. Subscribing a socket takes three steps, so that it gets every
//! message from its position on exactly once and in order:
//! 1. `watch`: the edge subscribes the socket, holding its live messages
//!    of the topic back;
//! 2. the history is read after that position (or the topic's position
//!    taken, for a new subscriber);
//! 3. `replay`: the edge writes the client's answer, what it missed, then
//!    what was held back (each offset once), and lets the rest flow.
//!
//! A message published after step 1 reaches the edge live (held, then
//! written); one published before it is in the history read in step 2.
//!
//! On one replica, publishes to one topic are handed to the edges in offset
//! order. Publishes to one topic through two replicas at once may reach an
//! edge out of order: a socket never gets an offset after a larger one
//! (it is skipped), so the client sees the gap in offsets and can recover
//! the message from the history by subscribing again with `since`.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use serde_json::{Value, json};
use streamer_api::v1::{self, DeliveryOutcome};
use streamer_core::client::{self, ErrorCode};
use streamer_core::ids::{ClientRequestId, ConnectionId, TenantId};
use streamer_core::store::{
    ConnectionRecord, Recovery, Retention, Subscription, TopicPosition, now_ms,
};
use streamer_core::topics;
use streamer_core::trust::Caller;

use crate::delivery::{Fanout, Selector};
use crate::error::ConnectionError;
use crate::model::{
    PublishCommand, SubscribeCommand, Subscriber, SubscriptionQuery, SubscriptionsOf, page_token,
};
use crate::service::ConnectionServer;

/// Publishes to one topic are ordered by one of this many locks.
pub(crate) const TOPIC_LOCKS: usize = 64;

/// How topics behave.
#[derive(Debug, Clone)]
pub struct TopicsConfig {
    /// How much of each topic's history is kept for clients that recover.
    pub retention: Retention,
    /// Patterns of the topics every client may subscribe itself to, beside
    /// those its token's `topics` claim allows (see
    /// [`streamer_core::topics`]; `users/{user_id}/**` gives each user
    /// their own).
    pub client_topics: Vec<String>,
    /// Patterns of the topics whose slow consumers are conflated: while a
    /// socket is behind, only the latest message of each key waits for it,
    /// instead of the socket being closed when its queue is full.
    pub conflated: Vec<String>,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            retention: Retention {
                max_messages: 1000,
                max_age: Duration::from_secs(3600),
            },
            client_topics: Vec::new(),
            conflated: Vec::new(),
        }
    }
}

impl TopicsConfig {
    /// The conflation key of a message of `topic` (its own `key`, or the
    /// topic), when the topic is conflated.
    fn conflation_key(&self, topic: &str, key: &str) -> String {
        if !self.conflated.iter().any(|p| topics::matches(p, topic)) {
            return String::new();
        }
        if key.is_empty() { topic } else { key }.to_owned()
    }
}

/// What a subscribe answered.
#[derive(Debug)]
pub(crate) struct Subscribed {
    pub(crate) connection_ids: Vec<ConnectionId>,
    pub(crate) position: TopicPosition,
}

/// What a publish reached.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) position: TopicPosition,
    pub(crate) fanout: Fanout,
}

/// A topic position for the wire.
pub(crate) fn position_to_proto(position: TopicPosition) -> v1::TopicPosition {
    v1::TopicPosition {
        epoch: position.epoch,
        offset: position.offset,
    }
}

impl ConnectionServer {
    /// `Subscribe`: every targeted connection receives the topic's messages
    /// from its current position on.
    pub(crate) async fn subscribe(
        &self,
        cmd: SubscribeCommand,
        caller: &Caller,
    ) -> Result<Subscribed, ConnectionError> {
        Self::check_reach(caller, &cmd.tenant_id)?;
        let targets = self.subscribers_of(&cmd, caller).await?;
        let (connection_ids, recovery) = self
            .follow(&cmd.tenant_id, &cmd.topic, targets, None, |_| None)
            .await?;
        Ok(Subscribed {
            connection_ids,
            position: recovery.position,
        })
    }

    /// `Unsubscribe`: the connections that were subscribed.
    pub(crate) async fn unsubscribe(
        &self,
        cmd: SubscribeCommand,
        caller: &Caller,
    ) -> Result<Vec<ConnectionId>, ConnectionError> {
        Self::check_reach(caller, &cmd.tenant_id)?;
        let targets = self.subscribers_of(&cmd, caller).await?;
        self.unfollow(&cmd.tenant_id, &cmd.topic, targets).await
    }

    /// The connections a subscribe or unsubscribe is about.
    async fn subscribers_of(
        &self,
        cmd: &SubscribeCommand,
        caller: &Caller,
    ) -> Result<Vec<ConnectionRecord>, ConnectionError> {
        match &cmd.subscriber {
            Subscriber::Connection(id) => {
                Ok(vec![self.find(id, Some(&cmd.tenant_id), caller).await?])
            }
            Subscriber::User(user) => self.all_connections(&cmd.tenant_id, Some(user)).await,
        }
    }

    /// Subscribes `targets` in the store and on their edges, reads where
    /// the topic stands (and, with `since`, what was published after it),
    /// and brings each one up to date, its `answer` first. Returns the
    /// connections subscribed.
    async fn follow(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        targets: Vec<ConnectionRecord>,
        since: Option<TopicPosition>,
        answer: impl Fn(&Recovery) -> Option<Value>,
    ) -> Result<(Vec<ConnectionId>, Recovery), ConnectionError> {
        let store = &self.shared.store;
        let now = now_ms();
        let mut recorded = Vec::with_capacity(targets.len());
        for target in targets {
            let subscription = Subscription {
                tenant_id: tenant_id.clone(),
                topic: topic.to_owned(),
                connection_id: target.connection_id.clone(),
                user_id: target.user_id.clone(),
                subscribed_at_ms: now,
            };
            // False: the connection closed meanwhile.
            if store.subscribe(subscription).await? {
                recorded.push(target);
            }
        }
        let watched = self
            .shared
            .delivery
            .watch(tenant_id, topic, &recorded)
            .await;
        // Results come by edge, not in the targets' order.
        let outcomes: std::collections::HashMap<String, DeliveryOutcome> = watched
            .into_iter()
            .map(|r| (r.connection_id.clone(), r.outcome()))
            .collect();
        let mut following = Vec::with_capacity(recorded.len());
        let mut unavailable = false;
        for target in recorded {
            let outcome = outcomes
                .get(target.connection_id.as_str())
                .copied()
                .unwrap_or(DeliveryOutcome::Unavailable);
            match outcome {
                DeliveryOutcome::Delivered => following.push(target),
                outcome => {
                    // Its edge does not have it: not subscribed after all.
                    unavailable |= outcome == DeliveryOutcome::Unavailable;
                    store
                        .unsubscribe(tenant_id, topic, &target.connection_id)
                        .await?;
                }
            }
        }
        if following.is_empty() && unavailable {
            return Err(ConnectionError::Unavailable(
                "the connection's edge did not confirm the subscription; try again".into(),
            ));
        }
        let retention = self.shared.config.topics.retention;
        let recovery = match &since {
            Some(since) => {
                store
                    .topic_since(tenant_id, topic, since, now_ms(), retention)
                    .await?
            }
            None => Recovery {
                position: store.topic_position(tenant_id, topic).await?,
                messages: Vec::new(),
                recovered: true,
            },
        };
        // Where each socket stands: where the client was, in this epoch; a
        // position of another epoch means nothing here.
        let offset = match &since {
            Some(since) if since.epoch == recovery.position.epoch => since.offset,
            Some(_) => 0,
            None => recovery.position.offset,
        };
        let messages: Vec<v1::TopicFrame> = recovery
            .messages
            .iter()
            .map(|m| {
                let at = TopicPosition {
                    epoch: recovery.position.epoch.clone(),
                    offset: m.offset,
                };
                v1::TopicFrame {
                    offset: m.offset,
                    payload: Some(text(&topics::message(topic, &at, &m.payload))),
                }
            })
            .collect();
        let conflation_key = self.shared.config.topics.conflation_key(topic, "");
        let answer = answer(&recovery).map(|a| text(&a));
        for target in &following {
            let replay = v1::Replay {
                connection_id: target.connection_id.to_string(),
                tenant_id: tenant_id.to_string(),
                topic: topic.to_owned(),
                answer: answer.clone(),
                epoch: recovery.position.epoch.clone(),
                offset,
                messages: messages.clone(),
                conflation_key: conflation_key.clone(),
            };
            self.shared.delivery.replay(target, replay).await;
        }
        metrics::counter!("streamer_subscriptions_total").increment(following.len() as u64);
        let ids = following.into_iter().map(|t| t.connection_id).collect();
        Ok((ids, recovery))
    }

    /// Ends the subscriptions of `targets` to a topic, in the store and on
    /// their edges; returns those that existed.
    async fn unfollow(
        &self,
        tenant_id: &TenantId,
        topic: &str,
        targets: Vec<ConnectionRecord>,
    ) -> Result<Vec<ConnectionId>, ConnectionError> {
        let mut ended = Vec::new();
        for target in &targets {
            if self
                .shared
                .store
                .unsubscribe(tenant_id, topic, &target.connection_id)
                .await?
            {
                ended.push(target.connection_id.clone());
            }
        }
        // Also those the store did not know: an edge may hold a
        // subscription whose record a failed write left out.
        self.shared
            .delivery
            .unwatch(tenant_id, topic, &targets)
            .await;
        Ok(ended)
    }

    /// `Publish`: the message gets the topic's next offset and goes to
    /// every edge as one `fanout`.
    pub(crate) async fn publish(
        &self,
        cmd: PublishCommand,
        caller: &Caller,
    ) -> Result<Published, ConnectionError> {
        Self::check_reach(caller, &cmd.tenant_id)?;
        let retention = self.shared.config.topics.retention;
        let conflation_key = self
            .shared
            .config
            .topics
            .conflation_key(&cmd.topic, &cmd.key);
        // Appended and handed to the edges under the topic's lock, so that
        // the edges get this replica's messages of a topic in offset order.
        let (position, reached) = {
            let _order = self.topic_lock(&cmd.tenant_id, &cmd.topic).lock().await;
            let position = self
                .shared
                .store
                .append_topic(
                    &cmd.tenant_id,
                    &cmd.topic,
                    cmd.data.clone(),
                    now_ms(),
                    retention,
                )
                .await?;
            let message = topics::message(&cmd.topic, &position, &cmd.data);
            let started = std::time::Instant::now();
            let selector = Selector::Topic(v1::TopicMessageRef {
                tenant_id: cmd.tenant_id.to_string(),
                topic: cmd.topic.clone(),
                epoch: position.epoch.clone(),
                offset: position.offset,
                conflation_key,
            });
            let reached = self
                .shared
                .delivery
                .dispatch(selector, text(&message))
                .await;
            (position, (reached, started))
        };
        let (reached, started) = reached;
        let fanout = reached.await;
        Self::count("topic", fanout, started);
        metrics::counter!("streamer_topic_messages_total").increment(1);
        Ok(Published { position, fanout })
    }

    /// `ListSubscriptions`: one page, and the token of the next.
    pub(crate) async fn list_subscriptions(
        &self,
        query: SubscriptionQuery,
        caller: &Caller,
    ) -> Result<(Vec<Subscription>, String), ConnectionError> {
        Self::check_reach(caller, &query.tenant_id)?;
        let mut page = match &query.of {
            SubscriptionsOf::Topic(topic) => {
                let after = query.after.clone().map(ConnectionId::from);
                self.shared
                    .store
                    .subscribers(&query.tenant_id, topic, after.as_ref(), query.page_size + 1)
                    .await?
            }
            SubscriptionsOf::Connection(id) => {
                let record = self.find(id, Some(&query.tenant_id), caller).await?;
                let mut all = self
                    .shared
                    .store
                    .subscriptions_of(&record.connection_id)
                    .await?;
                all.retain(|s| query.after.as_ref().is_none_or(|after| s.topic > *after));
                all.truncate(query.page_size + 1);
                all
            }
        };
        let next = if page.len() > query.page_size {
            page.truncate(query.page_size);
            page.last().map_or_else(String::new, |s| {
                let last = match &query.of {
                    SubscriptionsOf::Topic(_) => s.connection_id.as_str(),
                    SubscriptionsOf::Connection(_) => s.topic.as_str(),
                };
                page_token::after(&query.scope(), last)
            })
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// The client's `subscribe`, with `{"topic", "since"?: {"epoch",
    /// "offset"}}`: allowed by its token's `topics` claim or a configured
    /// rule. Answered in the replay (before any message of the topic) when
    /// it is subscribed; the error, if not, is returned.
    pub(crate) async fn client_subscribe(
        &self,
        record: &ConnectionRecord,
        frame: v1::InboundFrame,
    ) -> Option<Value> {
        let (id, payload, topic) = match client_topic(frame) {
            Ok(request) => request,
            Err(refused) => return Some(refused),
        };
        let since = match payload.as_ref().and_then(|p| p.get("since")) {
            None | Some(Value::Null) => None,
            Some(since) => match since_of(since) {
                Some(since) => Some(since),
                None => {
                    return Some(client::error(
                        &id,
                        ErrorCode::Validation,
                        "payload.since must be {\"epoch\": string, \"offset\": integer}",
                    ));
                }
            },
        };
        let rules = &self.shared.config.topics.client_topics;
        if !topics::any_allows(record.topics.iter().chain(rules), &topic, &record.user_id) {
            metrics::counter!("streamer_subscriptions_refused_total").increment(1);
            return Some(client::error(
                &id,
                ErrorCode::Unauthorized,
                format!("this connection may not subscribe to topic {topic:?}"),
            ));
        }
        let answer = |recovery: &Recovery| {
            let mut data = json!({
                "topic": topic,
                "epoch": recovery.position.epoch,
                "offset": recovery.position.offset,
            });
            if since.is_some() {
                data["recovered"] = Value::Bool(recovery.recovered);
            }
            Some(client::response(&id, data))
        };
        let followed = self
            .follow(
                &record.tenant_id,
                &topic,
                vec![record.clone()],
                since.clone(),
                answer,
            )
            .await;
        match followed {
            Ok((subscribed, _)) if !subscribed.is_empty() => None,
            // Closed meanwhile: nobody to answer.
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, connection_id = %record.connection_id, "client subscribe failed");
                Some(client::error(&id, ErrorCode::Internal, error.to_string()))
            }
        }
    }

    /// The client's `unsubscribe`, with `{"topic"}`.
    pub(crate) async fn client_unsubscribe(
        &self,
        record: &ConnectionRecord,
        frame: v1::InboundFrame,
    ) -> Option<Value> {
        let (id, _, topic) = match client_topic(frame) {
            Ok(request) => request,
            Err(refused) => return Some(refused),
        };
        Some(
            match self
                .unfollow(&record.tenant_id, &topic, vec![record.clone()])
                .await
            {
                Ok(ended) => client::response(
                    &id,
                    json!({"topic": topic, "unsubscribed": !ended.is_empty()}),
                ),
                Err(error) => client::error(&id, ErrorCode::Internal, error.to_string()),
            },
        )
    }

    /// The lock that orders publishes to one topic on this replica.
    fn topic_lock(&self, tenant_id: &TenantId, topic: &str) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (tenant_id, topic).hash(&mut hasher);
        &self.shared.topic_locks[(hasher.finish() as usize) % self.shared.topic_locks.len()]
    }
}

/// A payload of text, as topic messages and answers go to sockets (the
/// protocol's field order, not a protobuf Struct's sorted keys).
fn text(message: &Value) -> v1::Payload {
    v1::Payload {
        body: Some(v1::payload::Body::Text(message.to_string())),
    }
}

/// A client's subscribe or unsubscribe: its id, its payload and the
/// topic the payload names; or the error that answers it.
fn client_topic(
    frame: v1::InboundFrame,
) -> Result<(ClientRequestId, Option<Value>, String), Value> {
    let id = ClientRequestId::from(frame.request_id);
    let payload = frame.payload.map(streamer_api::json::from_proto);
    let why = match payload
        .as_ref()
        .and_then(|p| p.get("topic"))
        .and_then(Value::as_str)
    {
        None => "payload.topic is required".to_owned(),
        Some(topic) => match topics::unusable(topic) {
            Some(why) => format!("payload.topic {why}"),
            None => {
                let topic = topic.to_owned();
                return Ok((id, payload, topic));
            }
        },
    };
    Err(client::error(&id, ErrorCode::Validation, why))
}

/// A client's `since`: `{"epoch": string, "offset": integer}`.
fn since_of(since: &Value) -> Option<TopicPosition> {
    Some(TopicPosition {
        epoch: since.get("epoch")?.as_str()?.to_owned(),
        offset: since.get("offset")?.as_u64()?,
    })
}
