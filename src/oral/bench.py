"""Benchmarks of generation at the sizes people use, from model configs alone (no base weights).

    result = bench_generate("mistral-7b", targets="all-linear", rank=16)   # oral bench generate --json

The LoRA spec is built from a model config on the meta device; the generator is untrained (the cost
of sampling does not depend on its weights) but otherwise a real `Generator`: a network of the
preset that layout would use, a weight tokenizer fitted on random LoRA states, the sentence encoder,
and c_model cached as it is for a base seen in training (a 7B base's weight fingerprint needs its
weights). One adapter is then made end to end on the code path of `oral generate`: conditions,
prototypes, sampling, decoding, validation and the PEFT dir written with provenance.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

import torch

from oral.conditions import ConditionConfig, get_text_encoder, model_metadata
from oral.diffusion import DiffusionConfig
from oral.generate import Generator
from oral.generator import GENERATOR_PRESETS, GeneratorConfig, GeneratorNet, generator_config
from oral.lora import LoraSpec, save_adapter
from oral.models import base_id, load_base_config
from oral.tokens import WeightTokenizer

# Config JSONs of 7B-class bases (their published config.json values; no weights), by name.
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
BENCH_PROMPT = "classify the sentiment of movie reviews"


class BenchError(ValueError):
    """A benchmark that cannot run (unknown model config, bad targets, ...)."""


# -----------------------------------------------------------------------------
# Layouts from model configs


def shipped_model_configs() -> list[str]:
    """Names of the model configs shipped with oral (`--spec NAME`)."""
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def model_config(name: str | Path) -> dict:
    """A model config as a dict: a shipped name (mistral-7b, ...), a CONFIG.json path, or any base
    `oral.models.load_base_config` resolves (embedded name, local dir, hub id)."""
    path = Path(name).expanduser()
    if str(name) in shipped_model_configs():
        path = MODEL_CONFIGS / f"{name}.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise BenchError(f"no model config {path}; shipped ones: {', '.join(shipped_model_configs())}")
        return json.loads(path.read_text())
    return load_base_config(str(name)).to_dict()


def bench_spec(name: str | Path, targets: str | list[str] = ("q_proj", "v_proj"), rank: int = 4,
               alpha: int | None = None) -> LoraSpec:
    """The LoRA spec of a base given by its config alone; targets: module names or "all-linear"."""
    targets = targets if isinstance(targets, str) else list(targets)
    return LoraSpec.from_base_config(model_config(name), targets, rank, 2 * rank if alpha is None else alpha)


def default_targets(name: str | Path) -> str | list[str]:
    """The usual LoRA targets of a base: the attention projections of a diffusers UNet (to_q, to_k, to_v,
    to_out.0, as diffusers' LoRA trainers adapt them), else q_proj and v_proj."""
    return ["to_q", "to_k", "to_v", "to_out.0"] if "_class_name" in model_config(name) else ["q_proj", "v_proj"]


def default_preset(spec: LoraSpec) -> str:
    """The generator preset used for a layout: "smol" (768-value tokens, the shipped generator's) when
    every tensor fills whole 768-value tokens, as SmolLM2-135M's r=4 q,v tensors do; else "small"
    (`oral train`'s default)."""
    shapes = [s for m in spec.modules for s in (m.shape_A, m.shape_B)]
    return "smol" if all(a * b % 768 == 0 for a, b in shapes) else "small"


# -----------------------------------------------------------------------------
# An untrained generator of a real layout


class RandomLoraState(Mapping):
    """A LoRA-like random state, each tensor made when read (A ~ N(0, 1/in), B ~ N(0, 1e-4), the size of
    trained B's): a tokenizer is fitted on it without a whole 7B-class adapter in memory."""

    def __init__(self, spec: LoraSpec, seed: int = 0):
        self.shapes = spec.shapes()
        self.index = {k: i for i, k in enumerate(self.shapes)}
        self.fan_in = {m.key_A: m.in_features for m in spec.modules}  # B's have none: std 1e-2
        self.seed = seed

    def __getitem__(self, key: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index[key])
        fan_in = self.fan_in.get(key)
        return torch.randn(self.shapes[key], generator=g) * (fan_in**-0.5 if fan_in else 1e-2)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def bench_generator(spec: LoraSpec, base: str, preset: str | None = None, seed: int = 0,
                    conditions: ConditionConfig | None = None, device: str = "cpu") -> Generator:
    """A `Generator` with untrained weights for one layout: its network of `preset`, a tokenizer
    fitted on one random LoRA state, and c_model of `base` (a dir holding its config.json) cached
    with a random fingerprint part, as a generator trained on that base holds it."""
    conditions = conditions or ConditionConfig()
    preset = preset or default_preset(spec)
    tokenizer = WeightTokenizer(spec, GENERATOR_PRESETS[preset].get("token_size", GeneratorConfig.token_size))
    tokenizer.fit([RandomLoraState(spec, seed)])
    encoder = get_text_encoder(conditions.text_encoder)  # the one the Generator's ConditionEncoder shares
    parts = [encoder.encode([_metadata(base)])[0]] if conditions.model_text else []
    parts.append(torch.randn(conditions.fingerprint_dim, generator=torch.Generator().manual_seed(seed)))
    c_model = torch.cat(parts)  # (Cm,)
    torch.manual_seed(seed)
    net = GeneratorNet(generator_config(preset, model_cond_dim=c_model.numel(), text_cond_dim=encoder.dim))
    config = {
        "format": "oral-generator",
        "step": 0,
        "generator": dataclasses.asdict(net.config),
        "train": {"preset": preset, "diffusion": dataclasses.asdict(DiffusionConfig())},
        "conditions": {**dataclasses.asdict(conditions), "tasks": {"bench": {"descriptions": [BENCH_PROMPT]}},
                       "bases": [{"id": base}]},
        "gauge": "raw",
        "groups": [{"tokenizer": "tokenizers/0", "spec": spec.to_dict(), "num_tokens": tokenizer.num_tokens,
                    "bases": [base]}],
        "zoos": [],
    }
    return BenchGenerator(Path(f"untrained-{preset}"), config, net, [tokenizer], {(0, base_id(base)): c_model},
                          torch.device(device))


class BenchGenerator(Generator):
    """The benchmark's generator: it has one layout, built for its base from that base's config, which may
    be a diffusers model's (a Stable Diffusion UNet) that `Generator.layout_for` cannot read."""

    def layout_for(self, base: str, rank: int | None = None) -> int:
        return 0


def _metadata(base: str) -> str:
    """The metadata sentence of c_model for a base dir holding its config.json (transformers or diffusers)."""
    config = json.loads((Path(base) / "config.json").read_text())
    return model_metadata(config if "_class_name" in config else load_base_config(base))


# -----------------------------------------------------------------------------
# Measuring


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    return _proc_status("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last `reset_peak_rss` (MiB)."""
    return _proc_status("VmHWM")


def reset_peak_rss() -> None:
    """Hand freed heap memory back to the system, then restart the peak-RSS count at the current RSS
    (Linux: /proc/self/clear_refs), so the peak counts what is allocated from now on."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    Path("/proc/self/clear_refs").write_text("5")


def _proc_status(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def bench_generate(spec: str | Path = "smollm2-135m", targets: str | list[str] = ("q_proj", "v_proj"), rank: int = 4,
                   preset: str | None = None, steps: int = 60, sampler: str = "ddim", seed: int = 0,
                   out: str | Path | None = None, device: str = "cpu", chunk: int | None = None,
                   autocast: torch.dtype | None = None) -> dict:
    """Time one adapter made end to end by an untrained generator of a real layout; returns the
    numbers (`oral bench generate --json`). `out`: where the adapter is written (default: a
    temporary dir, removed after). `chunk`, `autocast`: the Generator's settings of those names."""
    lora = bench_spec(spec, targets, rank)
    preset = preset or default_preset(lora)
    with tempfile.TemporaryDirectory(prefix="oral-bench-") as tmp:
        base = Path(tmp) / "base"  # the base as a local dir with its config.json only
        base.mkdir()
        (base / "config.json").write_text(json.dumps(model_config(spec)))
        t0 = time.perf_counter()
        gen = bench_generator(lora, str(base), preset, seed, device=device)
        setup_s = time.perf_counter() - t0
        gen.chunk, gen.autocast = chunk or gen.chunk, autocast
        path = Path(out) if out is not None else Path(tmp) / "adapter"
        reset_peak_rss()
        base_rss = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        adapter_spec, state = gen.generate(str(base), BENCH_PROMPT, seed=seed, steps=steps, sampler=sampler)
        provenance = {**gen.provenance(str(base), BENCH_PROMPT, seed, steps, 1.0, sampler, 0.0), "source": "oral bench"}
        save_adapter(path, adapter_spec, state, provenance=provenance, overwrite=True)
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        peak = peak_rss_mb()
        adapter_bytes = (path / "adapter_model.safetensors").stat().st_size
        if out is None:
            shutil.rmtree(path)
    tok = gen.tokenizers[0]
    generator_params = gen.net.num_params()
    return {
        "spec": str(spec),
        "targets": targets if isinstance(targets, str) else list(targets),
        "rank": rank,
        "preset": preset,
        "params": lora.num_params,
        "modules": len(lora),
        "tokens": tok.num_tokens,
        "token_size": tok.token_size,
        "steps": steps,
        "sampler": sampler,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "us_per_param": round(wall_s / lora.num_params * 1e6, 3),
        "peak_rss_mb": round(peak, 1),
        "base_rss_mb": round(base_rss, 1),
        "peak_extra_mb": round(peak - base_rss, 1),
        "adapter_mb": round(adapter_bytes / 2**20, 1),
        "generator_params": generator_params,
        "generator_mb": round(generator_params * 4 / 2**20, 1),
        "chunk": gen.chunk,
        "scan_block": gen.net.scan_block(),
        "autocast": str(autocast).removeprefix("torch.") if autocast else None,
        "setup_s": round(setup_s, 2),
        "threads": torch.get_num_threads(),
        "device": device,
    }
