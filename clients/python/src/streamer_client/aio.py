"""The asyncio clients: `Connections` and `Progress` on grpc.aio, for
backends that run an event loop.

    from streamer_client.aio import Connections

    async with Connections("127.0.0.1:50052") as connections:
        await connections.send(connection_id, {"hello": "you"})

The methods, arguments, results and errors are those of the synchronous
clients (see `streamer_client.Connections` and `streamer_client.Progress`),
awaited; the listings and `watch` are async iterators. A router or a
processor is a long-lived worker: use the synchronous `Router` and
`Processor`, which run their handlers on threads.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Optional, Tuple, TypeVar, Union

import grpc
import grpc.aio

from ._channel import CHANNEL_OPTIONS, TlsOption, bearer, channel_credentials
from ._gen.streamer.v1 import connection_pb2, connection_pb2_grpc, progress_pb2, progress_pb2_grpc
from ._json import JSON, to_value
from .connections import (
    broadcast_request,
    list_connections_request,
    list_subscriptions_request,
    publish_result,
    send_request,
    subscribe_result,
    target,
)
from .errors import StreamerError
from .models import (
    BroadcastResult,
    Connection,
    Data,
    Identity,
    Outcome,
    PublishResult,
    Request,
    Sequence,
    Submitted,
    SubscribeResult,
    Subscription,
    to_payload,
)
from .progress import cancel_request, fail_request, select, submit_request

__all__ = ["Connections", "Progress"]

_Client = TypeVar("_Client", bound="_Base")


def open_channel(target: str, tls: TlsOption) -> grpc.aio.Channel:
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


class _Base:
    _stub_type: Callable[[grpc.aio.Channel], Any]

    def __init__(
        self,
        target: Union[str, grpc.aio.Channel],
        *,
        token: Optional[str] = None,
        tls: TlsOption = None,
        timeout: Optional[float] = 10.0,
    ) -> None:
        if isinstance(target, str):
            self._channel = open_channel(target, tls)
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._auth = bearer(token)
        self.timeout = timeout
        self.stub = type(self)._stub_type(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        """Closes the channel (when this client opened it)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self: _Client) -> _Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _metadata(self, trace_context: Optional[Mapping[str, str]] = None) -> Tuple[Tuple[str, str], ...]:
        return self._auth + (tuple(trace_context.items()) if trace_context else ())

    async def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata(trace_context))
        except grpc.RpcError as error:
            raise StreamerError.from_rpc_error(error) from error


