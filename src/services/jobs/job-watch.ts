import { inArray } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import type { Logger } from "../../logger.js";
import { TooManyRequestsError } from "../errors.js";
import type { Job } from "./jobs.js";

/** How often followed jobs are read. */
const POLL_MS = 250;
/** How long a tenant at its stream cap is told to wait. */
const STREAMS_RETRY_SECONDS = 10;

interface Followed {
  /** `updatedAt` of the last state the followers were told of. */
  seen: number;
  listeners: Set<(job: Job) => void>;
}

/**
 * Follows jobs for event streams: every 250 ms one query reads all the jobs any stream follows,
 * however many streams follow each, and each follower hears of a job when it changes. A tenant
 * may have `maxStreamsPerTenant` streams open on this instance (429 beyond).
 */
export class JobWatch {
  private readonly followed = new Map<string, Followed>();
  private readonly streams = new Map<string, number>();
  private timer: NodeJS.Timeout | null = null;
  private polling = false;

  constructor(
    private readonly db: Database,
    private readonly maxStreamsPerTenant: number,
    private readonly logger: Logger,
  ) {}

  /**
   * Counts an event stream of the tenant's (of any resource) as open: 429 when it has its most
   * open already. Returns how to count it closed.
   */
  openStream(tenantId: string): () => void {
    const open = this.streams.get(tenantId) ?? 0;
    if (open >= this.maxStreamsPerTenant) {
      throw new TooManyRequestsError(
        `the tenant has ${open} event streams open, the most it may have; close one first`,
        STREAMS_RETRY_SECONDS,
        { limit: this.maxStreamsPerTenant },
      );
    }
    this.streams.set(tenantId, open + 1);
    return () => {
      const left = (this.streams.get(tenantId) ?? 1) - 1;
      if (left === 0) this.streams.delete(tenantId);
      else this.streams.set(tenantId, left);
    };
  }

  /** Requests waiting for a job of this process to finish (`finished`), by the callback that wakes one. */
  private readonly waiters = new Set<() => void>();

  /** Tells the requests waiting in this process that a job finished here (`finishJob`, after its commit). */
  finished(): void {
    for (const wake of this.waiters) wake();
  }

  /**
   * Resolves when a job of this process finishes, or after `ms`: a waiting request reads its
   * state again then, at once when the job ran here, and at its poll interval when it ran elsewhere.
   */
  nextFinish(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.waiters.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.waiters.add(wake);
    });
  }

  /** Calls `listener` with the job each time it changes after `job`; returns how to stop. */
  follow(job: Job, listener: (job: Job) => void): () => void {
    const close = this.openStream(job.tenantId);
    const entry = this.followed.get(job.id) ?? { seen: job.updatedAt.getTime(), listeners: new Set() };
    entry.listeners.add(listener);
    this.followed.set(job.id, entry);
    if (!this.timer) {
      this.timer = setInterval(() => void this.poll(), POLL_MS);
      this.timer.unref(); // open streams keep their connections, not the process, alive
    }
    let stopped = false;
    return () => {
      if (stopped) return;
      stopped = true;
      close();
      entry.listeners.delete(listener);
      if (entry.listeners.size === 0) this.followed.delete(job.id);
      if (this.followed.size === 0 && this.timer) {
        clearInterval(this.timer);
        this.timer = null;
      }
    };
  }

  private async poll(): Promise<void> {
    if (this.polling || this.followed.size === 0) return;
    this.polling = true;
    try {
      const rows = await this.db
        .select()
        .from(schema.jobs)
        .where(inArray(schema.jobs.id, [...this.followed.keys()]));
      for (const job of rows) {
        const entry = this.followed.get(job.id);
        if (!entry || job.updatedAt.getTime() === entry.seen) continue;
        entry.seen = job.updatedAt.getTime();
        for (const listener of entry.listeners) listener(job);
      }
    } catch (err) {
      this.logger.warn("reading followed jobs failed", { error: err });
    } finally {
      this.polling = false;
    }
  }
}
