"""Time to an adapter: a generated one against LoRA fine-tuning to the same accuracy, in one run.

    result = time_to_adapter("movie-sentiment")     # oral bench time-to-adapter --task movie-sentiment --json

On one machine and one loaded base: the generator (loaded once and warmed up, as `oral serve` holds
it) makes the task's adapter from a held-out description at its default sampling steps; that wall
time (sampling, decoding, validation, the PEFT dir written) is `generate_s`. The same adapter is also
made at every DDIM step count of `sampling_steps` and with DDPM at 1000 steps, each scored. Then a
LoRA is fine-tuned on the task with the zoo's loop (`oral.finetune.train_lora`, the quick zoo's
recipe), a checkpoint kept every `every` steps; each checkpoint's wall time since the run started
(data encoding and the PEFT wrap included, scoring excluded) comes from its manifest record.
`finetune_s` is the time of the first checkpoint that scores at least the generated adapter's
accuracy minus `tolerance`; `ratio` = finetune_s / generate_s. A run that never gets there reports
its whole time, `reached: false`, and the ratio as a lower bound.

Accuracy is on `split` (the test split by default, the same first `limit` examples for every
adapter); the sampling-step curve is also scored on validation, where `chosen_steps` (the fewest
steps within `tolerance` of the best) is picked, next to the generator's recorded default.
"""

from __future__ import annotations

import datetime as dt
import io
import tempfile
import time
from pathlib import Path

import torch

from oral.evaluate import Evaluator
from oral.finetune import LoadedBase, train_lora
from oral.generate import Generator
from oral.io import read_jsonl
from oral.lora import load_adapter, save_adapter
from oral.models import load_base
from oral.progress import progress_bar
from oral.tasks import get_task

SAMPLING_STEPS = (2, 5, 10, 25, 60)
DDPM_STEPS = 1000
# The quick zoo's recipe (configs/zoo-quick.yaml), which the bundled generator was trained on.
FINETUNE = {"steps": 120, "batch_size": 8, "lr": 2e-3, "warmup_steps": 10, "schedule": "cosine",
            "min_lr_ratio": 0.1, "targets": ["q_proj", "v_proj"]}


class TimeToAdapterError(ValueError):
    """A time-to-adapter benchmark that cannot run as asked."""


def _generated(gen: Generator, base: str, model, prompt: str, steps: int, sampler: str, seed: int,
               out: Path) -> tuple[float, tuple]:
    """One adapter made as `oral generate` makes it (the PEFT dir written); (wall s, (spec, state))."""
    t0 = time.perf_counter()
    spec, state = gen.generate(base, prompt, seed=seed, steps=steps, sampler=sampler, base_model=model)
    provenance = {**gen.provenance(base, prompt, seed, steps, gen.default_guidance, sampler, 0.0),
                  "source": "oral bench time-to-adapter"}
    save_adapter(out, spec, state, provenance=provenance, overwrite=True)
    return time.perf_counter() - t0, (spec, state)


