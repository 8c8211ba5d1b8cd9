// Unit tests: no server needed.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Metadata } from "@grpc/grpc-js";
import {
  decodeStatusDetails,
  GrpcStatus,
  HandlerError,
  RetryableError,
  StreamerError,
  text,
  toJson,
  toPayload,
  toStreamerError,
} from "@streamer/client";
import { Payload } from "@streamer/client/gen/streamer/v1/common";
import { Value } from "@streamer/client/gen/google/protobuf/struct";
import { Status } from "@streamer/client/gen/google/rpc/status";
import { BadRequest, ErrorInfo, RetryInfo } from "@streamer/client/gen/google/rpc/error_details";

test("toJson follows JSON.stringify", () => {
  const when = new Date("2026-01-02T03:04:05.000Z");
  assert.deepEqual(toJson({ a: 1, b: undefined, c: [undefined, () => 1, NaN], d: when, e: 10n, f: null }), {
    a: 1,
    c: [null, null, null],
    d: "2026-01-02T03:04:05.000Z",
    e: 10,
    f: null,
  });
  assert.equal(toJson(undefined), null);
  assert.throws(() => toJson(2n ** 53n + 1n), TypeError);
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  assert.throws(() => toJson(cyclic), /cyclic/);
});

test("a JSON payload is encoded with every Value set, even from undefined", () => {
  const payload = toPayload({ nested: { gone: undefined, list: [undefined, 1] }, top: undefined });
  const decoded = Payload.decode(Payload.encode(payload).finish());
  assert.equal(decoded.body?.$case, "json");
  assert.deepEqual(decoded.body?.$case === "json" && decoded.body.json, { nested: { list: [null, 1] } });
  // (An unset Value would decode as undefined, which deepEqual tells from null.)
  assert.equal(Value.unwrap(Value.decode(Value.encode(Value.wrap(undefined)).finish())), undefined);
  // And undefined on its own is JSON null, not an unset Value.
  const alone = Payload.decode(Payload.encode(toPayload(undefined)).finish());
  assert.deepEqual(alone.body, { $case: "json", json: null });
});

test("text and bytes payloads", () => {
  assert.deepEqual(toPayload(text('{"b":1,"a":2}')).body, { $case: "text", text: '{"b":1,"a":2}' });
  const bytes = toPayload(new Uint8Array([1, 2, 3])).body;
  assert.equal(bytes?.$case, "binary");
  assert.deepEqual(bytes?.$case === "binary" && [...bytes.binary], [1, 2, 3]);
});

function statusBytes(): Buffer {
  const status = Status.encode({
    code: GrpcStatus.INVALID_ARGUMENT,
    message: "payload: a Value has no kind",
    details: [
      {
        typeUrl: "type.googleapis.com/google.rpc.ErrorInfo",
        value: Buffer.from(
          ErrorInfo.encode({ reason: "INVALID_ARGUMENT", domain: "streamer.v1", metadata: { field: "payload" } }).finish(),
        ),
      },
      {
        typeUrl: "type.googleapis.com/google.rpc.BadRequest",
        value: Buffer.from(
          BadRequest.encode({
            fieldViolations: [{ field: "payload.json", description: "a Value has no kind", reason: "" }],
          }).finish(),
        ),
      },
      {
        typeUrl: "type.googleapis.com/google.rpc.RetryInfo",
        value: Buffer.from(RetryInfo.encode({ retryDelay: { seconds: 1, nanos: 500_000_000 } }).finish()),
      },
      { typeUrl: "type.googleapis.com/example.Unknown", value: Buffer.from([1, 2, 3]) },
    ],
  }).finish();
  return Buffer.from(status);
}

test("decodeStatusDetails reads ErrorInfo, BadRequest and RetryInfo", () => {
  assert.deepEqual(decodeStatusDetails(statusBytes()), {
    reason: "INVALID_ARGUMENT",
    domain: "streamer.v1",
    metadata: { field: "payload" },
    fieldViolations: [{ field: "payload.json", description: "a Value has no kind" }],
    retryDelayMs: 1500,
  });
  assert.deepEqual(decodeStatusDetails(Buffer.from([0xff, 0xff, 0xff])), { metadata: {}, fieldViolations: [] });
});

test("a gRPC error becomes a StreamerError with the trailer's details", () => {
  const trailers = new Metadata();
  trailers.set("grpc-status-details-bin", statusBytes());
  const grpcError = Object.assign(new Error("3 INVALID_ARGUMENT: bad"), {
    code: GrpcStatus.INVALID_ARGUMENT,
    details: "payload: a Value has no kind",
    metadata: trailers,
  });
  const error = toStreamerError(grpcError);
  assert.ok(error instanceof StreamerError);
  assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT);
  assert.equal(error.codeName, "INVALID_ARGUMENT");
  assert.equal(error.details, "payload: a Value has no kind");
  assert.equal(error.reason, "INVALID_ARGUMENT");
  assert.equal(error.domain, "streamer.v1");
  assert.deepEqual(error.fieldViolations, [{ field: "payload.json", description: "a Value has no kind" }]);
  assert.equal(error.retryDelayMs, 1500);
  assert.equal(error.transient, false);

  // Without the trailer: no details, and nothing else breaks.
  const plain = toStreamerError(
    Object.assign(new Error("14 UNAVAILABLE"), { code: GrpcStatus.UNAVAILABLE, details: "gone", metadata: new Metadata() }),
  );
  assert.ok(plain instanceof StreamerError);
  assert.equal(plain.reason, undefined);
  assert.deepEqual(plain.fieldViolations, []);
  assert.equal(plain.transient, true);

  // Anything that is not a gRPC error passes through unchanged.
  const other = new TypeError("x");
  assert.equal(toStreamerError(other), other);
});

test("HandlerError and RetryableError", () => {
  const error = new RetryableError("BUSY", "try later", { queue: 3 });
  assert.ok(error instanceof HandlerError);
  assert.equal(error.retryable, true);
  assert.equal(new HandlerError("BAD", "no").retryable, false);
});
