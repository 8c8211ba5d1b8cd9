import { type ClientWritableStream, status as GrpcStatus } from "@grpc/grpc-js";
import { Backoff, sleep } from "./backoff";
import { describeFailure, HandlerError, StreamerError, toStreamerError } from "./errors";
import type { Identity } from "./gen/streamer/v1/common";
import {
  CancelReason,
  type ClaimResponse,
  type ProcessorRegistered,
  ReportRejectionReason,
  type ReportRequest,
  type ReportResponse,
  type Request,
} from "./gen/streamer/v1/progress";
import { type Json, type JsonObject, toJson, toJsonObject } from "./json";
import type { ProgressClient } from "./progress";
import { RegisteredStream } from "./registered";

/** Why a job's `signal` was aborted (its `reason`). */
export type JobAbortKind =
  /** The request was cancelled (`ClaimResponse.cancelled`, reason CANCELLED). */
  | "cancelled"
  /** This processor's lease lapsed and Streamer took the request back. */
  | "lease_lapsed"
  /** The request already finished without this job (a notice, or a refused report). */
  | "already_finished"
  /** Another processor holds the request now (a notice, or a refused report). */
  | "lease_not_held"
  /** The same request was handed to this processor again; the new attempt runs. */
  | "superseded"
  /** The processor was closed. */
  | "shutdown";

/** The `reason` of an aborted job's `signal`. */
export class JobAborted extends Error {
  override name = "JobAborted";

  constructor(readonly kind: JobAbortKind) {
    super(`the job was aborted: ${kind.replace(/_/g, " ")}`);
  }
}

/** One attempt at one request, as a processor's handler gets it. */
export interface Job {
  /** The request's server id. */
  id: string;
  /** The client's id for it. */
  requestId: string;
  action: string;
  /** The request's payload, plain JSON (`null` when none). */
  payload: Json;
  /** The request's metadata (`{}` when none). */
  metadata: JsonObject;
  /** The verified identity of the client that asked. */
  identity: Identity;
  connectionId: string;
  /** Which attempt this is (1 for the first). */
  attempts: number;
  /** W3C trace context of the span that accepted the request. */
  traceContext: Record<string, string>;
  /** The request as claimed. */
  request: Request;
  /**
   * Aborted when the job must stop: cancelled, taken back by Streamer, or
   * the processor is closing. Its `reason` is a `JobAborted`. After that,
   * nothing more is sent for the job, whatever the handler returns.
   */
  signal: AbortSignal;
  /**
   * Reports progress (0..=100), which the client sees as `progress` (and
   * which renews the lease). Does nothing once `signal` is aborted.
   */
  report(percentage: number, message?: string, metadata?: JsonObject): void;
}

/**
 * Runs one request. Its value (any JSON) completes the request; a thrown
 * error fails it, with the code of a `HandlerError` (otherwise `INTERNAL`),
 * queued again when it is a `RetryableError`.
 */
export type ProcessorHandler = (job: Job) => unknown;

export interface ProcessorOptions {
  /** A stable name for this processor instance, e.g. `reports-1`. */
  processorId: string;
  /** The actions it runs. */
  actions: string[];
  handler: ProcessorHandler;
  /** How many requests it holds at once (Streamer's default: 1). */
  maxInFlight?: number;
  /** The lease, in seconds (Streamer's default: 30); every report renews it. */
  leaseSeconds?: number;
  /**
   * Told about what goes wrong outside a handler's outcome: the Claim stream
   * breaking (it is opened again), a Complete or Fail that failed, a handler
   * throwing something other than a `HandlerError`. By default written to
   * stderr.
   */
  onError?: (error: unknown, job?: Job) => void;
  /** Reconnection delays: capped exponential backoff with jitter. */
  backoff?: { initialMs?: number; capMs?: number };
  /**
   * A job's reports go up one `Report` stream, which tells which reports were
   * refused only when it ends: after this long (default 5 s) the next
   * report starts a new stream, so a refusal aborts the job soon.
   */
  reportWindowMs?: number;
}

/** What each reason of a cancel notice aborts a job with (an unknown one: "cancelled"). */
const ABORT_KIND: Partial<Record<CancelReason, JobAbortKind>> = {
  [CancelReason.CANCELLED]: "cancelled",
  [CancelReason.LEASE_LAPSED]: "lease_lapsed",
  [CancelReason.FINISHED]: "already_finished",
  [CancelReason.LEASE_NOT_HELD]: "lease_not_held",
};
const TRANSIENT = new Set([GrpcStatus.UNAVAILABLE, GrpcStatus.DEADLINE_EXCEEDED]);
/** How long a finished job waits for its last Report stream's answer. */
const REPORT_CLOSE_TIMEOUT_MS = 10_000;

