// The router's and the processor's plumbing against an in-process fake of
// Streamer's services: what a real server cannot be made to do on demand
// (break a stream, refuse a report for a lapsed lease), and what it does not
// show (the metadata calls carry).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  Metadata,
  Server,
  ServerCredentials,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  type sendUnaryData,
  status,
} from "@grpc/grpc-js";
import {
  ConnectionsClient,
  DeliveryOutcome,
  JobAborted,
  ProgressClient,
  RetryableError,
  StreamerError,
} from "@streamer/client";
import {
  ConnectionServiceService,
  type ReceiveRequest,
  type ReceiveResponse,
  type SendRequest,
  type SendResponse,
} from "@streamer/client/gen/streamer/v1/connection";
import {
  CancelReason,
  type ClaimRequest,
  type ClaimResponse,
  type CompleteRequest,
  type CompleteResponse,
  type FailRequest,
  type FailResponse,
  ProgressServiceService,
  ReportRejectionReason,
  type ReportRequest,
  type ReportResponse,
  Request,
} from "@streamer/client/gen/streamer/v1/progress";
import { within } from "./helpers";

const TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/** Resolves the n-th time `signal()` is called. */
function counter(n: number): { signal(): void; reached: Promise<void> } {
  let count = 0;
  let resolve!: () => void;
  const reached = new Promise<void>((r) => {
    resolve = r;
  });
  return {
    signal() {
      if (++count === n) {
        resolve();
      }
    },
    reached,
  };
}

// ---- the fake ---------------------------------------------------------------

const seen = {
  receives: 0,
  sends: [] as { request: SendRequest; metadata: Metadata }[],
  reports: [] as { updates: ReportRequest[]; metadata: Metadata }[],
  completes: [] as { request: CompleteRequest; metadata: Metadata }[],
  fails: [] as { request: FailRequest; metadata: Metadata }[],
};
const sent = counter(1);
const finished = counter(2);
/** The work the fake's Claim hands out, by processor id. */
const work: Record<string, Request[]> = {};
/** Per processor: the request ids its Claim stream is told to stop, right after its work. */
const lapsed: Record<string, string[]> = {};

function job(id: string, payload: unknown): Request {
  return Request.fromPartial({ id, requestId: `client-${id}`, action: "fake", payload, attempts: 1, traceContext: { traceparent: TRACEPARENT } });
}

const server = new Server();
server.addService(ConnectionServiceService, {
  receive(call: ServerWritableStream<ReceiveRequest, ReceiveResponse>) {
    // The first stream breaks at once; the second one works.
    if (++seen.receives === 1) {
      call.emit("error", { code: status.UNAVAILABLE, details: "restarting" });
      return;
    }
    call.write({ event: { $case: "registered", registered: { actions: call.request.actions, routerId: call.request.routerId } } });
    call.write({
      event: {
        $case: "message",
        message: {
          connectionId: "conn-1",
          identity: { userId: "alice", tenantId: "acme", permissions: [], topics: [] },
          action: "echo",
          requestId: "1",
          payload: { a: [1, 2] },
          metadata: undefined,
          receivedAt: new Date(),
          traceContext: { traceparent: TRACEPARENT },
        },
      },
    });
  },
  send(call: ServerUnaryCall<SendRequest, SendResponse>, callback: sendUnaryData<SendResponse>) {
    seen.sends.push({ request: call.request, metadata: call.metadata });
    callback(null, { outcome: DeliveryOutcome.DELIVERED });
    sent.signal();
  },
});
server.addService(ProgressServiceService, {
  claim(call: ServerWritableStream<ClaimRequest, ClaimResponse>) {
    const { processorId, actions, maxInFlight, leaseSeconds } = call.request;
    call.write({ item: { $case: "registered", registered: { processorId, actions, maxInFlight, leaseSeconds } }, cancelReason: CancelReason.UNSPECIFIED });
    for (const request of work[processorId] ?? []) {
      call.write({ item: { $case: "work", work: request }, cancelReason: CancelReason.UNSPECIFIED });
    }
    for (const id of lapsed[processorId] ?? []) {
      call.write({ item: { $case: "cancelled", cancelled: id }, cancelReason: CancelReason.LEASE_LAPSED });
    }
  },
  report(call: ServerReadableStream<ReportRequest, ReportResponse>, callback: sendUnaryData<ReportResponse>) {
    const updates: ReportRequest[] = [];
    seen.reports.push({ updates, metadata: call.metadata });
    call.on("data", (update: ReportRequest) => updates.push(update));
    call.on("end", () => {
      // Reports from 50% on are refused: the lease lapsed meanwhile.
      const refused = updates.filter((u) => u.percentage >= 50);
      callback(null, {
        accepted: updates.length - refused.length,
        rejected: refused.length,
        rejections: refused.length
          ? [{ id: refused[0].id, reason: ReportRejectionReason.LEASE_NOT_HELD, count: refused.length }]
          : [],
      });
    });
  },
  complete(call: ServerUnaryCall<CompleteRequest, CompleteResponse>, callback: sendUnaryData<CompleteResponse>) {
    seen.completes.push({ request: call.request, metadata: call.metadata });
    callback(null, { request: Request.fromPartial({ id: call.request.id, result: call.request.result }) });
    finished.signal();
  },
  fail(call: ServerUnaryCall<FailRequest, FailResponse>, callback: sendUnaryData<FailResponse>) {
    seen.fails.push({ request: call.request, metadata: call.metadata });
    callback(null, { request: Request.fromPartial({ id: call.request.id }) });
    finished.signal();
  },
});

