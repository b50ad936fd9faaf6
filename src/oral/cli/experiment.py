"""oral experiment: one named experiment (configs/exp-NAME.yaml), cached, written in the long format."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a named experiment: every method on every (base version, task), cached",
        description=(
            "oral experiment NAME --config configs/exp-NAME.yaml [key=value ...]. Writes "
            "OUT/exp-NAME.json (one row per method, version, task, description and seed), exp-NAME.md and "
            "exp-NAME.png. Generated adapters and scores are cached: a rerun measures only what is new. "
            "Names that start with image- are image-domain experiments (configs/exp-image-styles.yaml): style "
            "LoRAs on an image base, judged by FID-ours, KID-ours, style and subject accuracy."
        ),
    )
    p.add_argument("name", metavar="NAME", help="the experiment's name (its files are exp-NAME.*)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. limit=50 seeds=[0])")
    p.add_argument("--config", help="experiment config YAML (configs/exp-*.yaml)")
    p.set_defaults(func=run, extra_words="overrides")


def run(args) -> int:
    from oral.config import load_config
    from oral.experiments.runner import ExperimentConfig, format_table, run_experiment
    from oral.paths import expand_path

    name, overrides = args.name, args.overrides
    if "=" in name:
        raise ValueError(f"the first word must be the experiment's name, not the override {name!r}: "
                         f"oral experiment NAME --config configs/exp-NAME.yaml [key=value ...]")
    if name.startswith("image-"):
        from oral.experiments.image_styles import ImageStylesConfig, format_tables, run_image_styles

        cfg = load_config(ImageStylesConfig, args.config, overrides)
        result = run_image_styles(name, cfg)
        print(format_tables(result))
    else:
        cfg = load_config(ExperimentConfig, args.config, overrides)
        result = run_experiment(name, cfg)
        print(format_table(result))
    out = expand_path(cfg.out)
    pictures = f"exp-{name}-STYLE.png grids" if name.startswith("image-") else ".png"
    print(f"{len(result['rows'])} rows in {result['wall_s']:.0f} s; written {out}/exp-{name}.json, .md, {pictures}")
    return 0
