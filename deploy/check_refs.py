#!/usr/bin/env python3
"""Cross-reference checks of the deploy files that no schema catches.

compose.yaml
  - depends_on names defined services; `service_healthy` ones have a healthcheck
  - bind-mounted files, secret files and the build context / Dockerfile exist;
    services use only defined secrets
  - every URL in a NATTER_* variable (comma-separated lists too) names a
    service or network alias of the file, on a port that service listens on
    (the assistant's model server may also be outside the file)
otel-collector.yaml
  - every component a pipeline names is defined; scrape targets are services
k8s/ (and k8s/dev/)
  - each kustomization.yaml lists files that exist, and every manifest in its
    folder is listed in it (but k8s/secret.yaml, the example of the Secrets
    the operator creates, which must not be: check_ops.py)
  - every Service selects the pods of some workload and its targetPorts exist
  - HPA and PodDisruptionBudget targets exist
  - every URL in a ConfigMap / Secret names a Service (of k8s/ or k8s/dev/)
    that has that port (the assistant's model server may also be outside
    the namespace)
  - configMapGenerator files exist; secretKeyRef / secret volumes name
    Secrets and keys that exist (in k8s/secret.yaml for natter's own)
  - NetworkPolicies: their pod selectors (and those of their peers) match
    some workload's pods, and the ports they name are ports of those pods
natter's contract (both compose.yaml and k8s/)
  - the edge calls the services' public port (NATTER_LISTEN), the services
    (the assistant too) call each other's internal port
    (NATTER_INTERNAL_LISTEN); a split service listens internally on all
    interfaces and has the service credential file
  - the edge routes every service that is deployed, each replica of it
    (compose: by name; k8s: its Service selects the pods)
  - every NATTER_*_FILE names a file that is mounted from a secret (an API
    key file's first line is not empty)
  - NATS URLs come with credentials (user and password file, or in the URL);
    the dev secrets are usable (credential >= 32 bytes, NATS password starts
    with a letter: nats.conf reads it from the environment)
  - compose publishes no internal port to the host
  - k8s: with default-deny in place, the NetworkPolicies allow every call
    the configuration makes (outside -> edge, edge -> public ports, services ->
    internal ports, PostgreSQL, NATS, collector, the assistant's model server
    in the namespace or outside it), and the callee's ingress rules alone
    refuse: an internal port to anything but natter's services (the
    assistant's, health only, to anything at all), a service's public port to
    anything but the edge, PostgreSQL and NATS to anything but the services
    that keep data (not the assistant)

Prints one line per problem (`FAIL <file>: ...`) and a summary; exit 1 when
there is any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from check_flags import compose_invocations, k8s_invocations, parse_dockerfile

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
problems: list[str] = []
checked = 0


def fail(file: str, msg: str) -> None:
    problems.append(f"FAIL {file}: {msg}")


# Variables holding URLs that are not addresses of a part of the deployment.
NOT_ENDPOINTS = {"NATTER_CORS_ALLOW_ORIGINS"}  # browser origins
# Variables whose URL may name a part of the deployment (then it is checked
# like any other) or something outside it: the assistant's model server, an
# in-cluster llama.cpp / Ollama / vLLM or https://api.openai.com.
MAYBE_EXTERNAL = {"NATTER_ASSISTANT_BASE_URL"}


def urls_in(value: str) -> list[str]:
    return [u.strip() for u in str(value).split(",") if "://" in u]


def listen_port(value) -> int | None:
    try:
        return int(str(value).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def namespace_service(host: str | None) -> str | None:
    """The Service of namespace natter a host name means (`x`, `x.natter`,
    `x.natter.svc`, ...), None for anything else."""
    labels = (host or "").split(".")
    if labels[0] and (len(labels) == 1 or labels[1] == "natter"):
        return labels[0]
    return None


def host_port(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443, "postgres": 5432, "postgresql": 5432, "nats": 4222}
    try:
        port = parts.port or default.get(parts.scheme)
    except ValueError:
        port = None
    return parts.hostname, port


# --------------------------------------------------------------------------
def check_compose() -> set[str]:
    global checked
    rel = "deploy/compose.yaml"
    path = DEPLOY / "compose.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    services: dict = doc.get("services") or {}
    names: dict[str, str] = {}  # name or alias -> service
    for name, svc in services.items():
        names[name] = name
        for net in (svc.get("networks") or {}).values() if isinstance(svc.get("networks"), dict) else []:
            for alias in (net or {}).get("aliases", []):
                names[alias] = name

    def listen_ports(name: str) -> set[int]:
        svc = services[name]
        env = svc.get("environment") or {}
        env = env if isinstance(env, dict) else dict(str(e).partition("=")[::2] for e in env)
        ports = set()
        for key in ("NATTER_LISTEN", "NATTER_INTERNAL_LISTEN", "NATTER_METRICS_LISTEN"):
            if key in env and listen_port(env[key]) is not None:
                ports.add(listen_port(env[key]))
        image = str(svc.get("image", ""))
        known = {"postgres": {5432}, "nats": {4222, 8222}, "jaeger": {4317, 4318, 16686},
                 "opentelemetry-collector": {4317, 4318, 8889, 13133}}
        for key, value in known.items():
            if key in image:
                ports |= value
        return ports

    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {} for d in deps} if isinstance(deps, list) else deps
        for dep, cond in deps.items():
            checked += 1
            if dep not in services:
                fail(rel, f"service '{name}' depends on '{dep}', which is not defined")
            elif (cond or {}).get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                fail(rel, f"service '{name}' waits for '{dep}' to be healthy, but '{dep}' has no healthcheck")
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                checked += 1
                if not (path.parent / src).exists():
                    fail(rel, f"service '{name}' mounts {src}, which does not exist")
        for secret in svc.get("secrets") or []:
            checked += 1
            secret_name = secret if isinstance(secret, str) else secret.get("source")
            if secret_name not in (doc.get("secrets") or {}):
                fail(rel, f"service '{name}' uses secret '{secret_name}', which is not defined")
        build = svc.get("build")
        if isinstance(build, dict):
            checked += 1
            ctx = (path.parent / build.get("context", ".")).resolve()
            if not (ctx / build.get("dockerfile", "Dockerfile")).exists():
                fail(rel, f"service '{name}' builds {build.get('dockerfile')} in {ctx}, which does not exist")
        env = svc.get("environment") or {}
        env = env if isinstance(env, dict) else dict(str(e).partition("=")[::2] for e in env)
        for key, value in env.items():
            if not str(key).startswith("NATTER_") or value is None or key in NOT_ENDPOINTS:
                continue
            for url in urls_in(value):
                checked += 1
                host, port = host_port(url.replace("${", "").replace("}", ""))
                if host not in names and key in MAYBE_EXTERNAL:
                    continue  # outside the compose file
                if host not in names:
                    fail(rel, f"service '{name}': {key} points at '{host}', which is no service or alias here")
                elif port not in listen_ports(names[host]):
                    fail(rel, f"service '{name}': {key} uses port {port}, but '{names[host]}' listens on "
                              f"{sorted(listen_ports(names[host])) or 'no known port'}")
    for sname, secret in (doc.get("secrets") or {}).items():
        if "file" in (secret or {}):
            checked += 1
            if not (path.parent / secret["file"]).is_file():
                fail(rel, f"secret '{sname}' is the file {secret['file']}, which does not exist")
    return set(names)


def check_otel(compose_names: set[str]) -> None:
    global checked
    rel = "deploy/otel-collector.yaml"
    doc = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text()) or {}
    svc = doc.get("service") or {}
    for ext in svc.get("extensions") or []:
        checked += 1
        if ext not in (doc.get("extensions") or {}):
            fail(rel, f"service.extensions names '{ext}', which is not defined")
    for pname, pipe in (svc.get("pipelines") or {}).items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind) or []:
                checked += 1
                if comp not in (doc.get(kind) or {}):
                    fail(rel, f"pipeline '{pname}' names {kind[:-1]} '{comp}', which is not defined")
        if not pipe.get("receivers") or not pipe.get("exporters"):
            fail(rel, f"pipeline '{pname}' needs receivers and exporters")
    prom = ((doc.get("receivers") or {}).get("prometheus") or {}).get("config") or {}
    for job in prom.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                checked += 1
                if target.rsplit(":", 1)[0] not in compose_names:
                    fail(rel, f"scrape target {target} is not a compose service")
    exporters = doc.get("exporters") or {}
    for name, exp in exporters.items():
        if name.split("/")[0] in ("otlp", "otlphttp") and isinstance(exp, dict):
            checked += 1
            host = exp.get("endpoint", "").split("://")[-1].rsplit(":", 1)[0]
            if host not in compose_names:
                fail(rel, f"exporter '{name}' sends to '{host}', which is not a compose service")


# --------------------------------------------------------------------------
def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def pod_template(obj: dict) -> dict:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    return spec.get("template") or {}


# Manifests no kustomization lists, on purpose: the Secrets the operator
# creates (their names and keys, with placeholder values), which re-applying
# a kustomization would otherwise put back over the real ones.
NOT_APPLIED = {DEPLOY / "k8s" / "secret.yaml"}


def check_k8s() -> None:
    global checked
    k8s = DEPLOY / "k8s"
    docs: list[tuple[str, dict]] = []
    for kfile in sorted(k8s.rglob("kustomization.yaml")):
        rel = str(kfile.relative_to(ROOT))
        kdoc = yaml.safe_load(kfile.read_text()) or {}
        listed = set()
        for res in kdoc.get("resources") or []:
            checked += 1
            target = (kfile.parent / res).resolve()
            if not target.exists():
                fail(rel, f"resource {res} does not exist")
            listed.add(target)
        for gen in (kdoc.get("configMapGenerator") or []) + (kdoc.get("secretGenerator") or []):
            for entry in gen.get("files") or []:
                checked += 1
                if not (kfile.parent / str(entry).split("=", 1)[-1]).is_file():
                    fail(rel, f"generator '{gen.get('name')}' reads {entry}, which does not exist")
        for manifest in sorted(kfile.parent.glob("*.yaml")):
            if manifest.name == "kustomization.yaml" or manifest in NOT_APPLIED:
                continue
            checked += 1
            if manifest.resolve() not in listed:
                fail(rel, f"{manifest.name} is in the folder but not listed in resources")
    for path in sorted(k8s.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(str(path.relative_to(ROOT)), d) for d in load(path)]

    by_kind: dict[str, dict[str, tuple[str, dict]]] = {}
    for rel, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = (rel, d)
    workloads = [(rel, d) for rel, d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]

    def pods_matching(selector: dict) -> list[dict]:
        out = []
        for _, w in workloads:
            labels = (pod_template(w).get("metadata") or {}).get("labels") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                out.append(w)
        return out

    for rel, d in docs:
        name, kind = d["metadata"]["name"], d["kind"]
        spec = d.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            checked += 1
            sel = (spec.get("selector") or {}).get("matchLabels") or {}
            labels = (pod_template(d).get("metadata") or {}).get("labels") or {}
            if not all(labels.get(k) == v for k, v in sel.items()):
                fail(rel, f"{kind}/{name}: selector {sel} does not match its pod labels {labels}")
            if kind == "StatefulSet" and spec.get("serviceName") not in by_kind.get("Service", {}):
                fail(rel, f"StatefulSet/{name}: serviceName '{spec.get('serviceName')}' is no Service")
        if kind == "Service":
            checked += 1
            pods = pods_matching(spec.get("selector") or {})
            if not pods:
                fail(rel, f"Service/{name}: selector {spec.get('selector')} matches no workload's pods")
            for port in spec.get("ports") or []:
                tp = port.get("targetPort", port.get("port"))
                for w in pods:
                    containers = (pod_template(w).get("spec") or {}).get("containers") or []
                    ports = [p for c in containers for p in c.get("ports") or []]
                    ok = any(p.get("name") == tp or p.get("containerPort") == tp for p in ports)
                    checked += 1
                    if not ok:
                        fail(rel, f"Service/{name}: targetPort {tp} is not a port of {w['kind']}/{w['metadata']['name']}")
        if kind == "HorizontalPodAutoscaler":
            checked += 1
            ref = spec.get("scaleTargetRef") or {}
            if ref.get("name") not in by_kind.get(ref.get("kind", ""), {}):
                fail(rel, f"HPA/{name}: target {ref.get('kind')}/{ref.get('name')} is not defined")
        if kind == "PodDisruptionBudget":
            checked += 1
            if not pods_matching((spec.get("selector") or {}).get("matchLabels") or {}):
                fail(rel, f"PodDisruptionBudget/{name}: selector matches no workload's pods")
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            check_secret_refs(rel, d, by_kind.get("Secret", {}))
        if kind == "NetworkPolicy":
            check_policy_refs(rel, d, workloads)
        if kind in ("ConfigMap", "Secret"):
            data = {**(d.get("data") or {}), **(d.get("stringData") or {})}
            for key, value in data.items():
                if key in NOT_ENDPOINTS:
                    continue
                for url in urls_in(value):
                    checked += 1
                    host, port = host_port(url)
                    svc_name = (host or "").split(".")[0]
                    svc = by_kind.get("Service", {}).get(svc_name)
                    if key in MAYBE_EXTERNAL and namespace_service(host) not in by_kind.get("Service", {}):
                        continue  # outside the namespace (the NetworkPolicies are checked below)
                    if svc is None:
                        fail(rel, f"{kind}/{name} {key}: '{host}' is no Service in k8s/ or k8s/dev/")
                    elif port not in [p.get("port") for p in svc[1]["spec"].get("ports") or []]:
                        fail(rel, f"{kind}/{name} {key}: Service '{svc_name}' has no port {port}")


def secret_data(secret: dict) -> dict[str, str]:
    return {**(secret.get("data") or {}), **(secret.get("stringData") or {})}


def check_secret_refs(rel: str, workload: dict, secrets: dict[str, tuple[str, dict]]) -> None:
    """secretKeyRef and secret volumes name Secrets (and keys) that exist."""
    global checked
    spec = pod_template(workload).get("spec") or {}
    owner = f"{workload['kind']}/{workload['metadata']['name']}"
    refs: list[tuple[str, str | None, bool]] = []  # (secret, key or None, optional)
    for c in spec.get("containers") or []:
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"], bool(ref.get("optional"))))
    for v in spec.get("volumes") or []:
        sources = [v] if "secret" in v else (v.get("projected") or {}).get("sources") or []
        for src in sources:
            sec = src.get("secret")
            if not sec:
                continue
            name = sec.get("secretName", sec.get("name"))
            items = sec.get("items") or [{"key": None}]
            refs += [(name, item["key"], bool(sec.get("optional"))) for item in items]
    for name, key, optional in refs:
        checked += 1
        if name not in secrets:
            if not optional:
                fail(rel, f"{owner}: Secret '{name}' is not defined in k8s/")
        elif key is not None and key not in secret_data(secrets[name][1]):
            fail(rel, f"{owner}: Secret '{name}' has no key '{key}'")


# --------------------------------------------------------------------------
# NetworkPolicies
# --------------------------------------------------------------------------
NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "natter"}  # and namespace.yaml's labels


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) on `labels`; {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, values = e["key"] in labels, e.get("values") or []
        ok = {"In": has and labels.get(e["key"]) in values, "NotIn": not (has and labels.get(e["key"]) in values),
              "Exists": has, "DoesNotExist": not has}.get(e["operator"], False)
        if not ok:
            return False
    return True


def pod_labels(w: dict) -> dict:
    return (pod_template(w).get("metadata") or {}).get("labels") or {}


def pod_ports(w: dict) -> list[tuple[str | None, int]]:
    containers = (pod_template(w).get("spec") or {}).get("containers") or []
    return [(p.get("name"), p.get("containerPort")) for c in containers for p in c.get("ports") or []]


def has_port(w: dict, port) -> bool:
    return any(port in (name, number) for name, number in pod_ports(w))


def check_policy_refs(rel: str, policy: dict, workloads: list[tuple[str, dict]]) -> None:
    """Selectors match some workload's pods; named ports are ports of them."""
    global checked
    name, spec = policy["metadata"]["name"], policy.get("spec") or {}
    targets = [w for _, w in workloads if selects(spec.get("podSelector"), pod_labels(w))]
    checked += 1
    if spec.get("podSelector") and not targets:
        fail(rel, f"NetworkPolicy/{name}: podSelector matches no workload's pods")
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(spec.get(direction) or []):
            where = f"NetworkPolicy/{name} {direction}[{i}]"
            local = [p["podSelector"] for p in rule.get(peers_key) or []
                     if "podSelector" in p and "namespaceSelector" not in p]
            peers = []
            for sel in local:
                checked += 1
                matched = [w for _, w in workloads if selects(sel, pod_labels(w))]
                if not matched:
                    fail(rel, f"{where}: podSelector {sel} matches no workload's pods")
                peers += matched
            # Ingress ports are ports of the selected pods; egress ports of
            # the peer pods (when the peers are pods of this namespace).
            owners = targets if direction == "ingress" else (peers if local and len(local) == len(rule.get(peers_key) or []) else [])
            for port in rule.get("ports") or []:
                if "port" not in port:
                    continue
                for w in owners:
                    checked += 1
                    if not has_port(w, port["port"]):
                        fail(rel, f"{where}: port {port['port']} is not a port of {w['kind']}/{w['metadata']['name']}")


