#!/usr/bin/env bash
# Rebuild the bundled generator (src/oral/pretrained/smollm2-135m) from nothing, with the project's
# own commands: the quick zoo (4 tasks x one 120-step LoRA run on smollm2-135m, the last 12
# checkpoints kept) and the generator of configs/generator-quick.yaml stopped at step 500, both as
# `oral demo --from-scratch` builds them; then its scores on held-out descriptions, and the fp16
# copy with its model card. Resumable: rerunning skips what is done.
# Time on 2 idle CPU cores: see docs/RESULTS.md ("The bundled generator").
#   bash scripts/build_generator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
HOME_DIR=${ORAL_HOME:-$HOME/.cache/oral}
GEN=$HOME_DIR/generators/demo
SCORES=docs/results/generator-demo-step500.json
T0=$(date +%s)
oral demo --from-scratch --build-only
oral compare --generator "$GEN" --zoo "$HOME_DIR/zoos/quick" --base smollm2-135m --descriptions 2 \
    --seeds 0,1,2 --limit 200 --json-out "$SCORES"
# The default guidance: the scale with the best mean validation score over the four tasks in
# `oral experiment seen` (generated-cfg; docs/RESULTS.md, "Does it generalize?"): 1 -> 0.718, 1.5 -> 0.775,
# 2 -> 0.790, 3 -> 0.795. A generator trained by another recipe should have it chosen again that way.
oral generators --bundle "$GEN" --scores "$SCORES" --guidance 3 \
    --guidance-note "chosen on the validation split: mean over 4 tasks 0.718 at 1, 0.775 at 1.5, 0.790 at 2, 0.795 at 3"
echo "built the bundled generator in $(( $(date +%s) - T0 )) s"
