import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { type Harness, listen, startHarness, upload } from "./helpers/harness.js";
import { mergeAndWait } from "./helpers/jobs.js";
import { smallCheckpoint } from "./helpers/safetensors.js";
import { sharded, uploadFiles } from "./helpers/sharded.js";

/** Debian's Python, with the packages huggingface_hub needs (`.ci/run` installs them). */
const PYTHON = "/usr/bin/python3";
/** Hugging Face's client, unmodified (../shared/peers, or where HF_HUB_PEER points). */
const PEER =
  process.env.HF_HUB_PEER ??
  fileURLToPath(new URL("../../shared/peers/huggingface_hub-0.24.7/src", import.meta.url));

const sha256 = (bytes: Buffer) => createHash("sha256").update(bytes).digest("hex");

function runPeer(env: Record<string, string>): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(PYTHON, ["test/peers/hf_hub.py"], {
      env: { PATH: process.env.PATH ?? "", PYTHONPATH: PEER, HF_HUB_DISABLE_TELEMETRY: "1", ...env },
    });
    let output = "";
    child.stdout.on("data", (d: Buffer) => {
      output += d.toString();
    });
    child.stderr.on("data", (d: Buffer) => {
      output += d.toString();
    });
    child.on("exit", (code) => resolve({ code, output }));
  });
}

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("the Hugging Face Hub protocol, with huggingface_hub itself, on %s + %s", (db, store) => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  beforeAll(async () => {
    h = await startHarness(db, store, { worker: true });
    server = await listen(h);
  });
  afterAll(async () => {
    await server.close();
    await h.close();
  });

  it("downloads by main, version, alias and commit, and a sharded merge output with its companion files; lists the files; refuses wrong tokens and names what is missing", async () => {
    expect(existsSync(PEER), `huggingface_hub's source is not at ${PEER}: set HF_HUB_PEER`).toBe(true);
    const [first, second] = [smallCheckpoint(1), smallCheckpoint(2)];
    for (const bytes of [first, second]) expect((await upload(h, bytes, "hub-model")).status).toBe(201);
    const alias = await h.request("/v1/models/hub-model/aliases/production", {
      method: "PUT",
      body: JSON.stringify({ version: 1 }),
      headers: { "Content-Type": "application/json" },
    });
    expect(alias.status).toBe(200);

    const inputs = [];
    for (const k of [1, 2]) {
      const res = await uploadFiles(h, sharded(k), "hub-sharded-input");
      expect(res.status, await res.clone().text()).toBe(201);
      inputs.push(((await res.json()) as { id: string }).id);
    }
    const merge = await mergeAndWait(h, { method: "papa-all", inputs, name: "hub-sharded" });
    const output = (await (
      await h.request(`/v1/checkpoints/${merge.result?.checkpoints[0]?.id}`)
    ).json()) as {
      files: { name: string; sha256: string }[];
    };

    const { code, output: printed } = await runPeer({
      PAPA_URL: server.base,
      PAPA_API_KEY: h.keyA,
      MODEL: "hub-model",
      SHARDED: "hub-sharded",
    });
    expect(code, printed).toBe(0);
    const seen = JSON.parse(printed.trim().split("\n").at(-1) ?? "{}");
    expect(seen.version).toBe("0.24.7");
    expect(seen).toMatchObject({
      main: sha256(second),
      v1: sha256(first),
      production: sha256(first),
      by_commit: sha256(first),
      siblings: [["model.safetensors", second.length, sha256(second)]],
      snapshot: ["model.safetensors"],
      snapshot_sha: sha256(second),
      sharded: Object.fromEntries(output.files.map((f) => [f.name, f.sha256])),
      missing_repo: "RepositoryNotFoundError",
      missing_revision: "RevisionNotFoundError",
      missing_file: "EntryNotFoundError",
      wrong_token_info: 401,
      wrong_token_download: "LocalEntryNotFoundError after 401",
    });
    expect(Object.keys(seen.sharded)).toEqual([
      "config.json",
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
      "tokenizer.json",
    ]);
    expect(seen.latest_sha).toMatch(/^[0-9a-f]{40}$/);
    expect(seen.first_sha).not.toBe(seen.latest_sha);
  }, 120_000);
});
