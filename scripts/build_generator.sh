#!/usr/bin/env bash
# Rebuild the bundled generator (src/oral/pretrained/smollm2-135m) from nothing, with the project's
# own commands: the quick zoo (4 tasks x one 120-step LoRA run on smollm2-135m, the last 12
# checkpoints kept; the zoo `oral demo --from-scratch` uses) and the generator of
# configs/generator-quick.yaml trained to the end of its 1000 steps; then its scores on held-out
# descriptions, and the fp16 copy with its model card. Resumable: rerunning skips what is done.
# Time: the zoo ~35 min of one free core; the generator ~1.1-1.7 s a step on one thread (500 steps
# took 546 s and 852 s on the shared 2-core machine); the scores ~10 min (docs/RESULTS.md).
#   bash scripts/build_generator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
HOME_DIR=${ORAL_HOME:-$HOME/.cache/oral}
GEN=$HOME_DIR/generators/quick-1000
SCORES=docs/results/exp-bundled-seen.json
T0=$(date +%s)
oral zoo --config configs/zoo-quick.yaml
oral train --zoo "$HOME_DIR/zoos/quick" --out "$GEN" --config configs/generator-quick.yaml
# held-out descriptions x 3 seeds on the test split, at the 10 DDIM steps `oral generate` uses
oral experiment bundled-seen --config configs/exp-seen.yaml generator="$GEN" steps=10 "methods=[base,oracle,generated]"
# Step and guidance were chosen on the validation split (`oral experiment seen-step1000`, generated-cfg;
# docs/RESULTS.md, "Does it generalize?"): mean over the four tasks 0.895 at guidance 1, 0.888 at 1.5,
# 0.883 at 2, 0.868 at 3, against 0.795 for the step-500 export at its best (guidance 3).
# DDIM steps likewise (`oral experiment steps-validation`): 0.8925 at 5, 0.8975 at 10, 0.895 at 25, 0.895 at 60.
# A generator trained by another recipe should have them chosen again that way.
oral generators --bundle "$GEN" --scores "$SCORES" --guidance 1 --steps 10 \
    --guidance-note "chosen on the validation split: mean over 4 tasks 0.895 at guidance 1, 0.888 at 1.5, 0.883 at 2, 0.868 at 3; 0.8925 at 5 DDIM steps, 0.8975 at 10, 0.895 at 25 and 60"
echo "built the bundled generator in $(( $(date +%s) - T0 )) s"
