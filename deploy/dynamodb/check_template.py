#!/usr/bin/env python3
"""Checks streamer-tables.yaml against the code it deploys for.

    python3 check_template.py TEMPLATE REPO STREAMER_BINARY

1. The tables: `streamer dynamodb create-tables` makes its tables on a local
   DynamoDB-protocol server (moto's, in this process, on a loopback port the
   server picks), and each table of the template must have the same name (for
   the same prefix), key schema, attribute definitions, global secondary
   indexes (keys and projection), billing mode and TTL attribute as the one
   made. What only the template adds (point-in-time recovery, KMS encryption
   with the optional customer key, Retain) is checked as written.
2. The policies: CONTRACT below says which DynamoDB actions each role calls,
   on which table or index. Each role's managed policy must grant exactly
   those (action, table, index) triples: nothing missing, nothing more, no
   wildcard action or resource; plus the customer key's use only when one
   is given. The contract is checked against the code in turn: which Store
   methods each role's crate calls, and which API actions each Store method
   of the DynamoDB backend sends; so a change to either fails here until the
   contract and the policies follow.

Prints one line per check, "ok ..." or "FAIL ..."; exit status 1 if any failed.
"""

import os
import pathlib
import re
import subprocess
import sys

import logging

import boto3
from cfnlint.decode import decode
from moto.server import ThreadedMotoServer

# ---- the contract ----------------------------------------------------------

# What each Store method of the DynamoDB backend sends
# (services/core/src/store/dynamodb.rs), as (IAM action, table, index or
# None). Tables by their name after the prefix.
TABLES = ("connections", "requests", "revoked-tokens")
METHOD_CALLS = {
    # Health (Health::of_store in every role): DescribeTable of each table.
    "ping": {("DescribeTable", t, None) for t in TABLES},
    "flush": set(),  # every write is durable when acknowledged
    "put_connection": {("PutItem", "connections", None)},
    "get_connection": {("GetItem", "connections", None)},
    "delete_connection": {("DeleteItem", "connections", None)},
    "touch_connection": {("UpdateItem", "connections", None)},
    "list_connections": {("Query", "connections", "by_tenant"),
                         ("Query", "connections", "by_tenant_user")},
    "connections_of_edge": {("Query", "connections", "by_edge")},
    "connection_edges": {("Scan", "connections", "by_edge")},
    "sweep_connections": {("Scan", "connections", None), ("DeleteItem", "connections", None)},
    # TransactWriteItems of two Puts: IAM authorizes each as PutItem. A
    # duplicate's existing request is read back (find_request).
    "create_request": {("PutItem", "requests", None), ("GetItem", "requests", None)},
    "get_request": {("GetItem", "requests", None)},
    "find_request": {("GetItem", "requests", None)},
    "update_request": {("PutItem", "requests", None)},
    "unfinished_requests": {("Query", "requests", "unfinished")},
    "revoke_token": {("PutItem", "revoked-tokens", None)},
    "is_token_revoked": {("GetItem", "revoked-tokens", None)},
    "sweep_revoked_tokens": {("Scan", "revoked-tokens", None), ("DeleteItem", "revoked-tokens", None)},
}
# The Store methods each role calls: its crate's own calls
# (services/<role>/src), and ping for its health (src/lib.rs). The gateway
# calls none: it has no store, so it has no policy.
ROLE_METHODS = {
    "auth": {"ping", "revoke_token", "is_token_revoked", "sweep_revoked_tokens"},
    "connection": {"ping", "put_connection", "get_connection", "delete_connection",
                   "touch_connection", "list_connections", "connections_of_edge",
                   "connection_edges", "sweep_connections"},
    "progress": {"ping", "create_request", "get_request", "find_request", "update_request",
                 "unfinished_requests"},
}
# `streamer dynamodb create-tables` (DynamoStore::create_tables).
CREATE_TABLES_CALLS = {(a, t, None) for a in ("CreateTable", "DescribeTable", "UpdateTimeToLive")
                       for t in TABLES}
# The template's policy for each.
POLICIES = {"AuthPolicy": "auth", "ConnectionPolicy": "connection",
            "ProgressPolicy": "progress", "CreateTablesPolicy": "create-tables"}
# What a role needs of a customer managed key when the tables use one.
KEY_ACTIONS = {"kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"}

# ---- reporting -------------------------------------------------------------

failed = 0


def report(ok, what, details=()):
    global failed
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failed += 1
        for line in details:
            print(f"       {line}")


def dict_differences(want, have, path=""):
    for key in sorted({*want, *have}):
        w, h = want.get(key), have.get(key)
        if isinstance(w, dict) and isinstance(h, dict):
            yield from dict_differences(w, h, f"{path}{key}.")
        elif w != h:
            yield f"{path}{key}", w, h


