#!/usr/bin/env python3
"""Operating rules of the Kubernetes manifests, checked on what
`kubectl apply -k` applies (`kubectl kustomize` renders it when kubectl is
installed; otherwise the kustomization's own resources and generators are
read, which is the same for kustomizations without patches).

secrets (deploy/k8s and deploy/k8s/dev)
  - neither renders a Secret or a value holding the placeholder mark
    (REPLACE-ME): the operator creates the Secrets (deploy/README.md,
    "Secrets"; k8s/secret.yaml shows them), so re-applying a kustomization
    after a new image or a configuration change never puts placeholders
    back over real secrets (restarting pods would exit on them)
PostgreSQL connections (deploy/k8s)
  - every natter container given NATTER_DATABASE_URL sets
    NATTER_DATABASE_MAX_CONNECTIONS itself (the binaries' default, 16 a
    service, is sized for one process, not for a fleet)
  - the sum over those workloads of (pods at once) x pool x services per
    process fits the budget annotated on one ConfigMap
    (natter/postgres-connection-budget); pods at once are the HPA's
    maxReplicas (or replicas) plus the rollout's maxSurge
  - the budget fits the dev PostgreSQL's max_connections (its `-c
    max_connections=N`, else PostgreSQL's default 100) less the slots
    reserved for superusers
  - init containers do not count: they end before the pod's containers
    start
migrations (deploy/k8s)
  - a Deployment whose natter container is given NATTER_DATABASE_URL has an
    init container `migrate` running `natter migrate --service <its
    service>` (all three for the all-in-one) on the same database URL, so
    that a pod whose store cannot be migrated never starts its server
disruptions (deploy/k8s and deploy/k8s/dev)
  - a Deployment or StatefulSet that may run more than one pod has exactly
    one PodDisruptionBudget selecting its pods, which lets a drain evict at
    least one of them, and a topologySpreadConstraint over nodes
    (kubernetes.io/hostname) selecting its own pods
connection age (deploy/k8s)
  - a natter server that another natter container reaches through a
    ClusterIP Service (which balances connections, not calls) closes its
    connections within 10 minutes (NATTER_MAX_CONNECTION_AGE; default 1h),
    so that pods the HPA adds get calls soon

Usage: check_ops.py [DIR ...]: with folders of kustomizations (your
overlay), checks those as deploy/k8s is checked, but for two things: they
may hold Secrets (from a secretGenerator whose files stay out of git; a
placeholder still fails), and there is no dev server to hold the budget to.

Prints one line per problem (`FAIL <where>: ...`), the connection budget,
and a summary; exit 1 when there is any problem.
"""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from check_flags import k8s_invocations, parse_dockerfile
from check_refs import host_port, pod_template, role, selects, urls_in

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# Applied as they are (deploy/README.md, "Kubernetes"): the base and the dev
# backing services.
KUSTOMIZATIONS = (K8S, K8S / "dev")
# What marks the placeholder secrets of natter's deploy files
# (natter_kit::config::PLACEHOLDER_MARK; a pod refuses a secret holding it).
PLACEHOLDER = "REPLACE-ME"
# The Secrets the operator creates, with placeholder values: their keys tell
# which variables an envFrom secretRef brings.
SECRETS_EXAMPLE = K8S / "secret.yaml"
BUDGET_ANNOTATION = "natter/postgres-connection-budget"
# --database-max-connections' default (crates/db/src/lib.rs, StoreArgs).
DEFAULT_POOL = 16
# PostgreSQL's defaults: max_connections, superuser_reserved_connections
# (and, from 16, reserved_connections, 0).
PG_MAX_CONNECTIONS, PG_RESERVED = 100, 3
# Each process of the all-in-one (`natter serve`) has three stores.
STORES_PER_PROCESS = {"serve": 3}
MAX_CONNECTION_AGE_LIMIT = 600.0  # seconds
DEFAULT_MAX_CONNECTION_AGE = "1h"  # crates/kit/src/config.rs, TransportArgs
WORKLOADS = ("Deployment", "StatefulSet")

problems: list[str] = []
checked = 0


def fail(where: str, msg: str) -> None:
    problems.append(f"FAIL {where}: {msg}")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

