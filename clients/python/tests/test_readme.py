"""The README's examples, run as they are written (the addresses swapped
for the test system's, and `run()` for `start()`), with what a client
sees checked."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import TIMEOUT

README = Path(__file__).resolve().parent.parent / "README.md"


def examples() -> List[str]:
    found = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(found) == 7, "the README's examples changed: update this test"
    return [
        block.replace("127.0.0.1:50052", os.environ["STREAMER_CONNECTION_TARGET"])
        .replace("127.0.0.1:50053", os.environ["STREAMER_PROGRESS_TARGET"])
        .replace(".run()", ".start()")
        for block in found
    ]


def received(socket: ClientConnection, count: int) -> List[Any]:
    """The next `count` frames, JSON parsed (raw text as it is)."""
    out = []
    for _ in range(count):
        frame = socket.recv(timeout=TIMEOUT)
        try:
            out.append(json.loads(frame))
        except ValueError:
            out.append(frame)
    return out


def test_the_readme_examples_work_as_written() -> None:
    (connections_example, router_example, processor_example, progress_example, errors_example, aio_example,
     raw_example) = examples()
    token = subprocess.run(
        [os.environ["STREAMER_BIN"], "token", "--data-dir", os.environ["STREAMER_DATA_DIR"],
         "--sub", "demo-user", "--tenant", "demo-tenant"],
        check=True, capture_output=True, text=True, timeout=TIMEOUT,
    ).stdout.strip()
    url = f"{os.environ['STREAMER_WS_URL']}?Authorization={token}"
    scope: Dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(connect(url, open_timeout=TIMEOUT))

        exec(connections_example, scope)

        assert received(first, 7) == [
            {"type": "response", "data": {"hello": "you"}},
            "raw text, written as it is",
            {"step": 1},
            {"news": "for you"},
            {"news": "for everyone"},
            {"ping": True},
            {"type": "message", "topic": "orders/42", "epoch": scope["published"].epoch, "offset": 1,
             "data": {"status": "shipped"}},
        ]
        with pytest.raises(ConnectionClosed) as closed:
            first.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.reason == "maintenance"

        second = stack.enter_context(connect(url, open_timeout=TIMEOUT))
        try:
            exec(router_example, scope)
            second.send(json.dumps({"action": "echo", "id": "1", "payload": {"hi": 1}}))
            second.send(json.dumps({"action": "echo", "id": "2"}))
            assert received(second, 2) == [
                {"type": "response", "request_id": "1", "success": True, "data": {"hi": 1}},
                {"type": "error", "request_id": "2",
                 "error": {"code": "BAD_REQUEST", "message": "say something"}},
            ]

            exec(processor_example, scope)
            second.send(json.dumps({"action": "generate_report", "id": "r1", "payload": {"pages": 2}}))
            ack, *rest = received(second, 4)
            assert ack["type"] == "acknowledgment"
            assert [(m["type"], m.get("percentage")) for m in rest] == [
                ("progress", 50), ("progress", 100), ("complete", None)]
            assert rest[-1]["result"] == {"pages": 2, "report_url": f"https://reports.example/{ack['id']}.pdf"}

            scope["conn"] = next(scope["connections"].list_connections("demo-tenant", user_id="demo-user"))
            exec(progress_example, scope)
            assert scope["state"].result["pages"] == 2
            assert scope["progress"].get(scope["other"].request.id).status.value == "CANCELLED"

            exec(errors_example, scope)  # catches the NOT_FOUND it provokes

            exec(aio_example, {})
            # After the frames about r9 and r10 (the progress example's requests):
            while (frame := received(second, 1)[0]) and "request_id" in frame:
                pass
            assert frame == {"hello": "from asyncio"}

            exec(raw_example, scope)
        finally:
            for name in ("router", "processor"):
                if name in scope:
                    scope[name].stop()
