import {
  type RateLimiterAbstract,
  RateLimiterDrizzle,
  RateLimiterMemory,
  RateLimiterRes,
} from "rate-limiter-flexible";
import { type Database, schema } from "../db/client.js";
import { TooManyRequestsError } from "./errors.js";
import { RecentValues } from "./recent-values.js";

export interface RateLimitSettings {
  /** Requests one API key may make per minute, on all API instances together; 0: no limit. */
  requestsPerKeyPerMinute: number;
  /** Requests with a wrong key one client address may make per minute before it is shut out; 0: no limit. */
  authFailuresPerMinute: number;
}

/** How long an address that passed its wrong-key allowance is refused every authenticated request. */
const LOCKOUT_SECONDS = 5 * 60;

/**
 * How long an instance trusts that an address is not shut out before it reads the counter again
 * (another instance's lockout reaches it within this).
 */
export const SHUT_OUT_CHECK_MS = 1000;

/**
 * The request rate limits, with rate-limiter-flexible: per API key, and on requests with a wrong
 * key per client address. On Postgres the counters live in the database (`rate_limits`), so the
 * limits hold across API instances; a key past its limit is then refused by each instance from
 * memory until its minute is over, without a query. PGlite serves one process: counters in memory.
 *
 * Under load, a key's concurrent requests on one instance are counted together: one write per
 * key in flight at a time, which counts every request that came while the previous write was
 * out (exact: each is told its own place in the count). An address found not shut out is not
 * read again for SHUT_OUT_CHECK_MS.
 */
export class RateLimits {
  private readonly requests: CoalescedCounter | null;
  private readonly authFailures: RateLimiterAbstract | null;
  private readonly notShutOut = new RecentValues<string, true>(SHUT_OUT_CHECK_MS);

  constructor(db: Database, databaseKind: "postgres" | "pglite", settings: RateLimitSettings) {
    const limiter = (
      keyPrefix: string,
      points: number,
      blockDuration: number,
    ): RateLimiterAbstract | null => {
      if (points === 0) return null;
      const options = { keyPrefix, points, duration: 60, blockDuration };
      return databaseKind === "postgres"
        ? new RateLimiterDrizzle({
            ...options,
            storeClient: db,
            schema: schema.rateLimits,
            inMemoryBlockOnConsumed: points + 1,
          })
        : new RateLimiterMemory(options);
    };
    const requests = limiter("key", settings.requestsPerKeyPerMinute, 0);
    this.requests = requests && new CoalescedCounter(requests);
    this.authFailures = limiter("auth", settings.authFailuresPerMinute, LOCKOUT_SECONDS);
  }

  /** Counts a request made with an API key; 429 past the key's rate. */
  async countRequest(apiKeyId: string): Promise<void> {
    const refusal = await this.requests?.count(apiKeyId);
    if (refusal) throw asTooMany(refusal, "this API key made more requests this minute than its limit");
  }

  /** 429 when the address is shut out for its wrong keys. */
  async assertNotShutOut(address: string): Promise<void> {
    const limiter = this.authFailures;
    if (!limiter || this.notShutOut.get(address)) return;
    const state = await limiter.get(address);
    if (state && state.consumedPoints > limiter.points) {
      throw asTooMany(state, "too many requests with a wrong API key came from this address");
    }
    this.notShutOut.set(address, true);
  }

  /** Counts a request with a wrong key; past the allowance the address is shut out (429). */
  async countAuthFailure(address: string): Promise<void> {
    this.notShutOut.delete(address);
    try {
      await this.authFailures?.consume(address);
    } catch (err) {
      throw asTooMany(err, "too many requests with a wrong API key came from this address");
    }
  }
}

/** A limiter's refusal as a 429; its other errors (the database) pass on. */
function asTooMany(err: unknown, message: string): unknown {
  if (!(err instanceof RateLimiterRes)) return err;
  return new TooManyRequestsError(message, Math.max(1, err.msBeforeNext / 1000));
}

/** Requests of one key that one write counts; it starts when the key's previous write is done. */
interface Batch {
  size: number;
  /** The key's state after the write, and whether it went over the limit (resolved either way). */
  outcome: Promise<{ res: RateLimiterRes; exceeded: boolean }>;
}

/**
 * Counts requests against a limiter with at most one write per key in flight: requests that come
 * while a key's write is out join the next write, which consumes as many points as they are.
 */
class CoalescedCounter {
  private readonly keys = new Map<string, { writing: Promise<unknown>; next: Batch | null }>();

  constructor(private readonly limiter: RateLimiterAbstract) {}

  /** Counts one request: null within the limit, the limiter's state past it. */
  async count(key: string): Promise<RateLimiterRes | null> {
    const batch = this.keys.get(key)?.next ?? this.enqueue(key);
    const index = batch.size++;
    const { res, exceeded } = await batch.outcome;
    if (!exceeded) return null;
    // A key blocked in memory is refused without a write: its state counts none of these points.
    if (res.consumedPoints < batch.size) return res;
    const place = res.consumedPoints - batch.size + index + 1;
    return place > this.limiter.points ? res : null;
  }

  private enqueue(key: string): Batch {
    const previous = this.keys.get(key)?.writing ?? Promise.resolve();
    const batch: Batch = {
      size: 0,
      outcome: previous.then(async () => {
        const state = this.keys.get(key);
        if (state?.next === batch) state.next = null;
        try {
          return { res: await this.limiter.consume(key, batch.size), exceeded: false };
        } catch (err) {
          if (err instanceof RateLimiterRes) return { res: err, exceeded: true };
          throw err;
        }
      }),
    };
    const writing: Promise<unknown> = batch.outcome
      .catch(() => undefined)
      .then(() => {
        if (this.keys.get(key)?.writing === writing) this.keys.delete(key);
      });
    this.keys.set(key, { writing, next: batch });
    return batch;
  }
}
