"""oral tasks: list the tasks (or export them for lm-evaluation-harness)."""

import json


def add_parser(sub) -> None:
    p = sub.add_parser("tasks", help="list the tasks: name, kind, split sizes, metric, one description",
                       description="List the built-in tasks (and task YAML files given with --task): name, kind, "
                                   "split sizes, metric and one description; --export-lm-eval writes them for "
                                   "lm-evaluation-harness.")
    p.add_argument("--json", action="store_true", help="print JSON (all descriptions, templates, labels)")
    p.add_argument("--task", action="append", default=[], help="also load this task YAML file (repeatable)")
    p.add_argument("--export-lm-eval", metavar="DIR", help="write lm-evaluation-harness task YAMLs + data files to DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.tasks import get_task, list_tasks
    from oral.tasks.lm_eval import export_lm_eval

    tasks = [get_task(n) for n in list_tasks()] + [get_task(path) for path in args.task]
    if args.export_lm_eval:
        paths = export_lm_eval(tasks, args.export_lm_eval)
        for path in paths:
            print(path)
        print(f"run: lm_eval --model hf --model_args pretrained=<model dir>[,peft=<adapter dir>] "
              f"--include_path {args.export_lm_eval} --tasks {','.join(p.stem for p in paths)}")
        return 0
    rows = [t.info() for t in tasks]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18} {'kind':<14} {'train':>5} {'val':>4} {'test':>4}  {'metric':<9} description")
    for r in rows:
        s = r["splits"]
        print(f"{r['name']:<18} {r['kind']:<14} {s['train']:>5} {s['validation']:>4} {s['test']:>4}  "
              f"{r['metric']:<9} {r['description']}")
    return 0
