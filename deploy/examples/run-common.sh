# Sourced by run-split.sh and run-replicas.sh, not run on its own: what both
# do to run Streamer's roles as processes on one machine. The sourcing
# script sets, before calling these:
#   prog     its name, the prefix of every line it prints
#   env_dir  the folder of the role env files (auth.env, connection.env, ...)
#   root     the data root: each process's data directory, logs/, and the
#            service secret when none is given
# shellcheck shell=bash disable=SC2154  # prog, env_dir, root: the sourcing script sets them

# Sets `bin`: STREAMER_BIN, else target/debug/streamer of this repository if
# built, else `streamer` on PATH.
find_bin() {
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  if [[ -n "${STREAMER_BIN:-}" ]]; then
    bin="$STREAMER_BIN"
  elif [[ -x "$repo/target/debug/streamer" ]]; then
    bin="$repo/target/debug/streamer"
  elif command -v streamer >/dev/null; then
    bin="$(command -v streamer)"
  else
    echo "$prog: no streamer binary; run 'cargo build --bin streamer' or set STREAMER_BIN" >&2
    exit 1
  fi
}

# Sets `secret_file`, the secret every role shares in mode token: the one
# given (STREAMER_SERVICE_SECRET_FILE), or one made here on the first run and
# kept in the data root for the next.
use_secret() {
  if [[ -n "${STREAMER_SERVICE_SECRET_FILE:-}" ]]; then
    secret_file="$STREAMER_SERVICE_SECRET_FILE"
    if [[ ! -r "$secret_file" ]]; then
      echo "$prog: cannot read STREAMER_SERVICE_SECRET_FILE=$secret_file" >&2
      exit 1
    fi
  else
    secret_file="$root/service-secret"
    if [[ ! -s "$secret_file" ]]; then
      (umask 077 && head -c 48 /dev/urandom | base64 >"$secret_file")
      echo "$prog: made the service secret $secret_file" >&2
    fi
  fi
}

# setting ROLE VAR: one variable of a role's env file, as the role sees it
# (the caller's environment where the file leaves it unset).
# shellcheck source=/dev/null
setting() { (. "$env_dir/$1.env" && echo "${!2:-}"); }

