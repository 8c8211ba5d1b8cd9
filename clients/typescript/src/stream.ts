import type { ClientReadableStream } from "@grpc/grpc-js";
import { toStreamerError } from "./errors";

/**
 * A server stream as an async iterator: yields its messages, throws a
 * `StreamerError` when it fails, and cancels the call when the loop stops
 * early.
 */
export async function* iterate<T>(call: ClientReadableStream<T>): AsyncGenerator<T, void, undefined> {
  const queue: T[] = [];
  let finished = false;
  let failure: unknown;
  let wake: (() => void) | undefined;
  call.on("data", (message: T) => {
    queue.push(message);
    wake?.();
  });
  call.on("error", (error) => {
    failure = toStreamerError(error);
    finished = true;
    wake?.();
  });
  call.on("end", () => {
    finished = true;
    wake?.();
  });
  try {
    for (;;) {
      const next = queue.shift();
      if (next !== undefined) {
        yield next;
      } else if (finished) {
        if (failure !== undefined) {
          throw failure;
        }
        return;
      } else {
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = undefined;
      }
    }
  } finally {
    if (!finished) {
      call.cancel();
    }
  }
}
