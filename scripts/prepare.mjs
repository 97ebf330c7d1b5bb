// npm's `prepare`: builds dist/ where the sources are (a git checkout, `npm install` from a git
// URL, `npm pack`), so that the `papa` binary and `import "papa-service"` work once installed.
// An install without the sources (a Dockerfile's `npm ci` before it copies src/, a production
// install from the packed tarball, which holds dist/) has nothing to build.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";

if (existsSync("src") && existsSync("tsconfig.build.json")) {
  const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  const { status } = spawnSync(process.execPath, [tsc, "-p", "tsconfig.build.json"], { stdio: "inherit" });
  process.exitCode = status ?? 1;
}
