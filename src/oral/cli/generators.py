"""oral generators: list the bundled and the trained generators, or bundle one into the package."""

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generators",
        help="list generators (the bundled one and those in $ORAL_HOME/generators)",
        description="List generators; with --bundle GEN, copy a trained generator into the package as the "
                    "bundled default (fp16 weights, with a model card). scripts/build_generator.sh does it all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bundle", metavar="GEN", help="trained generator dir to ship as the bundled one")
    p.add_argument("--scores", help="with --bundle: its scores on held-out descriptions, for the model card: an `oral "
                                     "experiment` result (docs/results/exp-NAME.json) or an `oral compare --json-out` one")
    p.add_argument("--guidance", type=float, help="with --bundle: the guidance scale `oral generate` uses by default "
                                                  "(choose it on validation: `oral experiment seen`, generated-cfg)")
    p.add_argument("--steps", type=int, help="with --bundle: the DDIM steps `oral generate` uses by default "
                                             "(choose them on validation too)")
    p.add_argument("--guidance-note", default="", help="with --guidance / --steps: how they were chosen, recorded beside them")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from oral.generate import bundle_generator, generator_card, list_generators
    from oral.io import read_json

    if args.bundle:
        scores = read_json(Path(args.scores), "run the `oral experiment` (or `oral compare --json-out`) that wrote it again") if args.scores else None
        sampling = {"guidance": args.guidance, "chosen_by": args.guidance_note} if args.guidance is not None else None
        if args.steps is not None:
            sampling = {**(sampling or {"guidance": 1.0}), "steps": args.steps}
        card = generator_card(args.bundle, scores, sampling)
        print(f"bundled {bundle_generator(args.bundle, card=card, sampling=sampling)}")
        return 0
    rows = list_generators()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no generator yet: `oral demo --from-scratch` or scripts/build_generator.sh builds one")
        return 0
    print(f"{'name':<12} {'step':>6} {'adapters':>8}  {'bases':<24} tasks")
    for r in rows:
        print(f"{r['name']:<12} {r['step']:>6} {r['num_samples']:>8}  {', '.join(r['bases'])[:24]:<24} "
              f"{', '.join(r['tasks'])}")
    return 0
