#!/usr/bin/env bash
# The speed benchmarks on one CUDA GPU, offline, with the project's own setup; one JSON file out.
#
#   bash scripts/setup.sh && bash benchmarks/gpu.sh [OUT.json]      # default: gpu-bench.json
#   ONLY=gen-mistral-r16-all,time-to-adapter bash benchmarks/gpu.sh  # some of them (names below)
#   DEVICE=cpu ONLY=gen-smollm2-r4-qv bash benchmarks/gpu.sh         # a quick check of this script on a CPU
#
# Runs, each in its own process (a failure is recorded in the JSON and the rest still run):
#   - `oral bench generate --device cuda --json` at the sizes of docs/RESULTS.md's size table
#     (smollm2-135m r=4 q,v; mistral-7b r=4 q,v; mistral-7b r=16 all-linear in fp32, bf16 and at 10 steps;
#     mistral-7b r=64 all-linear); the goal on a GPU is the 42M-parameter adapter in under 1 s;
#   - benchmarks/bench_generator.py (a generator training step and one adapter's sampling, per preset and
#     layout): the throughput of `oral train`;
#   - benchmarks/bench_zoo.py --probe 0 (one zoo run end to end, on the GPU: fine-tuning's side);
#   - `oral bench time-to-adapter --json` (generated vs fine-tuned to the same accuracy, same GPU).
# transformers' Mamba uses mamba-ssm's kernels in training when it is importable (recorded as "mamba_ssm");
# sampling always runs oral's chunked scan (mambapy's parallel scan).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bench.json}
PY=${PYTHON:-.venv/bin/python}
ORAL="$(dirname "$PY")/oral"
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
fi
LINES=$(mktemp)
trap 'rm -f "$LINES"' EXIT

# the collector: the JSON objects a benchmark printed (stdin) -> one row appended to $LINES
COLLECT='
import json, sys, time
name, rc, t0, cmd, lines = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
results = []
for line in sys.stdin.read().splitlines():
    line = line.strip()
    if line.startswith("{"):
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            pass
row = {"name": name, "command": cmd, "rc": rc, "wall_s": round(time.time() - t0, 2), "results": results}
with open(lines, "a") as f:
    f.write(json.dumps(row) + "\n")
print("   rc %d, %d result(s), %.1f s" % (rc, len(results), row["wall_s"]), file=sys.stderr)
'

# run NAME CMD...: one benchmark (skipped unless NAME is in $ONLY, when ONLY is set)
run() {
    local name=$1; shift
    if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]]; then return; fi
    echo "== $name: $*" >&2
    local t0 out rc
    t0=$(date +%s.%N)
    out=$("$@" 2> >(tail -n 20 >&2)); rc=$?
    "$PY" -c "$COLLECT" "$name" "$rc" "$t0" "$*" "$LINES" <<<"$out"
}

run gen-smollm2-r4-qv        "$ORAL" bench generate --device "$DEVICE" --spec smollm2-135m --rank 4 --targets q_proj,v_proj --json
run gen-mistral-r4-qv        "$ORAL" bench generate --device "$DEVICE" --spec mistral-7b --rank 4 --targets q_proj,v_proj --json
run gen-mistral-r16-all      "$ORAL" bench generate --device "$DEVICE" --spec mistral-7b --rank 16 --targets all-linear --json
run gen-mistral-r16-all-bf16 "$ORAL" bench generate --device "$DEVICE" --spec mistral-7b --rank 16 --targets all-linear --bf16 --json
run gen-mistral-r16-all-10   "$ORAL" bench generate --device "$DEVICE" --spec mistral-7b --rank 16 --targets all-linear --steps 10 --json
run gen-mistral-r64-all      "$ORAL" bench generate --device "$DEVICE" --spec mistral-7b --rank 64 --targets all-linear --json
run generator-train-step     "$PY" benchmarks/bench_generator.py --device "$DEVICE" --presets tiny,small,smol --layouts smollm2-135m,mistral-7b
run zoo-run                  "$PY" benchmarks/bench_zoo.py --steps 100 --probe 0 --json  # phase 1 times CPU steps only
run time-to-adapter          "$ORAL" bench time-to-adapter --task movie-sentiment --json

"$PY" - "$OUT" "$LINES" <<'EOF'
import datetime as dt, json, os, platform, subprocess, sys
import torch
out, lines = sys.argv[1], sys.argv[2]
try:
    import mamba_ssm  # noqa: F401
    mamba = getattr(mamba_ssm, "__version__", "installed")
except ImportError:
    mamba = None
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (cpu)"
result = {
    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "mamba_ssm": mamba,
    "benchmarks": [json.loads(line) for line in open(lines)],
}
with open(out + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
os.replace(out + ".tmp", out)
failed = [b["name"] for b in result["benchmarks"] if b["rc"] != 0]
print(f"wrote {out}: {len(result['benchmarks'])} benchmarks" + (f", failed: {', '.join(failed)}" if failed else ""))
EOF
