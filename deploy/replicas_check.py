#!/usr/bin/env python3
"""Streamer replicated on the DynamoDB store, checked end to end, for test.sh.

    python3 replicas_check.py BIN ROOT OUTPUT SCRIPT_PID

runs against examples/run-replicas.sh, running with two replicas of
connection, progress and gateway: ROOT is its STREAMER_REPLICAS_DIR (auth-1's
development key, the service secret, logs/), OUTPUT the file its lines go to
(the address and pid of each process come from its "started" lines),
SCRIPT_PID its pid (SIGUSR1 starts the exited processes again). BIN mints the
tokens. STREAMER_EDGE_LEASE_SECS must be the connection replicas' edge lease.
Six clients, each a user of its own, connect: c1-c3 on gateway-1 (edge-1),
c4-c6 on gateway-2 (edge-2). It shows:

1. both ConnectionService replicas list the six; a Send through each replica
   to every client, and a tenant Broadcast through each (answered with the
   count of sockets: 6), reach every socket meant exactly once (every message counted per client after a marker);
2. a processor claiming on progress-1 alone completes the requests of all six
   clients, those that connection-2 submitted through progress-2 included
   (its streamer_progress_requests_submitted_total grows; it hands out nothing);
3. with requests in flight from every client and two processors working (one
   preferring each progress replica), progress-1, then connection-1, then
   auth-1 are SIGKILLed: every acknowledged request gets its `complete`
   exactly once (the processor on progress-1 claims again on progress-2,
   work held there is taken back when its lease lapses), every client keeps
   its socket, and a new client is refused while auth is down. progress-1
   goes first because it sends to clients through connection-1 alone: the
   other way round, what it completed meanwhile could not reach its client
   (3b shows what becomes of that). SIGUSR1 to the script then starts the
   three again: auth-1 lets a new client in, both gateways attach to
   connection-1 again;
3b. the same without the race: the only processor claims on progress-1;
   once its request is acknowledged connection-1 is stopped (SIGSTOP), so
   progress-1 records the result but cannot send it; progress-1 and
   connection-1 are SIGKILLed: the client must still get its `complete`;
4. gateway-1 SIGKILLed: its connections leave ListConnections within the edge
   lease and a sweep (a third of the lease), edge-2's clients stay listed and
   keep getting messages, and a request of c1's user, running when its edge
   died, is found by `get_request` from a new connection on gateway-2, where
   its result then arrives.

Prints one line per check, "ok ..." or "FAIL ..."; exit status 1 if any failed.

    python3 replicas_check.py processor ID PROGRESS...

is one of the processors it runs: examples/processor-python's Processor
(action generate_report) on one gRPC channel to the ProgressService
addresses given, tried in order (pick_first): it claims on the first that
answers, and when that one goes away, on the next. Its service token is
STREAMER_SERVICE_TOKEN; it prints "ready" once its Claim stream is open.
"""

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import websockets

import checklib
from checklib import call, report

HERE = Path(__file__).resolve().parent
TENANT = "replicas"
ACTION = "generate_report"
# The processors' lease and time per page: a request of N pages takes N/10 s.
PROCESSOR_LEASE_S = 3
STEP_S = 0.1
EDGE_LEASE_S = int(os.environ.get("STREAMER_EDGE_LEASE_SECS", "30"))
CONNECTION = "streamer.v1.ConnectionService/"
STARTED = re.compile(r"^run-replicas: started (\S+) \(pid (\d+), (.*)\)$")


# ---- one processor (a process of its own) ----------------------------------


