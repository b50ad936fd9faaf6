"""A warm generation (the generator and base loaded, as `oral serve` holds them) with and without the
cached layout lookup (`Generator.layout_cache`), alternating in one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_warm_generate.py [--steps 2] [--rounds 20] [--generator GEN]

Each call is what `oral bench time-to-adapter` times: `Generator.generate` (conditions, prototypes,
sampling, decoding, validation) and the PEFT dir written. "uncached" empties the layout cache before
the call, as every call did before the cache existed. Prints the median and minimum wall seconds of
each and, with --json, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from oral.bench_time import _generated
from oral.generate import Generator
from oral.models import load_base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", default=None, help="a generator dir (default: the bundled one)")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--prompt", default="Figure out whether the reviewer enjoyed the film.")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    gen = Generator.from_pretrained(a.generator)
    model, _ = load_base(a.base)
    out = Path(tempfile.mkdtemp(prefix="oral-bench-"))
    for _ in range(3):  # warm-up: caches, allocator
        _generated(gen, a.base, model, a.prompt, a.steps, "ddim", 0, out / "warm")
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(a.rounds):
        for mode in times:
            if mode == "uncached":
                gen.layout_cache.clear()
            times[mode].append(_generated(gen, a.base, model, a.prompt, a.steps, "ddim", 0, out / mode)[0])
    result = {"steps": a.steps, "rounds": a.rounds,
              **{f"{mode}_median_s": round(statistics.median(v), 4) for mode, v in times.items()},
              **{f"{mode}_min_s": round(min(v), 4) for mode, v in times.items()}}
    for mode in times:
        print(f"{mode:>9}: median {result[mode + '_median_s']:.3f} s, min {result[mode + '_min_s']:.3f} s")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
