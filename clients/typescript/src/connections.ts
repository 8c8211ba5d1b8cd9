import type { Payload as PayloadMessage } from "./gen/streamer/v1/common";
import {
  type BroadcastRequest,
  type BroadcastResponse,
  type Connection,
  ConnectionServiceClient,
  type PublishResponse,
  type Sequence,
  type SubscribeResponse,
  type Subscription,
  type DeliveryOutcome,
} from "./gen/streamer/v1/connection";
import { toJson } from "./json";
import { Router, type RouterOptions } from "./router";
import { type CallOptions, channelCredentials, channelOptions, type ClientOptions, Transport } from "./transport";

/** Raw text for a socket, written as one text frame unchanged (see `text()`). */
export class Text {
  constructor(readonly text: string) {}
}

/**
 * Wraps `value` so that it is written to the socket as one text frame
 * exactly as given, instead of as JSON (a JSON object's keys arrive sorted;
 * a string of your own keeps your order).
 */
export function text(value: string): Text {
  return new Text(value);
}

/**
 * What a socket is sent: any JSON value (written as its compact JSON
 * serialization), `text(...)` for raw text, or bytes (a binary frame).
 */
export type Data = unknown;

/** The protobuf `Payload` for `data` (see `Data`). */
export function toPayload(data: Data): PayloadMessage {
  if (data instanceof Text) {
    return { body: { $case: "text", text: data.text } };
  }
  if (data instanceof Uint8Array) {
    return { body: { $case: "binary", binary: Buffer.from(data.buffer, data.byteOffset, data.byteLength) } };
  }
  return { body: { $case: "json", json: toJson(data) } };
}

export interface SendOptions extends CallOptions {
  /** When set, a connection of another tenant is NOT_FOUND. */
  tenantId?: string;
  /** Makes the delivery idempotent: retried, it reaches the socket at most once. */
  sequence?: Sequence;
}

/** Whom a broadcast reaches. */
export type BroadcastTarget =
  /** These connections (at most 10,000), optionally only those of `tenantId`. */
  | { connectionIds: string[]; tenantId?: string }
  /** Every connection of one user of a tenant. */
  | { tenantId: string; userId: string }
  /** Every connection of a tenant. */
  | { tenantId: string };

export interface PublishOptions extends CallOptions {
  tenantId: string;
  topic: string;
  /** The message's `data`: any JSON value, or `text(...)` (sent as a JSON string). */
  data: Data;
  /** For conflated topics: only the latest message of each key waits for a slow socket. */
  key?: string;
}

export interface SubscriptionTarget {
  tenantId: string;
  topic: string;
  /** One connection of the tenant... */
  connectionId?: string;
  /** ...or every connection the user has open now. Exactly one is required. */
  userId?: string;
}

export interface ListOptions extends CallOptions {
  /** Items per page (1..=1000; default 100). */
  pageSize?: number;
}

/**
 * ConnectionService: deliver to connections, manage topics, find and
 * disconnect connections, and (with `router()`) answer clients' frames.
 *
 * ```ts
 * const connections = new ConnectionsClient("127.0.0.1:50052");
 * await connections.send(connectionId, { type: "notice", text: "hello" });
 * ```
 */
export class ConnectionsClient {
  /** The generated grpc-js client, for anything this class does not wrap. */
  readonly raw: ConnectionServiceClient;
  /** @internal */
  readonly transport: Transport;

  constructor(target: string, options: ClientOptions = {}) {
    this.raw = new ConnectionServiceClient(target, channelCredentials(options), channelOptions(options));
    this.transport = new Transport(options);
  }

  /**
   * Writes `data` to one connection's socket. Resolves with the outcome
   * (`DELIVERED`, or `GONE`, `THROTTLED`, `UNAVAILABLE`); a connection with
   * no record rejects with NOT_FOUND.
   */
  async send(connectionId: string, data: Data, options: SendOptions = {}): Promise<DeliveryOutcome> {
    const response = await this.transport.unary(
      this.raw.send.bind(this.raw),
      {
        connectionId,
        payload: toPayload(data),
        tenantId: options.tenantId ?? "",
        sequence: options.sequence,
      },
      options,
    );
    return response.outcome;
  }

  /** Writes `data` to every connection of `target`; resolves with the counts (and, for ids, each outcome). */
  broadcast(target: BroadcastTarget, data: Data, options: CallOptions = {}): Promise<BroadcastResponse> {
    let request: BroadcastRequest;
    const payload = toPayload(data);
    if ("connectionIds" in target) {
      request = {
        target: { $case: "connections", connections: { ids: target.connectionIds } },
        payload,
        tenantId: target.tenantId ?? "",
      };
    } else if ("userId" in target) {
      request = {
        target: { $case: "user", user: { tenantId: target.tenantId, userId: target.userId } },
        payload,
        tenantId: "",
      };
    } else {
      request = { target: { $case: "tenant", tenant: { tenantId: target.tenantId } }, payload, tenantId: "" };
    }
    return this.transport.unary(this.raw.broadcast.bind(this.raw), request, options);
  }

