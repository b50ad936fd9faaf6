"""How far apart are a zoo's adapters? dW distances between the final checkpoints of every two runs, and
within each run between its first and last kept checkpoints.

    python scripts/zoo_spread.py $ORAL_HOME/zoos/styles [--rank 4]

For two runs of one task with different seeds, a small distance means one solution the generator can
learn; a distance as large as between two tasks means each task is several modes (the style zoo's case,
docs/RESULTS.md "Image domain"). Distances are oral.gauge.update_distance's: the cosine of the updates
dW = B A and |dW_a - dW_b| / |dW_b|, module by module, averaged.
"""

import argparse
import itertools

from oral.gauge import update_distance
from oral.lora import load_adapter
from oral.zoo import Zoo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo", help="a zoo dir")
    p.add_argument("--rank", type=int, default=4, help="the runs' LoRA rank")
    args = p.parse_args()
    records = [r for r in Zoo(args.zoo).all_records() if r["rank"] == args.rank]
    runs: dict[str, list[dict]] = {}
    for r in records:
        runs.setdefault(r["run_id"], []).append(r)
    finals = {rid: max(rs, key=lambda r: r["step"]) for rid, rs in runs.items()}
    root = Zoo(args.zoo).root
    states = {rid: load_adapter(root / r["path"]) for rid, r in finals.items()}

    def name(rid: str) -> str:
        return f"{finals[rid]['task']} s{finals[rid]['seed']}"

    print("| run a | run b | cosine | rel L2 |\n|---|---|---|---|")
    for a, b in itertools.combinations(sorted(finals, key=lambda x: (finals[x]["task"], finals[x]["seed"])), 2):
        d = update_distance(states[a][0], states[a][1], states[b][1])
        print(f"| {name(a)} | {name(b)} | {d['cosine']:.3f} | {d['rel_l2']:.3f} |")
    print("\n| run | first vs last kept checkpoint: cosine | rel L2 |\n|---|---|---|")
    for rid, rs in sorted(runs.items(), key=lambda kv: (finals[kv[0]]["task"], finals[kv[0]]["seed"])):
        first = min(rs, key=lambda r: r["step"])
        if first is finals[rid]:
            continue
        d = update_distance(states[rid][0], load_adapter(root / first["path"])[1], states[rid][1])
        print(f"| {name(rid)} | {d['cosine']:.5f} | {d['rel_l2']:.4f} |")


if __name__ == "__main__":
    main()
