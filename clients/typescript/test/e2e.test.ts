// End to end, against a real Streamer (test.sh runs these under
// scripts/with-streamer, which exports the addresses).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  ConnectionsClient,
  DeliveryOutcome,
  GrpcStatus,
  HandlerError,
  JobAborted,
  type Job,
  ProgressClient,
  RequestStatus,
  StreamerError,
  text,
} from "@streamer/client";
import { Client, env, TENANT, uniqueAction, uniqueUser, WAIT_MS, within } from "./helpers";

let connections: ConnectionsClient;
let progress: ProgressClient;
const sockets: Client[] = [];

async function connect(userId?: string): Promise<Client> {
  const client = await Client.connect(connections, userId);
  sockets.push(client);
  return client;
}

before(() => {
  connections = new ConnectionsClient(env("STREAMER_CONNECTION_TARGET"));
  progress = new ProgressClient(env("STREAMER_PROGRESS_TARGET"));
});

after(() => {
  for (const socket of sockets) {
    socket.close();
  }
  connections.close();
  progress.close();
});

test("send: a JSON value reaches the socket, integers as integers, undefined left out", async () => {
  const client = await connect();
  const outcome = await connections.send(
    client.connectionId,
    { type: "notice", count: 3, nested: { list: [1, "two", null, undefined], skipped: undefined } },
    { tenantId: TENANT },
  );
  assert.equal(outcome, DeliveryOutcome.DELIVERED);
  const frame = await client.next((json) => json?.type === "notice", "the notice");
  assert.equal(frame.raw, '{"count":3,"nested":{"list":[1,"two",null,null]},"type":"notice"}');

  await connections.send(client.connectionId, text('{"z":1,"a":2}'));
  const raw = await client.next((_, rawText) => rawText.startsWith('{"z"'), "the text frame");
  assert.equal(raw.raw, '{"z":1,"a":2}');
});

test("broadcast to a user reaches each of the user's sockets", async () => {
  const userId = uniqueUser();
  const first = await connect(userId);
  const second = await connect(userId);
  const bystander = await connect();
  const answer = await connections.broadcast({ tenantId: TENANT, userId }, { news: "for you" });
  assert.equal(answer.delivered, 2);
  for (const socket of [first, second]) {
    const frame = await socket.next((json) => json?.news === "for you", "the broadcast");
    assert.deepEqual(frame.json, { news: "for you" });
  }
  // The bystander is another user: a send to it after the broadcast is the
  // first thing it gets.
  await connections.send(bystander.connectionId, { marker: true });
  await bystander.next((json) => json?.marker === true, "the marker");
  assert.deepEqual(bystander.pending(), []);
});

test("broadcast to ids answers an outcome for each", async () => {
  const client = await connect();
  const answer = await connections.broadcast({ connectionIds: [client.connectionId, "no-such-connection"] }, [1, 2]);
  assert.equal(answer.delivered, 1);
  assert.equal(answer.notFound, 1);
  const outcomes = Object.fromEntries(answer.results.map((r) => [r.connectionId, r.outcome]));
  assert.equal(outcomes[client.connectionId], DeliveryOutcome.DELIVERED);
  assert.equal(outcomes["no-such-connection"], DeliveryOutcome.NOT_FOUND);
  await client.next((_, raw) => raw === "[1,2]", "the broadcast");
});

test("publish reaches a connection subscribed to the topic", async () => {
  const client = await connect();
  const topic = `orders/${uniqueAction("t")}`;
  const subscribed = await connections.subscribe({ tenantId: TENANT, topic, connectionId: client.connectionId });
  assert.deepEqual(subscribed.connectionIds, [client.connectionId]);
  const published = await connections.publish({ tenantId: TENANT, topic, data: { status: "shipped", items: 2 } });
  assert.equal(published.delivered, 1);
  assert.equal(published.position?.offset, 1);
  const frame = await client.next((json) => json?.type === "message", "the topic message");
  assert.equal(frame.json.topic, topic);
  assert.equal(frame.json.offset, 1);
  assert.deepEqual(frame.json.data, { status: "shipped", items: 2 });

  const listed = [];
  for await (const subscription of connections.listSubscriptions({ tenantId: TENANT, topic })) {
    listed.push(subscription.connectionId);
  }
  assert.deepEqual(listed, [client.connectionId]);
  assert.deepEqual(await connections.unsubscribe({ tenantId: TENANT, topic, connectionId: client.connectionId }), [
    client.connectionId,
  ]);
});

test("getConnection, listConnections (page by page) and disconnect", async () => {
  const userId = uniqueUser();
  const first = await connect(userId);
  const second = await connect(userId);
  const record = await connections.getConnection(first.connectionId, { tenantId: TENANT });
  assert.equal(record.identity?.userId, userId);
  assert.equal(record.identity?.tenantId, TENANT);
  assert.ok(record.connectedAt instanceof Date);

  const listed: string[] = [];
  for await (const connection of connections.listConnections({ tenantId: TENANT, userId }, { pageSize: 1 })) {
    listed.push(connection.connectionId);
  }
  assert.deepEqual(listed.sort(), [first.connectionId, second.connectionId].sort());

  await connections.disconnect(first.connectionId, { reason: "maintenance" });
  const closed = await within(first.closed, "the socket to close");
  assert.equal(closed.code, 1000);
  assert.equal(closed.reason, "maintenance");
  assert.equal(await connections.isActive(first.connectionId), false);
});

