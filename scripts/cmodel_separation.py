"""Does c_model tell the versions of a family apart? Both weight fingerprints on every built version.

    python scripts/cmodel_separation.py --config configs/evolve-chain.yaml --json-out docs/results/cmodel-separation.json

For each version built so far (t0 = the root, then the chain's links; nothing is trained here) and
each fingerprint kind ("sketch": of W0 itself; "drift": of W0 - W_root, oral.conditions), c_model
is built as a generator builds it (metadata sentence + fingerprint of the q_proj, v_proj weights).
Reported: the distance between every two versions' c_model, and as a yardstick the mean distance
between the c_text of two different tasks' descriptions (a difference the generator is known to
act on). A version a generator cannot tell from another sits at a distance far below the yardstick.
"""

import argparse
import itertools
import statistics
import time

import torch

from oral.conditions import ConditionConfig, ConditionEncoder
from oral.config import load_config
from oral.evolve import ChainConfig, built_versions
from oral.io import atomic_write_json
from oral.lora import LoraSpec
from oral.models import load_base
from oral.tasks import get_task, list_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/evolve-chain.yaml", help="the family's chain config")
    ap.add_argument("--json-out", help="write the result here")
    args = ap.parse_args()
    t0 = time.time()
    chain = load_config(ChainConfig, args.config)
    versions = built_versions(chain)
    kinds = {"sketch": ConditionConfig(), "drift": ConditionConfig(fingerprint_kind="drift", fingerprint_reference=chain.base)}
    encoders = {k: ConditionEncoder(c) for k, c in kinds.items()}
    c_model: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for version in versions:
        model, _ = load_base(version)
        names = [m.name for m in LoraSpec.from_base_config(model.config, ["q_proj", "v_proj"], 4, 8).modules]
        for k, enc in encoders.items():
            c_model[k].append(enc.model_condition(model.config, model, names))
        del model
    text = encoders["sketch"].text_condition([get_task(t).descriptions[0] for t in list_tasks()])
    yardstick = statistics.fmean(float((a - b).norm()) for a, b in itertools.combinations(text, 2))
    result = {"config": args.config, "versions": [str(v) for v in versions], "text_yardstick": yardstick, "kinds": {}}
    for k, cs in c_model.items():
        fp = kinds[k].fingerprint_dim
        pairs = [{"a": f"t{i}", "b": f"t{j}", "c_model_l2": float((cs[i] - cs[j]).norm()),
                  # relative to the larger of the two (the drift fingerprint of t0 itself is 0)
                  "fingerprint_rel_l2": float((cs[i][-fp:] - cs[j][-fp:]).norm()
                                              / torch.maximum(cs[i][-fp:].norm(), cs[j][-fp:].norm()).clamp_min(1e-12))}
                 for i, j in itertools.combinations(range(len(cs)), 2)]
        result["kinds"][k] = {"fingerprint_dim": fp, "c_model_norm": [float(c.norm()) for c in cs], "pairs": pairs}
    result["wall_s"] = round(time.time() - t0, 1)
    print(f"{len(versions)} versions built; yardstick (two tasks' c_text apart): {yardstick:.3f}")
    print(f"{'kind':<7} {'pair':<7} {'|c_model a - b|':>16} {'/ yardstick':>12}")
    for k, r in result["kinds"].items():
        for p in r["pairs"]:
            print(f"{k:<7} {p['a']}-{p['b']:<4} {p['c_model_l2']:>16.5f} {p['c_model_l2'] / yardstick:>12.5f}")
    if args.json_out:
        atomic_write_json(args.json_out, result)


if __name__ == "__main__":
    main()
