#!/usr/bin/env python3
"""A client's session against running Streamer roles, end to end, for test.sh.

    python3 split_session.py session GATEWAY CONNECTION PROGRESS REQUEST_ID
    python3 split_session.py resume  GATEWAY CONNECTION PROGRESS REQUEST_ID

GATEWAY, CONNECTION and PROGRESS are host:port (the WebSocket edge,
ConnectionService, ProgressService). The tokens come from the environment:
USER_TOKEN (a client's, user demo-user of tenant demo-tenant, as `streamer
token` mints it), SERVICE_TOKEN (a service token of role backend) and
PROCESSOR_TOKEN (one of role processor). gRPC calls go through grpcurl
(checklib.py).

session: a WebSocket client connects with USER_TOKEN; ListConnections lists
  its connection; a Send to that connection reaches it; the request it sends
  (action deploy_test_report, id REQUEST_ID) is acknowledged, a processor's
  Claim stream receives it, and the result the processor Completes it with
  reaches the client.
resume: a new client asks for REQUEST_ID (`get_request`), which is found
  completed, and its result is delivered to the new connection again.

Prints one line per check, "ok ..." or "FAIL ..."; exit status 1 if any failed.
"""

import asyncio
import json
import os
import sys
import time

import checklib
from checklib import call, grpcurl_args, report

ACTION = "deploy_test_report"
PROCESSOR = "deploy-test"
RESULT = {"pages": 2, "report": "deploy-test"}


async def receive(ws, wanted, seconds=10):
    """The first message `wanted` accepts, within `seconds`; the others are
    kept in `receive.seen` for the report."""
    deadline = time.monotonic() + seconds
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0.01)))
        receive.seen.append(message)
        if wanted(message):
            return message


receive.seen = []


async def claimed(stream, wanted, seconds=10):
    """The first message of grpcurl's output of a Claim stream (one
    pretty-printed JSON object per message) for which `wanted` holds."""
    decoder, text = json.JSONDecoder(), ""
    deadline = time.monotonic() + seconds
    while True:
        chunk = await asyncio.wait_for(stream.read(4096), max(deadline - time.monotonic(), 0.01))
        if not chunk:
            raise RuntimeError("the Claim stream ended")
        text += chunk.decode()
        while text.strip():
            try:
                item, end = decoder.raw_decode(text.lstrip())
            except ValueError:
                break  # the rest of the object has not arrived yet
            text = text.lstrip()[end:]
            if wanted(item):
                return item


async def connection_ids(conn, service_token):
    answer = await call(service_token, conn, "streamer.v1.ConnectionService/ListConnections",
                        {"tenant_id": "demo-tenant", "user_id": "demo-user"})
    return {c["connectionId"] for c in answer.get("connections", [])}


async def connect(gateway, conn, user_token, service_token):
    """A new client and its connection id, as ListConnections names it."""
    return await checklib.connect(f"ws://{gateway}/?Authorization={user_token}",
                                  lambda: connection_ids(conn, service_token))


async def session(gateway, conn, progress, request_id):
    user_token, service_token, processor_token = (
        os.environ["USER_TOKEN"], os.environ["SERVICE_TOKEN"], os.environ["PROCESSOR_TOKEN"])
    try:
        ws, connection_id = await connect(gateway, conn, user_token, service_token)
    except Exception as e:
        report(False, "a client connects with a user token and ListConnections lists it", [repr(e)])
        return
    report(True, f"a client connects with a user token and ListConnections lists it ({connection_id})")
    async with ws:
        try:
            sent = await call(service_token, conn, "streamer.v1.ConnectionService/Send",
                              {"connection_id": connection_id, "payload": {"json": {"hello": request_id}}})
            await receive(ws, lambda m: m == {"hello": request_id})
            report("DELIVERED" in sent.get("outcome", ""), "a Send to that connection reaches the client",
                   [f"Send answered {sent}"])
        except Exception as e:
            report(False, "a Send to that connection reaches the client", [repr(e), f"received {receive.seen}"])

        # A processor declares the action by opening its Claim stream; its
        # first message says it is registered, and from then on the action
        # is known: the client's one request is acknowledged, never refused.
        processor = await asyncio.create_subprocess_exec(
            *grpcurl_args(processor_token, {"processor_id": PROCESSOR, "actions": [ACTION]},
                          progress, "streamer.v1.ProgressService/Claim"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            try:
                first = await claimed(processor.stdout, lambda item: True)
            except Exception as e:
                first = repr(e)
            if not report(isinstance(first, dict) and first.get("registered", {}).get("actions") == [ACTION],
                          "the processor's Claim stream opens with its registration", [f"first message {first}"]):
                return
            await ws.send(json.dumps({"action": ACTION, "id": request_id, "payload": {"pages": 2}}))
            ack = await receive(ws, lambda m: m.get("request_id") == request_id)
            if not report(ack.get("type") == "acknowledgment" and ack.get("status") == "queued",
                          f"the client's request {request_id}, sent once, is acknowledged (queued)",
                          [f"received {receive.seen}"]):
                return
            try:
                work = (await claimed(processor.stdout,
                                      lambda item: item.get("work", {}).get("requestId") == request_id))["work"]
            except Exception as e:
                report(False, "a processor's Claim stream receives it", [repr(e)])
                return
            report(work.get("id") == ack.get("id"), f"a processor's Claim stream receives it ({work.get('id')})",
                   [f"work {work}", f"acknowledgment {ack}"])
            try:
                await call(processor_token, progress, "streamer.v1.ProgressService/Complete",
                           {"id": work["id"], "processor_id": PROCESSOR, "result": RESULT})
                done = await receive(ws, lambda m: m.get("request_id") == request_id and m.get("type") != "progress")
                report(done.get("type") == "complete" and done.get("result") == RESULT,
                       "the result the processor completes it with reaches the client", [f"received {done}"])
            except Exception as e:
                report(False, "the result the processor completes it with reaches the client",
                       [repr(e), f"received {receive.seen}"])
        finally:
            if processor.returncode is None:
                processor.terminate()
            await processor.wait()


async def resume(gateway, conn, progress, request_id):
    user_token, service_token = os.environ["USER_TOKEN"], os.environ["SERVICE_TOKEN"]
    what = f"a new client's get_request finds {request_id} completed"
    try:
        ws, _ = await connect(gateway, conn, user_token, service_token)
        async with ws:
            await ws.send(json.dumps({"action": "get_request", "id": "resume-1",
                                      "payload": {"request_id": request_id}}))
            state = await receive(ws, lambda m: m.get("request_id") == "resume-1")
            if not report(state.get("success") is True and state.get("data", {}).get("status") == "completed",
                          what, [f"received {receive.seen}"]):
                return
            what = "... and its result is delivered to the new connection again"
            done = await receive(ws, lambda m: m.get("request_id") == request_id and m.get("type") == "complete")
        report(done.get("result") == RESULT, what, [f"received {receive.seen}"])
    except Exception as e:
        report(False, what, [repr(e), f"received {receive.seen}"])


def main():
    mode, gateway, conn, progress, request_id = sys.argv[1:6]
    asyncio.run({"session": session, "resume": resume}[mode](gateway, conn, progress, request_id))
    sys.exit(1 if checklib.failed else 0)


if __name__ == "__main__":
    main()
