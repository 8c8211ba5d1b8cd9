#!/usr/bin/env python3
"""Runs the pods `helm template` rendered, as local processes, and checks they work.

    run_rendered.py SCENARIO RENDERED.yaml STREAMER_BINARY [--expect-refusal]

Each role's container becomes one process of the streamer binary, started as
the kubelet would start it: the image's entrypoint (`streamer`) with the
container's args, and exactly the container's environment. What Kubernetes
would provide is stood in for locally:

  - replicas: as many processes of a role as its workload's replicas (or its
    HorizontalPodAutoscaler's minReplicas), each a pod of its own;
  - ports: every container port of every pod gets a free local port (the
    listen addresses stay 0.0.0.0, as rendered, since that is what decides
    whether a role without caller authentication refuses to start);
  - Services: a URL naming a Service of the release points at the local port
    of the container port it targets, on one of the pods it selects (each
    client pod its own, as kube-proxy would spread them); a URL naming a
    headless Service (clusterIP None), whose name resolves to every pod it
    selects, becomes the list of every such pod's URL, comma-separated, which
    the binary takes the same way (it attaches to every address);
  - the DynamoDB store (STREAMER_STORE=dynamodb): moto's DynamoDB-protocol
    server on a local port, with the tables `streamer dynamodb create-tables`
    makes under the rendered prefix and region; every pod reaches it through
    STREAMER_DYNAMODB_ENDPOINT_URL, with AWS credentials in its environment
    as a stand-in for the IAM role (IRSA) the cluster would give it;
  - volumes: emptyDir and PersistentVolumeClaim volumes are empty directories;
    a Secret volume holds the items of the Secret the chart rendered or, for
    a Secret the chart only names (trust.existingSecret), a random secret made
    here, as an operator would; a Secret or ConfigMap of auth.keys holds a
    fresh EC public key (openssl); mounted files are written with the
    volume's defaultMode. Env values under a mount path are moved to its
    directory;
  - fieldRef metadata.name: the pod's name;
  - the pod's user: run as root, this runs each role as the rendered
    runAsUser/runAsGroup with fsGroup as a supplementary group, and gives
    the volumes to fsGroup as the kubelet does (group read on Secret files,
    group write on data volumes), so a secret the pod's user cannot read or
    a data directory it cannot write fails here as it would in a cluster.
    Anything else it wrote to would be the root-owned pod directory, where it
    cannot write: a stand-in for the read-only root filesystem.

Then, as the probes would, it waits for every pod to be ready (the gRPC
readiness probe's health check, without any credential; the gateway's
/readyz, which needs the edge attached to ConnectionService) and checks that
every other probe of every pod passes too (ConnectionService's liveness
probe asks its edge listener). It checks the edge stream: every gateway's
STREAMER_CONNECTION_EDGE_URL leads to the `edge` port of every connection
pod, and every connection pod counts every gateway attached to it
(streamer_edges_attached on its metrics port), that port serves EdgeService and
the public port does not, and in mode token EdgeService refuses a caller
without a token (Unauthenticated) and a backend's token (PermissionDenied:
only role `edge`). And it checks the trust mode from outside: in mode token
a call without a token is refused (Unauthenticated) and one with a token
minted the way NOTES.txt says (`streamer service-token` run with the
connection container's environment, as `kubectl exec` would) succeeds, on
every connection pod; in mode none the call succeeds without one.

With TLS (mode mtls, or trust.tls.enabled), each role's certificate Secret
holds what `streamer certs` issued to that role (valid for 127.0.0.1), the
probes are HTTP on the metrics port, and the checks dial with TLS: a
plain-text call gets nothing; in mode mtls a call without a client
certificate is Unauthenticated, one with the `backend` certificate succeeds,
and EdgeService refuses it (PermissionDenied: only role edge).

--expect-refusal drops STREAMER_TRUST and STREAMER_SERVICE_SECRET_FILE from
every container and expects each gRPC role to refuse to start with an error
naming --trust: the control that shows the chart's trust settings are what
lets the roles start on 0.0.0.0.

Needs grpcurl on PATH. Exit status 1 if any check failed.
"""

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlparse

import yaml

