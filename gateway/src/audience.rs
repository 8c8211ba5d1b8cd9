//! Who a fan-out reaches on this edge: the sockets of each tenant and
//! user ([`Directory`]), and the subscribers of each topic with where each
//! one stands ([`Subscribers`]).
//!
//! A topic message is written to a subscriber at most once and in offset
//! order ([`Cursor`]): a message at or before the subscriber's offset (the
//! same message again, from a second replica or a replay) is skipped. While
//! a new subscriber is being brought up to date (between `watch` and
//! `replay`), the topic's live messages are held for it, and written after
//! what it missed.

use std::sync::Arc;

use axum::extract::ws::Message;
use streamer_core::ids::{ConnectionId, TenantId, UserId};

/// The edge's maps, looked up once per socket and message in a fan-out:
/// a fast seeded hash instead of SipHash (their keys are ids and topics,
/// and a seed per map still keeps their layout unpredictable).
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A topic of a tenant.
pub type TopicKey = (TenantId, String);

/// Live messages held for one subscriber while it catches up; past this
/// it cannot be brought up to date and is closed as a slow consumer.
pub const MAX_HELD: usize = 1024;

/// The sockets of each tenant, by user.
#[derive(Debug, Default)]
pub struct Directory {
    tenants: HashMap<TenantId, HashMap<UserId, Vec<ConnectionId>>>,
}

impl Directory {
    pub fn insert(&mut self, tenant: &TenantId, user: &UserId, id: ConnectionId) {
        self.tenants
            .entry(tenant.clone())
            .or_default()
            .entry(user.clone())
            // Most users have one socket here: no room kept for more.
            .or_insert_with(|| Vec::with_capacity(1))
            .push(id);
    }

    pub fn remove(&mut self, tenant: &TenantId, user: &UserId, id: &ConnectionId) {
        let Some(users) = self.tenants.get_mut(tenant) else {
            return;
        };
        if let Some(ids) = users.get_mut(user) {
            ids.retain(|held| held != id);
            if ids.is_empty() {
                users.remove(user);
            }
        }
        if users.is_empty() {
            self.tenants.remove(tenant);
        }
    }

    /// Every socket of a tenant.
    pub fn tenant(&self, tenant: &TenantId) -> impl Iterator<Item = &ConnectionId> {
        self.tenants
            .get(tenant)
            .into_iter()
            .flat_map(|users| users.values().flatten())
    }

    /// Every socket of one user of a tenant.
    pub fn user(&self, tenant: &TenantId, user: &UserId) -> impl Iterator<Item = &ConnectionId> {
        self.tenants
            .get(tenant)
            .and_then(|users| users.get(user))
            .into_iter()
            .flatten()
    }
}

/// One topic message on its way to subscribers.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub epoch: Arc<str>,
    pub offset: u64,
    pub message: Message,
}

/// What to do with a topic message for one subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Write,
    /// It had it already.
    Skip,
    /// It is catching up: held until its replay.
    Held,
    /// It is catching up and too much is held: it cannot keep up.
    Overflow,
}

/// Where one subscriber stands in a topic.
#[derive(Debug)]
pub struct Cursor {
    epoch: Arc<str>,
    offset: u64,
    /// Live messages held until the replay; `None` once live.
    held: Option<Vec<TopicMessage>>,
}

impl Cursor {
    /// A new subscriber, catching up until its replay.
    fn catching_up() -> Self {
        Self {
            epoch: Arc::from(""),
            offset: 0,
            held: Some(Vec::new()),
        }
    }

    /// Whether `message` is to be written now, and if so, moves past it.
    pub fn admit(&mut self, message: &TopicMessage) -> Admission {
        if let Some(held) = &mut self.held {
            if held.len() >= MAX_HELD {
                return Admission::Overflow;
            }
            held.push(message.clone());
            return Admission::Held;
        }
        self.advance(&message.epoch, message.offset)
    }

    fn advance(&mut self, epoch: &Arc<str>, offset: u64) -> Admission {
        // Another epoch: the topic's history began again, and its offsets
        // with it; the subscriber sees the new epoch on the message.
        if *self.epoch != **epoch {
            self.epoch = epoch.clone();
        } else if offset <= self.offset {
            return Admission::Skip;
        }
        self.offset = offset;
        Admission::Write
    }

