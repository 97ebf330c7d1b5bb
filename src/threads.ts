import { Worker } from "node:worker_threads";

/**
 * A worker thread running the module beside `base` named `name` (without extension): the
 * compiled `.js`, or from TypeScript sources (tests, `npm run papa`) the `.ts` loaded through
 * tsx, since on Node 20 a worker does not honour `--import` loaders in `execArgv`.
 */
export function startThread(base: string, name: string): Worker {
  if (!base.endsWith(".ts")) return new Worker(new URL(`./${name}.js`, base));
  const url = JSON.stringify(new URL(`./${name}.ts`, base).href);
  return new Worker(`import("tsx/esm/api").then((tsx) => tsx.tsImport(${url}, ${url}));`, { eval: true });
}