class Policies:
    """Evaluates NetworkPolicies: may traffic go from one pod to another's port?

    A pod is given by its labels; None stands for anything outside the
    namespace (other namespaces, the node, the internet).
    """

    def __init__(self, policies: list[dict]):
        self.policies = policies

    @staticmethod
    def types(p: dict) -> list[str]:
        spec = p.get("spec") or {}
        return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))

    @staticmethod
    def peer_admits(peer: dict, labels: dict | None) -> bool:
        if "ipBlock" in peer:
            return labels is None
        ns, pod = peer.get("namespaceSelector"), peer.get("podSelector")
        if labels is None:
            return ns is not None  # some pod in another namespace may match
        if ns is not None and not selects(ns, NAMESPACE_LABELS):
            return False
        return pod is None or selects(pod, labels)

    @staticmethod
    def port_admits(ports: list | None, port: tuple[str | None, int]) -> bool:
        if not ports:
            return True
        for p in ports:
            if p.get("protocol", "TCP") != "TCP":
                continue
            want = p.get("port")
            if want is None or want in port or (isinstance(want, int) and want <= port[1] <= p.get("endPort", want)):
                return True
        return False

    def one_way(self, direction: str, pod: dict, peer: dict | None, port: tuple[str | None, int]) -> bool:
        kind, key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
        pols = [p for p in self.policies if kind in self.types(p) and selects((p.get("spec") or {}).get("podSelector"), pod)]
        if not pols:
            return True
        return any(self.port_admits(r.get("ports"), port)
                   and (not r.get(key) or any(self.peer_admits(x, peer) for x in r[key]))
                   for p in pols for r in (p.get("spec") or {}).get(direction) or [])

    def allows(self, src: dict | None, dst: dict | None, port: tuple[str | None, int]) -> bool:
        out = src is None or self.one_way("egress", src, dst, port)
        into = dst is None or self.one_way("ingress", dst, src, port)
        return out and into


