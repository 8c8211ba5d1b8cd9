import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details";
import { Status as RpcStatus } from "./gen/google/rpc/status";
import type { ErrorReason } from "./gen/streamer/v1/common";
import type { JsonObject } from "./json";

/** The trailer gRPC servers put a serialized `google.rpc.Status` in. */
export const STATUS_DETAILS_TRAILER = "grpc-status-details-bin";

/**
 * The reasons Streamer names in `ErrorInfo.reason`: the contract's
 * `ErrorReason` values without their `ERROR_REASON_` prefix, e.g.
 * `"CONNECTION_NOT_FOUND"`. New ones may be added: treat an unknown reason
 * by its status code.
 */
export type ErrorReasonName = Exclude<
  `${ErrorReason}` extends infer R ? (R extends `ERROR_REASON_${infer Name}` ? Name : never) : never,
  "UNSPECIFIED"
>;

/** One invalid field of a request (`google.rpc.BadRequest.FieldViolation`). */
export interface FieldViolation {
  /** The field's path in the request, e.g. `payload` or `page.page_size`. */
  field: string;
  description: string;
  /** A machine-readable reason for the violation, when the server gave one. */
  reason?: string;
}

/** What Streamer attaches to an error in its `grpc-status-details-bin` trailer. */
export interface StatusDetails {
  /** `google.rpc.ErrorInfo.reason`, e.g. `CONNECTION_NOT_FOUND`. */
  reason?: ErrorReasonName | (string & {});
  /** `google.rpc.ErrorInfo.domain`: `streamer.v1` for Streamer's own errors. */
  domain?: string;
  /** `google.rpc.ErrorInfo.metadata` (empty when none). */
  metadata: Record<string, string>;
  /** `google.rpc.BadRequest.field_violations` (empty when none). */
  fieldViolations: FieldViolation[];
  /** `google.rpc.RetryInfo.retry_delay`, in milliseconds. */
  retryDelayMs?: number;
}

const TYPE_PREFIX = "type.googleapis.com/";

/**
 * Decodes a serialized `google.rpc.Status` (the value of the
 * `grpc-status-details-bin` trailer) into the details Streamer attaches.
 * Details of other types are skipped; bytes that are not a Status give
 * empty details rather than an error.
 */
export function decodeStatusDetails(bytes: Uint8Array): StatusDetails {
  const details: StatusDetails = { metadata: {}, fieldViolations: [] };
  let status: RpcStatus;
  try {
    status = RpcStatus.decode(bytes);
  } catch {
    return details;
  }
  for (const any of status.details) {
    const type = any.typeUrl.startsWith(TYPE_PREFIX) ? any.typeUrl.slice(TYPE_PREFIX.length) : any.typeUrl;
    try {
      switch (type) {
        case "google.rpc.ErrorInfo": {
          const info = ErrorInfo.decode(any.value);
          details.reason = info.reason || undefined;
          details.domain = info.domain || undefined;
          details.metadata = { ...info.metadata };
          break;
        }
        case "google.rpc.BadRequest":
          for (const violation of BadRequest.decode(any.value).fieldViolations) {
            details.fieldViolations.push({
              field: violation.field,
              description: violation.description,
              ...(violation.reason ? { reason: violation.reason } : {}),
            });
          }
          break;
        case "google.rpc.RetryInfo": {
          const delay = RetryInfo.decode(any.value).retryDelay;
          if (delay) {
            details.retryDelayMs = delay.seconds * 1000 + Math.round(delay.nanos / 1e6);
          }
          break;
        }
      }
    } catch {
      // A detail that does not decode is left out; the rest still count.
    }
  }
  return details;
}

/**
 * A failed call to Streamer. `code` is the gRPC status code (compare with
 * `status` of `@grpc/grpc-js`, re-exported here as `GrpcStatus`), `details`
 * the server's message, and `reason` etc. the machine-readable details
 * Streamer attaches (`undefined` / empty when the server sent none).
 */
export class StreamerError extends Error implements StatusDetails {
  override readonly name = "StreamerError";
  /** The gRPC status code, e.g. `GrpcStatus.NOT_FOUND` (5). */
  readonly code: Status;
  /** The gRPC status code's name, e.g. `NOT_FOUND`. */
  readonly codeName: string;
  /** The server's message. */
  readonly details: string;
  readonly reason?: ErrorReasonName | (string & {});
  readonly domain?: string;
  readonly metadata: Record<string, string>;
  readonly fieldViolations: FieldViolation[];
  readonly retryDelayMs?: number;
  /** The call's trailers, when there were any. */
  readonly trailers?: Metadata;

  constructor(code: Status, details: string, trailers?: Metadata, options?: { cause?: unknown }) {
    const codeName = Status[code] ?? `CODE_${code}`;
    super(`${codeName}: ${details}`, options);
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.trailers = trailers;
    const raw = trailers?.get(STATUS_DETAILS_TRAILER)[0];
    const decoded = raw instanceof Uint8Array ? decodeStatusDetails(raw) : undefined;
    this.reason = decoded?.reason;
    this.domain = decoded?.domain;
    this.metadata = decoded?.metadata ?? {};
    this.fieldViolations = decoded?.fieldViolations ?? [];
    this.retryDelayMs = decoded?.retryDelayMs;
  }

  /** Whether trying the same call again later may succeed. */
  get transient(): boolean {
    return TRANSIENT.has(this.code);
  }
}

const TRANSIENT = new Set([Status.UNAVAILABLE, Status.ABORTED, Status.DEADLINE_EXCEEDED, Status.RESOURCE_EXHAUSTED]);

function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number" && "details" in error;
}

/** A gRPC error as a `StreamerError`; anything else unchanged. */
export function toStreamerError(error: unknown): unknown {
  if (error instanceof StreamerError || !isServiceError(error)) {
    return error;
  }
  return new StreamerError(error.code, error.details, error.metadata, { cause: error });
}

/**
 * Thrown by a router's or a processor's handler to choose the error code the
 * client sees (`{"code": ..., "message": ...}`), with optional details.
 */
export class HandlerError extends Error {
  override name = "HandlerError";
  /** Whether a processor's failure should be queued again (see `RetryableError`). */
  readonly retryable: boolean = false;

  constructor(
    /** A stable, machine-readable code, e.g. `INVALID_PAYLOAD`. */
    readonly code: string,
    message: string,
    /** Sent along as the error's `details`. */
    readonly details?: JsonObject,
  ) {
    super(message);
  }
}

/**
 * A processor's failure worth another attempt: the request is queued again
 * while attempts remain (`FailRequest.retryable`).
 */
export class RetryableError extends HandlerError {
  override name = "RetryableError";
  override readonly retryable = true;

  constructor(code: string, message: string, details?: JsonObject) {
    super(code, message, details);
  }
}

const CODE = /^[A-Z][A-Z0-9_]*$/;

/** The code, message and details a handler's thrown `error` is reported with. */
export function describeFailure(error: unknown, fallbackCode: string): {
  code: string;
  message: string;
  details?: JsonObject;
  retryable: boolean;
} {
  if (error instanceof HandlerError) {
    return { code: error.code, message: error.message, details: error.details, retryable: error.retryable };
  }
  const code = (error as { code?: unknown } | null)?.code;
  const message = error instanceof Error ? error.message : String(error);
  return { code: typeof code === "string" && CODE.test(code) ? code : fallbackCode, message, retryable: false };
}
