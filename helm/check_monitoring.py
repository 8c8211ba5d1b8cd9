#!/usr/bin/env python3
"""Checks the alerts and the dashboard one scenario of helm/test.sh rendered.

    check_monitoring.py RENDERED.yaml RULES_OUT.yaml [CATALOGUE.tsv]

Writes the PrometheusRule's rule groups to RULES_OUT.yaml (for `promtool
check rules`, which helm/test.sh runs on it). Checks that the rules are the
ones the chart promises (the original system's alarms: authentication
failures, delivery failures, latency, error rate; and queue depth, lapsed
leases) and that the dashboard shows connections, deliveries, latency
percentiles, requests and errors per role.

With CATALOGUE.tsv (what `streamer metrics` prints: name, type, labels,
roles, HELP), every metric a rule or a panel names must be a family of the
catalogue (a histogram's `_bucket`, `_sum` and `_count` included; `up` is
Prometheus's own), every label a selector matches on one the family has
(or one the scrape adds: job, namespace, pod, role, instance; `le` on
buckets), and every value a matcher names (`=`, or each of an `=~`
alternation) one the catalogue lists for that label, where it lists them.
"""

import json
import re
import sys

import yaml

# Labels Prometheus and the ServiceMonitor add to every series.
TARGET_LABELS = {"job", "namespace", "pod", "role", "instance", "container", "service", "endpoint"}
# Series that exist without Streamer exporting them.
PROMETHEUS_OWN = {"up"}
# What the chart promises: an alert for each, found by the metric it reads.
ALERTS = {
    "authentication failures": "streamer_auth_failures_total",
    "delivery failures": "streamer_deliveries_total",
    "send latency": "streamer_send_duration_seconds_bucket",
    "fan-out latency": "streamer_fanout_duration_seconds_bucket",
    "error rate": "streamer_grpc_server_handled_total",
    "request queue depth": "streamer_progress_queue_depth",
    "inbound queue depth": "streamer_inbound_queue_depth",
    "lapsed edge leases": "streamer_edges_lapsed_total",
    "lapsed processor leases": "streamer_progress_leases_lapsed_total",
}
# And a panel for each.
PANELS = {
    "connections": "streamer_gateway_connections",
    "deliveries": "streamer_deliveries_total",
    "latency percentiles": "histogram_quantile",
    "requests per role": "streamer_grpc_server_handled_total",
    "errors per role": 'code=~"unknown|internal|unavailable',
}

failures = []


def check(condition, message):
    if not condition and message not in failures:
        failures.append(message)
    return condition


def selectors(expr):
    """(metric, {label: (op, value)}) for each `metric{...}` and each bare
    streamer_/process_ name in a PromQL expression."""
    found = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        matchers = {}
        for m in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', match.group(2)):
            matchers[m.group(1)] = (m.group(2), m.group(3))
        found.append((match.group(1), matchers))
    for name in re.findall(r"\b((?:streamer|process)_[a-z0-9_]+)\b", expr):
        found.append((name, {}))
    return found


def load_catalogue(path):
    families = {}
    for line in open(path):
        name, kind, labels, _roles, _help = line.rstrip("\n").split("\t")
        # `outcome=delivered|gone,selector`: a label and the values it takes,
        # when the catalogue lists them.
        values = {}
        for label in filter(None, labels.split(",")):
            label, _, listed = label.partition("=")
            values[label] = set(listed.split("|")) if listed else None
        families[name] = {"kind": kind, "labels": set(values), "values": values}
    return families


def family_of(metric, families):
    if metric in families:
        return metric
    for suffix in ("_bucket", "_sum", "_count"):
        base = metric[: -len(suffix)] if metric.endswith(suffix) else None
        if base and families.get(base, {}).get("kind") == "histogram":
            return base
    return None


def main():
    rendered, rules_out = sys.argv[1], sys.argv[2]
    catalogue = sys.argv[3] if len(sys.argv) > 3 else None
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]

    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    boards = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})]
    if not check(len(rules) == 1 and len(boards) == 1,
                 f"expected one PrometheusRule and one dashboard ConfigMap, got {len(rules)} and {len(boards)}"):
        return
    groups = rules[0]["spec"]["groups"]
    yaml.safe_dump({"groups": groups}, open(rules_out, "w"), sort_keys=False)
    alert_exprs = {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}
    for what, metric in ALERTS.items():
        check(any(metric in e for e in alert_exprs.values()), f"no alert on {what} ({metric})")
    for name, expr in alert_exprs.items():
        check('job="' in expr, f"alert {name} does not select this release's job: {expr}")

    (dashboard_text,) = boards[0]["data"].values()
    dashboard = json.loads(dashboard_text)
    panel_exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            panel_exprs.append((panel["title"], target["expr"]))
    variable_exprs = [("variable " + v["name"], v["query"]["query"])
                      for v in dashboard.get("templating", {}).get("list", [])
                      if isinstance(v.get("query"), dict)]
    for what, needle in PANELS.items():
        check(any(needle in e for _, e in panel_exprs), f"no dashboard panel for {what} ({needle})")
    check(any("by (role" in e and "streamer_grpc_server_handled_total" in e for _, e in panel_exprs),
          "no panel of requests or errors by role")

    if catalogue:
        families = load_catalogue(catalogue)
        where = [(f"alert {n}", e) for n, e in alert_exprs.items()] + \
                [(f"panel {t!r}", e) for t, e in panel_exprs] + variable_exprs
        named = set()
        for what, expr in where:
            for metric, matchers in selectors(expr):
                if metric in PROMETHEUS_OWN:
                    continue
                family = family_of(metric, families)
                if not check(family, f"{what}: {metric} is not in the catalogue"):
                    continue
                named.add(family)
                allowed = families[family]["labels"] | TARGET_LABELS
                if metric.endswith("_bucket"):
                    allowed |= {"le"}
                for label, (op, value) in matchers.items():
                    check(label in allowed, f"{what}: {metric} has no label {label}")
                    listed = families[family]["values"].get(label)
                    if op == "=" and listed:
                        check(value in listed, f"{what}: {metric}{{{label}={value!r}}}: not a value it takes")
                    if op == "=~" and listed:
                        for one in value.split("|"):
                            check(one in listed, f"{what}: {metric}{{{label}=~...{one!r}...}}: not a value it takes")
        print(f"       the rules and the dashboard name {len(named)} families of the catalogue")

    print(f"       {len(alert_exprs)} alerts, {len(panel_exprs)} dashboard queries, {len(failures)} problems")
    for failure in failures:
        print(f"       - {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
