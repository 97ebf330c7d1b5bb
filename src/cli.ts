#!/usr/bin/env node
import { readFileSync } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";
import { loadCliConfig } from "./cli/config.js";
import {
  CliFailure,
  connect,
  download,
  followJob,
  lineageTree,
  type Remote,
  submitMember,
  upload,
  uploadFiles,
  uploadResumable,
} from "./cli/remote.js";
import { type components, PapaProblemError, unwrap } from "./client.js";
import { mergeFiles } from "./merge/local.js";
import { type MergeMethod, MergeSpecError } from "./merge/methods.js";
import { MergeInputError } from "./merge/plan.js";
import { InvalidInputError } from "./services/errors.js";
import { isFloatDtype } from "./tensors/floats.js";
import { SafetensorsError } from "./tensors/safetensors.js";

/** Each command's usage, as `papa --help` prints them all and `papa COMMAND --help` its own. */
const COMMANDS: Record<string, string> = {
  upload: `  upload FILE --name NAME [--resumable]   upload a checkpoint (progress on stderr), or on S3 deployments
                                     in presigned parts, resumable: rerun after an interruption
  upload FOLDER|FILE... --name NAME    upload several files as one checkpoint: shards with
                                     model.safetensors.index.json, config.json, tokenizer files`,
  ls: "  ls [--name NAME] [--limit N]       list checkpoints, newest first",
  models: `  models [NAME] [--limit N]          the registry: models with their latest version; or one
                                     model's aliases and versions, highest first`,
  alias: `  alias NAME ALIAS VERSION           point an alias (production, ...) at a version of a model
  alias NAME ALIAS --delete          remove it`,
  show: "  show ID                            a checkpoint as JSON",
  download: `  download ID [--out FILE]           download, verifying the sha256
                                     (several files: each into the folder --out, default ID)`,
  merge: `  merge --method M --out OUT IN...   merge local files (papa-all, papa-2, weighted, papa-pull)
        --seed N  --coefficients a,b,..  --beta B  --exclude PATTERN  --output-dtype DTYPE  --threads N
  merge --remote --method M [--name NAME] ID...   the same merge as a job on the server (--follow waits)`,
  train: "  train SPEC.json [--follow]         start a training job from a JSON request body",
  jobs: "  jobs [ID] [--follow]               list jobs, show one, or stream its progress until it finishes",
  lineage:
    "  lineage ID [--depth N]             a checkpoint's ancestors as a tree with coefficients and metrics",
  population: `  population create --name NAME --size N --method papa-all|papa-2|papa
        [--alpha A] [--seed N] [--quorum Q] [--timeout SECONDS] [--initial ID]
  population submit ID ROUND MEMBER FILE    a member's weights for a round
  population wait ID ROUND [--member J --out FILE]   wait until the round closes (and download
                                     member J's next weights, sha256 verified)
  population show ID | population finish ID [--follow]   state and rounds; the final uniform soup`,
  admin: `  admin create-tenant NAME           (operators) create a tenant on the service's own database
                                     (DATABASE_URL, or the embedded one under PAPA_DATA_DIR with the
                                     server stopped) and print its first API key, shown only then`,
};

/** `papa`'s usage, or one command's (with the options every remote command takes). */
function usage(command?: string): string {
  const server = "server: --url, --key, or PAPA_URL, PAPA_API_KEY, or ~/.config/papa/config.json";
  const one = command === undefined ? undefined : COMMANDS[command];
  if (one !== undefined) return `usage: papa ${command} ...      (${server})\n${one}`;
  return `usage: papa <command> [options]      (${server})
${Object.values(COMMANDS).join("\n")}
  COMMAND --help                     that command's usage
Exit codes: 0 success; 1 the operation or the job failed; 2 the command line is wrong.`;
}

class UsageError extends Error {}

const options = {
  help: { type: "boolean", short: "h" },
  url: { type: "string" },
  key: { type: "string" },
  name: { type: "string" },
  limit: { type: "string" },
  out: { type: "string" },
  method: { type: "string" },
  seed: { type: "string" },
  coefficients: { type: "string" },
  beta: { type: "string" },
  exclude: { type: "string", multiple: true },
  "output-dtype": { type: "string" },
  threads: { type: "string" },
  remote: { type: "boolean" },
  follow: { type: "boolean" },
  depth: { type: "string" },
  resumable: { type: "boolean" },
  size: { type: "string" },
  alpha: { type: "string" },
  quorum: { type: "string" },
  timeout: { type: "string" },
  initial: { type: "string" },
  member: { type: "string" },
  delete: { type: "boolean" },
} as const;

