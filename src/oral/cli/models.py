"""oral models: list the embedded base models."""

import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the embedded base models",
                       description="List the base models oral embeds (name, architecture, size, source, cached "
                                   "dir), then the image bases built under $ORAL_HOME/image-bases (their dir is "
                                   "the name to pass as --base); any local HF model dir or hub id works as a base "
                                   "too.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.image.base import list_image_bases
    from oral.models import list_models

    rows = list_models() + list_image_bases()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    w = max(14, *(len(r["name"]) for r in rows))
    print(f"{'name':<{w}} {'architecture':<20} {'params':>12}  source")
    for r in rows:
        print(f"{r['name']:<{w}} {r['architecture']:<20} {r['num_params']:>12,}  {r['source']}")
    return 0