test("a router answers a client's frame; a HandlerError is a failed response", async () => {
  const action = uniqueAction("echo");
  const seen: string[] = [];
  const router = connections.router({
    actions: [action],
    routerId: "test-router",
    handler: async (request) => {
      seen.push(request.identity.userId);
      if ((request.payload as { fail?: boolean })?.fail) {
        throw new HandlerError("NOPE", "asked to fail", { why: "test" });
      }
      return { echoed: request.payload, metadata: request.metadata, count: 7 };
    },
  });
  try {
    const registered = await within(router.ready, "the router to register");
    assert.deepEqual(registered.actions, [action]);
    const client = await connect();
    client.send({ action, id: "1", payload: { hi: 1 }, metadata: { m: "x" } });
    const ok = await client.next((json) => json?.request_id === "1", "the router's response");
    assert.deepEqual(ok.json, {
      type: "response",
      request_id: "1",
      success: true,
      data: { echoed: { hi: 1 }, metadata: { m: "x" }, count: 7 },
    });
    assert.match(ok.raw, /"count":7[,}]/);
    client.send({ action, id: "2", payload: { fail: true } });
    const failed = await client.next((json) => json?.request_id === "2", "the failed response");
    assert.deepEqual(failed.json, {
      type: "error",
      request_id: "2",
      error: { code: "NOPE", message: "asked to fail", details: { why: "test" } },
    });
    assert.deepEqual(seen, [client.userId, client.userId]);
  } finally {
    await router.close();
  }
});

test("a processor runs a client's request: progress, then an integer result", async () => {
  const action = uniqueAction("report");
  const client = await connect();
  let progressSeen!: () => void;
  const clientSawProgress = new Promise<void>((resolve) => {
    progressSeen = resolve;
  });
  const jobs: Job[] = [];
  const processor = progress.processor({
    processorId: "test-processor",
    actions: [action],
    maxInFlight: 2,
    handler: async (job) => {
      jobs.push(job);
      job.report(50, "half way", { pages: 1 });
      // The outcome waits until the client has seen the progress.
      await within(clientSawProgress, "the client to see progress");
      return 42;
    },
  });
  try {
    const registered = await within(processor.ready, "the processor to register");
    assert.deepEqual(registered.actions, [action]);
    assert.equal(registered.maxInFlight, 2);
    // No retry and no sleep: once registered, the action is accepted.
    client.send({ action, id: "r1", payload: { pages: 1 }, metadata: { origin: "test" } });
    const ack = await client.next((json) => json?.type === "acknowledgment" || json?.type === "error", "the ack");
    assert.equal(ack.json.type, "acknowledgment", ack.raw);
    assert.equal(ack.json.request_id, "r1");
    const update = await client.next((json) => json?.type === "progress", "the progress");
    assert.equal(update.json.percentage, 50);
    assert.equal(update.json.message, "half way");
    assert.deepEqual(update.json.metadata, { pages: 1 });
    progressSeen();
    const done = await client.next((json) => json?.type === "complete", "the completion");
    assert.equal(done.json.request_id, "r1");
    assert.equal(done.json.result, 42);
    assert.match(done.raw, /"result":42[,}]/);

    assert.equal(jobs.length, 1);
    assert.equal(jobs[0].id, ack.json.id);
    assert.deepEqual(jobs[0].payload, { pages: 1 });
    assert.deepEqual(jobs[0].metadata, { origin: "test" });
    assert.equal(jobs[0].identity.userId, client.userId);
    assert.equal(jobs[0].signal.aborted, false);

    const request = await progress.get(ack.json.id);
    assert.equal(request.status, RequestStatus.COMPLETED);
    assert.equal(request.result, 42);
    const states = [];
    for await (const state of progress.watch(ack.json.id, { timeoutMs: WAIT_MS })) {
      states.push(state.status);
    }
    assert.deepEqual(states, [RequestStatus.COMPLETED]);
  } finally {
    await processor.close();
  }
});

test("a processor's HandlerError fails the request; the client is told", async () => {
  const action = uniqueAction("fails");
  const client = await connect();
  const processor = progress.processor({
    processorId: "test-failing",
    actions: [action],
    handler: () => {
      throw new HandlerError("INVALID_PAYLOAD", "pages must be a number", { field: "pages" });
    },
  });
  try {
    await within(processor.ready, "the processor to register");
    client.send({ action, id: "f1", payload: { pages: "x" } });
    const ack = await client.next((json) => json?.type === "acknowledgment", "the ack");
    const failed = await client.next((json) => json?.type === "error", "the error");
    assert.equal(failed.json.request_id, "f1");
    assert.match(JSON.stringify(failed.json.error), /pages must be a number/);
    const request = await progress.get(ack.json.id);
    assert.equal(request.status, RequestStatus.FAILED);
    assert.equal(request.error?.code, "INVALID_PAYLOAD");
    assert.deepEqual(request.error?.details, { field: "pages" });
  } finally {
    await processor.close();
  }
});

