"""oral zoo: fine-tune LoRA checkpoints for the zoo (one run, or a grid from a YAML config)."""

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "zoo",
        help="fine-tune LoRA runs and keep their last checkpoints (the generator's training data)",
        description=(
            "One run: oral zoo --base B --task T --rank R --steps N --keep K --out ZOO. "
            "A grid: oral zoo --config configs/zoo-quick.yaml [key=value ...]. "
            "Many GPUs: accelerate launch --num_processes N -m oral.cli zoo --config ... "
            "(runs are spread over processes). Rerunning a command finishes only what is missing."
        ),
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. train.steps=50)")
    p.add_argument("--config", help="grid config YAML (configs/zoo-*.yaml)")
    p.add_argument("--base", help="base model: embedded name, local HF dir or hub id")
    p.add_argument("--task", help="task name or task YAML file")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--keep", type=int, help="checkpoints kept: the last K (default 10)")
    p.add_argument("--out", help="zoo directory (manifest.jsonl + runs/)")
    p.add_argument("--seed", type=int, default=0, help="training seed of the run")
    p.add_argument("--targets", help="comma-separated module names (default q_proj,v_proj)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, help="batch size (default 8)")
    p.add_argument("--skip-missing", action="store_true",
                   help="train the runs whose base exists now; runs on evolved versions not built yet wait")
    p.add_argument("--summary", action="store_true", help="print the zoo's completed runs and exit")
    p.add_argument("--evaluate", action="store_true",
                   help="score the kept checkpoints of completed runs (the spread within each run) and exit")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="with --evaluate or --summary: only records whose field has this value, or one of "
                        "comma-separated values (repeatable), e.g. --where task=movie-sentiment --where step=51,55; "
                        "--summary also knows version (0 = the root model, k = its k-th evolved version)")
    p.add_argument("--limit", type=int, help="with --evaluate: examples per checkpoint (default: the whole split)")
    p.add_argument("--split", default="validation", help="with --evaluate: the split scored (default validation)")
    p.add_argument("--json-out", help="with --evaluate: also write every score to this JSON file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--table", choices=["version", "rank"],
                   help="with --summary: a markdown table, one line per task and columns per evolved version "
                        "(base and final score) or per rank; narrow it with --where (e.g. rank=4, version=0)")
    p.set_defaults(func=run)


def _existing_zoo(zoo_dir: str):
    """The zoo at ZOO_DIR; a dir without a manifest is an error naming the commands that build a zoo."""
    from oral.zoo import MANIFEST, Zoo, ZooError

    zoo = Zoo(zoo_dir)
    if not zoo.manifest.is_file():
        what = "does not exist" if not zoo.root.exists() else f"has no {MANIFEST}"
        raise ZooError(f"{zoo.root} {what}, so it is not a zoo; build one with `oral zoo --config "
                       f"configs/zoo-quick.yaml --out {zoo_dir}` (a grid) or `oral zoo --base B --task T "
                       f"--out {zoo_dir}` (one run)")
    return zoo


def _print_summary(zoo_dir: str, as_json: bool, where: list[str], table: str | None) -> None:
    from oral.zoo import summary_table

    rows = _existing_zoo(zoo_dir).summary(**_filters(where))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if table:
        print(summary_table(rows, by=table))
        return

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"{'v':<2} {'base':<24} {'task':<18} {'r':>2} {'seed':>4} {'steps':>5} {'ckpts':>5} "
          f"{'base':>6} {'final':>6} {'ckpt min-max':>13} {'wall_s':>7}")
    for r in rows:
        spread = "-" if r["ckpt_min"] is None else f"{r['ckpt_min']:.3f}-{r['ckpt_max']:.3f}"
        name = Path(r["base"]).name
        print(f"t{r['version']:<1} {name[:24]:<24} {r['task']:<18} {r['rank']:>2} {r['seed']:>4} {r['steps']:>5} "
              f"{r['checkpoints']:>5} {f(r['base_metric']):>6} {f(r['final_metric']):>6} {spread:>13} "
              f"{r['wall_s'] or 0:>7.1f}")


def _filters(where: list[str]) -> dict[str, set]:
    """--where KEY=V1,V2 -> {KEY: {V1, V2}} (integers where they look like integers)."""
    from oral.zoo import ZooError

    out = {}
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ZooError(f"--where takes KEY=VALUE[,VALUE...] (e.g. step=51,55), got {item!r}")
        out[key] = {int(v) if v.lstrip("-").isdigit() else v for v in value.split(",")}
    return out


def _evaluate(args) -> None:
    from oral.io import atomic_write_text
    from oral.zoo import ZooError, evaluate_checkpoints

    zoo = _existing_zoo(args.out)
    records = zoo.records(**_filters(args.where))
    if not records:
        raise ZooError(f"no completed checkpoint in {args.out} matches {args.where or 'anything'}")
    rows = evaluate_checkpoints(zoo, records, split=args.split, limit=args.limit)
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    print(f"{'run':<48} {'steps':>11} {'min':>6} {'max':>6} {'final':>6}")
    for run_id, recs in by_run.items():
        vals = [r["eval"]["value"] for r in recs]
        steps = sorted(r["step"] for r in recs)
        final = next((r["eval"]["value"] for r in recs if r.get("final")), None)
        print(f"{run_id[-48:]:<48} {f'{steps[0]}-{steps[-1]}':>11} {min(vals):>6.3f} {max(vals):>6.3f} "
              f"{'-' if final is None else f'{final:.3f}':>6}")
    if args.json_out:
        keep = ("run_id", "base", "task", "rank", "seed", "step", "final", "path", "eval")
        atomic_write_text(args.json_out, json.dumps([{k: r.get(k) for k in keep} for r in rows], indent=1))


def run(args) -> int:
    import time

    from oral.config import load_config
    from oral.grid import GridBlock, ZooConfig, run_grid
    from oral.zoo import ZooError
    from oral.paths import expand_path

    if args.summary:
        if not args.out:
            raise ZooError("--summary needs --out ZOO")
        _print_summary(args.out, args.json, args.where, args.table)
        return 0
    if args.evaluate:
        if not args.out:
            raise ZooError("--evaluate needs --out ZOO")
        _evaluate(args)
        return 0
    overrides = list(args.overrides)
    if args.config is None:
        if not (args.base and args.task and args.out):
            raise ZooError("give --config CONFIG.yaml, or --base, --task and --out for one run")
    elif args.base or args.task:
        raise ZooError("--base/--task describe one run; with --config, edit the grid in the YAML instead")
    for flag, key in (("steps", "train.steps"), ("keep", "train.keep"), ("lr", "train.lr"),
                      ("batch_size", "train.batch_size"), ("targets", "train.targets"), ("out", "out")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(ZooConfig, args.config, overrides)
    if args.config is None:
        cfg.grid = [GridBlock(bases=[args.base], tasks=[args.task], ranks=[args.rank], seeds=[args.seed])]
    t0 = time.time()
    counts = run_grid(cfg, skip_missing=args.skip_missing)
    waiting = f", {counts['waiting']} waiting for evolved versions" if counts["waiting"] else ""
    busy = f", {counts['busy']} left to another process" if counts["busy"] else ""
    parts = []
    if counts["runs"] or not counts["style_runs"]:
        parts.append(f"{counts['trained']} runs trained, {counts['skipped']} already done "
                     f"(of {counts['runs']} for this process)")
    if counts["style_runs"]:
        parts.append(f"{counts['style_runs']} style runs trained or found done")
    print(f"zoo {expand_path(cfg.out)}: {', '.join(parts)}{busy}{waiting} in {time.time() - t0:.1f} s")
    return 0