type Values = ReturnType<typeof parseArgs<{ options: typeof options; allowPositionals: true }>>["values"];

function methodFrom(values: Values): MergeMethod {
  switch (values.method) {
    case "papa-all":
      return { method: "papa-all" };
    case "papa-2":
      return { method: "papa-2", seed: Number(values.seed ?? 0) };
    case "weighted":
      if (values.coefficients === undefined) throw new UsageError("weighted needs --coefficients");
      return { method: "weighted", coefficients: values.coefficients.split(",").map(Number) };
    case "papa-pull":
      if (values.beta === undefined) throw new UsageError("papa-pull needs --beta");
      return { method: "papa-pull", beta: Number(values.beta) };
    default:
      throw new UsageError(`unknown --method ${String(values.method)}`);
  }
}

const print = (value: unknown) =>
  process.stdout.write(`${typeof value === "string" ? value : JSON.stringify(value, null, 2)}\n`);
const log = (line: string) => process.stderr.write(`${line}\n`);

async function localMerge(values: Values, inputs: string[]): Promise<void> {
  if (!values.out) throw new UsageError("--out is required");
  if (inputs.length === 0) throw new UsageError("no input files");
  const outputDtype = values["output-dtype"];
  if (outputDtype !== undefined && !isFloatDtype(outputDtype))
    throw new UsageError(`--output-dtype ${outputDtype}?`);
  const started = performance.now();
  const stages = { readMs: 0, mergeMs: 0, writeMs: 0 };
  const paths = await mergeFiles({
    stages,
    inputs,
    out: values.out,
    spec: methodFrom(values),
    exclude: values.exclude ?? [],
    outputDtype,
    ...(values.threads === undefined ? {} : { threads: Number(values.threads) }),
  });
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  const busy = (ms: number) => (ms / 1000).toFixed(2);
  print(
    `merged ${inputs.length} inputs into ${paths.join(", ")} in ${seconds} s ` +
      `(reading ${busy(stages.readMs)} s, merging ${busy(stages.mergeMs)} s, writing ${busy(stages.writeMs)} s, overlapping)`,
  );
}

/**
 * The files of a multi-file upload: the files of a folder (not its subfolders or hidden files),
 * or several files; null for one file.
 */
async function filesToUpload(args: string[]): Promise<string[] | null> {
  const [first] = args;
  if (args.length > 1) return args;
  if (!first || !(await stat(first)).isDirectory()) return null;
  const entries = await readdir(first, { withFileTypes: true });
  return entries
    .filter((e) => e.isFile() && !e.name.startsWith("."))
    .map((e) => join(first, e.name))
    .sort();
}

/** Prints a job, following it first with --follow; a failed or canceled job is exit code 1. */
async function reportJob(r: Remote, id: string, follow: boolean | undefined): Promise<void> {
  const job = follow
    ? await followJob(r, id)
    : unwrap(await r.client.GET("/v1/jobs/{id}", { params: { path: { id } } }));
  print(job);
  if (job.status === "failed" || job.status === "canceled") throw new CliFailure(`job ${id} ${job.status}`);
}

/** The commands that call the server (`admin` works on its database). */
const REMOTE_COMMANDS = Object.keys(COMMANDS).filter((c) => c !== "admin");

