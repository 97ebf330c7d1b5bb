import type { Hono } from "hono";
import { createDataset, deleteDataset, getDataset, listDatasets } from "../../services/datasets/datasets.js";
import { PayloadTooLargeError } from "../../services/errors.js";
import type { AppEnv } from "../env.js";
import { requestBodyStream } from "../incoming.js";
import { operation } from "../openapi.js";
import { datasetBody } from "../presenters.js";
import { HttpProblem } from "../problems.js";

export function datasetRoutes(app: Hono<AppEnv>): void {
  operation(app, "createDataset", async (c, req) => {
    const ctx = c.get("ctx");
    const length = Number(c.req.header("content-length"));
    if (!Number.isFinite(length)) {
      throw new HttpProblem(400, "length-required", "dataset uploads need a Content-Length header");
    }
    if (length > ctx.limits.maxDatasetBytes) {
      throw new PayloadTooLargeError(
        `the upload is ${length} bytes; the limit is ${ctx.limits.maxDatasetBytes} bytes`,
        { limit_bytes: ctx.limits.maxDatasetBytes },
      );
    }
    const dataset = await createDataset({
      ctx,
      principal: c.get("principal"),
      input: {
        name: req.query.name,
        format: req.query.format,
        contentType: c.req.header("content-type") ?? "",
        body: requestBodyStream(c),
      },
    });
    c.header("Location", `/v1/datasets/${dataset.id}`);
    return c.json(datasetBody(dataset), 201);
  });

  operation(app, "listDatasets", async (c, req) => {
    const page = await listDatasets({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { limit: req.query?.limit ?? 50, cursor: req.query?.cursor },
    });
    return c.json({ items: page.items.map(datasetBody), next_cursor: page.nextCursor });
  });

  operation(app, "getDataset", async (c, req) =>
    c.json(
      datasetBody(await getDataset({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path })),
    ),
  );

  operation(app, "deleteDataset", async (c, req) => {
    await deleteDataset({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.body(null, 204);
  });
}
