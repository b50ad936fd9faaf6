"""oral bench: time generation at the sizes people use (LoRA layouts from model configs alone)."""


def add_parser(sub) -> None:
    from oral.cli import HelpFormatter

    p = sub.add_parser(
        "bench",
        help="benchmark making one adapter end to end at a given LoRA size",
        description=(
            "oral bench generate --spec NAME|CONFIG.json --targets q_proj,v_proj|all-linear --rank R "
            "[--preset P] [--steps S] [--json]: an untrained generator of the preset that layout would use "
            "makes one adapter on the path of `oral generate` (conditions, prototypes, sampling, decoding, "
            "validation, the PEFT dir written); prints its time and peak memory. Shipped configs: "
            "mistral-7b, llama-3.1-8b, qwen2.5-7b; any embedded name or local model dir works too."
        ),
    )
    bench = p.add_subparsers(dest="bench", required=True)
    g = bench.add_parser("generate", help="time one adapter made end to end", formatter_class=HelpFormatter)
    g.add_argument("--spec", default="smollm2-135m", help="model config: shipped name, CONFIG.json, embedded name or dir")
    g.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
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
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    import torch

    from oral.bench import bench_generate

    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
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