def run_processor(processor_id, targets):
    sys.path.insert(0, str(HERE.parent / "examples" / "processor-python"))
    import grpc
    import processor as example

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    example.ensure_stubs()
    # One channel to every address: the authority must be one name, not the
    # list.
    channel = grpc.insecure_channel("ipv4:" + ",".join(targets), options=[("grpc.default_authority", "progress")])
    worker = example.Processor(
        grpc.intercept_channel(channel, example.ServiceToken(os.environ["STREAMER_SERVICE_TOKEN"])),
        argparse.Namespace(target=",".join(targets), id=processor_id, concurrency=4, lease=PROCESSOR_LEASE_S,
                           step_delay=STEP_S))
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    threading.Thread(target=worker.claim_forever, daemon=True).start()
    # Stops with the checker, even one killed.
    parent = os.getppid()
    while not worker.stopping.wait(0.5):
        if os.getppid() != parent:
            worker.stopping.set()
    worker.shutdown()


# ---- the deployment ----------------------------------------------------------


class Deployment:
    def __init__(self, binary, root, output, script_pid):
        self.binary, self.root, self.output, self.script_pid = binary, Path(root), Path(output), int(script_pid)
        self.backend = self.mint("service-token", "--sub", "replicas-check", "--roles", "backend",
                                 "--service-secret-file", str(self.root / "service-secret"))
        self.processors = []

    def processes(self):
        """Each process's pid and addresses, from the latest "started" line of
        each name: {"connection-1": {"pid": ..., "listen": ..., "edge": ...}}."""
        found = {}
        for line in self.output.read_text().splitlines():
            if m := STARTED.match(line):
                found[m.group(1)] = {"pid": int(m.group(2)),
                                     **dict(part.rsplit(" ", 1) for part in m.group(3).split(", "))}
        return found

    def at(self, name, what="listen"):
        return self.processes()[name][what]

    def alive(self, name):
        try:
            os.kill(self.processes()[name]["pid"], 0)
            return True
        except ProcessLookupError:
            return False

    def connection(self):
        """A ConnectionService replica that is running."""
        return next(self.at(n) for n in ("connection-1", "connection-2") if self.alive(n))

    def kill(self, name, how=signal.SIGKILL):
        os.kill(self.processes()[name]["pid"], how)

    async def restart(self):
        """Starts every exited process again (SIGUSR1 to the script); their
        names, once each listens again, or None."""
        old = {name: p["pid"] for name, p in self.processes().items() if not self.alive(name)}
        os.kill(self.script_pid, signal.SIGUSR1)
        back = await until(lambda: all(self.processes()[n]["pid"] != pid and listens(self.at(n))
                                       for n, pid in old.items()), 15)
        return sorted(old) if back else None

    async def attached(self, gateway):
        """What the gateway's /readyz says ("ready: attached to N ...")."""
        url = f"http://{self.at(gateway)}/readyz"
        try:
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read().decode())
        except Exception as e:
            return repr(e)

    def mint(self, *args):
        return subprocess.run([self.binary, *args], capture_output=True, text=True, check=True).stdout.strip()

    def user_token(self, user):
        return self.mint("token", "--data-dir", str(self.root / "auth-1"), "--sub", user, "--tenant", TENANT)

    async def metric(self, name, metric):
        """The sum of METRIC's samples on NAME's metrics endpoint."""
        url = f"http://{self.at(name, 'metrics')}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if re.match(rf"{metric}(\{{|\s)", line))

    async def start_processor(self, processor_id, *progress):
        """A processor claiming on the first of these replicas that answers."""
        log = open(self.root / "logs" / f"{processor_id}.log", "ab")
        token = self.mint("service-token", "--sub", "replicas-check", "--roles", "processor",
                          "--service-secret-file", str(self.root / "service-secret"))
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "processor", processor_id, *(self.at(p) for p in progress),
            stdout=asyncio.subprocess.PIPE, stderr=log, env={**os.environ, "STREAMER_SERVICE_TOKEN": token})
        self.processors.append(process)
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"processor {processor_id} did not start; see {log.name}")

    async def stop_processors(self):
        """SIGTERM to every processor (which gives its work back), and waits."""
        for process in self.processors:
            if process.returncode is None:
                process.terminate()
        for process in self.processors:
            await process.wait()
        self.processors = []

    async def connections(self, **where):
        answer = await call(self.backend, self.connection(), CONNECTION + "ListConnections",
                            {"tenant_id": TENANT, "page": {"page_size": 1000}, **where})
        return {c["connectionId"]: c for c in answer.get("connections", [])}

    async def send(self, via, connection_id, payload):
        answer = await call(self.backend, self.at(via), CONNECTION + "Send",
                            {"connection_id": connection_id, "payload": {"json": payload}})
        return answer.get("outcome", "")

    async def broadcast(self, via, payload):
        answer = await call(self.backend, self.at(via), CONNECTION + "Broadcast",
                            {"tenant": {"tenant_id": TENANT}, "payload": {"json": payload}})
        # A tenant is one fan-out per edge, answered with counts.
        return answer.get("delivered", 0), answer.get("unavailable", 0)


