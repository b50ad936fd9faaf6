#!/usr/bin/env bash
# Everything behind the generalization experiments (docs/RESULTS.md, "Does it generalize?"), in order;
# every step resumes where it stopped and skips what is done, so rerun it after an interruption.
#   bash scripts/generalization.sh                 # CPU
#   DEVICE=cuda bash scripts/generalization.sh     # one GPU: the family and the zoo in minutes
# 1) the family t0..t4 (configs/evolve-chain.yaml): measured here ~20 min a link on one CPU thread;
# 2) the runs of the full zoo these experiments use (configs/zoo-family.yaml): 45 runs, ~2 min each on one
#    idle CPU thread (RUNS=2 trains two at a time; the whole grid with the rank study: configs/zoo-full.yaml);
# 3) the family generator (configs/generator-family.yaml): t0..t2, 7 tasks;
# 4) the experiments with the family generator (seen, portability, unseen-task, ablation, memorization);
# 5) the raw vs canonical gauge ablation (a second family generator);
# 6) the rank study's runs, the generator of four ranks and the rank experiment;
#    the bundled generator's own experiments run with `oral experiment NAME --config configs/exp-NAME.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DEVICE=${DEVICE:-cpu}
HOME_DIR=${ORAL_HOME:-$HOME/.cache/oral}
GEN=$HOME_DIR/generators/family
ZOO=$HOME_DIR/zoos/full
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
stamp "family";     oral evolve --chain --config configs/evolve-chain.yaml device="$DEVICE"
stamp "zoo";        for _ in $(seq 2 "${RUNS:-1}"); do oral zoo --config configs/zoo-family.yaml train.device="$DEVICE" & done
                    oral zoo --config configs/zoo-family.yaml train.device="$DEVICE"; wait
stamp "generator";  oral train --zoo "$ZOO" --out "$GEN" --config configs/generator-family.yaml device="$DEVICE"
FAMILY="generator=$GEN zoo=$ZOO steps=10"   # the portability config's DDIM steps: its adapters are reused
stamp "seen";        oral experiment family-seen --config configs/exp-seen.yaml $FAMILY versions=[0,1,2] tasks=[] \
                         methods=[base,oracle,nearest,generated]
stamp "portability"; oral experiment portability --config configs/exp-portability.yaml
stamp "unseen-task"; oral experiment family-unseen-task --config configs/exp-unseen-task.yaml $FAMILY \
                         versions=[0,1,2,3,4] tasks=[tweet-sentiment,text-domain]
stamp "ablation";    oral experiment family-ablation --config configs/exp-ablation.yaml $FAMILY versions=[3,4] \
                         tasks=[movie-sentiment,sms-spam,trec-question] "sweep_steps=[25,60]"
stamp "shifted";      oral experiment portability-shifted --config configs/exp-portability.yaml \
                         methods=[base,oracle,stale-newest,nearest,generated,shifted] seeds=[0]
stamp "memorization"; oral experiment family-memorization --config configs/exp-memorization.yaml $FAMILY \
                         versions=[3,4] tasks=[movie-sentiment,amazon-sentiment,news-sentiment,rotten-tomatoes,sms-spam,trec-question] \
                         methods=[oracle,hypernet,generated,refined] strengths=[0.0,0.1,0.25,0.5,0.75]
stamp "gauge";        oral train --zoo "$ZOO" --out "$HOME_DIR/generators/family-canonical" \
                         --config configs/generator-family-canonical.yaml device="$DEVICE"
                     oral experiment portability-canonical --config configs/exp-portability.yaml \
                         generator="$HOME_DIR/generators/family-canonical" methods=[base,oracle,stale-newest,nearest,generated] seeds=[0]
stamp "rank";        oral zoo --config configs/zoo-rank.yaml train.device="$DEVICE"
                     oral train --zoo "$ZOO" --out "$HOME_DIR/generators/rank" --config configs/generator-rank.yaml device="$DEVICE"
                     oral experiment rank --config configs/exp-rank.yaml
stamp "done"
