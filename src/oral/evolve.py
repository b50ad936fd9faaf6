"""Evolve a base model by continued pretraining: base -> t1 -> t2 ... (all weights, causal-LM loss).

`evolve` runs one link: AdamW on a corpus's training documents, seeded, resumable from a training
checkpoint, written atomically as a plain HF model dir whose config records `oral_lineage`, a list
of {parent, corpus, steps, lr, seed, ...}, oldest first. `evolve_chain` builds a family t0 (the
base) -> t1 -> ... -> tK, one corpus per link, and `chain_report` measures how far each version
drifted: perplexity on every corpus's held-out documents and zero-shot accuracy on tasks.

    oral evolve --base smollm2-135m --corpus kjv --steps 40 --out runs/kjv-40
    oral evolve --chain --config configs/evolve-chain.yaml
"""

import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from oral.corpora import corpus_id, get_corpus, split_documents
from oral.evaluate import Evaluator
from oral.io import atomic_dir, atomic_write_json, read_json, remove_debris
from oral.models import EVOLVE_RUN_INFO, base_id, lineage, load_base
from oral.paths import oral_home
from oral.progress import progress_bar
from oral.tasks import get_task
from oral.training import latest_checkpoint, load_checkpoint, lr_at, save_checkpoint, set_lr

log = logging.getLogger(__name__)

RUN_INFO = EVOLVE_RUN_INFO  # beside each evolved model: its lineage entry, losses and timing


class EvolveError(ValueError):
    """An evolution run that cannot start or resume."""


# -----------------------------------------------------------------------------
# Configs


@dataclass
class EvolveConfig:
    """One continued-pretraining link: parent -> child."""

    base: str = "smollm2-135m"  # embedded name, HF model dir or hub id (the parent)
    corpus: str = "kjv"  # embedded corpus name (oral.corpora.list_corpora()) or a local text file
    steps: int = 40  # optimizer steps
    lr: float = 1e-4  # peak learning rate (AdamW)
    seed: int = 0  # document order and any dropout
    batch_size: int = 8  # sequences per step
    seq_len: int = 128  # tokens per sequence
    warmup_steps: int = 5  # linear warmup, then `schedule`
    schedule: str = "constant"  # "constant" or "cosine" (decays to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1  # cosine: the last step's lr as a share of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    max_corpus_tokens: int = 2_000_000  # stream cap: past it (or the corpus end) batches wrap around
    save_every: int = 50  # training checkpoint interval in steps; 0 disables
    device: str = "cpu"


@dataclass
class ChainConfig:
    """A family t0 (the base) -> t1 -> ... -> tK, link k trained on corpora[k-1]."""

    base: str = "smollm2-135m"  # t0
    corpora: list[str] = field(default_factory=lambda: ["kjv", "austen", "fortunes", "python-stdlib"])
    steps: int | list[int] = 40  # per link: one value for all, or one per corpus
    lr: float | list[float] = 1e-4  # per link, likewise
    seed: int = 0
    batch_size: int = 8
    seq_len: int = 128
    warmup_steps: int = 5
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50
    device: str = "cpu"
    root: str | None = None  # where versions are cached; default $ORAL_HOME/evolved
    # Report
    eval_corpora: list[str] | None = None  # perplexity corpora; default: `corpora`
    ppl_tokens: int = 16384  # held-out tokens per corpus for perplexity
    tasks: list[str] = field(default_factory=list)  # zero-shot tasks (oral.tasks) per version
    task_split: str = "test"
    task_limit: int | None = 200

    def links(self) -> list[EvolveConfig]:
        """The per-link EvolveConfigs; link k's base is filled in by `evolve_chain`."""
        n = len(self.corpora)
        steps = _per_link(self.steps, n, "steps")
        lrs = _per_link(self.lr, n, "lr")
        shared = {k: getattr(self, k) for k in (
            "seed", "batch_size", "seq_len", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay",
            "grad_clip", "save_every", "device")}
        return [EvolveConfig(base="", corpus=c, steps=int(s), lr=float(lr), **shared)
                for c, s, lr in zip(self.corpora, steps, lrs)]


def _per_link(value, n: int, key: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise EvolveError(f"{key} has {len(values)} values for {n} corpora: give one value or one per corpus")
    return values


def _check(cfg: EvolveConfig) -> None:
    for key in ("steps", "batch_size", "seq_len"):
        if getattr(cfg, key) < 1:
            raise EvolveError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not cfg.lr > 0:
        raise EvolveError(f"lr must be > 0, got {cfg.lr}")
    if cfg.schedule not in ("constant", "cosine"):
        raise EvolveError(f"schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")


# -----------------------------------------------------------------------------
# Data and schedule


def token_stream(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, seed: int = 0, max_tokens: int | None = None
) -> torch.Tensor:
    """Documents shuffled by `seed`, tokenized, joined by EOS into one 1-D LongTensor."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in range(0, len(order), 256):
        batch = [docs[j] for j in order[i : i + 256]]
        for seq in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return torch.tensor(ids, dtype=torch.long)


def get_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Step `step`'s batch: consecutive seq_len blocks of the stream, wrapping around (epochs)."""
    n_blocks = len(stream) // seq_len
    blocks = stream[: n_blocks * seq_len].view(n_blocks, seq_len)  # (n_blocks, T)
    idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n_blocks
    return blocks[idx]  # (B, T)


def get_lr(step: int, cfg: EvolveConfig) -> float:
    """Learning rate of step `step` (1-based): oral.training.lr_at with the link's settings."""
    return lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule=cfg.schedule,
                 min_lr_ratio=cfg.min_lr_ratio)