ROLES = ["auth", "connection", "progress", "gateway"]
READY_TIMEOUT = 60
# How pods of a Deployment's ReplicaSet are named after it.
POD_SUFFIXES = ["x2k8p", "q9w4z", "m3n7v", "b6c2d", "t8r5j", "h4k9s"]

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def free_port():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


# Where `streamer certs` wrote a CA and a certificate per role, when the
# chart mounts TLS certificates (a Secret with tls.crt, tls.key, ca.crt).
CERTS = {"dir": None}
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}


def grpcurl(port, method, body=None, token=None, tls=False, cert=None):
    """tls: dial with TLS, trusting the CA; cert: present that holder's
    certificate from CERTS (`backend`, `gateway`, ...)."""
    if tls:
        cmd = ["grpcurl", "-cacert", os.path.join(CERTS["dir"], "ca.crt"), "-max-time", "5"]
        if cert:
            cmd += ["-cert", os.path.join(CERTS["dir"], cert, "tls.crt"),
                    "-key", os.path.join(CERTS["dir"], cert, "tls.key")]
    else:
        cmd = ["grpcurl", "-plaintext", "-max-time", "5"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if body is not None:
        cmd += ["-d", json.dumps(body)]
    cmd += [f"127.0.0.1:{port}", method]  # method "list": the services reflection lists
    return subprocess.run(cmd, capture_output=True, text=True)


def write_public_key(directory):
    """An issuer's public key, as a Secret or ConfigMap of auth.keys holds it."""
    key = subprocess.run("openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout",
                         shell=True, capture_output=True, text=True, check=True).stdout
    with open(os.path.join(directory, "issuer-1.pem"), "w") as f:
        f.write(key)


def start_moto(root):
    """moto's DynamoDB-protocol server on a loopback port it picks, serving
    one request at a time (as deploy/test.sh runs it). Returns (process, URL)."""
    log = open(os.path.join(root, "moto.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", """import logging
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False)
print(server.server_port, flush=True)
server.serve_forever()"""], stdout=subprocess.PIPE, stderr=log, text=True)
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        raise SystemExit(f"moto's server did not start: {open(os.path.join(root, 'moto.log')).read()[-400:]}")
    return proc, f"http://127.0.0.1:{port}"


# What the cluster would give a pod that uses DynamoDB (through its IAM role);
# moto takes any credentials.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "helm-test", "AWS_SECRET_ACCESS_KEY": "helm-test", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


class Pod:
    def __init__(self, role, workload, root, secret_data, index=0):
        self.role = role
        self.workload = workload
        self.index = index
        self.name = workload["metadata"]["name"] + (
            f"-{index}" if workload["kind"] == "StatefulSet" else f"-7d4b9c-{POD_SUFFIXES[index]}")
        pod = workload["spec"]["template"]["spec"]
        self.container = pod["containers"][0]
        self.dir = os.path.join(root, f"{role}-{index}")
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        # The pod's user, as the kubelet runs it (when this runs as root).
        sc = dict(pod.get("securityContext", {}), **self.container.get("securityContext", {}))
        self.uid, self.gid, self.fs_group = sc.get("runAsUser"), sc.get("runAsGroup"), sc.get("fsGroup")
        self.as_pod_user = os.geteuid() == 0 and self.uid is not None
        # containerPort -> local port, and port name -> local port.
        self.ports = {}
        self.named_ports = {}
        for p in self.container.get("ports", []):
            local = free_port()
            self.ports[p["containerPort"]] = local
            self.named_ports[p["name"]] = local
        # Volumes: a directory each.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        self.mounts = {}  # mountPath -> local directory
        for m in self.container.get("volumeMounts", []):
            local = os.path.join(self.dir, "volumes", m["name"])
            if not os.path.isdir(local):
                os.makedirs(local)
                os.chmod(os.path.dirname(local), 0o755)
                v = volumes.get(m["name"])
                if v is not None and "secret" in v:
                    self.fill_secret(local, v["secret"], secret_data)
                    self.own(local, writable=False)
                elif v is not None and "configMap" in v:
                    write_public_key(local)
                    self.own(local, writable=False)
                elif v is None and m["name"] not in claims:
                    raise SystemExit(f"{role}: mount {m['name']} has no volume")
                else:
                    self.own(local, writable=True)
            self.mounts[m["mountPath"].rstrip("/")] = local

    def own(self, directory, writable):
        """What the kubelet does to a volume for the pod's fsGroup."""
        if not self.as_pod_user:
            return
        if writable:  # emptyDir, or a new claim: the pod's to write
            os.chmod(directory, 0o777 if self.fs_group is None else 0o2770)
        else:
            os.chmod(directory, 0o755)
        if self.fs_group is None:
            return
        for base, dirs, files in os.walk(directory):
            for path in [base] + [os.path.join(base, f) for f in files]:
                os.chown(path, 0, self.fs_group)
                if path != base:
                    os.chmod(path, os.stat(path).st_mode | (0o440 if not writable else 0o660))
        if writable:
            os.chown(directory, 0, self.fs_group)

    def preexec(self):
        """Drops to the pod's user and groups, as the container runtime does."""
        if not self.as_pod_user:
            return None
        uid, gid = self.uid, self.gid if self.gid is not None else self.uid
        groups = [self.fs_group] if self.fs_group is not None else []

        def drop():
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        return drop

    def fill_secret(self, directory, source, secret_data):
        name = source["secretName"]
        if name not in secret_data and not source.get("items"):
            # A Secret of token keys the chart only names (auth.keys).
            write_public_key(directory)
            return
        if name not in secret_data and {i["key"] for i in source.get("items", [])} == TLS_KEYS:
            # A role's certificate the chart only names: the one `streamer
            # certs` issued to this role, as an operator (or cert-manager)
            # would provide it.
            secret_data[name] = {key: open(os.path.join(CERTS["dir"], self.role, key)).read() for key in TLS_KEYS}
        if name not in secret_data:
            # A Secret the chart only names: made here, as an operator would
            # (`head -c 48 /dev/urandom | base64`), with the keys it projects.
            value = base64.b64encode(secrets.token_bytes(48)).decode() + "\n"
            secret_data[name] = {item["key"]: value for item in source.get("items", [])}
        data = secret_data[name]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise SystemExit(f"{self.role}: Secret {name} has no key {item['key']!r}")
            path = os.path.join(directory, item["path"])
            with open(path, "w") as f:
                f.write(data[item["key"]])
            os.chmod(path, item.get("mode", source.get("defaultMode", 0o644)))

    def local_path(self, value):
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return self.mounts[mount] + value[len(mount):]
        return value

    def env(self, service_ports, drop=(), dynamodb_url=None):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir}
        for e in self.container.get("env", []):
            if e["name"] in drop:
                continue
            if "value" in e:
                value = str(e["value"])
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                value = self.name
            else:
                raise SystemExit(f"{self.role}: env {e['name']} has a source this test does not know: {e}")
            value = re.sub(r"^0\.0\.0\.0:(\d+)$", lambda m: f"0.0.0.0:{self.ports.get(int(m.group(1)), m.group(1))}", value)
            url = urlparse(value)
            if url.scheme in ("http", "https") and url.hostname:
                target = service_ports.get((url.hostname.split(".")[0], url.port))
                if target is not None:
                    headless, ports = target
                    if headless:  # the name resolves to every pod
                        value = ",".join(f"{url.scheme}://127.0.0.1:{p}" for p in ports)
                    else:  # the Service's address leads to one of them
                        value = f"{url.scheme}://127.0.0.1:{ports[self.index % len(ports)]}"
            env[e["name"]] = self.local_path(value)
        if dynamodb_url and env.get("STREAMER_STORE") == "dynamodb":
            env.update(AWS_ENV)
            env["STREAMER_DYNAMODB_ENDPOINT_URL"] = dynamodb_url
        return env


