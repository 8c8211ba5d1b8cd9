#!/usr/bin/env python3
"""Checks the objects `helm template` rendered for one scenario of helm/test.sh.

    check_rendered.py SCENARIO RENDERED.yaml [STREAMER_BINARY]

Every fact is checked on every scenario unless it names one; a failed fact
prints what was wrong, and the exit status is 1 if any failed. With the
streamer binary given, the env vars each role gets are checked against the
ones that role's `--help` lists, so a renamed flag breaks this test.

Trust (TRUST below, per scenario): every role's container gets STREAMER_TRUST;
in mode token also STREAMER_SERVICE_SECRET_FILE, naming a file of a read-only
Secret volume that projects the expected key of the expected Secret (the
chart's own, holding 48 random characters, or trust.existingSecret, in which
case the chart renders no Secret); in mode none no secret and no Secret.

The edge stream: the connection container listens on its port `edge`
(STREAMER_CONNECTION_EDGE_LISTEN), both its Services carry that port, its
liveness probe checks it, and the gateway dials it (STREAMER_CONNECTION_EDGE_URL,
never STREAMER_CONNECTION_URL). The NetworkPolicy (NETWORK_POLICY below, per
scenario) is evaluated as a network plugin would, for a set of callers
(`admits`): this release's gateway pods reach the edge port and nothing else
does (not the other roles, not another release's gateways, not a pod of
another namespace, not an address outside the cluster), while the public gRPC
port and the metrics port admit whom they admitted without the policy, or,
where the scenario names peers, exactly those (and the release's progress
pods for the gRPC port).

Balancing: the roles call each other through headless Services (clusterIP
None), whose names resolve to every pod, so that each caller spreads its
calls over every replica instead of pinning one HTTP/2 connection to the one
virtual IP of a ClusterIP Service. auth, connection and progress each have
exactly one, selecting exactly that role's pods and carrying its grpc port
(connection's its edge port too); only connection's publishes not-ready
addresses (the edges attach to a replica while it starts), and progress's
while it is the embedded store's StatefulSet governing Service. The
gateway's and connection's STREAMER_AUTH_URL, connection's
STREAMER_PROGRESS_URL and progress's STREAMER_CONNECTION_URL name them, and a
cert-manager certificate is valid for every name the others dial. Every role
keeps its ClusterIP Service for callers outside the release.

Scale (DYNAMODB below, per scenario): with the embedded store connection and
progress are StatefulSets of one replica with their volume, there is no
HorizontalPodAutoscaler, PDBs only for auth and gateway, and the gateway's
edge stream dials the connection Service. With store.type dynamodb they are
Deployments of the expected replicas without a volume or STREAMER_DATA_DIR;
the gateway's STREAMER_CONNECTION_EDGE_URL names the connection headless
Service (so the name resolves to every replica); every role has the expected
HPA (which owns the Deployment's replicas) and PDB (which keeps at least one
replica up); progress lists its async actions.

Topics and slow clients (TOPIC_ENV below, per scenario): connection gets the
topic history and the client and conflated topic patterns (comma-joined), the
gateway the socket send buffer, exactly where the values set them; unset,
the variable is absent, so the binary's default applies.
"""

import ipaddress

import base64
import posixpath
import re
import subprocess
import sys
from urllib.parse import urlparse

import yaml

ROLES = {
    # role: (kind, gRPC service full name or None, main port name)
    "auth": ("Deployment", "streamer.v1.AuthService", "grpc"),
    "connection": ("StatefulSet", "streamer.v1.ConnectionService", "grpc"),
    "progress": ("StatefulSet", "streamer.v1.ProgressService", "grpc"),
    "gateway": ("Deployment", None, "http"),
}
# Read by the telemetry module, not by a flag, so --help does not list them:
# the log filter and OpenTelemetry's standard variables.
ENV_OUTSIDE_HELP = {"STREAMER_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME",
                    "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
# scenario: the traces' collector endpoint and sample ratio every role gets
# (absent: no OTEL_* variable at all).
TRACES = {"production": ("http://otel-collector.observability:4317", "0.25")}
# Scenarios that only change the trust values: every other fact is the one
# of the scenario named here.
BASE_SCENARIO = {"trust-none": "defaults", "trust-existing": "defaults",
                 "trust-mtls": "defaults", "trust-mtls-cert-manager": "defaults",
                 "trust-token-tls": "defaults", "store-dynamodb": "defaults",
                 "dynamodb-scaled": "defaults", "dynamodb-one-progress": "defaults"}
ALL_ROLES = ["auth", "connection", "gateway", "progress"]
# Scenarios with store.type dynamodb: the tables' prefix and region; the
# replicas each role's Deployment renders (None: none rendered, left to its
# HPA); each role's HPA as (minReplicas, maxReplicas, {resource: target %});
# the roles with a PDB; STREAMER_ASYNC_ACTIONS, STREAMER_EDGE_LEASE_SECS and
# STREAMER_STORE_POLL_MS (None: not set); the ServiceAccount's annotations.
DYNAMODB = {
    "store-dynamodb": {
        "prefix": "prod-streamer-", "region": "eu-west-1",
        "replicas": {"auth": 1, "gateway": 2, "connection": 2, "progress": 2},
        "hpa": {}, "pdbs": ALL_ROLES, "async_actions": "generate_report",
        "edge_lease": None, "store_poll_ms": None, "sa_annotations": None,
    },
    "dynamodb-scaled": {
        "prefix": "streamer-", "region": "us-east-1",
        "replicas": {"auth": None, "gateway": None, "connection": 3, "progress": None},
        "hpa": {"auth": (2, 4, {"cpu": 60}), "gateway": (3, 12, {"cpu": 70}),
                "progress": (2, 6, {"cpu": 75, "memory": 80})},
        "pdbs": ALL_ROLES, "async_actions": "generate_report,export",
        "edge_lease": "20", "store_poll_ms": "250",
        "sa_annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/streamer"},
    },
    "dynamodb-one-progress": {
        "prefix": "streamer-", "region": None,
        "replicas": {"auth": 1, "gateway": 2, "connection": 2, "progress": 1},
        "hpa": {}, "pdbs": ["auth", "gateway"], "async_actions": None,
        "edge_lease": None, "store_poll_ms": None, "sa_annotations": None,
    },
}
# scenario: the topic and slow-client settings each role gets, as the values
# give them: ConnectionService's topic history and topic patterns (lists
# joined with commas), the edge's socket send buffer. Every variable named
# here is absent wherever the table does not give it a value (the values
# leave it unset, so the binary's default applies), on every role.
TOPIC_ENV = {
    "production": {
        "connection": {"STREAMER_TOPIC_HISTORY_MESSAGES": "10000", "STREAMER_TOPIC_HISTORY_SECS": "2592000",
                       "STREAMER_CLIENT_TOPICS": "users/{user_id}/**,public/*",
                       "STREAMER_CONFLATE_TOPICS": "prices/**,users/*/presence"},
        "gateway": {"STREAMER_SOCKET_SEND_BUFFER": "262144"},
    },
    "ephemeral": {
        "connection": {"STREAMER_TOPIC_HISTORY_MESSAGES": "1", "STREAMER_CONFLATE_TOPICS": "ticker/*"},
        "gateway": {"STREAMER_SOCKET_SEND_BUFFER": "4096"},
    },
}
TOPIC_VARS = ["STREAMER_TOPIC_HISTORY_MESSAGES", "STREAMER_TOPIC_HISTORY_SECS", "STREAMER_CLIENT_TOPICS",
              "STREAMER_CONFLATE_TOPICS", "STREAMER_SOCKET_SEND_BUFFER"]
