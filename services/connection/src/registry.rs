//! The registry: which connections exist, found by id, tenant or user
//! within what a caller may reach, and the sweep of expired records.

use streamer_core::ids::{ConnectionId, TenantId, UserId};
use streamer_core::store::{ConnectionRecord, now_ms};
use streamer_core::trust::Caller;

use crate::error::ConnectionError;
use crate::service::{ConnectionServer, SWEEP_INTERVAL};

impl ConnectionServer {
    pub(crate) async fn sweep_expired(self) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shared.shutdown.cancelled() => return,
            }
            match self.shared.store.sweep_connections(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "swept expired connections"),
                Err(error) => tracing::warn!(%error, "connection sweep failed"),
            }
        }
    }

    /// A live record, scoped to `tenant` when given and always to the
    /// tenants `caller` may reach. One outside that scope is NOT_FOUND, so
    /// a caller learns nothing of other tenants' connections.
    pub(crate) async fn find(
        &self,
        connection_id: &ConnectionId,
        tenant: Option<&TenantId>,
        caller: &Caller,
    ) -> Result<ConnectionRecord, ConnectionError> {
        self.shared
            .store
            .get_connection(connection_id)
            .await?
            .filter(|r| tenant.is_none_or(|t| *t == r.tenant_id) && caller.reaches(&r.tenant_id))
            .ok_or_else(|| ConnectionError::NotFound(connection_id.clone()))
    }

    /// A whole tenant (or one of its users) is addressed: the caller must
    /// be allowed to reach it.
    pub(crate) fn check_reach(
        caller: &Caller,
        tenant_id: &TenantId,
    ) -> Result<(), ConnectionError> {
        if caller.reaches(tenant_id) {
            Ok(())
        } else {
            Err(ConnectionError::PermissionDenied(format!(
                "this credential ({}) may not reach tenant {:?}",
                caller.subject,
                tenant_id.as_str()
            )))
        }
    }

    pub(crate) async fn all_connections(
        &self,
        tenant: &TenantId,
        user: Option<&UserId>,
    ) -> Result<Vec<ConnectionRecord>, ConnectionError> {
        const PAGE: usize = 1000;
        let mut out: Vec<ConnectionRecord> = Vec::new();
        loop {
            let after = out.last().map(|r| r.connection_id.clone());
            let page = self
                .shared
                .store
                .list_connections(tenant, user, after.as_ref(), PAGE)
                .await?;
            let done = page.len() < PAGE;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }
}
