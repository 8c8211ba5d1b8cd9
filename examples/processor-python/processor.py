#!/usr/bin/env python3
"""A Streamer processor for the `generate_report` action, in Python.

It is what another team writes against our public contract and nothing
else: Python stubs generated from `proto/streamer/v1/*.proto` with
grpcio-tools, and ProgressService on the wire.

How it works:

- At start, the stubs are generated into `gen/` beside this file when they
  are missing or older than the .proto files (under a file lock, so several
  processors starting at once do not trip over each other).
- One Claim stream declares the actions this processor runs and how many
  requests it holds at once. Each work item runs in its own thread:
  progress goes up one client-streaming `Report` call per job (every report
  also renews the lease), and the job ends with exactly one `Complete` or
  `Fail`.
- `ClaimResponse.cancelled` stops that job at its next step; it reports
  nothing more.
- When the Claim stream breaks, it is opened again with capped, jittered
  exponential backoff. Jobs keep running meanwhile: when the server took
  their lease back, their `Complete` is refused and they are dropped; when
  the same request is handed to us again, the new attempt replaces the old.
- SIGTERM or SIGINT closes the Claim stream (the server hands the
  unfinished work to another processor at once), stops every job and exits
  with status 0.

Output: one log line per event on stderr; `ready` on stdout once the first
Claim stream says it is registered (its first message: from then on the
server accepts the processor's actions).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import random
import shutil
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

try:
    import grpc
    import grpc_tools
    from google.protobuf import json_format, struct_pb2
    from grpc_tools import protoc
except ImportError as missing:
    sys.exit(
        f"{missing}: install the processor's requirements first:\n"
        "  pip install -r examples/processor-python/requirements.txt"
    )

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; generation is rarely concurrent there.
    fcntl = None

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
GEN_DIR = HERE / "gen"

ACTIONS = ["generate_report"]
DEFAULT_PAGES = 5
MAX_PAGES = 1000
# Unary calls (Complete, Fail) give up after this long per attempt.
RPC_TIMEOUT_S = 10.0
# Codes worth trying a unary call again for: the server was unreachable,
# restarting, or lost a write race.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

log = logging.getLogger("processor")


def event(level: int, message: str, **fields) -> None:
    """Logs one line: a lowercase message, then key=value fields."""
    if fields:
        message += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
    log.log(level, message)


def _quote(value) -> str:
    text = str(value)
    return repr(text) if (not text or any(c.isspace() for c in text)) else text


class UtcFormatter(logging.Formatter):
    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc)
        return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


# ---- generated stubs --------------------------------------------------------


def ensure_stubs() -> None:
    """Generates the stubs into gen/ when missing or stale, and puts them on the path."""
    protos = sorted(PROTO_ROOT.glob("streamer/v1/*.proto"))
    if not protos:
        sys.exit(f"no .proto files under {PROTO_ROOT}; run from a Streamer checkout")
    GEN_DIR.mkdir(exist_ok=True)
    stamp = GEN_DIR / ".generated"
    with open(GEN_DIR / ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        newest = max(p.stat().st_mtime for p in protos)
        # Stubs from another grpcio-tools may not load with this protobuf
        # runtime, so the generator's version counts as much as the protos.
        generator = f"grpcio-tools {metadata.version('grpcio-tools')}\n"
        stale = (
            not stamp.exists()
            or stamp.stat().st_mtime < newest
            or stamp.read_text() != generator
        )
        if stale:
            # grpc_tools ships google/protobuf/*.proto, so no system protoc
            # or include path is needed.
            include = Path(grpc_tools.__file__).resolve().parent / "_proto"
            shutil.rmtree(GEN_DIR / "streamer", ignore_errors=True)
            args = [
                "grpc_tools.protoc",
                f"--proto_path={PROTO_ROOT}",
                f"--proto_path={include}",
                f"--python_out={GEN_DIR}",
                f"--grpc_python_out={GEN_DIR}",
                *(str(p.relative_to(PROTO_ROOT)) for p in protos),
            ]
            if protoc.main(args) != 0:
                sys.exit("generating the Python stubs failed (see the protoc output above)")
            stamp.write_text(generator)
            event(logging.INFO, "stubs generated", into=GEN_DIR, protos=len(protos))
    sys.path.insert(0, str(GEN_DIR))


# ---- JSON <-> protobuf -----------------------------------------------------


def from_value(value) -> object:
    """A google.protobuf.Value as plain JSON (None when unset)."""
    return json_format.MessageToDict(value)


def to_value(data) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def to_struct(data: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(data)
    return out


# ---- the action -------------------------------------------------------------


class InvalidPayload(ValueError):
    pass


def trace_metadata(request) -> tuple:
    """The request's W3C trace context (`traceparent`, `tracestate`) as call
    metadata: the calls made for it join the client's trace."""
    if request is None:
        return ()
    return tuple(request.trace_context.items())


