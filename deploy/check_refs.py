#!/usr/bin/env python3
"""Cross-reference checks of the deploy files that no schema catches.

compose.yaml
  - depends_on names defined services; `service_healthy` ones have a healthcheck
  - bind-mounted files and the build context / Dockerfile exist
  - every URL in a NATTER_* variable (comma-separated lists too) names a
    service or network alias of the file, on a port that service listens on
otel-collector.yaml
  - every component a pipeline names is defined; scrape targets are services
k8s/ (and k8s/dev/)
  - each kustomization.yaml lists files that exist, and every manifest in its
    folder is listed in it
  - every Service selects the pods of some workload and its targetPorts exist
  - HPA and PodDisruptionBudget targets exist
  - every URL in a ConfigMap / Secret names a Service (of k8s/ or k8s/dev/)
    that has that port

Prints one line per problem (`FAIL <file>: ...`) and a summary; exit 1 when
there is any.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
problems: list[str] = []
checked = 0


def fail(file: str, msg: str) -> None:
    problems.append(f"FAIL {file}: {msg}")


def urls_in(value: str) -> list[str]:
    return [u.strip() for u in str(value).split(",") if "://" in u]


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
        for key in ("NATTER_LISTEN", "NATTER_METRICS_LISTEN"):
            if key in env:
                ports.add(int(str(env[key]).rsplit(":", 1)[1]))
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
        build = svc.get("build")
        if isinstance(build, dict):
            checked += 1
            ctx = (path.parent / build.get("context", ".")).resolve()
            if not (ctx / build.get("dockerfile", "Dockerfile")).exists():
                fail(rel, f"service '{name}' builds {build.get('dockerfile')} in {ctx}, which does not exist")
        env = svc.get("environment") or {}
        env = env if isinstance(env, dict) else dict(str(e).partition("=")[::2] for e in env)
        for key, value in env.items():
            if not str(key).startswith("NATTER_") or value is None:
                continue
            for url in urls_in(value):
                checked += 1
                host, port = host_port(url.replace("${", "").replace("}", ""))
                if host not in names:
                    fail(rel, f"service '{name}': {key} points at '{host}', which is no service or alias here")
                elif port not in listen_ports(names[host]):
                    fail(rel, f"service '{name}': {key} uses port {port}, but '{names[host]}' listens on "
                              f"{sorted(listen_ports(names[host])) or 'no known port'}")
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
        for manifest in sorted(kfile.parent.glob("*.yaml")):
            if manifest.name == "kustomization.yaml":
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
        if kind in ("ConfigMap", "Secret"):
            data = {**(d.get("data") or {}), **(d.get("stringData") or {})}
            for key, value in data.items():
                for url in urls_in(value):
                    checked += 1
                    host, port = host_port(url)
                    svc_name = (host or "").split(".")[0]
                    svc = by_kind.get("Service", {}).get(svc_name)
                    if svc is None:
                        fail(rel, f"{kind}/{name} {key}: '{host}' is no Service in k8s/ or k8s/dev/")
                    elif port not in [p.get("port") for p in svc[1]["spec"].get("ports") or []]:
                        fail(rel, f"{kind}/{name} {key}: Service '{svc_name}' has no port {port}")


def main() -> int:
    names = check_compose()
    check_otel(names)
    check_k8s()
    for p in problems:
        print(p)
    print(f"check_refs: {checked} references checked: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
