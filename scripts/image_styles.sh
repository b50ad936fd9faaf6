#!/usr/bin/env bash
# Everything behind the image domain's experiment (docs/RESULTS.md, "Image domain"), in order; every
# step skips what is done and resumes what stopped, so rerun it after an interruption.
#   bash scripts/image_styles.sh                 # CPU (two processes train the style zoo)
#   DEVICE=cuda bash scripts/image_styles.sh     # one GPU
#   ORAL_HOME=~/oral-minsnr BASE_CONFIG=configs/image-base-emoji-minsnr.yaml bash scripts/image_styles.sh
#       # on another base recipe; a fresh ORAL_HOME, since zoo runs name their base by its dir
# 1) the style sets (npm; OpenMoji's SVGs are drawn once with cairosvg), a few minutes;
# 2) the image base (BASE_CONFIG, default configs/image-base-emoji.yaml): ~90 min on one CPU thread (copied in
#    seconds instead when the package ships a base of that recipe: `oral images eval-base --bundle`);
# 3) the judge (`oral images train-judge`): ~20 min on one loaded thread;
# 4) the style zoo (configs/zoo-styles.yaml): 10 runs, 5-11 min each on one loaded thread;
# 5) the generator (configs/generator-styles.yaml), openmoji-color held out: ~8 min;
# 6) the experiment (configs/exp-image-styles.yaml) -> docs/results/exp-image-styles.{json,md} and grids:
#    ~35 min in one process (draws of 128 pictures, ~40 s each on one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DEVICE=${DEVICE:-cpu}
BASE_CONFIG=${BASE_CONFIG:-configs/image-base-emoji.yaml}
HOME_DIR=${ORAL_HOME:-$HOME/.cache/oral}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
stamp "style sets"; oral images fetch emoji-google emoji-twitter emoji-apple emoji-facebook openmoji-color openmoji-line
stamp "image base"; oral images train-base --config "$BASE_CONFIG" --out "$HOME_DIR/image-bases/emoji-google" device="$DEVICE"
stamp "judge";      [ -f "$HOME_DIR/image-judges/emoji-32/judge.json" ] || oral images train-judge
stamp "style zoo";  oral zoo --config configs/zoo-styles.yaml style_train.device="$DEVICE" &
                    oral zoo --config configs/zoo-styles.yaml style_train.device="$DEVICE"; wait
stamp "generator";  oral train --zoo "$HOME_DIR/zoos/styles" --out "$HOME_DIR/generators/styles" \
                        --config configs/generator-styles.yaml device="$DEVICE"
stamp "experiment"; oral experiment image-styles --config configs/exp-image-styles.yaml
stamp "done"
