#!/usr/bin/env python3
"""Checks that every flag and NATTER_* variable the deploy files pass to a
natter binary is one that binary accepts.

Sources read (paths relative to the repository root):
  deploy/Dockerfile        ENTRYPOINT + CMD and ENV of the final stage
  deploy/compose.yaml      entrypoint / command / environment / healthcheck
                           of every service running the natter image
  deploy/k8s/**/*.yaml     command / args / env / envFrom (resolved through
                           the ConfigMaps and Secrets found there) and exec
                           probes of every container running the natter image

Each binary is asked for `<binary> [subcommand] --help` (clap's long help);
its option lines give the accepted `--flags`, its `[env: NATTER_...=]` notes
the accepted variables and its "Possible values" the accepted values, which
are checked too where a literal value is given.

Binaries come from $NATTER_BIN_DIR (default: $CARGO_TARGET_DIR/debug, else
target/debug: where `cargo build` put them). Exit status 0
when everything is accepted, 1 when something is not (each problem is
printed as `FAIL <file>: <container> (<binary>): ...`), 2 on usage errors.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BINARIES = ("natter", "natter-sessions", "natter-chats", "natter-messages", "natter-assistant", "natter-edge")
IMAGE_NAME = "natter"  # repository name of the image deploy/Dockerfile builds


# --------------------------------------------------------------------------
# What a binary accepts, from its --help
# --------------------------------------------------------------------------

@dataclass
class Option:
    flags: list[str]
    env: str | None = None
    values: list[str] = field(default_factory=list)


@dataclass
class Cli:
    """The accepted interface of one binary or subcommand."""

    name: str
    options: list[Option] = field(default_factory=list)
    subcommands: list[str] = field(default_factory=list)
    error: str | None = None

    def flag(self, flag: str) -> Option | None:
        return next((o for o in self.options if flag in o.flags), None)

    def env_option(self, env: str) -> Option | None:
        return next((o for o in self.options if o.env == env), None)


OPTION_LINE = re.compile(r"^\s{1,8}(?:(-[A-Za-z0-9]),\s+)?(--[A-Za-z0-9][A-Za-z0-9-]*)\b")
SHORT_ONLY_LINE = re.compile(r"^\s{1,8}(-[A-Za-z0-9])(?:\s|$)")
ENV_NOTE = re.compile(r"\[env:\s*([A-Z][A-Z0-9_]*)[=\]]")  # `=` unless hide_env_values
POSSIBLE_LONG = re.compile(r"^\s+-\s+([A-Za-z0-9][A-Za-z0-9_.-]*)(?::|$)")
POSSIBLE_SHORT = re.compile(r"\[possible values:\s*([^\]]+)\]")
COMMAND_LINE = re.compile(r"^\s{2}([a-z][a-z0-9-]*)(?:\s|$)")


def parse_help(name: str, text: str) -> Cli:
    cli = Cli(name)
    section = None
    current: Option | None = None
    in_values = False
    for line in text.splitlines():
        if re.match(r"^[A-Z][A-Za-z ]*:\s*$", line):  # "Options:", "Commands:"
            section = line.strip().rstrip(":").lower()
            current, in_values = None, False
            continue
        if section == "commands":
            m = COMMAND_LINE.match(line)
            if m and m.group(1) != "help":
                cli.subcommands.append(m.group(1))
            continue
        if section not in ("options", "arguments") and section is not None:
            continue
        m = OPTION_LINE.match(line)
        if m:
            current = Option([f for f in (m.group(1), m.group(2)) if f])
            cli.options.append(current)
            in_values = False
        else:
            m = SHORT_ONLY_LINE.match(line)
            if m and section == "options":
                current = Option([m.group(1)])
                cli.options.append(current)
                in_values = False
                continue
        if current is None:
            continue
        env = ENV_NOTE.search(line)
        if env:
            current.env = env.group(1)
        if "Possible values:" in line:
            in_values = True
            continue
        short = POSSIBLE_SHORT.search(line)
        if short:
            current.values += [v.strip() for v in short.group(1).split(",")]
        if in_values:
            pv = POSSIBLE_LONG.match(line)
            if pv:
                current.values.append(pv.group(1))
            elif line.strip() and not line.strip().startswith("-"):
                in_values = False
    return cli


class Binaries:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.cache: dict[tuple[str, ...], Cli] = {}

    def cli(self, binary: str, subcommand: str | None = None) -> Cli:
        key = (binary,) + ((subcommand,) if subcommand else ())
        if key in self.cache:
            return self.cache[key]
        path = self.bin_dir / binary
        label = " ".join(key)
        if not path.exists():
            cli = Cli(label, error=f"binary {path} not found (build it: cargo build, or set NATTER_BIN_DIR)")
        else:
            # A clean environment: no NATTER_* value leaks into the help text.
            env = {k: v for k, v in os.environ.items() if not k.startswith("NATTER_")}
            args = [str(path), *key[1:], "--help"]
            proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
            if proc.returncode != 0:
                first = (proc.stderr or proc.stdout).strip().splitlines()
                cli = Cli(label, error=f"`{label} --help` failed: {first[0] if first else proc.returncode}")
            else:
                cli = parse_help(label, proc.stdout)
        self.cache[key] = cli
        return cli


# --------------------------------------------------------------------------
# A container and what it is given
# --------------------------------------------------------------------------

@dataclass
class Invocation:
    file: str
    where: str  # "service 'chats'", "Deployment/chats container 'chats'", ...
    argv: list[str]  # argv[0] is the binary (path or name)
    env: dict[str, str | None] = field(default_factory=dict)  # None: value not literal
    env_origin: dict[str, str] = field(default_factory=dict)


class Checker:
    def __init__(self, binaries: Binaries):
        self.binaries = binaries
        self.problems: list[str] = []
        self.invocations = 0
        self.flags_checked = 0
        self.envs_checked = 0
        self.unknown: dict[str, set[str]] = {}  # flag/variable/subcommand -> binaries

    def fail(self, inv: Invocation, binary: str, msg: str, unknown: str | None = None) -> None:
        self.problems.append(f"FAIL {inv.file}: {inv.where} ({binary}): {msg}")
        if unknown:
            self.unknown.setdefault(unknown, set()).add(binary)

    def check(self, inv: Invocation) -> None:
        self.invocations += 1
        if not inv.argv:
            self.problems.append(f"FAIL {inv.file}: {inv.where}: no command to run")
            return
        binary = os.path.basename(inv.argv[0])
        if binary not in BINARIES:
            self.fail(inv, binary, f"runs `{inv.argv[0]}`, which is none of the image's binaries {', '.join(BINARIES)}")
            return
        if inv.argv[0].startswith("/") and inv.argv[0] != f"/usr/local/bin/{binary}":
            self.fail(inv, binary, f"runs `{inv.argv[0]}`, but the image installs it as /usr/local/bin/{binary}")
        top = self.binaries.cli(binary)
        if top.error:
            self.fail(inv, binary, top.error)
            return
        args = inv.argv[1:]
        cli, label = top, binary
        if top.subcommands or binary == "natter":
            sub = next((a for a in args if not a.startswith("-")), None)
            if sub is None:
                self.fail(inv, binary, f"no subcommand given (it has: {', '.join(top.subcommands)})")
                return
            if sub not in top.subcommands:
                self.fail(inv, binary, f"unknown subcommand `{sub}` (`{binary} --help` lists: {', '.join(top.subcommands) or 'none'})",
                          unknown=f"subcommand `{sub}`")
                return
            cli = self.binaries.cli(binary, sub)
            label = f"{binary} {sub}"
            if cli.error:
                self.fail(inv, label, cli.error)
                return
            args = args[: args.index(sub)] + args[args.index(sub) + 1:]
        self.check_args(inv, cli, label, args)
        self.check_env(inv, cli, label)

    def check_args(self, inv: Invocation, cli: Cli, label: str, args: list[str]) -> None:
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg == "--":
                break
            if not arg.startswith("-") or arg == "-":
                continue
            self.flags_checked += 1
            name, eq, value = arg.partition("=")
            opt = cli.flag(name)
            if opt is None:
                self.fail(inv, label, f"unknown flag `{name}` (not in `{label} --help`)", unknown=f"flag {name}")
                continue
            if not eq and i < len(args) and not args[i].startswith("-"):
                value = args[i]
            if opt.values and value and "$" not in value and value not in opt.values:
                self.fail(inv, label, f"`{name} {value}`: not one of {', '.join(opt.values)}")

    def check_env(self, inv: Invocation, cli: Cli, label: str) -> None:
        for name, value in sorted(inv.env.items()):
            if not name.startswith("NATTER_"):
                continue
            if inv.env_origin.get(name) == "Dockerfile ENV" and cli.env_option(name) is None:
                # Image-wide (e.g. NATTER_WEB_DIR for natter and the edge):
                # inherited by every container, ignored by binaries that do
                # not read it. It is checked against the image's default
                # command instead.
                continue
            self.envs_checked += 1
            origin = inv.env_origin.get(name)
            via = f" (from {origin})" if origin else ""
            opt = cli.env_option(name)
            if opt is None:
                self.fail(inv, label, f"unknown environment variable {name}{via} (not in `{label} --help`)", unknown=name)
                continue
            if opt.values and value is not None and "$" not in value and value not in opt.values:
                self.fail(inv, label, f"{name}={value}{via}: not one of {', '.join(opt.values)}")


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------

@dataclass
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    built_bins: list[str]  # `--bin NAME` of the build stage
    installed_bins: list[str]  # those it copies out (target/release/NAME), when the final stage installs them


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continuation
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        parts = buf.strip().split(None, 1)
        out.append((parts[0].upper(), parts[1] if len(parts) > 1 else ""))
        buf = ""
    return out


def exec_form(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return json.loads(value)
    # Shell form: /bin/sh -c in the image; there is no shell in distroless.
    return ["/bin/sh", "-c", value]


def parse_env_instruction(value: str) -> dict[str, str]:
    tokens = shlex.split(value)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}  # legacy `ENV KEY value`
    return dict(t.split("=", 1) for t in tokens)


def parse_dockerfile(path: Path) -> Image:
    stages: list[list[tuple[str, str]]] = []
    for instr, value in dockerfile_instructions(path.read_text()):
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, value))
    built = sorted(set(re.findall(r"--bin\s+([A-Za-z0-9_-]+)", path.read_text())))
    copied = sorted(set(re.findall(r"target/release/([A-Za-z0-9_-]+)", path.read_text())))
    final = stages[-1] if stages else []
    image = Image([], [], {}, built, [])
    for instr, value in final:
        if instr == "ENTRYPOINT":
            image.entrypoint, image.cmd = exec_form(value), []
        elif instr == "CMD":
            image.cmd = exec_form(value)
        elif instr == "ENV":
            image.env.update(parse_env_instruction(value))
        elif instr == "COPY" and "/usr/local/bin" in value:
            image.installed_bins = copied  # what the build stage copied out of target/release
    return image


# --------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------

def as_argv(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def compose_env(value) -> dict[str, str | None]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): (None if v is None else str(v)) for k, v in value.items()}
    env = {}
    for item in value:
        k, eq, v = str(item).partition("=")
        env[k] = v if eq else None
    return env


def is_natter_image(image: str | None) -> bool:
    if not image:
        return False
    repo = image.split("@", 1)[0]
    last = repo.rsplit("/", 1)[-1]
    return last.split(":", 1)[0] == IMAGE_NAME


def compose_invocations(path: Path, rel: str, image: Image) -> list[Invocation]:
    doc = yaml.safe_load(path.read_text()) or {}
    out = []
    for name, svc in (doc.get("services") or {}).items():
        build = svc.get("build")
        dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
        if not (is_natter_image(svc.get("image")) or dockerfile.endswith("deploy/Dockerfile")):
            continue
        # Compose: an `entrypoint` clears the image's CMD; `command` replaces it.
        if "entrypoint" in svc:
            argv = as_argv(svc["entrypoint"]) + as_argv(svc.get("command"))
        else:
            argv = image.entrypoint + (as_argv(svc["command"]) if "command" in svc else image.cmd)
        env = {**image.env, **compose_env(svc.get("environment"))}
        origin = {k: "Dockerfile ENV" for k in image.env}
        origin.update({k: "environment" for k in compose_env(svc.get("environment"))})
        if svc.get("env_file"):
            origin_note = "env_file"
            for f in as_argv(svc["env_file"]) if isinstance(svc["env_file"], str) else svc["env_file"]:
                fpath = (path.parent / (f if isinstance(f, str) else f.get("path", ""))).resolve()
                if fpath.exists():
                    for line in fpath.read_text().splitlines():
                        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                            k, _, v = line.partition("=")
                            env[k.strip()] = v.strip()
                            origin[k.strip()] = origin_note
        out.append(Invocation(rel, f"service '{name}'", argv, env, origin))
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        if isinstance(test, list) and test and test[0] == "CMD" and len(test) > 1:
            out.append(Invocation(rel, f"service '{name}' healthcheck", [str(t) for t in test[1:]]))
        elif isinstance(test, list) and test and test[0] == "CMD-SHELL" or isinstance(test, str):
            out.append(Invocation(rel, f"service '{name}' healthcheck", ["/bin/sh", "-c", str(test)]))
    return out


# --------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    return (spec.get("template") or {}).get("spec")


def k8s_invocations(files: list[tuple[Path, str]], image: Image) -> tuple[list[Invocation], list[str]]:
    docs: list[tuple[str, dict]] = []
    for path, rel in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind"):
                docs.append((rel, doc))
    maps: dict[tuple[str, str], dict[str, str]] = {}
    for _, doc in docs:
        if doc["kind"] in ("ConfigMap", "Secret"):
            data = {**(doc.get("data") or {}), **(doc.get("stringData") or {})}
            maps[(doc["kind"], doc["metadata"]["name"])] = {str(k): str(v) for k, v in data.items()}
    problems, out = [], []
    for rel, doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(doc) or {}
        owner = f"{doc['kind']}/{doc['metadata']['name']}"
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            if not is_natter_image(c.get("image")):
                continue
            where = f"{owner} container '{c.get('name')}'"
            # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD unless
            # `args` is given); `args` replaces CMD.
            if "command" in c:
                argv = as_argv(c["command"]) + as_argv(c.get("args"))
            else:
                argv = image.entrypoint + (as_argv(c["args"]) if "args" in c else image.cmd)
            env: dict[str, str | None] = dict(image.env)
            origin = {k: "Dockerfile ENV" for k in image.env}
            for ef in c.get("envFrom") or []:
                prefix = ef.get("prefix", "")
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in ef:
                        ref = ef[key]["name"]
                        if (kind, ref) not in maps:
                            if not ef[key].get("optional"):
                                problems.append(f"FAIL {rel}: {where}: envFrom names {kind} '{ref}', which no manifest defines")
                            continue
                        for k, v in maps[(kind, ref)].items():
                            env[prefix + k] = v
                            origin[prefix + k] = f"{kind} {ref}"
            for e in c.get("env") or []:
                name = e["name"]
                if "value" in e:
                    env[name], origin[name] = str(e["value"]), "env"
                    continue
                src = e.get("valueFrom") or {}
                env[name], origin[name] = None, "env"
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in src:
                        ref = src[key]
                        data = maps.get((kind, ref["name"]))
                        if data is None or ref["key"] not in data:
                            if not ref.get("optional"):
                                problems.append(
                                    f"FAIL {rel}: {where}: {name} refers to {kind} '{ref['name']}' key "
                                    f"'{ref['key']}', which no manifest defines")
                        else:
                            env[name] = data[ref["key"]]
                        origin[name] = f"{kind} {ref['name']}"
            out.append(Invocation(rel, where, argv, env, origin))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = ((c.get(probe) or {}).get("exec") or {}).get("command")
                if cmd:
                    out.append(Invocation(rel, f"{where} {probe}", as_argv(cmd)))
            pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command")
            if pre:
                out.append(Invocation(rel, f"{where} preStop", as_argv(pre)))
    return out, problems


# --------------------------------------------------------------------------

def main() -> int:
    root = Path(__file__).resolve().parent.parent
    bin_dir = Path(os.environ.get("NATTER_BIN_DIR") or Path(os.environ.get("CARGO_TARGET_DIR") or root / "target") / "debug")
    if not bin_dir.is_absolute():
        bin_dir = (Path.cwd() / bin_dir).resolve()
    deploy = root / "deploy"
    checker = Checker(Binaries(bin_dir))

    dockerfile = deploy / "Dockerfile"
    image = parse_dockerfile(dockerfile)
    rel_df = "deploy/Dockerfile"
    missing = [b for b in BINARIES if b not in image.built_bins]
    if missing:
        checker.problems.append(f"FAIL {rel_df}: the build stage does not build {', '.join(missing)} (`--bin NAME`)")
    if not image.installed_bins:
        checker.problems.append(f"FAIL {rel_df}: the final stage copies no binaries to /usr/local/bin")
    else:
        absent = [b for b in BINARIES if b in image.built_bins and b not in image.installed_bins]
        if absent:
            checker.problems.append(f"FAIL {rel_df}: built but not copied into the image: {', '.join(absent)} "
                                    f"(`cp target/release/NAME`)")
    # The image's own default (ENTRYPOINT + CMD) with its ENV.
    checker.check(Invocation(rel_df, "default ENTRYPOINT+CMD", image.entrypoint + image.cmd, dict(image.env),
                             {k: "ENV" for k in image.env}))

    invocations: list[Invocation] = []
    compose = deploy / "compose.yaml"
    if compose.exists():
        invocations += compose_invocations(compose, "deploy/compose.yaml", image)
    k8s_files = sorted(p for p in (deploy / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml")
    k8s, problems = k8s_invocations([(p, str(p.relative_to(root))) for p in k8s_files], image)
    invocations += k8s
    checker.problems += problems
    for inv in invocations:
        checker.check(inv)

    for p in checker.problems:
        print(p)
    if checker.unknown:
        print("not accepted (yet) by the binaries:")
        for what, bins in sorted(checker.unknown.items()):
            print(f"  {what}: {', '.join(sorted(bins))}")
    print(f"check_flags: {checker.invocations} invocations, {checker.flags_checked} flags, "
          f"{checker.envs_checked} NATTER_* variables checked against {bin_dir}: "
          f"{len(checker.problems)} problem(s)")
    return 1 if checker.problems else 0


if __name__ == "__main__":
    sys.exit(main())
