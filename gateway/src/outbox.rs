//! A socket's outbound queue: bounded, one producer side (the edge's table
//! of sockets) and one consumer (the socket's writer), and holding memory
//! only while messages wait.
//!
//! tokio's bounded `mpsc` channel allocates its first block of 32 slots
//! when it is made (1.5 KiB for a 48-byte message), so every idle socket
//! paid for a queue it did not use. Here the buffer is allocated on the
//! first message and given back once a burst has drained, beyond a few
//! slots kept for the next message.
//!
//! Overflow policy: [`OutboxSender::try_send`] never waits; a full queue
//! answers [`TrySendError::Full`] and the caller decides (the edge closes
//! the socket as a slow consumer). A message sent with a conflation key
//! ([`OutboxSender::try_send_conflated`]) replaces the waiting message of
//! the same key, if there is one, in its place in the queue: a socket that
//! is behind gets the latest value of each key, never a stale one, and the
//! last message of a key is never dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Message;

use tokio::sync::Notify;

use crate::edge::Outbound;

/// Slots a drained queue keeps for the next message; a larger buffer
/// (left by a burst) is freed.
const KEPT_SLOTS: usize = 4;

/// A new queue of at most `capacity` waiting messages.
pub fn outbox(capacity: usize) -> (OutboxSender, OutboxReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            sender: true,
            receiver: true,
        }),
        ready: Notify::new(),
        capacity,
    });
    (OutboxSender(shared.clone()), OutboxReceiver(shared))
}

struct Shared {
    state: Mutex<State>,
    /// Woken when a message arrives or the sender goes.
    ready: Notify,
    capacity: usize,
}

struct State {
    queue: VecDeque<Entry>,
    /// Whether each side is still there.
    sender: bool,
    receiver: bool,
}

impl State {
    /// The first waiting message; a drained queue gives back the buffer a
    /// burst left, beyond [`KEPT_SLOTS`].
    fn pop(&mut self) -> Option<Entry> {
        let entry = self.queue.pop_front()?;
        if self.queue.is_empty() && self.queue.capacity() > KEPT_SLOTS {
            self.queue = VecDeque::new();
        }
        Some(entry)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere mid-push or mid-pop of a
        // plain queue, which is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// `capacity` messages are already waiting.
    Full,
    /// The socket's writer is gone.
    Closed,
}

/// The queue's producer side.
#[derive(Debug)]
pub struct OutboxSender(Arc<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl OutboxSender {
    /// Queues `message` without waiting.
    pub fn try_send(&self, message: Outbound) -> Result<(), TrySendError> {
        self.push(Entry {
            out: message,
            key: None,
        })
    }

    /// Queues `message`, or, when a message of the same `key` still waits,
    /// puts it in that one's place.
    pub fn try_send_conflated(&self, message: Message, key: &Arc<str>) -> Result<(), TrySendError> {
        {
            let mut state = self.0.lock();
            if !state.receiver {
                return Err(TrySendError::Closed);
            }
            if let Some(waiting) = state
                .queue
                .iter_mut()
                .rev()
                .find(|e| e.key.as_deref() == Some(&**key))
            {
                waiting.out = Outbound::Message(message);
                metrics::counter!("streamer_gateway_conflated_total").increment(1);
                return Ok(());
            }
        }
        self.push(Entry {
            out: Outbound::Message(message),
            key: Some(key.clone()),
        })
    }

    fn push(&self, entry: Entry) -> Result<(), TrySendError> {
        {
            let mut state = self.0.lock();
            if !state.receiver {
                return Err(TrySendError::Closed);
            }
            if state.queue.len() >= self.0.capacity {
                return Err(TrySendError::Full);
            }
            state.queue.push_back(entry);
        }
        self.0.ready.notify_one();
        Ok(())
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        self.0.lock().sender = false;
        self.0.ready.notify_one();
    }
}

/// The queue's consumer side.
#[derive(Debug)]
pub struct OutboxReceiver(Arc<Shared>);

impl OutboxReceiver {
    /// The next message; `None` once the sender is gone and nothing waits.
    /// Cancel-safe: a `recv` dropped before it returns takes nothing.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            // A wake-up between the check and the wait is kept as a permit,
            // so none is lost.
            let woken = self.0.ready.notified();
            match self.take() {
                Taken::Message(message) => return Some(message),
                Taken::Closed => return None,
                Taken::Empty => woken.await,
            }
        }
    }

