"""What the checkers test.sh runs share (split_session.py, replicas_check.py):
their "ok"/"FAIL" lines, unary gRPC calls through grpcurl, and a WebSocket
client's connection id."""

import asyncio
import json

import websockets

# How many checks failed so far; a checker exits with status 1 if any did.
failed = 0


def report(ok, what, details=()):
    """Prints "  ok   WHAT" or "  FAIL WHAT" and the details under it."""
    global failed
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failed += 1
        for line in details:
            print(f"       {line}", flush=True)
    return ok


def grpcurl_args(token, body, address, method, *flags):
    return ["grpcurl", "-plaintext", *flags, "-H", f"authorization: Bearer {token}", "-d", json.dumps(body),
            address, method]


async def call(token, address, method, body):
    """A unary call: its answer as JSON, or an exception naming grpcurl's error."""
    process = await asyncio.create_subprocess_exec(
        *grpcurl_args(token, body, address, method, "-max-time", "5"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{method}: {err.decode().strip() or out.decode().strip()}")
    return json.loads(out or b"{}")


async def connect(url, connection_ids):
    """A new WebSocket client at URL, and its connection id: the one that
    `connection_ids()` (a coroutine listing its user's connections) names
    once it is open and did not name before."""
    before = await connection_ids()
    ws = await websockets.connect(url, open_timeout=5)
    # The edge announces the connection to ConnectionService as it opens.
    for _ in range(50):
        if new := await connection_ids() - before:
            return ws, new.pop()
        await asyncio.sleep(0.1)
    await ws.close()
    raise RuntimeError(f"ListConnections never listed a new connection (had {sorted(before)})")
