"""StreamerError: a failed call, with the details Streamer attaches.

Streamer puts a `google.rpc.Status` in the `grpc-status-details-bin`
trailer of a failed call, with a `google.rpc.ErrorInfo` (a stable `reason`
such as "CONNECTION_NOT_FOUND", the domain "streamer.v1" and a `metadata`
map), `google.rpc.BadRequest` field violations for INVALID_ARGUMENT, and a
`google.rpc.RetryInfo` for UNAVAILABLE and ABORTED. A server that attaches
none gives an error whose `reason` is None.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_TRAILER = "grpc-status-details-bin"


class StreamerError(grpc.RpcError):
    """A call to Streamer failed.

    It is a `grpc.RpcError`, so code that catches those catches it too;
    but `code` is an attribute here, not the method of a grpc.Call.

    Attributes:
        code: the gRPC status code (`grpc.StatusCode.NOT_FOUND`, ...).
        message: the server's message.
        reason: ErrorInfo's reason ("CONNECTION_NOT_FOUND", ...), or None.
        domain: ErrorInfo's domain ("streamer.v1"), or None.
        metadata: ErrorInfo's metadata (empty when none).
        field_violations: BadRequest's violations, as (field, description).
        retry_delay: RetryInfo's delay in seconds, or None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: Optional[str] = None,
        domain: Optional[str] = None,
        metadata: Optional[Dict[str, str]] = None,
        field_violations: Optional[List[Tuple[str, str]]] = None,
        retry_delay: Optional[float] = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Dict[str, str] = dict(metadata or {})
        self.field_violations: List[Tuple[str, str]] = list(field_violations or [])
        self.retry_delay = retry_delay

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "StreamerError":
        """The StreamerError of a failed grpcio call (its code, message and
        rich details)."""
        if isinstance(error, StreamerError):
            return error
        code = _call(error, "code") or grpc.StatusCode.UNKNOWN
        message = _call(error, "details") or ""
        status = _rich_status(error, code, message)
        result = cls(code, message)
        if status is not None:
            result._apply(status)
        return result

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> "StreamerError":
        """The StreamerError a `google.rpc.Status` describes."""
        try:
            code = grpc.StatusCode(_CODES[status.code])
        except KeyError:
            code = grpc.StatusCode.UNKNOWN
        result = cls(code, status.message)
        result._apply(status)
        return result

    def _apply(self, status: status_pb2.Status) -> None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason = info.reason or None
                self.domain = info.domain or None
                self.metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations.extend((v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        if self.reason:
            self.args = (f"{self.code.name}: {self.message} ({self.reason})",)

    def __repr__(self) -> str:
        return f"StreamerError(code={self.code.name}, message={self.message!r}, reason={self.reason!r})"


# grpc.StatusCode's values are (int, name) pairs.
_CODES = {code.value[0]: code.value for code in grpc.StatusCode}


def _call(error: Any, name: str) -> Any:
    method = getattr(error, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # noqa: BLE001 (an error object that cannot answer has no details)
        return None


def _rich_status(error: Any, code: grpc.StatusCode, message: str) -> Optional[status_pb2.Status]:
    """The google.rpc.Status in the error's trailers, or None."""
    if not hasattr(error, "trailing_metadata"):
        return None
    try:
        from grpc_status import rpc_status

        return rpc_status.from_call(error)
    except ValueError:
        # grpc-status refuses a Status whose code or message differs from
        # the call's; the details are still worth having.
        for key, value in _call(error, "trailing_metadata") or ():
            if key == DETAILS_TRAILER:
                status = status_pb2.Status()
                try:
                    status.ParseFromString(value)
                except Exception:  # noqa: BLE001 (garbage in the trailer: no details)
                    return None
                return status
        return None
    except Exception:  # noqa: BLE001 (unparseable details must not hide the error itself)
        return None


def wrap(error: grpc.RpcError) -> StreamerError:
    """Shorthand for StreamerError.from_rpc_error."""
    return StreamerError.from_rpc_error(error)
