"""A Text-to-LoRA-style hypernetwork: the baseline the generator must beat with the same data.

    condition c = [c_model ; c_text]  ->  for every LoRA module (layer l, module type m):
        h = MLP([W_c c ; E_layer[l] ; E_type[m]])          one trunk shared by all modules
        (A, B) = head_m(h)                                  one linear head per module type

One forward pass per adapter, no diffusion, no sampling: what Text-to-LoRA does (Charakorn et al.,
2025, its "L" variant with a head per module type). Trained by reconstruction on the same zoo
checkpoints and conditions as the generator (each sample: a checkpoint, its base's c_model and one
of its task's training descriptions), MSE on the A and B tensors scaled to unit variance per
(module type, A/B). Files: DIR/config.json, DIR/model.safetensors.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from oral.io import atomic_write_bytes, atomic_write_json, load_safetensors, read_json
from oral.lora import LoraSpec
from oral.progress import progress_bar


@dataclass
class HypernetConfig:
    hidden: int = 512  # trunk width
    depth: int = 2  # trunk layers
    embed: int = 32  # layer and module-type embedding size
    steps: int = 1000  # the generator's quick budget (configs/generator-quick.yaml)
    batch_size: int = 16  # adapters per step
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


class Hypernet(nn.Module):
    def __init__(self, cfg: HypernetConfig, spec: LoraSpec, cond_dim: int):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.types = list(spec.module_types)
        layers = list(spec.layers)
        shapes: dict[str, tuple] = {}
        for m in spec.modules:
            shape = (m.rank, m.in_features, m.out_features)
            if shapes.setdefault(m.module_type, shape) != shape:
                raise ValueError(f"the hypernetwork needs one shape per module type; {m.module_type} has "
                                 f"{shapes[m.module_type]} and {shape}")
        self.shapes = shapes
        self.register_buffer("layer_index", torch.tensor([layers.index(spec.layer_of(m.name)) for m in spec.modules]))
        self.register_buffer("type_index", torch.tensor([self.types.index(m.module_type) for m in spec.modules]))
        # per (module type, A/B): the scale that brings the training tensors to unit variance
        self.register_buffer("scale", torch.ones(len(self.types), 2))
        self.cond = nn.Sequential(nn.Linear(cond_dim, cfg.hidden), nn.SiLU())
        self.layer_emb = nn.Embedding(len(layers), cfg.embed)
        self.type_emb = nn.Embedding(len(self.types), cfg.embed)
        trunk: list[nn.Module] = []
        width = cfg.hidden + 2 * cfg.embed
        for _ in range(cfg.depth):
            trunk += [nn.Linear(width, cfg.hidden), nn.SiLU()]
            width = cfg.hidden
        self.trunk = nn.Sequential(*trunk)
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden, r * (i + o)) for r, i, o in (shapes[t] for t in self.types))

    def forward(self, c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """c (n, C) -> per module in spec order: (A (n, r, in), B (n, out, r)), in unit-variance units."""
        n, M = c.shape[0], len(self.spec.modules)
        h = torch.cat([self.cond(c)[:, None].expand(n, M, -1),
                       self.layer_emb(self.layer_index)[None].expand(n, M, -1),
                       self.type_emb(self.type_index)[None].expand(n, M, -1)], dim=-1)  # (n, M, hidden + 2 embed)
        h = self.trunk(h)  # (n, M, hidden)
        out = []
        for j, t in enumerate(self.type_index.tolist()):
            r, i, o = self.shapes[self.types[t]]
            flat = self.heads[t](h[:, j])  # (n, r (i + o))
            out.append((flat[:, : r * i].view(n, r, i), flat[:, r * i :].view(n, r, o).transpose(1, 2)))
        return out

    def targets(self, states: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training states -> per module (A (n, r, in), B (n, out, r)) in the network's units."""
        out = []
        for m, t in zip(self.spec.modules, self.type_index.tolist()):
            A = torch.stack([s[m.key_A] for s in states]) / self.scale[t, 0]
            B = torch.stack([s[m.key_B] for s in states]) / self.scale[t, 1]
            out.append((A, B))
        return out

    @torch.no_grad()
    def adapter(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """One condition (C,) -> a PEFT-keyed state of `spec`."""
        state = {}
        for m, t, (A, B) in zip(self.spec.modules, self.type_index.tolist(), self(c[None])):
            state[m.key_A] = (A[0] * self.scale[t, 0]).contiguous()
            state[m.key_B] = (B[0] * self.scale[t, 1]).contiguous()
        return state


def train_hypernet(cfg: HypernetConfig, spec: LoraSpec, samples: list[tuple[dict, torch.Tensor, list[torch.Tensor]]],
                   progress: bool = True) -> Hypernet:
    """samples: (state, c_model (Cm,), c_text of each of its task's training descriptions [(Ct,)]) ->
    a hypernetwork trained by reconstruction (AdamW, cosine schedule, `cfg.steps` steps)."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    cond_dim = samples[0][1].numel() + samples[0][2][0].numel()
    net = Hypernet(cfg, spec, cond_dim)
    with torch.no_grad():  # unit variance per (module type, A/B) over the training states
        for t, name in enumerate(net.types):
            mods = [m for m in spec.modules if m.module_type == name]
            for k, key in enumerate(("key_A", "key_B")):
                values = torch.cat([s[getattr(m, key)].flatten() for s, _, _ in samples for m in mods])
                net.scale[t, k] = values.std().clamp_min(1e-8)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    for _ in progress_bar(range(cfg.steps), desc="hypernet", disable=not progress):
        batch = [samples[rng.randrange(len(samples))] for _ in range(cfg.batch_size)]
        c = torch.stack([torch.cat([cm, rng.choice(texts)]) for _, cm, texts in batch])
        loss = sum(((pa - ta) ** 2).mean() + ((pb - tb) ** 2).mean()
                   for (pa, pb), (ta, tb) in zip(net(c), net.targets([s for s, _, _ in batch]))) / len(spec.modules)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.final_loss = float(loss.detach())
    return net.eval()


def save_hypernet(net: Hypernet, path: Path, info: dict) -> None:
    atomic_write_bytes(path / "model.safetensors", safetensors_bytes({k: v.contiguous() for k, v in net.state_dict().items()}))
    atomic_write_json(path / "config.json", {"format": "oral-hypernet", "config": dataclasses.asdict(net.cfg),
                                             "spec": net.spec.to_dict(), "cond_dim": net.cond[0].in_features, **info})


def load_hypernet(path: Path) -> Hypernet:
    fix = f"delete {path}; it is trained again"
    config = read_json(path / "config.json", fix)
    net = Hypernet(HypernetConfig(**config["config"]), LoraSpec.from_dict(config["spec"]), config["cond_dim"])
    net.load_state_dict(load_safetensors(path / "model.safetensors", fix))
    return net.eval()
