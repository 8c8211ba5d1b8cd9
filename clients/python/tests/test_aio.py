"""The asyncio clients against a real Streamer."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, TypeVar

import grpc
import pytest

from streamer_client import Outcome, Processor, RequestStatus, StreamerError
from streamer_client import Progress as SyncProgress
from streamer_client.aio import Connections, Progress

from conftest import TIMEOUT, unique

T = TypeVar("T")


def run(coroutine: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, TIMEOUT)

    return asyncio.run(bounded())


def test_send_broadcast_and_publish_on_asyncio(open_client, tenant) -> None:
    client = open_client(unique("alice"))

    async def scenario() -> Any:
        async with Connections(os.environ["STREAMER_CONNECTION_TARGET"]) as connections:
            listed = [c.connection_id async for c in connections.list_connections(tenant, page_size=1)]
            sent = await connections.send(client.connection_id, {"n": 1})
            broadcast = await connections.broadcast({"n": 2}, tenant_id=tenant, user_id=client.user_id)
            await connections.subscribe(tenant, "news", connection_id=client.connection_id)
            published = await connections.publish(tenant, "news", {"n": 3})
            with pytest.raises(StreamerError) as missing:
                await connections.get_connection("no-such-connection")
            return listed, sent, broadcast, published, missing.value

    listed, sent, broadcast, published, missing = run(scenario())

    assert listed == [client.connection_id]
    assert sent is Outcome.DELIVERED and broadcast.delivered == 1 and published.delivered == 1
    assert client.recv_json() == {"n": 1}
    assert client.recv_json() == {"n": 2}
    assert client.recv_json()["data"] == {"n": 3}
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "CONNECTION_NOT_FOUND")


def test_submit_and_watch_on_asyncio(open_client) -> None:
    client = open_client(unique("bob"))
    action = unique("double")
    processor = Processor(SyncProgress(os.environ["STREAMER_PROGRESS_TARGET"]), actions={action: lambda job: job.payload * 2},
                          processor_id=unique("processor"))

    async def scenario() -> Any:
        async with Progress(os.environ["STREAMER_PROGRESS_TARGET"]) as progress:
            submitted = await progress.submit(client.connection_id, action, 21, request_id="a1")
            states = [state async for state in progress.watch(submitted.request.id, timeout=TIMEOUT)]
            return states, await progress.get(submitted.request.id)

    with processor.start(timeout=TIMEOUT):
        states, final = run(scenario())

    assert states[-1].status is RequestStatus.COMPLETED
    assert final.result == 42 and isinstance(final.result, int)
