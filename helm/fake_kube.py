#!/usr/bin/env python3
"""The least of a Kubernetes API server that `helm template --dry-run=server` needs.

    fake_kube.py SECRETS.json     # prints the port it listens on (127.0.0.1, ephemeral)

It lets helm/test.sh render the chart the way `helm upgrade` does, with the
templates' `lookup` reading objects from a cluster: SECRETS.json maps a
Secret's name to its `data` (base64 values), and every namespace has those
Secrets, owned by release `rel` as an earlier install would have left them.
Any other object does not exist. Discovery answers for the kinds the chart
renders, so helm can map them. Nothing is ever created: dry-run creations are
echoed back.
"""

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRETS = json.load(open(sys.argv[1]))
RESOURCES = {
    "v1": [("secrets", "Secret"), ("services", "Service"), ("serviceaccounts", "ServiceAccount"),
           ("configmaps", "ConfigMap")],
    "apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("ingresses", "Ingress"), ("networkpolicies", "NetworkPolicy")],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor")],
}
NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}


def resource_list(group_version):
    return {
        "kind": "APIResourceList",
        "groupVersion": group_version,
        "resources": [{"name": r, "singularName": k.lower(), "namespaced": True, "kind": k,
                       "verbs": ["get", "list", "create", "update", "patch", "delete"]}
                      for r, k in RESOURCES[group_version]],
    }


class Handler(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for gv in RESOURCES:
                if "/" in gv:
                    group, version = gv.split("/")
                    entry = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        if path == "/api/v1":
            return self.reply(200, resource_list("v1"))
        m = re.fullmatch(r"/apis/([^/]+/[^/]+)", path)
        if m and m.group(1) in RESOURCES:
            return self.reply(200, resource_list(m.group(1)))
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path)
        if m and m.group(2) in SECRETS:
            namespace, name = m.groups()
            return self.reply(200, {
                "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": SECRETS[name],
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "Helm"},
                             "annotations": {"meta.helm.sh/release-name": "rel",
                                             "meta.helm.sh/release-namespace": namespace}},
            })
        if re.fullmatch(r"/api/v1/namespaces/[^/]+/secrets", path):
            return self.reply(200, {"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": []})
        return self.reply(404, NOT_FOUND)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.reply(201, json.loads(body or b"{}"))

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
