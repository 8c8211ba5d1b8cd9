"""The loop a router's Receive and a processor's Claim share: open the
stream, wait for its `registered` message, handle what follows, and open
it again with capped, jittered backoff when it breaks."""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, TypeVar

import grpc

from ._channel import Backoff
from .errors import StreamerError

log = logging.getLogger("streamer_client")

#: Codes that opening the stream again cannot fix: the loop ends.
FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


_Loop = TypeVar("_Loop", bound="StreamLoop")


class StreamLoop:
    """Runs `_open()`'s stream in a thread of its own until `stop()`."""

    _name = "stream"

    def __init__(self) -> None:
        #: Set while the stream is open and registered; cleared when it breaks.
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._thread: Optional[threading.Thread] = None
        self._ended = threading.Event()
        # Set at the first registration, or when the loop ends.
        self._settled = threading.Event()
        #: Why the loop ended by itself (a fatal error), or None.
        self.error: Optional[StreamerError] = None

    # -- what subclasses provide --

    def _open(self) -> Any:
        raise NotImplementedError

    def _registered(self, item: Any) -> bool:
        """Handles one stream message; True when it is the `registered` one."""
        raise NotImplementedError

    def _stopped(self, timeout: Optional[float]) -> None:
        """Called once by stop(), after the stream is closed."""

    # -- lifecycle --

    def start(self: _Loop, timeout: Optional[float] = 30.0) -> _Loop:
        """Opens the stream in a background thread and returns once the
        server said it is registered: from then on, work for its actions
        reaches it. Raises TimeoutError when that takes longer than
        `timeout` seconds, and StreamerError when the server refuses it for
        good (bad arguments, credentials); either way it is stopped."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        self._thread = threading.Thread(target=self._run, name=f"streamer-{self._name}", daemon=True)
        self._thread.start()
        self._settled.wait(timeout)
        if self.ready.is_set():
            return self
        self.stop()
        if self.error is not None:
            raise self.error
        raise TimeoutError(f"the {self._name} stream was not registered within {timeout} s")

    def run(self) -> None:
        """start(), then block until stop() is called (from another thread or
        a signal handler), Ctrl-C, or the loop ends for good (its error is
        raised)."""
        if self._thread is None:
            self.start()
        try:
            self._ended.wait()
        except KeyboardInterrupt:
            self.stop()
            return
        if self.error is not None:
            raise self.error

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """Closes the stream and waits up to `timeout` seconds for the work
        in hand to end."""
        self._stopping.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._stopped(timeout)

    def __enter__(self: _Loop) -> _Loop:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        backoff = Backoff()
        try:
            while not self._stopping.is_set():
                call = self._open()
                with self._lock:
                    self._call = call
                if self._stopping.is_set():
                    call.cancel()
                    break
                try:
                    for item in call:
                        if self._registered(item):
                            backoff.reset()
                            self.ready.set()
                            self._settled.set()
                    log.warning("%s stream ended by the server", self._name)
                except grpc.RpcError as rpc_error:
                    if self._stopping.is_set():
                        break
                    error = StreamerError.from_rpc_error(rpc_error)
                    if error.code in FATAL:
                        log.error("%s stream refused: %s", self._name, error)
                        self.error = error
                        break
                    log.warning("%s stream broken: %s", self._name, error)
                finally:
                    self.ready.clear()
                delay = backoff.next()
                log.info("%s stream: reconnecting in %.2f s", self._name, delay)
                if self._stopping.wait(delay):
                    break
        except Exception:  # a bug: say so rather than die silently
            log.exception("%s loop crashed", self._name)
        finally:
            self.ready.clear()
            self._ended.set()
            self._settled.set()
