"""ProgressService: submit, follow and cancel long-running requests, and
the calls a processor makes (see `Processor` for the loop around them)."""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Union

import grpc

from ._channel import Base, TlsOption
from ._gen.streamer.v1 import progress_pb2, progress_pb2_grpc
from ._json import JSON, to_struct, to_value
from .errors import StreamerError
from .models import Identity, Request, Submitted


class Progress(Base):
    """A client of ProgressService.

        progress = Progress("127.0.0.1:50053")
        submitted = progress.submit(connection_id, "generate_report", {"pages": 5})
        for state in progress.watch(submitted.request.id):
            print(state.status, state.progress)

    `target`, `token`, `tls` and `timeout` as for `Connections`. A failed
    call raises `StreamerError`.
    """

    _stub_type = progress_pb2_grpc.ProgressServiceStub
    stub: progress_pb2_grpc.ProgressServiceStub

    def submit(
        self,
        connection_id: str,
        action: str,
        payload: JSON = None,
        *,
        request_id: Optional[str] = None,
        metadata: Optional[Mapping[str, JSON]] = None,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Submitted:
        """Queues a request for the client on `connection_id` (which gets its
        acknowledgment, progress and outcome). Idempotent on (user,
        `request_id`): a repeat returns the existing request with
        `duplicate=True`; without a `request_id` one is generated."""
        request = submit_request(connection_id, action, payload, request_id, metadata)
        response = self._unary(self.stub.Submit, request, trace_context)
        return Submitted(Request._from_pb(response.request), response.duplicate)

    def get(
        self,
        id: Optional[str] = None,
        *,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        request_id: Optional[str] = None,
        owner: Optional[Identity] = None,
        deliver_to_connection_id: Optional[str] = None,
    ) -> Request:
        """A request's state, by its server `id` (scoped to `owner` when
        given) or by the client's (`tenant_id`, `user_id`, `request_id`).
        `deliver_to_connection_id` sends its later updates (or its final
        message again) to that connection of the same user."""
        request = progress_pb2.GetRequest(deliver_to_connection_id=deliver_to_connection_id or "")
        select(request, id, tenant_id, user_id, request_id, owner)
        return Request._from_pb(self._unary(self.stub.Get, request).request)

    def watch(
        self,
        id: Optional[str] = None,
        *,
        tenant_id: Optional[str] = None,
        user_id: Optional[str] = None,
        request_id: Optional[str] = None,
        owner: Optional[Identity] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[Request]:
        """The request's state now, then each change, ending after its final
        state. Selected as in `get`. `timeout` bounds the whole watch (None:
        no bound)."""
        request = progress_pb2.WatchRequest()
        select(request, id, tenant_id, user_id, request_id, owner)
        call = self.stub.Watch(request, timeout=timeout, metadata=self._metadata())
        try:
            for response in call:
                yield Request._from_pb(response.request)
        except grpc.RpcError as error:
            raise StreamerError.from_rpc_error(error) from error
        finally:
            call.cancel()

    def cancel(self, id: str, reason: str = "", *, owner: Optional[Identity] = None) -> Request:
        """Cancels a request that has not finished (its processor is told)."""
        return Request._from_pb(self._unary(self.stub.Cancel, cancel_request(id, reason, owner)).request)

    # -- a processor's calls (Processor makes them for you) --

    def complete(
        self, id: str, processor_id: str, result: JSON = None, *,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Request:
        """Completes a request whose lease `processor_id` holds."""
        request = progress_pb2.CompleteRequest(id=id, processor_id=processor_id, result=to_value(result))
        return Request._from_pb(self._unary(self.stub.Complete, request, trace_context).request)

    def fail(
        self, id: str, processor_id: str, code: str, message: str = "", *,
        details: Optional[Mapping[str, JSON]] = None, retryable: bool = False,
        trace_context: Optional[Mapping[str, str]] = None,
    ) -> Request:
        """Fails a request whose lease `processor_id` holds; a `retryable`
        failure is queued again while attempts remain."""
        request = fail_request(id, processor_id, code, message, details, retryable)
        return Request._from_pb(self._unary(self.stub.Fail, request, trace_context).request)


# -- requests, shared with the asyncio client --


def submit_request(
    connection_id: str, action: str, payload: JSON, request_id: Optional[str], metadata: Optional[Mapping[str, JSON]]
) -> progress_pb2.SubmitRequest:
    return progress_pb2.SubmitRequest(
        connection_id=connection_id, action=action, request_id=request_id or "",
        payload=to_value(payload), metadata=to_struct(metadata),
    )


def cancel_request(id: str, reason: str, owner: Optional[Identity]) -> progress_pb2.CancelRequest:
    request = progress_pb2.CancelRequest(id=id, reason=reason)
    if owner is not None:
        request.owner.CopyFrom(owner._to_pb())
    return request


def fail_request(
    id: str, processor_id: str, code: str, message: str, details: Optional[Mapping[str, JSON]], retryable: bool
) -> progress_pb2.FailRequest:
    return progress_pb2.FailRequest(
        id=id, processor_id=processor_id, retryable=retryable,
        error=progress_pb2.RequestError(code=code, message=message, details=to_struct(details)),
    )


def select(
    request: Union[progress_pb2.GetRequest, progress_pb2.WatchRequest],
    id: Optional[str],
    tenant_id: Optional[str],
    user_id: Optional[str],
    request_id: Optional[str],
    owner: Optional[Identity],
) -> None:
    if id is not None:
        if tenant_id is not None or user_id is not None or request_id is not None:
            raise ValueError("give an id, or tenant_id, user_id and request_id, not both")
        request.id = id
        if owner is not None:
            request.owner.CopyFrom(owner._to_pb())
    elif tenant_id is not None and user_id is not None and request_id is not None:
        if owner is not None:
            raise ValueError("owner scopes a lookup by id only")
        request.client.tenant_id = tenant_id
        request.client.user_id = user_id
        request.client.request_id = request_id
    else:
        raise ValueError("give an id, or tenant_id, user_id and request_id")
