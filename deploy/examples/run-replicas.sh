#!/usr/bin/env bash
# Runs Streamer replicated on one machine, on the DynamoDB store: one auth,
# and two (STREAMER_REPLICAS) each of connection, progress and gateway, as
# separate processes, the way a deployment runs several replicas of every
# role. Every gateway attaches to every ConnectionService replica (its
# STREAMER_CONNECTION_EDGE_URL lists their edge streams); every connection
# replica calls every progress replica in turn and every progress replica
# every connection replica (their URLs list them all), going on to the next
# when one does not answer. Kill any one process and the others carry on:
# this is what the replicas are for.
#
#   cargo build --bin streamer            # or set STREAMER_BIN
#   export STREAMER_STORE=dynamodb STREAMER_DYNAMODB_ENDPOINT_URL=http://127.0.0.1:8000 \
#     STREAMER_DYNAMODB_TABLE_PREFIX=replicas- \
#     AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
#   target/debug/streamer dynamodb create-tables
#   deploy/examples/run-replicas.sh       # Ctrl-C stops them all
#
# Environment:
#   STREAMER_STORE=dynamodb, STREAMER_DYNAMODB_*, AWS_*
#                       required (replicas share their state through the
#                       store; the script refuses the embedded one), passed
#                       on to every process like every variable the env
#                       files leave unset: STREAMER_EDGE_LEASE_SECS,
#                       STREAMER_STORE_POLL_MS, STREAMER_LOG, ...
#   STREAMER_ASYNC_ACTIONS
#                       every async action (each progress replica must know
#                       them all); default generate_report, the action of
#                       examples/processor-python
#   STREAMER_REPLICAS   replicas of connection, progress and gateway (default 2)
#   STREAMER_REPLICAS_PORT_BASE
#                       the ports' base (default 21000; see Ports)
#   STREAMER_BIN        the binary (default: target/debug/streamer of this
#                       repository if built, else `streamer` on PATH)
#   STREAMER_REPLICAS_DIR
#                       root of the data directories and logs
#                       (default: .streamer-replicas in the current directory)
#   STREAMER_ENV_DIR    folder of the role env files (default: ./env beside
#                       this script): their settings but the addresses
#   STREAMER_SERVICE_SECRET_FILE
#                       the secret every process shares (default:
#                       service-secret in STREAMER_REPLICAS_DIR, made on the
#                       first run, as run-split.sh does)
#   READY_TIMEOUT       seconds to wait for every process (default 30)
#
# Ports, all on 127.0.0.1, those of run-split.sh's env files moved to the
# base B, and 100 more for each further replica: auth-1 gRPC B+51 (metrics
# B+91); connection-N gRPC B+52 and edge stream B+54 (metrics B+92);
# progress-N B+53 (metrics B+93); gateway-N WebSocket B+80 (metrics B+94).
# With the defaults: 21051-21094 for the first replicas, 21152-21194 for the
# second. Every one must be free: the script refuses to start anything
# otherwise.
#
# It prints one line per process, "run-replicas: started NAME (pid N,
# listen ADDRESS, [edge ADDRESS,] metrics ADDRESS, log FILE)", NAME being
# auth-1, connection-N, progress-N or gateway-N (edge id edge-N), and then a
# banner. A process that exits is reported ("run-replicas: NAME (pid N)
# exited (status S)") and the others keep running; SIGUSR1 to the script
# starts every exited process again, with the same settings. Ctrl-C and
# SIGTERM stop them all (SIGTERM, then SIGKILL after 15 s).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prog=run-replicas
env_dir="${STREAMER_ENV_DIR:-$here/env}"
root="${STREAMER_REPLICAS_DIR:-.streamer-replicas}"
ready_timeout="${READY_TIMEOUT:-30}"
replicas="${STREAMER_REPLICAS:-2}"
base="${STREAMER_REPLICAS_PORT_BASE:-21000}"
export STREAMER_ASYNC_ACTIONS="${STREAMER_ASYNC_ACTIONS:-generate_report}"
# shellcheck source-path=SCRIPTDIR source=run-common.sh
. "$here/run-common.sh"

if [[ "$(setting connection STREAMER_STORE)" != dynamodb ]]; then
  echo "$prog: replicas share their state through DynamoDB: set STREAMER_STORE=dynamodb (and STREAMER_DYNAMODB_*)" >&2
  exit 1
fi
if ! [[ "$replicas" =~ ^[1-9]$ && "$base" =~ ^[0-9]+$ ]] || ((base + 100 * replicas > 65535)); then
  echo "$prog: STREAMER_REPLICAS must be 1-9 and STREAMER_REPLICAS_PORT_BASE leave room for its ports" >&2
  exit 1
fi

find_bin
mkdir -p "$root/logs"
use_secret

# address N OFFSET: replica N's address at OFFSET from the base.
address() { echo "127.0.0.1:$((base + 100 * ($1 - 1) + $2))"; }
auth_url="http://$(address 1 51)"
# urls OFFSET: every replica's URL at OFFSET, comma-separated.
urls() {
  local list="" n
  for n in $(seq "$replicas"); do list+="${list:+,}http://$(address "$n" "$1")"; done
  echo "$list"
}
edge_urls="$(urls 54)"
connection_urls="$(urls 52)"
progress_urls="$(urls 53)"

