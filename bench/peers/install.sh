#!/usr/bin/env bash
# Install the peers, each in its own virtual environment under bench/peers/ (gitignored):
#   .venv-heretic   heretic-llm==1.4.0
#   .venv-abliterix abliterix==1.12.2
# torch is installed first and pinned (torch==2.13.0 resolves to the CPU build here; a bare
# `torch` requirement of a peer would otherwise pull the CUDA build). Idempotent: a venv whose
# peer already imports at the pinned version is left alone. A failed install is reported with
# the last lines of its log and the script exits non-zero after trying every peer.
#   bash bench/peers/install.sh            # both
#   bash bench/peers/install.sh heretic    # one
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH_SPEC:-torch==2.13.0}"
declare -A SPEC=([heretic]="heretic-llm==1.4.0" [abliterix]="abliterix==1.12.2")
declare -A DIST=([heretic]="heretic-llm" [abliterix]="abliterix")
peers=("$@"); [ ${#peers[@]} -eq 0 ] && peers=(heretic abliterix)
failed=()
for peer in "${peers[@]}"; do
  spec="${SPEC[$peer]:-}"
  if [ -z "$spec" ]; then echo "unknown peer '$peer' (known: ${!SPEC[*]})" >&2; exit 2; fi
  venv="$HERE/.venv-$peer"; log="$HERE/.install-$peer.log"
  want="${spec#*==}"
  have="$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('${DIST[$peer]}'))" 2>/dev/null || true)"
  if [ "$have" = "$want" ]; then echo "[$peer] $spec already installed in $venv"; continue; fi
  echo "[$peer] installing $TORCH then $spec into $venv (log: $log)"
  { [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"; } >"$log" 2>&1 \
    && "$venv/bin/python" -m pip install "$TORCH" >>"$log" 2>&1 \
    && "$venv/bin/python" -m pip install "$spec" "$TORCH" >>"$log" 2>&1
  status=$?
  if [ $status -ne 0 ]; then
    echo "[$peer] INSTALL FAILED (exit $status); last lines of $log:" >&2
    tail -n 15 "$log" >&2
    failed+=("$peer")
    continue
  fi
  "$venv/bin/python" -c "import importlib.metadata as m, torch; print('[$peer] ok:', '${DIST[$peer]}', m.version('${DIST[$peer]}'), 'torch', torch.__version__)"
done
if [ ${#failed[@]} -gt 0 ]; then echo "not installed: ${failed[*]}" >&2; exit 1; fi
