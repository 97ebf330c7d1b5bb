// `npm run build:lambda`: the Lambda handler as one minified ES module, dist/bundle/lambda.js, so
// that a cold start reads and compiles one file instead of resolving ~1,000 modules (docs/
// benchmarks.md, bench:cold). Beside it, the worker threads the handler's modules start
// (`startThread` resolves `./NAME.js` from the bundle, whose import.meta.url they all share).
// Left outside: PGlite (it loads its wasm and data files from beside its own module), TF.js (a
// Lambda never trains) and pg's optional native binding. The bundle reads openapi.yaml and
// drizzle/ from the package root, two levels up, as dist/*/ modules do.
import { build } from "esbuild";

const threads = {
  "header-thread": "src/tensors/header-thread.ts",
  "plan-thread": "src/merge/plan-thread.ts",
  "pglite-thread": "src/db/pglite-thread.ts",
};

await build({
  entryPoints: [
    { in: "src/lambda.ts", out: "lambda" },
    ...Object.entries(threads).map(([out, source]) => ({ in: source, out })),
  ],
  outdir: "dist/bundle",
  bundle: true,
  minify: true,
  // Modules only a dynamic import reaches (PGlite's drizzle driver) go into chunks loaded then.
  splitting: true,
  sourcemap: true,
  platform: "node",
  target: "node20",
  format: "esm",
  external: ["@electric-sql/pglite", "@tensorflow/*", "pg-native"],
  // CommonJS packages inside an ES module bundle still call require() for Node's built-ins.
  banner: {
    js: 'import { createRequire as createBundleRequire } from "node:module"; const require = createBundleRequire(import.meta.url);',
  },
  logLevel: "warning",
});
