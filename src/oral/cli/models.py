"""oral models: list the embedded base models."""

import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the embedded base models",
                       description="List the base models oral embeds (name, architecture, size, source, cached "
                                   "dir); any local HF model dir or hub id works as a base too.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14} {'architecture':<18} {'params':>12}  source")
    for r in rows:
        print(f"{r['name']:<14} {r['architecture']:<18} {r['num_params']:>12,}  {r['source']}")
    return 0