def time_to_adapter(task: str = "movie-sentiment", generator: str | Path | None = None, base: str | None = None,
                    split: str = "test", limit: int = 200, val_limit: int = 100,
                    sampling_steps: tuple[int, ...] = SAMPLING_STEPS, ddpm_steps: int | None = DDPM_STEPS,
                    finetune_steps: int = FINETUNE["steps"], every: int = 10, rank: int = 4,
                    tolerance: float = 0.01, seed: int = 0, progress: bool = True) -> dict:
    """Measure a generated adapter's wall time and accuracy against fine-tuning's (see the module doc)."""
    if every < 1 or finetune_steps < every:
        raise TimeToAdapterError(f"every must be in 1..finetune_steps, got every={every}, finetune_steps={finetune_steps}")
    the_task = get_task(task)
    gen = Generator.from_pretrained(generator)
    if the_task.name not in gen.config["conditions"]["tasks"]:
        raise TimeToAdapterError(f"the generator was not trained on {the_task.name!r} (it knows "
                                 f"{', '.join(gen.config['conditions']['tasks'])}); pick one of those with --task")
    base = base or gen.config["conditions"]["bases"][0]["id"]
    prompt = (the_task.heldout_descriptions or the_task.descriptions)[0]
    model, tok = load_base(base)
    default_steps = gen.default_steps

    def score(spec_state, which: str, n: int) -> float:
        ev.set_adapter(spec_state[1], spec=spec_state[0])
        return ev.evaluate(the_task, split=which, limit=n)["value"]

    with tempfile.TemporaryDirectory(prefix="oral-time-") as tmp:
        tmp = Path(tmp)
        # fine-tuning first, on the bare base (the evaluator then wraps the same model in its LoRA layers)
        zoo, loaded = tmp / "zoo", LoadedBase(model, tok, base)  # the base's fingerprint taken before the clock starts
        start = dt.datetime.now(dt.timezone.utc)
        train_lora(loaded, the_task, rank=rank, out_dir=zoo, seed=seed,
                   **{**FINETUNE, "steps": finetune_steps}, keep=finetune_steps // every, save_every=every,
                   eval_base=False, eval_limit=1, checkpoint_every=0)
        ev = Evaluator(model, tok, progress=False)
        _generated(gen, base, model, prompt, default_steps, "ddim", seed, tmp / "warm")  # caches, as a server holds them
        generate_s, made = _generated(gen, base, model, prompt, default_steps, "ddim", seed, tmp / "adapter")
        settings = [(s, "ddim") for s in sorted(set(sampling_steps) | {default_steps})]
        settings += [(ddpm_steps, "ddpm")] if ddpm_steps else []
        sampling = []
        for steps, sampler in progress_bar(settings, desc="sampling steps", disable=not progress):
            wall, adapter = (generate_s, made) if (steps, sampler) == (default_steps, "ddim") else \
                _generated(gen, base, model, prompt, steps, sampler, seed, tmp / f"{sampler}{steps}")
            sampling.append({"steps": steps, "sampler": sampler, "wall_s": round(wall, 3),
                             "accuracy": score(adapter, split, limit), "val_accuracy": score(adapter, "validation", val_limit)})
        accuracy = next(r["accuracy"] for r in sampling if (r["steps"], r["sampler"]) == (default_steps, "ddim"))
        ddim = [r for r in sampling if r["sampler"] == "ddim"]
        best_val = max(r["val_accuracy"] for r in ddim)
        chosen = min(r["steps"] for r in ddim if r["val_accuracy"] >= best_val - tolerance)

        finetune = []
        records = sorted(read_jsonl(zoo / "manifest.jsonl"), key=lambda r: r["step"])
        for r in progress_bar(records, desc="fine-tuned checkpoints", disable=not progress):
            seconds = (dt.datetime.fromisoformat(r["time"]) - start).total_seconds()
            finetune.append({"step": r["step"], "wall_s": round(seconds, 3),
                             "accuracy": score(load_adapter(zoo / r["path"]), split, limit)})
    ev.set_adapter(None)
    base_accuracy = ev.evaluate(the_task, split=split, limit=limit)["value"]
    hit = next((r for r in finetune if r["accuracy"] >= accuracy - tolerance), None)
    finetune_s = hit["wall_s"] if hit else finetune[-1]["wall_s"]
    generate_s = max(round(generate_s, 3), 0.001)  # the ratio is the one of the two times as reported
    return {
        "task": the_task.name, "base": base, "prompt": prompt, "generator": str(gen.path), "split": split,
        "limit": limit, "base_accuracy": base_accuracy,
        "steps": default_steps, "accuracy": accuracy, "generate_s": generate_s,
        "finetune_s": finetune_s, "finetune_step": hit["step"] if hit else None, "reached": hit is not None,
        "finetune_best": max(r["accuracy"] for r in finetune),
        "ratio": round(finetune_s / generate_s, 1), "tolerance": tolerance,
        "chosen_steps": chosen, "sampling": sampling, "finetune": finetune,
        "finetune_recipe": {**FINETUNE, "steps": finetune_steps, "rank": rank, "every": every},
        "threads": torch.get_num_threads(),
    }


def plot_time_to_adapter(result: dict) -> bytes:
    """Accuracy against the wall time to make the adapter: generated (one point per sampling setting,
    labelled with its steps) and fine-tuning (one point per kept checkpoint) on one log-time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ft = result["finetune"]
    ax.plot([r["wall_s"] for r in ft], [r["accuracy"] for r in ft], "o-", color="tab:orange",
            label="LoRA fine-tuning (checkpoints, steps labelled)")
    for r in ft[1::2]:
        ax.annotate(str(r["step"]), (r["wall_s"], r["accuracy"]), fontsize=7, textcoords="offset points", xytext=(0, 5))
    for sampler, marker in (("ddim", "s"), ("ddpm", "^")):
        rows = [r for r in result["sampling"] if r["sampler"] == sampler]
        if rows:
            ax.plot([r["wall_s"] for r in rows], [r["accuracy"] for r in rows], marker, color="tab:blue",
                    linestyle="-" if sampler == "ddim" else "none", label=f"generated, {sampler.upper()} (steps labelled)")
            for r in rows:
                ax.annotate(str(r["steps"]), (r["wall_s"], r["accuracy"]), fontsize=7, textcoords="offset points",
                            xytext=(0, -11))
    ax.axhline(result["base_accuracy"], color="gray", linestyle=":", label="base, no adapter")
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds to the adapter (log)")
    ax.set_ylabel(f"{result['split']} accuracy ({result['limit']} examples)")
    ax.set_title(f"{result['task']} on {result['base']}: {result['ratio']:g}x faster to "
                 f"{result['accuracy']:.3f}" + ("" if result["reached"] else " (fine-tuning never got there)"), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
