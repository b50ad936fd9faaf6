"""oral eval: score a base model, with or without an adapter, on tasks."""

import json
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a base model (+ an optional LoRA adapter) on tasks",
        description="oral eval --base B [--adapter DIR] --task T[,T2]: the task metric on a split. An adapter "
                    "dir's README.md (model card) records the scores measured on it.",
    )
    p.add_argument("--base", required=True, help="base model: embedded name, local HF dir or hub id")
    p.add_argument("--adapter", help="PEFT LoRA adapter dir")
    p.add_argument("--task", required=True, help="task names or task YAML files, comma-separated")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="the split scored")
    p.add_argument("--limit", type=int, help="evaluate the first N examples of the split")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--no-card", action="store_true", help="do not record the scores in the adapter's README.md")
    p.add_argument("--json", action="store_true", help='print {"base", "adapter", "results": {task: {metric, value, n}}}')
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.evaluate import Evaluator
    from oral.tasks import get_task

    names = [t.strip() for t in args.task.split(",") if t.strip()]
    tasks = [get_task(n) for n in names]  # unknown names fail before the model loads
    ev = Evaluator.from_base(args.base, adapter=args.adapter, batch_size=args.batch_size)
    results, seconds = {}, {}
    for name, task in zip(names, tasks):
        t0 = time.perf_counter()
        results[name] = ev.evaluate(task, split=args.split, limit=args.limit)
        seconds[name] = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"base": args.base, "adapter": args.adapter, "split": args.split, "results": results}, indent=2))
    else:
        print(f"base {args.base}" + (f", adapter {args.adapter}" if args.adapter else "") + f", split {args.split}")
        print(f"{'task':<18} {'metric':<10} {'value':>7} {'n':>5} {'seconds':>8}")
        for name, r in results.items():
            print(f"{name:<18} {r['metric']:<10} {r['value']:>7.4f} {r['n']:>5} {seconds[name]:>8.1f}")
    if args.adapter and not args.no_card:
        _record_scores(args, results)
    return 0


def _record_scores(args, results: dict) -> None:
    """Add the scores to the adapter's model card; a card oral did not write is left as is (a note)."""
    from oral.lora import write_model_card
    from oral.models import base_id

    scores = [{"task": name, "split": args.split, **r, "base": base_id(args.base)} for name, r in results.items()]
    try:
        card = write_model_card(args.adapter, scores)
    except (ValueError, OSError) as e:  # a card oral did not write, a damaged file, a read-only dir
        print(f"oral eval: note: scores not recorded in the model card: {e}", file=sys.stderr)
        return
    print(f"scores recorded in {card}", file=sys.stderr)
