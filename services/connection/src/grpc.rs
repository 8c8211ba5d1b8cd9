//! The thin tonic adapter: each RPC validated into a command (see
//! [`crate::model`]), run by the domain code, and its outcome mapped back.

use std::sync::Arc;

use futures::StreamExt;
use streamer_api::v1::{
    self, DeliveryOutcome, DeliveryResult, connection_service_server::ConnectionService,
};
use streamer_core::ids::{ConnectionId, TenantId};
use streamer_core::trace;
use streamer_core::trust::Caller;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::delivery::Broadcasted;
use crate::error::ConnectionError;
use crate::model::{ListQuery, connection_to_proto, optional_id, page_token, required_id};
use crate::service::{BUILTIN_ACTIONS, BoxStream, ConnectionServer, ROUTER_QUEUE, Shared};
use crate::topics::position_to_proto;

fn counts(results: &[DeliveryResult]) -> v1::BroadcastResponse {
    let mut response = v1::BroadcastResponse::default();
    for r in results {
        match DeliveryOutcome::try_from(r.outcome).unwrap_or_default() {
            DeliveryOutcome::Delivered => response.delivered += 1,
            DeliveryOutcome::NotFound => response.not_found += 1,
            DeliveryOutcome::Gone => response.gone += 1,
            DeliveryOutcome::Throttled => response.throttled += 1,
            DeliveryOutcome::Unavailable => response.unavailable += 1,
            DeliveryOutcome::Rejected => response.rejected += 1,
            DeliveryOutcome::Unspecified => {}
        }
    }
    response.results = results.to_vec();
    response
}

