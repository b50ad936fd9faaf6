"""oral compare: generated adapters vs the base and the zoo's trained adapters, per task."""

import json


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="score base, trained and generated adapters on tasks' test splits",
                       description="oral compare --generator GEN --zoo ZOO: per task, the base model, the zoo's "
                                   "trained adapter and adapters generated from held-out descriptions, on the "
                                   "test split.")
    p.add_argument("--generator", required=True, help="trained generator dir")
    p.add_argument("--zoo", required=True, help="zoo with the trained adapters")
    p.add_argument("--base", default="smollm2-135m", help="base model: embedded name, local HF dir or hub id")
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: every task the zoo has)")
    p.add_argument("--rank", type=int, default=4, help="rank of the zoo runs compared against (default 4)")
    p.add_argument("--zoo-seed", type=int, default=0, help="training seed of the zoo runs compared against (default 0)")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds per description")
    p.add_argument("--descriptions", type=int, default=1, help="held-out descriptions to prompt with")
    p.add_argument("--limit", type=int, default=200, help="test examples per task and adapter")
    p.add_argument("--steps", type=int, default=60, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--json-out", help="write the full result here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.experiments import CompareConfig, compare, format_compare, save_result

    cfg = CompareConfig(
        generator=args.generator, zoo=args.zoo, base=args.base, rank=args.rank, zoo_seed=args.zoo_seed,
        tasks=[t for t in args.tasks.split(",") if t],
        seeds=[int(s) for s in args.seeds.split(",") if s],
        descriptions=args.descriptions, limit=args.limit, sample_steps=args.steps, guidance=args.guidance,
    )
    result = compare(cfg)
    if args.json_out:
        save_result(result, args.json_out)
    print(json.dumps(result, indent=2) if args.json else format_compare(result))
    return 0
