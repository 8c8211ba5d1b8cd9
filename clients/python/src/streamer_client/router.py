"""A router: answers the frames clients send for its actions."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Union

from ._gen.streamer.v1 import connection_pb2
from ._json import JSON, to_value
from ._loop import StreamLoop
from .connections import Connections
from .errors import StreamerError
from .models import InboundMessage

log = logging.getLogger("streamer_client")

Handler = Callable[[InboundMessage], Any]


class _NoReply:
    def __repr__(self) -> str:
        return "NO_REPLY"


#: Return this from a router handler to send no response (the handler
#: answered itself, or handed the frame to ProgressService).
NO_REPLY: Any = _NoReply()


class ActionError(Exception):
    """Raised by a router handler to answer the client
    `{"type":"error","request_id":..,"error":{"code":..,"message":..}}` (with
    `details` when given): the WebSocket protocol's error message, with the
    router's own code."""

    def __init__(self, code: str, message: str, details: Optional[Mapping[str, JSON]] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = dict(details) if details is not None else None


class Router(StreamLoop):
    """Receives the frames clients send for `actions` and answers each with
    what its handler returns.

        def echo(message: InboundMessage):
            return message.payload

        router = Router(connections, actions={"echo": echo}, router_id="echo")
        router.start()   # returns once registered: frames for "echo" reach it
        ...
        router.stop()

    `actions` maps each action to its handler, or is a list of actions all
    handled by `handler`. A handler's return value is sent to the client as
    `{"type":"response","request_id":<the frame's id>,"success":true,"data":<it>}`;
    an `ActionError` as an `error` message with its code and message, any
    other exception as an `error` with code INTERNAL_ERROR (and is
    logged); `NO_REPLY` sends nothing. The answer is sent with the frame's
    trace context, so it joins the client's trace.

    Handlers run on a pool of `max_workers` threads, so answers to frames
    of different connections, or of one connection, may be sent in another
    order than the frames came; `max_workers=1` keeps the order.
    """

    _name = "receive"

    def __init__(
        self,
        connections: Connections,
        actions: Union[Mapping[str, Handler], Sequence[str]],
        handler: Optional[Handler] = None,
        *,
        router_id: str = "",
        max_workers: int = 4,
    ) -> None:
        super().__init__()
        self.connections = connections
        if isinstance(actions, Mapping):
            if handler is not None:
                raise ValueError("Router: give handlers in `actions` or one `handler`, not both")
            self.handlers: Dict[str, Handler] = dict(actions)
        else:
            if handler is None:
                raise ValueError("Router: a list of actions needs a `handler`")
            if isinstance(actions, str):
                raise TypeError("Router: actions is a list of actions, not one")
            self.handlers = {action: handler for action in actions}
        if not self.handlers:
            raise ValueError("Router: no actions")
        self.router_id = router_id
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="streamer-router")
        self._running: Set["Future[None]"] = set()

    def _open(self) -> Any:
        request = connection_pb2.ReceiveRequest(actions=list(self.handlers), router_id=self.router_id)
        return self.connections.stub.Receive(request, metadata=self.connections._metadata())

    def _registered(self, item: connection_pb2.ReceiveResponse) -> bool:
        kind = item.WhichOneof("event")
        if kind == "registered":
            log.info("router %s registered for %s", item.registered.router_id, ",".join(item.registered.actions))
            return True
        if kind == "message":
            future = self._pool.submit(self._handle, InboundMessage._from_pb(item.message))
            with self._lock:
                self._running.add(future)
            future.add_done_callback(self._done)
        return False

    def _done(self, future: "Future[None]") -> None:
        with self._lock:
            self._running.discard(future)

    def _stopped(self, timeout: Optional[float]) -> None:
        with self._lock:
            running = list(self._running)
        wait(running, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _handle(self, message: InboundMessage) -> None:
        handler = self.handlers.get(message.action)
        frame: Dict[str, Any]
        try:
            if handler is None:
                raise ActionError("INVALID_ACTION", f"no handler for {message.action!r}")
            result = handler(message)
            if result is NO_REPLY:
                return
            frame = {"type": "response", "request_id": message.request_id, "success": True, "data": result}
            payload = to_value(frame)
        except ActionError as error:
            frame = {"type": "error", "request_id": message.request_id,
                     "error": _error(error.code, error.message, error.details)}
            payload = to_value(frame)
        except Exception:  # noqa: BLE001 (a handler's bug is the client's INTERNAL_ERROR)
            log.exception("router handler failed action=%s request=%s", message.action, message.request_id)
            frame = {"type": "error", "request_id": message.request_id,
                     "error": _error("INTERNAL_ERROR", "internal error")}
            payload = to_value(frame)
        try:
            self.connections.send(
                message.connection_id, payload, tenant_id=message.identity.tenant_id,
                trace_context=message.trace_context,
            )
        except StreamerError as error:
            log.warning("router answer not delivered connection=%s request=%s: %s",
                        message.connection_id, message.request_id, error)


def _error(code: str, message: str, details: Optional[Mapping[str, JSON]] = None) -> Dict[str, JSON]:
    error: Dict[str, JSON] = {"code": code, "message": message}
    if details is not None:
        error["details"] = dict(details)
    return error
