#!/usr/bin/env bash
# Validates deploy/ without a container engine or a cluster:
#
#   Dockerfile           hadolint; it builds every binary (check_flags.py)
#   compose.yaml         `docker-compose config` (Debian's docker-compose, or
#                        `docker compose` when present) and the compose-spec
#                        JSON schema (check-jsonschema)
#   k8s/, k8s/dev/       kubernetes-validate --strict against Kubernetes
#                        $K8S_VERSION, file by file and as kustomize renders
#                        them (`kubectl kustomize`, when kubectl is here)
#   cross-references     check_refs.py: depends_on, mounts, service URLs,
#                        kustomization resources, Service selectors and
#                        ports, collector pipelines
#   flags                check_flags.py: every --flag and NATTER_* variable
#                        passed to a binary is in its `--help`
#   operating rules      check_ops.py, on what `kubectl apply -k` applies: no
#                        Secret or placeholder, PostgreSQL connections within
#                        the budget, a PodDisruptionBudget and node spread for
#                        every workload of several pods, connections recycled
#                        behind ClusterIP Services, a `natter migrate` init
#                        container wherever there is a database URL
#
# Runs from anywhere. Environment:
#   NATTER_BIN_DIR     binaries to ask for --help (default: target/debug, or
#                      $CARGO_TARGET_DIR/debug, built here first with `cargo build`)
#   K8S_VERSION        default 1.30.0
#   NATTER_DEPLOY_VENV venv for the Python tools (default ~/.cache/natter/deploy-venv)
#
# Ends with `deploy checks: N passed, N failed` (and `, N skipped`); exits
# non-zero when anything failed.
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DEPLOY")"
cd "$ROOT"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
VENV="${NATTER_DEPLOY_VENV:-$HOME/.cache/natter/deploy-venv}"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

passed=0 failed=0 skipped=0
failures=()

# run NAME CMD...: one check; its output is shown only when it fails.
run() {
  local name="$1"; shift
  local log="$LOGS/$((passed + failed + skipped)).log"
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1)); printf 'ok    %s\n' "$name"
  else
    failed=$((failed + 1)); failures+=("$name"); printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$log"
  fi
}
skip() { skipped=$((skipped + 1)); printf 'skip  %s (%s)\n' "$1" "$2"; }

# --- tools --------------------------------------------------------------------
setup_venv() {
  local stamp="$VENV/.requirements.sha256"
  local want; want="$(sha256sum "$DEPLOY/requirements-check.txt" | cut -d' ' -f1)"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  rm -rf "$VENV" && mkdir -p "$(dirname "$VENV")" &&
    python3 -m venv "$VENV" &&
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$DEPLOY/requirements-check.txt" &&
    echo "$want" >"$stamp"
}
run "python tools (venv $VENV)" setup_venv
PY="$VENV/bin/python"
[[ -x "$PY" ]] || PY=python3

# Debian's docker-compose parses and validates without an engine.
compose_cmd=()
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "installing docker-compose (apt) ..."
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } \
      >"$LOGS/apt.log" 2>&1; then
    compose_cmd=(docker-compose)
  else
    tail -5 "$LOGS/apt.log"
  fi
fi

# --- Dockerfile -----------------------------------------------------------------
if [[ -x "$VENV/bin/hadolint" ]]; then
  run "Dockerfile: hadolint" "$VENV/bin/hadolint" --failure-threshold warning deploy/Dockerfile
else
  skip "Dockerfile: hadolint" "not installed"
fi
run "Dockerfile.dockerignore excludes target/ and node_modules" \
  bash -c 'grep -qx "\*\*/target" deploy/Dockerfile.dockerignore && grep -qx "\*\*/node_modules" deploy/Dockerfile.dockerignore'

# --- compose ------------------------------------------------------------------
if ((${#compose_cmd[@]})); then
  run "compose.yaml: ${compose_cmd[*]} config" "${compose_cmd[@]}" -f deploy/compose.yaml config -q
else
  skip "compose.yaml: docker-compose config" "no docker compose / docker-compose and no apt"
fi
run "compose.yaml: compose-spec JSON schema" \
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

# --- Kubernetes ---------------------------------------------------------------
mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
for f in "${manifests[@]}"; do
  run "$f: kubernetes-validate $K8S_VERSION" \
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$f"
done
render_and_validate() {  # DIR: kustomize render, then validate what it renders
  local out="$LOGS/rendered-${1//\//_}.yaml"
  kubectl kustomize "$1" >"$out" && "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$out"
}
for dir in deploy/k8s deploy/k8s/dev; do
  if command -v kubectl >/dev/null 2>&1; then
    run "$dir: kubectl kustomize + kubernetes-validate" render_and_validate "$dir"
  else
    skip "$dir: kubectl kustomize" "kubectl not installed"
  fi
done

# --- cross-references, operating rules and flags ---------------------------------
run "cross-references (check_refs.py)" "$PY" deploy/check_refs.py
run "operating rules (check_ops.py)" "$PY" deploy/check_ops.py

if [[ -z "${NATTER_BIN_DIR:-}" ]]; then
  run "cargo build of the binaries (for --help)" \
    cargo build --quiet --bin natter --bin natter-sessions --bin natter-chats --bin natter-messages \
      --bin natter-assistant --bin natter-edge
fi
run "flags and NATTER_* variables (check_flags.py)" "$PY" deploy/check_flags.py

# --- summary ------------------------------------------------------------------
if ((failed)); then
  printf '\nfailed:\n'; printf '  %s\n' "${failures[@]}"
fi
summary="deploy checks: $passed passed, $failed failed"
((skipped)) && summary+=", $skipped skipped"
echo "$summary"
((failed == 0))
