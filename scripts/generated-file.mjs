// Writes a generated file, or with --check on the command line fails when the checked-in file
// is not what its source gives.
import { readFile, writeFile } from "node:fs/promises";

export async function writeGenerated(target, text) {
  if (!process.argv.includes("--check")) return writeFile(target, text);
  const current = await readFile(target, "utf8").catch(() => "");
  if (current !== text) {
    console.error(`${target} is stale: run npm run generate`);
    process.exit(1);
  }
}