# --------------------------------------------------------------------------
# natter's contract
# --------------------------------------------------------------------------
# The split services: each runs alone, with an internal listener and the
# service credential ...
SPLIT = ("sessions", "chats", "messages", "assistant")
# ... whose internal listener serves an internal API to these callers (the
# assistant's serves only health: no one calls it) ...
INTERNAL_CALLERS = {"sessions": SPLIT, "chats": SPLIT, "messages": SPLIT, "assistant": ()}
# ... and those that keep data: PostgreSQL and NATS are theirs alone.
DATA = ("sessions", "chats", "messages")
CALLEE_URLS = {"NATTER_SESSIONS_URL": "sessions", "NATTER_CHATS_URL": "chats", "NATTER_MESSAGES_URL": "messages",
               "NATTER_ASSISTANT_URL": "assistant"}
SECRET_FORMATS = {
    # natter-kit's ServiceCredential: trimmed, >= 32 bytes, a header value.
    "NATTER_SERVICE_CREDENTIAL_FILE": (lambda v: re.fullmatch(r"[\x21-\x7e][\x20-\x7e]{30,}[\x21-\x7e]", v.strip()) is not None,
                                       "at least 32 bytes of printable ASCII"),
    # nats.conf reads it from the environment and parses it: a leading digit
    # reads as a number; spaces, quotes or `#` end or break it.
    "NATTER_NATS_PASSWORD_FILE": (lambda v: re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{15,}", v) is not None,
                                  "a letter, then 15 or more letters, digits, `-` or `_`"),
    # natter-assistant reads the first line, trimmed, and refuses an empty one.
    "NATTER_ASSISTANT_API_KEY_FILE": (lambda v: bool((v.splitlines() or [""])[0].strip()),
                                      "a key on its first line"),
}


