"""Processor and Progress against a real Streamer: a client's request
claimed, reported on, completed, failed and cancelled."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest

from streamer_client import Job, JobFailed, Processor, Progress, RequestStatus, Retryable, StreamerError

from conftest import TIMEOUT, unique


def start_processor(progress: Progress, handlers, **options) -> Processor:  # type: ignore[no-untyped-def]
    return Processor(progress, actions=handlers, processor_id=unique("processor"), **options).start(timeout=TIMEOUT)


def frames_of(client, request_id: str):  # type: ignore[no-untyped-def]
    """The next frame about `request_id` (others are skipped)."""
    return client.recv_until(lambda frame: frame.get("request_id") == request_id)


def test_a_processor_gets_a_clients_request_reports_and_completes(progress: Progress, open_client) -> None:
    action = unique("generate_report")
    jobs = []
    seen_progress = threading.Event()

    def generate_report(job: Job):
        jobs.append(job)
        job.report(50, "page 1 of 2", {"page": 1})
        # Hold the result until the client saw the progress (progress is
        # coalesced: one arriving with the result could be skipped).
        assert seen_progress.wait(TIMEOUT)
        return {"pages": job.payload["pages"], "report_url": f"https://reports.example/{job.id}.pdf"}

    with start_processor(progress, {action: generate_report}, max_in_flight=2):
        # No retry, no sleep: start() returned on `registered`, so the action is known.
        client = open_client(unique("alice"))
        client.send_json({"action": action, "id": "r1", "payload": {"pages": 2}})

        ack = frames_of(client, "r1")
        assert ack["type"] == "acknowledgment" and ack["status"] == "queued", ack
        report = frames_of(client, "r1")
        assert report["type"] == "progress", report
        assert (report["percentage"], report["message"], report["metadata"]) == (50, "page 1 of 2", {"page": 1})
        seen_progress.set()
        complete = frames_of(client, "r1")

    assert complete["type"] == "complete", complete
    assert complete["result"] == {"pages": 2, "report_url": f"https://reports.example/{ack['id']}.pdf"}
    assert isinstance(complete["result"]["pages"], int)
    [job] = jobs
    assert (job.id, job.request_id, job.action, job.attempt) == (ack["id"], "r1", action, 1)
    assert job.payload == {"pages": 2} and isinstance(job.payload["pages"], int)
    assert job.identity.user_id == client.user_id
    assert not job.cancelled.is_set()
    state = progress.get(ack["id"])
    assert state.status is RequestStatus.COMPLETED
    assert state.result == complete["result"]


def test_a_cancel_from_the_client_sets_the_jobs_cancelled_event(progress: Progress, open_client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="streamer_client")
    action = unique("slow")
    started, finished = threading.Event(), threading.Event()
    observed = {}

    def slow(job: Job):
        job.report(10, "started")
        started.set()
        observed["cancelled"] = job.cancelled.wait(TIMEOUT)
        observed["reason"] = job.cancel_reason
        observed["report_sent"] = job.report(90, "too late")
        finished.set()
        return {"ignored": True}

    with start_processor(progress, {action: slow}):
        client = open_client(unique("bob"))
        client.send_json({"action": action, "id": "r1"})
        ack = frames_of(client, "r1")
        assert ack["type"] == "acknowledgment", ack
        assert started.wait(TIMEOUT)

        client.send_json({"action": "cancel_request", "id": "c1", "payload": {"request_id": "r1"}})

        # The cancel's answer and the request's final error, in either order.
        answers = {}
        while len(answers) < 2:
            frame = client.recv_until(lambda f: f.get("request_id") in ("c1", "r1") and f["type"] != "progress")
            answers[frame["request_id"]] = frame
        assert finished.wait(TIMEOUT)

    assert observed == {"cancelled": True, "reason": "CANCELLED", "report_sent": False}
    assert answers["c1"]["success"] is True, answers
    assert answers["r1"]["type"] == "error" and answers["r1"]["error"]["details"]["status"] == "cancelled", answers
    assert progress.get(ack["id"]).status is RequestStatus.CANCELLED
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("job stopped reason=CANCELLED") for m in messages), messages
    # It sent nothing after the cancel: no Complete was even tried.
    assert not any(m.startswith(("job completed", "job no longer ours")) for m in messages), messages


def test_a_cancel_from_a_backend_reaches_the_job(progress: Progress, open_client) -> None:
    action = unique("long")
    jobs = []
    started = threading.Event()

    def long(job: Job):
        jobs.append(job)
        started.set()
        job.cancelled.wait(TIMEOUT)
        return None

    with start_processor(progress, {action: long}):
        client = open_client(unique("kate"))
        submitted = progress.submit(client.connection_id, action, request_id="r1")
        assert started.wait(TIMEOUT)

        cancelled = progress.cancel(submitted.request.id, "no longer needed")

        assert jobs[0].cancelled.wait(TIMEOUT)
    assert cancelled.status is RequestStatus.CANCELLED
    assert cancelled.error is not None and cancelled.error.code == "CANCELLED"
    assert jobs[0].cancel_reason == "CANCELLED"


def test_a_failing_handler_fails_the_request(progress: Progress, open_client) -> None:
    action = unique("strict")

    def strict(job: Job):
        raise JobFailed("pages must be a whole number", code="INVALID_PAYLOAD", details={"field": "pages"})

    with start_processor(progress, {action: strict}):
        client = open_client(unique("carol"))
        client.send_json({"action": action, "id": "r1", "payload": {"pages": "many"}})
        assert frames_of(client, "r1")["type"] == "acknowledgment"
        error = frames_of(client, "r1")

    assert error["type"] == "error", error
    assert error["error"]["message"] == "pages must be a whole number"
    assert error["error"]["details"]["code"] == "INVALID_PAYLOAD"
    assert error["error"]["details"]["field"] == "pages"


def test_a_retryable_failure_is_tried_again(progress: Progress, open_client) -> None:
    action = unique("flaky")
    attempts = []

    def flaky(job: Job):
        attempts.append(job.attempt)
        if job.attempt == 1:
            raise Retryable("the backend is busy", code="BUSY")
        return job.attempt

    with start_processor(progress, {action: flaky}):
        client = open_client(unique("dave"))
        client.send_json({"action": action, "id": "r1"})
        outcome = client.recv_until(lambda f: f.get("request_id") == "r1" and f["type"] in ("complete", "error"))

    assert outcome["type"] == "complete", outcome
    assert outcome["result"] == 2
    assert attempts == [1, 2]


def test_submit_get_and_watch(progress: Progress, open_client) -> None:
    action = unique("compute")
    client = open_client(unique("erin"))

    with start_processor(progress, {action: lambda job: {"sum": sum(job.payload["numbers"])}}):
        submitted = progress.submit(client.connection_id, action, {"numbers": [1, 2, 4]}, request_id="s1",
                                    metadata={"source": "test"})
        states = list(progress.watch(submitted.request.id, timeout=TIMEOUT))
        again = progress.submit(client.connection_id, action, {"numbers": [1]}, request_id="s1")

    assert not submitted.duplicate
    assert submitted.request.metadata == {"source": "test"}
    assert states[-1].status is RequestStatus.COMPLETED
    assert states[-1].result == {"sum": 7} and isinstance(states[-1].result["sum"], int)
    assert again.duplicate and again.request.id == submitted.request.id
    with pytest.raises(StreamerError) as finished:
        progress.cancel(submitted.request.id)
    assert finished.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert finished.value.reason == "REQUEST_ALREADY_FINISHED"
    assert finished.value.metadata.get("status") == "completed"
    by_client = progress.get(tenant_id=client.tenant_id, user_id=client.user_id, request_id="s1")
    assert by_client.id == submitted.request.id and by_client.finished
    # The client that the request was submitted for saw it too.
    assert frames_of(client, "s1")["type"] == "acknowledgment"
    complete = frames_of(client, "s1")
    assert complete["type"] == "complete" and complete["result"] == {"sum": 7}, complete


def test_a_report_refused_as_finished_cancels_the_job(progress: Progress, open_client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="streamer_client")
    action = unique("raced")
    jobs = []

    def raced(job: Job):
        jobs.append(job)
        # Finished behind the job's back (another caller completed it)...
        progress.complete(job.id, job.processor_id, "by someone else")
        # ...so this report is refused as ALREADY_FINISHED.
        job.report(50, "half way")
        return "mine"

    with start_processor(progress, {action: raced}):
        client = open_client(unique("frank"))
        client.send_json({"action": action, "id": "r1"})
        outcome = client.recv_until(lambda f: f.get("request_id") == "r1" and f["type"] in ("complete", "error"))
        wait_for(lambda: jobs and jobs[0].cancelled.is_set())

    assert outcome["result"] == "by someone else"
    assert jobs[0].cancel_reason == "ALREADY_FINISHED"
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("job completed") for m in messages), messages


def wait_for(condition, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not condition():
            if done.wait(0.01):
                pytest.fail("condition not met in time")
    finally:
        deadline.cancel()
