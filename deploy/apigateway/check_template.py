#!/usr/bin/env python3
"""Checks streamer-websocket.yaml against the integration it calls.

    python3 check_template.py TEMPLATE REPO

1. Routes: $connect, $disconnect and $default, each targeting an HTTP
   integration that POSTs to the integration's path for it
   (/apigateway/connect, /disconnect, /default: gateway/src/apigateway.rs).
2. Every integration sends the shared secret (the StreamerSecret parameter,
   NoEcho) in the header the integration checks (SECRET_HEADER), passes
   nothing through unmapped, and builds its body with the request template.
3. The request template, rendered the way API Gateway renders it (its
   $context variables and $util functions replaced by sample values), is
   JSON with every field the integration's event reads (the serde names of
   ApiGatewayEvent, RequestContext and Identity in gateway/src/apigateway.rs),
   the frame base64-encoded (isBase64Encoded true), and the client's token
   where the integration looks for it.
4. The IAM policy grants execute-api:ManageConnections, and nothing else, on
   this API's stage's @connections, to the role ConnectionService runs as.

Prints one line per check, "ok ..." or "FAIL ..."; exit status 1 if any failed.
"""

import base64
import json
import pathlib
import re
import sys

from cfnlint.decode import decode

failures = 0


def report(ok, what, details=""):
    global failures
    print(("ok   " if ok else "FAIL ") + what + (f": {details}" if details and not ok else ""))
    if not ok:
        failures += 1


def sub_text(value):
    """The string of a !Sub (or a plain string)."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    return value


def render(template, token, frame):
    """Renders the request template as API Gateway would, for one frame."""
    context = {
        "routeKey": "$default", "eventType": "MESSAGE", "connectionId": "Xk3J8cD2oAMCJ_Q=",
        "domainName": "abc123.execute-api.eu-west-1.amazonaws.com", "stage": "prod",
        "apiId": "abc123", "requestId": "r-1", "identity.sourceIp": "198.51.100.7",
    }
    text = template.replace(
        "$util.escapeJavaScript($input.params('Authorization'))", token
    ).replace("$util.base64Encode($input.body)", base64.b64encode(frame.encode()).decode())
    names = sorted(context, key=len, reverse=True)
    # Variables the sample does not know, looked for before any value goes in.
    unknown = text
    for name in names:
        unknown = unknown.replace("$context." + name, "")
    leftover = re.findall(r"\$[A-Za-z_][\w.]*", unknown)
    for name in names:
        text = text.replace("$context." + name, context[name])
    return text, leftover


def serde_fields(source, struct):
    """The JSON names of a `rename_all = "camelCase"` struct's fields."""
    match = re.search(r"struct " + struct + r" \{(.*?)\n\}", source, re.S)
    if not match:
        return None
    names = re.findall(r"^\s+(\w+):", match.group(1), re.M)
    return {re.sub(r"_(\w)", lambda m: m.group(1).upper(), n) for n in names}


