#!/usr/bin/env bash
# The Python client's tests: installs the package and its test requirements
# into clients/python/.venv (once; again only when they change), checks that
# the generated stubs match the protos, then runs pytest against a whole
# Streamer started by scripts/with-streamer (STREAMER_BIN, or
# target/debug/streamer). Quiet when everything passes; on a failure it
# prints what failed. Extra arguments go to pytest.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

fail() {
    echo "clients/python/test.sh: $1" >&2
    [ -s "$LOG" ] && cat "$LOG" >&2
    exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || fail "the tests need Python 3.11 or newer, as websockets 17.4 does ($PYTHON is $("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV" >"$LOG" 2>&1 || fail "could not create $VENV"
fi

# Install again only when the package or the test requirements changed.
stamp="$VENV/.installed"
digest="$(cd "$HERE" && find pyproject.toml requirements-test.txt README.md src -type f \
    -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    rm -f "$stamp"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$HERE/requirements-test.txt" "$HERE" >"$LOG" 2>&1 \
        || fail "pip install failed"
    # A build leaves these in the source tree.
    rm -rf "$HERE/build" "$HERE"/src/*.egg-info
    echo "$digest" >"$stamp"
fi

"$VENV/bin/python" "$HERE/generate.py" --check || fail "the generated stubs are stale"

: >"$LOG"
cd "$HERE"
"$ROOT/scripts/with-streamer" "$VENV/bin/python" -m pytest -q --no-header -p no:cacheprovider "$@" \
    || fail "the tests failed (see above)"
