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
prog=run-split
env_dir="${STREAMER_ENV_DIR:-$here/env}"
root="${STREAMER_SPLIT_DIR:-.streamer-split}"
ready_timeout="${READY_TIMEOUT:-30}"
# shellcheck source-path=SCRIPTDIR source=run-common.sh
. "$here/run-common.sh"

find_bin
mkdir -p "$root/logs"
use_secret

# Every listen address must be free, the connection role's edge listener
# included.
for role in auth connection progress gateway; do
  for var in STREAMER_AUTH_LISTEN STREAMER_CONNECTION_LISTEN STREAMER_CONNECTION_EDGE_LISTEN \
    STREAMER_PROGRESS_LISTEN STREAMER_GATEWAY_LISTEN STREAMER_METRICS_LISTEN; do
    refuse_busy "$(setting "$role" "$var")" "$var in $env_dir/$role.env"
  done
done

stop_on_exit

# The stores first, then auth, then the edge, which attaches to
# ConnectionService (it retries until it can). Each role's data directory
# follows STREAMER_SPLIT_DIR so several copies can run from different
# directories.
for role in connection progress auth gateway; do
  start_process "$role" "$role" ""
done

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
  gateway_ready "$gateway_addr"
}
await_ready "$ready_timeout" is_ready

# Auth created the development key in its data directory on first start.
token="$("$bin" token --data-dir "$root/auth" 2>/dev/null || true)"
conn_addr="$(setting connection STREAMER_CONNECTION_LISTEN)"
trust="$(setting connection STREAMER_TRUST)"

cat <<EOF

Streamer is running as four processes (Ctrl-C stops them all)

  WebSocket          ws://$gateway_addr/?Authorization=<token>
  AuthService        $(setting auth STREAMER_AUTH_LISTEN)  metrics http://$(setting auth STREAMER_METRICS_LISTEN)/metrics
  ConnectionService  $(setting connection STREAMER_CONNECTION_LISTEN)  metrics http://$(setting connection STREAMER_METRICS_LISTEN)/metrics
  EdgeService        $edge_addr  (ConnectionService's edge stream: the gateway's STREAMER_CONNECTION_EDGE_URL)
  ProgressService    $(setting progress STREAMER_PROGRESS_LISTEN)  metrics http://$(setting progress STREAMER_METRICS_LISTEN)/metrics
  Gateway            $gateway_addr  metrics http://$(setting gateway STREAMER_METRICS_LISTEN)/metrics
  Logs               $root/logs/
$(store_note "embedded: files in the data directories of auth, connection and progress under $root/")
$(trust_note "$trust")

Try it:
$(grpc_try "$conn_addr" "$trust")
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
  for role in "${names[@]}"; do
    if ! alive "$role"; then
      echo "run-split: $role exited (status $status); stopping the others" >&2
      tail -n 20 "$root/logs/$role.log" >&2 || true
    fi
  done
  exit 1
fi