def render(directory: Path) -> tuple[list[dict], str]:
    """The objects `kubectl apply -k directory` applies, and how they were found."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {rel(directory)}: {out.stderr.strip()}")
        return [d for d in yaml.safe_load_all(out.stdout) if isinstance(d, dict)], "kubectl kustomize"
    return read_kustomization(directory), "no kubectl: its resources and generators as listed"


def read_kustomization(directory: Path) -> list[dict]:
    """A kustomization's resources and generated objects, without kubectl;
    refuses kustomizations that transform them (patches, components, ...)."""
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text()) or {}
    unsupported = [key for key in ("patches", "patchesStrategicMerge", "patchesJson6902", "components",
                                   "replacements", "helmCharts", "replicas") if k.get(key)]
    if unsupported:
        raise RuntimeError(f"{rel(kfile)} uses {', '.join(unsupported)}: install kubectl to render it")
    docs: list[dict] = []
    for res in k.get("resources") or []:
        target = directory / res
        if target.is_dir():
            docs += read_kustomization(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if isinstance(d, dict)]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in k.get(key) or []:
            data: dict[str, str] = {}
            for lit in gen.get("literals") or []:
                name, _, value = str(lit).partition("=")
                data[name] = value
            for entry in gen.get("files") or []:
                name, eq, file = str(entry).partition("=")
                path = directory / (file if eq else name)
                data[path.name if not eq else name] = path.read_text()
            for env_file in gen.get("envs") or []:
                for line in (directory / env_file).read_text().splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        name, _, value = line.partition("=")
                        data[name.strip()] = value
            docs.append({"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}, "data": data})
    return docs


def name_of(d: dict) -> str:
    return f"{d['kind']}/{d['metadata']['name']}"


def strings(value, path: str = ""):
    """Every string in a YAML value, with where it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


# --------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------

def check_secrets(where: str, docs: list[dict], secrets_allowed: bool) -> None:
    global checked
    for d in docs:
        checked += 1
        if d["kind"] == "Secret" and not secrets_allowed:
            fail(where, f"renders {name_of(d)}: every `kubectl apply -k` would overwrite the operator's "
                        f"Secret with it (create Secrets outside the kustomization: deploy/README.md, \"Secrets\")")
        for path, value in strings(d):
            if d["kind"] == "Secret" and path.startswith("data."):  # base64
                value += " " + base64.b64decode(value + "==").decode("utf-8", "replace")
            if PLACEHOLDER in value.upper():
                fail(where, f"{name_of(d)} {path} holds the placeholder {PLACEHOLDER}")


# --------------------------------------------------------------------------
# Replicas, rollouts, disruptions
# --------------------------------------------------------------------------

def hpa_of(workload: dict, docs: list[dict]) -> dict | None:
    for d in docs:
        ref = (d.get("spec") or {}).get("scaleTargetRef") or {}
        if d["kind"] == "HorizontalPodAutoscaler" and ref.get("kind") == workload["kind"] \
                and ref.get("name") == workload["metadata"]["name"]:
            return d
    return None


def replica_range(workload: dict, docs: list[dict]) -> tuple[int, int]:
    """Fewest and most pods the workload runs outside a rollout."""
    hpa = hpa_of(workload, docs)
    if hpa:
        spec = hpa["spec"]
        return int(spec.get("minReplicas", 1)), int(spec["maxReplicas"])
    n = int((workload.get("spec") or {}).get("replicas", 1))
    return n, n


def scaled(value, pods: int, round_up: bool) -> int:
    """An int-or-percent of a rollout or a disruption budget, for `pods` pods."""
    if isinstance(value, str) and value.endswith("%"):
        share = int(value[:-1]) * pods / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value)


def surge(workload: dict, pods: int) -> int:
    """Most pods a rollout adds above `pods` (Kubernetes' defaults: a
    Deployment's maxSurge 25%, rounded up; a StatefulSet replaces in place)."""
    if workload["kind"] != "Deployment":
        return 0
    strategy = (workload.get("spec") or {}).get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return 0
    return scaled((strategy.get("rollingUpdate") or {}).get("maxSurge", "25%"), pods, round_up=True)


def pod_labels(w: dict) -> dict:
    return (pod_template(w).get("metadata") or {}).get("labels") or {}