/**
 * A processor: holds a `Claim` stream open (opening it again with capped,
 * jittered backoff when it breaks), runs the handler for each request it
 * is given, and completes or fails the request with the outcome. Made by
 * `ProgressClient.processor()`.
 */
export class Processor {
  /**
   * Resolves once Streamer has registered the processor (the stream's first
   * message): from then on `Submit` accepts its actions and their work
   * reaches it. Rejects when the processor stops before that.
   */
  readonly ready: Promise<ProcessorRegistered>;
  /** Resolves when the processor has stopped claiming (after `close()` or a fatal error). */
  readonly done: Promise<void>;

  /** @internal */
  readonly stopping = new AbortController();
  private readonly jobs = new Map<string, RunningJob>();
  private readonly inFlight = new Set<Promise<void>>();

  constructor(
    /** @internal */ readonly progress: ProgressClient,
    /** @internal */ readonly options: ProcessorOptions,
  ) {
    const stream = new RegisteredStream<ClaimResponse, ProcessorRegistered>({
      open: () =>
        progress.raw.claim(
          {
            processorId: options.processorId,
            actions: options.actions,
            maxInFlight: options.maxInFlight ?? 0,
            leaseSeconds: options.leaseSeconds ?? 0,
          },
          progress.transport.metadata(),
        ),
      registration: (response) =>
        response.item?.$case === "registered" ? response.item.registered : undefined,
      onMessage: (response) => {
        const item = response.item;
        if (item?.$case === "work") {
          this.start(item.work);
        } else if (item?.$case === "cancelled") {
          this.jobs.get(item.cancelled)?.abort(ABORT_KIND[response.cancelReason] ?? "cancelled");
        }
      },
      onBroken: (error) => this.report(error),
      onFatal: (error) => {
        this.report(error);
        this.stopping.abort();
        for (const job of this.jobs.values()) {
          job.abort("shutdown");
        }
      },
      endedMessage: "the Claim stream ended; opening it again",
      closedMessage: "the processor was closed before it was registered",
      backoff: options.backoff,
      stopping: this.stopping.signal,
    });
    this.ready = stream.ready;
    this.done = stream.done;
  }

  /** How many jobs are running now. */
  get running(): number {
    return this.jobs.size;
  }

  /**
   * Stops claiming (Streamer hands unfinished work to another processor),
   * aborts every running job's signal, and waits for their handlers.
   */
  async close(): Promise<void> {
    this.stopping.abort();
    for (const job of this.jobs.values()) {
      job.abort("shutdown");
    }
    await this.done;
    await Promise.allSettled([...this.inFlight]);
  }

  /** @internal */
  report(error: unknown, job?: Job): void {
    if (this.options.onError) {
      this.options.onError(error, job);
    } else {
      const about = job ? ` (action ${job.action}, request ${job.id})` : "";
      console.error(`streamer processor${about}:`, error instanceof Error ? error.message : error);
    }
  }

  private start(request: Request): void {
    if (this.stopping.signal.aborted) {
      return;
    }
    // Handed to us again (the stream broke and was opened again): the new
    // attempt is the one that holds the lease.
    this.jobs.get(request.id)?.abort("superseded");
    const job = new RunningJob(this, request);
    this.jobs.set(request.id, job);
    const task = this.runJob(job).finally(() => {
      if (this.jobs.get(request.id) === job) {
        this.jobs.delete(request.id);
      }
      this.inFlight.delete(task);
    });
    this.inFlight.add(task);
  }

  private async runJob(job: RunningJob): Promise<void> {
    let outcome: { ok: true; value: unknown } | { ok: false; error: unknown };
    try {
      outcome = { ok: true, value: await this.options.handler(job.view) };
    } catch (error) {
      outcome = { ok: false, error };
    }
    // Every report is answered before the outcome, so that the client sees
    // the progress, and a refusal stops the job here.
    await job.closeReports();
    if (job.signal.aborted) {
      return;
    }
    const { id } = job.request;
    const processorId = this.options.processorId;
    const metadata = job.view.traceContext;
    try {
      if (outcome.ok) {
        const result = toJson(outcome.value);
        await this.retrying(() => this.progress.complete(id, processorId, result, { metadata }));
      } else {
        if (!(outcome.error instanceof HandlerError)) {
          this.report(outcome.error, job.view);
        }
        const failure = describeFailure(outcome.error, "INTERNAL");
        await this.retrying(() =>
          this.progress.fail(
            id,
            processorId,
            { code: failure.code, message: failure.message, details: failure.details },
            { retryable: failure.retryable, metadata },
          ),
        );
      }
    } catch (error) {
      this.report(error, job.view);
    }
  }

