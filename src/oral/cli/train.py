"""oral train: train (or resume) a generator on one or more zoos."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the generator (conditional recurrent diffusion) on LoRA zoos",
        description=(
            "oral train --zoo ZOO [--zoo ...] --out GEN [--steps N] [--config configs/generator-*.yaml] "
            "[key=value ...]. Rerunning the same command resumes from the latest checkpoint in GEN. "
            "Many GPUs: accelerate launch --num_processes N -m oral.cli train ..."
        ),
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. preset=tiny lr=2e-3 gauge=canonical)")
    p.add_argument("--zoo", action="append", required=True, help="zoo directory (repeatable)")
    p.add_argument("--out", required=True, help="generator directory (checkpoints, export, loss log)")
    p.add_argument("--config", help="training config YAML (configs/generator-*.yaml)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from oral.config import load_config
    from oral.generate import read_generator_config
    from oral.train import GeneratorTrainConfig, read_loss_log, train_generator

    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
    cfg = load_config(GeneratorTrainConfig, args.config, overrides)
    t0 = time.time()
    out = train_generator(args.zoo, args.out, cfg)
    rows = read_loss_log(out)
    info = read_generator_config(out)
    first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (float("nan"), float("nan"))
    print(f"generator {out}: step {info['step']}, {info['num_samples']} adapters, loss {first:.4f} -> {last:.4f}, "
          f"{time.time() - t0:.0f} s (this call)")
    print(f"loss log {out / 'loss.csv'}, plot {out / 'loss.png'}")
    return 0