  /**
   * Publishes a message to a topic of a tenant; every subscribed socket gets
   * `{"type":"message","topic":...,"epoch":...,"offset":...,"data":...}`.
   */
  publish(options: PublishOptions): Promise<PublishResponse> {
    return this.transport.unary(
      this.raw.publish.bind(this.raw),
      { tenantId: options.tenantId, topic: options.topic, payload: toPayload(options.data), key: options.key ?? "" },
      options,
    );
  }

  /** Subscribes a connection, or every connection a user has open, to a topic. */
  subscribe(target: SubscriptionTarget, options: CallOptions = {}): Promise<SubscribeResponse> {
    return this.transport.unary(
      this.raw.subscribe.bind(this.raw),
      { tenantId: target.tenantId, topic: target.topic, target: subscriptionTarget(target) },
      options,
    );
  }

  /** Ends subscriptions; resolves with the connections no longer subscribed. */
  async unsubscribe(target: SubscriptionTarget, options: CallOptions = {}): Promise<string[]> {
    const response = await this.transport.unary(
      this.raw.unsubscribe.bind(this.raw),
      { tenantId: target.tenantId, topic: target.topic, target: subscriptionTarget(target) },
      options,
    );
    return response.connectionIds;
  }

  /** Whether a connection is open now. */
  async isActive(connectionId: string, options: CallOptions = {}): Promise<boolean> {
    const response = await this.transport.unary(this.raw.isActive.bind(this.raw), { connectionId }, options);
    return response.active;
  }

  /** One connection's record; NOT_FOUND when there is none (in `tenantId`, when given). */
  async getConnection(
    connectionId: string,
    options: CallOptions & { tenantId?: string } = {},
  ): Promise<Connection> {
    const response = await this.transport.unary(
      this.raw.getConnection.bind(this.raw),
      { connectionId, tenantId: options.tenantId ?? "" },
      options,
    );
    if (!response.connection) {
      throw new TypeError("GetConnection answered without a connection");
    }
    return response.connection;
  }

  /**
   * A tenant's connections, or one user's, in connection-id order, fetched a
   * page at a time as you iterate:
   *
   * ```ts
   * for await (const connection of connections.listConnections({ tenantId: "acme" })) { ... }
   * ```
   */
  async *listConnections(
    filter: { tenantId: string; userId?: string },
    options: ListOptions = {},
  ): AsyncGenerator<Connection, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.transport.unary(
        this.raw.listConnections.bind(this.raw),
        { tenantId: filter.tenantId, userId: filter.userId ?? "", page: { pageSize: options.pageSize ?? 0, pageToken } },
        options,
      );
      yield* page.connections;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** A topic's subscriptions, or one connection's, fetched a page at a time as you iterate. */
  async *listSubscriptions(
    selector: { tenantId: string; topic: string } | { tenantId: string; connectionId: string },
    options: ListOptions = {},
  ): AsyncGenerator<Subscription, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.transport.unary(
        this.raw.listSubscriptions.bind(this.raw),
        {
          tenantId: selector.tenantId,
          selector:
            "topic" in selector
              ? { $case: "topic", topic: selector.topic }
              : { $case: "connectionId", connectionId: selector.connectionId },
          page: { pageSize: options.pageSize ?? 0, pageToken },
        },
        options,
      );
      yield* page.subscriptions;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Closes a connection's socket with `reason` and removes its record. */
  async disconnect(
    connectionId: string,
    options: CallOptions & { reason?: string; tenantId?: string } = {},
  ): Promise<void> {
    await this.transport.unary(
      this.raw.disconnect.bind(this.raw),
      { connectionId, reason: options.reason ?? "", tenantId: options.tenantId ?? "" },
      options,
    );
  }

  /**
   * Starts a router for `options.actions`: every frame a client sends for one
   * of them is passed to `options.handler`, and what it returns is the
   * client's `response`. Await `router.ready` before relying on it.
   */
  router(options: RouterOptions): Router {
    return new Router(this, options);
  }

  /** Closes the channel. */
  close(): void {
    this.raw.close();
  }
}

function subscriptionTarget(
  target: SubscriptionTarget,
): { $case: "connectionId"; connectionId: string } | { $case: "userId"; userId: string } | undefined {
  if (target.connectionId !== undefined && target.userId !== undefined) {
    throw new TypeError("give connectionId or userId, not both");
  }
  if (target.connectionId !== undefined) {
    return { $case: "connectionId", connectionId: target.connectionId };
  }
  if (target.userId !== undefined) {
    return { $case: "userId", userId: target.userId };
  }
  return undefined;
}