# -----------------------------------------------------------------------------
# Lineage, cache paths and checkpoints


def _run_key(cfg: EvolveConfig) -> dict:
    """Everything that determines the result (not save_every or device)."""
    d = dataclasses.asdict(cfg)
    for k in ("save_every", "device"):
        d.pop(k)
    d["base"] = base_id(cfg.base)
    d["corpus"] = corpus_id(cfg.corpus)
    return d


def lineage_entry(cfg: EvolveConfig) -> dict:
    key = _run_key(cfg)
    return {"parent": key.pop("base"), "corpus": key.pop("corpus"), **key}


def default_out(cfg: EvolveConfig, root: str | Path | None = None) -> Path:
    """$ORAL_HOME/evolved/<corpus>-s<steps>-lr<lr>-<hash of the full run key>."""
    root = Path(root) if root is not None else oral_home() / "evolved"
    h = hashlib.sha256(json.dumps(_run_key(cfg), sort_keys=True).encode()).hexdigest()[:12]
    corpus = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.corpus).stem if "/" in cfg.corpus else cfg.corpus)
    return root / f"{corpus}-s{cfg.steps}-lr{cfg.lr:g}-{h}"


def checkpoint_dir(out: Path) -> Path:
    """Where a link's training checkpoints (oral.training's format) wait until the link is written."""
    return out.with_name(f".{out.name}.ckpt")


def _is_done(out: Path, entry: dict) -> bool:
    cfg_file = out / "config.json"
    if not cfg_file.is_file():
        return False
    recorded = read_json(cfg_file, f"remove {out} and run the same `oral evolve` again").get("oral_lineage") or []
    return bool(recorded) and recorded[-1] == entry


# -----------------------------------------------------------------------------
# Evolution


def evolve(
    base: str | Path,
    corpus: str | Path,
    steps: int,
    out: str | Path | None = None,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    **overrides,
) -> Path:
    """Continue pretraining `base` on `corpus` for `steps` AdamW steps; return the new model dir.

    `out` defaults to a cached path under $ORAL_HOME/evolved; a finished run with the same settings
    is returned as is. A training checkpoint is kept every `save_every` steps beside `out`, and a
    run that was killed resumes from it. `on_step(step, loss)` is called after each step.
    Other keyword arguments are EvolveConfig fields (batch_size, seq_len, warmup_steps, ...).
    """
    cfg = EvolveConfig(base=str(base), corpus=str(corpus), steps=steps, lr=lr, seed=seed, **overrides)
    _check(cfg)
    out = Path(out) if out is not None else default_out(cfg)
    entry = lineage_entry(cfg)
    remove_debris(out.parent, out.name)  # a killed run's half-written model
    if _is_done(out, entry):
        log.info("evolved model %s exists with these settings: reusing it", out)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # left if killed right after writing it
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists and is not this run's output; remove it or choose another --out")

    # 1) data: nothing is written until the corpus and the base load
    docs = get_corpus(cfg.corpus)
    train_docs, _ = split_documents(docs)
    model, tok = load_base(cfg.base, device=cfg.device)
    parent_lineage = lineage(model.config)
    # Only the tokens the run will use (one block spare): step s sees the same data for any `steps`.
    needed = (cfg.steps + 1) * cfg.batch_size * cfg.seq_len
    stream = token_stream(train_docs, tok, seed=cfg.seed, max_tokens=min(cfg.max_corpus_tokens, needed))
    if len(stream) < cfg.seq_len:
        raise EvolveError(f"corpus {cfg.corpus!r} has {len(stream)} tokens, fewer than seq_len={cfg.seq_len}")

    # 2) resume from a training checkpoint, if one exists
    key = _run_key(cfg)
    ckpt = checkpoint_dir(out)
    if hasattr(model.config, "oral_base_id"):
        del model.config.oral_base_id  # set by load_base for the parent; the child's id is its path
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start, losses = 0, []
    last = latest_checkpoint(ckpt)
    if last is not None:
        state, _ = load_checkpoint(last, model, opt, key, fix=f"remove {ckpt} to start over, or rerun with the "
                                                              "settings it was made with")
        start, losses = state["step"], state["losses"]
        log.info("resuming %s from step %d", out, start)

    # 3) train
    t0 = time.time()
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"evolve {entry['corpus'][:24]}",
               disable=not progress)
    for step in bar:
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # any dropout: same on resume
        set_lr(opt, get_lr(step + 1, cfg))
        x = get_batch(stream, step, cfg.batch_size, cfg.seq_len).to(cfg.device)  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{get_lr(step + 1, cfg):.1e}")
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt, step + 1, model, opt, key, {"losses": losses})

    # 4) write the evolved model (atomically), then drop the training checkpoint
    model.eval()
    model.config.oral_lineage = parent_lineage + [entry]
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / RUN_INFO, {
            "lineage_entry": entry, "losses": losses, "resumed_from_step": start,
            "wall_s_this_run": round(time.time() - t0, 1), "stream_tokens": len(stream),
            "train_documents": len(train_docs),
        })
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def built_versions(cfg: ChainConfig) -> list[Path | str]:
    """[t0, t1, ...] of the chain as far as it is built now (nothing is trained): t0 as given, then each
    link's cached dir while it is complete."""
    versions: list[Path | str] = [cfg.base]
    for link in cfg.links():
        link.base = str(versions[-1])
        out = default_out(link, cfg.root)
        if not _is_done(out, lineage_entry(link)):
            break
        versions.append(out)
    return versions


