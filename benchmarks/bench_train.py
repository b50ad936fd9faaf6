"""Training throughput of `oral train`: adapters/s and weight tokens/s, and where a step's time goes.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --config configs/generator-family.yaml --steps 30 --json

Runs the real training loop (`oral.train.train_generator`) on synthetic prepared data of a real
layout: `--adapters` random LoRA states of the spec (default SmolLM2-135M r=4 on q,v), tokenized by
a fitted tokenizer, with random conditions of the config's sizes. The cost of a step does not
depend on the values, so no zoo, base model or text encoder is needed. The loop's phases are named
for torch.profiler (train.batch, train.forward, train.backward, train.optimizer, train.ema); the
first `--warmup` steps are left out of the timing, and so are a run's fixed costs (loading, the
export at its end: a 1-step run's CPU time is subtracted). Prints (or one JSON object): CPU seconds
per step, adapters and tokens per CPU-second, the share of each phase and of the top operators in
the steps' wall time (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from oral.bench import RandomLoraState, bench_spec
from oral.config import load_config
from oral.train import GeneratorTrainConfig, train_generator
from oral.zoo_data import DATA_DIR, Group, ZooData, save_zoo_data
from oral.tokens import WeightTokenizer

PHASES = ("train.batch", "train.forward", "train.backward", "train.optimizer", "train.ema")


def synthetic_data(cfg: GeneratorTrainConfig, spec, adapters: int, tasks: int = 7, bases: int = 3,
                   text_dim: int = 384) -> ZooData:
    """Prepared training data of `adapters` random LoRA states of `spec`, spread over tasks and bases."""
    token_size = cfg.generator_config(0, 0).token_size
    states = [RandomLoraState(spec, seed=i) for i in range(adapters)]
    tok = WeightTokenizer(spec, token_size).fit(iter(states), center=cfg.center)
    tokens = torch.empty(adapters, tok.num_tokens, token_size)
    for i, state in enumerate(states):
        tok.encode(state, out=tokens[i])
    model_dim = 384 * cfg.conditions.model_text + cfg.conditions.fingerprint_dim
    g = torch.Generator().manual_seed(0)
    group = Group(tokenizer=tok, tokens=tokens, base_index=torch.arange(adapters) % bases,
                  task_index=torch.arange(adapters) % tasks,
                  c_model={b: torch.randn(model_dim, generator=g) for b in range(bases)})
    names = [f"task-{t}" for t in range(tasks)]
    descriptions = [[f"description {d} of {n}" for d in range(4)] for n in names]
    return ZooData([group], [{"id": f"base-{b}", "metadata": "", "weights_sha256": []} for b in range(bases)], names,
                   descriptions, [torch.randn(4, text_dim, generator=g) for _ in names], [])


def run(config: str | None, overrides: list[str], spec_name: str, targets: str, rank: int, adapters: int,
        steps: int, warmup: int, top: int) -> dict:
    steps += 1  # one more: the 1-step run that measures the fixed costs
    cfg = load_config(GeneratorTrainConfig, config, [*overrides, f"steps={warmup + steps}", "device=cpu",
                                                      f"save_every={10**9}", "tasks=[]", "versions=[]", "ranks=[]"])
    spec = bench_spec(spec_name, targets.split(",") if targets != "all-linear" else targets, rank)
    data = synthetic_data(cfg, spec, adapters)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gen"
        save_zoo_data(data, cfg, out / DATA_DIR)  # read back by train_generator as an earlier run's prepared data
        train_generator([], out, cfg, stop_at=warmup)  # model set-up, first steps (allocations, lazy inits)
        # a run's fixed costs (data, network, checkpoint read, the export at its end) are the same for 1 step
        # and for 1 + steps: the difference of their CPU times is the steps' own
        fixed = time.process_time()
        train_generator([], out, cfg, stop_at=warmup + 1)
        fixed = time.process_time() - fixed
        cpu0, t0 = time.process_time(), time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_generator([], out, cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    steps -= 1  # the steps of the profiled run
    events = prof.key_averages()
    phase = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    phases_total = sum(phase.values())
    ops = sorted((e for e in events if not e.key.startswith("train.") and not e.key.startswith("ProfilerStep")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    N = data.groups[0].tokens.shape[1]
    step_s = (cpu - fixed) / (steps - 1)  # CPU seconds of one step: the profiled run trained steps - 1 more
    return {
        "config": config, "spec": spec_name, "targets": targets, "rank": rank, "preset": cfg.preset,
        "batch_size": cfg.batch_size, "tokens_per_adapter": N, "token_size": data.groups[0].tokens.shape[2],
        "tokens_per_step": cfg.batch_size * (N if cfg.tokens_per_sample <= 0 else min(N, cfg.tokens_per_sample)),
        "steps": steps, "threads": torch.get_num_threads(),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "fixed_cpu_s": round(fixed, 2),
        "step_cpu_s": round(step_s, 4), "step_wall_s": round(phases_total / steps, 4),
        "adapters_per_s": round(cfg.batch_size / step_s, 2),
        "tokens_per_s": round(cfg.batch_size * N / step_s, 1),
        "phases_wall_share": {k.removeprefix("train."): round(phase.get(k, 0.0) / phases_total, 4) for k in PHASES},
        "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / 1e6 / phases_total, 4),
                     "calls_per_step": round(e.count / steps, 1)} for e in ops],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/generator-family.yaml", help="generator training config (YAML)")
    p.add_argument("--spec", default="smollm2-135m", help="layout: a shipped model config or an embedded base")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--adapters", type=int, default=64, help="synthetic adapters in the training data")
    p.add_argument("--steps", type=int, default=30, help="timed steps (at least 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--top", type=int, default=12, help="operators listed")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value settings over the config")
    a = p.parse_args()
    r = run(a.config, a.overrides, a.spec, a.targets, a.rank, a.adapters, a.steps, a.warmup, a.top)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['spec']} r={r['rank']} {r['targets']}, preset {r['preset']}, batch {r['batch_size']} x "
          f"{r['tokens_per_adapter']} tokens of {r['token_size']}, {r['threads']} thread(s)")
    print(f"step: {r['step_cpu_s']:.3f} CPU-s, {r['adapters_per_s']} adapters/CPU-s, {r['tokens_per_s']} tokens/CPU-s "
          f"({r['steps']} steps; each run's fixed costs, {r['fixed_cpu_s']} CPU-s, left out)")
    print("share of the steps' wall time (profiler):")
    for k, v in r["phases_wall_share"].items():
        print(f"  {k:10s} {100 * v:5.1f}%")
    for o in r["top_ops"]:
        print(f"  {o['op'][:48]:48s} {100 * o['share']:5.1f}%  {o['calls_per_step']:7.1f} calls/step")


if __name__ == "__main__":
    main()
