"""Evaluate a base model, with or without a LoRA adapter, on tasks: batched and deterministic.

Classification: accuracy of the label with the highest log-likelihood after the prompt. When every
label word is one token (the built-in tasks), one forward pass per batch scores all labels from
the next-token distribution; otherwise each label's full continuation is scored.
Generation: greedy decoding up to the task's max_new_tokens, stopped at a newline, scored by the
task (the dataset's own scorer, or exact match).

One Evaluator holds one loaded base; adapters are swapped in place (`set_adapter`), so many
adapters are evaluated without reloading the base.
"""

import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from oral.io import atomic_write_json, file_lock, read_json
from oral.lora import load_adapter
from oral.models import load_base
from oral.progress import progress_bar
from oral.tasks import Example, Task, TaskError, get_task

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# -----------------------------------------------------------------------------
# Tokenizing examples (shared with fine-tuning, so training and evaluation see the same tokens)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int = 512
) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids): the prompt with the tokenizer's special tokens, the target without.

    A prompt too long for `max_length` is cut from the left (its end, next to the answer, stays).
    """
    p = tokenizer(prompt, add_special_tokens=True).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids if target else []
    room = max_length - len(t)
    if room < 1:
        raise TaskError(f"a target of {len(t)} tokens does not fit max_length={max_length}; raise max_length")
    return p[-room:], t


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int = 512
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for training on `prompt + target` with the loss on target tokens only.

    labels is input_ids with every prompt position set to -100 (ignored by the loss).
    """
    p, t = encode_pair(tokenizer, example.prompt, example.target, max_length)
    return p + t, [IGNORE_INDEX] * len(p) + t


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


# -----------------------------------------------------------------------------
# The evaluator


