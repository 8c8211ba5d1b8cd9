"""ConnectionService: deliver to connections, users, tenants and topics."""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import grpc

from ._channel import Base, TlsOption
from ._gen.streamer.v1 import common_pb2, connection_pb2, connection_pb2_grpc
from .models import (
    BroadcastResult,
    Connection,
    Data,
    Outcome,
    PublishResult,
    Sequence,
    SubscribeResult,
    Subscription,
    to_payload,
)


class Connections(Base):
    """A client of ConnectionService.

        connections = Connections("127.0.0.1:50052")
        connections.send(connection_id, {"type": "response", "data": {"hello": "you"}})

    `target` is host:port (or a grpc.Channel to use as it is); `token` a
    service token sent as `authorization: Bearer` on every call (`--trust
    token`); `tls` None for plaintext, True for TLS with the system's roots,
    a `TLS` or grpc.ChannelCredentials. Every call waits at most `timeout`
    seconds. A failed call raises `StreamerError`.

    `data` is what to write to the socket: any JSON value (written as its
    compact serialization, an object's keys sorted), `Text("...")` for raw
    text, or `bytes` for a binary frame.
    """

    _stub_type = connection_pb2_grpc.ConnectionServiceStub
    stub: connection_pb2_grpc.ConnectionServiceStub

    def send(
        self,
        connection_id: str,
        data: Data,
        *,
        tenant_id: Optional[str] = None,
        sequence: Optional[Sequence] = None,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Outcome:
        """Writes `data` to one connection. `tenant_id` scopes it (another
        tenant's connection is NOT_FOUND); `sequence`, a (stream, number)
        pair, makes it idempotent: retried, it reaches the socket at most
        once. Returns DELIVERED, or GONE / THROTTLED / UNAVAILABLE; a
        connection with no record raises StreamerError NOT_FOUND."""
        request = send_request(connection_id, data, tenant_id, sequence)
        return Outcome._from_pb(self._unary(self.stub.Send, request, trace_context).outcome)

    def broadcast(
        self,
        data: Data,
        *,
        connection_ids: Optional[Iterable[str]] = None,
        user_id: Optional[str] = None,
        tenant_id: Optional[str] = None,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> BroadcastResult:
        """Writes `data` to many sockets:

        - `connection_ids=[...]`: those connections (scoped to `tenant_id`
          when given), with an outcome for each in `.results`;
        - `tenant_id=..., user_id=...`: every connection of the user;
        - `tenant_id=...` alone: every connection of the tenant.
        """
        request = broadcast_request(data, connection_ids, user_id, tenant_id)
        return BroadcastResult._from_pb(self._unary(self.stub.Broadcast, request, trace_context))

    def publish(
        self,
        tenant_id: str,
        topic: str,
        data: Data,
        key: Optional[str] = None,
        *,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> PublishResult:
        """Publishes `data` (JSON, or `Text`, sent as a JSON string) to a
        topic of a tenant; every subscribed socket gets
        `{"type":"message","topic":..,"epoch":..,"offset":..,"data":..}`.
        `key` conflates a slow consumer's waiting messages per key."""
        request = connection_pb2.PublishRequest(
            tenant_id=tenant_id, topic=topic, payload=to_payload(data), key=key or "",
        )
        return publish_result(self._unary(self.stub.Publish, request, trace_context))

    def subscribe(
        self,
        tenant_id: str,
        topic: str,
        *,
        connection_id: Optional[str] = None,
        user_id: Optional[str] = None,
    ) -> SubscribeResult:
        """Subscribes one connection, or every connection a user has open
        now, to a topic of the tenant."""
        request = connection_pb2.SubscribeRequest(tenant_id=tenant_id, topic=topic, **target(connection_id, user_id))
        return subscribe_result(self._unary(self.stub.Subscribe, request))

    def unsubscribe(
        self,
        tenant_id: str,
        topic: str,
        *,
        connection_id: Optional[str] = None,
        user_id: Optional[str] = None,
    ) -> Tuple[str, ...]:
        """Ends subscriptions; returns the connections that were subscribed."""
        request = connection_pb2.UnsubscribeRequest(tenant_id=tenant_id, topic=topic, **target(connection_id, user_id))
        return tuple(self._unary(self.stub.Unsubscribe, request).connection_ids)

    def list_subscriptions(
        self,
        tenant_id: str,
        *,
        topic: Optional[str] = None,
        connection_id: Optional[str] = None,
        page_size: int = 0,
    ) -> Iterator[Subscription]:
        """The subscriptions of a topic or of a connection, fetching pages
        as the iteration goes."""
        token = ""
        while True:
            request = list_subscriptions_request(tenant_id, topic, connection_id, page_size, token)
            response = self._unary(self.stub.ListSubscriptions, request)
            for subscription in response.subscriptions:
                yield Subscription._from_pb(subscription)
            token = response.next_page_token
            if not token:
                return

    def is_active(self, connection_id: str) -> bool:
        """Whether the connection is open now."""
        response = self._unary(self.stub.IsActive, connection_pb2.IsActiveRequest(connection_id=connection_id))
        return bool(response.active)

    def get_connection(self, connection_id: str, *, tenant_id: Optional[str] = None) -> Connection:
        """One connection's record (StreamerError NOT_FOUND when there is none)."""
        request = connection_pb2.GetConnectionRequest(connection_id=connection_id, tenant_id=tenant_id or "")
        return Connection._from_pb(self._unary(self.stub.GetConnection, request).connection)

    def list_connections(
        self, tenant_id: str, *, user_id: Optional[str] = None, page_size: int = 0
    ) -> Iterator[Connection]:
        """A tenant's connections (or one user's), in connection-id order,
        fetching pages of `page_size` (0: the server's default) as the
        iteration goes."""
        token = ""
        while True:
            request = list_connections_request(tenant_id, user_id, page_size, token)
            response = self._unary(self.stub.ListConnections, request)
            for connection in response.connections:
                yield Connection._from_pb(connection)
            token = response.next_page_token
            if not token:
                return

    def disconnect(self, connection_id: str, reason: str = "", *, tenant_id: Optional[str] = None) -> None:
        """Closes the connection's socket (1000, with `reason`) and removes its record."""
        request = connection_pb2.DisconnectRequest(connection_id=connection_id, reason=reason, tenant_id=tenant_id or "")
        self._unary(self.stub.Disconnect, request)


# -- requests and answers, shared with the asyncio client --


def send_request(
    connection_id: str, data: Data, tenant_id: Optional[str], sequence: Optional[Sequence]
) -> connection_pb2.SendRequest:
    request = connection_pb2.SendRequest(
        connection_id=connection_id, payload=to_payload(data), tenant_id=tenant_id or "",
    )
    if sequence is not None:
        stream, number = sequence
        request.sequence.stream = stream
        request.sequence.number = number
    return request


def broadcast_request(
    data: Data, connection_ids: Optional[Iterable[str]], user_id: Optional[str], tenant_id: Optional[str]
) -> connection_pb2.BroadcastRequest:
    payload = to_payload(data)
    if connection_ids is not None:
        if user_id is not None:
            raise ValueError("broadcast: give connection_ids or user_id, not both")
        if isinstance(connection_ids, str):
            raise TypeError("broadcast: connection_ids is a list of ids, not one id")
        return connection_pb2.BroadcastRequest(
            connections=connection_pb2.ConnectionIds(ids=list(connection_ids)),
            payload=payload, tenant_id=tenant_id or "",
        )
    if tenant_id is None:
        raise ValueError("broadcast: give connection_ids, or a tenant_id (with a user_id for one user)")
    if user_id is not None:
        return connection_pb2.BroadcastRequest(
            user=connection_pb2.UserTarget(tenant_id=tenant_id, user_id=user_id), payload=payload,
        )
    return connection_pb2.BroadcastRequest(tenant=connection_pb2.TenantTarget(tenant_id=tenant_id), payload=payload)


def publish_result(response: connection_pb2.PublishResponse) -> PublishResult:
    return PublishResult(
        epoch=response.position.epoch,
        offset=response.position.offset,
        delivered=response.delivered,
        edges=response.edges,
        throttled=response.throttled,
        unavailable_edges=response.unavailable_edges,
    )


def subscribe_result(response: connection_pb2.SubscribeResponse) -> SubscribeResult:
    return SubscribeResult(tuple(response.connection_ids), response.position.epoch, response.position.offset)


def list_subscriptions_request(
    tenant_id: str, topic: Optional[str], connection_id: Optional[str], page_size: int, token: str
) -> connection_pb2.ListSubscriptionsRequest:
    if (topic is None) == (connection_id is None):
        raise ValueError("list_subscriptions: give exactly one of topic and connection_id")
    selector = {"topic": topic} if topic is not None else {"connection_id": connection_id}
    return connection_pb2.ListSubscriptionsRequest(
        tenant_id=tenant_id, page=common_pb2.PageRequest(page_size=page_size, page_token=token), **selector,
    )


def list_connections_request(
    tenant_id: str, user_id: Optional[str], page_size: int, token: str
) -> connection_pb2.ListConnectionsRequest:
    return connection_pb2.ListConnectionsRequest(
        tenant_id=tenant_id, user_id=user_id or "",
        page=common_pb2.PageRequest(page_size=page_size, page_token=token),
    )


def target(connection_id: Optional[str], user_id: Optional[str]) -> Dict[str, Optional[str]]:
    if (connection_id is None) == (user_id is None):
        raise ValueError("give exactly one of connection_id and user_id")
    return {"connection_id": connection_id} if connection_id is not None else {"user_id": user_id}
