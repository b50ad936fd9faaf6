"""oral evolve: continued pretraining of a base model on a corpus, or a whole family (--chain)."""

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evolve",
        help="continue pretraining a base model on a corpus (or build a family with --chain)",
        description="One link: --base B --corpus C --steps N [--out DIR]. A family t0 -> t1 -> ... with "
        "--chain [--config configs/evolve-chain.yaml] [key=value ...], reporting per-version drift.",
    )
    p.add_argument("--base", help="embedded model name, HF model dir or hub id (default smollm2-135m)")
    p.add_argument("--corpus", help="embedded corpus (see --list-corpora) or a local text file")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--out", help="output model dir (default: cached under $ORAL_HOME/evolved)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    p.add_argument("--save-every", type=int, help="training checkpoint interval in steps (default 50)")
    p.add_argument("--device", help="cpu (default), cuda, ...")
    p.add_argument("--chain", action="store_true", help="build the family t0 -> t1 -> ... and report drift")
    p.add_argument("--config", help="YAML ChainConfig (implies --chain)")
    p.add_argument("--list-corpora", action="store_true", help="list the embedded corpora and exit")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (with --chain)")
    p.set_defaults(func=run)


def _flags(args) -> dict:
    names = {"base": "base", "lr": "lr", "seed": "seed", "batch_size": "batch_size", "seq_len": "seq_len",
             "save_every": "save_every", "device": "device"}
    return {k: getattr(args, a) for a, k in names.items() if getattr(args, a) is not None}


def run(args) -> int:
    from oral import evolve as ev
    from oral.config import load_config
    from oral.io import read_json

    if args.list_corpora:
        from oral.corpora import corpus_info

        rows = corpus_info()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            size = f"{r['documents']:>6} docs {r['chars'] / 1e6:6.1f} M chars" if r["available"] else "not installed"
            print(f"{r['name']:<14} {size:<28} {r['description']}  [{r['install']}]")
        return 0

    if args.chain or args.config:
        flags = [f"{k}={v}" for k, v in _flags(args).items()]
        if args.steps is not None:
            flags.append(f"steps={args.steps}")
        if args.corpus is not None:
            flags.append(f"corpora={args.corpus}")
        cfg = load_config(ev.ChainConfig, args.config, list(args.overrides) + flags)
        versions = ev.evolve_chain(cfg)
        rows = ev.chain_report(cfg, versions)
        print(json.dumps(rows, indent=2) if args.json else ev.format_report(rows))
        return 0

    if args.overrides:
        raise ValueError(f"key=value overrides ({' '.join(args.overrides)}) need --chain or --config")
    if args.corpus is None or args.steps is None:
        raise ValueError("give --corpus and --steps (or --chain / --config for a family, --list-corpora to list)")
    flags = _flags(args)
    out = ev.evolve(flags.pop("base", "smollm2-135m"), args.corpus, args.steps, out=args.out, **flags)
    if args.json:
        print(json.dumps({"out": str(out), "oral_lineage": read_json(out / "config.json", f"remove {out} and run this command again")["oral_lineage"]}))
    else:
        print(out)
    return 0
