"""Plain Python views of the contract's messages (JSON fields as plain values)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Optional, Tuple, Union

from google.protobuf import struct_pb2, timestamp_pb2

from ._gen.streamer.v1 import common_pb2, connection_pb2, progress_pb2
from ._json import JSON, from_struct, from_value, to_value


@dataclass(frozen=True)
class Text:
    """Raw text, written to the socket as one text frame unchanged (a plain
    `str` is a JSON string and arrives quoted)."""

    text: str


Data = Union[JSON, Text, bytes, struct_pb2.Value]
"""What can be written to a socket: any JSON value (sent as its compact
serialization), `Text` (raw text), `bytes` (a binary frame), or a
google.protobuf.Value."""


def to_payload(data: Data) -> common_pb2.Payload:
    if isinstance(data, Text):
        return common_pb2.Payload(text=data.text)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return common_pb2.Payload(binary=bytes(data))
    if isinstance(data, struct_pb2.Value):
        return common_pb2.Payload(json=data)
    return common_pb2.Payload(json=to_value(data))


def _time(ts: timestamp_pb2.Timestamp, present: bool = True) -> Optional[datetime]:
    if not present:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


class Outcome(str, enum.Enum):
    """What happened to one delivery (`DeliveryOutcome` without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    DELIVERED = "DELIVERED"
    NOT_FOUND = "NOT_FOUND"
    GONE = "GONE"
    THROTTLED = "THROTTLED"
    UNAVAILABLE = "UNAVAILABLE"
    REJECTED = "REJECTED"

    @classmethod
    def _from_pb(cls, number: int) -> "Outcome":
        name = connection_pb2.DeliveryOutcome.Name(number)
        return cls(name[len("DELIVERY_OUTCOME_"):])


class RequestStatus(str, enum.Enum):
    """Where a request stands (`RequestStatus` without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED)

    @classmethod
    def _from_pb(cls, number: int) -> "RequestStatus":
        return cls(progress_pb2.RequestStatus.Name(number)[len("REQUEST_STATUS_"):])


@dataclass(frozen=True)
class Identity:
    """A client's verified identity (from its token)."""

    user_id: str
    tenant_id: str
    permissions: Tuple[str, ...] = ()
    topics: Tuple[str, ...] = ()

    @classmethod
    def _from_pb(cls, pb: common_pb2.Identity) -> "Identity":
        return cls(pb.user_id, pb.tenant_id, tuple(pb.permissions), tuple(pb.topics))

    def _to_pb(self) -> common_pb2.Identity:
        return common_pb2.Identity(
            user_id=self.user_id, tenant_id=self.tenant_id,
            permissions=list(self.permissions), topics=list(self.topics),
        )


@dataclass(frozen=True)
class Connection:
    """A connection as the registry records it."""

    connection_id: str
    identity: Identity
    edge_id: str
    connected_at: Optional[datetime]
    last_seen: Optional[datetime]
    expires_at: Optional[datetime]
    user_agent: str
    client_ip: str

    @classmethod
    def _from_pb(cls, pb: connection_pb2.Connection) -> "Connection":
        return cls(
            connection_id=pb.connection_id,
            identity=Identity._from_pb(pb.identity),
            edge_id=pb.edge_id,
            connected_at=_time(pb.connected_at, pb.HasField("connected_at")),
            last_seen=_time(pb.last_seen, pb.HasField("last_seen")),
            expires_at=_time(pb.expires_at, pb.HasField("expires_at")),
            user_agent=pb.user_agent,
            client_ip=pb.client_ip,
        )


@dataclass(frozen=True)
class Subscription:
    topic: str
    connection_id: str
    user_id: str
    subscribed_at: Optional[datetime]

    @classmethod
    def _from_pb(cls, pb: connection_pb2.Subscription) -> "Subscription":
        return cls(pb.topic, pb.connection_id, pb.user_id, _time(pb.subscribed_at, pb.HasField("subscribed_at")))


@dataclass(frozen=True)
class BroadcastResult:
    """The answer to a broadcast: counts, and for a list of connection ids,
    the outcome of each."""

    delivered: int
    not_found: int
    gone: int
    throttled: int
    unavailable: int
    rejected: int
    results: Dict[str, Outcome] = field(default_factory=dict)

    @classmethod
    def _from_pb(cls, pb: connection_pb2.BroadcastResponse) -> "BroadcastResult":
        return cls(
            pb.delivered, pb.not_found, pb.gone, pb.throttled, pb.unavailable, pb.rejected,
            {r.connection_id: Outcome._from_pb(r.outcome) for r in pb.results},
        )


@dataclass(frozen=True)
class PublishResult:
    """Where a published message stands in its topic, and who got it."""

    epoch: str
    offset: int
    delivered: int
    edges: int
    throttled: int
    unavailable_edges: int


@dataclass(frozen=True)
class SubscribeResult:
    """The connections now subscribed, and where the topic stands: they
    receive every message after `offset` of `epoch`."""

    connection_ids: Tuple[str, ...]
    epoch: str
    offset: int


@dataclass(frozen=True)
class ProgressUpdate:
    """The last progress a processor reported."""

    percentage: float
    message: str
    metadata: Dict[str, JSON]
    updated_at: Optional[datetime]
    sequence: int


@dataclass(frozen=True)
class RequestError:
    """Why a request failed (code "CANCELLED" when it was cancelled)."""

    code: str
    message: str
    details: Dict[str, JSON]


@dataclass(frozen=True)
class Request:
    """A long-running request and everything known about it."""

    id: str
    request_id: str
    identity: Identity
    connection_id: str
    action: str
    payload: JSON
    metadata: Dict[str, JSON]
    status: RequestStatus
    attempts: int
    progress: Optional[ProgressUpdate]
    result: JSON
    error: Optional[RequestError]
    created_at: Optional[datetime]
    updated_at: Optional[datetime]
    processor_id: str
    lease_expires_at: Optional[datetime]
    sequence: int
    trace_context: Dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @classmethod
    def _from_pb(cls, pb: progress_pb2.Request) -> "Request":
        progress = None
        if pb.HasField("progress"):
            p = pb.progress
            progress = ProgressUpdate(
                p.percentage, p.message, from_struct(p.metadata),
                _time(p.updated_at, p.HasField("updated_at")), p.sequence,
            )
        error = None
        if pb.HasField("error"):
            error = RequestError(pb.error.code, pb.error.message, from_struct(pb.error.details))
        return cls(
            id=pb.id,
            request_id=pb.request_id,
            identity=Identity._from_pb(pb.identity),
            connection_id=pb.connection_id,
            action=pb.action,
            payload=from_value(pb.payload) if pb.HasField("payload") else None,
            metadata=from_struct(pb.metadata),
            status=RequestStatus._from_pb(pb.status),
            attempts=pb.attempts,
            progress=progress,
            result=from_value(pb.result) if pb.HasField("result") else None,
            error=error,
            created_at=_time(pb.created_at, pb.HasField("created_at")),
            updated_at=_time(pb.updated_at, pb.HasField("updated_at")),
            processor_id=pb.processor_id,
            lease_expires_at=_time(pb.lease_expires_at, pb.HasField("lease_expires_at")),
            sequence=pb.sequence,
            trace_context=dict(pb.trace_context),
        )


@dataclass(frozen=True)
class Submitted:
    """The answer to `Progress.submit`: the request, and whether it had
    already been submitted (same user, same request id)."""

    request: Request
    duplicate: bool


@dataclass(frozen=True)
class InboundMessage:
    """A frame a client sent, as a router receives it."""

    connection_id: str
    identity: Identity
    action: str
    request_id: str
    payload: JSON
    metadata: Dict[str, JSON]
    received_at: Optional[datetime]
    trace_context: Dict[str, str]

    @classmethod
    def _from_pb(cls, pb: connection_pb2.InboundMessage) -> "InboundMessage":
        return cls(
            connection_id=pb.connection_id,
            identity=Identity._from_pb(pb.identity),
            action=pb.action,
            request_id=pb.request_id,
            payload=from_value(pb.payload) if pb.HasField("payload") else None,
            metadata=from_struct(pb.metadata),
            received_at=_time(pb.received_at, pb.HasField("received_at")),
            trace_context=dict(pb.trace_context),
        )


Sequence = Tuple[str, int]
"""A `(stream, number)` pair: see `Connections.send`."""

__all__ = [
    "BroadcastResult", "Connection", "Data", "Identity", "InboundMessage", "Outcome",
    "ProgressUpdate", "PublishResult", "Request", "RequestError", "RequestStatus", "Sequence",
    "SubscribeResult", "Submitted", "Subscription", "Text",
]
