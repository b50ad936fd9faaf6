"""The LoRA layer of the codec: specs, PEFT adapter dirs, validation and the canonical gauge.

An adapter is a pair (spec, state). The spec lists the LoRA modules (module path in the base
model, in/out features, rank, alpha); the state is the tensor dict exactly as PEFT stores it in
`adapter_model.safetensors`:

    base_model.model.<module path>.lora_A.weight   (r, in)
    base_model.model.<module path>.lora_B.weight   (out, r)

The adapter's update to a module's weight is  scaling * B @ A  with scaling = alpha / r
(alpha / sqrt(r) with rslora).

An adapter dir we write also holds `oral_provenance.json` (how it was made) and `README.md`, a model
card in the Hugging Face convention (YAML header: base_model, library_name, tags; body: provenance,
how to load it, measured scores).
"""

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from oral.cards import CARD_NAME, dated_scores, model_card, read_model_card
from oral.io import (
    atomic_dir, atomic_write_json, atomic_write_text, load_safetensors, open_safetensors, parse_json, read_json,
)
from oral.models import load_base_config, loadable_base

# PEFT asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 deprecates with a
# FutureWarning (printed by every training command); the alias still works, so that one warning is hidden.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROVENANCE_NAME = "oral_provenance.json"
PROVENANCE_METADATA_KEY = "oral_provenance"
ADAPTER_FIX = "regenerate or retrain that adapter"  # how to rebuild a damaged adapter dir
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<ab>[AB])\.weight$")
_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


class AdapterError(ValueError):
    """An adapter that is malformed or does not fit its spec or its base model."""


# -----------------------------------------------------------------------------
# Spec


