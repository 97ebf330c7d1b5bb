#!/usr/bin/env node
import { parseArgs } from "node:util";
import { mergeFiles } from "./merge/local.js";
import { type MergeMethod, MergeSpecError } from "./merge/methods.js";
import { MergeMismatchError } from "./merge/plan.js";
import { isFloatDtype } from "./tensors/floats.js";
import { SafetensorsError } from "./tensors/safetensors.js";

const USAGE = `usage: papa merge --method papa-all|papa-2|weighted|papa-pull --out OUT.safetensors IN.safetensors...
  --seed N               papa-2: seed of the pair draws (default 0)
  --coefficients a,b,..  weighted: one per input, summing to 1
  --beta B               papa-pull: fraction each input moves toward the mean, in (0, 1]
  --exclude PATTERN      copy matching tensors from the first input (repeatable; * is a wildcard)
  --output-dtype DTYPE   F32, F16, BF16 or F64 for averaged tensors
  --threads N            worker threads (default: one per core)
Methods with one output per input (papa-2, papa-pull) write OUT-0.safetensors, OUT-1.safetensors, ...`;

/** Exit codes: 0 done, 1 the merge failed, 2 the command line is wrong. */
class UsageError extends Error {}

function methodFrom(values: Record<string, string | boolean | string[] | undefined>): MergeMethod {
  switch (values.method) {
    case "papa-all":
      return { method: "papa-all" };
    case "papa-2":
      return { method: "papa-2", seed: Number(values.seed ?? 0) };
    case "weighted":
      if (typeof values.coefficients !== "string") throw new UsageError("weighted needs --coefficients");
      return { method: "weighted", coefficients: values.coefficients.split(",").map(Number) };
    case "papa-pull":
      if (typeof values.beta !== "string") throw new UsageError("papa-pull needs --beta");
      return { method: "papa-pull", beta: Number(values.beta) };
    default:
      throw new UsageError(`unknown --method ${String(values.method)}`);
  }
}

async function merge(args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      method: { type: "string" },
      out: { type: "string" },
      seed: { type: "string" },
      coefficients: { type: "string" },
      beta: { type: "string" },
      exclude: { type: "string", multiple: true },
      "output-dtype": { type: "string" },
      threads: { type: "string" },
    },
  });
  if (!values.out) throw new UsageError("--out is required");
  if (positionals.length === 0) throw new UsageError("no input files");
  const outputDtype = values["output-dtype"];
  if (outputDtype !== undefined && !isFloatDtype(outputDtype))
    throw new UsageError(`--output-dtype ${outputDtype}?`);
  const started = performance.now();
  const paths = await mergeFiles({
    inputs: positionals,
    out: values.out,
    spec: methodFrom(values),
    exclude: values.exclude ?? [],
    outputDtype,
    ...(values.threads === undefined ? {} : { threads: Number(values.threads) }),
  });
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  process.stdout.write(`merged ${positionals.length} inputs into ${paths.join(", ")} in ${seconds} s\n`);
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === "merge") await merge(rest);
    else throw new UsageError(command ? `unknown command ${command}` : "no command");
    return 0;
  } catch (err) {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`papa: ${(err as Error).message}\n${USAGE}\n`);
      return 2;
    }
    const known =
      err instanceof MergeSpecError || err instanceof MergeMismatchError || err instanceof SafetensorsError;
    process.stderr.write(`papa: ${known ? (err as Error).message : ((err as Error).stack ?? String(err))}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