test("cancel from the client aborts the job's signal, and nothing more is sent", async () => {
  const action = uniqueAction("slow");
  const client = await connect();
  let started!: (job: Job) => void;
  const jobStarted = new Promise<Job>((resolve) => {
    started = resolve;
  });
  const errors: unknown[] = [];
  let finished!: (reason: unknown) => void;
  const handlerFinished = new Promise<unknown>((resolve) => {
    finished = resolve;
  });
  const processor = progress.processor({
    processorId: "test-cancel",
    actions: [action],
    onError: (error) => errors.push(error),
    handler: async (job) => {
      started(job);
      job.report(10, "started");
      await within(
        new Promise<void>((resolve) => job.signal.addEventListener("abort", () => resolve(), { once: true })),
        "the job's signal to abort",
      );
      finished(job.signal.reason);
      job.report(99, "after the cancel: dropped");
      return "this result is never sent";
    },
  });
  try {
    await within(processor.ready, "the processor to register");
    client.send({ action, id: "c-req", payload: {} });
    const ack = await client.next((json) => json?.type === "acknowledgment", "the ack");
    const job = await within(jobStarted, "the job to start");
    await client.next((json) => json?.type === "progress", "the first progress");
    client.send({ action: "cancel_request", id: "c1", payload: { request_id: "c-req" } });
    const reason = await within(handlerFinished, "the handler to see the cancel");
    assert.ok(reason instanceof JobAborted);
    assert.equal(reason.kind, "cancelled");
    assert.equal(job.signal.aborted, true);
    const final = await client.next((json) => json?.request_id === "c-req" && json?.type !== "progress", "the end");
    assert.equal(final.json.type, "error", final.raw);
    // close() waits for the handler. Had the job sent its result or its
    // report after the cancel, Streamer would have refused them (and
    // onError been told).
    await within(processor.close(), "the processor to close");
    assert.deepEqual(errors, []);
    const request = await progress.get(ack.json.id);
    assert.equal(request.status, RequestStatus.CANCELLED);
    assert.equal(request.progress?.message, "started");
    // What the job would have been told, had it completed.
    await assert.rejects(progress.complete(request.id, "test-cancel", 1), (error: unknown) => {
      assert.ok(error instanceof StreamerError);
      assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
      assert.equal(error.reason, "REQUEST_ALREADY_FINISHED");
      assert.equal(error.metadata.status, "cancelled");
      return true;
    });
  } finally {
    await processor.close();
  }
});

test("refusals reject with a StreamerError carrying Streamer's reason", async () => {
  const invalid = await connections.send("", { x: 1 }).then(
    () => assert.fail("an empty connection id was accepted"),
    (error: unknown) => error,
  );
  assert.ok(invalid instanceof StreamerError, String(invalid));
  assert.equal(invalid.code, GrpcStatus.INVALID_ARGUMENT);
  assert.equal(invalid.codeName, "INVALID_ARGUMENT");
  assert.equal(invalid.reason, "INVALID_ARGUMENT");
  assert.equal(invalid.domain, "streamer.v1");
  assert.deepEqual(
    invalid.fieldViolations.map((v) => v.field),
    ["connection_id"],
  );

  const missing = await connections.getConnection("no-such-connection").then(
    () => assert.fail("a connection that does not exist was found"),
    (error: unknown) => error,
  );
  assert.ok(missing instanceof StreamerError);
  assert.equal(missing.code, GrpcStatus.NOT_FOUND);
  assert.equal(missing.reason, "CONNECTION_NOT_FOUND");

  await assert.rejects(progress.get("no-such-request"), (error: unknown) => {
    assert.ok(error instanceof StreamerError);
    assert.equal(error.code, GrpcStatus.NOT_FOUND);
    assert.equal(error.reason, "REQUEST_NOT_FOUND");
    return true;
  });

  const client = await connect();
  await assert.rejects(
    progress.submit({ connectionId: client.connectionId, action: uniqueAction("unhandled"), payload: 1 }),
    (error: unknown) => {
      assert.ok(error instanceof StreamerError);
      assert.equal(error.code, GrpcStatus.FAILED_PRECONDITION);
      assert.equal(error.reason, "ACTION_NOT_HANDLED");
      return true;
    },
  );
});

test("a processor with no actions never becomes ready: ready rejects with the server's refusal", async () => {
  const processor = progress.processor({ processorId: "test-invalid", actions: [], handler: () => null, onError: () => {} });
  await assert.rejects(within(processor.ready, "ready to reject"), (error: unknown) => {
    assert.ok(error instanceof StreamerError);
    assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT);
    return true;
  });
  await within(processor.done, "the processor to stop");
});
