import { basename, extname } from "node:path";
import type { FloatDtype } from "../tensors/floats.js";
import { DEFAULT_MAX_HEADER_BYTES } from "../tensors/safetensors.js";
import { type ByteSource, openFileSource, readSafetensorsHeader } from "../tensors/source.js";
import { blockElementsFor, type MergeStages, openFileSink, runMerge, slotCount } from "./engine.js";
import { type MergeMethod, mergeCoefficients } from "./methods.js";
import { planMerge } from "./plan.js";
import { MergePool } from "./pool.js";

export interface MergeFilesOptions {
  inputs: string[];
  /** The output file; methods with one output per input number them: `out-0.safetensors`, ... */
  out: string;
  spec: MergeMethod;
  exclude?: string[];
  outputDtype?: FloatDtype | undefined;
  /** Worker threads (default: one per core). */
  threads?: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** Where the time goes (`runMerge`'s). */
  stages?: MergeStages;
}

/** Output paths of a merge: `out` itself for one output, `out` numbered for several. */
export function outputPaths(out: string, count: number): string[] {
  if (count === 1) return [out];
  const ext = extname(out);
  const stem = out.slice(0, out.length - ext.length);
  return Array.from({ length: count }, (_, j) => `${stem}-${j}${ext}`);
}

/** The merge engine on local files: what `papa merge` runs. Returns the written paths. */
export async function mergeFiles(options: MergeFilesOptions): Promise<string[]> {
  const sources: ByteSource[] = [];
  const pool = new MergePool(options.threads);
  const sinks: Awaited<ReturnType<typeof openFileSink>>[] = [];
  try {
    for (const path of options.inputs) sources.push(await openFileSource(path));
    const headers = await Promise.all(sources.map((s) => readSafetensorsHeader(s, DEFAULT_MAX_HEADER_BYTES)));
    const coefficients = mergeCoefficients(options.spec, sources.length);
    const plan = planMerge({
      headers,
      coefficients,
      labels: options.inputs.map((p) => basename(p)),
      exclude: options.exclude,
      outputDtype: options.outputDtype,
      metadata: { "papa.method": options.spec.method },
      blockElements: blockElementsFor(sources.length, coefficients.length, slotCount(pool.size)),
    });
    const paths = outputPaths(options.out, coefficients.length);
    for (const path of paths) sinks.push(await openFileSink(path));
    await runMerge({ plan, sources, sinks, pool, onProgress: options.onProgress, stages: options.stages });
    for (const sink of sinks) await sink.commit();
    return paths;
  } catch (err) {
    await Promise.all(sinks.map((s) => s.abort()));
    throw err;
  } finally {
    await Promise.all(sources.map((s) => s.close()));
    await pool.close();
  }
}
