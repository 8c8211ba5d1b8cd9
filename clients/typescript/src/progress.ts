import type { Identity } from "./gen/streamer/v1/common";
import {
  type ClientRequestRef,
  ProgressServiceClient,
  type Request,
  type SubmitResponse,
} from "./gen/streamer/v1/progress";
import { type JsonObject, toJson, toJsonObject } from "./json";
import { Processor, type ProcessorOptions } from "./processor";
import { iterate } from "./stream";
import { type CallOptions, channelCredentials, channelOptions, type ClientOptions, Transport } from "./transport";

export interface SubmitOptions {
  /** Required: the connection of the client that asked. */
  connectionId: string;
  /** Required: the action, e.g. `generate_report`. */
  action: string;
  /** The client's id for the request; generated when absent. */
  requestId?: string;
  /** Any JSON value. */
  payload?: unknown;
  metadata?: JsonObject;
}

/** A request by its server id, or by the client's id within its user. */
export type RequestSelector = string | ClientRequestRef;

/** Restricts a call to requests of this identity. */
export type Owner = Pick<Identity, "tenantId" | "userId">;

/** Why a request failed, as a processor reports it. */
export interface Failure {
  /** A stable, machine-readable code, e.g. `TIMEOUT`. */
  code: string;
  message: string;
  details?: JsonObject;
}

/**
 * ProgressService: submit, inspect, watch and cancel long-running requests,
 * and (with `processor()`) run them.
 */
export class ProgressClient {
  /** The generated grpc-js client, for anything this class does not wrap. */
  readonly raw: ProgressServiceClient;
  /** @internal */
  readonly transport: Transport;

  constructor(target: string, options: ClientOptions = {}) {
    this.raw = new ProgressServiceClient(target, channelCredentials(options), channelOptions(options));
    this.transport = new Transport(options);
  }

  /**
   * Queues a request for the client on `connectionId` (it is sent
   * `acknowledgment`, then progress and the outcome). Idempotent on the
   * user and `requestId`: a repeat resolves with `duplicate: true`.
   */
  async submit(request: SubmitOptions, options: CallOptions = {}): Promise<{ request: Request; duplicate: boolean }> {
    const response: SubmitResponse = await this.transport.unary(
      this.raw.submit.bind(this.raw),
      {
        connectionId: request.connectionId,
        action: request.action,
        requestId: request.requestId ?? "",
        payload: request.payload === undefined ? undefined : toJson(request.payload),
        metadata: toJsonObject(request.metadata),
      },
      options,
    );
    return { request: required(response.request, "Submit"), duplicate: response.duplicate };
  }

  /**
   * A request's current state. `deliverToConnectionId` moves its later
   * updates to that connection (a client that reconnected).
   */
  async get(
    selector: RequestSelector,
    options: CallOptions & { owner?: Owner; deliverToConnectionId?: string } = {},
  ): Promise<Request> {
    const response = await this.transport.unary(
      this.raw.get.bind(this.raw),
      {
        selector: toSelector(selector),
        owner: toIdentity(options.owner),
        deliverToConnectionId: options.deliverToConnectionId ?? "",
      },
      options,
    );
    return required(response.request, "Get");
  }

  /** Cancels a request that has not finished; its processor is told. */
  async cancel(id: string, options: CallOptions & { reason?: string; owner?: Owner } = {}): Promise<Request> {
    const response = await this.transport.unary(
      this.raw.cancel.bind(this.raw),
      { id, reason: options.reason ?? "", owner: toIdentity(options.owner) },
      options,
    );
    return required(response.request, "Cancel");
  }

  /**
   * The request's state now, then every change until it finishes (the
   * iterator then ends). Breaking out of the loop cancels the watch.
   */
  async *watch(
    selector: RequestSelector,
    options: Omit<CallOptions, "timeoutMs"> & { owner?: Owner; timeoutMs?: number } = {},
  ): AsyncGenerator<Request, void, undefined> {
    const call = this.raw.watch(
      { selector: toSelector(selector), owner: toIdentity(options.owner) },
      this.transport.metadata(options.metadata),
      options.timeoutMs === undefined ? {} : { deadline: this.transport.deadline(options.timeoutMs) },
    );
    const onAbort = () => call.cancel();
    options.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const response of iterate(call)) {
        yield required(response.request, "Watch");
      }
    } finally {
      options.signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Completes a request the caller holds the lease of (a processor of your own). */
  async complete(id: string, processorId: string, result: unknown, options: CallOptions = {}): Promise<Request> {
    const response = await this.transport.unary(
      this.raw.complete.bind(this.raw),
      { id, processorId, result: toJson(result) },
      options,
    );
    return required(response.request, "Complete");
  }

  /** Fails a request the caller holds the lease of; `retryable` queues it again while attempts remain. */
  async fail(
    id: string,
    processorId: string,
    failure: Failure,
    options: CallOptions & { retryable?: boolean } = {},
  ): Promise<Request> {
    const response = await this.transport.unary(
      this.raw.fail.bind(this.raw),
      {
        id,
        processorId,
        error: { code: failure.code, message: failure.message, details: toJsonObject(failure.details, "details") },
        retryable: options.retryable ?? false,
      },
      options,
    );
    return required(response.request, "Fail");
  }

  /**
   * Starts a processor for `options.actions`: it claims work, runs
   * `options.handler` for each request, and completes or fails it with the
   * outcome. Await `processor.ready` before relying on it.
   */
  processor(options: ProcessorOptions): Processor {
    return new Processor(this, options);
  }

  /** Closes the channel. */
  close(): void {
    this.raw.close();
  }
}

function toSelector(
  selector: RequestSelector,
): { $case: "id"; id: string } | { $case: "client"; client: ClientRequestRef } {
  return typeof selector === "string"
    ? { $case: "id", id: selector }
    : {
        $case: "client",
        client: { tenantId: selector.tenantId, userId: selector.userId, requestId: selector.requestId },
      };
}

function toIdentity(owner: Owner | undefined): Identity | undefined {
  return owner && { tenantId: owner.tenantId, userId: owner.userId, permissions: [], topics: [] };
}

function required<T>(value: T | undefined, method: string): T {
  if (value === undefined) {
    throw new TypeError(`${method} answered without a request`);
  }
  return value;
}
