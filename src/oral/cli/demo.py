"""oral demo: a prompt in, an adapter out, and its score on the matching task next to the base's."""

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate an adapter from a prompt and score it against the base (bundled generator)",
        description=(
            "Generate an adapter from a prompt with the bundled generator and score the base, the base with "
            "the prompt in context, and the adapter on the matching task's test split. --from-scratch "
            "builds the zoo (one process per core) and the generator first, with the bundled generator's recipe "
            "(resumable; $ORAL_HOME/zoos/quick and $ORAL_HOME/generators/demo)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prompt", help="what the adapter should do (default: a held-out description of --task)")
    p.add_argument("--task", help="the task to score on (default: the nearest trained task to the prompt, "
                                  "or movie-sentiment without a prompt)")
    p.add_argument("--base", default="smollm2-135m", help="base model")
    p.add_argument("--generator", help="generator dir (default: the bundled one)")
    p.add_argument("--from-scratch", action="store_true", help="train the zoo and the generator first")
    p.add_argument("--build-only", action="store_true", help="with --from-scratch: stop once the generator is built")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--limit", type=int, default=200, help="test examples scored per method")
    p.add_argument("--out", help="adapter dir (default: $ORAL_HOME/demo/adapters/<prompt>-s<seed>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from oral.demo import build_from_scratch, format_demo, run_demo

    if args.from_scratch and args.generator:
        raise ValueError("--from-scratch builds its own generator; leave out --generator")
    if args.build_only:
        if not args.from_scratch:
            raise ValueError("--build-only goes with --from-scratch")
        print(f"generator {build_from_scratch(args.base)}")
        return 0
    result = run_demo(prompt=args.prompt, task=args.task, generator=args.generator, base=args.base,
                      seed=args.seed, limit=args.limit, out=args.out, from_scratch=args.from_scratch)
    print(json.dumps(result, indent=2) if args.json else format_demo(result))
    return 0