def listens(address):
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


async def until(condition, seconds, step=0.05):
    """Polls `condition` until true (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# ---- clients -------------------------------------------------------------------


class Client:
    """A WebSocket client that keeps every message it gets."""

    def __init__(self, name, user, gateway):
        self.name, self.user, self.gateway = name, user, gateway
        self.messages = []
        self.sent = {}  # request id -> (when sent, pages asked for)
        self.closed = False

    @classmethod
    async def open(cls, deployment, name, user, gateway):
        """A client of USER connected through GATEWAY, with its connection id."""
        client = cls(name, user, gateway)

        async def ids():
            return set(await deployment.connections(user_id=user))

        client.ws, client.id = await checklib.connect(
            f"ws://{deployment.at(gateway)}/?Authorization={deployment.user_token(user)}", ids)
        client.reader = asyncio.create_task(client.read())
        return client

    async def read(self):
        try:
            async for text in self.ws:
                self.messages.append(json.loads(text))
        except Exception:
            pass
        self.closed = True

    async def request(self, request_id, pages):
        self.sent[request_id] = (time.monotonic(), pages)
        try:
            await self.ws.send(json.dumps({"action": ACTION, "id": request_id, "payload": {"pages": pages}}))
        except Exception:
            pass

    def about(self, request_id, *types):
        return [m for m in self.messages if m.get("request_id") == request_id and m.get("type") in types]

    def acked(self, request_id):
        return bool(self.about(request_id, "acknowledgment"))

    def finals(self, request_id):
        return self.about(request_id, "complete", "error")

    def tagged(self, check):
        """The messages a check sent (payloads with "check": CHECK)."""
        return [m for m in self.messages if m.get("check") == check]


async def marker(deployment, clients, via, tag):
    """Broadcasts a marker and waits until every open client has it, then a
    little more: whatever was sent before it has arrived, and a duplicate
    would have too."""
    await deployment.broadcast(via, {"check": "marker", "tag": tag})
    arrived = await until(lambda: all(c.closed or any(m.get("tag") == tag for m in c.tagged("marker"))
                                      for c in clients), 10)
    await asyncio.sleep(0.5)
    return arrived


def counted(clients, check, expected):
    """Clients whose messages of CHECK are not exactly `expected(client)`."""
    def canonical(messages):
        return sorted(json.dumps(m, sort_keys=True) for m in messages)

    return [f"{c.name}: {c.tagged(check)}" for c in clients if canonical(c.tagged(check)) != canonical(expected(c))]


async def request_faults(deployment, client):
    """What is wrong with a client's requests: each acknowledged one must
    have exactly one final, a `complete` with its result; no request may have
    two finals, and nothing may come for a request it never sent. A request
    without its final is looked up in the store (ProgressService/Get)."""
    faults = []
    for request_id, (_, pages) in client.sent.items():
        finals = client.finals(request_id)
        got = [m.get("type") for m in client.messages if m.get("request_id") == request_id]
        if client.acked(request_id) and (len(finals) != 1 or finals[0].get("type") != "complete"
                                         or finals[0].get("result", {}).get("pages") != pages):
            faults.append(f"{client.name} {request_id}: acknowledged, then got {got}; finals {finals}")
            if not finals:
                faults.append(f"    the store says: {await stored(deployment, client, request_id)}")
        elif len(finals) > 1:
            faults.append(f"{client.name} {request_id}: not acknowledged, yet got {got}; finals {finals}")
    strays = {m.get("request_id") for m in client.messages if "request_id" in m} - set(client.sent)
    faults += [f"{client.name}: messages for {r!r}, which it never sent" for r in strays]
    return faults


async def stored(deployment, client, request_id):
    """The request as a running ProgressService replica finds it."""
    progress = next(p for p in ("progress-2", "progress-1") if deployment.alive(p))
    try:
        found = await call(deployment.backend, deployment.at(progress), "streamer.v1.ProgressService/Get",
                           {"client": {"tenant_id": TENANT, "user_id": client.user, "request_id": request_id}})
        found = found.get("request", {})
        return {k: found.get(k) for k in ("id", "status", "processorId", "attempts", "updatedAt")}
    except Exception as e:
        return repr(e)


# ---- the checks -------------------------------------------------------------


async def deliveries(deployment, clients):
    """1. Send and Broadcast through each ConnectionService replica."""
    for via in ("connection-1", "connection-2"):
        listed = await call(deployment.backend, deployment.at(via), CONNECTION + "ListConnections",
                            {"tenant_id": TENANT})
        edges = {c["connectionId"]: c["edgeId"] for c in listed.get("connections", [])}
        want = {c.id: "edge-" + c.gateway[-1] for c in clients}
        report(edges == want, f"{via} lists the 6 clients, each on its edge (3 on edge-1, 3 on edge-2)",
               [f"listed {edges}", f"want {want}"])
    for via in ("connection-1", "connection-2"):
        outcomes = [await deployment.send(via, c.id, {"check": "send", "via": via, "to": c.name}) for c in clients]
        sent_ok = all(o == "DELIVERY_OUTCOME_DELIVERED" for o in outcomes)
        outcomes.append(await deployment.broadcast(via, {"check": "broadcast", "via": via}))
        report(sent_ok and outcomes[-1] == (6, 0),
               f"a Send through {via} to each client, and a tenant Broadcast through it, are DELIVERED",
               [f"answers {outcomes}"])
    arrived = await marker(deployment, clients, "connection-2", "deliveries")
    vias = ("connection-1", "connection-2")
    wrong = counted(clients, "send", lambda c: [{"check": "send", "via": v, "to": c.name} for v in vias])
    report(arrived and not wrong, "each client got the Send through each replica meant for it, exactly once",
           wrong or ["the marker did not reach every client"])
    wrong = counted(clients, "broadcast", lambda c: [{"check": "broadcast", "via": v} for v in vias])
    report(arrived and not wrong, "each client got the Broadcast through each replica exactly once", wrong)
    extra = [f"{c.name}: {c.messages}" for c in clients if len(c.messages) != 5]
    report(arrived and not extra, "... and nothing else: 2 Sends, 2 Broadcasts and the marker, each socket", extra)


async def across_progress(deployment, clients):
    """2. A processor on progress-1 only; work submitted through progress-2."""
    await deployment.start_processor("processor-1", "progress-1", "progress-2")
    on = [await deployment.metric(p, "streamer_progress_processors") for p in ("progress-1", "progress-2")]
    report(on == [1, 0], "processor-1 claims on progress-1, and progress-2 has no processor",
           [f"streamer_progress_processors: {on}"])
    counted = ("streamer_progress_requests_submitted_total", "streamer_progress_requests_dispatched_total")
    before = {p: {m: await deployment.metric(p, m) for m in counted} for p in ("progress-1", "progress-2")}
    extra = []
    through_2 = 0
    for round_ in range(6):
        batch = clients if round_ == 0 else [await Client.open(
            deployment, f"x{round_}", f"user-x{round_}", f"gateway-{1 + round_ % 2}")]
        extra += batch if round_ else []
        for c in batch:
            await c.request(f"{c.name}-across", 2)
        await until(lambda: all(c.finals(f"{c.name}-across") for c in batch), 15)
        through_2 = await deployment.metric("progress-2", "streamer_progress_requests_submitted_total") \
            - before["progress-2"]["streamer_progress_requests_submitted_total"]
        # Connections are spread over the replicas by a hash of their id:
        # should none of the six land on connection-2, more clients come.
        if through_2:
            break
    asked = clients + extra
    faults = [f for c in asked for f in await request_faults(deployment, c)]
    unacked = [c.name for c in asked if not c.acked(f"{c.name}-across")]
    report(not faults and not unacked, f"the {len(asked)} clients' requests are acknowledged and each result "
           "arrives once", faults + [f"not acknowledged: {unacked}"])
    dispatched = [await deployment.metric(p, "streamer_progress_requests_dispatched_total")
                  - before[p]["streamer_progress_requests_dispatched_total"] for p in ("progress-1", "progress-2")]
    report(through_2 > 0 and dispatched == [len(asked), 0],
           f"progress-2 queued {int(through_2)} of them (connection-2 submitted them) and handed out none; "
           f"progress-1 handed all {len(asked)} to processor-1",
           [f"queued by progress-2: {through_2}", f"handed out by progress-1, progress-2: {dispatched}"])
    for c in extra:
        await c.ws.close()


async def kills(deployment, clients):
    """3. SIGKILL progress-1, connection-1 and auth-1 under traffic."""
    await deployment.start_processor("processor-2", "progress-2", "progress-1")
    stop = asyncio.Event()

    async def traffic(client):
        n = 0
        while not stop.is_set():
            # One request at a time; one that got no answer in 3 s counts as
            # not accepted (its frame went to a replica as it died).
            waiting = [r for r, (at, _) in client.sent.items() if not client.finals(r)
                       and (client.acked(r) or time.monotonic() - at < 3)]
            if not waiting:
                if n and not client.acked(f"{client.name}-t{n}"):
                    await asyncio.sleep(0.2)  # refused: a moment before the next
                n += 1
                await client.request(f"{client.name}-t{n}", 3)
            await asyncio.sleep(0.05)

    loads = [asyncio.create_task(traffic(c)) for c in clients]
    started = time.monotonic()
    timeline = []
    for name, pause in (("progress-1", 1.5), ("connection-1", PROCESSOR_LEASE_S + 2), ("auth-1", 2)):
        await asyncio.sleep(pause)
        deployment.kill(name)
        timeline.append(f"{name} at +{time.monotonic() - started:.1f} s")
    # A new client is refused (an HTTP error instead of the upgrade) while
    # auth is down.
    await asyncio.sleep(0.5)
    try:
        admitted = await Client.open(deployment, "auth-down", "user-auth-down", "gateway-2")
        await admitted.ws.close()
        refused = f"it connected ({admitted.id})"
    except websockets.exceptions.InvalidStatus:
        refused = None
    except Exception as e:
        refused = repr(e)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*loads)
    # Every acknowledged request's final, however long its lease takes.
    everything = await until(lambda: all(c.finals(r) for c in clients for r in c.sent if c.acked(r)), 15, 0.2)
    drained = time.monotonic() - started
    arrived = await marker(deployment, clients, "connection-2", "kills")
    requests = [(c, r) for c in clients for r in c.sent if "-t" in r]
    acked = sum(c.acked(r) for c, r in requests)
    sent = len(requests)
    faults = [f for c in clients for f in await request_faults(deployment, c)]
    # What the others got instead: an error (say, from connection-1 while
    # progress-1, the only one it submits through, was down), nothing (sent
    # to a replica as it died), or a complete without the acknowledgment.
    refusals = {}
    for c, r in requests:
        if not c.acked(r):
            finals = c.finals(r)
            why = "no answer" if not finals else finals[0].get("error", {}).get("code") or \
                f"{finals[0].get('type')} without acknowledgment"
            refusals[why] = refusals.get(why, 0) + 1
    report(everything and arrived and not faults and acked > 0,
           f"SIGKILL of {', '.join(timeline)}: each of the {acked} requests acknowledged gets its complete exactly "
           f"once (all in {drained:.0f} s; of the {sent} sent, not acknowledged: "
           f"{', '.join(f'{n} {why}' for why, n in sorted(refusals.items())) or 'none'})",
           faults or ["some request never got a final"])
    on = await deployment.metric("progress-2", "streamer_progress_processors")
    report(on == 2, "processor-1 claims again on progress-2 (which now has both processors)",
           [f"streamer_progress_processors on progress-2: {on}"])
    gone = [c.name for c in clients if c.closed]
    report(not gone and arrived, "every client kept its socket through the kills, and a Broadcast through "
           "connection-2 reached each", [f"closed: {gone}"])
    report(refused is None, "with auth-1 down a new client is refused", [refused or ""])
    restarted = await deployment.restart()
    what = "SIGUSR1 to run-replicas.sh starts the three again: auth-1 lets a new client in"
    try:
        late = await Client.open(deployment, "auth-back", "user-auth-back", "gateway-2")
        await late.ws.close()
        report(restarted == ["auth-1", "connection-1", "progress-1"], what, [f"restarted: {restarted}"])
    except Exception as e:
        report(False, what, [f"restarted: {restarted}", repr(e)])
    rejoined = await until_async(lambda: all_attached(deployment, 2), 10)
    report(rejoined, "... and both gateways attach to connection-1 again",
           [await deployment.attached(g) for g in ("gateway-1", "gateway-2")])


async def all_attached(deployment, replicas):
    said = [await deployment.attached(g) for g in ("gateway-1", "gateway-2")]
    return all(f"attached to {replicas} " in answer for answer in said)


async def until_async(condition, seconds):
    """`until` for a coroutine condition."""
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def final_to_send(deployment, clients):
    """3b. A final not yet sent when its ProgressService replica dies."""
    # One processor, on progress-1 (the others give their work back), and
    # connection-1, through which alone progress-1 reaches clients, stopped
    # (SIGSTOP) once the request is acknowledged: progress-1 records the
    # result but cannot send it; then both are SIGKILLed.
    await deployment.stop_processors()
    await deployment.start_processor("processor-3", "progress-1", "progress-2")
    client = clients[3]
    what = ("a request completed on progress-1 while it could not send the result (connection-1 stopped), "
            "then progress-1 and connection-1 SIGKILLed: its complete still reaches the client")
    on = [await deployment.metric(p, "streamer_progress_processors") for p in ("progress-1", "progress-2")]
    if on != [1, 0]:
        report(False, what, [f"processor-3 should be on progress-1 alone; streamer_progress_processors: {on}"])
        return
    await client.request("unsent", 10)
    if not await until(lambda: client.acked("unsent"), 10):
        report(False, what, [f"never acknowledged: {client.about('unsent', 'error')}"])
        return
    deployment.kill("connection-1", signal.SIGSTOP)
    try:
        async def completed():
            found = await stored(deployment, client, "unsent")
            return isinstance(found, dict) and found.get("status") == "REQUEST_STATUS_COMPLETED"

        recorded = await until_async(completed, 10)
    finally:
        deployment.kill("progress-1")
        deployment.kill("connection-1")
    arrived = await until(lambda: client.finals("unsent"), 10)
    got = [m.get("type") for m in client.messages if m.get("request_id") == "unsent"]
    report(recorded and arrived and got.count("complete") == 1 and "error" not in got, what,
           [f"completed in the store before the kill: {recorded}", f"the client got: {got}",
            f"the store says: {await stored(deployment, client, 'unsent')}"])


async def edge_dies(deployment, clients):
    """4. SIGKILL gateway-1."""
    doomed, kept = clients[:3], clients[3:]
    owner = doomed[0]
    await owner.request("long", 60)
    acked = await until(lambda: owner.acked("long"), 10)
    deployment.kill("gateway-1")
    killed = time.monotonic()
    ids = {c.id for c in doomed}
    listed = {}

    def swept():
        return not ids & set(listed)

    while True:
        listed = await deployment.connections()
        if swept() or time.monotonic() - killed > EDGE_LEASE_S + 10:
            break
        await asyncio.sleep(0.2)
    took = time.monotonic() - killed
    bound = EDGE_LEASE_S + EDGE_LEASE_S / 3 + 1
    report(swept() and took <= bound,
           f"gateway-1 SIGKILLed: its 3 connections left ListConnections after {took:.1f} s "
           f"(edge lease {EDGE_LEASE_S} s, a sweep every {EDGE_LEASE_S / 3:g} s)",
           [f"still listed: {sorted(ids & set(listed))}" if not swept() else f"took longer than {bound:g} s"])
    report({c.id for c in kept} <= set(listed) and all(c.closed for c in doomed) and not any(c.closed for c in kept),
           "edge-2's clients stay listed and keep their sockets; edge-1's sockets are closed",
           [f"listed {sorted(listed)}", f"closed {[c.name for c in clients if c.closed]}"])
    outcomes = [await deployment.send("connection-2", c.id, {"check": "after", "to": c.name}) for c in kept]
    arrived = await marker(deployment, kept, "connection-2", "after")
    wrong = counted(kept, "after", lambda c: [{"check": "after", "to": c.name}])
    report(arrived and not wrong and outcomes == ["DELIVERY_OUTCOME_DELIVERED"] * 3,
           "a Send to each of edge-2's clients still reaches it exactly once", wrong + [f"answers {outcomes}"])

    # c1's user again, on the surviving edge: its request is still there.
    what = "a new connection of c1's user on gateway-2 finds its request (get_request) and gets its result"
    try:
        if not acked:
            raise RuntimeError(f"the request was never acknowledged: {owner.messages[-5:]}")
        again = await Client.open(deployment, "c1-again", owner.user, "gateway-2")
        await again.ws.send(json.dumps({"action": "get_request", "id": "where", "payload": {"request_id": "long"}}))
        await until(lambda: any(m.get("request_id") == "where" for m in again.messages), 10)
        state = next((m for m in again.messages if m.get("request_id") == "where"), {})
        status = state.get("data", {}).get("status")
        done = await until(lambda: again.finals("long"), 15)
        finals = again.finals("long")
        report(state.get("success") is True and status in ("processing", "completed") and done
               and [f.get("type") for f in finals] == ["complete"] and finals[0]["result"].get("pages") == 60,
               f"{what} (it was {status})", [f"get_request: {state}", f"finals: {finals}"])
        await again.ws.close()
    except Exception as e:
        report(False, what, [repr(e)])


async def main(deployment):
    clients = []
    try:
        for i in range(1, 7):
            clients.append(await Client.open(deployment, f"c{i}", f"user-{i}", f"gateway-{1 if i <= 3 else 2}"))
        report(True, "6 clients connect, 3 through each gateway")
    except Exception as e:
        report(False, "6 clients connect, 3 through each gateway", [repr(e)])
        return
    try:
        for check in (deliveries, across_progress, kills, final_to_send, edge_dies):
            try:
                await check(deployment, clients)
            except Exception as e:
                report(False, f"{check.__doc__.splitlines()[0]} stopped", [repr(e)])
    finally:
        await deployment.stop_processors()
        for c in clients:
            await c.ws.close()


if __name__ == "__main__":
    if sys.argv[1] == "processor":
        run_processor(sys.argv[2], sys.argv[3:])
    else:
        asyncio.run(main(Deployment(*sys.argv[1:5])))
        sys.exit(1 if checklib.failed else 0)