def check_disruptions(where: str, docs: list[dict]) -> None:
    global checked
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        low, high = replica_range(w, docs)
        if high <= 1:
            continue
        checked += 1
        labels = pod_labels(w)
        mine = [p for p in pdbs if selects((p.get("spec") or {}).get("selector"), labels)]
        if not mine:
            fail(where, f"{name_of(w)} runs up to {high} pods but no PodDisruptionBudget selects them: "
                        f"a node drain may evict all at once")
        elif len(mine) > 1:
            fail(where, f"{name_of(w)}: {len(mine)} PodDisruptionBudgets select its pods "
                        f"({', '.join(name_of(p) for p in mine)}); the eviction API refuses to evict such pods")
        else:
            spec = mine[0]["spec"]
            if "maxUnavailable" in spec:
                allowed = scaled(spec["maxUnavailable"], low, round_up=True)
            else:
                allowed = low - scaled(spec.get("minAvailable", 1), low, round_up=True)
            if allowed < 1:
                fail(where, f"{name_of(mine[0])} lets no {name_of(w)} pod be evicted at {low} replicas: "
                            f"every node drain would hang")
        checked += 1
        spread = (pod_template(w).get("spec") or {}).get("topologySpreadConstraints") or []
        if not any(c.get("topologyKey") == "kubernetes.io/hostname" and selects(c.get("labelSelector"), labels)
                   for c in spread):
            fail(where, f"{name_of(w)} runs up to {high} pods with no topologySpreadConstraint over "
                        f"kubernetes.io/hostname selecting them: they may all land on one node")


# --------------------------------------------------------------------------
# PostgreSQL connections
# --------------------------------------------------------------------------

def invocations_of(docs: list[dict], extra_files: list[Path]):
    """natter containers of `docs` with their environment resolved
    (check_flags.k8s_invocations), the Secrets of `extra_files` included."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        yaml.safe_dump_all(docs, tmp)
        tmp.flush()
        files = [(Path(tmp.name), "rendered")] + [(f, rel(f)) for f in extra_files if f.exists()]
        invs, _ = k8s_invocations(files, parse_dockerfile(DEPLOY / "Dockerfile"))
    return [i for i in invs if not i.where.endswith(("Probe", "preStop"))]


def container_of(inv) -> str:
    """The container's name in an invocation's `where`."""
    return inv.where.split(" container ", 1)[1].strip("'")


def is_init(inv, docs: list[dict]) -> bool:
    """Whether `inv` is one of its workload's init containers."""
    w = workload_of(inv, docs)
    spec = (pod_template(w).get("spec") or {}) if w else {}
    return container_of(inv) in {c.get("name") for c in spec.get("initContainers") or []}


def workload_of(inv, docs: list[dict]) -> dict | None:
    owner = inv.where.split(" container ", 1)[0]
    return next((d for d in docs if name_of(d) == owner), None)


def postgres_max_connections(docs: list[dict]) -> tuple[int, int, str] | None:
    """max_connections and reserved slots of a PostgreSQL workload in `docs`
    (its `-c name=value` arguments, else PostgreSQL's defaults)."""
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        for c in (pod_template(w).get("spec") or {}).get("containers") or []:
            if not str(c.get("image", "")).split("/")[-1].startswith("postgres"):
                continue
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            settings = {}
            for i, a in enumerate(argv):
                setting = argv[i + 1] if a == "-c" and i + 1 < len(argv) else a[2:] if a.startswith("--") else None
                if setting and "=" in setting:
                    key, _, value = setting.partition("=")
                    settings[key.replace("-", "_")] = value
            reserved = int(settings.get("superuser_reserved_connections", PG_RESERVED)) + \
                int(settings.get("reserved_connections", 0))
            return int(settings.get("max_connections", PG_MAX_CONNECTIONS)), reserved, name_of(w)
    return None