class Evaluator:
    """Scores one loaded base model (plus an optional LoRA adapter) on tasks.

    model: a causal LM (or a PeftModel wrapping one). set_adapter() injects PEFT LoRA layers into
    the model in place the first time it is given an adapter; set_adapter(None) switches them off.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        max_length: int = 512,
        progress: bool = True,
    ):
        from peft import PeftModel

        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.peft: Any = model if isinstance(model, PeftModel) else None
        # The HF model every forward goes through; PEFT's LoRA layers live inside it.
        self.model: PreTrainedModel = model.get_base_model() if self.peft is not None else model
        self.model.eval()
        self._config_key: tuple | None = self._key(self.peft.peft_config[self.peft.active_adapter]) if self.peft is not None else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self._keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @classmethod
    def from_base(cls, base: str, adapter: str | Path | None = None, **kwargs) -> "Evaluator":
        """Load a base (embedded name, local dir or hub id) and optionally an adapter dir."""
        model, tok = load_base(base)
        ev = cls(model, tok, **kwargs)
        if adapter is not None:
            ev.set_adapter(adapter)
        return ev

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -------------------------------------------------------------------------
    # Adapters

    @staticmethod
    def _key(config) -> tuple:
        """What must match for new weights to be loaded into the existing LoRA layers."""
        tm = config.target_modules
        tm = tuple(sorted(tm)) if isinstance(tm, (set, list, tuple)) else tm
        return (config.r, float(config.lora_alpha), tm, tuple(sorted(config.rank_pattern.items())),
                tuple(sorted((k, float(v)) for k, v in config.alpha_pattern.items())), bool(config.use_rslora))

    def set_adapter(self, adapter: Any, spec: Any = None) -> None:
        """Swap the adapter in place: None (the bare base), an adapter dir, or a state dict.

        A state dict is keyed as PEFT saves it (`base_model.model.<module>.lora_A.weight`). Its
        `spec` (an oral.lora.LoraSpec or a peft.LoraConfig) is needed the first time, or when the
        ranks, alphas or target modules change; otherwise the current layers are reused.
        """
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        if adapter is None:
            if self.peft is not None:
                self.peft.base_model.disable_adapter_layers()
            return
        if isinstance(adapter, (str, Path)):
            spec, adapter = load_adapter(adapter)
        if not isinstance(adapter, dict):
            raise TypeError(f"set_adapter takes None, an adapter dir or a state dict, not {type(adapter).__name__}")
        if spec is None and self.peft is None:
            raise ValueError("the first adapter given as a state dict needs its spec: set_adapter(state, spec=LoraSpec or LoraConfig)")
        if spec is not None:
            config = spec if isinstance(spec, LoraConfig) else spec.lora_config()
            key = self._key(config)
            if key != self._config_key:
                if self.peft is not None:  # different shapes: drop the old layers, inject new ones
                    self.model = self.peft.unload()
                # the layers go into the model loaded here: the adapter's recorded base name is not checked against it
                # (PEFT would warn that it was "renamed" to the loaded dir's path)
                config = LoraConfig(**{**config.to_dict(), "inference_mode": True, "lora_dropout": 0.0,
                                       "base_model_name_or_path": None})
                self.peft = get_peft_model(self.model, config)
                self.model = self.peft.get_base_model()
                self.model.eval()
                self._config_key = key
        state = {k: v.to(self.device) for k, v in adapter.items()}
        result = set_peft_model_state_dict(self.peft, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"the adapter does not fit the LoRA layers: {len(result.unexpected_keys)} unexpected keys "
                f"(e.g. {result.unexpected_keys[:2]}), {len(missing)} missing (e.g. {missing[:2]}); "
                "pass the adapter's spec so the layers are rebuilt"
            )
        self.peft.base_model.enable_adapter_layers()

    # -------------------------------------------------------------------------
    # Forward passes

    def _batch(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad to one length: (input_ids (B, T), attention_mask (B, T))."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _last_logprobs(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """Log-probs of the next token at the last `keep` positions: (B, keep, V)."""
        ids, mask = self._batch(seqs)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (left padding)
        kwargs = {"logits_to_keep": keep} if self._keep_arg else {}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs).logits
        return logits[:, -keep:].float().log_softmax(-1)  # (B, keep, V)

    def _continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[torch.Tensor]:
        """Per-token log-probs of each target given its prompt: one (len(target),) tensor per pair."""
        out: list[torch.Tensor | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for idx in progress_bar(list(_batches(order, self.batch_size)), desc=desc, disable=not self.progress, leave=False):
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            K = max(len(pairs[i][1]) for i in idx) + 1
            lp = self._last_logprobs(seqs, K)  # (B, K, V); position K-1 is the last token
            for b, i in enumerate(idx):
                t = pairs[i][1]
                k = len(t)
                # Target token j (j = 0..k-1) sits at kept index K-k+j and is predicted from K-k+j-1.
                rows = lp[b, K - k - 1 : K - 1]  # (k, V)
                out[i] = rows.gather(-1, torch.tensor(t, device=rows.device)[:, None])[:, 0].cpu()
        return out  # type: ignore[return-value]

    # -------------------------------------------------------------------------
    # Metrics

    def _single_token_ids(self, words: list[str]) -> list[int] | None:
        """The token id of each " word" when every label is one distinct token, else None."""
        ids = [self.tokenizer(" " + w, add_special_tokens=False).input_ids for w in words]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
            return [i[0] for i in ids]
        return None

    @torch.inference_mode()
    def classify(self, task: Task, examples: list[Example]) -> list[int]:
        """The predicted label index of each example (highest label log-likelihood)."""
        firsts = self._single_token_ids(task.labels)
        if firsts is not None:
            # Fast path: one forward per batch; the next-token distribution scores every label.
            prompts = [encode_pair(self.tokenizer, ex.prompt, "", self.max_length)[0] for ex in examples]
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            preds = [0] * len(examples)
            cand = torch.tensor(firsts, device=self.device)
            for idx in progress_bar(list(_batches(order, self.batch_size)), desc=task.name, disable=not self.progress, leave=False):
                lp = self._last_logprobs([prompts[i] for i in idx], 1)[:, 0]  # (B, V)
                best = lp[:, cand].argmax(-1).tolist()  # (B,)
                for i, p in zip(idx, best):
                    preds[i] = p
            return preds
        # General path: the summed log-likelihood of each label's full continuation.
        pairs = [encode_pair(self.tokenizer, ex.prompt, " " + w, self.max_length) for ex in examples for w in task.labels]
        scores = torch.stack([lp.sum() for lp in self._continuation_logprobs(pairs, task.name)])
        return scores.view(len(examples), len(task.labels)).argmax(-1).tolist()  # (N, L) -> (N,)

    @torch.inference_mode()
    def generate(self, task: Task, examples: list[Example], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers (the text after each prompt, up to the first newline)."""
        max_new = max_new_tokens or task.max_new_tokens
        prompts = [encode_pair(self.tokenizer, ex.prompt, "", self.max_length - max_new)[0] for ex in examples]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [""] * len(examples)
        for idx in progress_bar(list(_batches(order, self.batch_size)), desc=task.name, disable=not self.progress, leave=False):
            ids, mask = self._batch([prompts[i] for i in idx])
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_id,
                stop_strings=["\n"], tokenizer=self.tokenizer,
            )
            for b, i in enumerate(idx):
                text = self.tokenizer.decode(gen[b, ids.shape[1] :], skip_special_tokens=True)
                out[i] = text.split("\n", 1)[0].strip()
        return out

    def _examples(self, task: Task | str, split: str, limit: int | None) -> tuple[Task, list[Example]]:
        task = get_task(task) if isinstance(task, str) else task
        examples = task.split(split)
        if limit is not None:
            examples = examples[:limit]
        if not examples:
            raise TaskError(f"task {task.name!r} has no examples in split {split!r}")
        return task, examples

    def evaluate(self, task: Task | str, split: str = "test", limit: int | None = None) -> dict[str, Any]:
        """{"metric", "value", "n"} of the task's metric on the first `limit` examples of `split`."""
        task, examples = self._examples(task, split, limit)
        if task.kind == "classification":
            preds = self.classify(task, examples)
            value = sum(int(p == ex.label) for p, ex in zip(preds, examples)) / len(examples)
        else:
            answers = self.generate(task, examples)
            value = sum(task.score(a, ex) for a, ex in zip(answers, examples)) / len(examples)
        return {"metric": task.metric, "value": value, "n": len(examples)}

    @torch.inference_mode()
    def task_loss(self, task: Task | str, split: str = "validation", limit: int | None = None) -> float:
        """Mean negative log-likelihood (nats per target token) of the targets given their prompts."""
        task, examples = self._examples(task, split, limit)
        pairs = [encode_pair(self.tokenizer, ex.prompt, ex.target, self.max_length) for ex in examples]
        lps = self._continuation_logprobs(pairs, f"{task.name} loss")
        total = -sum(float(lp.sum()) for lp in lps)
        n = sum(len(lp) for lp in lps)
        loss = total / max(n, 1)
        if not math.isfinite(loss):
            log.warning("task loss on %s is not finite", task.name)
        return loss



class ScoreCache:
    """Scores kept in one JSON file, keyed by what determines them (adapter digest or None for the bare
    base, base, task, split, limit, instruction ...): `get(key, measure)` measures only what is new.

    Processes may share the file (e.g. one experiment per version): each new score is merged into what
    is on disk under a lock, so no process overwrites another's scores."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.scores: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        return read_json(self.path, f"delete {self.path}; scores are measured again") if self.path.is_file() else {}

    def __contains__(self, key: dict | list) -> bool:
        return json.dumps(key, sort_keys=True) in self.scores

    def get(self, key: dict | list, measure: Callable[[], dict]) -> dict:
        k = json.dumps(key, sort_keys=True)
        if k not in self.scores:
            value = measure()
            with file_lock(self.path.with_name(self.path.name + ".lock")):
                self.scores = {**self._read(), **self.scores, k: value}
                atomic_write_json(self.path, self.scores)
        return self.scores[k]
