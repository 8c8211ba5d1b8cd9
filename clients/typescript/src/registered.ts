import { type ClientReadableStream, status as GrpcStatus } from "@grpc/grpc-js";
import { Backoff, sleep } from "./backoff";
import { StreamerError, toStreamerError } from "./errors";

/** Errors that another attempt cannot fix: the stream is not opened again. */
const FATAL = new Set([
  GrpcStatus.INVALID_ARGUMENT,
  GrpcStatus.UNAUTHENTICATED,
  GrpcStatus.PERMISSION_DENIED,
  GrpcStatus.UNIMPLEMENTED,
]);

export interface RegisteredStreamOptions<M, R> {
  /** Opens the stream (again). */
  open(): ClientReadableStream<M>;
  /** The registration, when `message` is the stream's `registered` message. */
  registration(message: M): R | undefined;
  /** Every other message. */
  onMessage(message: M): void;
  /** Told when the stream ended or broke and is about to be opened again. */
  onBroken(error: unknown): void;
  /** Told once when an error no retry fixes stopped the stream for good. */
  onFatal(error: StreamerError): void;
  /** What `onBroken` is told when the stream ended without an error. */
  endedMessage: string;
  /** What `ready` rejects with when `stopping` aborts before the registration. */
  closedMessage: string;
  backoff?: { initialMs?: number; capMs?: number };
  /** Aborted to stop: the stream is cancelled and not opened again. */
  stopping: AbortSignal;
}

/**
 * A server stream that registers its caller (a router's `Receive`, a
 * processor's `Claim`), held open until `stopping` aborts: opened again,
 * with capped, jittered backoff, whenever it ends or breaks.
 */
export class RegisteredStream<M, R> {
  /**
   * Resolves at the stream's first `registered` message; rejects when it
   * stops before one (closed, or an error no retry fixes).
   */
  readonly ready: Promise<R>;
  /** Resolves when the stream has stopped for good. */
  readonly done: Promise<void>;

  private call?: ClientReadableStream<M>;
  private settleReady!: { resolve(value: R): void; reject(error: unknown): void };
  private isReady = false;

  constructor(private readonly options: RegisteredStreamOptions<M, R>) {
    this.ready = new Promise((resolve, reject) => {
      this.settleReady = { resolve, reject };
    });
    // Whoever does not await `ready` must not see an unhandled rejection.
    this.ready.catch(() => {});
    options.stopping.addEventListener("abort", () => this.call?.cancel(), { once: true });
    this.done = this.run();
  }

  private async run(): Promise<void> {
    const options = this.options;
    const backoff = new Backoff(options.backoff?.initialMs, options.backoff?.capMs);
    while (!options.stopping.aborted) {
      const call = options.open();
      this.call = call;
      if (options.stopping.aborted) {
        call.cancel();
      }
      const error = await new Promise<unknown>((resolve) => {
        let failure: unknown;
        call.on("data", (message: M) => {
          const registration = options.registration(message);
          if (registration === undefined) {
            options.onMessage(message);
            return;
          }
          backoff.reset();
          if (!this.isReady) {
            this.isReady = true;
            this.settleReady.resolve(registration);
          }
        });
        call.on("error", (e) => {
          failure = toStreamerError(e);
        });
        call.on("status", () => resolve(failure));
      });
      if (options.stopping.aborted) {
        break;
      }
      if (error instanceof StreamerError && FATAL.has(error.code)) {
        this.settleReady.reject(error);
        options.onFatal(error);
        return;
      }
      options.onBroken(error ?? new Error(options.endedMessage));
      await sleep(backoff.next(), options.stopping);
    }
    this.settleReady.reject(new Error(options.closedMessage));
  }
}
