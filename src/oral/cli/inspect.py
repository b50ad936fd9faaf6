"""oral inspect: the spec, sizes, token count, per-module norms and validity of a PEFT LoRA adapter dir."""

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe and validate a PEFT LoRA adapter dir",
                       description="oral inspect DIR [--base B]: the adapter's modules, ranks, sizes, token count, "
                                   "norms, provenance and every problem found (checked against B if given).")
    p.add_argument("adapter", help="adapter dir (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="base model (embedded name, dir or hub id) to check module shapes against")
    p.add_argument("--token-size", type=int, default=128, help="weight token size D for the token count")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from oral.inspection import describe_adapter

    info = describe_adapter(args.adapter, base_model=args.base, token_size=args.token_size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"adapter   {info['path']}")
        print(f"base      {info['base_model_name_or_path']}" + (f"  (checked against {args.base})" if args.base else ""))
        print(f"spec      {info['num_layers']} layers x {len(info['module_types'])} modules "
              f"({', '.join(info['module_types'])}), rank {'/'.join(map(str, info['ranks']))}, "
              f"rslora {info['use_rslora']}")
        print(f"params    {info['num_params']:,}")
        print(f"tokens    {info['num_tokens']:,} of size {info['token_size']}")
        print(f"  {'module':<40} {'in':>6} {'out':>6} {'r':>3} {'alpha':>6} {'|A|':>9} {'|B|':>9} {'|dW|':>9}")
        fmt = lambda x: f"{x:9.4f}" if x is not None else f"{'-':>9}"  # noqa: E731
        for m in info["modules"]:
            n = m["norms"]
            print(f"  {m['name']:<40} {m['in']:>6} {m['out']:>6} {m['rank']:>3} {m['alpha']:>6g} "
                  f"{fmt(n['norm_A'])} {fmt(n['norm_B'])} {fmt(n['norm_delta'])}")
        if info["provenance"]:
            print(f"provenance {json.dumps(info['provenance'], sort_keys=True)}")
        print("valid     yes" if info["valid"] else f"valid     NO ({len(info['problems'])} problem(s))")
    if not info["valid"]:
        print(f"oral inspect: invalid adapter {info['path']}:", file=sys.stderr)
        for p in info["problems"]:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0