def compare(what, want, have):
    """Reports whether `have` equals `want`, naming the differences."""
    details = []
    if isinstance(want, (set, frozenset)) and isinstance(have, (set, frozenset)):
        details += [f"missing: {x}" for x in sorted(want - have, key=repr)]
        details += [f"extra: {x}" for x in sorted(have - want, key=repr)]
    elif isinstance(want, dict) and isinstance(have, dict):
        details = [f"{path}: want {w!r}, have {h!r}" for path, w, h in dict_differences(want, have)]
    elif want != have:
        details = [f"want {want!r}", f"have {have!r}"]
    report(not details, what, details)

# ---- the code --------------------------------------------------------------


def rust_without_tests(path):
    text = path.read_text()
    tests = re.search(r"^#\[cfg\(test\)\]\s*mod tests", text, re.M)
    return text[:tests.start()] if tests else text


def store_trait_methods(repo):
    text = (repo / "services/core/src/store/mod.rs").read_text()
    body = re.search(r"^pub trait Store\b.*?^\}", text, re.M | re.S).group(0)
    return set(re.findall(r"\basync fn (\w+)", body))


def store_calls_of(repo, src, methods):
    """The Store methods the crate in `src` calls (on a receiver named
    `store`), outside its unit tests."""
    calls = set()
    for path in sorted((repo / src).rglob("*.rs")):
        if path.name == "tests.rs":
            continue
        calls |= set(re.findall(r"\bstore\s*\.\s*(\w+)\s*\(", rust_without_tests(path)))
    return calls & methods


def fn_bodies(text):
    """Each function's text up to the next function, by name (the same name
    twice, e.g. a trait method and a helper, gets both texts)."""
    starts = list(re.finditer(r"^\s*(?:pub\s+)?(?:async\s+)?fn\s+(\w+)", text, re.M))
    bodies = {}
    for i, start in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        bodies[start.group(1)] = bodies.get(start.group(1), "") + text[start.end():end]
    return bodies


def dynamodb_actions(repo):
    """For each function of the DynamoDB backend, the IAM actions it ends up
    sending (its own client calls and those of the methods it calls)."""
    text = rust_without_tests(repo / "services/core/src/store/dynamodb.rs")
    bodies = fn_bodies(text)

    def action(operation):
        # A transaction's items are authorized as their own actions.
        if operation == "transact_write_items":
            kinds = set(re.findall(r"TransactWriteItem::builder\(\)\s*\.(\w+)\(", text))
            return {{"put": "PutItem", "update": "UpdateItem", "delete": "DeleteItem",
                     "condition_check": "ConditionCheckItem"}.get(k, k) for k in kinds}
        return {"".join(part.title() for part in operation.split("_"))}

    def actions(name, seen=()):
        body = bodies[name]
        found = set()
        for operation in re.findall(r"\.client\s*\.\s*(\w+)\s*\(", body):
            found |= action(operation)
        for callee in re.findall(r"\bself\s*\.\s*(\w+)\s*\(", body):
            if callee in bodies and callee not in seen and callee != name:
                found |= actions(callee, (*seen, name))
        return found

    return {name: actions(name) for name in bodies}

# ---- the template ----------------------------------------------------------


def sub_prefix(value, prefix):
    if isinstance(value, dict) and "Fn::Sub" in value and isinstance(value["Fn::Sub"], str):
        return value["Fn::Sub"].replace("${TablePrefix}", prefix)
    return None


def table_shape(props, name):
    return {
        "name": name,
        "key": [(k["AttributeName"], k["KeyType"]) for k in props.get("KeySchema", [])],
        "attributes": sorted((a["AttributeName"], a["AttributeType"])
                             for a in props.get("AttributeDefinitions", [])),
        "indexes": {
            g["IndexName"]: ([(k["AttributeName"], k["KeyType"]) for k in g["KeySchema"]],
                             g["Projection"]["ProjectionType"],
                             sorted(g["Projection"].get("NonKeyAttributes", [])))
            for g in props.get("GlobalSecondaryIndexes", [])
        },
        "billing": props.get("BillingMode", "PROVISIONED"),
        "ttl": (props.get("TimeToLiveSpecification") or {}).get("AttributeName")
        if (props.get("TimeToLiveSpecification") or {}).get("Enabled") is True else None,
    }


def made_shape(client, name):
    table = client.describe_table(TableName=name)["Table"]
    ttl = client.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
    return {
        "name": table["TableName"],
        "key": [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]],
        "attributes": sorted((a["AttributeName"], a["AttributeType"])
                             for a in table["AttributeDefinitions"]),
        "indexes": {
            g["IndexName"]: ([(k["AttributeName"], k["KeyType"]) for k in g["KeySchema"]],
                             g["Projection"]["ProjectionType"],
                             sorted(g["Projection"].get("NonKeyAttributes", [])))
            for g in table.get("GlobalSecondaryIndexes", [])
        },
        "billing": table.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED"),
        "ttl": ttl.get("AttributeName") if ttl.get("TimeToLiveStatus") == "ENABLED" else None,
    }


