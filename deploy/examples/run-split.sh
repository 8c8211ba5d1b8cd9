#!/usr/bin/env bash
# Runs Streamer as four processes on one machine, one per role, the way a
# deployment runs them: auth, connection, progress and gateway, each with its
# own data directory, metrics port and log file, configured by the env files
# in ./env/ (every variable is documented in ./streamer.env).
#
#   cargo build --bin streamer            # or set STREAMER_BIN
#   deploy/examples/run-split.sh          # Ctrl-C stops all four
#
# Environment:
#   STREAMER_BIN        the binary (default: target/debug/streamer of this
#                       repository if built, else `streamer` on PATH)
#   STREAMER_SPLIT_DIR  root of the data directories and logs
#                       (default: .streamer-split in the current directory)
#   STREAMER_ENV_DIR    folder of the four role env files (default: ./env
#                       beside this script)
#   STREAMER_SERVICE_SECRET_FILE
#                       the secret the roles share (default: service-secret
#                       in STREAMER_SPLIT_DIR, made on the first run with
#                       `head -c 48 /dev/urandom | base64`, mode 600)
#   READY_TIMEOUT       seconds to wait for the gateway to be ready (default 30)
#   STREAMER_STORE, STREAMER_DYNAMODB_*, AWS_*
#                       like every variable the env files leave unset, passed
#                       on to every role: STREAMER_STORE=dynamodb puts the
#                       state of auth, connection and progress in DynamoDB
#                       (make the tables first: `streamer dynamodb
#                       create-tables`; credentials and region from the AWS
#                       chain), instead of files in their data directories
#
# Ports (loopback only, as ./env/*.env set them): gRPC auth 50051, connection
# 50052 and its edge stream 50054 (EdgeService: only the gateway dials it,
# STREAMER_CONNECTION_EDGE_URL), progress 50053; WebSocket 8080; metrics
# 9091-9094. Every one must be free: before starting anything the script
# refuses to go on if one of the addresses the env files name is in use.
#
# Trust: the env files set STREAMER_TRUST=token, so every gRPC call between
# the roles, and from you, carries a service token signed with the shared
# secret; every role is pointed at the one secret file above (a role whose env
# file says STREAMER_TRUST=none gets none). Mint a token for grpcurl or a
# backend with `streamer service-token` (the banner shows how).
#
# It stops every process it started on Ctrl-C, SIGTERM, or when any one of
# them exits (and then exits non-zero), so no role is left running alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
env_dir="${STREAMER_ENV_DIR:-$here/env}"
root="${STREAMER_SPLIT_DIR:-.streamer-split}"
ready_timeout="${READY_TIMEOUT:-30}"

if [[ -n "${STREAMER_BIN:-}" ]]; then
  bin="$STREAMER_BIN"
elif [[ -x "$repo/target/debug/streamer" ]]; then
  bin="$repo/target/debug/streamer"
elif command -v streamer >/dev/null; then
  bin="$(command -v streamer)"
else
  echo "run-split: no streamer binary; run 'cargo build --bin streamer' or set STREAMER_BIN" >&2
  exit 1
fi

mkdir -p "$root/logs"

# The secret every role shares in mode token: the one given, or one made here
# on the first run and kept in the data root for the next.
if [[ -n "${STREAMER_SERVICE_SECRET_FILE:-}" ]]; then
  secret_file="$STREAMER_SERVICE_SECRET_FILE"
  if [[ ! -r "$secret_file" ]]; then
    echo "run-split: cannot read STREAMER_SERVICE_SECRET_FILE=$secret_file" >&2
    exit 1
  fi
else
  secret_file="$root/service-secret"
  if [[ ! -s "$secret_file" ]]; then
    (umask 077 && head -c 48 /dev/urandom | base64 >"$secret_file")
    echo "run-split: made the service secret $secret_file" >&2
  fi
fi

# One variable of a role's env file, as the role sees it.
# shellcheck source=/dev/null
setting() { (. "$env_dir/$1.env" && echo "${!2:-}"); }
# Something accepts connections on HOST:PORT (0.0.0.0 means this machine).
listening() {
  local host="${1%:*}" port="${1##*:}"
  [[ "$host" == 0.0.0.0 ]] && host=127.0.0.1
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# Every listen address must be free, the connection role's edge listener
# included: a role that cannot bind exits at once, and a gateway pointed at
# a stranger's port would never be ready.
for role in auth connection progress gateway; do
  for var in STREAMER_AUTH_LISTEN STREAMER_CONNECTION_LISTEN STREAMER_CONNECTION_EDGE_LISTEN \
    STREAMER_PROGRESS_LISTEN STREAMER_GATEWAY_LISTEN STREAMER_METRICS_LISTEN; do
    addr="$(setting "$role" "$var")"
    if [[ -n "$addr" ]] && listening "$addr"; then
      echo "run-split: $addr ($var in $env_dir/$role.env) is already in use; stop what listens there or change the port" >&2
      exit 1
    fi
  done
done

declare -A pids=()   # role -> pid
stopping=0

# Stops every role still running: SIGTERM, then up to 15 s for the drain
# (each role drains for at most 10 s), then SIGKILL for any straggler.
stop_all() {
  ((stopping)) && return
  stopping=1
  local role pid alive
  for role in gateway progress connection auth; do
    pid="${pids[$role]:-}"
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 150); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for role in "${!pids[@]}"; do
    pid="${pids[$role]}"
    if kill -0 "$pid" 2>/dev/null; then
      echo "run-split: $role (pid $pid) did not stop in 15 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  echo "run-split: stopped (logs in $root/logs)" >&2
}
trap 'stop_all' EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