def role(argv: list[str]) -> str | None:
    """'sessions', 'chats', 'messages', 'assistant', 'edge' or 'serve' (all-in-one)."""
    if not argv:
        return None
    binary = Path(argv[0]).name
    if binary == "natter":
        return next((a for a in argv[1:] if not a.startswith("-")), None)
    return binary.removeprefix("natter-") if binary.startswith("natter-") else None


def check_env_contract(rel: str, where: str, who: str | None, env: dict, listener_kind, file_secret) -> None:
    """Checks one natter container's configuration against the contract.

    listener_kind(url) -> 'public' | 'internal' | None (unknown target);
    file_secret(path) -> the secret's value ('' if unknown), or None when
    no secret is mounted there.
    """
    global checked
    if who in SPLIT:
        checked += 2
        if not env.get("NATTER_SERVICE_CREDENTIAL_FILE"):
            fail(rel, f"{where}: a split service needs NATTER_SERVICE_CREDENTIAL_FILE")
        listen = env.get("NATTER_INTERNAL_LISTEN")
        if not listen:
            fail(rel, f"{where}: NATTER_INTERNAL_LISTEN is unset (default 127.0.0.1:7071: unreachable for the other services)")
        elif str(listen).rsplit(":", 1)[0] not in ("0.0.0.0", "[::]", "::"):
            fail(rel, f"{where}: NATTER_INTERNAL_LISTEN={listen} is not reachable from other containers")
    if who in SPLIT or who == "edge":
        want = "public" if who == "edge" else "internal"
        for var in CALLEE_URLS:
            for url in urls_in(env.get(var) or ""):
                checked += 1
                kind = listener_kind(url)
                if kind is not None and kind != want:
                    fail(rel, f"{where}: {var}={url} is the callee's {kind} listener; the {who} calls the {want} one")
    nats = env.get("NATTER_NATS_URL")
    if nats:
        checked += 1
        if not (env.get("NATTER_NATS_USER") and env.get("NATTER_NATS_PASSWORD_FILE")) and "@" not in str(nats):
            fail(rel, f"{where}: NATTER_NATS_URL without credentials (NATTER_NATS_USER + NATTER_NATS_PASSWORD_FILE)")
    for var, value in env.items():
        if var.startswith("NATTER_") and var.endswith("_FILE") and value:
            checked += 1
            secret = file_secret(str(value))
            if secret is None:
                fail(rel, f"{where}: {var}={value} is no file mounted from a secret")
            elif var in SECRET_FORMATS and secret and not SECRET_FORMATS[var][0](secret):
                fail(rel, f"{where}: the secret in {var} must be {SECRET_FORMATS[var][1]}")


