"""Connections against a real Streamer: what the README shows."""

from __future__ import annotations

import grpc
import pytest

from streamer_client import Connections, Outcome, StreamerError, Text

from conftest import unique


def test_send_reaches_the_socket(connections: Connections, open_client) -> None:
    client = open_client(unique("alice"))

    outcome = connections.send(client.connection_id, {"type": "response", "data": {"hello": "you", "n": 3, "e": {}}})

    assert outcome is Outcome.DELIVERED
    frame = client.recv_json()
    assert frame == {"type": "response", "data": {"hello": "you", "n": 3, "e": {}}}
    assert isinstance(frame["data"]["n"], int)


def test_send_text_and_sequence_are_written_once(connections: Connections, open_client) -> None:
    client = open_client(unique("alice"))

    for _ in range(2):  # a retried sequenced send reaches the socket once
        assert connections.send(client.connection_id, Text("plain text"), sequence=("s", 1)) is Outcome.DELIVERED
    connections.send(client.connection_id, Text("after"), sequence=("s", 2))

    assert client.recv() == "plain text"
    assert client.recv() == "after"


def test_broadcast_to_a_user_reaches_each_of_its_sockets(connections: Connections, open_client, tenant) -> None:
    user = unique("bob")
    first, second = open_client(user), open_client(user)
    other = open_client(unique("carol"))

    result = connections.broadcast({"news": "for bob"}, tenant_id=tenant, user_id=user)

    assert result.delivered == 2
    assert first.recv_json() == {"news": "for bob"}
    assert second.recv_json() == {"news": "for bob"}
    # Carol's socket got nothing: the next thing it gets is this.
    connections.send(other.connection_id, {"marker": 1})
    assert other.recv_json() == {"marker": 1}


def test_broadcast_to_a_tenant_reaches_its_sockets_only(connections: Connections, open_client, tenant) -> None:
    first, second = open_client(unique("hana")), open_client(unique("ivan"))

    result = connections.broadcast({"news": "for everyone"}, tenant_id=tenant)

    assert result.delivered == 2
    assert first.recv_json() == {"news": "for everyone"}
    assert second.recv_json() == {"news": "for everyone"}


def test_raw_stubs_are_there_too(connections: Connections, open_client) -> None:
    from streamer_client._gen.streamer.v1 import connection_pb2

    client = open_client(unique("jack"))

    answer = connections.stub.IsActive(connection_pb2.IsActiveRequest(connection_id=client.connection_id), timeout=10)

    assert answer.active is True


def test_broadcast_to_connection_ids_names_each_outcome(connections: Connections, open_client, tenant) -> None:
    client = open_client(unique("dave"))

    result = connections.broadcast([1, 2.5, None], connection_ids=[client.connection_id, "no-such-connection"],
                                   tenant_id=tenant)

    assert result.results == {client.connection_id: Outcome.DELIVERED, "no-such-connection": Outcome.NOT_FOUND}
    assert (result.delivered, result.not_found) == (1, 1)
    assert client.recv_json() == [1, 2.5, None]


def test_publish_reaches_a_subscribed_socket(connections: Connections, open_client, tenant) -> None:
    client = open_client(unique("erin"))
    subscribed = connections.subscribe(tenant, "orders/42", connection_id=client.connection_id)
    assert subscribed.connection_ids == (client.connection_id,)

    published = connections.publish(tenant, "orders/42", {"status": "shipped"})

    assert published.offset == subscribed.offset + 1
    assert published.delivered == 1
    frame = client.recv_json()
    assert frame == {"type": "message", "topic": "orders/42", "epoch": published.epoch,
                     "offset": published.offset, "data": {"status": "shipped"}}
    subscriptions = list(connections.list_subscriptions(tenant, topic="orders/42"))
    assert [s.connection_id for s in subscriptions] == [client.connection_id]


def test_list_connections_iterates_every_page(connections: Connections, open_client, tenant) -> None:
    clients = [open_client(unique("frank")) for _ in range(3)]

    listed = list(connections.list_connections(tenant, page_size=1))

    assert sorted(c.connection_id for c in listed) == sorted(c.connection_id for c in clients)
    record = connections.get_connection(clients[0].connection_id, tenant_id=tenant)
    assert record.identity.tenant_id == tenant
    assert record.identity.user_id == clients[0].user_id
    assert record.connected_at is not None


def test_disconnect_closes_the_socket(connections: Connections, open_client) -> None:
    client = open_client(unique("gina"))

    connections.disconnect(client.connection_id, "maintenance")

    from websockets.exceptions import ConnectionClosed

    with pytest.raises(ConnectionClosed) as closed:
        client.socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.reason == "maintenance"
    assert connections.is_active(client.connection_id) is False


def test_a_bad_argument_raises_streamer_error(connections: Connections) -> None:
    with pytest.raises(StreamerError) as raised:
        connections.send("", {"x": 1})

    error = raised.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "connection_id" in error.message
    assert isinstance(error, grpc.RpcError)
    assert (error.reason, error.domain) == ("INVALID_ARGUMENT", "streamer.v1")
    assert [field for field, _ in error.field_violations] == ["connection_id"]
    assert error.retry_delay is None


def test_an_unknown_connection_is_not_found(connections: Connections) -> None:
    with pytest.raises(StreamerError) as raised:
        connections.get_connection("no-such-connection")

    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert raised.value.reason == "CONNECTION_NOT_FOUND"
