"""Time `Evaluator.evaluate` on a task: seconds, examples/s and prompt tokens/s.

    python benchmarks/bench_eval.py --base smollm2-135m --task movie-sentiment --limit 200

Prints one JSON line. Run it on an idle machine: on shared cores the numbers measure the load.
"""

import argparse
import json
import os
import time

import torch

from oral.evaluate import Evaluator, encode_pair
from oral.models import load_base
from oral.tasks import get_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--task", default="movie-sentiment")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    model, tok = load_base(args.base)
    task = get_task(args.task)
    examples = task.split(args.split)[: args.limit]
    n_tokens = sum(len(encode_pair(tok, ex.prompt, "")[0]) for ex in examples)
    ev = Evaluator(model, tok, batch_size=args.batch_size, progress=False)
    times, values = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = ev.evaluate(task, split=args.split, limit=args.limit)
        times.append(time.perf_counter() - t0)
        values.append(r["value"])
    best = min(times)
    print(json.dumps({
        "base": args.base, "task": args.task, "n": r["n"], "metric": r["metric"], "values": values,
        "seconds": [round(t, 2) for t in times], "examples_per_s": round(r["n"] / best, 1),
        "prompt_tokens_per_s": round(n_tokens / best, 1), "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
