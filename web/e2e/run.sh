#!/usr/bin/env bash
# Everything CI needs for the browser test, from a clean clone: Chromium from
# Debian if missing, npm ci, build (buf generate + esbuild), the e2e test.
# Expects target/debug/natter to be built already (or NATTER_BIN set).
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
