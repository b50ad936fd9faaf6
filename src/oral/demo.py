"""`oral demo`: say what the model should do, get an adapter, see it work on that task.

    oral demo [--prompt P] [--task T] [--limit N]       # the bundled generator: about a minute
    oral demo --from-scratch                            # quick zoo -> generator -> the same

With the bundled generator (`oral.generate.BUNDLED`): 1) the generator and the base load; 2) the
task is the one asked for, or the one whose training description is nearest to the prompt (the
prompt defaults to the task's first held-out description, which the generator never saw);
3) one adapter is generated and written as a PEFT dir; 4) on the task's test split, the base,
the base with the prompt written before each example (the description-in-the-prompt baseline)
and the base with the adapter are scored on the same examples.

`--from-scratch` builds the generator itself first, with the recipe of `configs/zoo-quick.yaml`
and `configs/generator-quick.yaml` (`scratch_configs`), the bundled generator's own
(scripts/build_generator.sh): four classification tasks on smollm2-135m, 120-step LoRA runs whose
last 12 checkpoints are kept, trained by one process per core (up to one per run; two single-threaded
runs at once on two cores beat one run on two threads), then the generator's 1000 steps. Every stage is cached
($ORAL_HOME/zoos/quick, $ORAL_HOME/generators/demo) and resumes where it stopped. Scores are cached by
(adapter bytes, task, split, limit), so a rerun only repeats what changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from oral.evaluate import Evaluator, ScoreCache
from oral.finetune import FinetuneConfig
from oral.generate import WEIGHTS_NAME, Generator, generate_adapters
from oral.grid import GridBlock, ZooConfig, run_grid
from oral.lora import PROVENANCE_NAME, adapter_digest, load_adapter
from oral.models import load_base
from oral.paths import oral_home
from oral.tasks import get_task
from oral.train import GeneratorTrainConfig, train_generator
from oral.training import resolve_device
from oral.zoo import Zoo

log = logging.getLogger(__name__)

DEFAULT_TASK = "movie-sentiment"
SCRATCH_TASKS = ["movie-sentiment", "sms-spam", "trec-question", "rotten-tomatoes"]


def demo_home() -> Path:
    return oral_home() / "demo"


# -----------------------------------------------------------------------------
# The from-scratch recipe


def scratch_configs(base: str = "smollm2-135m") -> tuple[ZooConfig, GeneratorTrainConfig]:
    """The zoo and generator configs of `--from-scratch`: configs/zoo-quick.yaml and
    configs/generator-quick.yaml (a test keeps them equal)."""
    zoo = ZooConfig(
        out=str(oral_home() / "zoos" / "quick"),  # the zoo of configs/zoo-quick.yaml: built once, shared
        grid=[GridBlock(bases=[base], tasks=list(SCRATCH_TASKS), ranks=[4], seeds=[0])],
        train=FinetuneConfig(steps=120, keep=12, save_every=2, batch_size=8, lr=2e-3, warmup_steps=10,
                             schedule="cosine", min_lr_ratio=0.1, targets=["q_proj", "v_proj"], eval_limit=150),
    )
    gen = GeneratorTrainConfig(preset="smol", model={"max_tokens": 512}, steps=1000, batch_size=4,
                               lr=3e-3, warmup_steps=50, ema_decay=0.999, save_every=250, log_every=20)
    return zoo, gen


def _zoo_worker(cfg: ZooConfig, rank: int, world_size: int, threads: int) -> None:
    """One of `build_from_scratch`'s zoo processes: its share of the runs, on `threads` threads."""
    torch.set_num_threads(threads)
    run_grid(cfg, rank=rank, world_size=world_size)


def build_zoo(cfg: ZooConfig, workers: int) -> dict:
    """Train the grid's missing runs with `workers` processes sharing the cores (each takes every
    workers-th run), then check in this process that every run is done (and train what a failed
    worker left); the counts of that check."""
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_zoo_worker, args=(cfg, i, workers, threads), daemon=True) for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            log.warning("zoo worker(s) %s stopped with an error; their runs are trained here", failed)
    return run_grid(cfg, rank=0, world_size=1)


def build_from_scratch(base: str = "smollm2-135m", workers: int | None = None) -> Path:
    """Train the demo's zoo and generator (or finish them from their checkpoints); the generator dir.
    workers: zoo processes (default: one per core, at most one per run; 1 on a GPU)."""
    zoo_cfg, gen_cfg = scratch_configs(base)
    if workers is None:
        workers = 1 if resolve_device(zoo_cfg.train.device).type != "cpu" else min(os.cpu_count() or 1, len(SCRATCH_TASKS))
    t0 = time.time()
    print(f"[from scratch 1/2] LoRA zoo: {len(SCRATCH_TASKS)} tasks x 120 steps on {base}, {workers} process(es) "
          f"-> {zoo_cfg.out}", flush=True)
    before = len(Zoo(zoo_cfg.out).done_runs()) if Path(zoo_cfg.out).is_dir() else 0
    counts = build_zoo(zoo_cfg, workers)
    trained = len(Zoo(zoo_cfg.out).done_runs()) - before
    print(f"  {trained} runs trained, {counts['runs'] - trained} already done ({time.time() - t0:.0f} s)", flush=True)
    t1 = time.time()
    out = oral_home() / "generators" / "demo"
    print(f"[from scratch 2/2] generator: {gen_cfg.steps} steps -> {out}", flush=True)
    train_generator([zoo_cfg.out], out, gen_cfg)
    print(f"  done ({time.time() - t1:.0f} s)", flush=True)
    return out


