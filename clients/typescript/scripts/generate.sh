#!/usr/bin/env bash
# Generates src/gen/ from the protos (see buf.gen.yaml).
#
#   scripts/generate.sh           regenerate src/gen/
#   scripts/generate.sh --check   fail, showing the difference, when src/gen/
#                                 is not what generating would write
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
buf="$here/../../scripts/buf"
cd "$here"
if [ ! -x node_modules/.bin/protoc-gen-ts_proto ]; then
  echo "generate: run npm ci first (ts-proto is a devDependency)" >&2
  exit 2
fi
case "${1:-}" in
  "")
    "$buf" generate --template buf.gen.yaml
    ;;
  --check)
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
    "$buf" generate --template buf.gen.yaml --output "$out"
    if ! diff -ru src/gen "$out/src/gen" >"$out/diff"; then
      echo "generate: src/gen/ is stale; run npm run generate and commit the result:" >&2
      cat "$out/diff" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: scripts/generate.sh [--check]" >&2
    exit 2
    ;;
esac