def check_compose_contract() -> None:
    global checked
    rel = "deploy/compose.yaml"
    path = DEPLOY / "compose.yaml"
    doc = yaml.safe_load(path.read_text()) or {}
    services: dict = doc.get("services") or {}
    image = parse_dockerfile(DEPLOY / "Dockerfile")
    by_name = {name: name for name in services}
    for name, svc in services.items():
        nets = svc.get("networks") if isinstance(svc.get("networks"), dict) else {}
        for net in nets.values():
            for alias in (net or {}).get("aliases", []):
                by_name[alias] = name
    envs = {inv.where.split("'")[1]: inv for inv in compose_invocations(path, rel, image)
            if not inv.where.endswith("healthcheck")}

    def listener_kind(url: str) -> str | None:
        host, port = host_port(url)
        inv = envs.get(by_name.get(host or "", ""))
        if inv is None:
            return None
        kinds = {listen_port(inv.env.get("NATTER_LISTEN")): "public",
                 listen_port(inv.env.get("NATTER_INTERNAL_LISTEN")): "internal"}
        return kinds.get(port)

    def secret_files(svc: dict) -> dict[str, Path]:
        out = {}
        for s in svc.get("secrets") or []:
            source = s if isinstance(s, str) else s.get("source")
            target = s if isinstance(s, str) else s.get("target", source)
            file = ((doc.get("secrets") or {}).get(source) or {}).get("file")
            if file:
                out[target if target.startswith("/") else f"/run/secrets/{target}"] = path.parent / file
        return out

    # The edge routes every service that runs, to each replica: a missing
    # NATTER_ASSISTANT_URL makes the assistant's calls UNIMPLEMENTED, a
    # replica reached only through a shared alias is neither balanced nor
    # health-checked on its own.
    for edge, inv in envs.items():
        if role(inv.argv) != "edge":
            continue
        for var, callee in CALLEE_URLS.items():
            routed = {by_name.get(host_port(u)[0] or "") for u in urls_in(inv.env.get(var) or "")}
            for name, other in envs.items():
                if role(other.argv) == callee:
                    checked += 1
                    if name not in routed:
                        fail(rel, f"service '{edge}': {var} does not name service '{name}' ({callee}), "
                                  f"so the edge does not route to it")

    nats_password_files = set()
    for name, inv in envs.items():
        svc = services[name]
        files = secret_files(svc)

        def file_secret(p: str, files=files) -> str | None:
            f = files.get(p)
            return None if f is None else (f.read_text().rstrip("\r\n") if f.is_file() else "")

        who = role(inv.argv)
        check_env_contract(rel, f"service '{name}'", who, inv.env, listener_kind, file_secret)
        if inv.env.get("NATTER_NATS_PASSWORD_FILE") in files:
            nats_password_files.add(files[inv.env["NATTER_NATS_PASSWORD_FILE"]].resolve())
        internal = listen_port(inv.env.get("NATTER_INTERNAL_LISTEN"))
        for published in svc.get("ports") or []:
            checked += 1
            target = str(published.get("target") if isinstance(published, dict) else published).rsplit(":", 1)[-1]
            if internal is not None and target.split("/")[0] == str(internal):
                fail(rel, f"service '{name}' publishes its internal port {internal} to the host")
    # The NATS server must read the same password file as natter.
    for name, svc in services.items():
        if "nats" in str(svc.get("image", "")) and nats_password_files:
            checked += 1
            if not nats_password_files & {f.resolve() for f in secret_files(svc).values()}:
                fail(rel, f"service '{name}' (NATS) is not given the secret natter's NATTER_NATS_PASSWORD_FILE names")


