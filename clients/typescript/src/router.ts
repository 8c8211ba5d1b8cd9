import type { ConnectionsClient } from "./connections";
import { describeFailure, HandlerError } from "./errors";
import type { Identity } from "./gen/streamer/v1/common";
import type { InboundMessage, ReceiveResponse, RouterRegistered } from "./gen/streamer/v1/connection";
import { type Json, type JsonObject, toJson } from "./json";
import { RegisteredStream } from "./registered";

/** A frame a client sent for one of the router's actions. */
export interface InboundRequest {
  /** The connection it came from (the response goes back there). */
  connectionId: string;
  /** The connection's verified identity. */
  identity: Identity;
  action: string;
  /** The frame's `id`; the response carries it as `request_id`. */
  requestId: string;
  /** The frame's `payload` (`null` when absent). */
  payload: Json;
  /** The frame's `metadata` (`{}` when absent). */
  metadata: JsonObject;
  receivedAt?: Date;
  /** W3C trace context of the span that routed the frame (empty when tracing is off). */
  traceContext: Record<string, string>;
  /** The message as received. */
  raw: InboundMessage;
}

/**
 * Answers one frame. What it returns (or resolves with) is the client's
 * `{"type":"response","request_id":...,"success":true,"data":...}`; what it
 * throws is the protocol's error message,
 * `{"type":"error","request_id":...,"error":{"code":...,"message":...}}`, with
 * the code of a `HandlerError` (otherwise `INTERNAL_ERROR`).
 */
export type RouterHandler = (request: InboundRequest) => unknown;

export interface RouterOptions {
  /** The actions this router answers, e.g. `["echo"]`. */
  actions: string[];
  handler: RouterHandler;
  /** A name for logs and metrics. */
  routerId?: string;
  /**
   * Told about what goes wrong outside the handler's answer: the stream
   * breaking (it is opened again), a response that could not be sent, a
   * handler throwing something other than a `HandlerError`. By default
   * written to stderr.
   */
  onError?: (error: unknown, request?: InboundRequest) => void;
  /** Reconnection delays: capped exponential backoff with jitter. */
  backoff?: { initialMs?: number; capMs?: number };
}

/**
 * A router: holds a `Receive` stream open (opening it again with capped,
 * jittered backoff when it breaks) and answers each frame with its handler.
 * Made by `ConnectionsClient.router()`.
 */
export class Router {
  /**
   * Resolves once Streamer has registered the router for its actions (the
   * stream's first message): from then on, clients' frames for them reach
   * it. Rejects when the router stops before that (closed, or a fatal error
   * such as INVALID_ARGUMENT or PERMISSION_DENIED).
   */
  readonly ready: Promise<RouterRegistered>;
  /** Resolves when the router has stopped (after `close()` or a fatal error). */
  readonly done: Promise<void>;

  private readonly stopping = new AbortController();
  private readonly inFlight = new Set<Promise<void>>();

  constructor(
    private readonly connections: ConnectionsClient,
    private readonly options: RouterOptions,
  ) {
    const stream = new RegisteredStream<ReceiveResponse, RouterRegistered>({
      open: () =>
        connections.raw.receive(
          { actions: options.actions, routerId: options.routerId ?? "" },
          connections.transport.metadata(),
        ),
      registration: (response) =>
        response.event?.$case === "registered" ? response.event.registered : undefined,
      onMessage: (response) => {
        if (response.event?.$case === "message") {
          this.dispatch(response.event.message);
        }
      },
      onBroken: (error) => this.report(error),
      onFatal: (error) => {
        this.report(error);
        this.stopping.abort();
      },
      endedMessage: "the Receive stream ended; opening it again",
      closedMessage: "the router was closed before it was registered",
      backoff: options.backoff,
      stopping: this.stopping.signal,
    });
    this.ready = stream.ready;
    this.done = stream.done;
  }

  /** Stops receiving, then waits for the handlers still running. */
  async close(): Promise<void> {
    this.stopping.abort();
    await this.done;
    await Promise.allSettled([...this.inFlight]);
  }

  private report(error: unknown, request?: InboundRequest): void {
    if (this.options.onError) {
      this.options.onError(error, request);
    } else {
      const about = request ? ` (action ${request.action}, request ${request.requestId})` : "";
      console.error(`streamer router${about}:`, error instanceof Error ? error.message : error);
    }
  }

  private dispatch(message: InboundMessage): void {
    const request: InboundRequest = {
      connectionId: message.connectionId,
      identity: message.identity ?? { userId: "", tenantId: "", permissions: [], topics: [] },
      action: message.action,
      requestId: message.requestId,
      payload: message.payload === undefined ? null : (message.payload as Json),
      metadata: (message.metadata ?? {}) as JsonObject,
      receivedAt: message.receivedAt,
      traceContext: { ...message.traceContext },
      raw: message,
    };
    const task = this.answer(request).finally(() => this.inFlight.delete(task));
    this.inFlight.add(task);
  }

  private async answer(request: InboundRequest): Promise<void> {
    let response: JsonObject;
    try {
      const data = await this.options.handler(request);
      response = { type: "response", request_id: request.requestId, success: true, data: toJson(data) };
    } catch (error) {
      if (!(error instanceof HandlerError)) {
        this.report(error, request);
      }
      const failure = describeFailure(error, "INTERNAL_ERROR");
      response = {
        type: "error",
        request_id: request.requestId,
        error: {
          code: failure.code,
          message: failure.message,
          ...(failure.details ? { details: toJson(failure.details) } : {}),
        },
      };
    }
    try {
      await this.connections.send(request.connectionId, response, {
        tenantId: request.identity.tenantId || undefined,
        metadata: request.traceContext,
      });
    } catch (error) {
      this.report(error, request);
    }
  }
}
