"""Fixtures for the end-to-end tests: a real Streamer, started by
scripts/with-streamer (see test.sh), and WebSocket clients of it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from typing import Any, Iterator

import pytest
from websockets.sync.client import ClientConnection, connect

from streamer_client import Connections, Progress

#: Every wait in the tests is bounded by this many seconds.
TIMEOUT = 10.0


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the tests with clients/python/test.sh "
                    "(scripts/with-streamer starts the system they need)")
    return value


def unique(prefix: str) -> str:
    """A fresh name, so that tests never see each other's connections."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Client:
    """A WebSocket client of Streamer, speaking JSON."""

    def __init__(self, socket: ClientConnection, tenant_id: str, user_id: str, connection_id: str) -> None:
        self.socket = socket
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.connection_id = connection_id

    def send_json(self, frame: Any) -> None:
        self.socket.send(json.dumps(frame))

    def recv_json(self, timeout: float = TIMEOUT) -> Any:
        return json.loads(self.recv(timeout))

    def recv(self, timeout: float = TIMEOUT) -> Any:
        try:
            return self.socket.recv(timeout=timeout)
        except TimeoutError:
            pytest.fail(f"nothing arrived on {self.connection_id} within {timeout} s")

    def recv_until(self, predicate, timeout: float = TIMEOUT) -> Any:  # type: ignore[no-untyped-def]
        """The first JSON frame `predicate` accepts (others are skipped)."""
        while True:
            frame = self.recv_json(timeout)
            if predicate(frame):
                return frame


@pytest.fixture(scope="session")
def connections() -> Iterator[Connections]:
    with Connections(_env("STREAMER_CONNECTION_TARGET"), timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="session")
def progress() -> Iterator[Progress]:
    with Progress(_env("STREAMER_PROGRESS_TARGET"), timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    return unique("tenant")


@pytest.fixture
def open_client(connections: Connections, tenant: str) -> Iterator[Any]:
    """Opens WebSocket clients: open_client(user_id) -> Client, for a user of
    the test's own tenant. Each is closed at the end of the test."""
    stack = contextlib.ExitStack()

    def open_one(user_id: str) -> Client:
        token = subprocess.run(
            [_env("STREAMER_BIN"), "token", "--data-dir", _env("STREAMER_DATA_DIR"),
             "--sub", user_id, "--tenant", tenant],
            check=True, capture_output=True, text=True, timeout=TIMEOUT,
        ).stdout.strip()
        before = {c.connection_id for c in connections.list_connections(tenant, user_id=user_id)}
        socket = stack.enter_context(
            connect(f"{_env('STREAMER_WS_URL')}?Authorization={token}", open_timeout=TIMEOUT))
        # The edge records a connection before it completes the handshake.
        new = [c.connection_id for c in connections.list_connections(tenant, user_id=user_id)
               if c.connection_id not in before]
        assert len(new) == 1, f"expected one new connection for {user_id}, found {new}"
        return Client(socket, tenant, user_id, new[0])

    with stack:
        yield open_one
