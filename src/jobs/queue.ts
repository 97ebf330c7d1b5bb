import PgBoss from "pg-boss";
import type { Database, DatabaseHandle } from "../db/client.js";
import type { Logger } from "../logger.js";
import { positionalSql } from "./sql.js";

export type QueueName = "merge" | "train";
export const QUEUE_NAMES: QueueName[] = ["merge", "train"];

/**
 * Retry and liveness, applied by pg-boss to each job as it is sent (not as queue settings, which
 * every process would overwrite with its own); handlers hold no retry logic.
 */
export interface QueuePolicy {
  retryLimit: number;
  retryDelaySeconds: number;
  /**
   * A running job's lease: its worker renews it every quarter of this while the job runs,
   * however long that is; a job whose lease runs out (its worker died or hangs) is failed by the
   * queue's maintenance and retried, or handed to `workAbandoned` after its last attempt.
   */
  leaseSeconds: number;
}

export interface QueuedJob {
  id: string;
  /** Attempts before this one. */
  retryCount: number;
  retryLimit: number;
  /** Fired when the worker stops before the job finishes, or the job's lease was lost. */
  signal: AbortSignal;
}

export type JobHandler = (job: QueuedJob) => Promise<void>;

/**
 * Where pg-boss puts a job of `queue` once its attempts are spent - its last attempt failed, or
 * expired because its worker died - for `workAbandoned`.
 */
function abandonedQueue(queue: QueueName): string {
  return `${queue}-abandoned`;
}

/**
 * The longest an attempt may run: pg-boss's ceiling on a job's expiry (under 24 hours), which its
 * worker enforces on the handler whatever the lease (`holdLease`).
 */
export const MAX_RUN_SECONDS = 24 * 3600 - 1;

/** How long an aborted handler gets, after the drain, to delete what it wrote and fail its attempt. */
const ABORT_GRACE_MS = 10_000;

/**
 * The job queue: pg-boss on the service's own database (Postgres, or PGlite through the same
 * SQL adapter), so a job can be enqueued in the transaction that records it.
 */
export class JobQueue {
  private readonly boss: PgBoss;
  /** The jobs running in this process, by id. */
  private readonly active = new Map<string, AbortController>();
  /** pg-boss's ids of this process's workers, by queue. */
  private readonly workers = new Map<QueueName, string[]>();
  /** pg-boss's queries in flight: it completes and fails jobs without awaiting them. */
  private readonly queries = new Set<Promise<unknown>>();
  private started: Promise<void> | null = null;
  /** Periodic tasks (`repeat`): their timers, and their runs in progress. */
  private readonly timers: NodeJS.Timeout[] = [];
  private readonly repeating = new Set<Promise<void>>();
  /** What to release once the workers have stopped (`afterStop`). */
  private readonly releases: (() => Promise<void>)[] = [];
  private stopped = false;

  private readonly policy: QueuePolicy;

  constructor(
    private readonly database: DatabaseHandle,
    options: {
      policy: QueuePolicy;
      /** How often jobs whose lease ran out are failed (and so retried) and old ones archived. */
      maintenanceIntervalSeconds: number;
    },
    private readonly logger: Logger,
  ) {
    this.policy = options.policy;
    this.boss = new PgBoss({
      db: { executeSql: (text, values) => this.track(database.executeSql(text, values)) },
      supervise: true,
      schedule: false,
      maintenanceIntervalSeconds: options.maintenanceIntervalSeconds,
      monitorStateIntervalSeconds: 60,
    });
    this.boss.on("error", (err) => logger.error("job queue error", { error: err }));
  }

  /** Creates the pg-boss schema and the queues; idempotent. Jobs carry their own policy. */
  start(): Promise<void> {
    this.started ??= (async () => {
      await this.boss.start();
      for (const name of QUEUE_NAMES.flatMap((q) => [q, abandonedQueue(q)])) {
        if (!(await this.boss.getQueue(name))) await this.boss.createQueue(name);
      }
    })();
    return this.started;
  }

  /** Enqueues job `jobId` inside the caller's transaction: it commits or rolls back with it. */
  async enqueue(tx: Database, queue: QueueName, jobId: string): Promise<void> {
    await this.start();
    await this.boss.send(
      queue,
      { jobId },
      {
        id: jobId,
        retryLimit: this.policy.retryLimit,
        retryDelay: this.policy.retryDelaySeconds,
        retryBackoff: true,
        expireInSeconds: MAX_RUN_SECONDS,
        deadLetter: abandonedQueue(queue),
        db: {
          executeSql: async (text, values) => {
            const result = (await tx.execute(positionalSql(text, values))) as unknown as { rows: unknown[] };
            return { rows: result.rows };
          },
        },
      },
    );
  }

  /**
   * Tells this process's workers of `queue`, if any, to fetch now rather than at their next poll
   * (call it once the job's transaction has committed). Workers elsewhere poll.
   */
  wake(queue: QueueName): void {
    for (const id of this.workers.get(queue) ?? []) this.boss.notifyWorker(id);
  }

  /** Removes a job that no worker has picked up yet (no-op otherwise). */
  async cancel(queue: QueueName, jobId: string): Promise<void> {
    await this.start();
    await this.boss.cancel(queue, jobId);
  }

