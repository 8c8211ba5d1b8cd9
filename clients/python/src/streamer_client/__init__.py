"""Python client for Streamer's gRPC API (package streamer.v1).

- `Connections`: send to a connection, broadcast to ids, a user or a tenant,
  publish to topics and subscribe connections to them, look connections up.
- `Progress`: submit, get, watch and cancel long-running requests.
- `Router`: answer the frames clients send for some actions.
- `Processor`: claim long-running requests and run them as `Job`s.
- `StreamerError`: what every failed call raises, with Streamer's details.
- `streamer_client.aio`: `Connections` and `Progress` on asyncio.

JSON travels as plain Python values everywhere the contract has a
google.protobuf.Value or Struct. JSON numbers travel as doubles: integers
going out must lie within ±2**53; numbers coming back that are integral and
within ±2**53 are `int`, others `float`.

The generated stubs are in `streamer_client._gen.streamer.v1` (e.g.
`from streamer_client._gen.streamer.v1 import progress_pb2`), and each
client's raw stub is its `.stub`.
"""

from ._channel import TLS
from ._json import MAX_SAFE_INTEGER, from_struct, from_value, to_struct, to_value
from .connections import Connections
from .errors import StreamerError
from .models import (
    BroadcastResult,
    Connection,
    Identity,
    InboundMessage,
    Outcome,
    ProgressUpdate,
    PublishResult,
    Request,
    RequestError,
    RequestStatus,
    Submitted,
    SubscribeResult,
    Subscription,
    Text,
)
from .processor import Job, JobFailed, Processor, Retryable
from .progress import Progress
from .router import NO_REPLY, ActionError, Router

__all__ = [
    "MAX_SAFE_INTEGER",
    "NO_REPLY",
    "TLS",
    "ActionError",
    "BroadcastResult",
    "Connection",
    "Connections",
    "Identity",
    "InboundMessage",
    "Job",
    "JobFailed",
    "Outcome",
    "Processor",
    "Progress",
    "ProgressUpdate",
    "PublishResult",
    "Request",
    "RequestError",
    "RequestStatus",
    "Retryable",
    "Router",
    "StreamerError",
    "Submitted",
    "SubscribeResult",
    "Subscription",
    "Text",
    "from_struct",
    "from_value",
    "to_struct",
    "to_value",
]