def check_k8s_contract() -> None:
    global checked
    k8s = DEPLOY / "k8s"
    files = sorted(p for p in k8s.rglob("*.yaml") if p.name != "kustomization.yaml")
    docs = [(str(f.relative_to(ROOT)), d) for f in files for d in load(f)]
    by_kind: dict[str, dict[str, dict]] = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    workloads = [d for _, d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    invocations, _ = k8s_invocations([(f, str(f.relative_to(ROOT))) for f in files],
                                     parse_dockerfile(DEPLOY / "Dockerfile"))
    natter: dict[str, tuple[object, dict, dict]] = {}  # workload name -> (invocation, workload, container)
    for w in workloads:
        for c in (pod_template(w).get("spec") or {}).get("containers") or []:
            where = f"{w['kind']}/{w['metadata']['name']} container '{c.get('name')}'"
            inv = next((i for i in invocations if i.where == where), None)
            if inv is not None:
                natter[w["metadata"]["name"]] = (inv, w, c)
    rel_of = {id(d): rel for rel, d in docs}
    policies = Policies(list(by_kind.get("NetworkPolicy", {}).values()))

    def targets(url: str) -> list[tuple[dict, tuple[str | None, int]]]:
        """The pods (workloads) and container ports a URL reaches through its Service."""
        host, port = host_port(url)
        svc = by_kind.get("Service", {}).get((host or "").split(".")[0])
        if svc is None:
            return []
        out = []
        for sp in svc["spec"].get("ports") or []:
            if sp.get("port") != port:
                continue
            tp = sp.get("targetPort", sp.get("port"))
            for w in workloads:
                if selects({"matchLabels": svc["spec"].get("selector") or {}}, pod_labels(w)) and svc["spec"].get("selector"):
                    out += [(w, p) for p in pod_ports(w) if tp in p]
        return out

    def listener_kind(url: str) -> str | None:
        for w, (_, number) in targets(url):
            entry = natter.get(w["metadata"]["name"])
            if entry:
                env = entry[0].env
                if number == listen_port(env.get("NATTER_LISTEN")):
                    return "public"
                if number == listen_port(env.get("NATTER_INTERNAL_LISTEN")):
                    return "internal"
        return None

    def role_of(w: dict) -> str | None:
        entry = natter.get(w["metadata"]["name"])
        return role(entry[0].argv) if entry else None

    # Containers: URLs, listeners, mounted secret files.
    for name, (inv, w, c) in natter.items():
        rel = rel_of[id(w)]
        spec = pod_template(w).get("spec") or {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}

        def file_secret(path: str, c=c, volumes=volumes) -> str | None:
            for m in c.get("volumeMounts") or []:
                base = m["mountPath"].rstrip("/") + "/"
                if not path.startswith(base):
                    continue
                v = volumes.get(m["name"]) or {}
                sources = [v] if "secret" in v else (v.get("projected") or {}).get("sources") or []
                for src in sources:
                    sec = src.get("secret")
                    if not sec:
                        continue
                    secret = by_kind.get("Secret", {}).get(sec.get("secretName", sec.get("name")))
                    data = secret_data(secret) if secret else {}
                    items = sec.get("items") or [{"key": k, "path": k} for k in data]
                    for item in items:
                        if base + item["path"] == path:
                            return str(data.get(item["key"], ""))
            return None

        check_env_contract(rel, inv.where, role(inv.argv), inv.env, listener_kind, file_secret)
        for var in ("NATTER_LISTEN", "NATTER_INTERNAL_LISTEN", "NATTER_METRICS_LISTEN"):
            port = listen_port(inv.env.get(var))
            checked += 1
            if port is not None and not has_port(w, port):
                fail(rel, f"{inv.where}: {var} port {port} is not a containerPort")

    # The NATS server reads the password natter's pods are given.
    nats_keys = set()
    for inv, w, c in natter.values():
        for v in (pod_template(w).get("spec") or {}).get("volumes") or []:
            for src in ((v.get("projected") or {}).get("sources") or []) + ([v] if "secret" in v else []):
                sec = src.get("secret") or {}
                for item in sec.get("items") or []:
                    if inv.env.get("NATTER_NATS_PASSWORD_FILE", "").endswith("/" + item["path"]):
                        nats_keys.add((sec.get("secretName", sec.get("name")), item["key"]))
    for w in workloads:
        for c in (pod_template(w).get("spec") or {}).get("containers") or []:
            for e in c.get("env") or []:
                if e["name"] == "NATTER_NATS_PASSWORD":
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
                    checked += 1
                    if (ref.get("name"), ref.get("key")) not in nats_keys:
                        fail(rel_of[id(w)], f"{w['kind']}/{w['metadata']['name']}: NATTER_NATS_PASSWORD is not "
                                            f"the Secret key natter's NATTER_NATS_PASSWORD_FILE holds {sorted(nats_keys)}")

    if not policies.policies:
        return
    rel = "deploy/k8s NetworkPolicies"
    checked += 1
    if not any(not (p.get("spec") or {}).get("podSelector") and {"Ingress", "Egress"} <= set(Policies.types(p))
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies.policies):
        fail(rel, "no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)")

    def name(w: dict | None) -> str:
        return "outside the namespace" if w is None else f"{w['kind']}/{w['metadata']['name']}"

    # The edge routes every service that runs (through its Service).
    for inv, w, c in natter.values():
        if role(inv.argv) != "edge":
            continue
        for var, callee in CALLEE_URLS.items():
            reached = {id(dst) for url in urls_in(inv.env.get(var) or "") for dst, _ in targets(url)}
            for dst in workloads:
                if role_of(dst) == callee:
                    checked += 1
                    if id(dst) not in reached:
                        fail(rel_of[id(w)], f"{inv.where}: {var} does not reach {name(dst)} ({callee}), "
                                            f"so the edge does not route to it")

    # Every call the configuration makes is allowed.
    for inv, w, c in natter.values():
        who = role(inv.argv)
        if who == "edge":
            for port in pod_ports(w):
                if port[1] == listen_port(inv.env.get("NATTER_LISTEN")):
                    checked += 1
                    if not policies.allows(None, pod_labels(w), port):
                        fail(rel, f"clients outside the namespace cannot reach {name(w)} port {port[0] or port[1]}")
        for var, value in sorted(inv.env.items()):
            if not var.startswith("NATTER_") or not value or var in NOT_ENDPOINTS:
                continue
            for url in urls_in(value):
                host, number = host_port(url)
                if var in MAYBE_EXTERNAL and namespace_service(host) not in by_kind.get("Service", {}):
                    # Outside the namespace (another namespace, the internet):
                    # only this pod's egress rules decide.
                    checked += 1
                    if number is None or not policies.allows(pod_labels(w), None, (None, number)):
                        fail(rel, f"{name(w)} cannot reach {host} port {number} ({var})")
                    continue
                for dst, port in targets(url):
                    checked += 1
                    if not policies.allows(pod_labels(w), pod_labels(dst), port):
                        fail(rel, f"{name(w)} cannot reach {name(dst)} port {port[0] or port[1]} ({var})")

    # ... and these are not: who may reach what.
    service_pods = [w for w in workloads if role_of(w) in SPLIT]
    guarded: list[tuple[dict, tuple[str | None, int], str, set[str]]] = []
    for w in service_pods:
        env = natter[w["metadata"]["name"]][0].env
        for port in pod_ports(w):
            if port[1] == listen_port(env.get("NATTER_INTERNAL_LISTEN")):
                callers = set(INTERNAL_CALLERS.get(role_of(w), ()))
                who = "only natter's services should" if callers else "nothing should (it serves only health)"
                guarded.append((w, port, who, callers))
            if port[1] == listen_port(env.get("NATTER_LISTEN")):
                guarded.append((w, port, "only the edge should", {"edge"}))
        for var in ("NATTER_DATABASE_URL", "NATTER_NATS_URL"):
            for url in urls_in(env.get(var) or ""):
                guarded += [(dst, port, "only sessions, chats and messages should", set(DATA)) for dst, port in targets(url)]
    seen = set()
    for dst, port, who, roles in guarded:
        if (id(dst), port) in seen:
            continue
        seen.add((id(dst), port))
        for src in [None, *workloads]:
            checked += 1
            # The callee's ingress rules alone must refuse them (whatever
            # the callers' egress rules say).
            if (src is None or role_of(src) not in roles) and policies.one_way(
                    "ingress", pod_labels(dst), None if src is None else pod_labels(src), port):
                fail(rel, f"{name(src)} may reach {name(dst)} port {port[0] or port[1]}: {who}")


def main() -> int:
    names = check_compose()
    check_otel(names)
    check_k8s()
    check_compose_contract()
    check_k8s_contract()
    for p in problems:
        print(p)
    print(f"check_refs: {checked} references checked: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