# -----------------------------------------------------------------------------
# Scores, cached by what they depend on


# -----------------------------------------------------------------------------
# The demo


def _made_before(out: Path, gen: Generator, base: str, prompt: str, seed: int, steps: int | None) -> bool:
    """Whether `out` holds the adapter this request would make: its provenance names the same generator
    (path, step, zoos), base, prompt, seed and sampling, and it is newer than the generator's weights.
    Reusing it keeps a rerun's scores cached: the same request on another thread count gives an adapter
    that differs in the last float bits, so its digest, the score cache's key, would differ too."""
    made = out / PROVENANCE_NAME
    if not (made.is_file() and (out / "adapter_model.safetensors").is_file()):
        return False
    try:
        had = json.loads(made.read_text())
    except (OSError, ValueError):
        return False
    s, g = gen.sampling(steps, None)
    want = {k: v for k, v in gen.provenance(base, prompt, seed, s, g, "ddim", 0.0).items() if k != "created"}
    weights = gen.path / WEIGHTS_NAME
    newer = not weights.is_file() or made.stat().st_mtime >= weights.stat().st_mtime
    return newer and all(had.get(k) == v for k, v in want.items())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "adapter"


def run_demo(prompt: str | None = None, task: str | None = None, generator: str | Path | None = None,
             base: str = "smollm2-135m", seed: int = 0, limit: int | None = 200, steps: int | None = None,
             out: str | Path | None = None, from_scratch: bool = False) -> dict[str, Any]:
    """Generate an adapter from `prompt` and score base, prompt-in-context and adapter on the task.

    Returns {"prompt", "task", "nearest", "familiar", "adapter", "rows": [{"method", "metric",
    "value", "n"}], "seconds": {stage: s}}.
    """
    seconds: dict[str, float] = {}
    t = time.time()
    if from_scratch:
        generator = build_from_scratch(base)
        seconds["from scratch"] = time.time() - t
        t = time.time()
    print("[1/4] loading the generator and the base model", flush=True)
    gen = Generator.from_pretrained(generator)
    model, tok = load_base(base)
    seconds["load"] = time.time() - t

    # which task to score on: the one asked for, else the nearest trained one
    if prompt is None:
        task = task or DEFAULT_TASK
        prompt = get_task(task).heldout_descriptions[0]
    known = gen.familiarity(prompt)
    task = task or known["nearest"][0]["task"]
    the_task = get_task(task)

    t = time.time()
    out = Path(out) if out is not None else demo_home() / "adapters" / f"{_slug(prompt)}-s{seed}"
    if _made_before(out, gen, base, prompt, seed, steps):
        print(f"[2/4] the adapter for {base} from {prompt!r} was made before by this generator: {out}", flush=True)
        adapter = out
    else:
        print(f"[2/4] generating an adapter for {base} from {prompt!r}", flush=True)
        (adapter,) = generate_adapters(gen, base, prompt, out, seed=seed, steps=steps, overwrite=True)
    seconds["generate"] = time.time() - t

    t = time.time()
    cache = ScoreCache(demo_home() / "scores.json")
    ev = Evaluator(model, tok, progress=True)
    digest = adapter_digest(load_adapter(adapter)[1])
    rows = []
    methods = [("base", None, the_task), ("base + prompt in context", None, the_task.prefixed(prompt)),
               ("base + generated adapter", adapter, the_task)]
    for i, (method, adapter_dir, scored) in enumerate(methods):
        print(f"[3/4] scoring {method} on {task} ({i + 1}/{len(methods)})", flush=True)
        key = {"base": base, "adapter": digest if adapter_dir else None, "task": task, "split": "test",
               "limit": limit, "instruction": prompt if scored is not the_task else None}

        def measure(adapter_dir=adapter_dir, scored=scored):
            ev.set_adapter(adapter_dir)
            return ev.evaluate(scored, split="test", limit=limit)

        res = cache.get(key, measure)
        rows.append({"method": method, "metric": res["metric"], "value": res["value"], "n": res["n"]})
    seconds["score"] = time.time() - t
    print("[4/4] done", flush=True)
    return {"prompt": prompt, "task": task, "base": base, "nearest": known["nearest"], "familiar": known["familiar"],
            "adapter": str(adapter), "generator": str(gen.path), "rows": rows,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def format_demo(result: dict[str, Any]) -> str:
    """The demo's result as a small table, with where the adapter is and how to load it."""
    near = result["nearest"][0]
    lines = [
        f"prompt   {result['prompt']!r}",
        f"nearest  {near['description']!r} ({near['task']}, similarity {near['similarity']:.2f})"
        + ("" if result["familiar"] else "  <- far from every trained task: expect the nearest task's adapter"),
        f"task     {result['task']} (test split, {result['rows'][0]['n']} examples, {result['rows'][0]['metric']})",
        "",
        f"  {'':<28} {result['rows'][0]['metric']:>9}",
    ]
    lines += [f"  {r['method']:<28} {r['value']:>9.3f}" for r in result["rows"]]
    lines += [
        "",
        f"adapter  {result['adapter']}  (a PEFT LoRA dir)",
        f"  oral eval --base {result['base']} --adapter {result['adapter']} --task {result['task']}",
        "  from peft import PeftModel; model = PeftModel.from_pretrained(base_model, ADAPTER_DIR)",
        "time     " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()),
    ]
    return "\n".join(lines)
