"""oral bench: time generation at the sizes people use (LoRA layouts from model configs alone)."""


def add_parser(sub) -> None:
    from oral.cli import HelpFormatter

    p = sub.add_parser(
        "bench",
        help="benchmark making one adapter end to end at a given LoRA size, and against fine-tuning",
        description=(
            "oral bench generate --spec NAME|CONFIG.json --targets q_proj,v_proj|all-linear --rank R "
            "[--preset P] [--steps S] [--json]: an untrained generator of the preset that layout would use "
            "makes one adapter on the path of `oral generate` (conditions, prototypes, sampling, decoding, "
            "validation, the PEFT dir written); prints its time and peak memory. Shipped configs: "
            "mistral-7b, llama-3.1-8b, qwen2.5-7b, sd-2.1-unet (Stable Diffusion 2.1's UNet, a diffusers config); "
            "any embedded name or local model dir works too."
        ),
    )
    bench = p.add_subparsers(dest="bench", required=True)
    g = bench.add_parser("generate", help="time one adapter made end to end", formatter_class=HelpFormatter)
    g.add_argument("--spec", default="smollm2-135m", help="model config: shipped name, CONFIG.json, embedded name or dir")
    g.add_argument("--targets", help="comma-separated module names, or all-linear (default: q_proj,v_proj; "
                                     "to_q,to_k,to_v,to_out.0 for a diffusers UNet)")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank")
    g.add_argument("--preset", help="generator preset (default: the one this layout would use)")
    g.add_argument("--steps", type=int, default=60, help="denoising steps")
    g.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="denoising sampler")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--chunk", type=int, help="tokens per sampling chunk (default: the generator's)")
    g.add_argument("--bf16", action="store_true", help="run the denoiser's matmuls in bfloat16 (autocast)")
    g.add_argument("--out", help="keep the adapter in this dir (default: a temporary dir)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t = bench.add_parser(
        "time-to-adapter", formatter_class=HelpFormatter,
        help="wall time of a generated adapter against LoRA fine-tuning to the same accuracy",
        description=(
            "In one run on one loaded base: the generator (loaded and warm, as a server holds it) makes the task's "
            "adapter from a held-out description, timed at its default steps and scored at DDIM 2/5/10/25/60 and "
            "DDPM 1000; then a LoRA is fine-tuned with the quick zoo's recipe, a checkpoint kept every --every "
            "steps and scored. finetune_s: the first checkpoint within --tolerance of the generated accuracy; "
            "ratio = finetune_s / generate_s. --plot writes accuracy against wall time for both."
        ),
    )
    t.add_argument("--task", default="movie-sentiment", help="a task the generator was trained on")
    t.add_argument("--generator", help="generator dir (default: the bundled one)")
    t.add_argument("--base", help="base model (default: the generator's first training base)")
    t.add_argument("--split", default="test", help="split the accuracies are measured on")
    t.add_argument("--limit", type=int, default=200, help="examples scored per adapter")
    t.add_argument("--val-limit", type=int, default=100, help="validation examples for choosing the sampling steps")
    t.add_argument("--finetune-steps", type=int, default=120, help="steps of the fine-tuning run")
    t.add_argument("--every", type=int, default=10, help="steps between scored fine-tuning checkpoints")
    t.add_argument("--no-ddpm", action="store_true", help="skip the DDPM 1000-step point")
    t.add_argument("--tolerance", type=float, default=0.01, help="accuracy below the generated one that still counts")
    t.add_argument("--plot", help="write the figure (PNG) here")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.bench == "time-to-adapter":
        return run_time_to_adapter(args)
    import json

    import torch

    from oral.bench import bench_generate, default_targets

    targets = default_targets(args.spec) if args.targets is None else \
        args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    r = bench_generate(args.spec, targets, args.rank, preset=args.preset, steps=args.steps, sampler=args.sampler,
                       seed=args.seed, out=args.out, device=args.device, chunk=args.chunk,
                       autocast=torch.bfloat16 if args.bf16 else None)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['spec']} r={r['rank']} {r['targets']}: {r['params']:,} params, {r['tokens']:,} tokens x {r['token_size']}, "
          f"preset {r['preset']} ({r['generator_params']:,} params)")
    print(f"{r['steps']} {r['sampler']} steps: {r['wall_s']:.2f} s ({r['us_per_param']:.2f} us/param; CPU {r['cpu_s']:.2f} s), peak RSS "
          f"{r['peak_rss_mb']:.0f} MiB (+{r['peak_extra_mb']:.0f} over the loaded generator), adapter {r['adapter_mb']:.1f} MiB")
    return 0


def run_time_to_adapter(args) -> int:
    import json

    from oral.bench_time import DDPM_STEPS, plot_time_to_adapter, time_to_adapter
    from oral.io import atomic_write_bytes

    r = time_to_adapter(args.task, args.generator, args.base, split=args.split, limit=args.limit,
                        val_limit=args.val_limit, ddpm_steps=None if args.no_ddpm else DDPM_STEPS,
                        finetune_steps=args.finetune_steps, every=args.every, tolerance=args.tolerance,
                        progress=not args.json)
    if args.plot:
        atomic_write_bytes(args.plot, plot_time_to_adapter(r))
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['task']} on {r['base']}, {r['split']} accuracy on {r['limit']} examples (base {r['base_accuracy']:.3f}):")
    print(f"  generated ({r['steps']} DDIM steps): {r['accuracy']:.3f} in {r['generate_s']:.2f} s")
    got = (f"{r['finetune_s']:.1f} s (step {r['finetune_step']})" if r["reached"]
           else f"never within {r['tolerance']:g} in {r['finetune_s']:.1f} s (best {r['finetune_best']:.3f})")
    print(f"  fine-tuning to that accuracy: {got}")
    print(f"  ratio: {'' if r['reached'] else '>= '}{r['ratio']:g}x")
    print("  sampling steps: " + ", ".join(f"{x['sampler']} {x['steps']}: {x['accuracy']:.3f} ({x['wall_s']:.2f} s)"
                                          for x in r["sampling"]))
    print(f"  steps chosen on validation: {r['chosen_steps']} (the generator's default: {r['steps']})")
    return 0
