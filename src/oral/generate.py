"""Generation: (base, prompt) -> a new PEFT LoRA adapter, with no gradient step on the base.

    gen = Generator.from_pretrained("GEN")
    spec, state = gen.generate("smollm2-135m", "classify the sentiment of movie reviews", seed=0)

Steps: 1) find the LoRA layout the generator learned for this base's architecture (a base it was
not trained for is an error, not garbage); 2) encode c_model (metadata string + weight
fingerprint) and c_text (the prompt); 3) prototypes from the Mamba stack; 4) DDIM (or DDPM)
sampling of every weight token, with classifier-free guidance when guidance != 1; 5) decode the
tokens into a state dict; 6) validate and write it as a plain PEFT adapter dir with provenance.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as safetensors_bytes

from oral.conditions import ConditionConfig, ConditionEncoder, model_metadata, text_hash
from oral.diffusion import Diffusion, DiffusionConfig
from oral.gauge import canonicalize
from oral.generator import GeneratorConfig, GeneratorNet
from oral.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    load_safetensors,
    read_json,
)
from oral.lora import (
    AdapterError,
    LoraSpec,
    adapter_digest,
    load_adapter,
    save_adapter,
    validate_adapter,
    with_base,
)
from oral.models import (
    EMBEDDED,
    IMAGE_BASE_UNET,
    base_id,
    is_unet_base,
    load_base,
    load_base_config,
    resolve,
    weights_fingerprint,
)
from oral.paths import expand_path, oral_home
from oral.tokens import WeightTokenizer
from oral.training import resolve_device

if TYPE_CHECKING:
    from oral.zoo_data import ZooData

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# The generator's files: written by `oral train` (save_generator), read by Generator.from_pretrained
#
#   GEN/config.json              format, format_version, step, the network's and training's configs,
#                                the conditions (bases, tasks and their training descriptions), layouts
#   GEN/model.safetensors        the network's (EMA) weights
#   GEN/conditions.safetensors   c_model per (layout, base) seen in training
#   GEN/tokenizers/<i>/          the weight tokenizer of layout i

FORMAT = "oral-generator"
FORMAT_VERSION = 1  # raise it when a change to these files would make an older reader misread them
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONDITIONS_NAME = "conditions.safetensors"
CARD_NAME = "README.md"
# The generator shipped in the package (safetensors + JSON, fp16 weights), used when none is named.
BUNDLED = Path(__file__).parent / "pretrained" / "smollm2-135m"
BUNDLE_COMMAND = "bash scripts/build_generator.sh"
# A prompt whose nearest training description is less similar than this (cosine, all-MiniLM-L6-v2)
# asks for something the generator was not trained on. Set from the bundled generator's four tasks
# (their 8 held-out descriptions score >= 0.566); 11 of the other 6 tasks' 12 held-out descriptions
# fall below it (scripts/familiarity.py; docs/RESULTS.md, "Knowing when it does not know").
FAMILIAR_SIMILARITY = 0.55


# `oral generate --init ADAPTER` without --strength: how far the generator may move the adapter it refines.
# Chosen on validation: on the family's unseen versions t3 and t4, 0.1 (at 10 DDIM steps: one denoising step,
# from t = 0) scored best of 0.1 / 0.25 / 0.5 / 0.75 in 11 of 12 (version, task) cells (docs/RESULTS.md).
REFINE_STRENGTH = 0.1

# Sampling streams the weight tokens in chunks of this many tokens: a chunk's prototypes, then its whole
# denoising trajectory, then its decoding. The trained small layouts (SmolLM2 r=4 q,v: 300 tokens with
# "smol", 900 with "small") fit in one chunk and are sampled in one piece, as before streaming.
SAMPLE_CHUNK = 1024


class GenerationError(ValueError):
    """A generator or a request it cannot serve (unknown layout, bad files, ...)."""


def save_generator(out: Path, net_cfg: GeneratorConfig, weights: dict[str, torch.Tensor], data: ZooData,
                   train: dict[str, Any], gauge: str, step: int, wall_s: float) -> None:
    """Write a generator (each file atomically): its network weights, the conditions and tokenizers
    of its training data, and config.json (written last: a reader never sees a half-written set)."""
    groups = []
    for i, g in enumerate(data.groups):
        g.tokenizer.save(out / "tokenizers" / str(i))
        groups.append({
            "tokenizer": f"tokenizers/{i}",
            "spec": g.tokenizer.spec.to_dict(),
            "num_tokens": g.tokenizer.num_tokens,
            "num_samples": len(g.tokens),
            "bases": sorted({data.bases[int(b)]["id"] for b in g.base_index}),
        })
    cond = {f"c_model.{gi}.{bi}": v.contiguous() for gi, g in enumerate(data.groups) for bi, v in g.c_model.items()}
    atomic_write_bytes(out / CONDITIONS_NAME, safetensors_bytes(cond))
    atomic_write_bytes(out / WEIGHTS_NAME, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in weights.items()}))
    atomic_write_json(out / CONFIG_NAME, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "wall_s": round(wall_s, 1),
        "generator": dataclasses.asdict(net_cfg),
        "train": train,
        "conditions": {
            **train["conditions"],
            "model_cond_dim": net_cfg.model_cond_dim,
            "text_cond_dim": net_cfg.text_cond_dim,
            "bases": data.bases,
            "tasks": {t: {"descriptions": d, "descriptions_hash": text_hash(d)} for t, d in zip(data.tasks, data.descriptions)},
        },
        "gauge": gauge,
        "groups": groups,
        "zoos": data.zoos,
        "num_samples": data.num_samples,
    })


def read_generator_config(path: Path) -> dict:
    """GEN/config.json, checked: an oral generator of a format version this code reads."""
    fix = f"retrain it with `oral train --out {path}`"
    if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
        raise GenerationError(f"{path} is not a trained generator ({CONFIG_NAME} or {WEIGHTS_NAME} missing); "
                              f"train one with `oral train --zoo ZOO --out {path}`")
    config = read_json(path / CONFIG_NAME, fix)
    if config.get("format") != FORMAT:
        raise GenerationError(f"{path / CONFIG_NAME} is not an oral generator config (format {config.get('format')!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise GenerationError(
            f"{path} is an oral generator of format version {version!r}; this oral reads version {FORMAT_VERSION}: "
            + ("upgrade oral to load it" if newer else fix))
    return config


# -----------------------------------------------------------------------------
# Loading and sampling


def _config_json(config) -> str:
    """A base config (transformers' PretrainedConfig, or an image base's diffusers dict) as one JSON string."""
    if hasattr(config, "to_json_string"):
        return config.to_json_string(use_diff=False)
    return json.dumps(config, sort_keys=True, default=str)


class Generator:
    """A trained generator: network (EMA weights), tokenizers per layout, condition encoder."""

    def __init__(self, path: Path, config: dict, net: GeneratorNet, tokenizers: list, c_model: dict, device: torch.device):
        self.path = path
        self.config = config
        self.net = net.eval()
        self.tokenizers = tokenizers
        self.c_model_cache = c_model  # (group, base id) -> (Cm,)
        self.layout_cache: dict[tuple[str, int | None], int] = {}  # (base config as JSON, rank) -> layout index
        self.device = device
        self.chunk = SAMPLE_CHUNK  # tokens per sampling chunk
        # torch.bfloat16: the denoiser's matmuls in bf16 under autocast (about 2x on CPUs with AVX512-BF16;
        # 0.6% relative error per call, its effect on accuracy not measured). None: fp32 throughout.
        self.autocast: torch.dtype | None = None
        cond = config["conditions"]
        self.conditions = ConditionEncoder(ConditionConfig(**{k: cond[k] for k in ConditionConfig.__dataclass_fields__ if k in cond}))
        self.diffusion = Diffusion(DiffusionConfig(**config["train"]["diffusion"]))

    def __repr__(self) -> str:
        return (f"Generator({self.path}, step {self.config['step']}, {self.net.num_params():,} params, "
                f"{len(self.tokenizers)} layout(s), tasks {list(self.config['conditions']['tasks'])})")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto") -> Generator:
        """Load GEN/config.json, GEN/model.safetensors, GEN/conditions.safetensors, GEN/tokenizers/.

        path: a generator dir (`oral train --out`); None: the generator shipped in the package."""
        path = bundled_generator() if path is None else Path(expand_path(str(path)))
        config = read_generator_config(path)
        fix = (f"reinstall oral or rebuild it with `{BUNDLE_COMMAND}`" if path == BUNDLED
               else f"retrain it with `oral train --out {path}`")
        dev = resolve_device(device)
        net = GeneratorNet(GeneratorConfig(**config["generator"]))
        net.load_state_dict(load_safetensors(path / WEIGHTS_NAME, fix))
        net.to(dev)
        tokenizers = [WeightTokenizer.load(path / g["tokenizer"], fix=fix) for g in config["groups"]]
        for b in config["conditions"]["bases"]:  # a bundled generator names its evolved bases under $ORAL_HOME
            b["id"] = _portable_base(b["id"], expand=True)
        bases = [b["id"] for b in config["conditions"]["bases"]]
        c_model = {}
        for key, v in load_safetensors(path / CONDITIONS_NAME, fix).items():
            _, gi, bi = key.split(".")
            c_model[(int(gi), bases[int(bi)])] = v
        return cls(path, config, net, tokenizers, c_model, dev)

    @property
    def default_guidance(self) -> float:
        """The classifier-free guidance scale used when none is given: the one recorded with the generator
        (`sampling.guidance`, chosen on validation when it was bundled), else 1 (no guidance)."""
        return float(self.config.get("sampling", {}).get("guidance", 1.0))

    @property
    def default_steps(self) -> int:
        """The number of sampling steps used when none is given: recorded with the generator (`sampling.steps`,
        chosen on validation when it was bundled), else 60."""
        return int(self.config.get("sampling", {}).get("steps", 60))

    def sampling(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        """(steps, guidance) as asked, each None replaced by the generator's default."""
        return (self.default_steps if steps is None else steps,
                self.default_guidance if guidance is None else guidance)

    # --- what it knows ---------------------------------------------------------

    def nearest_descriptions(self, prompt: str, k: int = 3) -> list[dict]:
        """The training descriptions closest to `prompt` in the text encoder's space, best first:
        [{"task", "description", "similarity"}] (cosine). A request far from all of them asks for
        something the generator never learned."""
        tasks = self.config["conditions"]["tasks"]
        pairs = [(t, d) for t, v in tasks.items() for d in v["descriptions"]]
        emb = self.conditions.text_condition([prompt] + [d for _, d in pairs])  # (1 + n, Ct)
        sims = torch.nn.functional.cosine_similarity(emb[:1], emb[1:], dim=-1)  # (n,)
        order = sims.argsort(descending=True)[:k].tolist()
        return [{"task": pairs[i][0], "description": pairs[i][1], "similarity": round(float(sims[i]), 4)}
                for i in order]

    def familiarity(self, prompt: str) -> dict:
        """How close `prompt` is to what the generator learned: {"familiar", "nearest": [...]} where
        familiar = the nearest training description's similarity >= FAMILIAR_SIMILARITY."""
        nearest = self.nearest_descriptions(prompt)
        return {"familiar": nearest[0]["similarity"] >= FAMILIAR_SIMILARITY, "nearest": nearest}

    def base_familiarity(self, base: str, group: int, base_model: torch.nn.Module | None = None) -> dict:
        """Whether `base` is a version the generator was trained on, else how far its c_model lies from theirs:
        {"seen", "distance" (L2 to the nearest training base's c_model), "spread" (the largest distance between
        two training bases), "beyond" (it lies past the nearest training base, away from every other one: the
        end of a chain of versions and further), "inside" (seen, or within that spread and not beyond)}.
        Outside, the adapter is an extrapolation; with one training base every other base is outside."""
        trained = [b["id"] for b in self.config["conditions"]["bases"] if (group, b["id"]) in self.c_model_cache]
        c = self.model_condition(base, group, base_model)
        train_c = [self.c_model_cache[(group, b)] for b in trained]
        dists = [float((c - t).norm()) for t in train_c]
        distance = min(dists, default=float("inf"))
        spread = max((float((a - b).norm()) for i, a in enumerate(train_c) for b in train_c[i + 1:]), default=0.0)
        seen = base_id(base) in trained
        beyond = False
        if not seen and len(train_c) > 1:
            near = train_c[dists.index(distance)]
            # past `near` as seen from every other training base: (c - near) points away from each of them
            beyond = all(float((c - near) @ (near - t)) > 0 for t in train_c if t is not near)
        return {"seen": seen, "distance": round(distance, 6), "spread": round(spread, 6), "beyond": beyond,
                "inside": seen or (spread > 0 and distance <= spread and not beyond)}

    # --- layouts ---------------------------------------------------------------

    def layout_for(self, base: str, rank: int | None = None) -> int:
        """The index of the learned LoRA layout that fits `base` (and `rank`, if given). Cached by the base's
        config: building each candidate spec from it (the model on the meta device) is most of a
        few-step generation's time outside sampling."""
        config = load_base_config(base)
        key = (_config_json(config), rank)
        if key not in self.layout_cache:
            self.layout_cache[key] = self._layout_for(base, config, rank)
        return self.layout_cache[key]

    def _layout_for(self, base: str, config, rank: int | None) -> int:
        fits = []
        for gi, tok in enumerate(self.tokenizers):
            spec = tok.spec
            lc = spec.lora_config()
            try:
                cand = LoraSpec.from_base_config(config, spec.target_modules or lc.target_modules, lc.r, lc.lora_alpha,
                                                 rank_pattern=lc.rank_pattern, alpha_pattern=lc.alpha_pattern,
                                                 use_rslora=spec.use_rslora)
            except AdapterError:
                continue
            if with_base(cand, None) == with_base(spec, None) and (rank is None or {m.rank for m in spec.modules} == {rank}):
                fits.append(gi)
        if not fits:
            trained = "; ".join(f"{g['bases']}: {LoraSpec.from_dict(g['spec']).summary()}" for g in self.config["groups"])
            raise GenerationError(
                f"this generator was not trained for base {base!r} ({model_metadata(config)})"
                + (f" at rank {rank}" if rank is not None else "")
                + f"; it knows these layouts: {trained}. Train a generator on a zoo of this architecture "
                  f"(`oral zoo --base {base} ...`, then `oral train`)"
            )
        if len(fits) > 1:
            ranks = sorted({self.tokenizers[gi].spec.modules[0].rank for gi in fits})
            raise GenerationError(f"base {base!r} fits {len(fits)} learned layouts (ranks {ranks}); pick one with rank=")
        return fits[0]

    def needs_base_weights(self, base: str, group: int) -> bool:
        """Whether c_model for `base` needs its weights: the fingerprint is on and the base was not seen in training."""
        return self.conditions.config.fingerprint and (group, base_id(base)) not in self.c_model_cache

    def model_condition(self, base: str, group: int, base_model: torch.nn.Module | None = None) -> torch.Tensor:
        """c_model for `base`: cached for a base seen in training, else computed (loads its weights
        when the fingerprint is on)."""
        key = (group, base_id(base))
        if key in self.c_model_cache:
            return self.c_model_cache[key]
        names = [m.name for m in self.tokenizers[group].spec.modules]
        if self.conditions.config.fingerprint and base_model is None:
            base_model = load_base(base)[0]
        config = base_model.config if base_model is not None else load_base_config(base)
        c = self.conditions.model_condition(config, base_model, names)
        self.c_model_cache[key] = c
        return c

    # --- sampling --------------------------------------------------------------

    @torch.no_grad()
    def sample_tokens(self, group: int, c_model: torch.Tensor, prompt: str, seed: int = 0, steps: int = 60,
                      guidance: float = 1.0, sampler: str = "ddim", eta: float = 0.0, chunk: int | None = None,
                      init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        """Weight tokens (N, D) for one prompt; deterministic given the seed (see `sample_token_chunks`)."""
        tok = self.tokenizers[group]
        x = torch.empty(tok.num_tokens, tok.token_size)  # (N, D)
        for start, part in self.sample_token_chunks(group, c_model, prompt, seed, steps, guidance, sampler, eta, chunk,
                                                    init, strength):
            x[start : start + len(part)] = part.cpu()
        return x * tok.mask  # padding back to 0

    @torch.no_grad()
    def sample_token_chunks(self, group: int, c_model: torch.Tensor, prompt: str, seed: int = 0, steps: int = 60,
                            guidance: float = 1.0, sampler: str = "ddim", eta: float = 0.0,
                            chunk: int | None = None, init: torch.Tensor | None = None,
                            strength: float = 1.0) -> Iterator[tuple[int, torch.Tensor]]:
        """The weight tokens of one adapter as (first row, tokens (n, D)) in order, `chunk` tokens at a time
        (default `self.chunk`): a chunk's prototypes (the Mamba state carried from the chunk before), then its
        whole denoising trajectory. Memory is one chunk's, time linear in N.

        A layout of at most one chunk is sampled in one piece. With DDIM at eta=0 the tokens do not
        depend on the chunk size (up to float rounding in the prototypes): the initial noise is drawn
        chunk by chunk from one generator, which gives the same numbers as one draw. DDPM and eta > 0
        draw fresh noise at every step, chunk by chunk, so there the draw depends on the chunk size.

        init (N, D), strength: refine these tokens (an existing adapter's) instead of sampling from noise
        (`Diffusion.sample`); strength 0 returns them, 1 ignores them.
        """
        tok = self.tokenizers[group]
        dev = self.device
        chunk = chunk or self.chunk
        positions = tok.positions.to(dev)[None]  # (1, N, 4)
        cm = c_model.to(dev)[None]  # (1, Cm)
        ct = self.conditions.text_condition([prompt]).to(dev)  # (1, Ct)
        drop_text = torch.tensor([False], device=dev)
        p_cond = self.net.prototype_chunks(positions, self.net.condition(cm, ct, drop_text), chunk)  # (1, n, d) each
        p_null = (self.net.prototype_chunks(positions, self.net.condition(cm, ct, ~drop_text), chunk)
                  if guidance != 1.0 else itertools.repeat(None))
        rng = torch.Generator().manual_seed(int(seed))
        start = 0
        for pc, pn in zip(p_cond, p_null):
            n = pc.shape[1]
            with torch.autocast(dev.type, dtype=self.autocast, enabled=self.autocast is not None):
                x = self.diffusion.sample(self._denoiser(pc[0], None if pn is None else pn[0], guidance),
                                          (n, tok.token_size), steps=steps, sampler=sampler, eta=eta, generator=rng,
                                          device=dev, init=None if init is None else init[start : start + n],
                                          strength=strength)
            yield start, x
            start += n

    def _denoiser(self, p_cond: torch.Tensor, p_null: torch.Tensor | None, guidance: float) -> Callable:
        """denoise(x (n, D), t (n,)) for tokens with prototypes p_cond (n, d); classifier-free guidance
        against the prototypes of the null prompt p_null (n, d) when guidance != 1."""
        if p_null is None:
            def denoise(x, t):
                return self.net.denoise(x, t, p_cond).float()  # fp32 for the scheduler, also under autocast
        else:
            p_both = torch.cat([p_null, p_cond])  # (2n, d)

            def denoise(x, t):
                pred_null, pred_cond = self.net.denoise(torch.cat([x, x]), torch.cat([t, t]), p_both).float().chunk(2)
                return pred_null + guidance * (pred_cond - pred_null)
        return denoise

    def generate(self, base: str, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 sampler: str = "ddim", eta: float = 0.0, rank: int | None = None,
                 base_model: torch.nn.Module | None = None, c_model: torch.Tensor | None = None,
                 init: tuple | None = None, strength: float = 1.0, snap: bool = False) -> tuple:
        """(base, prompt) -> (spec, state): a LoRA adapter for `base` as a PEFT-keyed state dict.

        base: an embedded name, local dir or hub id (its architecture must be one the generator
        learned). base_model: the loaded base, to skip loading it for the fingerprint. c_model: a
        model condition to use instead of the base's own (the ablations of `oral experiment`).
        guidance, steps: None = `default_guidance`, `default_steps`.
        init (spec, state), strength: refine an existing adapter of the same layout (e.g. one trained on an
        earlier version of `base`) instead of generating from noise: SDEdit on its weight tokens, conditioned on
        `base` and `prompt`. strength 0 returns it unchanged, 1 is plain generation; in between, the larger,
        the more the generator may move it.
        snap: when the prompt is far from every training description (the warning below), generate for the
        nearest training description instead: that task's adapter, rather than what the generator makes of a
        request it never learned (on a held-out image style, the nearest style's LoRA came closer than that:
        docs/RESULTS.md, "Image domain").
        """
        steps, guidance = self.sampling(steps, guidance)
        if not 0.0 <= strength <= 1.0:
            raise GenerationError(f"strength must be between 0 (keep the init adapter) and 1 (ignore it), got {strength}")
        if not prompt or not prompt.strip():
            raise GenerationError("the prompt is empty: describe the task the adapter should do")
        known = self.familiarity(prompt)
        if not known["familiar"]:
            near = known["nearest"][0]
            log.warning("the prompt is far from every task this generator was trained on (%s; nearest: %r of %s, "
                        "similarity %.2f): %s", ", ".join(self.config["conditions"]["tasks"]), near["description"],
                        near["task"], near["similarity"],
                        f"generating {near['task']}'s adapter for that description instead (snap)" if snap else
                        "the adapter is the generator's guess, likely not what was asked (snap=True: the nearest "
                        "task's adapter instead)")
        prompt = self.conditioning_prompt(prompt, snap, known)
        gi = self.layout_for(base, rank)
        if c_model is None:
            c_model = self.model_condition(base, gi, base_model)
            where = self.base_familiarity(base, gi, base_model)
            if not where["inside"]:
                log.warning("%s is not a base this generator was trained on (%s), and its c_model lies outside their range "
                            "(distance %.3g to the nearest, spread %.3g): the adapter is an extrapolation", base,
                            ", ".join(b["id"] for b in self.config["conditions"]["bases"]), where["distance"], where["spread"])
        tok = self.tokenizers[gi]
        init_tokens = None if init is None else self.init_tokens(gi, *init)
        state = {}  # decoded chunk by chunk as the tokens are sampled: no (N, D) buffer
        for start, tokens in self.sample_token_chunks(gi, c_model, prompt, seed, steps, guidance, sampler, eta,
                                                      init=init_tokens, strength=strength):
            tok.decode_rows(tokens, start, state)
        spec = with_base(tok.spec, base_id(base))
        validate_adapter(spec, state, base_model)
        return spec, state

    def init_tokens(self, group: int, spec: LoraSpec, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """An existing adapter as the weight tokens (N, D) of layout `group` (in the generator's gauge), to refine."""
        tok = self.tokenizers[group]
        if with_base(spec, None) != with_base(tok.spec, None):
            raise GenerationError(f"the adapter to refine has the layout {spec.summary()}, but this generator makes "
                                  f"{tok.spec.summary()} for this base: give an adapter of that layout (same targets, "
                                  f"rank and alpha)")
        if self.config["gauge"] == "canonical":
            state = canonicalize(spec, state)
        try:
            return tok.encode(state).tokens.clone()
        except AdapterError as e:
            raise GenerationError(f"the adapter to refine does not fit this generator's layout: {e}") from e

    def conditioning_prompt(self, prompt: str, snap: bool = False, known: dict | None = None) -> str:
        """The text the adapter is generated for: `prompt`, or with `snap`, when the prompt is far from every
        training description, the nearest one. known: `familiarity(prompt)`, when already computed."""
        if not snap:
            return prompt
        known = known or self.familiarity(prompt)
        return prompt if known["familiar"] else known["nearest"][0]["description"]

    def provenance(self, base: str, prompt: str, seed: int, steps: int, guidance: float, sampler: str, eta: float) -> dict:
        return {
            "source": "oral generate",
            "generator": str(self.path.resolve()),
            "generator_step": self.config["step"],
            "zoo_manifest_sha256": [z["manifest_sha256"] for z in self.config["zoos"]],
            "base": base_id(base),
            "prompt": prompt,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler,
            "eta": eta,
            "gauge": self.config["gauge"],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }


def bundled_generator() -> Path:
    """The dir of the generator shipped in the package; an error naming the rebuild if it is absent."""
    if not (BUNDLED / CONFIG_NAME).is_file():
        raise GenerationError(f"this install has no bundled generator ({BUNDLED} is empty); name one with "
                              f"--generator GEN, or build it with `{BUNDLE_COMMAND}`")
    return BUNDLED


def bundle_generator(src: str | Path, out: str | Path = BUNDLED, dtype: torch.dtype = torch.float16,
                     card: str = "", sampling: dict | None = None) -> Path:
    """Copy a trained generator's inference files into `out` (default: the package's bundled dir),
    the network weights stored as `dtype`, with `card` as its README.md. Loading casts them back
    to float32. Training state (checkpoints/, data/, loss log) is left out. `sampling` ({"guidance": g,
    "chosen_by": ...}) records the settings `generate` uses by default."""
    src, out = Path(src), Path(out)
    config = read_generator_config(src)
    fix = f"retrain it with `oral train --out {src}`"
    weights = {k: v.to(dtype) for k, v in load_safetensors(src / WEIGHTS_NAME, fix).items()}
    tokenizers = [WeightTokenizer.load(src / g["tokenizer"], fix=fix) for g in config["groups"]]
    with atomic_dir(out, overwrite=True) as tmp:
        for g, tok in zip(config["groups"], tokenizers):
            tok.save(tmp / g["tokenizer"])
        (tmp / WEIGHTS_NAME).write_bytes(safetensors_bytes(weights))
        (tmp / CONDITIONS_NAME).write_bytes((src / CONDITIONS_NAME).read_bytes())
        config = {**config, "storage_dtype": str(dtype).removeprefix("torch.")}
        config["conditions"] = {**config["conditions"], "bases": [
            {**b, "id": _portable_base(b["id"])} for b in config["conditions"]["bases"]]}
        config["groups"] = [{**g, "bases": [_portable_base(b) for b in g["bases"]]} for g in config["groups"]]
        if sampling:
            config["sampling"] = sampling
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if card:
            (tmp / CARD_NAME).write_text(card)
    return out


def _portable_base(bid: str, expand: bool = False) -> str:
    """A training base's id as a shipped generator records it: a dir under this machine's $ORAL_HOME (an
    evolved version) as `$ORAL_HOME/...`, so the same version built elsewhere is recognized; expand=True
    turns it back into this machine's path."""
    if expand:
        return expand_path(bid) if bid.startswith("$ORAL_HOME/") else bid
    home = str(oral_home().resolve()) + "/"
    return "$ORAL_HOME/" + bid[len(home):] if bid.startswith(home) else bid


def generator_card(gen: str | Path, scores: dict | None = None, sampling: dict | None = None) -> str:
    """A model card (markdown) for a trained generator: what it was trained on, its measured scores on
    held-out descriptions (an `oral experiment` result, or an `oral compare` one), its default sampling,
    and its limits."""
    gen = Path(gen)
    c = read_generator_config(gen)
    tasks = c["conditions"]["tasks"]
    t = c["train"]
    spec = LoraSpec.from_dict(c["groups"][0]["spec"])
    ranks = sorted({m.rank for g in c["groups"] for m in LoraSpec.from_dict(g["spec"]).modules})
    names = {b["id"]: _short_base(b["id"]) for b in c["conditions"]["bases"]}
    if scores and "versions" in scores:  # an experiment names each version's base
        order = {base_id(b): int(v) for v, b in scores["versions"].items()}
        names = {i: n + (f" (t{order[i]})" if i in order else "") for i, n in names.items()}
    lines = [
        f"# oral generator: smollm2-135m, LoRA r={'/'.join(map(str, ranks))} on {', '.join(spec.target_modules)}",
        "",
        "Generates PEFT LoRA adapters for SmolLM2-135M-Instruct (embedded as `smollm2-135m`) from a task",
        "description, with no gradient step: conditional recurrent diffusion over weight tokens (ORAL).",
        "",
        "## Training",
        f"- zoo: {c['num_samples']} LoRA checkpoints; manifest sha256 "
        + ", ".join(f"`{z['manifest_sha256'][:16]}`" for z in c["zoos"]),
        f"- base versions ({len(names)}): {', '.join(sorted(names.values(), key=_version_key))}"
        + ("; the evolved ones are built by `oral evolve --chain --config configs/evolve-chain.yaml`"
           if len(names) > 1 else ""),
        f"- tasks ({len(tasks)}): {', '.join(sorted(tasks))}, each with its training descriptions;"
        " held-out descriptions were never seen",
        f"- generator: preset `{t['preset']}` ({c['generator']['token_size']}-value tokens), {c['step']} steps"
        + (f" (of a {t['steps']}-step schedule)" if t["steps"] != c["step"] else "") + ","
        f" batch {t['batch_size']}, lr {t['lr']}, EMA {t['ema_decay']}, {c.get('gauge', 'raw')} gauge,"
        f" {c['wall_s']:.0f} s of training",
        f"- rebuild: `{BUNDLE_COMMAND}`",
    ]
    if sampling:
        lines += ["", "## Sampling", "",
                  f"`oral generate` uses classifier-free guidance {sampling['guidance']:g}"
                  + (f" and {sampling['steps']} DDIM steps" if sampling.get("steps") else "") + " unless told otherwise"
                  + (f" ({sampling['chosen_by']})" if sampling.get("chosen_by") else "") + "."]
    table = score_table(scores) if scores else []
    if table:
        lines += ["", f"## Measured on held-out descriptions ({table[0]['split']} split)", "",
                  "| base | task | n | base model | trained LoRA | generated (mean +- sd) | recovered |",
                  "|---|---|---|---|---|---|---|"]
        for r in table:
            rec = "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
            lines.append(f"| {r['version']} | {r['task']} | {r['n']} | {r['base']:.3f} | {r['trained']:.3f} | "
                         f"{r['generated_mean']:.3f} +- {r['generated_sd']:.3f} ({r['samples']}) | {rec} |")
        lines += ["", f"`{score_command(scores)}` ({scores['wall_s']:.0f} s)"]
    weak = [r for r in table if r["recovered"] is not None and r["recovered"] < 0.5]
    lines += [
        "",
        "## Limits",
        *[f"- Weak on {r['task']} ({r['version']}): its adapters recover {100 * r['recovered']:.0f}% of the trained"
          " LoRA's gain." for r in weak],
        "- It knows the tasks above on the base versions above. Asked for another task it returns an adapter near",
        "  the nearest known task (the prompt's nearest training descriptions are reported, and a warning is",
        f"  logged below similarity {FAMILIAR_SIMILARITY}); on a base outside its training versions a warning is"
        " logged too.",
        "  How far it carries to unseen tasks and base versions is measured in docs/RESULTS.md (\"Does it generalize?\").",
        "- Seeds give nearly the same adapter: one zoo run per task and version gives one mode per cell.",
        "- The embedded base is dequantized from the Q4_1 GGUF of SmolLM2-135M-Instruct.",
        "",
    ]
    return "\n".join(lines)


def _short_base(bid: str) -> str:
    """A training base as a card names it: the embedded name, or an evolved version's dir name."""
    return bid if bid in EMBEDDED else Path(bid).name


def _version_key(name: str) -> tuple:
    m = re.search(r"\(t(\d+)\)$", name)
    return (int(m.group(1)) if m else -1, name)


def score_table(scores: dict) -> list[dict]:
    """One row per (base version, task) of a scores file: an `oral experiment` result (its base, oracle and
    generated rows) or an `oral compare --json-out` one. Each: version, task, n, split, base, trained,
    generated_mean, generated_sd, samples, recovered (the share of the trained LoRA's gain; None without one)."""
    if "experiment" not in scores:  # oral compare
        return [{"version": "t0", "task": r["task"], "n": r["n"], "split": scores["config"].get("split", "test"),
                 "base": r["base"], "trained": r["trained"], "generated_mean": r["generated_mean"],
                 "generated_sd": r["generated_std"], "samples": len(r["generated"]), "recovered": r["recovered_gain"]}
                for r in scores["rows"]]
    from oral.experiments.runner import DISTANCES, mean_sd

    cells: dict[tuple[int, str], dict[str, list]] = {}
    for r in scores["rows"]:
        if r["method"] in ("base", "oracle", "generated") and r["metric"] not in DISTANCES:
            cells.setdefault((r["version"], r["task"]), {}).setdefault(r["method"], []).append(r)
    out = []
    for (v, task), by in sorted(cells.items()):
        if not all(by.get(m) for m in ("base", "oracle", "generated")):
            continue
        vals = [r["value"] for r in by["generated"]]
        base, trained = by["base"][0]["value"], by["oracle"][0]["value"]
        mean, sd = mean_sd(vals)
        gain = trained - base
        out.append({"version": f"t{v}", "task": task, "n": by["generated"][0]["n"], "split": by["generated"][0]["split"],
                    "base": base, "trained": trained, "generated_mean": mean,
                    "generated_sd": sd, "samples": len(vals),
                    "recovered": (mean - base) / gain if gain > 0 else None})
    return out


def score_command(scores: dict) -> str:
    """The command that measured a scores file (as far as it says)."""
    if "experiment" not in scores:
        cfg = scores["config"]
        return (f"oral compare --descriptions {cfg['descriptions']} --seeds {','.join(map(str, cfg['seeds']))} "
                f"--limit {cfg['limit']}")
    cfg = scores["config"]
    return (f"oral experiment {scores['experiment']}: versions {cfg['versions']}, {cfg['descriptions']} held-out"
            f" descriptions x seeds {cfg['seeds']}, {cfg['limit']} {cfg['split']} examples, {cfg['steps']} DDIM steps")


def list_generators(root: str | Path | None = None) -> list[dict]:
    """The bundled generator and those under ROOT (default $ORAL_HOME/generators): one dict each
    with path, step, tasks, bases, layouts and adapters trained on."""
    root = Path(root) if root is not None else oral_home() / "generators"
    dirs = ([BUNDLED] if (BUNDLED / CONFIG_NAME).is_file() else []) + \
        sorted(p for p in root.glob("*") if (p / CONFIG_NAME).is_file())
    rows = []
    for d in dirs:
        c = read_generator_config(d)
        rows.append({"name": "bundled" if d == BUNDLED else d.name, "path": str(d), "step": c["step"],
                     "tasks": sorted(c["conditions"]["tasks"]), "bases": [b["id"] for b in c["conditions"]["bases"]],
                     "layouts": len(c["groups"]), "num_samples": c["num_samples"]})
    return rows


# -----------------------------------------------------------------------------
# Base fingerprints, cached: a command-line `oral generate` then neither loads nor hashes a known base

FINGERPRINTS = "fingerprints.json"  # {key of the base's weight files: weights_fingerprint}, under $ORAL_HOME/cache


def base_fingerprint(base: str, model: torch.nn.Module | None = None) -> str | None:
    """`weights_fingerprint` of `base` as `load_base` loads it (fp32): from the cache when the base is a
    local dir whose files (names, sizes, mtimes) are unchanged since it was computed, else computed from
    `model` and cached; None when it is not cached and no model is given."""
    image = is_unet_base(base)
    path = Path(base).expanduser().resolve() if image else Path(resolve(base))
    key = None
    if path.is_dir():  # a hub id has no local files to key on: computed every time
        weights = path / IMAGE_BASE_UNET if image else path  # an image base: its UNet's files
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights.iterdir()
                       if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        key = json.dumps([str(path.resolve()), "float32", files])
    cache_path = oral_home() / "cache" / FINGERPRINTS
    cached = _read_fingerprints(cache_path)
    if key in cached:
        return cached[key]
    if model is None:
        return None
    fingerprint = weights_fingerprint(model)
    if key is not None:
        with file_lock(cache_path.with_suffix(".lock")):
            atomic_write_json(cache_path, {**_read_fingerprints(cache_path), key: fingerprint})
    return fingerprint


def _read_fingerprints(path: Path) -> dict:
    try:
        return read_json(path, "") if path.is_file() else {}
    except ValueError:  # a damaged cache is rebuilt
        return {}


def generate_adapters(
    generator: str | Path | Generator | None,
    base: str,
    prompt: str,
    out: str | Path,
    seed: int = 0,
    num: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    rank: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
    init: str | Path | None = None,
    strength: float = 1.0,
    snap: bool = False,
) -> list[Path]:
    """Write `num` validated PEFT adapter dirs (generator None: the bundled one): OUT itself for num=1, else OUT/seed-<s> for seeds
    seed, seed+1, ... Each dir records its provenance (generator, prompt, seed, zoo manifest hash). guidance, steps
    None: the generator's `default_guidance`, `default_steps`. init, strength: refine the PEFT adapter in dir
    `init` (`Generator.generate`) instead of generating from noise. snap: a prompt far from every training
    description gets the nearest description's adapter (`Generator.generate`), recorded as `conditioned_on`."""
    if num < 1:
        raise GenerationError(f"num must be >= 1, got {num}")
    init_adapter = None
    if init is not None:
        try:
            init_adapter = load_adapter(init)
        except (AdapterError, OSError) as e:
            raise GenerationError(f"cannot read the adapter to refine ({init}): {e}") from e
    gen = generator if isinstance(generator, Generator) else Generator.from_pretrained(generator, device=device)
    steps, guidance = gen.sampling(steps, guidance)
    out = Path(out)
    group = gen.layout_for(base, rank)  # a base the generator does not know fails before its weights load
    # The base's weights load only when needed: to fingerprint it for the provenance (once, then cached) or to
    # condition on a base the generator was not trained on. layout_for has checked the adapters' modules and
    # shapes against the base's config.
    fingerprint = base_fingerprint(base)
    base_model = None
    if fingerprint is None or gen.needs_base_weights(base, group):
        base_model = load_base(base)[0]
        fingerprint = base_fingerprint(base, base_model)
    diffusers_layout = None
    if is_unet_base(base):  # a UNet: the dir also holds the file diffusers' load_lora_weights reads
        from oral.image.lora import save_diffusers_lora as diffusers_layout
    used = gen.conditioning_prompt(prompt, snap)  # what the adapters are generated for
    written = []
    for i in range(num):
        s = seed + i
        spec, state = gen.generate(base, prompt, seed=s, steps=steps, guidance=guidance, sampler=sampler, eta=eta, rank=rank,
                                   base_model=base_model, init=init_adapter, strength=strength, snap=snap)
        path = out if num == 1 else out / f"seed-{s}"
        provenance = {**gen.provenance(base, prompt, s, steps, guidance, sampler, eta), "base_fingerprint": fingerprint}
        if used != prompt:
            provenance["conditioned_on"] = used
        if init_adapter is not None:
            provenance.update(init=str(Path(init).resolve()), init_digest=adapter_digest(init_adapter[1]), strength=strength)
        save_adapter(path, spec, state, provenance=provenance, overwrite=overwrite, extra=diffusers_layout)
        written.append(path)
    return written