#[tonic::async_trait]
impl ConnectionService for ConnectionServer {
    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!(
                "connection.send",
                otel.kind = "server",
                connection_id = %request.get_ref().connection_id,
                tenant_id = %request.get_ref().tenant_id,
            ),
        );
        let outcome = self
            .send(request.into_inner().try_into()?, &caller)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::SendResponse {
            outcome: outcome as i32,
        }))
    }

    async fn broadcast(
        &self,
        request: Request<v1::BroadcastRequest>,
    ) -> Result<Response<v1::BroadcastResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!(
                "connection.broadcast",
                otel.kind = "server",
                tenant_id = %request.get_ref().tenant_id,
            ),
        );
        let answer = match self
            .broadcast(request.into_inner().try_into()?, &caller)
            .instrument(span)
            .await?
        {
            Broadcasted::Each(results) => counts(&results),
            Broadcasted::Counted(fanout) => v1::BroadcastResponse {
                delivered: fanout.delivered,
                throttled: fanout.throttled,
                unavailable: fanout.unavailable_edges + fanout.unavailable_connections,
                gone: fanout.gone,
                rejected: fanout.rejected,
                ..Default::default()
            },
        };
        Ok(Response::new(answer))
    }

    async fn is_active(
        &self,
        request: Request<v1::IsActiveRequest>,
    ) -> Result<Response<v1::IsActiveResponse>, Status> {
        let caller = Caller::of(&request);
        let id: ConnectionId = required_id("connection_id", request.into_inner().connection_id)?;
        let active = match self.find(&id, None, &caller).await {
            Ok(record) => self.shared.delivery.is_active(&record).await,
            Err(ConnectionError::NotFound(_)) => false,
            Err(error) => return Err(error.into()),
        };
        Ok(Response::new(v1::IsActiveResponse { active }))
    }

    async fn get_connection(
        &self,
        request: Request<v1::GetConnectionRequest>,
    ) -> Result<Response<v1::GetConnectionResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let id: ConnectionId = required_id("connection_id", r.connection_id)?;
        let tenant: Option<TenantId> = optional_id("tenant_id", r.tenant_id)?;
        let record = self.find(&id, tenant.as_ref(), &caller).await?;
        Ok(Response::new(v1::GetConnectionResponse {
            connection: Some(connection_to_proto(record)),
        }))
    }

    async fn list_connections(
        &self,
        request: Request<v1::ListConnectionsRequest>,
    ) -> Result<Response<v1::ListConnectionsResponse>, Status> {
        let caller = Caller::of(&request);
        let query: ListQuery = request.into_inner().try_into()?;
        Self::check_reach(&caller, &query.tenant_id)?;
        let mut records = self
            .shared
            .store
            .list_connections(
                &query.tenant_id,
                query.user_id.as_ref(),
                query.after.as_ref(),
                query.page_size + 1,
            )
            .await
            .map_err(ConnectionError::from)?;
        let next_page_token = if records.len() > query.page_size {
            records.truncate(query.page_size);
            records.last().map_or_else(String::new, |r| {
                page_token::after(&query.scope(), r.connection_id.as_str())
            })
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListConnectionsResponse {
            connections: records.into_iter().map(connection_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn disconnect(
        &self,
        request: Request<v1::DisconnectRequest>,
    ) -> Result<Response<v1::DisconnectResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!(
                "connection.disconnect",
                otel.kind = "server",
                connection_id = %request.get_ref().connection_id,
                tenant_id = %request.get_ref().tenant_id,
            ),
        );
        self.disconnect(request.into_inner().try_into()?, &caller)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::DisconnectResponse {}))
    }

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<v1::SubscribeResponse>, Status> {
        let caller = Caller::of(&request);
        let subscribed = self
            .subscribe(request.into_inner().try_into()?, &caller)
            .await?;
        Ok(Response::new(v1::SubscribeResponse {
            connection_ids: subscribed
                .connection_ids
                .into_iter()
                .map(ConnectionId::into_string)
                .collect(),
            position: Some(position_to_proto(subscribed.position)),
        }))
    }

    async fn unsubscribe(
        &self,
        request: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::UnsubscribeResponse>, Status> {
        let caller = Caller::of(&request);
        let ended = self
            .unsubscribe(request.into_inner().try_into()?, &caller)
            .await?;
        Ok(Response::new(v1::UnsubscribeResponse {
            connection_ids: ended.into_iter().map(ConnectionId::into_string).collect(),
        }))
    }

    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!(
                "connection.publish",
                otel.kind = "server",
                tenant_id = %request.get_ref().tenant_id,
                topic = %request.get_ref().topic,
            ),
        );
        let published = self
            .publish(request.into_inner().try_into()?, &caller)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::PublishResponse {
            position: Some(position_to_proto(published.position)),
            delivered: published.fanout.delivered,
            edges: published.fanout.edges,
            throttled: published.fanout.throttled,
            unavailable_edges: published.fanout.unavailable_edges,
        }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<v1::ListSubscriptionsRequest>,
    ) -> Result<Response<v1::ListSubscriptionsResponse>, Status> {
        let caller = Caller::of(&request);
        let (page, next_page_token) = self
            .list_subscriptions(request.into_inner().try_into()?, &caller)
            .await?;
        Ok(Response::new(v1::ListSubscriptionsResponse {
            subscriptions: page
                .into_iter()
                .map(|s| v1::Subscription {
                    topic: s.topic,
                    connection_id: s.connection_id.into(),
                    user_id: s.user_id.into(),
                    subscribed_at: Some(streamer_core::timestamp(s.subscribed_at_ms)),
                })
                .collect(),
            next_page_token,
        }))
    }

    type ReceiveStream = BoxStream<v1::ReceiveResponse>;

    async fn receive(
        &self,
        request: Request<v1::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        if self.shared.shutdown.is_cancelled() {
            return Err(ConnectionError::ShuttingDown.into());
        }
        let caller = Caller::of(&request);
        let r = request.into_inner();
        if r.actions.is_empty() {
            return Err(ConnectionError::invalid("actions", "declare at least one action").into());
        }
        let mut actions = Vec::with_capacity(r.actions.len());
        for action in r.actions {
            let action: String = required_id("actions", action)?;
            if BUILTIN_ACTIONS.contains(&action.as_str()) {
                return Err(ConnectionError::invalid(
                    "actions",
                    format!("{action:?} is answered by Streamer itself"),
                )
                .into());
            }
            if !actions.contains(&action) {
                actions.push(action);
            }
        }
        let router_id: String =
            optional_id("router_id", r.router_id)?.unwrap_or_else(|| "router".into());
        let (tx, rx) = mpsc::channel(ROUTER_QUEUE);
        let key = self
            .shared
            .routers
            .register(&router_id, &actions, caller.tenants.clone(), tx);
        // The tenants as their strings, as every log line shows ids.
        let tenants = caller.tenants.as_ref().map(|t| {
            t.iter()
                .map(TenantId::as_str)
                .collect::<std::collections::BTreeSet<_>>()
        });
        tracing::info!(router_id = %router_id, actions = ?actions, ?tenants, "router attached");

        // Unregisters the router when its stream is dropped, whatever ends it.
        struct Unregister(Arc<Shared>, u64, String);
        impl Drop for Unregister {
            fn drop(&mut self) {
                self.0.routers.unregister(self.1);
                tracing::info!(router_id = %self.2, "router detached");
            }
        }
        let registered = v1::ReceiveResponse {
            event: Some(v1::receive_response::Event::Registered(
                v1::RouterRegistered {
                    actions,
                    router_id: router_id.clone(),
                },
            )),
        };
        let guard = Unregister(self.shared.clone(), key, router_id);
        let messages = ReceiverStream::new(rx).map(|item| {
            item.map(|message| v1::ReceiveResponse {
                event: Some(v1::receive_response::Event::Message(message)),
            })
        });
        // The registration first: the router reads it only after this
        // call returned, when its actions are in the table.
        let stream = tokio_stream::once(Ok(registered))
            .chain(messages)
            // Open while this replica drains: frames queued before it
            // began stopping may still be for this router.
            .take_until(self.shared.drain.drained.clone().cancelled_owned())
            .map(move |item| {
                let _keep = &guard;
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