def main():
    scenario, path, binary = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
    expect_refusal = "--expect-refusal" in sys.argv[4:]
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    root = tempfile.mkdtemp(prefix="streamer-pods-")
    os.chmod(root, 0o755)
    # The pods run as uid 10001, which may not reach the build tree (a clone
    # in a private directory): the binary goes where the image would have
    # it, readable and executable by anyone.
    image_binary = os.path.join(root, "streamer")
    shutil.copyfile(binary, image_binary)
    os.chmod(image_binary, 0o755)
    binary = image_binary
    procs = {}
    try:
        # Certificates the chart's TLS Secrets stand for: valid for 127.0.0.1,
        # where every Service URL is pointed.
        CERTS["dir"] = os.path.join(root, "certs")
        subprocess.run([binary, "certs", "--out", CERTS["dir"], "--hosts", "localhost,127.0.0.1"],
                       check=True, capture_output=True)
        secret_data = {
            d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
            for d in docs if d["kind"] == "Secret"
        }
        # Every role's workload, and as many pods of it as it has replicas
        # (its HPA's minReplicas when the HPA owns them).
        hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in docs if h["kind"] == "HorizontalPodAutoscaler"}
        pods = {}
        for role in ROLES:
            found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                     and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == role]
            if not check(len(found) == 1, f"{role}: expected one workload, found {len(found)}"):
                return 1
            workload = found[0]
            hpa = hpas.get(workload["metadata"]["name"])
            replicas = workload["spec"].get("replicas", hpa["spec"]["minReplicas"] if hpa else 1)
            if not check(1 <= replicas <= len(POD_SUFFIXES), f"{role}: {replicas} replicas"):
                return 1
            pods[role] = [Pod(role, workload, root, secret_data, i) for i in range(replicas)]
        # (Service name, Service port) -> (headless, the local ports of the
        # pods it selects).
        service_ports = {}
        for svc in (d for d in docs if d["kind"] == "Service"):
            headless = svc["spec"].get("clusterIP") == "None"
            for p in svc["spec"]["ports"]:
                for role_pods in pods.values():
                    labels = role_pods[0].workload["spec"]["template"]["metadata"]["labels"]
                    if not all(labels.get(k) == v for k, v in svc["spec"].get("selector", {}).items()):
                        continue
                    local = [pod.named_ports.get(p["targetPort"]) or pod.ports.get(p["targetPort"]) for pod in role_pods]
                    if all(local):
                        service_ports.setdefault((svc["metadata"]["name"], p["port"]), (headless, []))[1].extend(local)

        # The DynamoDB store: a local server with the tables made under the
        # rendered prefix and region, as an operator makes them beforehand.
        dynamodb_url = None
        if any(e.get("value") == "dynamodb" for role_pods in pods.values()
               for e in role_pods[0].container.get("env", []) if e["name"] == "STREAMER_STORE"):
            moto, dynamodb_url = start_moto(root)
            procs["moto"] = moto
            table_env = {e["name"]: str(e["value"]) for e in pods["connection"][0].container["env"]
                         if e["name"].startswith("STREAMER_DYNAMODB_")}
            made = subprocess.run([binary, "dynamodb", "create-tables"], capture_output=True, text=True,
                                  env=dict(table_env, PATH=os.environ.get("PATH", ""), STREAMER_LOG_FORMAT="plain",
                                           STREAMER_DYNAMODB_ENDPOINT_URL=dynamodb_url, **AWS_ENV))
            if not check(made.returncode == 0, f"streamer dynamodb create-tables failed: {made.stdout}{made.stderr}"):
                return report(scenario, "")

        drop = ("STREAMER_TRUST", "STREAMER_SERVICE_SECRET_FILE") if expect_refusal else ()
        envs = {role: [pod.env(service_ports, drop, dynamodb_url) for pod in role_pods] for role, role_pods in pods.items()}
        for role in ("connection", "progress", "auth", "gateway"):
            for pod, env in zip(pods[role], envs[role]):
                log = open(os.path.join(pod.dir, "log"), "w")
                args = pod.container.get("command", ["streamer"])[1:] + pod.container.get("args", [])
                procs[pod.name] = subprocess.Popen([binary] + args, env=env, cwd=pod.dir, preexec_fn=pod.preexec(),
                                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        all_pods = [pod for role in ROLES for pod in pods[role]]

        def log_of(pod):
            return open(os.path.join(pod.dir, "log")).read()

        if expect_refusal:
            for pod in (pod for role in ("auth", "connection", "progress") for pod in pods[role]):
                try:
                    status = procs[pod.name].wait(10)
                except subprocess.TimeoutExpired:
                    status = None
                check(status not in (None, 0) and "--trust" in log_of(pod),
                      f"{pod.name}: without STREAMER_TRUST on 0.0.0.0 it should refuse to start naming --trust "
                      f"(status {status}): {log_of(pod)[-400:]}")
            return report(scenario, "without the trust settings, every gRPC role refuses to start")

        # A probe of a pod, as the kubelet runs it.
        def probe_passes(pod, kind="readinessProbe"):
            probe = pod.container[kind]
            if "grpc" in probe:
                port = pod.ports[probe["grpc"]["port"]]
                r = grpcurl(port, "grpc.health.v1.Health/Check", {"service": probe["grpc"].get("service", "")})
                return r.returncode == 0 and '"SERVING"' in r.stdout
            http = probe["httpGet"]
            port = pod.named_ports.get(http["port"]) or pod.ports[http["port"]]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{http['path']}", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        deadline = time.monotonic() + READY_TIMEOUT
        waiting = {pod.name: pod for pod in all_pods}
        while waiting and time.monotonic() < deadline:
            for name, pod in list(waiting.items()):
                if procs[name].poll() is not None:
                    check(False, f"{name} exited with status {procs[name].returncode}: {log_of(pod)[-600:]}")
                    return report(scenario, "")
                if probe_passes(pod):
                    del waiting[name]
            time.sleep(0.2)
        if not check(not waiting, f"not ready after {READY_TIMEOUT} s: {sorted(waiting)}"):
            for name, pod in sorted(waiting.items()):
                print(f"       {name} log: {log_of(pod)[-600:]}")
            return report(scenario, "")

        for pod in all_pods:
            for kind in ("startupProbe", "livenessProbe"):
                if kind in pod.container:
                    check(probe_passes(pod, kind), f"{pod.name}: the {kind} fails once the pod is ready: "
                                                   f"{pod.container[kind]}")

        # The edge stream: every gateway was pointed at every connection
        # pod's edge port (one URL per pod: what the headless Service's name
        # resolves to), and every connection pod counts every gateway as
        # attached to it.
        connection_env = envs["connection"][0]
        mode = connection_env.get("STREAMER_TRUST")
        tls = "STREAMER_TLS_CERT" in connection_env
        scheme = "https" if tls else "http"
        conn_port = pods["connection"][0].named_ports["grpc"]
        edge_port = pods["connection"][0].named_ports.get("edge")
        edge_urls = sorted(f"{scheme}://127.0.0.1:{pod.named_ports.get('edge')}" for pod in pods["connection"])
        for pod, env in zip(pods["gateway"], envs["gateway"]):
            edge_url = env.get("STREAMER_CONNECTION_EDGE_URL", "")
            check(sorted(edge_url.split(",")) == edge_urls,
                  f"{pod.name}: STREAMER_CONNECTION_EDGE_URL leads to {edge_url}, not every connection pod's edge port "
                  f"({','.join(edge_urls)})")

        def edges_attached(pod):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{pod.named_ports['metrics']}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return None
            found = re.search(r"^streamer_edges_attached(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
            return float(found.group(1)) if found else None

        gateways = len(pods["gateway"])
        # Generous: with both cores busy, attaching and a scrape can be slow.
        deadline = time.monotonic() + 60
        attached = {}
        while time.monotonic() < deadline:
            attached = {pod.name: edges_attached(pod) for pod in pods["connection"]}
            if all(n == gateways for n in attached.values()):
                break
            time.sleep(0.5)
        check(all(n == gateways for n in attached.values()),
              f"edges attached per connection pod {attached}, want all {gateways} gateways on each")
        if edge_port:
            health = grpcurl(edge_port, "grpc.health.v1.Health/Check", {"service": "streamer.v1.EdgeService"}, tls=tls)
            check(health.returncode == 0 and '"SERVING"' in health.stdout,
                  f"connection: the edge port does not serve EdgeService health: {health.stdout}{health.stderr}")
            edge_list, public_list = grpcurl(edge_port, "list", tls=tls), grpcurl(conn_port, "list", tls=tls)
            check("streamer.v1.EdgeService" in edge_list.stdout.split()
                  and "streamer.v1.ConnectionService" not in edge_list.stdout.split(),
                  f"connection: the edge port serves {edge_list.stdout.split()}")
            check("streamer.v1.EdgeService" not in public_list.stdout.split(),
                  f"connection: the public port serves EdgeService too: {public_list.stdout.split()}")
        attach = ("streamer.v1.EdgeService/Attach", {})
        call = ("streamer.v1.ConnectionService/ListConnections", {"tenant_id": "demo-tenant"})
        anonymous = grpcurl(conn_port, *call, tls=tls)
        if tls:
            plain = grpcurl(conn_port, *call)
            check(plain.returncode != 0, f"TLS: a plain-text call was answered: {plain.stdout}")
        if mode == "mtls":
            if edge_port:
                r = grpcurl(edge_port, *attach, tls=True, cert="backend")
                check(r.returncode != 0 and "Code: PermissionDenied" in r.stderr,
                      f"mode mtls: EdgeService/Attach with a backend's certificate was not refused: {r.stdout}{r.stderr}")
            check(anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr,
                  f"mode mtls: a call without a client certificate was not refused as Unauthenticated: "
                  f"{anonymous.stdout}{anonymous.stderr}")
            for pod in pods["connection"]:
                r = grpcurl(pod.named_ports["grpc"], *call, tls=True, cert="backend")
                check(r.returncode == 0, f"mode mtls: a call to {pod.name} with a backend certificate failed: {r.stdout}{r.stderr}")
            what = ("every role ready over TLS, every gateway attached to every connection pod through its edge port with its certificate; "
                    "a call without a client certificate is Unauthenticated, with a backend's it succeeds, "
                    "plain text gets nothing; EdgeService only for role edge")
        elif mode == "token":
            if edge_port:
                r = grpcurl(edge_port, *attach, tls=tls)
                check(r.returncode != 0 and "Code: Unauthenticated" in r.stderr,
                      f"mode token: EdgeService/Attach without a token was not refused: {r.stdout}{r.stderr}")
            check(anonymous.returncode != 0 and "Code: Unauthenticated" in anonymous.stderr,
                  f"mode token: a call without a token was not refused as Unauthenticated: "
                  f"{anonymous.stdout}{anonymous.stderr}")
            # What NOTES.txt says: kubectl exec into the connection pod, which
            # runs the command with the container's environment.
            minted = subprocess.run([binary, "service-token", "--sub", "grpcurl", "--roles", "backend", "--ttl", "3600"],
                                    env=connection_env, cwd=pods["connection"][0].dir,
                                    preexec_fn=pods["connection"][0].preexec(), capture_output=True, text=True)
            if check(minted.returncode == 0 and minted.stdout.strip(),
                     f"`streamer service-token` in the connection container failed: {minted.stderr}"):
                for pod in pods["connection"]:
                    r = grpcurl(pod.named_ports["grpc"], *call, token=minted.stdout.strip(), tls=tls)
                    check(r.returncode == 0, f"mode token: a call to {pod.name} with a minted token failed: {r.stdout}{r.stderr}")
                if edge_port:
                    r = grpcurl(edge_port, *attach, token=minted.stdout.strip(), tls=tls)
                    check(r.returncode != 0 and "Code: PermissionDenied" in r.stderr,
                          f"mode token: EdgeService/Attach with a backend's token was not refused: {r.stdout}{r.stderr}")
            what = ("every role ready, every gateway attached to every connection pod through its edge port; a call without a token is "
                    "Unauthenticated, with a service token it succeeds; EdgeService only for role edge"
                    + ("; all over TLS, plain text gets nothing" if tls else ""))
        else:
            check(anonymous.returncode == 0, f"mode {mode}: a call without a token failed: {anonymous.stderr}")
            what = f"every role ready, every gateway attached to every connection pod through its edge port; mode {mode}: a call without a token succeeds"
        if len(all_pods) > len(ROLES):
            what += "; " + ", ".join(f"{len(pods[role])} {role}" for role in ROLES) + " pods"
        if dynamodb_url:
            what += ", on the DynamoDB store (a local server)"
        for pod in all_pods:
            check(procs[pod.name].poll() is None, f"{pod.name} exited during the checks: {log_of(pod)[-400:]}")
        return report(scenario, what)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)


def report(scenario, what):
    for f in failures:
        print(f"       {scenario}: {f}")
    if not failures and what:
        print(f"       {scenario}: {what}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
