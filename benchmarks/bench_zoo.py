"""Time one zoo run: seconds per training step (forward, backward) and the end-to-end run.

    python benchmarks/bench_zoo.py                                  # smollm2-135m, movie-sentiment
    OMP_NUM_THREADS=1 python benchmarks/bench_zoo.py --steps 100    # when other jobs share the CPU
    python benchmarks/bench_zoo.py --base tiny-llama --steps 20 --json

Phase 1 times `--probe` single steps of the zoo's own loss (oral.finetune.target_loss: the LM head on
target positions only) on the packed batch the zoo trains on (oral.finetune.pack: one padding-free
row) and on the right-padded batch, against a plain `model(..., labels=...)` step on the padded
batch, so the savings of packing and of the target-only head are both visible. Phase 2 runs
oral.finetune.train_lora end to end (base evaluation, `--steps` steps, `--keep` checkpoints written,
final evaluation) into a temporary zoo. On a shared CPU every number is inflated by the other
jobs: the load average is printed beside.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from oral.models import load_base
from oral.tasks import get_task
from oral.finetune import batch_indices, collate, encode_example, pack, target_loss, train_lora


def time_steps(model, tok, task, rank: int, targets: list[str], batch_size: int, probe: int) -> dict:
    """Median seconds of a step: packed and padded with the target-only head, padded with the full head."""
    from peft import LoraConfig, get_peft_model

    enc = [encode_example(tok, e.prompt, e.target, 256) for e in task.split("train")]
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    pm.train()
    packed, ours, plain = [], [], []
    for step in range(1, probe + 2):
        chosen = [enc[i] for i in batch_indices(len(enc), batch_size, step, 0)]
        t = time.perf_counter()
        target_loss(pm, pack(chosen)).backward()
        t_packed = time.perf_counter() - t
        pm.zero_grad(set_to_none=True)
        b = collate(chosen, tok.pad_token_id)
        t = time.perf_counter()
        target_loss(pm, b).backward()
        t_ours = time.perf_counter() - t
        labels = b["input_ids"].masked_fill(~b["loss_mask"], -100)
        t = time.perf_counter()
        pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss.backward()
        t_plain = time.perf_counter() - t
        pm.zero_grad(set_to_none=True)
        if step > 1:  # the first step warms up allocators
            packed.append(t_packed)
            ours.append(t_ours)
            plain.append(t_plain)
    pm.unload()
    return {"step_s_packed": statistics.median(packed), "step_s_target_head": statistics.median(ours),
            "step_s_full_head": statistics.median(plain)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--task", default="movie-sentiment")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--probe", type=int, default=5, help="single steps timed in phase 1 (0 skips it)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    targets = args.targets.split(",")

    t = time.perf_counter()
    model, tok = load_base(args.base)
    task = get_task(args.task)
    row = {"base": args.base, "task": args.task, "rank": args.rank, "targets": targets,
           "batch_size": args.batch_size, "steps": args.steps, "keep": args.keep,
           "threads": torch.get_num_threads(), "load_s": round(time.perf_counter() - t, 2)}
    if args.probe:
        row.update({k: round(v, 3) for k, v in time_steps(model, tok, task, args.rank, targets,
                                                           args.batch_size, args.probe).items()})
    with tempfile.TemporaryDirectory() as zoo:
        t = time.perf_counter()
        train_lora(model, task, rank=args.rank, steps=args.steps, keep=args.keep, out_dir=zoo,
                   tokenizer=tok, targets=targets, batch_size=args.batch_size)
        row["run_s"] = round(time.perf_counter() - t, 1)
        from oral.zoo import Zoo

        final = Zoo(zoo).records(final=True)[0]
    row["train_s"] = final["wall_s"]
    row["base_acc"] = (final.get("base_val_metric") or {}).get("value")
    row["final_acc"] = final["val_metric"]["value"]
    row["loadavg_1m"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(row))
        return
    for k, v in row.items():
        print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
