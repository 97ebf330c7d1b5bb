import type { Context, Hono } from "hono";
import { streamSSE } from "hono/streaming";
import type { TenantCall } from "../../services/context.js";
import { cancelJob, FINISHED, followJob, getJob, type Job, listJobs } from "../../services/jobs/jobs.js";
import { createMergeJob } from "../../services/merges/merges.js";
import { createTrainingJob } from "../../services/trainings/trainings.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { jobBody } from "../presenters.js";

/** How long an event stream may stay open, and the most time between two of its writes. */
export const EVENTS_MAX_MS = 60 * 60 * 1000;
export const HEARTBEAT_MS = 15_000;

/** Creates a job from the body with the request's Idempotency-Key: 202 when new, 200 on a replay. */
async function jobCreation<P>(
  c: Context<AppEnv>,
  params: P,
  create: (
    call: TenantCall<{ params: P; idempotencyKey: string | undefined }>,
  ) => Promise<{ job: Job; created: boolean }>,
): Promise<Response> {
  const { job, created } = await create({
    ctx: c.get("ctx"),
    principal: c.get("principal"),
    input: { params, idempotencyKey: c.req.header("idempotency-key") },
  });
  c.header("Location", `/v1/jobs/${job.id}`);
  return c.json(jobBody(job), created ? 202 : 200);
}

export function jobRoutes(app: Hono<AppEnv>): void {
  operation(app, "createMerge", (c, req) => jobCreation(c, req.body, createMergeJob));
  operation(app, "createTraining", (c, req) => jobCreation(c, req.body, createTrainingJob));

  operation(app, "listJobs", async (c, req) => {
    const status = req.query?.status;
    const page = await listJobs({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { limit: req.query?.limit ?? 50, cursor: req.query?.cursor, status, kind: req.query?.kind },
    });
    return c.json({ items: page.items.map(jobBody), next_cursor: page.nextCursor });
  });

  operation(app, "getJob", async (c, req) => {
    return c.json(
      jobBody(await getJob({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path })),
    );
  });

  operation(app, "cancelJob", async (c, req) => {
    return c.json(
      jobBody(await cancelJob({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path })),
    );
  });

  operation(app, "getJobEvents", async (c, req) => {
    // The latest state, whether it is news, and how to wake the stream's wait for news.
    let latest: Job | null = null;
    let news = false;
    let wake: (() => void) | null = null;
    const { job, stop } = await followJob({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: {
        id: req.path.id,
        onChange: (changed) => {
          latest = changed;
          news = true;
          wake?.();
        },
      },
    });
    return streamSSE(c, async (stream) => {
      stream.onAbort(() => wake?.());
      const until = Date.now() + EVENTS_MAX_MS;
      let sent = "";
      try {
        for (;;) {
          const current = latest ?? job;
          news = false;
          const state = `${current.status}/${current.progress}`;
          if (state !== sent) {
            const data = JSON.stringify(jobBody(current));
            await stream.writeSSE({ event: "job", data, id: String(current.updatedAt.getTime()) });
            sent = state;
          }
          if (FINISHED.includes(current.status) || stream.aborted || Date.now() > until) return;
          if (news) continue;
          const woken = await new Promise<boolean>((resolve) => {
            const quiet = setTimeout(() => resolve(false), HEARTBEAT_MS);
            wake = () => {
              clearTimeout(quiet);
              resolve(true);
            };
          });
          wake = null;
          // A comment keeps a quiet stream from counting as an idle connection.
          if (!woken && !stream.aborted) await stream.write(": keep-alive\n\n");
        }
      } finally {
        stop();
      }
    });
  });
}