def main():
    template_path, repo = sys.argv[1], pathlib.Path(sys.argv[2])
    template, matches = decode(template_path)
    if template is None:
        report(False, "the template parses", str(matches))
        return
    resources = template["Resources"]
    source = (repo / "gateway/src/apigateway.rs").read_text()
    secret_header = re.search(r'pub const SECRET_HEADER: &str = "([^"]+)"', source).group(1)

    # 1. Routes and integrations.
    routes = {r["Properties"]["RouteKey"]: r for r in resources.values()
              if r["Type"] == "AWS::ApiGatewayV2::Route"}
    report(set(routes) == {"$connect", "$disconnect", "$default"},
           "routes are $connect, $disconnect and $default", sorted(routes))
    api = next(r for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Api")
    report(api["Properties"].get("ProtocolType") == "WEBSOCKET", "the API is a WebSocket API")
    paths = {"$connect": "/apigateway/connect", "$disconnect": "/apigateway/disconnect",
             "$default": "/apigateway/default"}
    for key, path in paths.items():
        report(f'route("{path}"' in source, f"the integration serves {path}")
    templates = []
    for key, route in routes.items():
        target = sub_text(route["Properties"].get("Target", ""))
        name = target.removeprefix("integrations/${").removesuffix("}")
        integration = resources.get(name, {}).get("Properties", {})
        uri = sub_text(integration.get("IntegrationUri", ""))
        report(integration.get("IntegrationType") == "HTTP" and integration.get("IntegrationMethod") == "POST"
               and uri == "${StreamerIntegrationUrl}" + paths.get(key, "?"),
               f"{key} POSTs to the integration's {paths.get(key)}", f"{name}: {uri}")
        # 2. The secret, and nothing passed through unmapped.
        params = integration.get("RequestParameters", {})
        secret = sub_text(params.get(f"integration.request.header.{secret_header}", ""))
        report(secret == "'${StreamerSecret}'", f"{key} sends the shared secret in {secret_header}", secret)
        report(integration.get("PassthroughBehavior") == "NEVER", f"{key} passes nothing through unmapped")
        body = integration.get("RequestTemplates", {}).get("$default")
        report(isinstance(body, str) and integration.get("TemplateSelectionExpression") == "\\$default",
               f"{key} builds its body with the request template")
        templates.append(body or "")
    secret_parameter = template["Parameters"].get("StreamerSecret", {})
    report(secret_parameter.get("NoEcho") is True and secret_parameter.get("MinLength", 0) >= 32,
           "the secret is a NoEcho parameter of at least 32 characters (as the integration requires)")

    # 3. The event the integration reads.
    event_fields = serde_fields(source, "ApiGatewayEvent")
    context_fields = serde_fields(source, "RequestContext")
    identity_fields = serde_fields(source, "Identity")
    report(None not in (event_fields, context_fields, identity_fields),
           "the integration's event structs are found in gateway/src/apigateway.rs")
    frame = '{"action":"echo","id":"e1","payload":{"quote":"it\'s \\"here\\""}}'
    for text in set(templates):
        rendered, leftover = render(text, "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", frame)
        report(not leftover, "every template variable is one API Gateway sets", leftover)
        try:
            event = json.loads(rendered)
        except json.JSONDecodeError as e:
            report(False, "the rendered event is JSON", f"{e}: {rendered}")
            continue
        report(True, "the rendered event is JSON")
        report(set(event) <= (event_fields or set()) and set(event["requestContext"]) - {"routeKey", "eventType", "apiId", "requestId"} <= (context_fields or set())
               and set(event["requestContext"]["identity"]) <= (identity_fields or set()),
               "it has only fields the integration knows (plus API Gateway's own routeKey, eventType, apiId, requestId)",
               json.dumps(event))
        context = event["requestContext"]
        report(all(context.get(f) for f in ("connectionId", "domainName", "stage")),
               "it carries the connection id, domain name and stage")
        report(event.get("isBase64Encoded") is True
               and base64.b64decode(event["body"]).decode() == frame,
               "it carries the frame intact, base64-encoded (a quote cannot break the JSON)")
        report(event.get("queryStringParameters", {}).get("Authorization") == "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"
               and '.get("Authorization")' in (repo / "gateway/src/lib.rs").read_text(),
               "it carries the token where the edge's token() looks (query Authorization)")
    connect = routes.get("$connect", {}).get("Properties", {}).get("RequestParameters", {})
    report({"route.request.querystring.Authorization", "route.request.header.Authorization"} <= set(connect),
           "$connect declares the token's query parameter and header")

    # 4. The permission.
    policies = [r for r in resources.values() if r["Type"] == "AWS::IAM::Policy"]
    statements = [s for p in policies for s in p["Properties"]["PolicyDocument"]["Statement"]]
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    resources_granted = {sub_text(s["Resource"]) for s in statements}
    report(actions == {"execute-api:ManageConnections"},
           "the policy grants execute-api:ManageConnections and nothing else", sorted(actions))
    report(resources_granted == {"arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:${Api}/${StageName}/*/@connections/*"},
           "on this API's stage's @connections only", sorted(resources_granted))
    report(all(p["Properties"].get("Roles") == [{"Ref": "StreamerRoleName"}] for p in policies),
           "to the role ConnectionService runs as")


main()
sys.exit(1 if failures else 0)