def statements(policy):
    """(statement, under_key_condition) for each statement of a policy."""
    for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
        if isinstance(statement, dict) and "Fn::If" in statement:
            condition, when, otherwise = statement["Fn::If"]
            yield when, condition
            if otherwise != {"Ref": "AWS::NoValue"}:
                yield otherwise, f"not {condition}"
        else:
            yield statement, None


def as_list(value):
    return value if isinstance(value, list) else [value]


def resolve_resource(resource, table_of):
    """(table, index or None) for a table's ARN or one index's ARN; None for
    anything else (a wildcard, a hand-written ARN)."""
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        target = resource["Fn::GetAtt"]
        logical, attribute = target if isinstance(target, list) else target.split(".", 1)
        if attribute == "Arn" and logical in table_of:
            return table_of[logical], None
    if isinstance(resource, dict) and isinstance(resource.get("Fn::Sub"), str):
        m = re.fullmatch(r"\$\{(\w+)\.Arn\}/index/([A-Za-z0-9_.-]+)", resource["Fn::Sub"])
        if m and m.group(1) in table_of:
            return table_of[m.group(1)], m.group(2)
    return None

# ---- the checks ------------------------------------------------------------


def check_code(repo):
    """The contract against the code."""
    methods = store_trait_methods(repo)
    compare("the contract covers every Store method (services/core/src/store/mod.rs)",
            set(METHOD_CALLS), methods)
    actions = dynamodb_actions(repo)
    for method in sorted(methods & set(METHOD_CALLS)):
        compare(f"Store::{method} sends {sorted({a for a, _, _ in METHOD_CALLS[method]}) or 'nothing'}",
                {a for a, _, _ in METHOD_CALLS[method]}, actions.get(method, set()))
    compare("create-tables sends CreateTable, DescribeTable, UpdateTimeToLive",
            {a for a, _, _ in CREATE_TABLES_CALLS}, actions.get("create_tables", set()))
    for role, want in ROLE_METHODS.items():
        compare(f"services/{role} calls the Store methods the contract lists for it",
                want - {"ping"}, store_calls_of(repo, f"services/{role}/src", methods))
    roles = fn_bodies((repo / "src/lib.rs").read_text())
    compare("auth, connection and progress each follow their store's ping for health (src/lib.rs)",
            {"serve_auth", "run_connection", "run_progress"},
            {name for name in ("serve_auth", "run_connection", "run_progress", "run_gateway")
             if "Health::of_store(" in roles.get(name, "")})
    compare("the gateway calls no Store method", set(), store_calls_of(repo, "gateway/src", methods))


def check_tables(template, binary):
    """The template's tables against those `create-tables` makes."""
    prefix = "deploy-check-"
    resources = template["Resources"]
    tables = {logical: r for logical, r in resources.items() if r["Type"] == "AWS::DynamoDB::Table"}
    names = {logical: sub_prefix(r["Properties"].get("TableName"), prefix) for logical, r in tables.items()}
    compare("the template's tables are the code's three, named <TablePrefix><table>",
            {prefix + t for t in TABLES}, set(names.values()))
    table_of = {logical: name[len(prefix):] for logical, name in names.items()
                if name and name.startswith(prefix)}

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        made = subprocess.run([binary, "dynamodb", "create-tables", "--dynamodb-endpoint-url", endpoint,
                               "--dynamodb-table-prefix", prefix],
                              env=env, capture_output=True, text=True, timeout=60)
        report(made.returncode == 0, "streamer dynamodb create-tables makes the tables (local server)",
               (made.stdout + made.stderr).splitlines()[-10:])
        if made.returncode != 0:
            return table_of, {}
        client = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="x", aws_secret_access_key="x")
        compare("create-tables made only those tables", {prefix + t for t in TABLES},
                set(client.list_tables()["TableNames"]))
        shapes = {}
        for logical, name in sorted(names.items()):
            if name not in {prefix + t for t in TABLES}:
                continue
            shapes[table_of[logical]] = shape = made_shape(client, name)
            compare(f"{logical}: keys, attributes, indexes, projections, billing and TTL as create-tables makes them",
                    shape, table_shape(tables[logical]["Properties"], name))
        return table_of, shapes
    finally:
        server.stop()


