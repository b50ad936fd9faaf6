"""How far does an evolved family drift? Evolve a chain, then score a stale t0 LoRA on every version.

For a chain config (oral.evolve.ChainConfig) this builds t0 -> t1 -> ... (cached), then for each
version reports: held-out perplexity on every corpus, the bare version's accuracy on a task, the
accuracy of a LoRA trained on t0 and applied unchanged ("stale"), and, with --fresh, of a LoRA
trained on that version itself (is the version still a useful LM?).

    python scripts/drift_study.py --config configs/evolve-chain.yaml --fresh --json-out drift.json
    python scripts/drift_study.py --config configs/evolve-chain.yaml lr=2e-3 steps=100 --device cuda

The LoRA is the quick one of the zoo: r=4 on q_proj,v_proj, 60 steps, batch 8, lr 2e-3, loss on
answer tokens (oral.finetune.train_lora); accuracies are on the first --limit test examples.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from oral.config import load_config
from oral.evaluate import Evaluator
from oral.evolve import ChainConfig, chain_report, evolve_chain
from oral.io import atomic_write_json
from oral.models import load_base
from oral.paths import oral_home
from oral.finetune import train_lora


def quick_lora(base: str | Path, task: str, zoo: Path, steps: int, device: str, seed: int = 0) -> Path:
    """The final checkpoint of a quick LoRA run on `base` (cached in the zoo at `zoo`)."""
    kept = train_lora(str(base), task, rank=4, steps=steps, keep=1, out_dir=zoo, seed=seed, lr=2e-3,
                      batch_size=8, targets=["q_proj", "v_proj"], eval_base=False, eval_limit=50,
                      device=device)
    return kept[-1]


def drift_study(cfg: ChainConfig, task: str = "movie-sentiment", limit: int = 200, lora_steps: int = 60,
                fresh: bool = False, zoo: Path | None = None) -> dict:
    """Evolve the chain and score each version: perplexities, base / stale / fresh task accuracy."""
    zoo = zoo or oral_home() / "zoos" / "drift"
    t_start = time.time()
    versions = evolve_chain(cfg)
    t_evolve = time.time() - t_start
    rows = chain_report(cfg, versions)
    stale = quick_lora(versions[0], task, zoo, lora_steps, cfg.device)
    for row, version in zip(rows, versions):
        model, tok = load_base(version, device=cfg.device)
        ev = Evaluator(model, tok, progress=False)
        row["base_acc"] = ev.evaluate(task, limit=limit)["value"]
        ev.set_adapter(stale)
        row["stale_t0_lora_acc"] = ev.evaluate(task, limit=limit)["value"]
        del ev, model
        if fresh:
            own = stale if row["version"] == "t0" else quick_lora(version, task, zoo, lora_steps, cfg.device)
            model, tok = load_base(version, device=cfg.device)
            ev = Evaluator(model, tok, progress=False)
            ev.set_adapter(own)
            row["fresh_lora_acc"] = ev.evaluate(task, limit=limit)["value"]
            del ev, model
        print(json.dumps({k: v for k, v in row.items() if k != "path"}), flush=True)
    return {"config": {k: v for k, v in vars(cfg).items()}, "task": task, "limit": limit,
            "lora_steps": lora_steps, "rows": rows, "evolve_wall_s": round(t_evolve, 1),
            "total_wall_s": round(time.time() - t_start, 1), "device": cfg.device,
            "torch": torch.__version__}


def format_table(result: dict) -> str:
    rows = result["rows"]
    corpora = list(rows[0]["perplexity"])
    head = ("| version | trained on | steps | lr | " + " | ".join(f"ppl {c}" for c in corpora)
            + " | base acc | stale t0-LoRA acc | fresh LoRA acc |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pct = lambda v: f"{100 * v:.1f}" if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['version']} | {r['corpus'] or '(base)'} | {r['steps']} | {r['lr'] if r['lr'] else '-'} | "
            + " | ".join(f"{r['perplexity'][c]:.1f}" for c in corpora)
            + f" | {pct(r['base_acc'])} | {pct(r['stale_t0_lora_acc'])} | {pct(r.get('fresh_lora_acc'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="ChainConfig YAML (e.g. configs/evolve-chain.yaml)")
    p.add_argument("--task", default="movie-sentiment")
    p.add_argument("--limit", type=int, default=200, help="test examples scored per version")
    p.add_argument("--lora-steps", type=int, default=60)
    p.add_argument("--fresh", action="store_true", help="also train and score a LoRA on every version")
    p.add_argument("--zoo", help="where the quick LoRAs are kept (default $ORAL_HOME/zoos/drift)")
    p.add_argument("--device", help="override the config's device")
    p.add_argument("--json-out", help="write the full result here")
    p.add_argument("overrides", nargs="*", help="key=value ChainConfig overrides")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    cfg = load_config(ChainConfig, args.config, overrides)
    result = drift_study(cfg, args.task, args.limit, args.lora_steps, args.fresh,
                         Path(args.zoo) if args.zoo else None)
    if args.json_out:
        atomic_write_json(args.json_out, result)
    print(format_table(result))
    print(f"evolve {result['evolve_wall_s']} s, total {result['total_wall_s']} s on {result['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
