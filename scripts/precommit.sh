#!/usr/bin/env bash
# The fast half of `npm run verify`: generated files, typecheck, lint. Run before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
npm run -s check:generated && npm run -s typecheck && npm run -s lint