# listening HOST:PORT: something accepts connections there (0.0.0.0 means
# this machine).
listening() {
  local host="${1%:*}" port="${1##*:}"
  [[ "$host" == 0.0.0.0 ]] && host=127.0.0.1
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# refuse_busy ADDRESS WHAT: exits when something already listens on
# ADDRESS (a role that cannot bind exits at once, and one dialling a
# stranger's port would never be ready).
refuse_busy() {
  if [[ -n "$1" ]] && listening "$1"; then
    echo "$prog: $1 ($2) is already in use; stop what listens there or change the port" >&2
    exit 1
  fi
}

# gateway_ready HOST:PORT [REPLICAS]: the gateway's /readyz says it is
# attached (to REPLICAS ConnectionService replicas, when given). Without
# curl: it listens.
gateway_ready() {
  if ! command -v curl >/dev/null; then
    listening "$1"
    return
  fi
  local answer
  answer="$(curl -fsS --max-time 1 "http://$1/readyz" 2>/dev/null)" || return 1
  [[ -z "${2:-}" || "$answer" == *"attached to $2 "* ]]
}

declare -A pids=() # process name -> pid
names=()           # process names, in the order first started
stopping=0

# start_process NAME ROLE DETAILS [VAR=VALUE...]: starts `streamer ROLE` with
# its role's env file, then the VAR=VALUE settings, the data directory
# $root/NAME (not for a gateway, which keeps no data) and the one secret
# (none for a role told STREAMER_TRUST=none, which refuses a secret file);
# its output goes to $root/logs/NAME.log. Prints "PROG: started NAME (pid N,
# DETAILS, log FILE)".
start_process() {
  local name="$1" role="$2" details="$3"
  shift 3
  (
    set -a
    # shellcheck source=/dev/null
    . "$env_dir/$role.env"
    set +a
    for assignment in "$@"; do
      export "${assignment?}"
    done
    if [[ "$role" != gateway ]]; then
      export STREAMER_DATA_DIR="$root/$name"
    fi
    if [[ "${STREAMER_TRUST:-}" == none ]]; then
      unset STREAMER_SERVICE_SECRET_FILE
    else
      export STREAMER_SERVICE_SECRET_FILE="$secret_file"
    fi
    exec "$bin" "$role"
  ) >>"$root/logs/$name.log" 2>&1 &
  pids[$name]=$!
  [[ " ${names[*]} " == *" $name "* ]] || names+=("$name")
  echo "$prog: started $name (pid ${pids[$name]}, ${details:+$details, }log $root/logs/$name.log)" >&2
}

# alive NAME: the process is running.
alive() { kill -0 "${pids[$1]}" 2>/dev/null; }

# Stops every process still running: SIGTERM (the last started first), then
# up to 15 s for the drain (each role drains for at most 10 s), then SIGKILL
# for any straggler.
stop_all() {
  ((stopping)) && return
  stopping=1
  local i name running
  for ((i = ${#names[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[${names[i]}]}" 2>/dev/null || true
  done
  for _ in $(seq 150); do
    running=0
    for name in "${names[@]}"; do
      alive "$name" && running=1
    done
    ((running)) || break
    sleep 0.1
  done
  for name in "${names[@]}"; do
    if alive "$name"; then
      echo "$prog: $name (pid ${pids[$name]}) did not stop in 15 s; killing it" >&2
      kill -KILL "${pids[$name]}" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  echo "$prog: stopped (logs in $root/logs)" >&2
}

# Every process stops with the script: on its exit, Ctrl-C and SIGTERM.
stop_on_exit() {
  trap 'stop_all' EXIT
  trap 'stop_all; exit 130' INT
  trap 'stop_all; exit 143' TERM
}

# await_ready SECONDS CHECK: waits until the command CHECK succeeds; exits
# when a process exits meanwhile (showing its log) or after SECONDS.
await_ready() {
  local deadline=$((SECONDS + $1)) name
  until $2; do
    for name in "${names[@]}"; do
      if ! alive "$name"; then
        echo "$prog: $name exited during start-up; its log:" >&2
        tail -n 20 "$root/logs/$name.log" >&2 || true
        exit 1
      fi
    done
    if ((SECONDS >= deadline)); then
      echo "$prog: not ready after $1 s; see $root/logs/" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# The banner's line on the store (as the connection role's env file and the
# environment set it; every role gets the same), or EMBEDDED when the store
# is embedded.
store_note() {
  local store prefix endpoint
  store="$(setting connection STREAMER_STORE)"
  if [[ "${store:-embedded}" == dynamodb ]]; then
    prefix="$(setting connection STREAMER_DYNAMODB_TABLE_PREFIX)"
    endpoint="$(setting connection STREAMER_DYNAMODB_ENDPOINT_URL)"
    echo "  Store              dynamodb: tables ${prefix:-streamer-}*${endpoint:+ at $endpoint}"
  else
    echo "  Store              $1"
  fi
}

# The banner's lines on trust, and a grpcurl call to try on ConnectionService
# at ADDRESS, for trust mode TRUST (of the connection role's env file).
trust_note() {
  if [[ "$1" == none ]]; then
    echo "  Trust              none: any caller that reaches a gRPC port may call every method"
  else
    echo "  Trust              token: every gRPC call but health needs a service token"
    echo "  Service secret     $secret_file"
  fi
}
grpc_try() {
  local address="$1" body="{\"tenant_id\":\"demo-tenant\"}"
  echo "  grpcurl -plaintext $address grpc.health.v1.Health/Check"
  if [[ "$2" == none ]]; then
    echo "  grpcurl -plaintext -d '$body' $address streamer.v1.ConnectionService/ListConnections"
  else
    echo "  SERVICE_TOKEN=\$($bin service-token --sub grpcurl --roles backend --service-secret-file $secret_file)"
    echo "  grpcurl -plaintext -H \"authorization: Bearer \$SERVICE_TOKEN\" \\"
    echo "    -d '$body' $address streamer.v1.ConnectionService/ListConnections"
  fi
}
