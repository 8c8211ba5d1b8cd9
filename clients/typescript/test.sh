#!/usr/bin/env bash
# The TypeScript client's checks: install (npm ci, when node_modules is not
# what package-lock.json says); the generated code is current; the package,
# its tests and README.md's examples type-check; and the tests pass, end to
# end against a Streamer that scripts/with-streamer starts for them (the
# binary in $STREAMER_BIN, by default target/debug/streamer).
#
# Quiet on success (one line); on failure, everything that was printed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
started=$SECONDS

step() {
  local what="$1"
  shift
  if ! "$@" >>"$log" 2>&1; then
    echo "clients/typescript: $what failed:" >&2
    cat "$log" >&2
    exit 1
  fi
}

# npm ci wipes node_modules; do it only when the lockfile changed since.
if ! cmp -s package-lock.json node_modules/.installed-package-lock.json 2>/dev/null; then
  step "npm ci" npm ci --silent --no-audit --no-fund
  cp package-lock.json node_modules/.installed-package-lock.json
fi
step "the generated-code check (npm run generate:check)" scripts/generate.sh --check
rm -rf dist build-test
step "the build (tsc)" node_modules/.bin/tsc -p tsconfig.json
step "the tests' build (tsc)" node_modules/.bin/tsc -p tsconfig.test.json
step "README.md's examples (type-check)" node scripts/check-readme.mjs
step "the tests" "$root/scripts/with-streamer" node --test --test-reporter=tap --test-timeout=120000 build-test/

passed="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$log" | tail -1)"
echo "clients/typescript: ${passed:-?} tests passed in $((SECONDS - started)) s"