def evolve_chain(cfg: ChainConfig, progress: bool = True) -> list[Path]:
    """Build t0 (the base) -> t1 -> ... one link per corpus; return [t0, t1, ...] (t0 as given)."""
    versions: list[Path | str] = [cfg.base]
    for link in cfg.links():
        link.base = str(versions[-1])
        out = default_out(link, cfg.root)
        kw = {k: v for k, v in dataclasses.asdict(link).items() if k not in ("base", "corpus", "steps", "lr", "seed")}
        versions.append(evolve(link.base, link.corpus, link.steps, out=out, lr=link.lr, seed=link.seed,
                               progress=progress, **kw))
    return versions


# -----------------------------------------------------------------------------
# Measuring drift


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: list[str],
    seq_len: int = 128,
    max_tokens: int = 16384,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token NLL) over the first `max_tokens` tokens of `docs` (in order, EOS-joined).

    The stream is scored in blocks of `seq_len` tokens (the last one may be shorter).
    """
    stream = token_stream(docs, tokenizer, seed=0, max_tokens=max_tokens)
    if len(stream) < 2:
        raise EvolveError(f"need at least 2 tokens for perplexity, got {len(stream)}")
    n_full = len(stream) // seq_len
    batches = [stream[: n_full * seq_len].view(n_full, seq_len)[i : i + batch_size]  # (B, T)
               for i in range(0, n_full, batch_size)]
    if len(stream) - n_full * seq_len >= 2:
        batches.append(stream[n_full * seq_len :].unsqueeze(0))  # (1, T') the remainder
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device)
        logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def chain_report(cfg: ChainConfig, versions: list[Path | str], progress: bool = True) -> list[dict]:
    """Per version: what it was trained on, held-out perplexity on each corpus, zero-shot task scores."""
    eval_corpora = cfg.eval_corpora or cfg.corpora
    heldout = {c: split_documents(get_corpus(c))[1] for c in eval_corpora}
    tasks = [get_task(t) for t in cfg.tasks]
    links = [None] + cfg.links()
    rows = []
    for i, (version, link) in enumerate(zip(progress_bar(versions, desc="report", disable=not progress), links)):
        model, tok = load_base(version, device=cfg.device)
        row = {
            "version": f"t{i}",
            "path": str(version),
            "corpus": link.corpus if link else None,
            "steps": link.steps if link else 0,
            "lr": link.lr if link else None,
            "perplexity": {c: round(perplexity(model, tok, docs, cfg.seq_len, cfg.ppl_tokens), 3)
                           for c, docs in heldout.items()},
        }
        if tasks:
            ev = Evaluator(model, tok)
            row["tasks"] = {t.name: ev.evaluate(t, split=cfg.task_split, limit=cfg.task_limit)["value"]
                            for t in tasks}
        rows.append(row)
        del model
    return rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table of `chain_report` rows."""
    corpora = list(rows[0]["perplexity"]) if rows else []
    tasks = list(rows[0].get("tasks", {})) if rows else []
    head = f"{'version':<8} {'trained on':<14} {'steps':>5} {'lr':>8}  " + " ".join(
        f"{'ppl ' + c:>18}" for c in corpora) + "".join(f" {t:>16}" for t in tasks)
    lines = [head, "-" * len(head)]
    for r in rows:
        lr = f"{r['lr']:g}" if r["lr"] is not None else "-"
        line = f"{r['version']:<8} {(r['corpus'] or '(base)')[:14]:<14} {r['steps']:>5} {lr:>8}  " + " ".join(
            f"{r['perplexity'][c]:>18.2f}" for c in corpora)
        line += "".join(f" {r['tasks'][t]:>16.4f}" for t in tasks)
        lines.append(line)
    return "\n".join(lines)