    /// Ends the catching up: the subscriber stands at `epoch`/`offset`;
    /// returns, in order, what to write now: of `missed` and of the
    /// messages held meanwhile, those after that position, once each.
    pub fn replay(
        &mut self,
        epoch: Arc<str>,
        offset: u64,
        missed: Vec<TopicMessage>,
    ) -> Vec<TopicMessage> {
        let held = self.held.take().unwrap_or_default();
        // A socket that was following already keeps its place if it is
        // further back: what it would have had goes on arriving.
        if self.epoch != epoch || offset < self.offset {
            self.offset = offset;
        }
        self.epoch = epoch;
        missed
            .into_iter()
            .chain(held)
            .filter(|m| self.advance(&m.epoch, m.offset) == Admission::Write)
            .collect()
    }
}

/// Each topic's subscribers on this edge, and each subscriber's topics (to
/// forget them when its socket closes).
#[derive(Debug, Default)]
pub struct Subscribers {
    topics: HashMap<TopicKey, HashMap<ConnectionId, Cursor>>,
    of_connection: HashMap<ConnectionId, Vec<TopicKey>>,
}

impl Subscribers {
    /// Subscribes a socket; it catches up until its replay (again: it
    /// catches up again, keeping what it holds).
    pub fn watch(&mut self, topic: &TopicKey, id: &ConnectionId) {
        let members = self.topics.entry(topic.clone()).or_default();
        match members.get_mut(id) {
            Some(cursor) => {
                if cursor.held.is_none() {
                    cursor.held = Some(Vec::new());
                }
            }
            None => {
                members.insert(id.clone(), Cursor::catching_up());
                self.of_connection
                    .entry(id.clone())
                    .or_default()
                    .push(topic.clone());
            }
        }
    }

    /// Ends one subscription; whether it existed.
    pub fn unwatch(&mut self, topic: &TopicKey, id: &ConnectionId) -> bool {
        let Some(members) = self.topics.get_mut(topic) else {
            return false;
        };
        let existed = members.remove(id).is_some();
        if members.is_empty() {
            self.topics.remove(topic);
        }
        if let Some(topics) = self.of_connection.get_mut(id) {
            topics.retain(|t| t != topic);
            if topics.is_empty() {
                self.of_connection.remove(id);
            }
        }
        existed
    }

    /// Ends every subscription of a socket that closed.
    pub fn forget(&mut self, id: &ConnectionId) {
        for topic in self.of_connection.remove(id).unwrap_or_default() {
            if let Some(members) = self.topics.get_mut(&topic) {
                members.remove(id);
                if members.is_empty() {
                    self.topics.remove(&topic);
                }
            }
        }
    }

    /// A topic's subscribers and where they stand.
    pub fn members(
        &mut self,
        topic: &TopicKey,
    ) -> Option<impl Iterator<Item = (&ConnectionId, &mut Cursor)>> {
        self.topics.get_mut(topic).map(|m| m.iter_mut())
    }