# Where auth's keys come from (kind, field, name); the development key elsewhere.
AUTH_KEYS = {"production": ("secret", "secretName", "streamer-auth-keys"),
             "ephemeral": ("configMap", "name", "streamer-jwks"),
             "dynamodb-scaled": ("secret", "secretName", "streamer-auth-keys")}
# scenario: (trust mode, the Secret the pods mount or None for the chart's
# own, its key). Mode none mounts nothing.
TRUST = {
    "defaults": ("token", None, "service-secret"),
    "production": ("token", "streamer-service-secret", "token-secret"),
    "ephemeral": ("token", None, "service-secret"),
    "trust-none": ("none", None, None),
    "trust-existing": ("token", "my-service-secret", "service-secret"),
    "trust-mtls": ("mtls", None, None),
    "trust-mtls-cert-manager": ("mtls", None, None),
    "trust-token-tls": ("token", None, "service-secret"),
    "store-dynamodb": ("token", None, "service-secret"),
    "dynamodb-scaled": ("mtls", None, None),
    "dynamodb-one-progress": ("token", None, "service-secret"),
}
# scenario: the Secret each role's certificate comes from when gRPC runs over
# TLS (None: plain text), and whether cert-manager issues them.
TLS = {
    "trust-mtls": ({r: f"{r}-tls" for r in ("auth", "connection", "progress", "gateway")}, False),
    "trust-mtls-cert-manager": ({r: f"rel-streamer-{r}-tls" for r in ("auth", "connection", "progress", "gateway")}, True),
    "trust-token-tls": ({r: f"{r}-tls" for r in ("auth", "connection", "progress", "gateway")}, False),
    "dynamodb-scaled": ({r: f"rel-streamer-{r}-tls" for r in ("auth", "connection", "progress", "gateway")}, True),
}
# The roles each role's certificate grants (its URI names), by role.
CERT_ROLES = {"auth": [], "connection": ["backend"], "progress": ["backend"], "gateway": ["edge"]}

failures = []


