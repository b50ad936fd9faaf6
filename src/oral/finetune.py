"""LoRA fine-tuning: one run of the zoo, (base version, task, rank, seed) -> its kept checkpoints.

The loop is PEFT LoRA on the target tokens of the task's training examples: step s's batch is a
function of (seed, s) alone (`batch_indices`), its learning rate of s alone (`oral.training.lr_at`),
so a run is reproducible and a stopped one resumes bit for bit. A run writes into a zoo
(`oral.zoo.Zoo`):

    ZOO/runs/<run_id>/step-<NNNNNN>/      a kept checkpoint: a plain PEFT adapter dir, recorded in
                                          the manifest once complete
    ZOO/runs/<run_id>/checkpoints/<N>/    the latest training checkpoint (LoRA + optimizer state,
                                          safetensors + JSON) a stopped run resumes from; removed
                                          when the run is done

    kept = train_lora("smollm2-135m", "movie-sentiment", rank=4, steps=100, out_dir="ZOO")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from oral.evaluate import Evaluator, encode_pair
from oral.io import append_jsonl, atomic_dir
from oral.models import base_id, lineage, load_base, load_tokenizer, weights_fingerprint
from oral.paths import expand_path
from oral.progress import progress_bar
from oral.training import get_task, lr_at, resolve_device, resume, save_checkpoint, set_lr
from oral.zoo import Zoo, clean_run_dir, run_id_for, slug, step_dirname, try_lock

log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between log lines (the progress bar shows every step on a terminal)


class FinetuneError(ValueError):
    """A fine-tuning run that cannot work as asked (bad settings, an empty split, a diverging loss)."""


# -----------------------------------------------------------------------------
# Config


@dataclass
class FinetuneConfig:
    """Hyperparameters of one LoRA fine-tuning run (shared by every run of a grid)."""

    steps: int = 100  # optimizer steps
    keep: int = 10  # checkpoints kept: the last `keep` saves of the run
    save_every: int = 1  # steps between kept checkpoints (RPG keeps every one of the last 50)
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10  # linear warmup, then `schedule`
    schedule: str = "cosine"  # "cosine" (down to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    alpha: float | None = None  # LoRA alpha; None -> 2 * rank (a scale of 2 at every rank)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names
    dropout: float = 0.0  # LoRA dropout (0 keeps the run a pure function of the seed)
    max_length: int = 256  # tokens per example; long prompts are cut from the left
    generation_stop: str = "\n"  # appended to generation targets: the evaluator stops at a newline
    eval_limit: int | None = 200  # validation examples scored for the final checkpoint
    eval_checkpoints: bool = False  # also score every kept checkpoint (costs an eval each)
    eval_base: bool = True  # score the base model too (cached per base and task)
    eval_batch_size: int = 16
    packing: bool = True  # pack a batch's examples into one padding-free row (same loss, fewer FLOPs)
    checkpoint_every: int = 20  # steps between training checkpoints (LoRA + optimizer) a stopped run resumes from; 0: none
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is there, else cpu

    def __post_init__(self) -> None:
        if self.steps < 1 or self.keep < 1 or self.save_every < 1 or self.batch_size < 1:
            raise FinetuneError("steps, keep, save_every and batch_size must all be >= 1")
        if self.checkpoint_every < 0:
            raise FinetuneError(f"checkpoint_every must be >= 0 (0: no training checkpoints), got {self.checkpoint_every}")
        if self.schedule not in ("cosine", "constant"):
            raise FinetuneError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.targets:
            raise FinetuneError("targets is empty: name the modules to adapt, e.g. q_proj,v_proj")

    def save_steps(self) -> list[int]:
        """The steps whose checkpoints are kept: the last `keep` multiples of save_every, ending at steps."""
        steps = [self.steps - i * self.save_every for i in range(self.keep)]
        return sorted(s for s in steps if s >= 1)

    def identity(self) -> dict:
        """The fields that change a run's weights (the eval and device fields do not)."""
        d = dataclasses.asdict(self)
        for k in ("eval_limit", "eval_checkpoints", "eval_base", "eval_batch_size", "packing", "checkpoint_every",
                  "device"):
            d.pop(k)
        return d


    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (1-based)."""
        return lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                     schedule=self.schedule, min_lr_ratio=self.min_lr_ratio)


# -----------------------------------------------------------------------------
# Data: prompt + target, loss on the target tokens only


def encode_example(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + target and the number of target tokens.

    Tokenized exactly as the evaluator scores (oral.evaluate.encode_pair: the prompt with special
    tokens, cut from the left to fit; the target on its own), so the supervised tokens are the
    answer's tokens whatever the tokenizer would merge across the boundary.
    """
    p, t = encode_pair(tok, prompt, target, max_length)
    if not t:
        raise FinetuneError(f"target {target!r} has no tokens: a task example needs a non-empty answer")
    return p + t, len(t)


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, L); loss_mask (B, L) marks target tokens."""
    L = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    loss_mask = torch.zeros((B, L), dtype=torch.bool)
    for i, (ids, n_target) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, len(ids) - n_target : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack(encoded: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """The batch as one padding-free row (1, T): input_ids, position_ids restarting at 0 per example,
    loss_mask on target tokens. No attention_mask: transformers reads the position_ids resets as a
    packed batch and masks attention block-diagonally, so each example sees only itself.
    The loss equals collate's (tested); the padding of a right-padded batch is not computed.
    """
    ids = [t for seq, _ in encoded for t in seq]
    position_ids = [i for seq, _ in encoded for i in range(len(seq))]
    loss_mask = [i >= len(seq) - n for seq, n in encoded for i in range(len(seq))]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "loss_mask": torch.tensor([loss_mask], dtype=torch.bool),
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of step `step` (1-based): epochs of seeded permutations, read in order.

    A function of (n, batch_size, step, seed) alone, so a run is reproducible and any step's
    batch can be recomputed without replaying the others.
    """
    start = (step - 1) * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over target tokens; the LM head runs on the predicting positions only.

    model: a PeftModel (or any causal LM exposing get_decoder / get_output_embeddings).
    batch: from collate (right-padded, attention_mask) or pack (one row, position_ids).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    mask = batch.get("attention_mask")
    if mask is not None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    else:
        position_ids = batch["position_ids"]  # packed: resets mark example boundaries
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, L, D)
    predict = loss_mask[:, 1:]  # (B, L-1): position i predicts token i+1
    h = hidden[:, :-1][predict]  # (M, D), M = target tokens in the batch
    logits = lm.get_output_embeddings()(h).float()  # (M, V)
    labels = ids[:, 1:][predict]  # (M,)
    return torch.nn.functional.cross_entropy(logits, labels)



