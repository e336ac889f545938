#!/usr/bin/env bash
# Everything CI needs for the browser tests, from a clean clone: Chromium from
# Debian if missing, npm ci, build (buf generate + esbuild), the e2e tests.
# Expects target/debug/natter (or NATTER_BIN) and natter-llm's scripted model
# server, target/debug/examples/scripted_llm (or SCRIPTED_LLM_BIN), built
# already: cargo build -p natter && cargo build -p natter-llm --features
# testing --example scripted_llm. Relative paths in those variables are taken
# from web/.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

npm ci --no-audit --no-fund
npm run build
npm run test:e2e