def report_pages(payload) -> int:
    """The page count of a generate_report payload: {"pages": N}, default 5."""
    if payload is None:
        return DEFAULT_PAGES
    if not isinstance(payload, dict):
        raise InvalidPayload("payload must be an object like {\"pages\": 5}")
    pages = payload.get("pages", DEFAULT_PAGES)
    # JSON numbers arrive as doubles; bool is an int in Python, but not here.
    if isinstance(pages, bool) or not isinstance(pages, (int, float)):
        raise InvalidPayload(f"pages must be a whole number, not {pages!r}")
    if pages != int(pages) or not 1 <= pages <= MAX_PAGES:
        shown = f"{pages:g}" if isinstance(pages, float) else str(pages)
        raise InvalidPayload(f"pages must be a whole number from 1 to {MAX_PAGES}, not {shown}")
    return int(pages)


class Job:
    """One attempt at one request, run in its own thread."""

    def __init__(self, request):
        self.request = request
        self.stop = threading.Event()
        self.stop_reason = ""
        self.thread: threading.Thread | None = None

    def abort(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()


class Processor:
    def __init__(self, channel: grpc.Channel, args: argparse.Namespace):
        from streamer.v1 import progress_pb2, progress_pb2_grpc

        self.pb = progress_pb2
        self.stub = progress_pb2_grpc.ProgressServiceStub(channel)
        self.args = args
        self.stopping = threading.Event()
        # Guards `jobs` and `call`: both are touched by the Claim thread, the
        # job threads and the main thread's shutdown.
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.call = None

    # -- the Claim stream --

    def claim_forever(self) -> None:
        backoff = Backoff()
        announced = False
        try:
            while not self.stopping.is_set():
                event(logging.INFO, "claiming", target=self.args.target, processor=self.args.id)
                call = self.stub.Claim(
                    self.pb.ClaimRequest(
                        processor_id=self.args.id,
                        actions=ACTIONS,
                        max_in_flight=self.args.concurrency,
                        lease_seconds=self.args.lease,
                    )
                )
                with self.lock:
                    self.call = call
                if self.stopping.is_set():
                    call.cancel()
                    break
                try:
                    for item in call:
                        kind = item.WhichOneof("item")
                        if kind == "work":
                            self.start(item.work)
                        elif kind == "cancelled":
                            self.cancelled(item.cancelled)
                        elif kind == "registered":
                            # The first message: from here on our actions
                            # are known and work can come.
                            event(
                                logging.INFO,
                                "claim stream open",
                                actions=",".join(item.registered.actions),
                                max_in_flight=item.registered.max_in_flight,
                                lease_s=item.registered.lease_seconds,
                            )
                            backoff.reset()
                            if not announced:
                                announced = True
                                try:
                                    print("ready", flush=True)
                                except BrokenPipeError:
                                    pass
                    event(logging.WARNING, "claim stream ended by the server")
                except grpc.RpcError as error:
                    if self.stopping.is_set():
                        break
                    event(
                        logging.WARNING,
                        "claim stream broken",
                        code=error.code().name,
                        detail=error.details() or "",
                    )
                delay = backoff.next()
                event(logging.INFO, "reconnecting", in_s=f"{delay:.2f}")
                if self.stopping.wait(delay):
                    break
        except Exception:  # a bug: say so, and let main() shut down
            log.exception("claim loop crashed")
        finally:
            self.stopping.set()

    def start(self, request) -> None:
        if self.stopping.is_set():
            # Closing the stream gives it back to the server.
            event(logging.INFO, "work left for another processor", request=request.id)
            return
        job = Job(request)
        with self.lock:
            previous = self.jobs.get(request.id)
            self.jobs[request.id] = job
        if previous is not None:
            # Handed to us again (our stream broke and we reconnected): this
            # attempt is the one that holds the lease now.
            previous.abort("superseded")
        job.thread = threading.Thread(
            target=self.run_job, args=(job,), name=f"job-{request.id}", daemon=True
        )
        job.thread.start()

    def cancelled(self, request_id: str) -> None:
        with self.lock:
            job = self.jobs.get(request_id)
        if job is None:
            event(logging.INFO, "cancel for a request not running here", request=request_id)
            return
        job.abort("cancelled")

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            call = self.call
            jobs = list(self.jobs.values())
        if call is not None:
            call.cancel()
        for job in jobs:
            job.abort("shutdown")
        deadline = time.monotonic() + 5.0
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))

    # -- one job --

    def run_job(self, job: Job) -> None:
        request = job.request
        fields = {"request": request.id, "client_request": request.request_id, "attempt": request.attempts}
        payload = from_value(request.payload) if request.HasField("payload") else None
        try:
            try:
                pages = report_pages(payload)
            except InvalidPayload as invalid:
                self.unary(
                    self.stub.Fail,
                    self.pb.FailRequest(
                        id=request.id,
                        processor_id=self.args.id,
                        error=self.pb.RequestError(
                            code="INVALID_PAYLOAD",
                            message=str(invalid),
                            details=to_struct({"field": "pages"}),
                        ),
                        retryable=False,
                    ),
                    request,
                )
                event(logging.INFO, "job rejected its payload", code="INVALID_PAYLOAD", **fields)
                return
            event(logging.INFO, "job started", pages=pages, **fields)
            done = self.render(job, pages)
            if job.stop.is_set():
                event(logging.INFO, "job stopped", reason=job.stop_reason, pages_done=done, **fields)
                return
            self.unary(
                self.stub.Complete,
                self.pb.CompleteRequest(
                    id=request.id,
                    processor_id=self.args.id,
                    result=to_value(
                        {"report_url": f"https://reports.example/{request.id}.pdf", "pages": pages}
                    ),
                ),
                request,
            )
            event(logging.INFO, "job completed", pages=pages, **fields)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                # Finished, cancelled or leased to someone else meanwhile.
                event(logging.INFO, "job no longer ours", detail=error.details() or "", **fields)
            else:
                # The lease lapses and the server hands the request out again.
                event(
                    logging.WARNING,
                    "job abandoned",
                    code=error.code().name,
                    detail=error.details() or "",
                    **fields,
                )
        except Exception as error:  # a bug in the job: fail it, retryably
            log.exception("job crashed request=%s", request.id)
            try:
                self.unary(
                    self.stub.Fail,
                    self.pb.FailRequest(
                        id=request.id,
                        processor_id=self.args.id,
                        error=self.pb.RequestError(code="INTERNAL", message=str(error)),
                        retryable=True,
                    ),
                    request,
                )
            except grpc.RpcError:
                pass
        finally:
            with self.lock:
                if self.jobs.get(request.id) is job:
                    del self.jobs[request.id]

    def render(self, job: Job, pages: int) -> int:
        """Renders the pages, one progress report each; returns how many."""
        reports: queue.SimpleQueue = queue.SimpleQueue()
        # One client stream for the whole job; None ends it.
        summary = self.stub.Report.future(
            iter(reports.get, None), metadata=trace_metadata(job.request)
        )
        done = 0
        try:
            for page in range(1, pages + 1):
                if job.stop.wait(self.args.step_delay):
                    break
                done = page
                reports.put(
                    self.pb.ReportRequest(
                        id=job.request.id,
                        processor_id=self.args.id,
                        percentage=100.0 * page / pages,
                        message=f"page {page} of {pages}",
                        metadata=to_struct({"page": page, "pages": pages}),
                    )
                )
        finally:
            reports.put(None)
        result = summary.result()
        if result.rejected and not job.stop.is_set():
            event(
                logging.WARNING,
                "progress refused",
                request=job.request.id,
                accepted=result.accepted,
                rejected=result.rejected,
            )
        return done

    def unary(self, method, message, request=None):
        """Calls a unary RPC, trying again while the failure is transient.
        About a `request`, the call carries its trace context."""
        backoff = Backoff(initial=0.2, cap=2.0)
        for attempt in range(1, 6):
            try:
                return method(message, timeout=RPC_TIMEOUT_S, metadata=trace_metadata(request))
            except grpc.RpcError as error:
                if error.code() not in TRANSIENT or attempt == 5 or self.stopping.is_set():
                    raise
                time.sleep(backoff.next())
        raise AssertionError("unreachable")


