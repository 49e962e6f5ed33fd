#!/usr/bin/env bash
# The GPU acceptance check: the first thing to run on a GPU machine. Prints one JSON object on
# stdout (progress on stderr): the CUDA tests, CUDA graph vs eager, training steps/s against
# sparsify, extraction of a Llama-3-8B-shaped model (MFU, writer ratio) and the loader's
# host-to-device rate, each target as {value, target, rule, met}. About 4 minutes on one
# H100/H200 (an estimate: no GPU has run it yet); every section is time-limited and all of
# them stop within --budget (470 s).
#
#   bash scripts/gpu_check.sh [--dry-run] [--out FILE] [--sections graph,train] \
#                             [--timeout NAME=SECONDS] [--budget SECONDS] [--tf32 on|off]
#
# --dry-run runs the same code on tiny shapes on the CPU (CI). Exit status: 0 when every section
# ran (a missed target is in the JSON, not in the status), 1 when one crashed or timed out,
# 2 when the packages it needs are missing.
#
# Offline machines: the packages a GPU image may lack are installed from wheels in .whl/ at the
# repository root (into a folder under /tmp, put on PYTHONPATH; nothing else is touched). Make
# them on a machine with pip access, for Python 3.12 on x86-64 Linux:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     zarr numcodecs gguf xxhash donfig google-crc32c pytest iniconfig pluggy pygments
#
# (zarr needs donfig and google-crc32c; pytest, for the CUDA tests, needs iniconfig, pluggy and
# pygments; the rest of what they require, numpy, packaging, pyyaml, tqdm and typing-extensions,
# comes with torch and transformers. Check a wheel's with
# `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`.)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# import names, which are also the wheels' file name prefixes
NEEDED="zarr numcodecs gguf xxhash donfig google_crc32c"
FOR_TESTS="pytest iniconfig pluggy pygments"

missing_modules() {
  "$PY" - "$@" <<'EOF'
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
EOF
}

missing="$(missing_modules $NEEDED $FOR_TESTS)"
if [[ -n "$missing" ]]; then
  echo "gpu_check: not importable: $missing" >&2
  if [[ -d "$ROOT/.whl" ]]; then
    shopt -s nullglob nocaseglob
    wheels=()
    for name in $missing; do
      found=("$ROOT"/.whl/"$name"-*.whl)
      if ((${#found[@]})); then wheels+=("${found[@]}"); else echo "gpu_check: no wheel for $name in .whl/" >&2; fi
    done
    shopt -u nullglob nocaseglob
    site="${TMPDIR:-/tmp}/gpu_check_site"
    if ((${#wheels[@]})); then
      echo "gpu_check: installing ${#wheels[@]} wheel(s) from .whl/ into $site" >&2
      if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}"
      else  # a wheel is a zip of importable files: unpacking it is enough for imports
        for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$site"; done
      fi
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
  else
    echo "gpu_check: there is no .whl/ folder at $ROOT to install them from (see the top of" \
         "scripts/gpu_check.sh for the one command that downloads the wheels)" >&2
  fi
  still="$(missing_modules $NEEDED)"
  if [[ -n "$still" ]]; then
    echo "gpu_check: cannot run without: $still" >&2
    exit 2
  fi
  if [[ -n "$(missing_modules pytest)" ]]; then
    echo "gpu_check: no pytest: the tests section will report that, the others run" >&2
  fi
fi

exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