  /**
   * Calls `call` again while it fails transiently (5 attempts in all). A
   * retry told REQUEST_ALREADY_FINISHED means an earlier attempt went
   * through after all (its answer was lost): done.
   */
  private async retrying<T>(call: () => Promise<T>): Promise<T | undefined> {
    const backoff = new Backoff(200, 2_000);
    for (let attempt = 1; ; attempt++) {
      try {
        return await call();
      } catch (error) {
        if (attempt > 1 && error instanceof StreamerError && error.reason === "REQUEST_ALREADY_FINISHED") {
          return undefined;
        }
        if (
          !(error instanceof StreamerError) ||
          !TRANSIENT.has(error.code) ||
          attempt === 5 ||
          this.stopping.signal.aborted
        ) {
          throw error;
        }
      }
      await sleep(backoff.next(), this.stopping.signal);
    }
  }
}

/** A job's state: its abort controller and its Report streams. */
class RunningJob {
  readonly view: Job;
  private readonly controller = new AbortController();
  private stream?: ClientWritableStream<ReportRequest>;
  private streamOpenedAt = 0;
  private readonly answers = new Set<Promise<void>>();

  constructor(
    private readonly processor: Processor,
    readonly request: Request,
  ) {
    this.view = {
      id: request.id,
      requestId: request.requestId,
      action: request.action,
      payload: request.payload === undefined ? null : (request.payload as Json),
      metadata: (request.metadata ?? {}) as JsonObject,
      identity: request.identity ?? { userId: "", tenantId: "", permissions: [], topics: [] },
      connectionId: request.connectionId,
      attempts: request.attempts,
      traceContext: { ...request.traceContext },
      request,
      signal: this.controller.signal,
      report: (percentage, message, metadata) => this.report(percentage, message, metadata),
    };
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  abort(kind: JobAbortKind): void {
    if (!this.controller.signal.aborted) {
      this.controller.abort(new JobAborted(kind));
      this.stream?.end();
      this.stream = undefined;
    }
  }

  private report(percentage: number, message = "", metadata?: JsonObject): void {
    if (!(percentage >= 0 && percentage <= 100)) {
      throw new RangeError(`percentage must be from 0 to 100, not ${percentage}`);
    }
    const update: ReportRequest = {
      id: this.request.id,
      processorId: this.processor.options.processorId,
      percentage,
      message,
      metadata: toJsonObject(metadata),
    };
    if (this.signal.aborted) {
      return;
    }
    const window = this.processor.options.reportWindowMs ?? 5_000;
    if (this.stream && Date.now() - this.streamOpenedAt >= window) {
      this.stream.end();
      this.stream = undefined;
    }
    if (!this.stream) {
      this.stream = this.open();
      this.streamOpenedAt = Date.now();
    }
    this.stream.write(update);
  }

  /** Opens a Report stream, whose answer is checked for refusals when it ends. */
  private open(): ClientWritableStream<ReportRequest> {
    const progress = this.processor.progress;
    let stream!: ClientWritableStream<ReportRequest>;
    const answer = new Promise<void>((resolve) => {
      stream = progress.raw.report(
        progress.transport.metadata(this.view.traceContext),
        (error: unknown, response?: ReportResponse) => {
          if (error) {
            if (!this.signal.aborted) {
              this.processor.report(toStreamerError(error), this.view);
            }
          } else if (response) {
            this.refused(response);
          }
          resolve();
        },
      );
    });
    const tracked = answer.finally(() => this.answers.delete(tracked));
    this.answers.add(tracked);
    return stream;
  }

  private refused(response: ReportResponse): void {
    for (const rejection of response.rejections) {
      if (rejection.id !== this.request.id) {
        continue;
      }
      if (rejection.reason === ReportRejectionReason.ALREADY_FINISHED) {
        this.abort("already_finished");
      } else if (rejection.reason === ReportRejectionReason.LEASE_NOT_HELD) {
        this.abort("lease_not_held");
      }
    }
  }

  /** Ends the Report stream and waits (boundedly) for every answer. */
  async closeReports(): Promise<void> {
    this.stream?.end();
    this.stream = undefined;
    if (this.answers.size === 0) {
      return;
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, REPORT_CLOSE_TIMEOUT_MS);
    });
    await Promise.race([Promise.allSettled([...this.answers]), timeout]);
    clearTimeout(timer);
  }
}