def check_connection_budget(where: str, docs: list[dict], dev_docs: list[dict]) -> None:
    global checked
    rows = []
    for inv in invocations_of(docs, [SECRETS_EXAMPLE]):
        if "NATTER_DATABASE_URL" not in inv.env or is_init(inv, docs):
            continue
        w = workload_of(inv, docs)
        if w is None:
            continue
        checked += 1
        value = inv.env.get("NATTER_DATABASE_MAX_CONNECTIONS")
        if value is None:
            fail(where, f"{inv.where}: NATTER_DATABASE_MAX_CONNECTIONS is not set (the default, {DEFAULT_POOL} a "
                        f"service, counts here): set its pool in the budget's ConfigMap")
            pool = DEFAULT_POOL
        else:
            try:
                pool = int(value)
            except ValueError:
                fail(where, f"{inv.where}: NATTER_DATABASE_MAX_CONNECTIONS={value} is not a number")
                continue
        _, high = replica_range(w, docs)
        extra = surge(w, high)
        stores = STORES_PER_PROCESS.get(role(inv.argv) or "", 1)
        rows.append((name_of(w), high, extra, pool, stores, (high + extra) * pool * stores))
    if not rows:
        return
    budgets = [(d, d["metadata"].get("annotations", {})[BUDGET_ANNOTATION]) for d in docs
               if BUDGET_ANNOTATION in ((d.get("metadata") or {}).get("annotations") or {})]
    checked += 1
    if len(budgets) != 1:
        fail(where, f"{len(budgets)} objects carry the annotation {BUDGET_ANNOTATION}; "
                    f"the PostgreSQL connection budget must be declared once")
        return
    holder, raw = budgets[0]
    try:
        budget = int(raw)
    except ValueError:
        fail(where, f"{name_of(holder)}: {BUDGET_ANNOTATION}={raw!r} is not a number")
        return
    total = sum(r[-1] for r in rows)
    print(f"PostgreSQL connections at most ({where}; budget {budget}, {name_of(holder)}):")
    for owner, high, extra, pool, stores, n in rows:
        per = f" x {stores} stores" if stores > 1 else ""
        print(f"  {owner:<22} ({high} + {extra} surge) pods x {pool}{per} = {n}")
    print(f"  {'total':<22} {total} of {budget}")
    checked += 1
    if total > budget:
        fail(where, f"natter may open {total} PostgreSQL connections, over the budget of {budget} "
                    f"({name_of(holder)}): lower pools or maxReplicas, or raise the server's max_connections and "
                    f"the budget, or put PgBouncer in front (deploy/README.md, \"PostgreSQL connections\")")
    server = postgres_max_connections(dev_docs)
    if server:
        checked += 1
        max_conn, reserved, owner = server
        if budget > max_conn - reserved:
            fail(where, f"the budget {budget} ({name_of(holder)}) is over what {owner} in {rel(K8S / 'dev')} "
                        f"accepts: max_connections {max_conn} less {reserved} reserved = {max_conn - reserved}")


# --------------------------------------------------------------------------
# Migrations
# --------------------------------------------------------------------------

# What `natter migrate --service` each role's pod must run.
MIGRATED_STORES = {"sessions": ["sessions"], "chats": ["chats"], "messages": ["messages"],
                   "serve": ["sessions", "chats", "messages"]}


def migrated_services(argv: list[str]) -> list[str] | None:
    """The stores a `natter migrate` command line migrates (its --service,
    else all three); None when it is no `natter migrate`."""
    if role(argv) != "migrate":
        return None
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--service" and i + 1 < len(argv) else a.removeprefix("--service=") \
            if a.startswith("--service=") else None
        if value is not None:
            return value.split(",")
    return ["sessions", "chats", "messages"]


def check_migrations(where: str, docs: list[dict]) -> None:
    global checked
    invs = invocations_of(docs, [SECRETS_EXAMPLE])
    for inv in invs:
        w = workload_of(inv, docs)
        if w is None or w["kind"] != "Deployment" or is_init(inv, docs) or "NATTER_DATABASE_URL" not in inv.env:
            continue
        checked += 1
        want = MIGRATED_STORES.get(role(inv.argv) or "")
        owner = inv.where.split(" container ", 1)[0]
        init = next((i for i in invs if i.where == f"{owner} container 'migrate'" and is_init(i, docs)), None)
        ran = migrated_services(init.argv) if init else None
        if init is None:
            fail(where, f"{inv.where}: its pod has no init container 'migrate' (`natter migrate --service "
                        f"{','.join(want or ['...'])}`): a pod whose store cannot be migrated would start anyway")
        elif ran is None or sorted(ran) != sorted(want or []):
            fail(where, f"{init.where}: runs `{' '.join(init.argv)}`, not `natter migrate --service "
                        f"{','.join(want or ['...'])}`")
        elif init.env_origin.get("NATTER_DATABASE_URL") != inv.env_origin.get("NATTER_DATABASE_URL") or \
                init.env.get("NATTER_DATABASE_URL") != inv.env.get("NATTER_DATABASE_URL"):
            fail(where, f"{init.where}: NATTER_DATABASE_URL ({init.env_origin.get('NATTER_DATABASE_URL')}) is not "
                        f"{inv.where}'s ({inv.env_origin.get('NATTER_DATABASE_URL')})")


