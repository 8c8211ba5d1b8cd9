//! ProgressService's view of ConnectionService: who is behind a connection,
//! and delivering one message to it.

use std::sync::Arc;
use std::time::Duration;

use streamer_api::v1;
use streamer_api::v1::connection_service_client::ConnectionServiceClient;
use streamer_core::grpc::Balanced;
use streamer_core::ids::{ConnectionId, RequestId, TenantId, UserId};
use streamer_core::shutdown::Shutdown;
use streamer_core::trust::{AuthedChannel, Role, Trust};

use crate::error::ProgressError;

/// The verified identity behind a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectionIdentity {
    pub tenant_id: TenantId,
    pub user_id: UserId,
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Delivered,
    /// The connection is gone (not found, closed, or closed as a slow
    /// consumer): retrying cannot help.
    Gone,
    /// ConnectionService could not be reached or failed: retrying may help.
    Unavailable,
}

/// A cheap-to-clone handle on every ConnectionService replica, called in
/// turn; a call that gets no answer from one replica goes on to the next.
#[derive(Clone)]
pub(crate) struct ConnectionDirectory {
    replicas: Arc<Balanced<ConnectionServiceClient<AuthedChannel>>>,
}

/// Calls made of one question before it counts as unanswered: the next
/// replica in turn, then one more.
const ATTEMPTS: usize = 2;

impl ConnectionDirectory {
    /// Follows every replica `list` names (one URL, a DNS name that
    /// resolves to every replica, or a comma-separated list) until
    /// `shutdown`. Channels connect lazily, so this service may start
    /// before ConnectionService.
    pub async fn follow(list: &str, trust: &Trust, shutdown: &Shutdown) -> anyhow::Result<Self> {
        let credentials = trust.credentials("progress-service", &[Role::Backend]);
        let replicas = Balanced::follow_list(
            list,
            trust,
            // A hung call must not stall a request's outbox forever.
            (Duration::from_secs(5), Some(Duration::from_secs(10))),
            move |channel| ConnectionServiceClient::with_interceptor(channel, credentials.clone()),
            shutdown.clone(),
        )
        .await?;
        Ok(Self { replicas })
    }

    pub async fn identity(
        &self,
        connection_id: &ConnectionId,
    ) -> Result<ConnectionIdentity, ProgressError> {
        let reply = self
            .replicas
            .call(ATTEMPTS, Duration::ZERO, |mut client| async move {
                client
                    .get_connection(v1::GetConnectionRequest {
                        connection_id: connection_id.to_string(),
                        tenant_id: String::new(),
                    })
                    .await
            })
            .await;
        match reply {
            Ok(connection) => {
                let identity = connection
                    .into_inner()
                    .connection
                    .and_then(|c| c.identity)
                    .unwrap_or_default();
                if identity.user_id.is_empty() {
                    return Err(ProgressError::ConnectionService(format!(
                        "connection {:?} has no identity",
                        connection_id.as_str()
                    )));
                }
                Ok(ConnectionIdentity {
                    tenant_id: identity.tenant_id.into(),
                    user_id: identity.user_id.into(),
                })
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(ProgressError::ConnectionNotFound(connection_id.clone()))
            }
            Err(status) => Err(ProgressError::ConnectionService(
                status.message().to_owned(),
            )),
        }
    }

    /// Sends one JSON message, number `sequence` of request `request_id`'s
    /// messages, to a connection of `tenant_id`. The number makes the send
    /// idempotent (the edge writes it at most once), so `Unavailable` may
    /// always be retried.
    pub async fn send(
        &self,
        connection_id: &ConnectionId,
        tenant_id: &TenantId,
        (request_id, sequence): (&RequestId, u64),
        message: serde_json::Value,
    ) -> Delivery {
        let send = v1::SendRequest {
            connection_id: connection_id.to_string(),
            // Serialised here, as text, so the client sees the protocol's
            // field order (`type` first); a protobuf Struct would sort the
            // keys.
            payload: Some(v1::Payload {
                body: Some(v1::payload::Body::Text(message.to_string())),
            }),
            tenant_id: tenant_id.to_string(),
            sequence: Some(v1::Sequence {
                stream: request_id.to_string(),
                number: sequence,
            }),
        };
        let reply = self
            .replicas
            .call(ATTEMPTS, Duration::ZERO, |mut client| {
                let send = send.clone();
                async move { client.send(streamer_core::trace::request(send)).await }
            })
            .await;
        match reply {
            Ok(reply) => match reply.into_inner().outcome() {
                v1::DeliveryOutcome::Delivered => Delivery::Delivered,
                // The socket is closed (or was closed as a slow consumer).
                v1::DeliveryOutcome::NotFound
                | v1::DeliveryOutcome::Gone
                | v1::DeliveryOutcome::Throttled => Delivery::Gone,
                // The transport will never take this message (too large for
                // API Gateway): like a gone client, the request's state stays
                // in the store for the client to read with `get_request`.
                v1::DeliveryOutcome::Rejected => Delivery::Gone,
                // The edge is detached or has not confirmed yet: it may be
                // back in a moment, and a retry is never written twice.
                v1::DeliveryOutcome::Unavailable => Delivery::Unavailable,
                // An outcome this build does not know: assume the worst
                // that retrying can fix.
                v1::DeliveryOutcome::Unspecified => Delivery::Unavailable,
            },
            Err(status) if status.code() == tonic::Code::NotFound => Delivery::Gone,
            // Includes this call's own timeout: the edge may have written
            // the message, so the retry carries the same sequence.
            Err(status) => {
                tracing::debug!(connection_id = connection_id.as_str(), code = ?status.code(), error = status.message(), "send failed");
                Delivery::Unavailable
            }
        }
    }
}