# -----------------------------------------------------------------------------
# One run


def task_key(given: Any) -> str:
    """What identifies a task in run ids: its name, or the resolved YAML file it is loaded from."""
    if not isinstance(given, (str, Path)):
        return given.name
    given = str(given)
    path = Path(expand_path(given))
    if given.endswith((".yaml", ".yml")) and path.is_file():
        return str(path.resolve())
    return given


class LoadedBase:
    """A loaded base model with what the manifest records about it (computed once per load)."""

    def __init__(self, model: torch.nn.Module, tok, base_id: str):
        self.model, self.tok, self.base_id = model, tok, base_id
        self.lineage = lineage(model.config)
        self.fingerprint = weights_fingerprint(model)
        self.base_evals: dict[tuple[str, int | None], dict] = {}


def as_loaded_base(base: Any, tokenizer=None, device: torch.device | None = None) -> LoadedBase:
    """A LoadedBase from a name / dir / hub id, or from a model already loaded (give its tokenizer
    unless it came from oral.models.load_base)."""
    if isinstance(base, LoadedBase):
        return base
    if isinstance(base, (str, Path)):
        model, tok = load_base(expand_path(str(base)), device=device or "cpu")
        return LoadedBase(model, tokenizer or tok, base_id(expand_path(str(base))))
    bid = getattr(base.config, "oral_base_id", None) or base.config.name_or_path
    return LoadedBase(base, tokenizer or load_tokenizer(bid), bid)


