import type { Hono } from "hono";
import { streamSSE } from "hono/streaming";
import {
  createPopulation,
  finishPopulation,
  getPopulation,
  listPopulations,
} from "../../services/populations/populations.js";
import { getRound, memberWeights, submitMember } from "../../services/populations/rounds.js";
import type { AppEnv } from "../env.js";
import { requestBodyStream } from "../incoming.js";
import { operation } from "../openapi.js";
import { jobBody, populationBody, roundBody, submissionBody } from "../presenters.js";
import { EVENTS_MAX_MS, HEARTBEAT_MS } from "./jobs.js";

/** How often an event stream reads its population. */
const EVENTS_POLL_MS = 250;

export function populationRoutes(app: Hono<AppEnv>): void {
  operation(app, "createPopulation", async (c, req) => {
    const b = req.body;
    const population = await createPopulation({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: {
        name: b.name,
        size: b.size,
        method: b.method,
        alpha: b.alpha,
        seed: b.seed,
        quorum: b.quorum,
        roundTimeoutSeconds: b.round_timeout_seconds,
        initialCheckpointId: b.initial_checkpoint_id,
      },
    });
    c.header("Location", `/v1/populations/${population.id}`);
    return c.json(populationBody(population), 201);
  });

  operation(app, "listPopulations", async (c, req) => {
    const page = await listPopulations({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { limit: req.query?.limit ?? 50, cursor: req.query?.cursor },
    });
    return c.json({ items: page.items.map(populationBody), next_cursor: page.nextCursor });
  });

  operation(app, "getPopulation", async (c, req) => {
    const population = await getPopulation({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: req.path,
    });
    return c.json(populationBody(population));
  });

  operation(app, "finishPopulation", async (c, req) => {
    const { job, created } = await finishPopulation({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: req.path,
    });
    c.header("Location", `/v1/jobs/${job.id}`);
    return c.json(jobBody(job), created ? 202 : 200);
  });

  operation(app, "getPopulationRound", async (c, req) => {
    const round = await getRound({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { ...req.path, waitSeconds: req.query?.wait },
    });
    return c.json(roundBody(round));
  });

  operation(app, "submitPopulationMember", async (c, req) => {
    const json = (c.req.header("content-type") ?? "").toLowerCase().startsWith("application/json");
    const length = c.req.header("content-length");
    const { submission, created } = await submitMember({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: {
        ...req.path,
        ...(json && req.body
          ? { checkpointId: req.body.checkpoint_id }
          : {
              upload: {
                body: requestBodyStream(c),
                declaredBytes: length === undefined ? undefined : Number(length),
              },
            }),
      },
    });
    return c.json(submissionBody(submission), created ? 201 : 200);
  });

  operation(app, "getPopulationMemberWeights", async (c, req) => {
    const id = await memberWeights({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.redirect(`/v1/checkpoints/${id}/weights`, 302);
  });

  operation(app, "getPopulationEvents", async (c, req) => {
    const ctx = c.get("ctx");
    const principal = c.get("principal");
    const read = () => getPopulation({ ctx, principal, input: { id: req.path.id, currentOnly: true } });
    let population = await read();
    const close = ctx.jobWatch.openStream(principal.tenantId);
    return streamSSE(c, async (stream) => {
      const until = Date.now() + EVENTS_MAX_MS;
      let sent = "";
      let wrote = Date.now();
      try {
        for (;;) {
          const data = JSON.stringify(populationBody(population));
          if (data !== sent) {
            await stream.writeSSE({ event: "population", data });
            sent = data;
            wrote = Date.now();
          } else if (Date.now() - wrote >= HEARTBEAT_MS) {
            // A comment keeps a quiet stream from counting as an idle connection.
            await stream.write(": keep-alive\n\n");
            wrote = Date.now();
          }
          const ended = population.status === "finished" || population.status === "failed";
          if (ended || stream.aborted || Date.now() > until) return;
          await stream.sleep(EVENTS_POLL_MS);
          population = await read();
        }
      } finally {
        close();
      }
    });
  });
}