# Starts one role with its env file; the data directory follows
# STREAMER_SPLIT_DIR so several copies can run from different directories.
start() {
  local role="$1"
  (
    set -a
    # shellcheck source=/dev/null
    . "$env_dir/$role.env"
    set +a
    if [[ "$role" != gateway ]]; then
      export STREAMER_DATA_DIR="$root/$role"
    fi
    # The one secret for every role (none at all for a role told `none`,
    # which refuses a secret file).
    if [[ "${STREAMER_TRUST:-}" == none ]]; then
      unset STREAMER_SERVICE_SECRET_FILE
    else
      export STREAMER_SERVICE_SECRET_FILE="$secret_file"
    fi
    exec "$bin" "$role"
  ) >>"$root/logs/$role.log" 2>&1 &
  pids[$role]=$!
  echo "run-split: started $role (pid ${pids[$role]}, log $root/logs/$role.log)" >&2
}

# The stores first, then auth, then the edge, which attaches to
# ConnectionService (it retries until it can).
start connection
start progress
start auth
start gateway

gateway_addr="$(setting gateway STREAMER_GATEWAY_LISTEN)"
# The connection role's edge listener (the binary's default when unset).
edge_addr="$(setting connection STREAMER_CONNECTION_EDGE_LISTEN)"
edge_addr="${edge_addr:-0.0.0.0:50054}"

# Ready: every gRPC listener is up (auth creates the development key first,
# which takes a moment) and the gateway's /readyz says it is attached to the
# edge stream.
is_ready() {
  listening "$(setting auth STREAMER_AUTH_LISTEN)" || return 1
  listening "$(setting progress STREAMER_PROGRESS_LISTEN)" || return 1
  listening "$(setting connection STREAMER_CONNECTION_LISTEN)" || return 1
  listening "$edge_addr" || return 1
  if command -v curl >/dev/null; then
    curl -fsS -o /dev/null --max-time 1 "http://$gateway_addr/readyz" 2>/dev/null
  else
    listening "$gateway_addr"
  fi
}

deadline=$((SECONDS + ready_timeout))
until is_ready; do
  for role in "${!pids[@]}"; do
    if ! kill -0 "${pids[$role]}" 2>/dev/null; then
      echo "run-split: $role exited during start-up; its log:" >&2
      tail -n 20 "$root/logs/$role.log" >&2 || true
      exit 1
    fi
  done
  if ((SECONDS >= deadline)); then
    echo "run-split: the gateway was not ready after ${ready_timeout} s; see $root/logs/" >&2
    exit 1
  fi
  sleep 0.2
done

# Where the state is (as the connection role sees it; every role gets the
# same environment).
store="$(setting connection STREAMER_STORE)"
if [[ "${store:-embedded}" == dynamodb ]]; then
  prefix="$(setting connection STREAMER_DYNAMODB_TABLE_PREFIX)"
  endpoint="$(setting connection STREAMER_DYNAMODB_ENDPOINT_URL)"
  store_note="  Store              dynamodb: tables ${prefix:-streamer-}*${endpoint:+ at $endpoint}"
else
  store_note="  Store              embedded: files in the data directories of auth, connection and progress under $root/"
fi

# Auth created the development key in its data directory on first start.
token="$("$bin" token --data-dir "$root/auth" 2>/dev/null || true)"
conn_addr="$(setting connection STREAMER_CONNECTION_LISTEN)"
if [[ "$(setting connection STREAMER_TRUST)" == none ]]; then
  trust_note="  Trust              none: any caller that reaches a gRPC port may call every method"
  grpc_try="  grpcurl -plaintext -d '{\"tenant_id\":\"demo-tenant\"}' $conn_addr streamer.v1.ConnectionService/ListConnections"
else
  trust_note="  Trust              token: every gRPC call but health needs a service token
  Service secret     $secret_file"
  grpc_try="  SERVICE_TOKEN=\$($bin service-token --sub grpcurl --roles backend --service-secret-file $secret_file)
  grpcurl -plaintext -H \"authorization: Bearer \$SERVICE_TOKEN\" \\
    -d '{\"tenant_id\":\"demo-tenant\"}' $conn_addr streamer.v1.ConnectionService/ListConnections"
fi

cat <<EOF

Streamer is running as four processes (Ctrl-C stops them all)

  WebSocket          ws://$gateway_addr/?Authorization=<token>
  AuthService        $(setting auth STREAMER_AUTH_LISTEN)  metrics http://$(setting auth STREAMER_METRICS_LISTEN)/metrics
  ConnectionService  $(setting connection STREAMER_CONNECTION_LISTEN)  metrics http://$(setting connection STREAMER_METRICS_LISTEN)/metrics
  EdgeService        $edge_addr  (ConnectionService's edge stream: the gateway's STREAMER_CONNECTION_EDGE_URL)
  ProgressService    $(setting progress STREAMER_PROGRESS_LISTEN)  metrics http://$(setting progress STREAMER_METRICS_LISTEN)/metrics
  Gateway            $gateway_addr  metrics http://$(setting gateway STREAMER_METRICS_LISTEN)/metrics
  Logs               $root/logs/
$store_note
$trust_note

Try it:
  grpcurl -plaintext $conn_addr grpc.health.v1.Health/Check
$grpc_try
  python3 -m websockets 'ws://$gateway_addr/?Authorization=$token'
  $bin token --data-dir $root/auth     # another token

EOF

# Wait until one role exits (or a signal arrives); a role that stops on its
# own takes the others down with it.
set +e
wait -n "${pids[@]}"
status=$?
set -e
if ((!stopping)); then
  for role in "${!pids[@]}"; do
    if ! kill -0 "${pids[$role]}" 2>/dev/null; then
      echo "run-split: $role exited (status $status); stopping the others" >&2
      tail -n 20 "$root/logs/$role.log" >&2 || true
    fi
  done
  exit 1
fi