def _evaluate(model, tok, task, cfg: FinetuneConfig) -> dict:
    model.eval()
    with torch.no_grad():
        res = Evaluator(model, tok, batch_size=cfg.eval_batch_size, progress=False).evaluate(
            task, split="validation", limit=cfg.eval_limit
        )
    return {"metric": res["metric"], "value": float(res["value"]), "n": int(res["n"])}


def drop_training_checkpoints(zoo: Zoo, run_id: str) -> None:
    """Remove a done run's training checkpoints (a run killed right after its final record leaves them)."""
    shutil.rmtree(zoo.root / "runs" / run_id / "checkpoints", ignore_errors=True)


def train_run(base: LoadedBase, task, key: str, rank: int, seed: int, cfg: FinetuneConfig, zoo: Zoo,
              device: torch.device, worker: int = 0, position: int = 1) -> tuple[str, list[Path], str]:
    """Train one run (or finish a stopped one from its latest training checkpoint) into `zoo`.

    Returns (run_id, kept checkpoint dirs, outcome): outcome is "trained", "skipped" (finished
    earlier, nothing trained) or "busy" (another process holds the run; nothing kept here).
    """
    run_id = run_id_for(base.base_id, key, rank, seed, cfg)
    run_dir = zoo.root / "runs" / run_id
    save_steps = cfg.save_steps()
    kept = [run_dir / step_dirname(s) for s in save_steps]
    with try_lock(zoo.root / "locks" / f"{run_id}.lock") as locked:
        if not locked:
            log.info("run %s is being trained by another process; skipped", run_id)
            return run_id, [], "busy"
        recorded = {r["step"]: r for r in zoo.all_records() if r["run_id"] == run_id}
        if any(r.get("final") for r in recorded.values()):
            drop_training_checkpoints(zoo, run_id)
            return run_id, kept, "skipped"
        clean_run_dir(zoo, run_id, set(recorded))

        alpha = cfg.alpha if cfg.alpha is not None else 2.0 * rank
        common = {
            "run_id": run_id,
            "base": base.base_id,
            "lineage": base.lineage,
            "base_fingerprint": base.fingerprint,
            "task": task.name,
            "task_key": key,
            "rank": rank,
            "alpha": alpha,
            "targets": list(cfg.targets),
            "seed": seed,
            "train": cfg.identity(),
        }
        examples = task.split("train")
        if not examples:
            raise FinetuneError(f"task {task.name!r} has an empty train split")
        stop = cfg.generation_stop if task.kind == "generation" else ""
        encoded = [encode_example(base.tok, e.prompt, e.target + stop, cfg.max_length) for e in examples]
        pad_id = base.tok.pad_token_id if base.tok.pad_token_id is not None else 0

        base.model.to(device)
        base_val = None
        if cfg.eval_base:
            ekey = (key, cfg.eval_limit)
            if ekey not in base.base_evals:
                base.base_evals[ekey] = _evaluate(base.model, base.tok, task, cfg)
            base_val = base.base_evals[ekey]

        # 1) wrap the base in a fresh LoRA (PEFT's init, seeded), base weights frozen
        torch.manual_seed(seed)
        lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(cfg.targets),
                          lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base.model, lcfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        # 2) resume from the latest training checkpoint, if a stopped attempt left one
        ckpt_root, run_key = run_dir / "checkpoints", {"run_id": run_id}
        start, state, _ = resume(ckpt_root, model, opt, run_key, fix=f"remove {ckpt_root} to train the run again")
        wall_before = state.get("wall_s", 0.0)
        if not state and recorded:
            log.info("run %s: %d checkpoints recorded but no training checkpoint; training again from step 0",
                     run_id, len(recorded))
        t0 = time.time() - wall_before
        try:
            # 3) the loop: one seeded batch per step, loss on target tokens
            bar = progress_bar(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps,
                               desc=f"{slug(base.base_id)}/{task.name}/r{rank}/s{seed}", position=position, leave=False)
            for step in bar:
                model.train()
                torch.manual_seed(seed * 1_000_003 + step)  # LoRA dropout, if any: the same draws on resume
                chosen = [encoded[i] for i in batch_indices(len(encoded), cfg.batch_size, step, seed)]
                batch = pack(chosen) if cfg.packing else collate(chosen, pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                set_lr(opt, cfg.lr_at(step))
                loss = target_loss(model, batch)
                if not torch.isfinite(loss):
                    raise FinetuneError(f"run {run_id}: loss became {loss.item()} at step {step}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % LOG_EVERY == 0 or step == cfg.steps:
                    log.info("%s step %d/%d loss %.4f lr %.2e %.2f s/step", run_id, step, cfg.steps,
                             loss.item(), cfg.lr_at(step), (time.time() - t0) / step)

                # 4) a kept checkpoint: atomic dir first, manifest record second
                if step in save_steps and (step not in recorded or step == cfg.steps):
                    rel = Path("runs") / run_id / step_dirname(step)
                    with atomic_dir(zoo.root / rel, overwrite=True) as tmp:
                        model.save_pretrained(tmp)
                    record = {**common, "step": step, "path": rel.as_posix(), "final": step == cfg.steps,
                              "train_loss": round(loss.item(), 6), "lr": cfg.lr_at(step),
                              "worker": worker, "time": dt.datetime.now(dt.timezone.utc).isoformat()}
                    if cfg.eval_checkpoints or step == cfg.steps:
                        record["val_metric"] = _evaluate(model, base.tok, task, cfg)
                    if step == cfg.steps:
                        record["base_val_metric"] = base_val
                        record["wall_s"] = round(time.time() - t0, 2)
                    append_jsonl(zoo.manifest, record)
                # 5) a training checkpoint to resume from, after the kept one (so that one is recorded)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save_checkpoint(ckpt_root, step, model, opt, run_key, {"wall_s": time.time() - t0})
            bar.close()
            shutil.rmtree(ckpt_root, ignore_errors=True)  # the run is done: its final record is written
        finally:
            # 6) hand the base back clean (LoRA layers removed) for the next run of the grid
            base.model = model.unload()
            base.model.requires_grad_(False)
            base.model.eval()
    return run_id, kept, "trained"


# -----------------------------------------------------------------------------
# Public API


def train_lora(
    base: str | Path | torch.nn.Module,
    task: Any,
    rank: int = 4,
    steps: int = 100,
    *,
    keep: int = 10,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer=None,
    **train_kwargs: Any,
) -> list[Path]:
    """Fine-tune one LoRA on `task` and keep its last `keep` checkpoints in the zoo at `out_dir`.

    base: an embedded name, a local HF dir or hub id (loaded with oral.models.load_base), or an
      already loaded model (give `tokenizer` unless the model came from load_base).
    task: a task name, a task YAML file, or an oral.tasks.Task.
    train_kwargs: any other FinetuneConfig field (lr, batch_size, targets, save_every, ...).
    Returns the kept checkpoint dirs (plain PEFT adapter dirs), oldest first; the last one is
    the final checkpoint. A run already done in that zoo is not trained again.
    """
    cfg = FinetuneConfig(steps=steps, keep=keep, **train_kwargs)
    device = resolve_device(cfg.device)
    loaded = as_loaded_base(base, tokenizer, device)
    _, kept, _ = train_run(loaded, get_task(task), task_key(task), rank, seed, cfg, Zoo(out_dir), device, position=0)
    return kept