def _natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear module: its path in the base model, in/out features, rank, alpha."""

    name: str  # e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    rank: int
    alpha: float

    @property
    def key_A(self) -> str:
        return f"{KEY_PREFIX}{self.name}.lora_A.weight"

    @property
    def key_B(self) -> str:
        return f"{KEY_PREFIX}{self.name}.lora_B.weight"

    @property
    def shape_A(self) -> tuple[int, int]:
        return (self.rank, self.in_features)

    @property
    def shape_B(self) -> tuple[int, int]:
        return (self.out_features, self.rank)

    @property
    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def layer_index(self) -> int:
        """The first integer path component (the transformer block), 0 if there is none."""
        m = _LAYER_RE.search(self.name)
        return int(m.group(1)) if m else 0

    @property
    def block(self) -> str:
        """The path up to and including the layer index (`model.layers.3`, `down_blocks.1`); "" if there is none."""
        m = _LAYER_RE.search(self.name)
        return self.name[: m.end(1)] if m else ""

    @property
    def module_type(self) -> str:
        """The path after the layer index (`self_attn.q_proj`); the whole path if there is none."""
        m = _LAYER_RE.search(self.name)
        return self.name[m.end():] if m and m.end() < len(self.name) else self.name

    def scaling(self, use_rslora: bool = False) -> float:
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)


@dataclass(frozen=True)
class LoraSpec:
    """The ordered LoRA modules of an adapter plus the PEFT config fields that shape it."""

    modules: tuple[LoraModule, ...]
    target_modules: tuple[str, ...] | str | None = None  # as PEFT's LoraConfig takes it
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    _index: dict = field(default=None, init=False, repr=False, compare=False, hash=False)
    _layer: dict = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        modules = tuple(sorted(self.modules, key=lambda m: _natural_key(m.name)))
        object.__setattr__(self, "modules", modules)
        if isinstance(self.target_modules, (list, set, tuple)):
            object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        names = [m.name for m in modules]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise AdapterError(f"spec lists module(s) {dup[:3]} more than once")
        object.__setattr__(self, "_index", {m.name: i for i, m in enumerate(modules)})
        # The layer position of each module: its layer index, unless that puts two modules of one type at one
        # position (a UNet's down_blocks.1 and up_blocks.1 both hold attentions.0...to_q): then the ordinal of
        # its block path (down_blocks.1, mid_block.attentions.0, up_blocks.1, ...) in spec order.
        pairs = [(m.layer_index, m.module_type) for m in modules]
        if len(set(pairs)) == len(pairs):
            layer = {m.name: m.layer_index for m in modules}
        else:
            blocks = {b: i for i, b in enumerate(dict.fromkeys(m.block for m in modules))}
            layer = {m.name: blocks[m.block] for m in modules}
        object.__setattr__(self, "_layer", layer)

    # --- views ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> LoraModule:
        return self.modules[self._index[name]]

    def keys(self) -> list[str]:
        """State dict keys in spec order: A then B for each module."""
        return [k for m in self.modules for k in (m.key_A, m.key_B)]

    def shapes(self) -> dict[str, tuple[int, int]]:
        out = {}
        for m in self.modules:
            out[m.key_A] = m.shape_A
            out[m.key_B] = m.shape_B
        return out

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules)

    @property
    def module_types(self) -> list[str]:
        """Distinct module types (`self_attn.q_proj`, ...) in spec order."""
        seen: dict[str, None] = {}
        for m in self.modules:
            seen.setdefault(m.module_type, None)
        return list(seen)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self._layer.values()))

    def layer_of(self, name: str) -> int:
        """The layer position of a module (its layer index unless two modules of one type would share it)."""
        return self._layer[name]

    def position(self, name: str) -> tuple[int, int]:
        """(layer position, module-type index) of a module, the integer position the tokenizer uses."""
        m = self[name]
        return self._layer[name], self.module_types.index(m.module_type)

    # --- construction --------------------------------------------------------

    @classmethod
    def from_base_config(
        cls,
        config: PretrainedConfig | Mapping[str, Any],
        target_modules: Iterable[str] | str,
        rank: int,
        alpha: float,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        use_rslora: bool = False,
        base_model_name_or_path: str | None = None,
    ) -> "LoraSpec":
        """A spec from a model config alone: the model is built on the meta device (no weights).

        `config` is a transformers config or its dict (with `model_type`), or a diffusers model's
        config dict (with `_class_name`, e.g. a Stable Diffusion UNet's unet/config.json). Target
        modules and the rank / alpha patterns match module paths exactly as PEFT matches them.
        """
        if isinstance(config, Mapping) and "_class_name" in config:
            model = diffusers_model_on_meta(config)
            return spec_for_model(model, target_modules, rank, alpha, rank_pattern=rank_pattern,
                                  alpha_pattern=alpha_pattern, use_rslora=use_rslora,
                                  base_model_name_or_path=base_model_name_or_path)
        if isinstance(config, Mapping):
            d = dict(config)
            if "model_type" not in d:
                raise AdapterError("a config dict needs a `model_type` (e.g. 'mistral', 'llama') or, for a diffusers "
                                   "model, a `_class_name` (e.g. 'UNet2DConditionModel')")
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(config, "oral_base_id", None) or getattr(config, "_name_or_path", None) or None
        return spec_for_model(
            model, target_modules, rank, alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            use_rslora=use_rslora, base_model_name_or_path=base_model_name_or_path,
        )

    @classmethod
    def from_adapter_dir(cls, path: str | Path) -> "LoraSpec":
        """The spec of a PEFT adapter dir, from its config and the tensor headers (no data read)."""
        path = Path(path)
        config = _read_lora_config(path)
        with open_safetensors(path / WEIGHTS_NAME, ADAPTER_FIX) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return _spec_from_config_and_shapes(config, shapes)

    # --- (de)serialization ---------------------------------------------------

    def lora_config(self) -> LoraConfig:
        """The PEFT LoraConfig that recreates these modules (default r/alpha + exact patterns)."""
        ranks = [m.rank for m in self.modules]
        alphas = [m.alpha for m in self.modules]
        r = max(set(ranks), key=lambda x: (ranks.count(x), -x)) if ranks else 8
        alpha = max(set(alphas), key=lambda x: (alphas.count(x), -x)) if alphas else 8
        rank_pattern = self._pattern(lambda m: m.rank, r)
        alpha_pattern = self._pattern(lambda m: m.alpha, alpha)
        target = self.target_modules
        if target is None:
            target = sorted({m.name.rsplit(".", 1)[-1] for m in self.modules})
        return LoraConfig(
            r=r,
            lora_alpha=_num(alpha),
            target_modules=list(target) if not isinstance(target, str) else target,
            rank_pattern=rank_pattern,
            alpha_pattern={k: _num(v) for k, v in alpha_pattern.items()},
            use_rslora=self.use_rslora,
            base_model_name_or_path=self.base_model_name_or_path,
            task_type="CAUSAL_LM",
            bias="none",
            lora_dropout=0.0,
            inference_mode=True,
        )

    def _pattern(self, value, default) -> dict:
        """PEFT pattern keys for modules whose value differs from the default: one key per module
        type when all its modules agree, else one key per module (escaped, matched exactly)."""
        pattern = {}
        for t in self.module_types:
            group = [m for m in self.modules if m.module_type == t]
            values = {value(m) for m in group}
            if values == {default}:
                continue
            if len(values) == 1 and t != group[0].name:
                pattern[re.escape(t)] = values.pop()
            else:
                pattern.update({re.escape(m.name): value(m) for m in group if value(m) != default})
        return pattern

    def to_dict(self) -> dict:
        return {
            "modules": [[m.name, m.in_features, m.out_features, m.rank, m.alpha] for m in self.modules],
            "target_modules": list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules,
            "use_rslora": self.use_rslora,
            "base_model_name_or_path": self.base_model_name_or_path,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraSpec":
        target = d.get("target_modules")
        return cls(
            modules=tuple(LoraModule(n, int(i), int(o), int(r), float(a)) for n, i, o, r, a in d["modules"]),
            target_modules=tuple(target) if isinstance(target, list) else target,
            use_rslora=bool(d.get("use_rslora", False)),
            base_model_name_or_path=d.get("base_model_name_or_path"),
        )

    def summary(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        return (
            f"{len(self.layers)} layers x {len(self.module_types)} modules ({', '.join(self.module_types)}), "
            f"rank {ranks[0] if len(ranks) == 1 else ranks}, {self.num_params:,} params"
        )


def _num(x: float) -> int | float:
    """alpha as an int when it is one (PEFT configs usually hold ints)."""
    return int(x) if float(x).is_integer() else float(x)


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} for every linear-like module of a base model."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    out = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        if not name or parts[-1] == "base_layer" or any(p.startswith("lora_") for p in parts):
            continue  # PEFT's own sub-layers are not base modules
        base = getattr(mod, "base_layer", mod)  # a PEFT-wrapped layer counts as its base
        if isinstance(base, torch.nn.Linear) or type(base).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit"):
            if hasattr(base, "in_features"):
                out[name] = (base.in_features, base.out_features)
            elif hasattr(base, "nx"):  # transformers Conv1D stores (in, out) as weight shape
                out[name] = tuple(base.weight.shape)
    return out


def diffusers_model_on_meta(config: Mapping[str, Any]) -> torch.nn.Module:
    """A diffusers model (UNet2DConditionModel, ...) built from its config dict on the meta device."""
    import diffusers

    name = config["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise AdapterError(f"diffusers has no model class {name!r} (the config's _class_name); give a diffusers "
                           f"model config such as a Stable Diffusion unet/config.json")
    with torch.device("meta"):
        return cls.from_config(dict(config))


def spec_for_model(
    model: torch.nn.Module,
    target_modules: Iterable[str] | str,
    rank: int,
    alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> LoraSpec:
    """The spec PEFT would build on `model` for these targets (the model may live on meta)."""
    target = target_modules if isinstance(target_modules, str) else sorted(set(target_modules))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, rank_pattern=dict(rank_pattern or {}),
                     alpha_pattern=dict(alpha_pattern or {}), use_rslora=use_rslora)
    if cfg.target_modules == "all-linear":
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        cfg = _maybe_include_all_linear_layers(cfg, model)  # PEFT's own expansion (lm_head excluded)
        target = sorted({n.rsplit(".", 1)[-1] for n in cfg.target_modules})
        cfg.target_modules = target
    modules = []
    for name, (fin, fout) in _linear_shapes(model).items():
        if not check_target_module_exists(cfg, name):  # falsy for unmatched and excluded modules
            continue
        r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), name), rank)
        a = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), name), alpha)
        modules.append(LoraModule(name, fin, fout, int(r), float(a)))
    if not modules:
        raise AdapterError(
            f"no linear module of {type(model).__name__} matches target_modules={target_modules!r}; "
            f"pick names such as {sorted({n.rsplit('.', 1)[-1] for n in _linear_shapes(model)})[:8]}"
        )
    if base_model_name_or_path is None:
        cfg_model = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg_model, "oral_base_id", None) or getattr(cfg_model, "_name_or_path", None) or None
    return LoraSpec(tuple(modules), tuple(target) if not isinstance(target, str) else target, use_rslora,
                    base_model_name_or_path)


def spec_from_peft_model(peft_model: PeftModel, adapter_name: str = "default") -> LoraSpec:
    """The spec of a live PeftModel's LoRA adapter (shapes read from its layers)."""
    cfg = peft_model.peft_config[adapter_name]
    modules = []
    for name, mod in peft_model.get_base_model().named_modules():
        lora_A = getattr(mod, "lora_A", None)
        if lora_A is None or adapter_name not in lora_A:
            continue
        A, B = lora_A[adapter_name].weight, mod.lora_B[adapter_name].weight
        modules.append(LoraModule(name, A.shape[1], B.shape[0], A.shape[0], float(mod.lora_alpha[adapter_name])))
    target = cfg.target_modules
    target = tuple(sorted(target)) if isinstance(target, (set, list, tuple)) else target
    return LoraSpec(tuple(modules), target, bool(cfg.use_rslora), cfg.base_model_name_or_path)


def adapter_state_from_peft_model(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's state dict keyed as PEFT saves it (detached, contiguous CPU copies)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


# -----------------------------------------------------------------------------
# Reading adapter dirs


def _read_lora_config(path: Path) -> LoraConfig:
    if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
        raise AdapterError(f"{path} is not a PEFT adapter dir: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    raw = read_json(path / CONFIG_NAME, ADAPTER_FIX)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} holds a {raw.get('peft_type')} adapter; only LoRA adapters are supported")
    try:
        config = LoraConfig.from_pretrained(str(path))
    except Exception as e:  # PEFT raises several types for a bad config
        raise AdapterError(f"{path / CONFIG_NAME} is not a valid LoraConfig: {e}") from None
    unsupported = []
    if config.bias != "none":
        unsupported.append(f"bias={config.bias!r}")
    if config.modules_to_save:
        unsupported.append(f"modules_to_save={config.modules_to_save!r}")
    if config.use_dora:
        unsupported.append("use_dora=True")
    if unsupported:
        raise AdapterError(f"{path}: LoRA features the codec does not handle: {', '.join(unsupported)}")
    return config


def _spec_from_config_and_shapes(config: LoraConfig, shapes: Mapping[str, tuple]) -> LoraSpec:
    """Modules from the tensor keys; rank and alpha from the config, as PEFT would set them."""
    dims: dict[str, dict[str, int]] = {}
    for key, shape in shapes.items():
        m = _KEY_RE.match(key)
        if not m or len(shape) != 2:
            continue  # reported as a stray key by validation
        d = dims.setdefault(m.group("name"), {})
        if m.group("ab") == "A":
            d["in"] = shape[1]
        else:
            d["out"] = shape[0]
    modules = []
    for name, d in dims.items():
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        a = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        # A missing A or B leaves its size unknown (0); validation reports the missing key.
        modules.append(LoraModule(name, d.get("in", 0), d.get("out", 0), int(r), float(a)))
    target = config.target_modules
    target = tuple(sorted(target)) if isinstance(target, (set, list, tuple)) else target
    return LoraSpec(tuple(modules), target, bool(config.use_rslora), config.base_model_name_or_path)


def load_adapter(path: str | Path, validate: bool = True) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Read a PEFT adapter dir -> (spec, state); validated unless `validate=False`."""
    path = Path(path)
    config = _read_lora_config(path)
    state = load_safetensors(path / WEIGHTS_NAME, ADAPTER_FIX)
    spec = _spec_from_config_and_shapes(config, {k: tuple(v.shape) for k, v in state.items()})
    if validate:
        validate_adapter(spec, state)
    return spec, state


def read_provenance(path: str | Path) -> dict | None:
    """The provenance record written with an adapter (side file first, then safetensors metadata)."""
    path = Path(path)
    if (path / PROVENANCE_NAME).exists():
        return read_json(path / PROVENANCE_NAME, ADAPTER_FIX)
    if (path / WEIGHTS_NAME).exists():
        with open_safetensors(path / WEIGHTS_NAME, ADAPTER_FIX) as f:
            meta = f.metadata() or {}
        if PROVENANCE_METADATA_KEY in meta:
            return parse_json(meta[PROVENANCE_METADATA_KEY], path / WEIGHTS_NAME, ADAPTER_FIX)
    return None


# -----------------------------------------------------------------------------
# Validation


def _base_shapes(base_model: Any) -> dict[str, tuple[int, int]]:
    """Linear module shapes of a base given as a module, a config, or a name / path."""
    if isinstance(base_model, torch.nn.Module):
        return _linear_shapes(base_model)
    if isinstance(base_model, (str, Path)):
        base_model = load_base_config(base_model)
    if isinstance(base_model, Mapping):
        d = dict(base_model)
        base_model = AutoConfig.for_model(d.pop("model_type"), **d)
    if isinstance(base_model, PretrainedConfig):
        with torch.device("meta"):
            return _linear_shapes(AutoModelForCausalLM.from_config(base_model))
    raise TypeError(f"base_model must be a module, a config, or a model name/path, not {type(base_model).__name__}")


def adapter_problems(spec: LoraSpec, state: Mapping[str, torch.Tensor], base_model: Any = None,
                     max_problems: int = 20) -> list[str]:
    """Every problem found (empty when valid): keys, shapes, dtypes, values, and fit to the base."""
    problems: list[str] = []
    expected = spec.shapes()
    missing = [k for k in expected if k not in state]
    stray = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing key(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} in all)")
    if stray:
        problems.append(
            f"stray key(s) {stray[:3]}{' ...' if len(stray) > 3 else ''} ({len(stray)} in all); "
            f"a LoRA state holds only '{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' of spec modules"
        )
    for m in spec.modules:
        if m.rank <= 0:
            problems.append(f"{m.name}: rank {m.rank} must be positive")
        for key, shape in ((m.key_A, m.shape_A), (m.key_B, m.shape_B)):
            t = state.get(key)
            if t is None:
                continue
            if tuple(t.shape) != shape:
                problems.append(
                    f"{key}: shape {tuple(t.shape)} but the spec needs {shape} "
                    f"(A is (rank, in_features), B is (out_features, rank); rank {m.rank})"
                )
                continue
            if not t.is_floating_point():
                problems.append(f"{key}: dtype {t.dtype} is not a float type")
                continue
            if not bool(torch.isfinite(t).all()):
                n_bad = int((~torch.isfinite(t)).sum())
                problems.append(f"{key}: {n_bad} non-finite value(s) (NaN or inf)")
        B = state.get(m.key_B)
        if B is not None and tuple(B.shape) == m.shape_B and B.is_floating_point() and not bool(B.any()):
            problems.append(f"{m.key_B}: lora_B is all zero, so this module does nothing (an untrained adapter?)")
        if len(problems) >= max_problems:
            break
    if isinstance(spec.target_modules, (str, tuple)) and spec.target_modules:
        cfg = LoraConfig(target_modules=spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules))
        unmatched = [m.name for m in spec.modules if not check_target_module_exists(cfg, m.name)]
        if unmatched:
            problems.append(f"module(s) {unmatched[:3]} not matched by target_modules={spec.target_modules!r}; "
                            f"PEFT would not load them")
    if base_model is not None:
        problems += _base_problems(spec, _base_shapes(base_model))
    return problems[:max_problems]


def _base_problems(spec: LoraSpec, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Modules absent from the base, with other in/out features, or targeted but not in the adapter."""
    problems = []
    absent = [m.name for m in spec.modules if m.name not in shapes]
    if absent:
        problems.append(f"{len(absent)} module(s) absent from the base model, e.g. {absent[:3]}; wrong base model?")
    wrong = [m for m in spec.modules if m.name in shapes and shapes[m.name] != (m.in_features, m.out_features)]
    if wrong:
        m = wrong[0]
        problems.append(
            f"{len(wrong)} module(s) differ from the base, e.g. {m.name}: the base module is "
            f"(in={shapes[m.name][0]}, out={shapes[m.name][1]}) but the adapter has "
            f"(in={m.in_features}, out={m.out_features}); wrong base model?"
        )
    if spec.target_modules:
        target = spec.target_modules
        cfg = LoraConfig(target_modules=target if isinstance(target, str) else list(target))
        names = {m.name for m in spec.modules}
        uncovered = [n for n in shapes if n not in names and check_target_module_exists(cfg, n)]
        if uncovered:
            problems.append(
                f"target_modules={target!r} matches {len(uncovered)} base module(s) the adapter lacks, e.g. "
                f"{uncovered[:3]}; PEFT would report them as missing keys"
            )
    return problems


def validate_adapter(spec: LoraSpec, state: Mapping[str, torch.Tensor], base_model: Any = None) -> None:
    """Raise AdapterError naming every problem found; return None when the adapter is valid."""
    problems = adapter_problems(spec, state, base_model)
    if problems:
        raise AdapterError("invalid LoRA adapter:\n  - " + "\n  - ".join(problems))


# -----------------------------------------------------------------------------
# Writing adapter dirs


def save_adapter(
    path: str | Path,
    spec: LoraSpec,
    state: Mapping[str, torch.Tensor],
    provenance: Mapping[str, Any] | None = None,
    base_model: Any = None,
    overwrite: bool = False,
    scores: Iterable[Mapping[str, Any]] = (),
    extra: Callable[[Path, LoraSpec, Mapping[str, torch.Tensor]], Any] | None = None,
) -> Path:
    """Validate, then write a PEFT adapter dir atomically (nothing is written when invalid).

    `extra(dir, spec, state)` writes more files into the dir before it appears (e.g. the diffusers layout).

    `adapter_config.json` names the base as other tools load it (`oral.models.loadable_base`: the hub
    id of an embedded model, a local dir's path). Provenance (generator, prompt, seed, base id and
    fingerprint ...) goes into the safetensors metadata and `oral_provenance.json`, never into
    `adapter_config.json`. `README.md` is the model card (see `model_card`), with `scores` if given.
    """
    path = Path(path)
    validate_adapter(spec, state, base_model)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; remove it, choose another path, or pass overwrite=True")
    oral_base = spec.base_model_name_or_path
    if oral_base is not None:
        spec = with_base(spec, loadable_base(oral_base))
    config = spec.lora_config()
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in spec.keys()}
    metadata = {"format": "pt"}
    if provenance is not None:
        metadata[PROVENANCE_METADATA_KEY] = json.dumps(dict(provenance), sort_keys=True, default=str)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        if provenance is not None:
            provenance = json.loads(metadata[PROVENANCE_METADATA_KEY])
            atomic_write_json(tmp / PROVENANCE_NAME, provenance)
        atomic_write_text(tmp / CARD_NAME, model_card(path, spec, provenance, dated_scores(scores), oral_base))
        if extra is not None:
            extra(tmp, spec, tensors)
    return path


def adapter_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of an adapter's tensors (names and fp32 values), not of its files, whose metadata
    holds a creation time: equal adapters have equal digests wherever they were written."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def with_base(spec: LoraSpec, base_model_name_or_path: str | None) -> LoraSpec:
    """The same spec recorded against another base model id."""
    return replace(spec, base_model_name_or_path=base_model_name_or_path)


# -----------------------------------------------------------------------------
# Model cards (the text is oral.cards'; here the card of an adapter dir is rewritten with new scores)


def write_model_card(path: str | Path, scores: Iterable[Mapping[str, Any]] = (), oral_base: str | None = None) -> Path:
    """(Re)write DIR/README.md from its adapter config and provenance, adding `scores` (dicts with task,
    split, metric, value, n, base) to those the card recorded before; a new score replaces the
    one of the same (task, split, base). Returns the card's path."""
    path = Path(path)
    header = read_model_card(path) or {"oral": {}}
    recorded = header["oral"].get("scores") or []
    new = dated_scores(scores)
    keys = {(s.get("task"), s.get("split"), s.get("base")) for s in new}
    kept = [s for s in recorded if (s.get("task"), s.get("split"), s.get("base")) not in keys]
    spec = LoraSpec.from_adapter_dir(path)
    oral_base = oral_base or header["oral"].get("base")
    atomic_write_text(path / CARD_NAME, model_card(path, spec, read_provenance(path), kept + new, oral_base))
    return path / CARD_NAME