    /// The next message if one waits now.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        match self.take() {
            Taken::Message(message) => Some(message),
            Taken::Empty | Taken::Closed => None,
        }
    }

    /// The next message if one waits now and is a message to write (not a
    /// close, which stays first in the queue): what a writer adds to the
    /// batch it is about to flush.
    pub fn try_recv_message(&mut self) -> Option<Message> {
        let mut state = self.0.lock();
        if !matches!(
            state.queue.front(),
            Some(Entry {
                out: Outbound::Message(_),
                ..
            })
        ) {
            return None;
        }
        let entry = state.pop()?;
        match entry.out {
            Outbound::Message(message) => Some(message),
            Outbound::Close { .. } => None,
        }
    }

    fn take(&self) -> Taken {
        let mut state = self.0.lock();
        match state.pop() {
            Some(entry) => Taken::Message(entry.out),
            None if state.sender => Taken::Empty,
            None => Taken::Closed,
        }
    }
}

/// A waiting message, and its conflation key if it has one.
struct Entry {
    out: Outbound,
    key: Option<Arc<str>>,
}

enum Taken {
    Message(Outbound),
    Empty,
    Closed,
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver = false;
        state.queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn text(s: &str) -> Outbound {
        Outbound::Message(axum::extract::ws::Message::Text(s.into()))
    }

    fn is_text(out: Option<Outbound>, want: &str) -> bool {
        matches!(out, Some(Outbound::Message(axum::extract::ws::Message::Text(t))) if t.as_str() == want)
    }

    #[tokio::test]
    async fn messages_come_out_in_order_up_to_the_capacity() {
        let (tx, mut rx) = outbox(2);
        tx.try_send(text("a")).unwrap();
        tx.try_send(text("b")).unwrap();
        assert_eq!(tx.try_send(text("c")), Err(TrySendError::Full));
        assert!(is_text(rx.recv().await, "a"));
        tx.try_send(text("c")).unwrap();
        assert!(is_text(rx.recv().await, "b"));
        assert!(is_text(rx.try_recv(), "c"));
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn an_idle_queue_holds_no_buffer_and_a_drained_burst_gives_its_back() {
        let (tx, mut rx) = outbox(1024);
        assert_eq!(rx.0.lock().queue.capacity(), 0);
        for i in 0..100 {
            tx.try_send(text(&i.to_string())).unwrap();
        }
        assert!(rx.0.lock().queue.capacity() >= 100);
        for i in 0..100 {
            assert!(is_text(rx.recv().await, &i.to_string()));
        }
        assert_eq!(rx.0.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn a_conflated_message_takes_the_place_of_the_waiting_one_of_its_key() {
        let (tx, mut rx) = outbox(3);
        let (price, volume): (Arc<str>, Arc<str>) = (Arc::from("price"), Arc::from("volume"));
        let message = |s: &str| axum::extract::ws::Message::Text(s.into());
        tx.try_send_conflated(message("p1"), &price).unwrap();
        tx.try_send(text("plain")).unwrap();
        tx.try_send_conflated(message("v1"), &volume).unwrap();
        // Full, but each key's latest value still gets its place.
        for i in 2..100 {
            tx.try_send_conflated(message(&format!("p{i}")), &price)
                .unwrap();
        }
        tx.try_send_conflated(message("v2"), &volume).unwrap();
        assert_eq!(tx.try_send(text("more")), Err(TrySendError::Full));
        assert!(is_text(rx.recv().await, "p99"));
        assert!(is_text(rx.recv().await, "plain"));
        assert!(is_text(rx.recv().await, "v2"));
        // Once taken, a key's next message queues anew.
        tx.try_send_conflated(message("p100"), &price).unwrap();
        assert!(is_text(rx.recv().await, "p100"));
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_batch_takes_messages_but_leaves_a_close_first_in_line() {
        let (tx, mut rx) = outbox(4);
        tx.try_send(text("a")).unwrap();
        tx.try_send(Outbound::Close {
            code: 1000,
            reason: String::new(),
        })
        .unwrap();
        assert!(matches!(rx.try_recv_message(), Some(Message::Text(t)) if t.as_str() == "a"));
        assert!(rx.try_recv_message().is_none());
        assert!(matches!(
            rx.recv().await,
            Some(Outbound::Close { code: 1000, .. })
        ));
        assert!(rx.try_recv_message().is_none());
    }

    #[tokio::test]
    async fn the_receiver_sees_what_was_queued_then_the_end_once_the_sender_goes() {
        let (tx, mut rx) = outbox(4);
        tx.try_send(text("last")).unwrap();
        drop(tx);
        assert!(is_text(rx.recv().await, "last"));
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn sending_to_a_gone_receiver_is_closed() {
        let (tx, rx) = outbox(4);
        drop(rx);
        assert_eq!(tx.try_send(text("x")), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_message_and_a_cancelled_wait_takes_nothing() {
        use futures::FutureExt as _;
        let (tx, mut rx) = outbox(4);
        // A wait given up (as a `select!` branch that lost) takes nothing.
        assert!(rx.recv().now_or_never().is_none());
        tx.try_send(text("first")).unwrap();
        assert!(is_text(rx.recv().now_or_never().flatten(), "first"));
        let waiting = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.try_send(text("hello")).unwrap();
        assert!(is_text(waiting.await.unwrap(), "hello"));
    }
}