def check_template_only(template):
    """What the template adds to the tables, as the issue asks for it."""
    params = template.get("Parameters", {})
    compare("parameter TablePrefix defaults to streamer- (the binary's default)",
            "streamer-", params.get("TablePrefix", {}).get("Default"))
    compare("parameter KmsKeyArn is optional (empty by default)", "", params.get("KmsKeyArn", {}).get("Default"))
    compare("condition HasKmsKey: a key was given",
            {"Fn::Not": [{"Fn::Equals": [{"Ref": "KmsKeyArn"}, ""]}]},
            template.get("Conditions", {}).get("HasKmsKey"))
    sse = {"SSEEnabled": True, "SSEType": "KMS",
           "KMSMasterKeyId": {"Fn::If": ["HasKmsKey", {"Ref": "KmsKeyArn"}, {"Ref": "AWS::NoValue"}]}}
    outputs = template.get("Outputs", {})
    for logical, r in sorted(template["Resources"].items()):
        if r["Type"] != "AWS::DynamoDB::Table":
            continue
        props = r["Properties"]
        compare(f"{logical}: kept on delete and on replacement (Retain)", ("Retain", "Retain"),
                (r.get("DeletionPolicy"), r.get("UpdateReplacePolicy")))
        compare(f"{logical}: point-in-time recovery on", {"PointInTimeRecoveryEnabled": True},
                props.get("PointInTimeRecoverySpecification"))
        compare(f"{logical}: KMS encryption, the customer key when given", sse, props.get("SSESpecification"))
        compare(f"{logical}: outputs its name and ARN",
                [{"Ref": logical}, {"Fn::GetAtt": [logical, "Arn"]}],
                [outputs.get(f"{logical[:-len('Table')]}TableName", {}).get("Value"),
                 outputs.get(f"{logical[:-len('Table')]}TableArn", {}).get("Value")])


def check_policies(template, table_of, shapes):
    resources = template["Resources"]
    iam = {logical for logical, r in resources.items() if r["Type"].startswith("AWS::IAM::")}
    compare("one managed policy per role that uses the tables, and one for create-tables (none for the gateway)",
            set(POLICIES), iam)
    contract = {role: set().union(*(METHOD_CALLS[m] for m in methods)) for role, methods in ROLE_METHODS.items()}
    contract["create-tables"] = CREATE_TABLES_CALLS
    for logical, role in sorted(POLICIES.items()):
        policy = resources.get(logical)
        if not policy or policy["Type"] != "AWS::IAM::ManagedPolicy":
            report(False, f"{logical} is an AWS::IAM::ManagedPolicy")
            continue
        granted, problems, key_statements = set(), [], []
        for statement, condition in statements(policy):
            if statement.get("Effect") != "Allow" or "NotAction" in statement or "NotResource" in statement:
                problems.append(f"{statement.get('Sid')}: not a plain Allow of Action on Resource")
                continue
            actions = as_list(statement.get("Action", []))
            if any("*" in a for a in actions):
                problems.append(f"{statement.get('Sid')}: a wildcard action {actions}")
            if all(a.startswith("kms:") for a in actions):
                key_statements.append((statement, condition))
                continue
            if condition is not None:
                problems.append(f"{statement.get('Sid')}: table access under condition {condition}")
            for resource in as_list(statement.get("Resource", [])):
                target = resolve_resource(resource, table_of)
                if target is None:
                    problems.append(f"{statement.get('Sid')}: {resource!r} is not one of the tables or their indexes")
                    continue
                for a in actions:
                    if not a.startswith("dynamodb:"):
                        problems.append(f"{statement.get('Sid')}: {a} is not a DynamoDB action")
                    granted.add((a.split(":", 1)[1], *target))
        report(not problems, f"{logical}: only named actions on named tables and indexes", problems)
        compare(f"{logical} grants {role} exactly the calls its code makes", contract[role], granted)
        unknown = [f"{t}/index/{i}" for _, t, i in granted
                   if i is not None and shapes and i not in shapes.get(t, {}).get("indexes", {})]
        report(not unknown, f"{logical}: every index it names exists", unknown)
        if role == "create-tables":
            compare(f"{logical}: no key use (it reads no item)", [], key_statements)
            continue
        want_key = [({"Sid": "TableKey", "Effect": "Allow", "Action": sorted(KEY_ACTIONS),
                      "Resource": {"Ref": "KmsKeyArn"},
                      "Condition": {"StringEquals": {
                          "kms:ViaService": {"Fn::Sub": "dynamodb.${AWS::Region}.amazonaws.com"}}}},
                     "HasKmsKey")]
        have_key = [({**s, "Action": sorted(as_list(s.get("Action", [])))}, c) for s, c in key_statements]
        compare(f"{logical}: the customer key's use through DynamoDB, only when one is given", want_key, have_key)


def main():
    template_path, repo, binary = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    template, matches = decode(template_path)
    report(template is not None and not matches, "the template parses", [str(m) for m in matches])
    if template is None:
        return 1
    check_code(repo)
    table_of, shapes = check_tables(template, binary)
    check_template_only(template)
    check_policies(template, table_of, shapes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
