/** Capped exponential backoff with ±25% jitter. */
export class Backoff {
  private current: number;

  constructor(
    private readonly initialMs = 250,
    private readonly capMs = 10_000,
  ) {
    this.current = initialMs;
  }

  reset(): void {
    this.current = this.initialMs;
  }

  next(): number {
    const delay = this.current * (0.75 + Math.random() * 0.5);
    this.current = Math.min(this.current * 2, this.capMs);
    return delay;
  }
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
