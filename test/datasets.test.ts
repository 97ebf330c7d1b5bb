import { request as httpRequest } from "node:http";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cifar10Split } from "../src/ml/dataset-formats.js";
import { expectDocumented } from "./helpers/contract.js";
import { idx, idxFiles, images, uploadDataset } from "./helpers/datasets.js";
import { type Harness, listen, startHarness } from "./helpers/harness.js";
import { type JobBody, waitForJob } from "./helpers/jobs.js";

describe("uploaded datasets", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem", { worker: true });
  });
  afterAll(() => h.close());

  const upload = (query: string, files: Record<string, Buffer[]>) => uploadDataset(h, query, files);
  /** Trains on a dataset and returns the finished job. */
  const trainOn = async (dataset: string, body: object) => {
    const created = await h.request("/v1/trainings", {
      method: "POST",
      body: JSON.stringify({ dataset, ...body }),
      headers: { "Content-Type": "application/json" },
    });
    expect(created.status).toBe(202);
    return waitForJob(h, ((await created.json()) as JobBody).id, 60_000);
  };

  it("accepts IDX files, describes them, and trains on them", async () => {
    const train = images(90, 0);
    const test = images(30, 1);
    const res = await upload("name=bands&format=idx", {
      train_images: [gzipSync(train.images)],
      train_labels: [train.labels],
      test_images: [test.images],
      test_labels: [test.labels],
    });
    expect(res.status).toBe(201);
    const dataset = (await expectDocumented("createDataset", res)) as { id: string };
    expect(dataset).toMatchObject({
      name: "bands",
      format: "idx",
      shape: [8, 8, 1],
      classes: 3,
      train_count: 90,
      test_count: 30,
    });
    await expectDocumented("getDataset", await h.request(`/v1/datasets/${dataset.id}`));
    const list = (await expectDocumented("listDatasets", await h.request("/v1/datasets"))) as {
      items: { id: string }[];
    };
    expect(list.items.map((d) => d.id)).toContain(dataset.id);

    const job = await trainOn(dataset.id, {
      model: { kind: "mlp", hidden: [16] },
      population: { size: 2, variant: "papa-all", every_k_epochs: 1 },
      optimizer: { lr: 0.1 },
      epochs: 3,
      batch_size: 16,
    });
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    expect(job.params).toMatchObject({ base_augmentation: false }); // digits: no crop and flip
    const result = job.result as unknown as { members: { accuracy: number }[] };
    for (const m of result.members) expect(m.accuracy).toBeGreaterThan(0.6);

    expect((await h.request(`/v1/datasets/${dataset.id}`, { method: "DELETE" })).status).toBe(204);
    expect(await h.ctx.store.list(`tenants/${h.tenantA}/datasets/`)).toEqual([]);
  });

  it("accepts CIFAR-10 binary batches", async () => {
    const record = (label: number) => Buffer.concat([Buffer.from([label]), Buffer.alloc(3072, label * 20)]);
    const res = await upload("name=tiny-cifar&format=cifar10", {
      train: [Buffer.concat([record(1), record(2)]), Buffer.concat([record(3)])],
      test: [Buffer.concat([record(4)])],
    });
    expect(res.status).toBe(201);
    const dataset = (await res.json()) as { id: string };
    expect(dataset).toMatchObject({ shape: [32, 32, 3], classes: 10, train_count: 3, test_count: 1 });

    // Natural images: the base augmentation (crop and flip) is on unless the request turns it off.
    const train = (extra: object) =>
      trainOn(dataset.id, {
        model: { kind: "mlp", hidden: [4] },
        population: { size: 2, variant: "papa-2", every_k_epochs: 1 },
        epochs: 2,
        batch_size: 2,
        ...extra,
      });
    const cropped = await train({});
    expect(cropped.status, JSON.stringify(cropped.problem)).toBe("succeeded");
    expect(cropped.params).toMatchObject({ base_augmentation: true });
    expect((await train({ base_augmentation: false })).params).toMatchObject({ base_augmentation: false });
  });

  it.each([
    ["a missing file", "format=idx", { train_images: [images(3, 0).images] }, 422, "train_labels"],
    [
      "a truncated IDX file",
      "format=idx",
      { ...idxFiles(), train_images: [images(3, 0).images.subarray(0, 20)] },
      422,
      "dimensions say",
    ],
    [
      "labels that do not match the images",
      "format=idx",
      { ...idxFiles(), train_labels: [idx([2], [0, 1])] },
      422,
      "3 images but 2 labels",
    ],
    [
      "a CIFAR-10 file of partial records",
      "format=cifar10",
      { train: [Buffer.alloc(100)], test: [Buffer.alloc(3073)] },
      422,
      "whole number",
    ],
    ["an unknown format", "format=parquet", idxFiles(), 400, "format"],
    [
      "a file in a field the format does not take",
      "format=idx",
      { ...idxFiles(), extra: [Buffer.from("x")] },
      422,
      "not extra",
    ],
    [
      "a gzip file whose content passes the limit (a decompression bomb)",
      "format=idx",
      {
        ...idxFiles(),
        train_images: [gzipSync(Buffer.concat([idx([10_700, 28, 28], []), Buffer.alloc(10_700 * 784)]))],
      },
      413,
      "limit",
    ],
  ])("refuses %s, leaving nothing behind", async (_case, query, files, status, text) => {
    const before = await h.ctx.store.list(`tenants/${h.tenantA}/datasets/`);
    const listed = async () =>
      ((await (await h.request("/v1/datasets")).json()) as { items: unknown[] }).items.length;
    const rows = await listed();
    const res = await upload(`name=bad&${query}`, files as Record<string, Buffer[]>);
    expect(res.status).toBe(status);
    expect(JSON.stringify(await res.json())).toContain(text);
    expect(await h.ctx.store.list(`tenants/${h.tenantA}/datasets/`)).toEqual(before);
    expect(await listed()).toBe(rows);
  });

  it("refuses uploads over the size limit and trainings on unknown datasets", async () => {
    const big = await upload("name=big&format=cifar10", {
      train: [Buffer.alloc(5 * 1024 * 1024)],
      test: [Buffer.alloc(3073)],
    });
    expect(big.status).toBe(413);
    const res = await h.request("/v1/trainings", {
      method: "POST",
      body: JSON.stringify({
        dataset: "01a21c82-9c47-7abd-a849-4a1c03318636",
        model: { kind: "mlp", hidden: [4] },
        population: { size: 1, variant: "independent" },
        epochs: 1,
      }),
      headers: { "Content-Type": "application/json" },
    });
    expect(res.status).toBe(422);
    expect(((await res.json()) as { detail: string }).detail).toContain("not found");
  });
});

