"""oral generate: write new PEFT LoRA adapter dirs for a base model from a prompt."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate LoRA adapters for a base model from a task description",
        description=(
            "oral generate [--generator GEN] --base B --prompt '...' --out DIR [--seed S] [--steps K] "
            "[--guidance G] [--num N] [--init ADAPTER --strength S]. With --num 1 DIR is the adapter dir; with N > 1 the adapters "
            "go to DIR/seed-<s> for seeds S .. S+N-1. Each loads with plain PeftModel.from_pretrained. "
            "With --init, an existing adapter (e.g. one trained on an earlier version of the base) is refined "
            "for BASE instead of generating from noise."
        ),
    )
    p.add_argument("--generator", help="trained generator directory (from oral train); default: the bundled one")
    p.add_argument("--base", required=True, help="base model: embedded name, local HF dir or hub id")
    p.add_argument("--prompt", required=True, help="what the adapter should do, in words")
    p.add_argument("--out", required=True, help="output adapter dir")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the generator's recommended number, else 60)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1 = off; default: the generator's recommended scale, "
                        "chosen on validation for the bundled one)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="denoising sampler")
    p.add_argument("--num", type=int, default=1, help="adapters to write (seeds S, S+1, ...)")
    p.add_argument("--init", metavar="ADAPTER",
                   help="a PEFT adapter dir of the generator's layout to start from instead of noise (SDEdit)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --init: how far the generator may move it, 0 (keep it) .. 1 (ignore it); default 0.1")
    p.add_argument("--snap", action="store_true",
                   help="when the prompt is far from every training description (the warning), make the adapter of "
                        "the nearest description instead of the generator's guess (docs/RESULTS.md, \"Image domain\")")
    p.add_argument("--rank", type=int, help="LoRA rank, when the generator learned several for this base")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--overwrite", action="store_true", help="replace existing output dirs")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from oral.generate import REFINE_STRENGTH, GenerationError, Generator, generate_adapters

    if args.strength is not None and args.init is None:
        raise GenerationError("--strength only applies with --init ADAPTER (the adapter to refine)")

    gen = Generator.from_pretrained(args.generator, device=args.device)
    known = gen.familiarity(args.prompt)
    near = known["nearest"][0]
    print(f"nearest training description: {near['description']!r} ({near['task']}, similarity {near['similarity']:.2f})"
          + (" -> generating for it (--snap)" if args.snap and not known["familiar"] else ""))
    t0 = time.time()
    paths = generate_adapters(gen, args.base, args.prompt, args.out, seed=args.seed, num=args.num, steps=args.steps,
                              guidance=args.guidance, sampler=args.sampler, rank=args.rank, overwrite=args.overwrite,
                              init=args.init, strength=REFINE_STRENGTH if args.strength is None else args.strength,
                              snap=args.snap)
    dt = time.time() - t0
    for p in paths:
        print(p)
    print(f"{len(paths)} adapter(s) in {dt:.1f} s ({dt / len(paths):.1f} s each)")
    return 0
