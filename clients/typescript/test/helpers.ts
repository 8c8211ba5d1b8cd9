import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import WebSocket from "ws";
import type { ConnectionsClient } from "@streamer/client";

/** How long any single wait in these tests may take. */
export const WAIT_MS = 10_000;

export function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run the end-to-end tests through test.sh (scripts/with-streamer)`);
  }
  return value;
}

export const TENANT = "acme";

/** A fresh user id, so that tests never see each other's connections. */
export function uniqueUser(): string {
  return `user-${randomUUID()}`;
}

/** A fresh action name, so that tests never share routers or processors. */
export function uniqueAction(prefix: string): string {
  return `${prefix}_${randomUUID().slice(0, 8)}`;
}

/** A client token minted with the system's development key. */
export function mintToken(sub: string, tenant = TENANT): string {
  return execFileSync(
    env("STREAMER_BIN"),
    ["token", "--data-dir", env("STREAMER_DATA_DIR"), "--sub", sub, "--tenant", tenant],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
  ).trim();
}

/** Rejects with `what` timed out unless `promise` settles within `ms`. */
export function within<T>(promise: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export interface Frame {
  raw: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  json: any;
}

/** A WebSocket client whose frames can be awaited, in order. */
export class Client {
  private readonly frames: Frame[] = [];
  private readonly waiters = new Set<() => void>();
  readonly closed: Promise<{ code: number; reason: string }>;

  private constructor(
    private readonly ws: WebSocket,
    readonly userId: string,
    readonly connectionId: string,
  ) {
    ws.on("message", (data, isBinary) => {
      const raw = isBinary ? `binary:${(data as Buffer).toString("hex")}` : data.toString();
      let json: unknown;
      try {
        json = isBinary ? undefined : JSON.parse(raw);
      } catch {
        json = undefined;
      }
      this.frames.push({ raw, json });
      for (const wake of this.waiters) {
        wake();
      }
    });
    this.closed = new Promise((resolve) => {
      ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() }));
    });
  }

  /** Connects as `userId` and finds the connection's id. */
  static async connect(connections: ConnectionsClient, userId = uniqueUser()): Promise<Client> {
    const ws = new WebSocket(`${env("STREAMER_WS_URL")}?Authorization=${mintToken(userId)}`);
    await within(
      new Promise<void>((resolve, reject) => {
        ws.once("open", () => resolve());
        ws.once("error", reject);
      }),
      "the WebSocket to open",
    );
    const known = new Set<string>();
    for await (const connection of connections.listConnections({ tenantId: TENANT, userId })) {
      known.add(connection.connectionId);
    }
    const mine = [...known].filter((id) => !Client.taken.has(id));
    if (mine.length !== 1) {
      ws.close();
      throw new Error(`expected one new connection of ${userId}, found ${mine.length}`);
    }
    Client.taken.add(mine[0]);
    return new Client(ws, userId, mine[0]);
  }

  private static readonly taken = new Set<string>();

  send(frame: unknown): void {
    this.ws.send(JSON.stringify(frame));
  }

  /** The next frame (in arrival order, not yet taken) that `match` accepts. */
  async next(match: (json: any, raw: string) => boolean, what: string, ms = WAIT_MS): Promise<Frame> {
    const find = (): Frame | undefined => {
      const index = this.frames.findIndex((frame) => match(frame.json, frame.raw));
      return index < 0 ? undefined : this.frames.splice(index, 1)[0];
    };
    let wake: (() => void) | undefined;
    try {
      return await within(
        new Promise<Frame>((resolve) => {
          const check = () => {
            const frame = find();
            if (frame) {
              resolve(frame);
            }
          };
          wake = check;
          this.waiters.add(check);
          check();
        }),
        what,
        ms,
      );
    } finally {
      if (wake) {
        this.waiters.delete(wake);
      }
    }
  }

  /** Every frame received and not yet taken. */
  pending(): Frame[] {
    return [...this.frames];
  }

  close(): void {
    this.ws.close();
  }
}