async function remoteCommand(command: string, values: Values, args: string[]): Promise<void> {
  if (!REMOTE_COMMANDS.includes(command)) throw new UsageError(`unknown command ${command}`);
  const config = loadCliConfig({ url: values.url, key: values.key }, (path) => {
    try {
      return readFileSync(path, "utf8");
    } catch {
      return null;
    }
  });
  const r = connect(config.url, config.apiKey, log);
  const [first] = args;
  switch (command) {
    case "upload": {
      if (!first) throw new UsageError("upload needs a FILE");
      const name = values.name ?? basename(first).replace(/\.safetensors$/, "");
      const files = await filesToUpload(args);
      if (files) {
        if (values.resumable) throw new UsageError("--resumable uploads one file");
        print(await uploadFiles(r, files, name));
        return;
      }
      const state = `${first}.papa-upload.json`;
      print(values.resumable ? await uploadResumable(r, first, name, state) : await upload(r, first, name));
      return;
    }
    case "ls": {
      const page = unwrap(
        await r.client.GET("/v1/checkpoints", {
          params: {
            query: { limit: Number(values.limit ?? 50), ...(values.name ? { name: values.name } : {}) },
          },
        }),
      );
      for (const c of page.items)
        print(`${c.id}  ${c.name}  ${(c.size_bytes / 1e6).toFixed(1)} MB  ${c.created_at}`);
      return;
    }
    case "models": {
      const limit = Number(values.limit ?? 50);
      if (!first) {
        const page = unwrap(await r.client.GET("/v1/models", { params: { query: { limit } } }));
        for (const m of page.items)
          print(`${m.name}  latest ${m.latest_version ?? "-"}  ${m.version_count} versions`);
        return;
      }
      const model = unwrap(
        await r.client.GET("/v1/models/{name}", { params: { path: { name: first }, query: { limit } } }),
      );
      for (const a of model.aliases) print(`${a.alias} -> ${a.version}`);
      for (const c of model.versions) {
        const tags = c.tags.length > 0 ? `  [${c.tags.join(", ")}]` : "";
        print(`v${c.version}  ${c.id}  ${(c.size_bytes / 1e6).toFixed(1)} MB  ${c.created_at}${tags}`);
      }
      return;
    }
    case "alias": {
      const [name, alias, version] = args;
      if (!name || !alias || (values.delete ? version !== undefined : version === undefined)) {
        throw new UsageError("alias takes NAME ALIAS VERSION, or NAME ALIAS --delete");
      }
      const path = { name, alias };
      if (values.delete) {
        const deleted = await r.client.DELETE("/v1/models/{name}/aliases/{alias}", { params: { path } });
        if (!deleted.response.ok) unwrap(deleted); // 204 has no body to unwrap; a problem does
        return;
      }
      const body = { version: integer(version, "VERSION") };
      print(unwrap(await r.client.PUT("/v1/models/{name}/aliases/{alias}", { params: { path }, body })));
      return;
    }
    case "show":
      if (!first) throw new UsageError("show needs an ID");
      print(unwrap(await r.client.GET("/v1/checkpoints/{id}", { params: { path: { id: first } } })));
      return;
    case "download": {
      if (!first) throw new UsageError("download needs an ID");
      for (const [path, sha256] of await download(r, first, values.out)) print(`${path} sha256 ${sha256}`);
      return;
    }
    case "merge": {
      const spec = methodFrom(values);
      const body = { ...spec, inputs: args, ...(values.name ? { name: values.name } : {}) };
      const job = unwrap(await r.client.POST("/v1/merges", { body }));
      await reportJob(r, job.id, values.follow);
      return;
    }
    case "train": {
      if (!first) throw new UsageError("train needs a SPEC.json");
      const spec = JSON.parse(readFileSync(first, "utf8")) as components["schemas"]["TrainingRequest"];
      const job = unwrap(await r.client.POST("/v1/trainings", { body: spec }));
      await reportJob(r, job.id, values.follow);
      return;
    }
    case "jobs":
      if (first) {
        await reportJob(r, first, values.follow);
      } else {
        const page = unwrap(
          await r.client.GET("/v1/jobs", { params: { query: { limit: Number(values.limit ?? 50) } } }),
        );
        for (const j of page.items)
          print(`${j.id}  ${j.kind}  ${j.status}  ${(100 * j.progress).toFixed(0)}%  ${j.created_at}`);
      }
      return;
    case "lineage":
      if (!first) throw new UsageError("lineage needs an ID");
      print(await lineageTree(r, first, Number(values.depth ?? 20)));
      return;
    case "population":
      await populationCommand(r, values, args);
      return;
    default:
      throw new UsageError(`unknown command ${command}`);
  }
}

/** A whole number from the command line, or a usage error naming it. */
function integer(value: string | undefined, what: string): number {
  const n = Number(value);
  if (value === undefined || !Number.isInteger(n)) throw new UsageError(`${what} must be a whole number`);
  return n;
}

