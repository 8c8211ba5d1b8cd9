"""Router against a real Streamer: a client's frame answered by a handler."""

from __future__ import annotations

import grpc
import pytest

from streamer_client import NO_REPLY, ActionError, Connections, InboundMessage, Router, StreamerError

from conftest import TIMEOUT, unique


def test_the_router_answers_a_clients_frame(connections: Connections, open_client) -> None:
    seen = []

    def echo(message: InboundMessage):
        seen.append(message)
        return {"echo": message.payload, "user": message.identity.user_id}

    action = unique("echo")
    with Router(connections, actions={action: echo}, router_id="test-router").start(timeout=TIMEOUT):
        # No wait: start() returned after `registered`, so the frame is routed.
        client = open_client(unique("alice"))
        client.send_json({"action": action, "id": "1", "payload": {"hi": 1, "x": 1.5}, "metadata": {"m": True}})

        answer = client.recv_json()

    assert answer == {"type": "response", "request_id": "1", "success": True,
                      "data": {"echo": {"hi": 1, "x": 1.5}, "user": client.user_id}}
    assert isinstance(answer["data"]["echo"]["hi"], int)
    [message] = seen
    assert message.connection_id == client.connection_id
    assert message.payload == {"hi": 1, "x": 1.5}
    assert isinstance(message.payload["hi"], int)
    assert message.metadata == {"m": True}
    assert message.identity.tenant_id == client.tenant_id


def test_a_handlers_error_is_an_error_message(connections: Connections, open_client) -> None:
    def handler(message: InboundMessage):
        if message.payload == "refuse":
            raise ActionError("NOT_ALLOWED", "not today", {"retry": False})
        if message.payload == "quiet":
            return NO_REPLY
        raise RuntimeError("a bug")

    actions = [unique("act"), unique("act")]
    with Router(connections, actions=actions, handler=handler).start(timeout=TIMEOUT):
        client = open_client(unique("bob"))
        client.send_json({"action": actions[0], "id": "a", "payload": "refuse"})
        refused = client.recv_json()
        client.send_json({"action": actions[1], "id": "q", "payload": "quiet"})
        client.send_json({"action": actions[1], "id": "b", "payload": "crash"})
        crashed = client.recv_json()

    assert refused == {"type": "error", "request_id": "a",
                       "error": {"code": "NOT_ALLOWED", "message": "not today", "details": {"retry": False}}}
    # "q" got no answer: the next one is b's.
    assert crashed == {"type": "error", "request_id": "b",
                       "error": {"code": "INTERNAL_ERROR", "message": "internal error"}}


def test_after_stop_the_action_is_no_longer_routed(connections: Connections, open_client) -> None:
    action = unique("gone")
    router = Router(connections, actions=[action], handler=lambda m: "hi").start(timeout=TIMEOUT)
    assert router.ready.is_set()
    router.stop()
    assert not router.ready.is_set()

    client = open_client(unique("carol"))
    client.send_json({"action": action, "id": "1"})

    answer = client.recv_json()
    assert answer["type"] == "error"
    assert answer["error"]["code"] == "INVALID_ACTION"


def test_a_refused_registration_raises_from_start(connections: Connections) -> None:
    router = Router(connections, actions=[""], handler=lambda m: None)

    with pytest.raises(StreamerError) as raised:
        router.start(timeout=TIMEOUT)

    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert not router.ready.is_set()