  /** Runs `handler` for the queue's jobs, `concurrency` at a time in this process. */
  async work(queue: QueueName, concurrency: number, handler: JobHandler): Promise<void> {
    await this.start();
    for (let i = 0; i < concurrency; i++) {
      const id = await this.boss.work<{ jobId: string }>(
        queue,
        { batchSize: 1, pollingIntervalSeconds: 0.5, includeMetadata: true },
        async ([job]) => {
          if (!job) return;
          // Fetched while this worker stopped: failing it hands it to another worker.
          if (this.stopped) throw new Error("worker shutting down");
          const controller = new AbortController();
          this.active.set(job.id, controller);
          const releaseLease = this.holdLease(queue, job.id, controller);
          try {
            await handler({
              id: job.id,
              retryCount: job.retryCount,
              retryLimit: job.retryLimit,
              signal: controller.signal,
            });
          } finally {
            releaseLease();
            this.active.delete(job.id);
          }
        },
      );
      this.workers.set(queue, [...(this.workers.get(queue) ?? []), id]);
    }
  }

  /**
   * Runs `handler` with the id of each job of `queue` whose attempts are all spent, one at a time.
   * Every attempt of such a job threw, or stopped without settling it (its worker died).
   */
  async workAbandoned(queue: QueueName, handler: (jobId: string) => Promise<void>): Promise<void> {
    await this.start();
    await this.boss.work<{ jobId: string }>(
      abandonedQueue(queue),
      { batchSize: 1, pollingIntervalSeconds: 2 },
      async ([job]) => {
        if (job) await handler(job.data.jobId);
      },
    );
  }

  /**
   * Runs `task` every `intervalMs` (first at once) until the queue stops, which waits for a run
   * in progress. A failure is logged; the next run comes as planned.
   */
  repeat(name: string, intervalMs: number, task: () => Promise<void>): void {
    let running: Promise<void> = Promise.resolve();
    const run = () => {
      if (this.stopped) return;
      running = task().catch((err: unknown) => this.logger.warn(`${name} failed`, { error: err }));
      this.repeating.add(running);
      void running.finally(() => this.repeating.delete(running));
    };
    run();
    const timer = setInterval(run, intervalMs);
    timer.unref();
    this.timers.push(timer);
  }

  /** Runs `release` (closing what this process's workers share) at the end of `stop`. */
  afterStop(release: () => Promise<void>): void {
    this.releases.push(release);
  }

  /**
   * Stops fetching, lets running jobs finish for up to `drainMs`, then aborts the rest (each
   * deletes what it wrote and fails its attempt, so that another worker retries it) and waits
   * until no query of the queue is in flight, so that the database can be closed. Idempotent.
   */
  async stop(drainMs: number): Promise<void> {
    if (this.stopped || !this.started) return;
    this.stopped = true;
    for (const timer of this.timers) clearInterval(timer);
    await Promise.allSettled(this.repeating);
    await this.started;
    for (const queue of QUEUE_NAMES) {
      await this.boss.offWork(queue);
      await this.boss.offWork(abandonedQueue(queue));
    }
    await this.whileActive(drainMs);
    for (const [id, controller] of this.active) {
      this.logger.warn("job interrupted by shutdown; it will be retried", { job_id: id });
      controller.abort(new Error("worker shutting down"));
    }
    await this.whileActive(ABORT_GRACE_MS);
    // Fails whatever is still active here: a handler that did not stop within the grace period.
    await this.boss.stop({ graceful: false, close: false, wait: true });
    // A settled query's continuation may issue the next one (a finished handler's completion);
    // it has done so by the time the event loop turns.
    while (this.queries.size > 0) {
      await Promise.allSettled(this.queries);
      await new Promise((r) => setImmediate(r));
    }
    await Promise.allSettled(this.releases.map((release) => release()));
  }

  /**
   * Renews a running job's lease now and every quarter of the lease, so that it never runs out
   * while this worker lives. A renewal that finds the job no longer active (its lease ran out
   * anyway: a stall longer than the lease) aborts the handler, since another attempt may start.
   * pg-boss expires a job at `started_on + expire_in` (its maintenance: a dead worker's job), but
   * its worker also fails a handler still running `expire_in` after the fetch, so `expire_in`
   * stays `MAX_RUN_SECONDS` and the lease moves `started_on` instead. Returns the release, called
   * once the handler has returned: a renewal still in flight then may land after the job's
   * completion and find it no longer active, which is not a lost lease.
   */
  private holdLease(queue: QueueName, id: string, controller: AbortController): () => void {
    let held = true;
    const renew = () =>
      this.track(
        this.database.executeSql(
          `UPDATE pgboss.job SET started_on = now() + $3 * interval '1 second' - expire_in
           WHERE name = $1 AND id = $2 AND state = 'active' RETURNING id`,
          [queue, id, this.policy.leaseSeconds],
        ),
      ).then(
        ({ rows }) => {
          if (rows.length > 0 || !held || controller.signal.aborted) return;
          this.logger.warn("job lease lost; stopping this attempt", { job_id: id });
          controller.abort(new Error("the job's lease ran out"));
        },
        (err: unknown) => this.logger.warn("renewing a job's lease failed", { job_id: id, error: err }),
      );
    void renew();
    const timer = setInterval(renew, (this.policy.leaseSeconds * 1000) / 4);
    timer.unref();
    return () => {
      held = false;
      clearInterval(timer);
    };
  }

  private async whileActive(ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    while (this.active.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  }

  private track<T>(query: Promise<T>): Promise<T> {
    this.queries.add(query);
    const settled = () => this.queries.delete(query);
    query.then(settled, settled);
    return query;
  }
}
