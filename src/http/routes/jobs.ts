import type { Context, Hono } from "hono";
import { streamSSE } from "hono/streaming";
import type { TenantCall } from "../../services/context.js";
import { cancelJob, FINISHED, getJob, type Job, listJobs } from "../../services/jobs/jobs.js";
import { createMergeJob } from "../../services/merges/merges.js";
import { createTrainingJob } from "../../services/trainings/trainings.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { jobBody } from "../presenters.js";

/** How often the event stream looks at the job, and how long it may stay open. */
const EVENTS_POLL_MS = 250;
const EVENTS_MAX_MS = 60 * 60 * 1000;

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
    const call = { ctx: c.get("ctx"), principal: c.get("principal"), input: req.path };
    let job = await getJob(call); // 404 before the stream starts
    return streamSSE(c, async (stream) => {
      const until = Date.now() + EVENTS_MAX_MS;
      let sent = "";
      for (;;) {
        const body = JSON.stringify(jobBody(job));
        const state = `${job.status}/${job.progress}`;
        if (state !== sent) {
          await stream.writeSSE({ event: "job", data: body, id: String(job.updatedAt.getTime()) });
          sent = state;
        }
        if (FINISHED.includes(job.status) || stream.aborted || Date.now() > until) return;
        await stream.sleep(EVENTS_POLL_MS);
        job = await getJob(call);
      }
    });
  });
}
