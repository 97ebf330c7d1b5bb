#!/usr/bin/env bash
# Fails when src/db/schema.ts has changes that no migration in drizzle/ captures.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(npx drizzle-kit generate 2>&1)
if ! grep -q "No schema changes" <<<"$out"; then
  echo "$out"
  echo "drizzle/ is stale: run 'npm run generate' and commit the new migration" >&2
  exit 1
fi
