"""Channels, credentials and call plumbing shared by the clients."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from .errors import StreamerError

#: Keepalive pings find a dead server on an otherwise idle stream
#: (a router's Receive, a processor's Claim).
CHANNEL_OPTIONS: Sequence[Tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


@dataclass(frozen=True)
class TLS:
    """TLS to Streamer: the CA that signed its certificate (None: the
    system's roots) and, for mutual TLS (`--trust mtls`), this client's
    certificate and key. All are PEM file paths."""

    ca_file: Optional[Union[str, Path]] = None
    cert_file: Optional[Union[str, Path]] = None
    key_file: Optional[Union[str, Path]] = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Optional[Union[str, Path]]) -> Optional[bytes]:
            return Path(path).read_bytes() if path is not None else None

        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS: cert_file and key_file go together")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


TlsOption = Union[None, bool, TLS, grpc.ChannelCredentials]


def channel_credentials(tls: TlsOption) -> Optional[grpc.ChannelCredentials]:
    """None for plaintext (`tls` None or False); the system's roots for
    True; else as given."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, TLS):
        return tls.credentials()
    return tls


def open_channel(target: str, tls: TlsOption) -> grpc.Channel:
    """A channel to `target` (host:port), as `channel_credentials` says."""
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def bearer(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """The metadata that carries a service token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


_Client = TypeVar("_Client", bound="Base")


class Base:
    """What every client has: a channel, a token, a default timeout, and
    the stub its subclass names in `_stub_type`."""

    _stub_type: Callable[[grpc.Channel], Any]

    def __init__(
        self,
        target: Union[str, grpc.Channel],
        *,
        token: Optional[str] = None,
        tls: TlsOption = None,
        timeout: Optional[float] = 10.0,
    ) -> None:
        if isinstance(target, str):
            self._channel = open_channel(target, tls)
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self._auth = bearer(token)
        self.timeout = timeout
        self.stub = type(self)._stub_type(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        """Closes the channel (when this client opened it)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self, trace_context: Optional[Mapping[str, str]] = None) -> Tuple[Tuple[str, str], ...]:
        extra = tuple(trace_context.items()) if trace_context else ()
        return self._auth + extra

    def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        trace_context: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout,
                          metadata=self._metadata(trace_context))
        except grpc.RpcError as error:
            raise StreamerError.from_rpc_error(error) from error


class Backoff:
    """Capped exponential backoff with ±25% jitter."""

    def __init__(self, initial: float = 0.5, cap: float = 15.0) -> None:
        self.initial = initial
        self.cap = cap
        self.current = initial

    def reset(self) -> None:
        self.current = self.initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.75, 1.25)
        self.current = min(self.current * 2, self.cap)
        return delay
