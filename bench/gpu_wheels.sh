#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on a lent GPU machine that cannot reach an index: what its image
# (PyTorch, Lightning, torchmetrics, accelerate, pytest...) lacks or holds too old, pinned to this checkout's
# .venv. Into .whl/ (ignored: add "/.whl/" to .git/info/exclude), about 21 MB; with the tracked tree (~28 MB) it
# stays under the 64 MiB a call may carry. On the machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     PYTHONPATH=/tmp/site:$PWD/src MODEL=tiny bash bench/gpu_check.sh
# wandb (~45 MB with its dependencies) is left out: gpu_check then times evaluate with logger=none.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
pins=()
for name in hydra-core omegaconf gguf transformers tokenizers huggingface_hub kernels httpx2 httpcore2 tomlkit \
            truststore idna concept-erasure; do
  pins+=("$name==$(version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# antlr4 4.9.3 (hydra's parser) ships only as a source distribution: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
du -sh .whl
