"""A processor: claims long-running requests and runs them."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import grpc

from ._channel import Backoff
from ._gen.streamer.v1 import progress_pb2
from ._json import JSON, to_struct, to_value
from ._loop import StreamLoop
from .errors import StreamerError
from .models import Identity, Request
from .progress import Progress

log = logging.getLogger("streamer_client")

Handler = Callable[["Job"], Any]

#: Codes worth trying Complete / Fail again for.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
#: Refusals that mean the job is no longer this processor's.
_LOST = {
    progress_pb2.REPORT_REJECTION_REASON_ALREADY_FINISHED: "ALREADY_FINISHED",
    progress_pb2.REPORT_REJECTION_REASON_LEASE_NOT_HELD: "LEASE_NOT_HELD",
}


class JobFailed(Exception):
    """Raised by a processor handler to fail its request (`Fail`) with a
    stable `code`, a `message` and optional `details`, for good."""

    retryable = False

    def __init__(self, message: str, *, code: str = "FAILED", details: Optional[Mapping[str, JSON]] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details) if details is not None else None


class Retryable(JobFailed):
    """A failure worth another attempt: the request is queued again while
    attempts remain (`Fail` with `retryable`)."""

    retryable = True


class Job:
    """One attempt at one request, as a processor handler gets it.

    Attributes:
        id: the request's server id.
        request_id: the client's id for it.
        action, payload, metadata, identity, connection_id: the request's.
        attempt: which attempt this is (1, 2, ...).
        request: the whole `Request`.
        processor_id: the id of the processor running it.
        cancelled: a threading.Event set when the job must stop: the request
            was cancelled, handed out again, refused a report as finished or
            leased to another, or the processor is stopping. Once it is set
            the job sends nothing more, whatever the handler returns.
        cancel_reason: why `cancelled` was set: what Streamer said on the
            Claim stream ("CANCELLED", "LEASE_LAPSED", "FINISHED",
            "LEASE_NOT_HELD", the `CancelReason` names without their
            prefix), a refused report ("ALREADY_FINISHED",
            "LEASE_NOT_HELD"), "superseded" or "stopping".
    """

    def __init__(self, processor: "Processor", request: progress_pb2.Request) -> None:
        self._processor = processor
        self._pb = request
        self.request = Request._from_pb(request)
        self.id = self.request.id
        self.request_id = self.request.request_id
        self.action = self.request.action
        self.payload: JSON = self.request.payload
        self.metadata: Dict[str, JSON] = self.request.metadata
        self.identity: Identity = self.request.identity
        self.connection_id = self.request.connection_id
        self.attempt = self.request.attempts
        self.trace_context: Dict[str, str] = self.request.trace_context
        #: The processor's id, for calls made about this job by hand.
        self.processor_id = processor.processor_id
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self._reports: "Optional[queue.Queue[Optional[progress_pb2.ReportRequest]]]" = None
        self._report_call: Optional[Any] = None
        self._report_lock = threading.Lock()

    def report(self, percentage: float, message: str = "", metadata: Optional[Mapping[str, JSON]] = None) -> bool:
        """Reports progress (0..=100) to the client, renewing the lease.
        Returns False, sending nothing, once the job is cancelled. Reports
        go up one client-streaming `Report` call, whose answer (which
        reports were refused) comes when the job ends."""
        if not 0 <= percentage <= 100:
            raise ValueError(f"percentage must be within 0..=100, not {percentage}")
        update = progress_pb2.ReportRequest(
            id=self.id, processor_id=self._processor.processor_id, percentage=percentage,
            message=message, metadata=to_struct(metadata),
        )
        with self._report_lock:
            if self.cancelled.is_set():
                return False
            if self._report_call is not None and self._report_call.done():
                # The stream broke: see what it said, and open another.
                self._collect_reports()
            if self._report_call is None:
                self._reports = queue.Queue()
                self._report_call = self._processor.progress.stub.Report.future(
                    self._report_requests(self._reports),
                    metadata=self._processor.progress._metadata(self.trace_context),
                )
            assert self._reports is not None
            self._reports.put(update)
        return True

    def _report_requests(self, reports: "queue.Queue[Optional[progress_pb2.ReportRequest]]") -> Iterator[progress_pb2.ReportRequest]:
        while True:
            update = reports.get()
            if update is None or self.cancelled.is_set():
                return
            yield update

    def _end_reports(self, timeout: Optional[float]) -> None:
        """Ends the Report stream and applies its answer."""
        with self._report_lock:
            if self._report_call is None:
                return
            assert self._reports is not None
            self._reports.put(None)
            try:
                self._report_call.result(timeout=timeout)
            except grpc.FutureTimeoutError:
                self._report_call.cancel()
            except Exception:  # noqa: BLE001 (looked at by _collect_reports)
                pass
            self._collect_reports()

    def _collect_reports(self) -> None:
        call, self._report_call, self._reports = self._report_call, None, None
        if call is None or call.cancelled():
            return
        try:
            response = call.result(timeout=0)
        except grpc.RpcError as error:
            log.warning("report stream failed request=%s: %s", self.id, StreamerError.from_rpc_error(error))
            return
        except Exception as error:  # noqa: BLE001
            log.warning("report stream failed request=%s: %r", self.id, error)
            return
        for rejection in response.rejections:
            if rejection.id == self.id and rejection.reason in _LOST:
                self._cancel(_LOST[rejection.reason])

    def _cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, request_id={self.request_id!r}, action={self.action!r}, attempt={self.attempt})"


class Processor(StreamLoop):
    """Claims requests for `actions` and runs each in a thread of a pool.

        def generate_report(job: Job):
            for page in range(1, 6):
                if job.cancelled.is_set():
                    return None                # sends nothing more
                job.report(page * 20, f"page {page} of 5")
            return {"pages": 5}

        processor = Processor(progress, actions={"generate_report": generate_report},
                              processor_id="reports-1", max_in_flight=4)
        processor.start()  # returns once registered: Submit accepts its actions
        ...
        processor.stop()

    `actions` maps each action to its handler, or is a list of actions all
    handled by `handler`. What the handler returns completes the request
    (`Complete`); a `JobFailed` fails it with its code (`Retryable`: queued
    again while attempts remain); any other exception fails it with code
    INTERNAL (and is logged). Complete and Fail carry the request's trace
    context, and are tried again on UNAVAILABLE, ABORTED or DEADLINE_EXCEEDED.

    `max_in_flight` is how many requests it holds (and runs) at once;
    `lease_seconds` the lease, which every `job.report` renews: a job that
    runs longer than that should report progress.
    """

    _name = "claim"

    def __init__(
        self,
        progress: Progress,
        actions: Union[Mapping[str, Handler], Sequence[str]],
        handler: Optional[Handler] = None,
        *,
        processor_id: Optional[str] = None,
        max_in_flight: int = 1,
        lease_seconds: int = 30,
    ) -> None:
        super().__init__()
        self.progress = progress
        if isinstance(actions, Mapping):
            if handler is not None:
                raise ValueError("Processor: give handlers in `actions` or one `handler`, not both")
            self.handlers: Dict[str, Handler] = dict(actions)
        else:
            if handler is None:
                raise ValueError("Processor: a list of actions needs a `handler`")
            if isinstance(actions, str):
                raise TypeError("Processor: actions is a list of actions, not one")
            self.handlers = {action: handler for action in actions}
        if not self.handlers:
            raise ValueError("Processor: no actions")
        self.processor_id = processor_id or f"{socket.gethostname()}-{os.getpid()}"
        self.max_in_flight = max_in_flight
        self.lease_seconds = lease_seconds
        #: What the server registered (its ProcessorRegistered), once it did.
        self.registration: Optional[progress_pb2.ProcessorRegistered] = None
        self._jobs: Dict[str, Job] = {}
        self._futures: List["Future[None]"] = []
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="streamer-job")

    # -- the Claim stream --

    def _open(self) -> Any:
        request = progress_pb2.ClaimRequest(
            processor_id=self.processor_id, actions=list(self.handlers),
            max_in_flight=self.max_in_flight, lease_seconds=self.lease_seconds,
        )
        return self.progress.stub.Claim(request, metadata=self.progress._metadata())

    def _registered(self, item: progress_pb2.ClaimResponse) -> bool:
        kind = item.WhichOneof("item")
        if kind == "registered":
            self.registration = item.registered
            log.info(
                "processor %s registered for %s (max_in_flight=%d, lease=%d s)",
                item.registered.processor_id, ",".join(item.registered.actions),
                item.registered.max_in_flight, item.registered.lease_seconds,
            )
            return True
        if kind == "work":
            self._start_job(item.work)
        elif kind == "cancelled":
            with self._lock:
                job = self._jobs.get(item.cancelled)
            if job is not None:
                # A server that names no reason means a cancel.
                reason = progress_pb2.CancelReason.Name(
                    item.cancel_reason or progress_pb2.CANCEL_REASON_CANCELLED
                ).removeprefix("CANCEL_REASON_")
                log.info("job cancelled request=%s reason=%s", item.cancelled, reason)
                job._cancel(reason)
        return False

    def _start_job(self, request: progress_pb2.Request) -> None:
        if self._stopping.is_set():
            return  # closing the stream hands it to another processor
        job = Job(self, request)
        with self._lock:
            previous = self._jobs.get(job.id)
            self._jobs[job.id] = job
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(self._pool.submit(self._run_job, job))
        if previous is not None:
            # Handed to us again (our stream broke and we reconnected): the
            # new attempt is the one that holds the lease.
            previous._cancel("superseded")

    def _stopped(self, timeout: Optional[float]) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            futures = list(self._futures)
        for job in jobs:
            job._cancel("stopping")
        wait(futures, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one job --

    def _run_job(self, job: Job) -> None:
        fields = f"request={job.id} client_request={job.request_id} attempt={job.attempt}"
        try:
            log.info("job started %s", fields)
            failure: Optional[JobFailed] = None
            result = None
            try:
                result = to_value(self.handlers[job.action](job))
            except JobFailed as error:
                failure = error
            except Exception as error:  # noqa: BLE001 (a handler's bug fails its request)
                log.exception("job handler failed %s", fields)
                failure = JobFailed(f"{type(error).__name__}: {error}", code="INTERNAL")
            # Every report reaches the server before the outcome does.
            job._end_reports(timeout=self.progress.timeout)
            if job.cancelled.is_set():
                log.info("job stopped reason=%s %s", job.cancel_reason, fields)
                return
            if failure is None:
                self._retrying(lambda: self.progress.complete(
                    job.id, self.processor_id, result, trace_context=job.trace_context))
                log.info("job completed %s", fields)
            else:
                self._retrying(lambda: self.progress.fail(
                    job.id, self.processor_id, failure.code, failure.message, details=failure.details,
                    retryable=failure.retryable, trace_context=job.trace_context))
                log.info("job failed code=%s retryable=%s %s", failure.code, failure.retryable, fields)
        except StreamerError as error:
            if error.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                log.info("job no longer ours %s: %s", fields, error)
            else:
                log.warning("job abandoned %s: %s", fields, error)
        except Exception:  # noqa: BLE001 (a bug here must not vanish in the pool)
            log.exception("job crashed %s", fields)
        finally:
            with self._lock:
                if self._jobs.get(job.id) is job:
                    del self._jobs[job.id]

    def _retrying(self, call: Callable[[], Any]) -> Any:
        backoff = Backoff(initial=0.2, cap=2.0)
        for attempt in range(1, 6):
            try:
                return call()
            except StreamerError as error:
                if error.code not in TRANSIENT or attempt == 5 or self._stopping.is_set():
                    raise
                delay = error.retry_delay if error.retry_delay is not None else backoff.next()
                time.sleep(delay)
        raise AssertionError("unreachable")