    /// One subscriber of a topic.
    pub fn cursor(&mut self, topic: &TopicKey, id: &ConnectionId) -> Option<&mut Cursor> {
        self.topics.get_mut(topic)?.get_mut(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(epoch: &str, offset: u64) -> TopicMessage {
        TopicMessage {
            epoch: Arc::from(epoch),
            offset,
            message: Message::Text(format!("{epoch}:{offset}").into()),
        }
    }

    fn offsets(messages: &[TopicMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.offset).collect()
    }

    fn live(epoch: &str, offset: u64) -> Cursor {
        let mut cursor = Cursor::catching_up();
        cursor.replay(Arc::from(epoch), offset, Vec::new());
        cursor
    }

    #[test]
    fn a_live_subscriber_gets_each_offset_once_in_order() {
        let mut cursor = live("e", 3);
        assert_eq!(cursor.admit(&message("e", 3)), Admission::Skip);
        assert_eq!(cursor.admit(&message("e", 4)), Admission::Write);
        assert_eq!(cursor.admit(&message("e", 4)), Admission::Skip);
        assert_eq!(cursor.admit(&message("e", 6)), Admission::Write);
        // Late: it would be out of order, and the client saw 6 after 4, so
        // it knows 5 is missing and can recover it.
        assert_eq!(cursor.admit(&message("e", 5)), Admission::Skip);
        // A new epoch starts over.
        assert_eq!(cursor.admit(&message("f", 1)), Admission::Write);
    }

    #[test]
    fn what_arrives_while_catching_up_follows_what_was_missed_without_duplicates() {
        let mut cursor = Cursor::catching_up();
        // Live messages while the history is read: 5 and 6, then 4 again
        // from another replica.
        for offset in [5, 6, 4] {
            assert_eq!(cursor.admit(&message("e", offset)), Admission::Held);
        }
        // The client had 2; the history has 3, 4, 5.
        let written = cursor.replay(
            Arc::from("e"),
            2,
            vec![message("e", 3), message("e", 4), message("e", 5)],
        );
        assert_eq!(offsets(&written), [3, 4, 5, 6]);
        assert_eq!(cursor.admit(&message("e", 6)), Admission::Skip);
        assert_eq!(cursor.admit(&message("e", 7)), Admission::Write);
    }

    #[test]
    fn subscribing_again_from_now_skips_nothing_the_socket_was_owed() {
        let mut cursor = live("e", 10);
        // Subscribed again, with no position: 11 and 12 come meanwhile,
        // and the topic stood at 12 when it was read.
        cursor.held = Some(Vec::new());
        for offset in [11, 12] {
            assert_eq!(cursor.admit(&message("e", offset)), Admission::Held);
        }
        assert_eq!(
            offsets(&cursor.replay(Arc::from("e"), 12, Vec::new())),
            [11, 12]
        );
    }

    #[test]
    fn a_subscriber_that_cannot_catch_up_overflows() {
        let mut cursor = Cursor::catching_up();
        for offset in 1..=MAX_HELD as u64 {
            assert_eq!(cursor.admit(&message("e", offset)), Admission::Held);
        }
        assert_eq!(
            cursor.admit(&message("e", MAX_HELD as u64 + 1)),
            Admission::Overflow
        );
    }

    #[test]
    fn subscriptions_go_with_their_socket() {
        let mut subscribers = Subscribers::default();
        let (a, b) = (ConnectionId::from("a"), ConnectionId::from("b"));
        let news = (TenantId::from("acme"), "news".to_owned());
        let other = (TenantId::from("globex"), "news".to_owned());
        subscribers.watch(&news, &a);
        subscribers.watch(&news, &b);
        subscribers.watch(&other, &a);
        assert_eq!(subscribers.members(&news).map(Iterator::count), Some(2));
        subscribers.forget(&a);
        assert_eq!(subscribers.members(&news).map(Iterator::count), Some(1));
        assert!(subscribers.members(&other).is_none());
        assert!(subscribers.unwatch(&news, &b));
        assert!(!subscribers.unwatch(&news, &b));
        assert!(subscribers.topics.is_empty() && subscribers.of_connection.is_empty());
    }

    #[test]
    fn the_directory_finds_sockets_by_tenant_and_user() {
        let mut directory = Directory::default();
        let (acme, globex) = (TenantId::from("acme"), TenantId::from("globex"));
        let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
        directory.insert(&acme, &alice, ConnectionId::from("1"));
        directory.insert(&acme, &alice, ConnectionId::from("2"));
        directory.insert(&acme, &bob, ConnectionId::from("3"));
        directory.insert(&globex, &alice, ConnectionId::from("4"));
        assert_eq!(directory.tenant(&acme).count(), 3);
        assert_eq!(directory.user(&acme, &alice).count(), 2);
        assert_eq!(directory.user(&globex, &bob).count(), 0);
        directory.remove(&acme, &alice, &ConnectionId::from("1"));
        directory.remove(&globex, &alice, &ConnectionId::from("4"));
        assert_eq!(directory.user(&acme, &alice).count(), 1);
        assert_eq!(directory.tenant(&globex).count(), 0);
        assert!(!directory.tenants.contains_key(&globex));
    }
}