# scenario: the NetworkPolicy it renders: None when disabled, else the
# namespaces whose pods networkPolicy.grpcFrom and metricsFrom admit (None:
# anyone).
NETWORK_POLICY = {
    "defaults": {"grpc": None, "metrics": None},
    "production": {"grpc": {"backends"}, "metrics": {"monitoring"}},
    "ephemeral": None,
    "trust-none": {"grpc": None, "metrics": None},
    "trust-existing": {"grpc": None, "metrics": None},
    "trust-mtls": {"grpc": None, "metrics": None},
    "trust-mtls-cert-manager": {"grpc": None, "metrics": None},
    "trust-token-tls": {"grpc": None, "metrics": None},
    "store-dynamodb": {"grpc": None, "metrics": None},
    "dynamodb-scaled": {"grpc": None, "metrics": None},
    "dynamodb-one-progress": {"grpc": None, "metrics": None},
}
# Where the callers the NetworkPolicy is evaluated for come from.
RELEASE_NAMESPACE = "streaming"
POD_ADDRESS = "10.244.1.23"
OUTSIDE_ADDRESS = "203.0.113.7"


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def load(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    for d in docs:
        check(
            isinstance(d, dict) and d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"),
            f"a document without apiVersion/kind/metadata.name: {str(d)[:120]}",
        )
    return docs


def role_of(obj):
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def selects(selector, labels):
    """A Kubernetes LabelSelector (matchLabels and matchExpressions); {} selects everything."""
    if not matches(selector.get("matchLabels") or {}, labels):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def peer_admits(peer, caller):
    """Whether one NetworkPolicyPeer matches a caller: {"namespace", "labels"
    (None for an address outside the cluster), "address"}."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(caller["address"])
        return address in ipaddress.ip_network(block["cidr"]) and \
            not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if caller["labels"] is None:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": caller["namespace"]}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif caller["namespace"] != RELEASE_NAMESPACE:
        return False
    return selects(peer.get("podSelector", {}), caller["labels"])


def admits(policy, caller, port_name, container_ports):
    """Whether an Ingress NetworkPolicy admits `caller` to the container port
    named `port_name` (TCP). container_ports: name -> number."""
    number = container_ports[port_name]
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports") or []
        port_ok = not ports
        for p in ports:
            if p.get("protocol", "TCP") != "TCP":
                continue
            if "port" not in p:
                port_ok = True
            elif isinstance(p["port"], str):
                port_ok |= p["port"] == port_name
            else:
                port_ok |= p["port"] <= number <= p.get("endPort", p["port"])
        peers = rule.get("from") or []
        if port_ok and (not peers or any(peer_admits(peer, caller) for peer in peers)):
            return True
    return False


def env_map(container):
    return {e["name"]: e for e in container.get("env", [])}


def help_env(binary, role):
    text = subprocess.run([binary, role, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: (STREAMER_\w+)=", text))


def main():
    scenario, path = sys.argv[1], sys.argv[2]
    binary = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    docs = load(path)
    trust_mode, trust_secret, trust_key = TRUST[scenario]
    tls_secrets, cert_manager = TLS.get(scenario, (None, False))
    scenario_name, scenario = scenario, BASE_SCENARIO.get(scenario, scenario)
    dynamodb = DYNAMODB.get(scenario_name)
    headless_name = "rel-streamer-connection-headless"

    seen = set()
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        check(key not in seen, f"two objects {key}")
        seen.add(key)
        check(d["metadata"].get("namespace", "streaming") == "streaming" or d["kind"] == "ServiceMonitor",
              f"{key} is not in the release namespace")

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}

    # The service secret: an existing Secret the chart only names, or one the
    # chart makes with a random 48-character value; none at all in mode none.
    secrets = [d for d in docs if d["kind"] == "Secret"]
    trust_secret_name = None
    if trust_mode == "token" and trust_secret:
        trust_secret_name = trust_secret
        check(not secrets, f"trust.existingSecret given, yet the chart renders Secrets {[s['metadata']['name'] for s in secrets]}")
    elif trust_mode == "token":
        if check(len(secrets) == 1, f"expected the chart's one service Secret, found {len(secrets)}"):
            s = secrets[0]
            trust_secret_name = s["metadata"]["name"]
            check(trust_secret_name.endswith("-service-secret"), f"the service Secret is named {trust_secret_name}")
            data = s.get("data", {})
            check(list(data) == [trust_key], f"the service Secret has keys {list(data)}, expected [{trust_key!r}]")
            value = base64.b64decode(data.get(trust_key, "")).decode("ascii", "replace")
            check(len(value) == 48 and value.isalnum(),
                  f"the service secret is {len(value)} characters, expected 48 random alphanumerics")
    else:
        check(not secrets, f"mode {trust_mode} renders Secrets {[s['metadata']['name'] for s in secrets]}")

    # Certificates: cert-manager issues one per role into the Secret the role
    # mounts, valid for the Service name the others dial, naming the role's
    # roles; without cert-manager the chart issues none.
    certificates = {role_of(d): d for d in docs if d["kind"] == "Certificate"}
    # The roles the others dial through a headless Service (`-headless`).
    balanced_roles = ("auth", "connection", "progress")
    if cert_manager:
        check(sorted(certificates) == sorted(CERT_ROLES), f"Certificates for {sorted(certificates)}")
        for role, cert in certificates.items():
            spec = cert["spec"]
            fqdn = f"rel-streamer-{role}.streaming.svc.cluster.local"
            check(spec.get("secretName") == tls_secrets[role], f"{role} Certificate: secretName {spec.get('secretName')}")
            check(fqdn in spec.get("dnsNames", []), f"{role} Certificate: {fqdn} not among {spec.get('dnsNames')}")
            # The role's Service names, and those of its headless Service,
            # which the other roles dial (the gateway has none).
            services_named = [f"rel-streamer-{role}"] + ([f"rel-streamer-{role}-headless"] if role in balanced_roles else [])
            want_names = [f"{n}{suffix}" for n in services_named
                          for suffix in ("", ".streaming", ".streaming.svc", ".streaming.svc.cluster.local")]
            check(spec.get("dnsNames") == want_names, f"{role} Certificate: dnsNames {spec.get('dnsNames')}, want {want_names}")
            check(sorted(spec.get("uris", [])) == [f"urn:streamer:role:{r}" for r in CERT_ROLES[role]],
                  f"{role} Certificate: uris {spec.get('uris')}")
            check({"server auth", "client auth"} <= set(spec.get("usages", [])), f"{role} Certificate: usages {spec.get('usages')}")
            check(spec.get("issuerRef", {}).get("name") == "streamer-ca", f"{role} Certificate: issuerRef {spec.get('issuerRef')}")
    else:
        check(not certificates, f"Certificates rendered without cert-manager: {sorted(certificates)}")

    workloads = {}
    for role, (kind, grpc_service, port_name) in ROLES.items():
        if dynamodb:
            kind = "Deployment"
        found = [d for d in docs if d["kind"] == kind and role_of(d) == role]
        if not check(len(found) == 1, f"{role}: expected one {kind}, found {len(found)}"):
            continue
        workloads[role] = found[0]
    # The release's names (fullnameOverride changes them).
    if "connection" in workloads:
        headless_name = workloads["connection"]["metadata"]["name"] + "-headless"

    for role, w in workloads.items():
        kind, grpc_service, port_name = ROLES[role]
        kind = w["kind"]
        spec = w["spec"]
        pod = spec["template"]["spec"]
        pod_labels = spec["template"]["metadata"]["labels"]
        name = f"{role} {kind}"
        check(matches(spec["selector"]["matchLabels"], pod_labels), f"{name}: selector does not match its pod labels")

        # One replica while the store is embedded; the others scale.
        if kind == "StatefulSet":
            check(spec["replicas"] == 1, f"{name}: replicas is {spec['replicas']}, must be 1")
            check(spec["serviceName"] in services and services[spec["serviceName"]]["spec"].get("clusterIP") == "None",
                  f"{name}: serviceName is not a headless Service of the chart")
            claims = spec.get("volumeClaimTemplates", [])
            data_volumes = [v for v in pod.get("volumes", []) if v["name"] == "data"]
            if scenario == "ephemeral":
                check(not claims and data_volumes and "emptyDir" in data_volumes[0],
                      f"{name}: persistence off should give an emptyDir data volume")
            else:
                check(len(claims) == 1 and claims[0]["metadata"]["name"] == "data",
                      f"{name}: expected one volumeClaimTemplate named data")
                check(not data_volumes, f"{name}: a pod volume shadows the data claim")
        elif dynamodb:
            # Several replicas, or as many as the HPA says (then the
            # Deployment renders none, so an upgrade does not reset them).
            expected = dynamodb["replicas"][role]
            check(spec.get("replicas") == expected, f"{name}: replicas {spec.get('replicas')}, expected {expected}")
            if role in ("connection", "progress"):
                data_mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["name"] == "data"]
                check(not spec.get("volumeClaimTemplates") and not data_mounts
                      and "data" not in [v["name"] for v in pod.get("volumes", [])],
                      f"{name}: a data volume with the DynamoDB store")
                check("STREAMER_DATA_DIR" not in env_map(pod["containers"][0]), f"{name}: STREAMER_DATA_DIR with the DynamoDB store")
                rolling = spec.get("strategy", {}).get("rollingUpdate", {})
                check(rolling.get("maxUnavailable") == 0 and rolling.get("maxSurge") == 1,
                      f"{name}: a rollout may take a replica down before its successor is up: {spec.get('strategy')}")
        else:
            expected = {"auth": {"defaults": 1, "production": 3, "ephemeral": 2},
                        "gateway": {"defaults": 2, "production": 4, "ephemeral": 2}}[role][scenario]
            check(spec["replicas"] == expected, f"{name}: replicas {spec['replicas']}, expected {expected}")

        # Pod security.
        psc = pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot is not true")
        check(psc.get("runAsUser") == 10001 and psc.get("fsGroup") == 10001, f"{name}: pod uid/fsGroup is not 10001")
        check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccompProfile is not RuntimeDefault")
        check(pod.get("terminationGracePeriodSeconds", 30) > 10, f"{name}: grace period not above the 10 s drain")
        check(pod.get("automountServiceAccountToken") is False, f"{name}: service account token is mounted")

        check(len(pod["containers"]) == 1, f"{name}: expected one container")
        c = pod["containers"][0]
        csc = c.get("securityContext", {})
        check(csc.get("readOnlyRootFilesystem") is True, f"{name}: root filesystem is writable")
        check(csc.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation allowed")
        check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities not dropped")
        check(c.get("args") == [role], f"{name}: args are {c.get('args')}, expected [{role}]")
        check("resources" in c and c["resources"].get("requests"), f"{name}: no resource requests")

        volume_names = [v["name"] for v in pod.get("volumes", [])]
        check(len(volume_names) == len(set(volume_names)), f"{name}: duplicate volume names {volume_names}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        check("/tmp" in mounts and "emptyDir" in volumes.get(mounts["/tmp"]["name"], {}) if "/tmp" in mounts else False,
              f"{name}: /tmp is not an emptyDir")
        claim_names = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            check(m["name"] in volumes or m["name"] in claim_names, f"{name}: mount {m['name']} has no volume")

        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        check(port_name in ports and "metrics" in ports, f"{name}: ports {sorted(ports)} lack {port_name}/metrics")
        env = env_map(c)
        check(env.get("STREAMER_METRICS_LISTEN", {}).get("value") == f"0.0.0.0:{ports.get('metrics')}",
              f"{name}: STREAMER_METRICS_LISTEN does not match the metrics port")
        listen_var = f"STREAMER_{role.upper()}_LISTEN"
        check(env.get(listen_var, {}).get("value") == f"0.0.0.0:{ports.get(port_name)}",
              f"{name}: {listen_var} does not match the {port_name} port")

        # Probes: native gRPC against the health service, HTTP for the edge;
        # with TLS, which the kubelet's gRPC probes cannot speak, HTTP on the
        # metrics port (/readyz: every gRPC listener SERVING).
        if grpc_service and tls_secrets:
            for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                h = c.get(probe, {}).get("httpGet", {})
                check(h.get("path") == path and h.get("port") == ports.get("metrics"),
                      f"{name}: {probe} is not GET {path} on the metrics port")
        elif grpc_service:
            # ConnectionService's liveness probe checks its edge listener, so
            # that both of its listeners are probed.
            probe_ports = {"startupProbe": "grpc", "readinessProbe": "grpc",
                           "livenessProbe": "edge" if role == "connection" else "grpc"}
            for probe, probe_port in probe_ports.items():
                g = c.get(probe, {}).get("grpc")
                if check(g is not None, f"{name}: {probe} is not a gRPC probe"):
                    check(g["port"] == ports.get(probe_port), f"{name}: {probe} port is not the {probe_port} port")
            check(c.get("readinessProbe", {}).get("grpc", {}).get("service") == grpc_service,
                  f"{name}: readiness does not ask for {grpc_service}")
            check(c.get("livenessProbe", {}).get("grpc", {}).get("service") == "",
                  f"{name}: liveness does not ask for the server (\"\")")
        else:
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                h = c.get(probe, {}).get("httpGet", {})
                check(h.get("path") == path and h.get("port") == ports.get("http"),
                      f"{name}: {probe} is not GET {path} on the http port")
            # The edge's limits, as the values give them.
            limits = {"STREAMER_MESSAGE_RATE": "100", "STREAMER_MAX_CONNECTIONS": "10000",
                      "STREAMER_IDLE_TIMEOUT_SECS": "75", "STREAMER_ALLOWED_ORIGINS": None}
            if scenario == "production":
                limits = {"STREAMER_MESSAGE_RATE": "50", "STREAMER_MAX_CONNECTIONS": "15000",
                          "STREAMER_IDLE_TIMEOUT_SECS": "60", "STREAMER_CONNECTION_RATE_PER_IP": "0",
                          "STREAMER_ALLOWED_ORIGINS": "https://app.example.com,https://admin.example.com"}
            for var, value in limits.items():
                check(env.get(var, {}).get("value") == value, f"{name}: {var} is {env.get(var)}, expected {value!r}")
            check(env.get("STREAMER_EDGE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
                  f"{name}: STREAMER_EDGE_ID is not the pod name")
            sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            check(sleep == (5 if scenario == "production" else None), f"{name}: preStop sleep is {sleep}")

        # Trust: every role is told its mode explicitly (unset, a role on
        # 0.0.0.0 without a secret refuses to start); in mode token the secret
        # file it names is the right key of the right Secret, mounted read-only.
        check(env.get("STREAMER_TRUST", {}).get("value") == trust_mode,
              f"{name}: STREAMER_TRUST is {env.get('STREAMER_TRUST')}, expected {trust_mode!r}")
        secret_volumes = {n: v for n, v in volumes.items() if "secret" in v}
        trust_volumes = [n for n, v in secret_volumes.items() if v["secret"].get("secretName") == trust_secret_name]
        if trust_mode == "token":
            secret_file = env.get("STREAMER_SERVICE_SECRET_FILE", {}).get("value", "")
            if check(secret_file.startswith("/"), f"{name}: STREAMER_SERVICE_SECRET_FILE is {secret_file!r}"):
                directory, filename = posixpath.split(secret_file)
                mount = mounts.get(directory)
                if check(mount is not None, f"{name}: nothing is mounted at {directory}, where the secret file should be"):
                    check(mount.get("readOnly") is True and "subPath" not in mount,
                          f"{name}: the secret mount is not read-only, or uses subPath (no updates)")
                    volume = volumes.get(mount["name"], {}).get("secret")
                    if check(volume is not None, f"{name}: {directory} is not a Secret volume"):
                        check(volume.get("secretName") == trust_secret_name,
                              f"{name}: the secret file comes from Secret {volume.get('secretName')}, "
                              f"expected {trust_secret_name}")
                        items = volume.get("items")
                        check(items is not None and {"key": trust_key, "path": filename} in items,
                              f"{name}: Secret key {trust_key!r} is not projected as {filename!r}: items {items}")
                        check(volume.get("optional") is not True, f"{name}: the secret volume is optional")
                        mode = volume.get("defaultMode", 0o644)
                        group_ok = psc.get("fsGroup") is not None and mode & 0o040
                        check(mode & 0o022 == 0 and (mode & 0o004 or group_ok),
                              f"{name}: secret file mode {oct(mode)} is writable or unreadable by uid 10001")
            check(len(trust_volumes) == 1, f"{name}: {len(trust_volumes)} volumes of Secret {trust_secret_name}")
        else:
            check("STREAMER_SERVICE_SECRET_FILE" not in env, f"{name}: mode {trust_mode} but STREAMER_SERVICE_SECRET_FILE is set")
            check("service-secret" not in volumes and not [m for m in mounts if m.startswith("/etc/streamer/trust")],
                  f"{name}: mode {trust_mode} but a service secret is mounted")

        # TLS: the three files STREAMER_TLS_* name are the three keys of the
        # role's certificate Secret, in one read-only mount (no subPath, so a
        # renewal reaches the pod).
        tls_vars = {"STREAMER_TLS_CERT": "tls.crt", "STREAMER_TLS_KEY": "tls.key", "STREAMER_TLS_CA": "ca.crt"}
        if tls_secrets:
            directories = set()
            for var, key in tls_vars.items():
                path = env.get(var, {}).get("value", "")
                directory, filename = posixpath.split(path)
                directories.add(directory)
                mount = mounts.get(directory)
                if not check(path.startswith("/") and mount is not None, f"{name}: {var}={path!r} is not in a mount"):
                    continue
                check(mount.get("readOnly") is True and "subPath" not in mount, f"{name}: the TLS mount is writable or uses subPath")
                volume = volumes.get(mount["name"], {}).get("secret", {})
                check(volume.get("secretName") == tls_secrets[role],
                      f"{name}: {var} comes from Secret {volume.get('secretName')}, expected {tls_secrets[role]}")
                check({"key": key, "path": filename} in volume.get("items", []), f"{name}: {key} is not projected as {filename}")
                mode = volume.get("defaultMode", 0o644)
                check(mode & 0o022 == 0, f"{name}: TLS file mode {oct(mode)} is writable")
            check(len(directories) == 1, f"{name}: the TLS files are in {sorted(directories)}")
        else:
            check(not set(tls_vars) & set(env), f"{name}: TLS variables without TLS")

        # The store: every stateful role is told which, the gateway nothing.
        store = "dynamodb" if dynamodb else "embedded"
        if role == "gateway":
            check("STREAMER_STORE" not in env, f"{name}: STREAMER_STORE is set on the gateway")
        else:
            check(env.get("STREAMER_STORE", {}).get("value") == store, f"{name}: STREAMER_STORE is {env.get('STREAMER_STORE')}")
            want = {"STREAMER_DYNAMODB_TABLE_PREFIX": dynamodb["prefix"], "STREAMER_DYNAMODB_REGION": dynamodb["region"],
                    "STREAMER_DYNAMODB_ENDPOINT_URL": None} if dynamodb else {
                    "STREAMER_DYNAMODB_TABLE_PREFIX": None, "STREAMER_DYNAMODB_REGION": None}
            for var, value in want.items():
                check(env.get(var, {}).get("value") == value, f"{name}: {var} is {env.get(var)}, expected {value!r}")

        # What only several replicas need: the edge lease, the store's poll
        # and the async actions, as the scenario gives them (not set by
        # default, so the embedded rendering is unchanged).
        scaled_env = {"connection": {"STREAMER_EDGE_LEASE_SECS": dynamodb["edge_lease"] if dynamodb else None},
                      "progress": {"STREAMER_STORE_POLL_MS": dynamodb["store_poll_ms"] if dynamodb else None}}
        if dynamodb:
            scaled_env["progress"]["STREAMER_ASYNC_ACTIONS"] = dynamodb["async_actions"]
        for var, value in scaled_env.get(role, {}).items():
            check(env.get(var, {}).get("value") == value, f"{name}: {var} is {env.get(var)}, expected {value!r}")

        # Topics and slow clients: each setting on the role that reads it, as
        # the values give it, and nowhere when they leave it unset.
        want_topics = TOPIC_ENV.get(scenario_name, TOPIC_ENV.get(scenario, {})).get(role, {})
        for var in TOPIC_VARS:
            check(env.get(var, {}).get("value") == want_topics.get(var) and (var in env) == (var in want_topics),
                  f"{name}: {var} is {env.get(var)}, expected {want_topics.get(var)!r}")

        # Issuers' JWKS URLs, as ISSUER=URL pairs; and no key files then.
        if role == "auth":
            jwks = ("https://id.example.com/=https://id.example.com/jwks.json,partner=https://partner.example/keys"
                    if scenario_name == "trust-mtls-cert-manager" else None)
            check(env.get("STREAMER_AUTH_JWKS", {}).get("value") == jwks,
                  f"{name}: STREAMER_AUTH_JWKS is {env.get('STREAMER_AUTH_JWKS')}, expected {jwks!r}")

        # Only variables this role reads.
        if binary:
            known = help_env(binary, role) | ENV_OUTSIDE_HELP
            for var in env:
                check(var in known, f"{name}: sets {var}, which `streamer {role}` does not read")

        # Each role's Service selects exactly this workload and its port name.
        svc = services.get(w["metadata"]["name"])
        if check(svc is not None, f"{name}: no Service named like it"):
            # A Service with a virtual address (ClusterIP unless the values
            # say otherwise), for callers outside the release: grpcurl,
            # backends, routers, processors.
            check(svc["spec"].get("clusterIP") != "None",
                  f"{name}: its Service is headless (clusterIP None), not one for callers outside the release")
            check(svc["spec"]["selector"] == spec["selector"]["matchLabels"], f"{name}: its Service selects other pods")
            for p in svc["spec"]["ports"]:
                check(p["targetPort"] in ports, f"{name}: Service targetPort {p['targetPort']} is not a container port")
        for other, ow in workloads.items():
            if other != role and svc is not None:
                check(not matches(svc["spec"]["selector"], ow["spec"]["template"]["metadata"]["labels"]),
                      f"{role} Service also selects {other} pods")

    # The wiring: each URL names a Service of the chart, on the named port,
    # in the release namespace; the gateway dials ConnectionService's edge
    # stream, not its public API. The calls between the roles go through the
    # target's headless Service, whose name resolves to every replica, so
    # that the caller spreads them over all (a ClusterIP Service's one
    # address would pin one HTTP/2 connection to one pod); the edge stream
    # too with DynamoDB (with the embedded store there is one replica).
    wiring = [("gateway", "STREAMER_AUTH_URL", "auth", "grpc", True),
              ("gateway", "STREAMER_CONNECTION_EDGE_URL", "connection", "edge", bool(dynamodb)),
              ("progress", "STREAMER_CONNECTION_URL", "connection", "grpc", True),
              ("connection", "STREAMER_PROGRESS_URL", "progress", "grpc", True),
              ("connection", "STREAMER_AUTH_URL", "auth", "grpc", True)]
    for role, var, target, port_name, every_replica in wiring:
        if role not in workloads or target not in workloads:
            continue
        value = env_map(workloads[role]["spec"]["template"]["spec"]["containers"][0]).get(var, {}).get("value", "")
        url = urlparse(value)
        host = (url.hostname or "").split(".")
        svc = services.get(host[0]) if host else None
        target_name = workloads[target]["metadata"]["name"]
        if every_replica:
            target_name += "-headless"
        check(url.scheme == ("https" if tls_secrets else "http") and svc is not None and host[0] == target_name
              and host[1:] == ["streaming", "svc", "cluster", "local"],
              f"{role}: {var}={value!r} does not name the {target_name} Service in the release namespace")
        if svc is not None:
            check((svc["spec"].get("clusterIP") == "None") == every_replica,
                  f"{role}: {var} names {host[0]}, which is {'not ' if every_replica else ''}a headless Service"
                  + (" (its one address would pin the calls to one pod)" if every_replica else ""))
        if cert_manager and svc is not None:
            # The name the client verifies the target's certificate against.
            check(url.hostname in certificates.get(target, {}).get("spec", {}).get("dnsNames", []),
                  f"{role}: {var} names {url.hostname}, which the {target} certificate does not")
        if svc is not None:
            check(url.port in [p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name],
                  f"{role}: {var} port is not the {target} Service's {port_name} port")
    if "gateway" in workloads:
        gateway_env = env_map(workloads["gateway"]["spec"]["template"]["spec"]["containers"][0])
        check("STREAMER_CONNECTION_URL" not in gateway_env,
              "gateway: STREAMER_CONNECTION_URL is set (the edge dials STREAMER_CONNECTION_EDGE_URL)")
    if "connection" in workloads:
        connection = workloads["connection"]["spec"]["template"]["spec"]["containers"][0]
        edge_port = [p["containerPort"] for p in connection.get("ports", []) if p["name"] == "edge"]
        listen = env_map(connection).get("STREAMER_CONNECTION_EDGE_LISTEN", {}).get("value", "")
        check(edge_port and listen == f"0.0.0.0:{edge_port[0]}",
              f"connection: STREAMER_CONNECTION_EDGE_LISTEN={listen!r} is not its edge port {edge_port}")
        check(len({p["containerPort"] for p in connection.get("ports", [])}) == len(connection.get("ports", [])),
              "connection: two container ports share a number")
        # The Service the gateways dial and the headless one both carry it.
        conn_name = workloads["connection"]["metadata"]["name"]
        headless = workloads["connection"]["spec"].get("serviceName") or headless_name
        check(headless == headless_name, f"connection: its headless Service is {headless}")
        for svc_name in (conn_name, headless):
            svc_ports = {p["name"]: p for p in services.get(svc_name, {}).get("spec", {}).get("ports", [])}
            check(svc_ports.get("edge", {}).get("targetPort") == "edge",
                  f"Service {svc_name}: no port `edge` targeting the container's edge port")

    # The headless Services (clusterIP None), one per role the others dial,
    # so that the name resolves to every replica: auth's and (with DynamoDB)
    # progress's publish only ready pods, which alone get calls; connection's
    # also not-ready ones, so the edges attach to a replica while it starts;
    # with the embedded store progress's is also its StatefulSet's governing
    # Service, which keeps publishing not-ready pods. Each selects exactly its
    # role's pods and carries its grpc port (connection's its edge port too).
    headless_services = sorted(n for n, s in services.items()
                               if s["spec"].get("clusterIP") == "None" and not n.endswith("-metrics"))
    want_headless = {w["metadata"]["name"] + "-headless": role for role, w in workloads.items() if role in balanced_roles}
    check(headless_services == sorted(want_headless), f"headless Services {headless_services}, want {sorted(want_headless)}")
    publish_not_ready = {"auth": False, "connection": True, "progress": not dynamodb}
    for hs_name, hs_role in want_headless.items():
        if hs_name not in services:
            continue
        hs = services[hs_name]["spec"]
        check(hs.get("publishNotReadyAddresses", False) is publish_not_ready[hs_role],
              f"{hs_name}: publishNotReadyAddresses {hs.get('publishNotReadyAddresses')}, want {publish_not_ready[hs_role]}")
        for role, w in workloads.items():
            selected = matches(hs.get("selector", {}), w["spec"]["template"]["metadata"]["labels"])
            check(bool(hs.get("selector")) and selected == (role == hs_role),
                  f"{hs_name} {'misses' if role == hs_role else 'selects'} the {role} pods")
        container_ports = {p["name"]: p["containerPort"]
                           for p in workloads[hs_role]["spec"]["template"]["spec"]["containers"][0].get("ports", [])}
        svc_ports = {p["name"]: p for p in hs.get("ports", [])}
        for port_name in (["grpc", "edge"] if hs_role == "connection" else ["grpc"]):
            p = svc_ports.get(port_name, {})
            check(port_name in container_ports and p.get("port") == container_ports[port_name]
                  and p.get("targetPort") == port_name and p.get("appProtocol") == "grpc" and p.get("protocol", "TCP") == "TCP",
                  f"{hs_name}: its {port_name} port {p or None} is not the {hs_role} pods' {container_ports.get(port_name)}")

    # The NetworkPolicy, evaluated for callers inside and outside the
    # release: only this release's gateway pods reach the edge port; the
    # public gRPC port and metrics admit whom the scenario says.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    want = NETWORK_POLICY[scenario_name]
    if want is None:
        check(not policies, "a NetworkPolicy was rendered while disabled")
    elif check(len(policies) == 1, f"{len(policies)} NetworkPolicies rendered, want 1") and \
            "connection" in workloads and "gateway" in workloads:
        policy = policies[0]
        spec = policy["spec"]
        labels = {role: w["spec"]["template"]["metadata"]["labels"] for role, w in workloads.items()}
        check(selects(spec.get("podSelector", {}), labels["connection"]),
              "the NetworkPolicy does not select the connection pods")
        for role in ("auth", "progress", "gateway"):
            if role in labels:
                check(not selects(spec.get("podSelector", {}), labels[role]), f"the NetworkPolicy also selects the {role} pods")
        check(spec.get("policyTypes") == ["Ingress"], f"NetworkPolicy policyTypes {spec.get('policyTypes')}, want [Ingress]")
        connection = workloads["connection"]["spec"]["template"]["spec"]["containers"][0]
        container_ports = {p["name"]: p["containerPort"] for p in connection.get("ports", [])}
        for p in (p for r in spec.get("ingress") or [] for p in r.get("ports") or []):
            check(not isinstance(p.get("port"), str) or p["port"] in container_ports,
                  f"the NetworkPolicy names port {p.get('port')!r}, which the connection container lacks")

        def pod(role_labels, namespace=RELEASE_NAMESPACE):
            return {"namespace": namespace, "labels": role_labels, "address": POD_ADDRESS}

        other_release = dict(labels["gateway"], **{"app.kubernetes.io/instance": "other"})
        callers = {
            "this release's gateway pods": pod(labels["gateway"]),
            "the auth pods": pod(labels.get("auth", {})),
            "the progress pods": pod(labels.get("progress", {})),
            "the connection pods themselves": pod(labels["connection"]),
            "another release's gateway pods": pod(other_release),
            "gateway-labelled pods in another namespace": pod(labels["gateway"], "elsewhere"),
            "an unlabelled pod of the namespace": pod({}),
            "a pod of namespace backends": pod({"app": "billing"}, "backends"),
            "a pod of namespace monitoring": pod({"app.kubernetes.io/name": "prometheus"}, "monitoring"),
            "an address outside the cluster": {"namespace": None, "labels": None, "address": OUTSIDE_ADDRESS},
        }
        for who, caller in callers.items():
            is_gateway = who == "this release's gateway pods"
            check(admits(policy, caller, "edge", container_ports) == is_gateway,
                  f"the NetworkPolicy {'refuses' if is_gateway else 'admits'} {who} on the edge port")
            for port_name, namespaces in (("grpc", want["grpc"]), ("metrics", want["metrics"])):
                if namespaces is None:
                    expected = True
                else:
                    expected = caller["labels"] is not None and (
                        caller["namespace"] in namespaces or (port_name == "grpc" and who == "the progress pods"))
                check(admits(policy, caller, port_name, container_ports) == expected,
                      f"the NetworkPolicy {'refuses' if expected else 'admits'} {who} on the {port_name} port")
        # The calls the wiring makes to the pods this policy selects reach
        # them: through a headless Service a caller dials each pod's address
        # directly, so the Service's target port (a container port) decides.
        for role, var, target, _, _ in wiring:
            if target != "connection" or role not in labels:
                continue
            url = urlparse(env_map(workloads[role]["spec"]["template"]["spec"]["containers"][0]).get(var, {}).get("value", ""))
            svc = services.get((url.hostname or "").split(".")[0], {})
            target_ports = [p["targetPort"] for p in svc.get("spec", {}).get("ports", []) if p["port"] == url.port]
            if check(len(target_ports) == 1 and target_ports[0] in container_ports,
                     f"{role}: {var} leads to no container port of the connection pods"):
                check(admits(policy, pod(labels[role]), target_ports[0], container_ports),
                      f"the NetworkPolicy refuses the {role} pods' calls through {var} (port {target_ports[0]})")

    # PodDisruptionBudgets only for the roles that scale (with DynamoDB
    # connection and progress too, while they may run more than one replica):
    # each keeps at least one replica of its role up.
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    pdb_roles = sorted(role_of(p) for p in pdbs)
    want_pdbs = sorted(dynamodb["pdbs"]) if dynamodb else ([] if scenario == "ephemeral" else ["auth", "gateway"])
    check(pdb_roles == want_pdbs, f"PDBs for {pdb_roles}, want {want_pdbs}")
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    for p in pdbs:
        role = role_of(p)
        w = workloads.get(role)
        check(w is not None and matches(p["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]),
              f"PDB {p['metadata']['name']} selects no workload")
        hpa = next((h for h in hpas if role_of(h) == role), None)
        least = hpa["spec"]["minReplicas"] if hpa else (w or {}).get("spec", {}).get("replicas", 1)
        if least > 1:
            check(isinstance(p["spec"].get("maxUnavailable"), int) and p["spec"]["maxUnavailable"] < least
                  and "minAvailable" not in p["spec"],
                  f"PDB {p['metadata']['name']}: maxUnavailable {p['spec'].get('maxUnavailable')} of {least} replicas")

    # HorizontalPodAutoscalers: none unless enabled (never with the embedded
    # store's StatefulSets); each scales its role's Deployment, which then
    # renders no replicas of its own.
    want_hpa = dynamodb["hpa"] if dynamodb else {}
    check(sorted(role_of(h) for h in hpas) == sorted(want_hpa), f"HPAs for {sorted(role_of(h) for h in hpas)}, want {sorted(want_hpa)}")
    for h in hpas:
        role = role_of(h)
        if role not in want_hpa or role not in workloads:
            continue
        w = workloads[role]
        minimum, maximum, targets = want_hpa[role]
        spec = h["spec"]
        check(h["apiVersion"] == "autoscaling/v2", f"HPA {role}: apiVersion {h['apiVersion']}")
        check(spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": w["metadata"]["name"]}
              and w["kind"] == "Deployment", f"HPA {role}: scales {spec['scaleTargetRef']}")
        check("replicas" not in w["spec"], f"HPA {role}: its Deployment still renders replicas")
        check((spec.get("minReplicas"), spec.get("maxReplicas")) == (minimum, maximum),
              f"HPA {role}: {spec.get('minReplicas')}..{spec.get('maxReplicas')} replicas, want {minimum}..{maximum}")
        got = {m["resource"]["name"]: m["resource"]["target"].get("averageUtilization") for m in spec.get("metrics", [])
               if m.get("type") == "Resource" and m["resource"]["target"].get("type") == "Utilization"}
        check(got == targets and len(spec.get("metrics", [])) == len(targets), f"HPA {role}: targets {spec.get('metrics')}, want {targets}")
        container = w["spec"]["template"]["spec"]["containers"][0]
        for resource in targets:
            check(resource in container.get("resources", {}).get("requests", {}),
                  f"HPA {role}: a {resource} target, but the container requests no {resource}")
    if dynamodb and "gateway" in want_hpa and hpas:
        gateway_hpa = next(h for h in hpas if role_of(h) == "gateway")
        check(gateway_hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds") == 600,
              f"HPA gateway: behavior {gateway_hpa['spec'].get('behavior')}")

    # Scenario facts.
    auth = workloads.get("auth")
    if auth:
        apod = auth["spec"]["template"]["spec"]
        aenv = env_map(apod["containers"][0])
        keys_volume = next((v for v in apod.get("volumes", []) if v["name"] == "auth-keys"), None)
        source = AUTH_KEYS.get(scenario_name, AUTH_KEYS.get(scenario))
        if source is None:
            check("STREAMER_AUTH_KEYS" not in aenv and keys_volume is None, "defaults: auth should use the development key")
        else:
            check(keys_volume is not None and keys_volume.get(source[0], {}).get(source[1]) == source[2],
                  f"{scenario}: auth keys are not mounted from {source[0]} {source[2]}")
            mount = next((m for m in apod["containers"][0]["volumeMounts"] if m["name"] == "auth-keys"), {})
            check(mount.get("readOnly") is True and aenv.get("STREAMER_AUTH_KEYS", {}).get("value") == mount.get("mountPath"),
                  f"{scenario}: STREAMER_AUTH_KEYS does not point at the read-only key mount")
        if scenario == "production":
            check(aenv.get("STREAMER_ALLOWED_TENANTS", {}).get("value") == "acme,globex", "production: allowed tenants")
    traces = TRACES.get(scenario_name, TRACES.get(scenario))
    for role in ALL_ROLES:
        renv = env_map(workloads[role]["spec"]["template"]["spec"]["containers"][0])
        otel = {k: v.get("value") for k, v in renv.items() if k.startswith("OTEL_")}
        expected = {} if traces is None else {
            "OTEL_EXPORTER_OTLP_ENDPOINT": traces[0], "OTEL_SERVICE_NAME": f"streamer-{role}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": traces[1]}
        check(otel == expected, f"{scenario}: {role}'s trace settings are {otel}, expected {expected}")
    if scenario == "production":
        penv = env_map(workloads["progress"]["spec"]["template"]["spec"]["containers"][0])
        check(penv.get("STREAMER_ASYNC_ACTIONS", {}).get("value") == "generate_report,export", "production: async actions")
        check(penv.get("STREAMER_PROGRESS_RATE", {}).get("value") == "2.5", "production: progress rate")
        genv = env_map(workloads["gateway"]["spec"]["template"]["spec"]["containers"][0])
        check(genv.get("STREAMER_MAX_FRAME_BYTES", {}).get("value") == "4194304",
              f"production: max frame bytes rendered as {genv.get('STREAMER_MAX_FRAME_BYTES')}")
        image = workloads["gateway"]["spec"]["template"]["spec"]["containers"][0]["image"]
        check(image.startswith("registry.example.com/streamer@sha256:"), f"production: image {image}")
        claim = workloads["connection"]["spec"]["volumeClaimTemplates"][0]["spec"]
        check(claim.get("storageClassName") == "fast-ssd", "production: connection storage class")
        claim = workloads["progress"]["spec"]["volumeClaimTemplates"][0]["spec"]
        check(claim["resources"]["requests"]["storage"] == "5Gi", "production: progress volume size")
        ingress = [d for d in docs if d["kind"] == "Ingress"]
        check(len(ingress) == 1 and ingress[0]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
              == workloads["gateway"]["metadata"]["name"], "production: the Ingress does not route to the gateway")

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if scenario == "production":
        if check(len(monitors) == 1, "production: expected one ServiceMonitor"):
            m = monitors[0]
            check(m["metadata"]["labels"].get("release") == "prometheus", "ServiceMonitor lacks its extra label")
            targets = [s for s in services.values() if matches(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            if check(len(targets) == 1, f"ServiceMonitor selects {len(targets)} Services"):
                t = targets[0]
                check(t["spec"]["ports"][0]["targetPort"] == "metrics", "metrics Service does not target the metrics port")
                for role, w in workloads.items():
                    check(matches(t["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]),
                          f"metrics Service misses the {role} pods")
                check(m["spec"]["endpoints"][0]["port"] == t["spec"]["ports"][0]["name"], "ServiceMonitor port name")
    else:
        check(not monitors, f"{scenario}: a ServiceMonitor was rendered while disabled")

    # Alerts and the dashboard (their contents: helm/check_monitoring.py).
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    boards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    if scenario == "production":
        if check(len(rules) == 1, "production: expected one PrometheusRule"):
            check(rules[0]["metadata"]["labels"].get("release") == "prometheus", "PrometheusRule lacks its extra label")
            check(all(r["labels"].get("team") == "realtime" for g in rules[0]["spec"]["groups"] for r in g["rules"]),
                  "an alert lacks metrics.prometheusRule.alertLabels")
        if check(len(boards) == 1, "production: expected one dashboard ConfigMap"):
            b = boards[0]
            check(b["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboard lacks the sidecar's label")
            check(b["metadata"].get("annotations", {}).get("grafana_folder") == "Streamer", "dashboard lacks its folder")
    else:
        check(not rules and not boards, f"{scenario}: alerts or a dashboard rendered while disabled")

    sa = [d for d in docs if d["kind"] == "ServiceAccount"]
    check(len(sa) == (0 if scenario == "ephemeral" else 1), f"{scenario}: {len(sa)} ServiceAccounts")
    # Its annotations (the cloud credentials, e.g. IRSA's role), as given.
    if sa:
        want_annotations = dynamodb["sa_annotations"] if dynamodb else None
        check(sa[0]["metadata"].get("annotations") == want_annotations,
              f"ServiceAccount annotations {sa[0]['metadata'].get('annotations')}, want {want_annotations}")
        for role, w in workloads.items():
            check(w["spec"]["template"]["spec"].get("serviceAccountName") == sa[0]["metadata"]["name"],
                  f"{role}: runs under another ServiceAccount than the chart's")

    for f in failures:
        print(f"       {scenario_name}: {f}")
    kinds = sorted({d['kind'] for d in docs})
    print(f"       {scenario_name}: {len(docs)} objects ({', '.join(kinds)}), {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