class Connections(_Base):
    """ConnectionService, on asyncio: as `streamer_client.Connections`."""

    _stub_type = connection_pb2_grpc.ConnectionServiceStub
    stub: connection_pb2_grpc.ConnectionServiceStub

    async def send(
        self,
        connection_id: str,
        data: Data,
        *,
        tenant_id: Optional[str] = None,
        sequence: Optional[Sequence] = None,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Outcome:
        request = send_request(connection_id, data, tenant_id, sequence)
        return Outcome._from_pb((await self._unary(self.stub.Send, request, trace_context)).outcome)

    async def broadcast(
        self,
        data: Data,
        *,
        connection_ids: Optional[Iterable[str]] = None,
        user_id: Optional[str] = None,
        tenant_id: Optional[str] = None,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> BroadcastResult:
        request = broadcast_request(data, connection_ids, user_id, tenant_id)
        return BroadcastResult._from_pb(await self._unary(self.stub.Broadcast, request, trace_context))

    async def publish(
        self,
        tenant_id: str,
        topic: str,
        data: Data,
        key: Optional[str] = None,
        *,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> PublishResult:
        request = connection_pb2.PublishRequest(tenant_id=tenant_id, topic=topic, payload=to_payload(data), key=key or "")
        return publish_result(await self._unary(self.stub.Publish, request, trace_context))

    async def subscribe(
        self, tenant_id: str, topic: str, *, connection_id: Optional[str] = None, user_id: Optional[str] = None
    ) -> SubscribeResult:
        request = connection_pb2.SubscribeRequest(tenant_id=tenant_id, topic=topic, **target(connection_id, user_id))
        return subscribe_result(await self._unary(self.stub.Subscribe, request))

    async def unsubscribe(
        self, tenant_id: str, topic: str, *, connection_id: Optional[str] = None, user_id: Optional[str] = None
    ) -> Tuple[str, ...]:
        request = connection_pb2.UnsubscribeRequest(tenant_id=tenant_id, topic=topic, **target(connection_id, user_id))
        return tuple((await self._unary(self.stub.Unsubscribe, request)).connection_ids)

    async def list_subscriptions(
        self, tenant_id: str, *, topic: Optional[str] = None, connection_id: Optional[str] = None, page_size: int = 0
    ) -> AsyncIterator[Subscription]:
        token = ""
        while True:
            request = list_subscriptions_request(tenant_id, topic, connection_id, page_size, token)
            response = await self._unary(self.stub.ListSubscriptions, request)
            for subscription in response.subscriptions:
                yield Subscription._from_pb(subscription)
            token = response.next_page_token
            if not token:
                return

    async def is_active(self, connection_id: str) -> bool:
        response = await self._unary(self.stub.IsActive, connection_pb2.IsActiveRequest(connection_id=connection_id))
        return bool(response.active)

    async def get_connection(self, connection_id: str, *, tenant_id: Optional[str] = None) -> Connection:
        request = connection_pb2.GetConnectionRequest(connection_id=connection_id, tenant_id=tenant_id or "")
        return Connection._from_pb((await self._unary(self.stub.GetConnection, request)).connection)

    async def list_connections(
        self, tenant_id: str, *, user_id: Optional[str] = None, page_size: int = 0
    ) -> AsyncIterator[Connection]:
        token = ""
        while True:
            request = list_connections_request(tenant_id, user_id, page_size, token)
            response = await self._unary(self.stub.ListConnections, request)
            for connection in response.connections:
                yield Connection._from_pb(connection)
            token = response.next_page_token
            if not token:
                return

    async def disconnect(self, connection_id: str, reason: str = "", *, tenant_id: Optional[str] = None) -> None:
        request = connection_pb2.DisconnectRequest(connection_id=connection_id, reason=reason, tenant_id=tenant_id or "")
        await self._unary(self.stub.Disconnect, request)


class Progress(_Base):
    """ProgressService, on asyncio: as `streamer_client.Progress`."""

    _stub_type = progress_pb2_grpc.ProgressServiceStub
    stub: progress_pb2_grpc.ProgressServiceStub

    async def submit(
        self,
        connection_id: str,
        action: str,
        payload: JSON = None,
        *,
        request_id: Optional[str] = None,
        metadata: Optional[Mapping[str, JSON]] = None,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Submitted:
        request = submit_request(connection_id, action, payload, request_id, metadata)
        response = await self._unary(self.stub.Submit, request, trace_context)
        return Submitted(Request._from_pb(response.request), response.duplicate)

    async def get(
        self,
        id: Optional[str] = None,
        *,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        request_id: Optional[str] = None,
        owner: Optional[Identity] = None,
        deliver_to_connection_id: Optional[str] = None,
    ) -> Request:
        request = progress_pb2.GetRequest(deliver_to_connection_id=deliver_to_connection_id or "")
        select(request, id, tenant_id, user_id, request_id, owner)
        return Request._from_pb((await self._unary(self.stub.Get, request)).request)

    async def watch(
        self,
        id: Optional[str] = None,
        *,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        request_id: Optional[str] = None,
        owner: Optional[Identity] = None,
        timeout: Optional[float] = None,
    ) -> AsyncIterator[Request]:
        request = progress_pb2.WatchRequest()
        select(request, id, tenant_id, user_id, request_id, owner)
        call = self.stub.Watch(request, timeout=timeout, metadata=self._metadata())
        try:
            async for response in call:
                yield Request._from_pb(response.request)
        except grpc.RpcError as error:
            raise StreamerError.from_rpc_error(error) from error
        finally:
            call.cancel()

    async def cancel(self, id: str, reason: str = "", *, owner: Optional[Identity] = None) -> Request:
        return Request._from_pb((await self._unary(self.stub.Cancel, cancel_request(id, reason, owner))).request)

    async def complete(
        self, id: str, processor_id: str, result: JSON = None, *, trace_context: Optional[Mapping[str, str]] = None
    ) -> Request:
        request = progress_pb2.CompleteRequest(id=id, processor_id=processor_id, result=to_value(result))
        return Request._from_pb((await self._unary(self.stub.Complete, request, trace_context)).request)

    async def fail(
        self, id: str, processor_id: str, code: str, message: str = "", *,
        details: Optional[Mapping[str, JSON]] = None, retryable: bool = False,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Request:
        request = fail_request(id, processor_id, code, message, details, retryable)
        return Request._from_pb((await self._unary(self.stub.Fail, request, trace_context)).request)