# --------------------------------------------------------------------------
# Connection age
# --------------------------------------------------------------------------

UNITS = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60, "h": 3600, "hr": 3600,
         "hrs": 3600, "d": 86400}


def seconds(value: str) -> float | None:
    """A humantime duration (`5m`, `1h 30m`, `300s`) in seconds."""
    parts = re.findall(r"(\d+)\s*([a-z]+)", value.strip().lower())
    if not parts or re.sub(r"[\d\sa-z]", "", value.lower()):
        return None
    if any(unit not in UNITS for _, unit in parts):
        return None
    return sum(int(n) * UNITS[unit] for n, unit in parts)


def check_connection_age(where: str, docs: list[dict]) -> None:
    global checked
    invs = invocations_of(docs, [SECRETS_EXAMPLE])
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    seen = set()
    for caller in invs:
        for var, value in sorted(caller.env.items()):
            if not var.startswith("NATTER_") or not value:
                continue
            for url in urls_in(value):
                host, _ = host_port(url)
                svc = services.get((host or "").split(".")[0])
                if svc is None or (svc.get("spec") or {}).get("clusterIP") == "None":
                    continue  # not a Service here, or headless (one connection a pod)
                selector = {"matchLabels": (svc.get("spec") or {}).get("selector") or {}}
                for callee in invs:
                    w = workload_of(callee, docs)
                    if w is None or not selector["matchLabels"] or not selects(selector, pod_labels(w)):
                        continue
                    if is_init(callee, docs):
                        continue  # done before its pod serves anything
                    if callee.where in seen:
                        continue
                    seen.add(callee.where)
                    checked += 1
                    age = callee.env.get("NATTER_MAX_CONNECTION_AGE") or DEFAULT_MAX_CONNECTION_AGE
                    secs = seconds(age)
                    if secs is None:
                        fail(where, f"{callee.where}: NATTER_MAX_CONNECTION_AGE={age} is no duration")
                    elif secs > MAX_CONNECTION_AGE_LIMIT:
                        fail(where, f"{callee.where}: NATTER_MAX_CONNECTION_AGE is {age}; callers reach it through "
                                    f"ClusterIP Service {svc['metadata']['name']} ({caller.where}, {var}), which "
                                    f"balances connections, not calls, so pods added to it wait up to {age} for "
                                    f"calls: at most 10m (deploy/README.md, \"Connections and balancing\")")


# --------------------------------------------------------------------------

def main(args: list[str]) -> int:
    dirs = [Path(a).resolve() for a in args] or list(KUSTOMIZATIONS)
    rendered: dict[Path, list[dict]] = {}
    for directory in dirs:
        try:
            rendered[directory], how = render(directory)
        except (RuntimeError, OSError, yaml.YAMLError) as e:
            fail(rel(directory), str(e))
            continue
        print(f"{rel(directory)}: {len(rendered[directory])} objects ({how})")
    for directory, docs in rendered.items():
        check_secrets(rel(directory), docs, secrets_allowed=bool(args))
        check_disruptions(rel(directory), docs)
    # The dev backing services are no deployment of natter of their own.
    for directory, docs in rendered.items():
        if directory != K8S / "dev":
            check_connection_budget(rel(directory), docs, rendered.get(K8S / "dev", []) if directory == K8S else [])
            check_connection_age(rel(directory), docs)
            check_migrations(rel(directory), docs)
    for p in problems:
        print(p)
    print(f"check_ops: {checked} rules checked: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
