#!/usr/bin/env bash
# The main job on the embedded default (smollm2-135m), end to end on a CPU:
#   1. the quick zoo: LoRA fine-tuning on four tasks, keeping the last checkpoints of each run;
#   2. a generator (conditional recurrent diffusion) trained on that zoo;
#   3. an adapter generated from a task description the generator never saw in training;
#   4. base vs trained vs generated accuracy on every zoo task's test split (3 sampling seeds).
# Every step is cached under $ORAL_HOME (default ~/.cache/oral) and resumes where it stopped, so
# running this again redoes nothing that finished. About an hour on 2 idle CPU cores.
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
HOME_DIR=${ORAL_HOME:-$HOME/.cache/oral}
ZOO=$HOME_DIR/zoos/quick
GEN=$HOME_DIR/generators/quick
OUT=${OUT:-out/quickstart}
mkdir -p "$OUT"

oral zoo --config configs/zoo-quick.yaml
oral train --zoo "$ZOO" --out "$GEN" --config configs/generator-quick.yaml
oral generate --generator "$GEN" --base smollm2-135m --overwrite \
    --prompt "Figure out whether the reviewer enjoyed the film." --out "$OUT/movie-sentiment-adapter"
oral inspect "$OUT/movie-sentiment-adapter" --base smollm2-135m
oral compare --generator "$GEN" --zoo "$ZOO" --base smollm2-135m --seeds 0,1,2 --limit 200 \
    --json-out "$OUT/compare.json"
