#!/usr/bin/env bash
# Everything behind the image domain's experiment (docs/RESULTS.md, "Image domain"), in order; every
# step skips what is done and resumes what stopped, so rerun it after an interruption.
#   bash scripts/image_styles.sh                 # CPU (two processes train the style zoo)
#   DEVICE=cuda bash scripts/image_styles.sh     # one GPU
# Times measured on the 2-core machine:
# 1) the style sets (npm; Debian's openclipart-svg; OpenMoji's and clip art's SVGs are drawn once with
#    cairosvg): 5-10 min;
# 2) the image base (configs/image-base-emoji-latent-wide.yaml: its autoencoder, then the UNet on its latents):
#    ~65 min on two threads;
# 3) the judge of eight styles (`oral images train-judge`): ~16 min;
# 4) the style zoo (configs/zoo-styles.yaml): 7 runs, ~2 min each on one thread, two processes;
# 5) the generator (configs/generator-styles.yaml), openmoji-color held out: ~10 min;
# 6) the experiment (configs/exp-image-styles.yaml) -> docs/results/exp-image-styles.{json,md} and grids.
# The first table's chain, on the pixel base: configs/image-base-emoji.yaml, zoo-styles-pixelspace.yaml,
# exp-image-styles-pixelspace.yaml (docs/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DEVICE=${DEVICE:-cpu}
HOME_DIR=${ORAL_HOME:-$HOME/.cache/oral}
STYLES=emoji-google,emoji-twitter,emoji-apple,emoji-facebook,openmoji-color,openmoji-line,pixel-icons,clipart
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
stamp "style sets"; oral images fetch ${STYLES//,/ }
stamp "image base"; oral images train-base --config configs/image-base-emoji-latent-wide.yaml \
                        --out "$HOME_DIR/image-bases/emoji-google-latent-wide" device="$DEVICE"
stamp "judge";      [ -f "$HOME_DIR/image-judges/styles8-32/judge.json" ] || \
                        oral images train-judge --out "$HOME_DIR/image-judges/styles8-32" "styles=[$STYLES]"
stamp "style zoo";  OMP_NUM_THREADS=1 oral zoo --config configs/zoo-styles.yaml style_train.device="$DEVICE" &
                    OMP_NUM_THREADS=1 oral zoo --config configs/zoo-styles.yaml style_train.device="$DEVICE"; wait
stamp "generator";  oral train --zoo "$HOME_DIR/zoos/styles-latent-wide-selfattn" --out "$HOME_DIR/generators/image-styles" \
                        --config configs/generator-styles.yaml device="$DEVICE"
stamp "experiment"; oral experiment image-styles --config configs/exp-image-styles.yaml
stamp "done"
