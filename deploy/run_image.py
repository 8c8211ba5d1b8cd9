#!/usr/bin/env python3
"""Runs the `docker run` commands the docs show, without a container engine.

    unshare -rn python3 run_image.py DOCKERFILE DOC... -- STREAMER_BINARY IMAGE

Run it in a network namespace of its own (`unshare -rn`): the documented
ports (8080, 50051-50054, 9090) are then free whatever else runs on the
machine, and only loopback exists, as in a container.

The image is read from the Dockerfile: its ENV, WORKDIR, ENTRYPOINT and CMD.
The commands are read from each DOC: in the Dockerfile, comment lines; in a
Markdown file, indented code lines; a command is `docker run ...` with its
`\\` continuation lines, and the shell lines next to it that prepare files
(e.g. `head -c 48 /dev/urandom | base64 >service-secret`) are run first, in a
scratch directory standing for the current one ($PWD). Each `docker run` is
then run as the container would run it:

  - the command is ENTRYPOINT + (the arguments after the image, or CMD), with
    the binary standing for `streamer`;
  - the environment is the image's ENV, then each `-e`;
  - a volume (`-v name:/path` or `-v /host/file:/path:ro`) is a directory or
    the host file; container paths in the environment and arguments are
    rewritten to where they are here, and the working directory likewise;
  - `-p` publishes a port: a container's port is reachable from the host only
    if something listens on it on every interface (0.0.0.0), so that is
    checked, as is the gateway's /readyz if 8080 is published. `all` keeps
    ConnectionService's edge stream (50054) inside the container unless a
    command publishes it: its gateway is in the same process, and nothing
    outside needs it; so for `all` it is checked to listen on loopback only.

Every command runs IMAGE (the tag the docs build and the Helm chart pulls by
default), so following any of them never ends in a pull of an image nobody
built. A command that prints help must exit 0. A server must start (stay up, print
its banner or listen) and stop on SIGTERM. If it sets STREAMER_TRUST=token,
a gRPC call without a token to each published gRPC port must get
Unauthenticated and one with a token from `streamer service-token` (with the
mounted secret) must succeed; and, as a control, the same command without its
STREAMER_TRUST and STREAMER_SERVICE_SECRET_FILE must refuse to start, naming
--trust, when it publishes a gRPC port.

Prints one line per command, "ok ..." or "FAIL ..."; exit status 1 if any failed.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

GRPC_PORTS = {50051: "streamer.v1.AuthService", 50052: "streamer.v1.ConnectionService",
              50053: "streamer.v1.ProgressService"}
# ConnectionService's edge stream (EdgeService), which only gateways dial.
EDGE_PORT = 50054
# A call each service refuses without a token and serves with a backend's.
CALLS = {
    50051: ("streamer.v1.AuthService/ValidateToken", {"token": "x"}),
    50052: ("streamer.v1.ConnectionService/ListConnections", {"tenant_id": "demo-tenant"}),
    50053: ("streamer.v1.ProgressService/Get", {"id": "no-such-request"}),
}
results = []


def result(ok, what, detail=""):
    results.append(ok)
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok and detail:
        for line in detail.strip().splitlines()[-12:]:
            print(f"       {line}")


def dockerfile(path):
    """The image: ENV, WORKDIR, ENTRYPOINT, CMD (of the last stage)."""
    text = re.sub(r"\\\n", " ", open(path).read())
    image = {"env": {}, "workdir": "/", "entrypoint": [], "cmd": []}
    for line in text.splitlines():
        line = line.strip()
        if line.upper().startswith("FROM "):
            image = {"env": {}, "workdir": "/", "entrypoint": [], "cmd": []}
        elif line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                image["env"][key] = value
        elif line.startswith("WORKDIR "):
            image["workdir"] = line.split(None, 1)[1]
        elif line.startswith("ENTRYPOINT "):
            image["entrypoint"] = json.loads(line.split(None, 1)[1])
        elif line.startswith("CMD "):
            image["cmd"] = json.loads(line.split(None, 1)[1])
    return image


def documented_blocks(path):
    """Lists of shell lines, each list ending with one `docker run` command."""
    lines = []
    for raw in open(path):
        raw = raw.rstrip("\n")
        if path.endswith(".md"):
            if not raw.startswith("    "):
                lines.append("")
                continue
            lines.append(raw[4:])
        else:
            m = re.match(r"^#\s{2,}(\S.*)$", raw)
            lines.append(m.group(1) if m else "")
    # Join continuation lines.
    joined, current = [], ""
    for line in lines:
        if current:
            current += " " + line.strip()
        else:
            current = line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        joined.append(current)
        current = ""
    blocks, prepare = [], []
    for line in joined:
        if not line:
            prepare = []
        elif line.startswith("docker run "):
            blocks.append((prepare, line))
        elif not line.startswith("docker "):
            prepare.append(line)
    return blocks


def parse_run(command, host_dir):
    words = shlex.split(command.replace("$PWD", host_dir), comments=True)[2:]
    run = {"env": [], "volumes": [], "ports": [], "image": None, "args": []}
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("--rm", "-it", "-i", "-t", "-d"):
            i += 1
        elif w in ("-e", "-v", "-p"):
            run[{"-e": "env", "-v": "volumes", "-p": "ports"}[w]].append(words[i + 1])
            i += 2
        elif w.startswith("-"):
            raise SystemExit(f"run_image: a documented option this test does not know: {w} in {command}")
        else:
            run["image"], run["args"] = w, words[i + 1:]
            break
    return run


def published(ports):
    out = set()
    for spec in ports:
        container = spec.split(":")[-1].split("/")[0]
        lo, _, hi = container.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def listeners():
    """port -> set of local addresses listening on it (IPv4 and IPv6)."""
    out = {}
    for table, size in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, port = fields[1].split(":")
            if fields[3] != "0A":  # LISTEN
                continue
            out.setdefault(int(port, 16), set()).add("any" if set(address) == {"0"} else address)
    return out


def grpcurl(port, method, body, token=None):
    cmd = ["grpcurl", "-plaintext", "-max-time", "5"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    cmd += ["-d", json.dumps(body), f"127.0.0.1:{port}", method]
    return subprocess.run(cmd, capture_output=True, text=True)


class Container:
    def __init__(self, image, run, binary, root, name):
        self.run = run
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.paths = {}  # container path -> local path
        for spec in run["volumes"]:
            parts = spec.split(":")
            source, target = parts[0], parts[1]
            if source.startswith("/"):
                self.paths[target] = source
            else:
                local = os.path.join(self.dir, "volumes", source)
                os.makedirs(local, exist_ok=True)
                self.paths[target] = local
        workdir = self.local(image["workdir"])
        if workdir == image["workdir"]:  # not a volume: the image's own directory
            workdir = os.path.join(self.dir, "rootfs", image["workdir"].lstrip("/"))
            self.paths[image["workdir"]] = workdir
        os.makedirs(workdir, exist_ok=True)
        self.cwd = workdir
        env = dict(image["env"])
        for pair in run["env"]:
            key, _, value = pair.partition("=")
            env[key] = value
        self.env = {k: self.local(v) for k, v in env.items()}
        self.env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        self.env["HOME"] = self.dir
        entry = image["entrypoint"]
        argv = entry + (run["args"] or image["cmd"])
        if argv[0] != "streamer":
            raise SystemExit(f"run_image: the entrypoint is {argv[0]!r}, not streamer")
        self.argv = [binary] + [self.local(a) for a in argv[1:]]

    def local(self, value):
        for target in sorted(self.paths, key=len, reverse=True):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return self.paths[target] + value[len(target):]
        return value

    def start(self):
        self.log = os.path.join(self.dir, "log")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def output(self):
        return open(self.log).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


def check_command(image, prepare, command, binary, root, index, expected_image):
    host_dir = os.path.join(root, f"host{index}")
    os.makedirs(host_dir)
    for line in prepare:
        subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=host_dir, check=True)
    run = parse_run(command, host_dir)
    short = re.sub(r"\s+", " ", re.sub(r"\s+#\s.*$", "", command))
    short = short if len(short) < 90 else short[:87] + "..."
    result(run["image"] == expected_image, f"`{short}` runs {expected_image}", f"it runs {run['image']}")
    c = Container(image, run, binary, root, f"c{index}")
    if "--help" in run["args"]:
        r = subprocess.run(c.argv, env=c.env, cwd=c.cwd, capture_output=True, text=True)
        result(r.returncode == 0, f"`{short}` prints help", r.stderr)
        return
    ports = published(run["ports"])
    c.start()
    try:
        deadline = time.monotonic() + 30
        up = False
        while time.monotonic() < deadline and c.proc.poll() is None:
            listening = listeners()
            if all(p in listening for p in ports) and ("all" not in c.argv or "Streamer is running" in c.output()):
                up = True
                break
            time.sleep(0.2)
        result(up, f"`{short}` starts", c.output())
        if not up:
            return
        listening = listeners()
        closed = sorted(p for p in ports if "any" not in listening.get(p, set()))
        result(not closed, f"... every published port ({', '.join(map(str, sorted(ports)))}) listens on all interfaces",
               f"loopback only (unreachable through -p): {closed}")
        if "all" in run["args"] or (not run["args"] and image["cmd"] == ["all"]):
            if EDGE_PORT not in ports:
                edge = listening.get(EDGE_PORT, set())
                result(edge and "any" not in edge,
                       f"... the edge stream (:{EDGE_PORT}) stays inside: it listens on loopback only",
                       f"listening on {sorted(edge) or 'nothing'}")
        if 8080 in ports:
            # As a readiness probe would: until the edge is attached, or 15 s.
            deadline = time.monotonic() + 15
            while True:
                try:
                    with urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=2) as r:
                        ready = r.status == 200
                except OSError as e:
                    ready = str(e)
                if ready is True or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            result(ready is True, "... the WebSocket edge is ready (/readyz)", str(ready))
        grpc = sorted(p for p in ports if p in CALLS)
        if c.env.get("STREAMER_TRUST") == "token" and grpc:
            secret = c.env.get("STREAMER_SERVICE_SECRET_FILE", "")
            minted = subprocess.run([binary, "service-token", "--sub", "docs", "--roles", "backend",
                                     "--service-secret-file", secret], capture_output=True, text=True)
            token = minted.stdout.strip()
            for port in grpc:
                anonymous = grpcurl(port, *CALLS[port])
                result("Code: Unauthenticated" in anonymous.stderr,
                       f"... :{port} refuses a call without a token", anonymous.stdout + anonymous.stderr)
                served = grpcurl(port, *CALLS[port], token=token)
                result(token and "Unauthenticated" not in served.stderr and "Unavailable" not in served.stderr,
                       f"... :{port} serves it with a service token", minted.stderr + served.stdout + served.stderr)
    finally:
        status = c.stop()
        result(status == 0, f"... SIGTERM stops it (status {status})", c.output()[-800:])
    # The control: the same command without its trust settings.
    trust_env = [e for e in run["env"] if e.split("=")[0] in ("STREAMER_TRUST", "STREAMER_SERVICE_SECRET_FILE")]
    if trust_env and grpc:
        bare = dict(run, env=[e for e in run["env"] if e not in trust_env])
        b = Container(image, bare, binary, root, f"c{index}-bare")
        b.start()
        try:
            status = b.proc.wait(15)
        except subprocess.TimeoutExpired:
            status = None
        b.stop()
        result(status not in (None, 0) and "--trust" in b.output(),
               "... without STREAMER_TRUST and the secret it refuses to start, naming --trust",
               f"status {status}: {b.output()[-600:]}")


def main():
    args = sys.argv[1:]
    split = args.index("--")
    dockerfile_path, docs, binary = args[0], args[1:split], os.path.abspath(args[split + 1])
    expected_image = args[split + 2]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    image = dockerfile(dockerfile_path)
    root = tempfile.mkdtemp(prefix="streamer-image-")
    index = 0
    for doc in [dockerfile_path] + docs:
        blocks = documented_blocks(doc)
        print(f"  ({os.path.basename(doc)}: {len(blocks)} docker run commands)")
        for prepare, command in blocks:
            index += 1
            check_command(image, prepare, command, binary, root, index, expected_image)
    subprocess.run(["rm", "-rf", root])
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
