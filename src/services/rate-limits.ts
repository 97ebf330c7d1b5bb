import {
  type RateLimiterAbstract,
  RateLimiterDrizzle,
  RateLimiterMemory,
  RateLimiterRes,
} from "rate-limiter-flexible";
import { type Database, schema } from "../db/client.js";
import { TooManyRequestsError } from "./errors.js";

export interface RateLimitSettings {
  /** Requests one API key may make per minute, on all API instances together; 0: no limit. */
  requestsPerKeyPerMinute: number;
  /** Requests with a wrong key one client address may make per minute before it is shut out; 0: no limit. */
  authFailuresPerMinute: number;
}

/** How long an address that passed its wrong-key allowance is refused every authenticated request. */
const LOCKOUT_SECONDS = 5 * 60;

/**
 * The request rate limits, with rate-limiter-flexible: per API key, and on requests with a wrong
 * key per client address. On Postgres the counters live in the database (`rate_limits`), so the
 * limits hold across API instances; a key past its limit is then refused by each instance from
 * memory until its minute is over, without a query. PGlite serves one process: counters in memory.
 */
export class RateLimits {
  private readonly requests: RateLimiterAbstract | null;
  private readonly authFailures: RateLimiterAbstract | null;

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
    this.requests = limiter("key", settings.requestsPerKeyPerMinute, 0);
    this.authFailures = limiter("auth", settings.authFailuresPerMinute, LOCKOUT_SECONDS);
  }

  /** Counts a request made with an API key; 429 past the key's rate. */
  async countRequest(apiKeyId: string): Promise<void> {
    try {
      await this.requests?.consume(apiKeyId);
    } catch (err) {
      throw asTooMany(err, "this API key made more requests this minute than its limit");
    }
  }

  /** 429 when the address is shut out for its wrong keys. */
  async assertNotShutOut(address: string): Promise<void> {
    const limiter = this.authFailures;
    const state = await limiter?.get(address);
    if (limiter && state && state.consumedPoints > limiter.points) {
      throw asTooMany(state, "too many requests with a wrong API key came from this address");
    }
  }

  /** Counts a request with a wrong key; past the allowance the address is shut out (429). */
  async countAuthFailure(address: string): Promise<void> {
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
