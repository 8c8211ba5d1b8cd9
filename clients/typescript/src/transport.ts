import {
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientUnaryCall,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";
import { toStreamerError } from "./errors";

/** How a client reaches Streamer. */
export interface ClientOptions {
  /**
   * A service token, sent as `authorization: Bearer <token>` on every call
   * (for a deployment that runs with `--trust token`). A function is asked
   * before each call, so a token can be rotated.
   */
  token?: string | (() => string);
  /**
   * TLS: `true` verifies the server against the system's roots; give `ca`
   * (PEM) for a private CA, and `cert` and `key` (PEM) to present a client
   * certificate (`--trust mtls`). Without it (and without `credentials`),
   * the channel is plaintext.
   */
  tls?: boolean | { ca?: Buffer | string; cert?: Buffer | string; key?: Buffer | string };
  /** Channel credentials of your own; they take precedence over `tls`. */
  credentials?: ChannelCredentials;
  /** Options for the gRPC channel (merged over keepalive defaults). */
  channelOptions?: ChannelOptions;
  /** Deadline of each unary call, in milliseconds (default 30 s). */
  timeoutMs?: number;
}

/** Per-call options. */
export interface CallOptions {
  /** This call's deadline, in milliseconds (default: the client's `timeoutMs`). */
  timeoutMs?: number;
  /** Extra metadata, e.g. W3C trace context (`traceparent`). */
  metadata?: Record<string, string>;
  /** Cancels the call. */
  signal?: AbortSignal;
}

// Keepalive pings find a dead server on an otherwise idle stream (a router's
// Receive, a processor's Claim).
const CHANNEL_DEFAULTS: ChannelOptions = {
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.http2.max_pings_without_data": 0,
};

function pem(value: Buffer | string | undefined): Buffer | null {
  return value === undefined ? null : Buffer.isBuffer(value) ? value : Buffer.from(value);
}

export function channelCredentials(options: ClientOptions): ChannelCredentials {
  if (options.credentials) {
    return options.credentials;
  }
  const tls = options.tls;
  if (!tls) {
    return grpcCredentials.createInsecure();
  }
  if (tls === true) {
    return grpcCredentials.createSsl();
  }
  return grpcCredentials.createSsl(pem(tls.ca), pem(tls.key), pem(tls.cert));
}

export function channelOptions(options: ClientOptions): ChannelOptions {
  return { ...CHANNEL_DEFAULTS, ...options.channelOptions };
}

type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** What every client shares: the token, the default deadline, how to call. */
export class Transport {
  constructor(private readonly options: ClientOptions) {}

  /** The metadata of a call: the bearer token, then `extra`. */
  metadata(extra?: Record<string, string>): Metadata {
    const metadata = new Metadata();
    const token = typeof this.options.token === "function" ? this.options.token() : this.options.token;
    if (token) {
      metadata.set("authorization", `Bearer ${token}`);
    }
    for (const [key, value] of Object.entries(extra ?? {})) {
      metadata.set(key.toLowerCase(), value);
    }
    return metadata;
  }

  deadline(timeoutMs?: number): Date {
    return new Date(Date.now() + (timeoutMs ?? this.options.timeoutMs ?? 30_000));
  }

  /** Calls a unary method; rejects with a `StreamerError`. */
  unary<Req, Res>(method: Unary<Req, Res>, request: Req, options: CallOptions = {}): Promise<Res> {
    return new Promise((resolve, reject) => {
      if (options.signal?.aborted) {
        reject(options.signal.reason);
        return;
      }
      const onAbort = () => call.cancel();
      const call = method(
        request,
        this.metadata(options.metadata),
        { deadline: this.deadline(options.timeoutMs) },
        (error, response) => {
          options.signal?.removeEventListener("abort", onAbort);
          if (error) {
            reject(toStreamerError(error));
          } else {
            resolve(response);
          }
        },
      );
      options.signal?.addEventListener("abort", onAbort, { once: true });
    });
  }
}
