"""The Mamba stack's training pass: transformers' MambaModel (mambapy's scan, padded to a power of two)
against `oral.generator.mamba_forward` (the same function, scanned in power-of-two blocks).

    OMP_NUM_THREADS=1 python benchmarks/bench_scan.py [--preset smol] [--tokens 300] [--batch 8] [--rounds 4]

Both run forward + backward on the same inputs, alternating in one process (so a shared machine's
load falls on both alike); prints CPU-seconds per pass of each, their ratio, and the largest
difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from oral.generator import GeneratorNet, generator_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smol")
    p.add_argument("--tokens", type=int, default=300, help="weight tokens per adapter (SmolLM2 r=4 q,v: 300)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = generator_config(a.preset, model_cond_dim=530, text_cond_dim=384, max_tokens=a.tokens)
    net = GeneratorNet(cfg)
    positions = torch.randint(0, 30, (a.batch, a.tokens, 4))
    c = torch.randn(a.batch, cfg.d_model)
    x = lambda: net._mamba_input(positions, c)  # noqa: E731
    passes = {"transformers": lambda: net.mamba(inputs_embeds=x()).last_hidden_state,
              "oral": lambda: net.prototypes(positions, c)}
    diff = float((passes["transformers"]() - passes["oral"]()).abs().max())
    cpu = {k: 0.0 for k in passes}
    for k, f in passes.items():  # warm-up
        f().pow(2).mean().backward()
    for _ in range(a.rounds):
        for k, f in passes.items():
            t = time.process_time()
            f().pow(2).mean().backward()
            cpu[k] += time.process_time() - t
    per = {k: round(v / a.rounds, 4) for k, v in cpu.items()}
    print(json.dumps({"preset": a.preset, "tokens": a.tokens, "batch": a.batch, "threads": torch.get_num_threads(),
                      "cpu_s_per_pass": per, "speedup": round(per["transformers"] / per["oral"], 2),
                      "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