describe("CIFAR-10 records", () => {
  it("become HWC floats: planes of red, green, blue", () => {
    const record = Buffer.alloc(3073);
    record[0] = 7;
    record.fill(51, 1, 1025); // red plane
    record.fill(102, 1025, 2049); // green
    record.fill(255, 2049, 3073); // blue
    const split = cifar10Split([record]);
    expect(Array.from(split.y)).toEqual([7]);
    expect(Array.from(split.x.subarray(0, 3))).toEqual([0.2, 0.4, 1].map((v) => Math.fround(v)));
  });
});

describe("a large dataset upload over a real socket", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem", { limits: { maxDatasetBytes: 2 ** 30 } });
    server = await listen(h);
  });
  afterAll(async () => {
    await server.close();
    await h.close();
  });

  it("streams to the store: 256 MB of images raise the process's memory by far less", async () => {
    const count = 340_000; // 28x28 images: ~256 MB
    const labels = (n: number) =>
      idx(
        [n],
        Array.from({ length: n }, (_, i) => i % 10),
      );
    const imageHeader = (n: number) => idx([n, 28, 28], []);
    const boundary = "papa-boundary-0123456789";
    const part = (field: string) =>
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="${field}"; filename="${field}"\r\nContent-Type: application/octet-stream\r\n\r\n`,
      );
    const small = [
      Buffer.concat([part("train_labels"), labels(count), Buffer.from("\r\n")]),
      Buffer.concat([part("test_images"), imageHeader(2), Buffer.alloc(2 * 784, 7), Buffer.from("\r\n")]),
      Buffer.concat([part("test_labels"), labels(2), Buffer.from("\r\n")]),
    ];
    const head = Buffer.concat([part("train_images"), imageHeader(count)]);
    const tail = Buffer.from(
      `\r\n${small.map((b) => b.toString("latin1")).join("")}--${boundary}--\r\n`,
      "latin1",
    );
    const imageBytes = count * 784;
    const length = head.length + imageBytes + tail.length;

    global.gc?.();
    const before = process.memoryUsage().rss;
    let peak = before;
    const sampler = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 20);
    const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = httpRequest(`${server.base}/v1/datasets?name=big&format=idx`, {
        method: "POST",
        headers: {
          Authorization: `Bearer ${h.keyA}`,
          "Content-Type": `multipart/form-data; boundary=${boundary}`,
          "Content-Length": String(length),
        },
      });
      req.on("response", (r) => {
        let body = "";
        r.on("data", (d: Buffer) => (body += d.toString()));
        r.on("end", () => resolve({ status: r.statusCode ?? 0, body }));
      });
      req.on("error", reject);
      const chunk = Buffer.alloc(1 << 20, 128);
      let sent = 0;
      const pump = () => {
        while (sent < imageBytes) {
          const n = Math.min(chunk.length, imageBytes - sent);
          sent += n;
          if (!req.write(n === chunk.length ? chunk : chunk.subarray(0, n)))
            return void req.once("drain", pump);
        }
        req.end(tail);
      };
      req.write(head);
      pump();
    });
    clearInterval(sampler);
    expect(res.status, res.body).toBe(201);
    expect(JSON.parse(res.body)).toMatchObject({
      train_count: count,
      test_count: 2,
      classes: 10,
      shape: [28, 28, 1],
    });
    // Buffering the body (as the service once did) costs several times its size.
    expect(peak - before).toBeLessThan(100 * 1024 * 1024);
  });
});