class Backoff:
    """Capped exponential backoff with ±25% jitter."""

    def __init__(self, initial: float = 0.5, cap: float = 15.0):
        self.initial = initial
        self.cap = cap
        self.current = initial

    def reset(self) -> None:
        self.current = self.initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.75, 1.25)
        self.current = min(self.current * 2, self.cap)
        return delay


# ---- main ------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Streamer processor for generate_report.")
    parser.add_argument(
        "--target",
        default=os.environ.get("STREAMER_PROGRESS_TARGET", "127.0.0.1:50053"),
        help="ProgressService address, host:port (env STREAMER_PROGRESS_TARGET)",
    )
    parser.add_argument(
        "--id",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="this processor's stable name (default: hostname-pid)",
    )
    parser.add_argument("--concurrency", type=positive_int, default=4, help="requests held at once")
    parser.add_argument("--lease", type=positive_int, default=30, help="lease length in seconds")
    parser.add_argument(
        "--step-delay", type=float, default=0.5, help="seconds spent on each page"
    )
    args = parser.parse_args(argv)
    if args.step_delay < 0:
        parser.error("--step-delay must not be negative")
    return args


class ServiceToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Presents a service token (`authorization: Bearer ...`) on every call,
    for a deployment that checks its callers (`--trust token`)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UtcFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    ensure_stubs()
    # Keepalive pings find a dead server on an otherwise idle Claim stream.
    channel = grpc.insecure_channel(
        args.target,
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    token = os.environ.get("STREAMER_SERVICE_TOKEN")
    calls = grpc.intercept_channel(channel, ServiceToken(token)) if token else channel
    processor = Processor(calls, args)

    signals = {signal.SIGINT, signal.SIGTERM}
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: processor.stopping.set())

    claimer = threading.Thread(target=processor.claim_forever, name="claim", daemon=True)
    claimer.start()
    processor.stopping.wait()
    event(logging.INFO, "shutting down")
    processor.shutdown()
    claimer.join(5.0)
    channel.close()
    event(logging.INFO, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