let target = "";
before(async () => {
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, p) => (error ? reject(error) : resolve(p))),
  );
  target = `127.0.0.1:${port}`;
});

after(() => {
  server.forceShutdown();
});

// ---- the tests --------------------------------------------------------------

test("a router opens a broken Receive again, then answers with the frame's trace context and the token", async () => {
  const connections = new ConnectionsClient(target, { token: "service-token" });
  const errors: unknown[] = [];
  const router = connections.router({
    actions: ["echo"],
    routerId: "r1",
    handler: (request) => request.payload,
    onError: (error) => errors.push(error),
    backoff: { initialMs: 1, capMs: 5 },
  });
  try {
    const registered = await within(router.ready, "the router to register");
    assert.deepEqual(registered, { actions: ["echo"], routerId: "r1" });
    assert.equal(seen.receives, 2);
    assert.equal(errors.length, 1);
    assert.ok(errors[0] instanceof StreamerError && errors[0].code === status.UNAVAILABLE, String(errors[0]));
    await within(sent.reached, "the response to be sent");
    const [{ request, metadata }] = seen.sends;
    assert.equal(request.connectionId, "conn-1");
    assert.equal(request.tenantId, "acme");
    assert.deepEqual(request.payload?.body, {
      $case: "json",
      json: { type: "response", request_id: "1", success: true, data: { a: [1, 2] } },
    });
    assert.deepEqual(metadata.get("traceparent"), [TRACEPARENT]);
    assert.deepEqual(metadata.get("authorization"), ["Bearer service-token"]);
  } finally {
    await router.close();
    connections.close();
  }
});

test("a processor: a refused report aborts its job (and nothing is sent after); outcomes carry the trace context", async () => {
  work["p1"] = [job("refused", { n: 1 }), job("ok", { n: 2 }), job("retry", { n: 3 })];
  const progress = new ProgressClient(target);
  const reasons: Record<string, unknown> = {};
  const processor = progress.processor({
    processorId: "p1",
    actions: ["fake"],
    maxInFlight: 3,
    reportWindowMs: 0,
    handler: async (j) => {
      if (j.id === "retry") {
        throw new RetryableError("BUSY", "try again", { queue: 9 });
      }
      if (j.id === "ok") {
        j.report(10, "a tenth");
        return { doubled: (j.payload as { n: number }).n * 2 };
      }
      j.report(10, "accepted");
      j.report(60, "refused");
      // With a window of 0, each report ends the stream before it, so this
      // one brings the refusal of the report of 60%.
      j.report(61, "ends the refused stream");
      await within(
        new Promise((resolve) => j.signal.addEventListener("abort", resolve, { once: true })),
        "the refusal to abort the job",
      );
      reasons[j.id] = j.signal.reason;
      j.report(70, "dropped");
      return "never completed";
    },
  });
  try {
    const registered = await within(processor.ready, "the processor to register");
    assert.equal(registered.processorId, "p1");
    await within(finished.reached, "the complete and the fail");
    await processor.close();

    assert.ok(reasons.refused instanceof JobAborted);
    assert.equal(reasons.refused.kind, "lease_not_held");
    assert.deepEqual(
      seen.completes.map((c) => [c.request.id, c.request.processorId, c.request.result]),
      [["ok", "p1", { doubled: 4 }]],
    );
    assert.deepEqual(seen.completes[0].metadata.get("traceparent"), [TRACEPARENT]);
    assert.deepEqual(
      seen.fails.map((f) => [f.request.id, f.request.error?.code, f.request.error?.details, f.request.retryable]),
      [["retry", "BUSY", { queue: 9 }, true]],
    );
    assert.deepEqual(seen.fails[0].metadata.get("traceparent"), [TRACEPARENT]);
    // Every report went up with the trace context; none after the abort.
    const reported = seen.reports.flatMap((r) => r.updates.map((u) => `${u.id}:${u.percentage}`));
    assert.deepEqual(reported.filter((r) => r.startsWith("refused")), ["refused:10", "refused:60", "refused:61"]);
    for (const report of seen.reports) {
      assert.deepEqual(report.metadata.get("traceparent"), [TRACEPARENT]);
    }
  } finally {
    await processor.close();
    progress.close();
  }
});

test("a processor told its lease lapsed aborts that job with kind lease_lapsed and sends nothing for it", async () => {
  work["p2"] = [job("taken-back", { n: 1 })];
  lapsed["p2"] = ["taken-back"];
  const progress = new ProgressClient(target);
  let reason: unknown;
  let sawAbort!: () => void;
  const aborted = new Promise<void>((resolve) => {
    sawAbort = resolve;
  });
  const processor = progress.processor({
    processorId: "p2",
    actions: ["fake"],
    handler: async (j) => {
      await within(
        new Promise((done) => j.signal.addEventListener("abort", done, { once: true })),
        "the notice to abort the job",
      );
      reason = j.signal.reason;
      sawAbort();
      return "never completed";
    },
  });
  try {
    await within(aborted, "the job to be aborted");
    // close() waits for the handler, so whatever it would send is sent by then.
    await processor.close();
    assert.ok(reason instanceof JobAborted);
    assert.equal(reason.kind, "lease_lapsed");
    assert.ok(!seen.completes.some((c) => c.request.id === "taken-back"), "no Complete for it");
    assert.ok(!seen.fails.some((f) => f.request.id === "taken-back"), "no Fail for it");
  } finally {
    await processor.close();
    progress.close();
  }
});