async function populationCommand(r: Remote, values: Values, args: string[]): Promise<void> {
  const [sub, id, ...rest] = args;
  const path = { id: id ?? "" };
  switch (sub) {
    case "create": {
      const method = values.method;
      if (method !== "papa-all" && method !== "papa-2" && method !== "papa") {
        throw new UsageError("population create needs --method papa-all, papa-2 or papa");
      }
      if (!values.name) throw new UsageError("population create needs --name");
      const optional = (v: string | undefined, what: string) =>
        v === undefined ? undefined : integer(v, what);
      const body = {
        name: values.name,
        size: integer(values.size, "--size"),
        method,
        ...(values.alpha === undefined ? {} : { alpha: Number(values.alpha) }),
        ...(values.seed === undefined ? {} : { seed: optional(values.seed, "--seed") }),
        ...(values.quorum === undefined ? {} : { quorum: optional(values.quorum, "--quorum") }),
        ...(values.timeout === undefined
          ? {}
          : { round_timeout_seconds: optional(values.timeout, "--timeout") }),
        ...(values.initial === undefined ? {} : { initial_checkpoint_id: values.initial }),
        // The server applies the defaults the generated type marks required.
      } as components["schemas"]["PopulationCreate"];
      print(unwrap(await r.client.POST("/v1/populations", { body })));
      return;
    }
    case "submit": {
      const [round, member, file] = rest;
      if (!id || !file) throw new UsageError("population submit takes ID ROUND MEMBER FILE");
      print(await submitMember(r, id, integer(round, "ROUND"), integer(member, "MEMBER"), file));
      return;
    }
    case "wait": {
      if (!id) throw new UsageError("population wait takes ID ROUND");
      const round = integer(rest[0], "ROUND");
      let state: components["schemas"]["PopulationRound"];
      do {
        state = unwrap(
          await r.client.GET("/v1/populations/{id}/rounds/{round}", {
            params: { path: { id, round }, query: { wait: 60 } },
          }),
        );
        r.log(`round ${round} ${state.status}: members ${state.submitted.join(",") || "none"} submitted`);
      } while (state.status === "open" || state.status === "merging");
      if (state.status === "failed") throw new CliFailure(`round ${round} failed (job ${state.job_id})`);
      if (values.member !== undefined) {
        const member = integer(values.member, "--member");
        const output = state.outputs.find((o) => o.member === member);
        if (!output) throw new CliFailure(`round ${round} has no output for member ${member}`);
        const out = values.out ?? `${id}-round-${round}-member-${member}.safetensors`;
        print(`${out} sha256 ${await download(r, output.checkpoint_id, out)}`);
      } else {
        print(state);
      }
      return;
    }
    case "show":
      if (!id) throw new UsageError("population show takes ID");
      print(unwrap(await r.client.GET("/v1/populations/{id}", { params: { path } })));
      return;
    case "finish": {
      if (!id) throw new UsageError("population finish takes ID");
      const job = unwrap(await r.client.POST("/v1/populations/{id}/finish", { params: { path } }));
      await reportJob(r, job.id, values.follow);
      return;
    }
    default:
      throw new UsageError("population takes create, submit, wait, show or finish");
  }
}

/** What `papa admin` loads: the server's modules, which only the server package has. */
interface AdminModule {
  createTenant(name: string): Promise<object>;
}

/** Operator commands: they work on the service's database directly, configured as the server is. */
async function adminCommand(args: string[]): Promise<object> {
  const [sub, name, ...rest] = args;
  if (sub !== "create-tenant" || name === undefined || rest.length > 0) {
    throw new UsageError("admin takes: create-tenant NAME");
  }
  // Imported by a path the client package's build does not follow: it leaves the server out.
  const path = "./cli/admin.js";
  const admin = (await import(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== "ERR_MODULE_NOT_FOUND") throw err;
    throw new CliFailure(
      "papa admin works on the service's database: run it from the server package, papa-service",
    );
  })) as AdminModule;
  return admin.createTenant(name);
}

async function main(argv: string[]): Promise<number> {
  // `npm run papa -- ...` runs in the package's directory: the caller's paths are relative to
  // where npm was started.
  if (process.env.npm_lifecycle_event === "papa" && process.env.INIT_CWD) process.chdir(process.env.INIT_CWD);
  let command: string | undefined;
  try {
    const { values, positionals } = parseArgs({ args: argv, options, allowPositionals: true });
    const [first, ...args] = positionals;
    command = first;
    if (values.help || command === "help") {
      print(usage(command === "help" ? args[0] : command));
      return 0;
    }
    if (!command) throw new UsageError("no command");
    if (command === "merge" && !values.remote) await localMerge(values, args);
    else if (command === "admin") print(await adminCommand(args));
    else await remoteCommand(command, values, args);
    return 0;
  } catch (err) {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`papa: ${(err as Error).message}\n${usage(command)}\n`);
      return 2;
    }
    const known = [
      InvalidInputError,
      MergeSpecError,
      MergeInputError,
      SafetensorsError,
      PapaProblemError,
      CliFailure,
    ].some((type) => err instanceof type);
    // A file that is not there, a directory that cannot be written: the system's message says it.
    const system = typeof (err as NodeJS.ErrnoException).syscall === "string";
    const message = known || system ? (err as Error).message : ((err as Error).stack ?? String(err));
    process.stderr.write(`papa: ${message}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
