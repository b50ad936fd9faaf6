"""How close each task's held-out descriptions are to what a generator was trained on.

For every built-in task (trained on by the generator or not) and each of its held-out
descriptions: the nearest training description's task and cosine similarity, and whether
`oral generate` would warn (similarity below oral.generate.FAMILIAR_SIMILARITY).

    python scripts/familiarity.py [GEN] [--json OUT.json]     # GEN: default, the bundled generator
"""

import argparse
import json

from oral.generate import FAMILIAR_SIMILARITY, Generator
from oral.tasks import get_task, list_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generator", nargs="?", help="generator dir (default: the bundled one)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    gen = Generator.from_pretrained(args.generator, device="cpu")
    trained = set(gen.config["conditions"]["tasks"])
    rows = []
    for name in list_tasks():
        for d in get_task(name).heldout_descriptions:
            near = gen.nearest_descriptions(d, k=1)[0]
            rows.append({"task": name, "trained": name in trained, "description": d, "nearest_task": near["task"],
                         "similarity": near["similarity"], "warns": near["similarity"] < FAMILIAR_SIMILARITY})
    print(f"{'task':<18} {'trained':<7} {'nearest':<16} {'sim':>5} warns  held-out description")
    for r in rows:
        print(f"{r['task']:<18} {str(r['trained']):<7} {r['nearest_task']:<16} {r['similarity']:>5.2f} "
              f"{'yes' if r['warns'] else 'no':<5}  {r['description'][:60]}")
    for kind, want in (("trained", True), ("untrained", False)):
        sel = [r for r in rows if r["trained"] == want]
        print(f"{kind} tasks: {sum(r['warns'] for r in sel)} of {len(sel)} held-out descriptions warn")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threshold": FAMILIAR_SIMILARITY, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
