//! The routers listening on `Receive`, by action.
//!
//! Each frame goes to exactly one router among those that declared its
//! action, round robin; a router whose queue is full is skipped for the
//! next one, and one whose stream has gone is forgotten. A router whose
//! credential is bound to tenants only gets those tenants' frames.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use streamer_api::v1::InboundMessage;
use streamer_core::ids::TenantId;
use tokio::sync::{mpsc, watch};

pub type InboundSender = mpsc::Sender<Result<InboundMessage, tonic::Status>>;

#[derive(Debug)]
struct RouterLink {
    key: u64,
    router_id: String,
    /// `None`: every tenant.
    tenants: Option<BTreeSet<TenantId>>,
    tx: InboundSender,
}

impl RouterLink {
    fn serves(&self, message: &InboundMessage) -> bool {
        let tenant = message.identity.as_ref().map(|i| i.tenant_id.as_str());
        self.tenants
            .as_ref()
            .is_none_or(|t| tenant.is_some_and(|tenant| t.contains(tenant)))
    }
}

#[derive(Debug)]
pub struct RouterTable {
    /// A std RwLock: read per inbound frame, written when routers come and
    /// go; never held across an await.
    by_action: RwLock<HashMap<String, Vec<RouterLink>>>,
    next_key: AtomicU64,
    cursor: AtomicUsize,
    /// The actions with a router, for the edges (which send those frames
    /// here): changes whenever the set does.
    actions: watch::Sender<BTreeSet<String>>,
}

impl Default for RouterTable {
    fn default() -> Self {
        Self {
            by_action: RwLock::default(),
            next_key: AtomicU64::default(),
            cursor: AtomicUsize::default(),
            actions: watch::Sender::new(BTreeSet::new()),
        }
    }
}

/// Why a frame could not be handed to a router.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No router declared the action.
    NoRouter,
    /// Every router of the action has a full queue.
    Busy,
}

impl RouterTable {
    /// Registers a router for `actions`; returns the key that unregisters it.
    pub fn register(
        &self,
        router_id: &str,
        actions: &[String],
        tenants: Option<BTreeSet<TenantId>>,
        tx: InboundSender,
    ) -> u64 {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let mut table = self.write();
        for action in actions {
            table.entry(action.clone()).or_default().push(RouterLink {
                key,
                router_id: router_id.to_owned(),
                tenants: tenants.clone(),
                tx: tx.clone(),
            });
        }
        self.publish(&table);
        key
    }

    /// The actions with a router now, and each change of them.
    pub fn actions(&self) -> watch::Receiver<BTreeSet<String>> {
        self.actions.subscribe()
    }

    fn publish(&self, table: &HashMap<String, Vec<RouterLink>>) {
        let actions: BTreeSet<String> = table.keys().cloned().collect();
        self.actions.send_if_modified(|current| {
            let changed = *current != actions;
            *current = actions;
            changed
        });
    }

    pub fn unregister(&self, key: u64) {
        let mut table = self.write();
        table.retain(|_, links| {
            links.retain(|l| l.key != key);
            !links.is_empty()
        });
        self.publish(&table);
    }

    pub fn handles(&self, action: &str) -> bool {
        self.read().contains_key(action)
    }

    /// Hands `message` to one router of its action.
    pub fn dispatch(
        &self,
        message: InboundMessage,
    ) -> Result<String, (RouteError, Box<InboundMessage>)> {
        let mut message = message;
        let mut closed = Vec::new();
        let result = {
            let table = self.read();
            let links: Vec<&RouterLink> = table
                .get(&message.action)
                .map(|links| links.iter().filter(|l| l.serves(&message)).collect())
                .unwrap_or_default();
            if links.is_empty() {
                return Err((RouteError::NoRouter, Box::new(message)));
            }
            let start = self.cursor.fetch_add(1, Ordering::Relaxed);
            let mut outcome = Err(RouteError::Busy);
            for i in 0..links.len() {
                let link = links[(start + i) % links.len()];
                match link.tx.try_send(Ok(message)) {
                    Ok(()) => {
                        outcome = Ok(link.router_id.clone());
                        message = InboundMessage::default();
                        break;
                    }
                    Err(mpsc::error::TrySendError::Full(Ok(m))) => message = m,
                    Err(mpsc::error::TrySendError::Closed(Ok(m))) => {
                        closed.push(link.key);
                        message = m;
                    }
                    // We only ever send Ok.
                    Err(_) => return Err((RouteError::Busy, Box::default())),
                }
            }
            if outcome.is_err() && closed.len() == links.len() {
                outcome = Err(RouteError::NoRouter);
            }
            outcome
        };
        for key in closed {
            self.unregister(key);
        }
        result.map_err(|e| (e, Box::new(message)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<RouterLink>>> {
        self.by_action.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<RouterLink>>> {
        self.by_action.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(action: &str) -> InboundMessage {
        InboundMessage {
            action: action.into(),
            ..Default::default()
        }
    }

    #[test]
    fn round_robins_and_skips_full_and_closed_routers() {
        let table = RouterTable::default();
        let (tx_a, mut rx_a) = mpsc::channel(1);
        let (tx_b, rx_b) = mpsc::channel(1);
        table.register("a", &["echo".into()], None, tx_a);
        let key_b = table.register("b", &["echo".into()], None, tx_b);
        let first = table.dispatch(message("echo")).unwrap();
        let second = table.dispatch(message("echo")).unwrap();
        assert_ne!(first, second, "two routers share the load");
        // Both queues are full now.
        assert_eq!(
            table.dispatch(message("echo")).unwrap_err().0,
            RouteError::Busy
        );
        assert!(rx_a.try_recv().is_ok());
        assert_eq!(table.dispatch(message("echo")).unwrap(), "a");
        drop(rx_b);
        assert!(rx_a.try_recv().is_ok());
        table.dispatch(message("echo")).unwrap();
        table.unregister(key_b);
        assert_eq!(
            table.dispatch(message("health")).unwrap_err().0,
            RouteError::NoRouter
        );
    }

    #[test]
    fn a_router_bound_to_tenants_gets_only_their_frames() {
        let table = RouterTable::default();
        let (tx, mut rx) = mpsc::channel(4);
        table.register(
            "acme-only",
            &["echo".into()],
            Some(["acme".into()].into()),
            tx,
        );
        let from = |tenant: &str| InboundMessage {
            action: "echo".into(),
            identity: Some(streamer_api::v1::Identity {
                tenant_id: tenant.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(table.dispatch(from("acme")).unwrap(), "acme-only");
        assert_eq!(
            table.dispatch(from("globex")).unwrap_err().0,
            RouteError::NoRouter
        );
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "only acme's frame arrived");
    }

    #[test]
    fn a_router_whose_stream_closed_is_forgotten() {
        let table = RouterTable::default();
        let (tx, rx) = mpsc::channel(1);
        table.register("a", &["echo".into()], None, tx);
        drop(rx);
        assert_eq!(
            table.dispatch(message("echo")).unwrap_err().0,
            RouteError::NoRouter
        );
        assert!(!table.handles("echo"));
    }
}