# The ports of each role, as offsets: its listeners (gRPC or WebSocket,
# and connection's edge stream), then its metrics.
offsets() {
  case "$1" in
    auth) echo 51 91 ;;
    connection) echo 52 54 92 ;;
    progress) echo 53 93 ;;
    gateway) echo 80 94 ;;
  esac
}

# launch NAME: starts the process NAME (ROLE-N) on its addresses.
launch() {
  local name="$1" role="${1%-*}" n="${1##*-}" at=()
  for offset in $(offsets "$role"); do at+=("$(address "$n" "$offset")"); done
  case "$role" in
    auth)
      start_process "$name" auth "listen ${at[0]}, metrics ${at[1]}" \
        STREAMER_AUTH_LISTEN="${at[0]}" STREAMER_METRICS_LISTEN="${at[1]}"
      ;;
    connection)
      start_process "$name" connection "listen ${at[0]}, edge ${at[1]}, metrics ${at[2]}" \
        STREAMER_CONNECTION_LISTEN="${at[0]}" STREAMER_CONNECTION_EDGE_LISTEN="${at[1]}" \
        STREAMER_METRICS_LISTEN="${at[2]}" STREAMER_AUTH_URL="$auth_url" \
        STREAMER_PROGRESS_URL="$progress_urls"
      ;;
    progress)
      start_process "$name" progress "listen ${at[0]}, metrics ${at[1]}" \
        STREAMER_PROGRESS_LISTEN="${at[0]}" STREAMER_METRICS_LISTEN="${at[1]}" \
        STREAMER_CONNECTION_URL="$connection_urls"
      ;;
    gateway)
      start_process "$name" gateway "listen ${at[0]}, metrics ${at[1]}, edge id edge-$n" \
        STREAMER_GATEWAY_LISTEN="${at[0]}" STREAMER_METRICS_LISTEN="${at[1]}" STREAMER_AUTH_URL="$auth_url" \
        STREAMER_CONNECTION_EDGE_URL="$edge_urls" STREAMER_EDGE_ID="edge-$n"
      ;;
  esac
}

# Every process, in start order: the stores first, then auth, then the
# edges, which attach to every ConnectionService replica (retrying until
# they can).
all=()
for role in connection progress; do
  for n in $(seq "$replicas"); do all+=("$role-$n"); done
done
all+=(auth-1)
for n in $(seq "$replicas"); do all+=("gateway-$n"); done

# Every address must be free before anything starts.
for name in "${all[@]}"; do
  for offset in $(offsets "${name%-*}"); do
    refuse_busy "$(address "${name##*-}" "$offset")" "a port of $name"
  done
done

stop_on_exit
for name in "${all[@]}"; do launch "$name"; done

# Ready: every gRPC listener is up and every gateway is attached to every
# ConnectionService replica.
is_ready() {
  local n
  listening "$(address 1 51)" || return 1
  for n in $(seq "$replicas"); do
    listening "$(address "$n" 52)" && listening "$(address "$n" 54)" && listening "$(address "$n" 53)" || return 1
    gateway_ready "$(address "$n" 80)" "$replicas" || return 1
  done
}
await_ready "$ready_timeout" is_ready

trust="$(setting connection STREAMER_TRUST)"
cat <<EOF

Streamer is running as ${#all[@]} processes: auth-1, and $replicas each of connection, progress and gateway (Ctrl-C stops them all)

  WebSocket          $(for n in $(seq "$replicas"); do printf 'ws://%s/ ' "$(address "$n" 80)"; done)(?Authorization=<token>)
  AuthService        $(address 1 51)
  ConnectionService  $(for n in $(seq "$replicas"); do printf '%s ' "$(address "$n" 52)"; done)
  EdgeService        $edge_urls (every gateway's STREAMER_CONNECTION_EDGE_URL)
  ProgressService    $(for n in $(seq "$replicas"); do printf '%s ' "$(address "$n" 53)"; done)(async actions: $STREAMER_ASYNC_ACTIONS)
  Metrics            http://<the metrics address of each "started" line above>/metrics
  Logs               $root/logs/<name>.log
$(store_note "")
$(trust_note "$trust")

Try it:
$(grpc_try "$(address 1 52)" "$trust")
  python3 -m websockets "ws://$(address 1 80)/?Authorization=\$($bin token --data-dir $root/auth-1)"
  kill -KILL <pid of a "started" line>   # the others carry on
  kill -USR1 $$                        # starts every exited process again

EOF

# Until stopped: report each process that exits; SIGUSR1 starts them again.
# (A short sleep in the background, so that a signal is handled at once;
# quiet, or bash would print each job that died of a signal.)
restart=0
trap 'restart=1' USR1
declare -A reported=()
while :; do
  sleep 0.2 &
  wait $! 2>/dev/null || true
  for name in "${all[@]}"; do
    if [[ -z "${reported[$name]:-}" ]] && ! alive "$name"; then
      status=0
      wait "${pids[$name]}" 2>/dev/null || status=$?
      echo "$prog: $name (pid ${pids[$name]}) exited (status $status); the others keep running" >&2
      reported[$name]=1
    fi
  done
  if ((restart)); then
    restart=0
    for name in "${all[@]}"; do
      if [[ -n "${reported[$name]:-}" ]]; then
        launch "$name"
        unset "reported[$name]"
      fi
    done
  fi
  if ((${#reported[@]} == ${#all[@]})); then
    echo "$prog: every process has exited" >&2
    exit 1
  fi
done
