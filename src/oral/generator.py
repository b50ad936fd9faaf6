"""The network: a recurrent (Mamba) model that makes one prototype per weight token, and a per-token
denoiser f(u_j, t | p_j) that predicts the clean token (or the noise, or v: Diffusion's prediction_type).

    positions (B, N, 4)  --sinusoids-->  pos_emb (B, N, d)
    c = proj([c_model ; c_text or null])  (B, d)
    pos_emb + c  --Mamba stack-->  prototypes p (B, N, d)
    pred = denoiser(u_j, t, p_j)          (one token at a time; all tokens of all samples batched)

As in RPG, the recurrent model reads positions and the condition, not the noisy tokens: the
prototypes are computed once per sample, and each denoising step only runs the small denoiser.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import MambaConfig, MambaModel

DENOISERS = ("mlp", "conv")


class _NoCudaKernelNotice(logging.Filter):
    """Drops transformers' "install mamba_ssm / causal_conv1d for the optimized kernel" notices: those
    kernels are CUDA-only, so on a machine without CUDA the notice has no action to offer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "falling back to its reference PyTorch implementation" not in record.getMessage()


if not torch.cuda.is_available():
    logging.getLogger("transformers.integrations.hub_kernels").addFilter(_NoCudaKernelNotice())


@dataclass
class GeneratorConfig:
    token_size: int = 256  # D: values per weight token
    d_model: int = 256  # width of the Mamba stack and of the prototypes
    n_layers: int = 2  # Mamba layers
    d_state: int = 16  # Mamba state size
    expand: int = 2  # Mamba inner width = expand * d_model
    denoiser: str = "mlp"  # "mlp" (adaLN residual MLP) or "conv" (RPG's 1-D conv net over the token)
    denoiser_width: int = 512  # mlp: hidden width
    denoiser_depth: int = 3  # mlp: residual blocks
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 64, 32])  # conv: hidden channels
    conv_kernel: int = 7  # conv: kernel size
    max_tokens: int = 0  # > 0: also a learned embedding per sequence index (< max_tokens), zero-initialized
    model_cond_dim: int = 0  # c_model feature size (set from the conditions)
    text_cond_dim: int = 384  # c_text feature size (set from the text encoder)

    def __post_init__(self):
        if self.denoiser not in DENOISERS:
            raise ValueError(f"unknown denoiser {self.denoiser!r}; choose one of {', '.join(DENOISERS)}")
        if self.d_model % 8:
            raise ValueError(f"d_model must be a multiple of 8 (four sinusoid position parts), got {self.d_model}")


# Named sizes (DiT-style registry). token_size is part of the preset: it fixes the weight tokenizer.
GENERATOR_PRESETS: dict[str, dict] = {
    "tiny": dict(token_size=64, d_model=64, n_layers=1, d_state=8, denoiser_width=128, denoiser_depth=2),
    # SmolLM2-135M, r=4 on q,v: 768-value tokens cut its tensors (4x576, 576x4, 192x4) with no padding.
    "smol": dict(token_size=768, d_model=128, n_layers=2, d_state=8, denoiser_width=768, denoiser_depth=2),
    "small": dict(token_size=256, d_model=256, n_layers=2, denoiser_width=512, denoiser_depth=3),
    "base": dict(token_size=512, d_model=512, n_layers=2, d_state=32, denoiser_width=1024, denoiser_depth=4),
    "rpg-conv": dict(token_size=256, d_model=256, n_layers=2, denoiser="conv"),
    "large": dict(token_size=1024, d_model=1024, n_layers=2, d_state=64, denoiser_width=2048, denoiser_depth=4),
}


def generator_config(preset: str, **overrides) -> GeneratorConfig:
    """A preset's GeneratorConfig with some fields overridden."""
    if preset not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {preset!r}; choose one of {', '.join(GENERATOR_PRESETS)}")
    names = {f.name for f in dataclasses.fields(GeneratorConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown generator setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return GeneratorConfig(**{**GENERATOR_PRESETS[preset], **overrides})


# -----------------------------------------------------------------------------
# Embeddings


def sinusoid(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """x: (...) numbers -> (..., dim) [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PositionEmbedding(nn.Module):
    """(layer, module, A/B, chunk) -> sinusoids of each part, concatenated and mixed by a linear map."""

    def __init__(self, d_model: int):
        super().__init__()
        self.part = d_model // 4
        self.mix = nn.Linear(4 * self.part, d_model)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: (B, N, 4) long -> (B, N, d_model)
        parts = [sinusoid(positions[..., i], self.part) for i in range(4)]
        return self.mix(torch.cat(parts, dim=-1))


class TimestepEmbedding(nn.Module):
    """t -> sinusoid -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t, self.freq_dim))  # (M, dim)


# -----------------------------------------------------------------------------
# Denoisers: f(u, t | p) -> the prediction for one noisy token u (D values) with prototype p


class AdaLNBlock(nn.Module):
    """Residual MLP block whose LayerNorm scale/shift and output gate come from the conditioning."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.ada = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(cond)).chunk(3, dim=-1)
        return h + (1 + gate) * self.mlp(self.norm(h) * (1 + scale) + shift)


class MLPDenoiser(nn.Module):
    """u (M, D), t (M,), p (M, d) -> prediction (M, D). The prototype enters both additively and via adaLN."""

    def __init__(self, token_size: int, d_model: int, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(token_size, width)
        self.proto = nn.Linear(d_model, width)
        self.time = TimestepEmbedding(width)
        self.blocks = nn.ModuleList([AdaLNBlock(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, token_size)

    def forward(self, u: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        cond = self.proto(p) + self.time(t)  # (M, width)
        h = self.inp(u) + cond
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.norm(h))


class ConvDenoiser(nn.Module):
    """RPG's denoiser shape: a 1-D conv net over the token's D values (channels 1 -> ... -> 1), with
    the prototype (mapped to D values) and the time embedding added before every conv, and
    encoder-decoder skips."""

    def __init__(self, token_size: int, d_model: int, channels: list[int], kernel: int):
        super().__init__()
        chans = [1, *channels, 1]
        self.proto = nn.Linear(d_model, token_size)
        self.time = TimestepEmbedding(token_size)
        self.convs = nn.ModuleList(nn.Conv1d(a, b, kernel, padding=kernel // 2) for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(1, b) for b in chans[1:-1])
        self.n_down = len(chans) // 2 + 1  # encoder convs; the outputs of all but the last two feed the skips

    def forward(self, u: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        c = (self.proto(p) + self.time(t))[:, None, :]  # (M, 1, D)
        h = u[:, None, :]  # (M, 1, D)
        skips = []
        for i, conv in enumerate(self.convs):
            if i >= self.n_down and skips:
                h = h + skips.pop()
            h = conv(h + c)
            if i < len(self.norms):
                h = F.silu(self.norms[i](h))
                if i < self.n_down - 2:
                    skips.append(h)
        return h[:, 0, :]


# -----------------------------------------------------------------------------
# The Mamba stack over a sequence in chunks, its state carried (transformers' MambaModel restarts the
# selective scan from zero for every multi-token input, so its cache cannot chain chunks)


# Values in one tensor of a chunked scan block. 2**21 (8 MiB) gives 256-token blocks for the "small" preset;
# measured on 16k tokens (1 thread): 256-token blocks 2.2 s, 1024 3.3 s, one 16k-token scan 7.3 s and 3 GiB.
SCAN_VALUES = 2**21


@dataclass
class MambaState:
    """What a Mamba stack carries from one chunk to the next, per layer."""

    conv: list[torch.Tensor]  # (B, ED, K-1): the last K-1 inputs of the causal conv
    ssm: list[torch.Tensor]  # (B, ED, S): the selective scan's state


def _mixer_inputs(mixer: nn.Module, h: torch.Tensor, conv: torch.Tensor | None) -> tuple:
    """A MambaMixer's input side over h (B, L, d) that follows the inputs that left the causal conv's state
    `conv` (B, ED, K-1) (None: zeros, the sequence starts here) -> (x, gate, dt (B, ED, L), Bm, Cm (B, L, S),
    the conv's state after h)."""
    B = h.shape[0]
    ED, S, K = mixer.intermediate_size, mixer.ssm_state_size, mixer.conv_kernel_size
    x, gate = mixer.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (B, ED, L) each
    x = torch.cat([x.new_zeros(B, ED, K - 1) if conv is None else conv, x], dim=-1)  # (B, ED, K-1+L)
    conv = x[:, :, -(K - 1):]
    x = mixer.act(F.conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, groups=ED))  # (B, ED, L)
    dt, Bm, Cm = torch.split(mixer.x_proj(x.transpose(1, 2)), [mixer.time_step_rank, S, S], dim=-1)  # (B, L, R|S|S)
    dt = F.softplus(mixer.dt_proj.weight @ dt.transpose(1, 2) + mixer.dt_proj.bias.float()[:, None])  # (B, ED, L)
    return x, gate, dt, Bm, Cm, conv


def _mixer_output(mixer: nn.Module, states: torch.Tensor, Cm: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """A MambaMixer's output side: the scan's states (B, ED, L, S) read out by Cm, the skip, the gate, out_proj."""
    y = torch.einsum("bels,bls->bel", states, Cm.float())  # (B, ED, L)
    y = (y + x * mixer.D.float()[None, :, None]) * F.silu(gate)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))


def mixer_chunk(mixer: nn.Module, h: torch.Tensor, conv: torch.Tensor | None, ssm: torch.Tensor | None) -> tuple:
    """One MambaMixer (transformers' reference path, mambapy's parallel scan) over the chunk h (B, L, d)
    that follows the chunk which left (conv, ssm); None = the sequence starts here. -> (out (B, L, d), conv, ssm).
    Inference only: the scan runs in place in preallocated buffers."""
    from mambapy.pscan import PScan

    B, L, _ = h.shape
    ED, S = mixer.intermediate_size, mixer.ssm_state_size
    x, gate, dt, Bm, Cm, conv = _mixer_inputs(mixer, h, conv)
    L2 = 1 << (L - 1).bit_length()  # the scan runs on a power-of-two length; the padding comes last
    dA = torch.zeros(B, ED, L2, S, dtype=dt.dtype, device=dt.device)  # (B, ED, L2, S)
    dBx = torch.zeros_like(dA)
    torch.mul(dt[..., None], -torch.exp(mixer.A_log.float())[None, :, None, :], out=dA[:, :, :L]).exp_()  # exp(dt A)
    torch.mul((dt * x)[..., None], Bm[:, None, :, :], out=dBx[:, :, :L])  # dt B x
    if ssm is not None:
        dBx[:, :, 0] += dA[:, :, 0] * ssm  # h_0 = dA_0 h_prev + dBx_0
    PScan.pscan(dA, dBx)  # in place: dBx[:, :, t] = the state after token t
    return _mixer_output(mixer, dBx[:, :, :L], Cm, x, gate, h.dtype), conv, dBx[:, :, L - 1].clone()


def mamba_chunk(mamba: MambaModel, x: torch.Tensor, state: MambaState | None) -> tuple[torch.Tensor, MambaState]:
    """MambaModel(inputs_embeds=x) for a chunk x (B, L, d) that follows the chunks which left `state`
    (None: the first) -> (last_hidden_state (B, L, d), the state after it)."""
    conv, ssm = [], []
    h = x
    for i, block in enumerate(mamba.layers):
        out, c, s = mixer_chunk(block.mixer, block.norm(h), *((state.conv[i], state.ssm[i]) if state else (None, None)))
        h = h + out
        conv.append(c)
        ssm.append(s)
    return mamba.norm_f(h), MambaState(conv, ssm)


def pow2_blocks(n: int) -> list[int]:
    """The powers of two that sum to n, largest first (300 -> [256, 32, 8, 4])."""
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


def scan_states(dA: torch.Tensor, dBx: torch.Tensor) -> torch.Tensor:
    """h_t = dA_t h_(t-1) + dBx_t over dA, dBx (B, ED, L, S) -> every h_t (B, ED, L, S), differentiable.

    mambapy's parallel scan pads a sequence to the next power of two (300 tokens scan as 512, the
    padding allocated and zeroed in the forward and the backward): here the sequence is scanned in
    power-of-two blocks instead, each block's first state taking the last state of the block before."""
    from mambapy.pscan import pscan  # (B, L, ED, S) in and out

    parts, h, start = [], None, 0
    for n in pow2_blocks(dA.shape[2]):
        a, x = dA[:, :, start : start + n], dBx[:, :, start : start + n]
        if h is not None:
            x = torch.cat([x[:, :, :1] + a[:, :, :1] * h[:, :, None], x[:, :, 1:]], dim=2)
        states = pscan(a.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)  # (B, ED, n, S)
        parts.append(states)
        h, start = states[:, :, -1], start + n
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def mixer_forward(mixer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One MambaMixer over a whole sequence h (B, L, d) -> (B, L, d): transformers' reference path
    (conv, selective scan, gate), with the scan of `scan_states`. Differentiable (training)."""
    x, gate, dt, Bm, Cm, _ = _mixer_inputs(mixer, h, None)
    dA = torch.exp(dt[..., None] * -torch.exp(mixer.A_log.float())[None, :, None, :])  # (B, ED, L, S)
    dBx = (dt[..., None] * Bm[:, None, :, :].float()) * x[..., None].float()  # (B, ED, L, S)
    return _mixer_output(mixer, scan_states(dA, dBx), Cm, x, gate, h.dtype)


def mamba_forward(mamba: MambaModel, x: torch.Tensor) -> torch.Tensor:
    """MambaModel(inputs_embeds=x).last_hidden_state for x (B, L, d), with `mixer_forward`'s scan."""
    h = x
    for block in mamba.layers:
        out = mixer_forward(block.mixer, block.norm(h.to(block.norm.weight.dtype)))
        h = (h.float() if block.residual_in_fp32 else h) + out
    return mamba.norm_f(h)


# -----------------------------------------------------------------------------
# The generator network


class GeneratorNet(nn.Module):
    """The network inside a trained Generator: prototypes from (positions, condition) through Mamba,
    per-token denoising from prototypes."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = c = config
        cond_in = c.model_cond_dim + c.text_cond_dim
        self.null_text = nn.Parameter(torch.randn(c.text_cond_dim) * 0.02)  # the "no prompt" condition
        self.cond = nn.Sequential(nn.Linear(cond_in, c.d_model), nn.SiLU(), nn.Linear(c.d_model, c.d_model))
        self.pos = PositionEmbedding(c.d_model)
        if c.max_tokens > 0:  # RPG's learned-position variant: one free vector per token of the sequence
            self.token_emb = nn.Parameter(torch.zeros(c.max_tokens, c.d_model))
        mamba = MambaConfig(
            vocab_size=1,  # unused: the stack reads embeddings
            hidden_size=c.d_model,
            state_size=c.d_state,
            num_hidden_layers=c.n_layers,
            expand=c.expand,
            conv_kernel=4,
            use_mambapy=True,  # parallel scan on CPU; without it the backward is ~50x slower
            use_cache=False,
        )
        self.mamba = MambaModel(mamba)
        if c.denoiser == "mlp":
            self.denoiser = MLPDenoiser(c.token_size, c.d_model, c.denoiser_width, c.denoiser_depth)
        else:
            self.denoiser = ConvDenoiser(c.token_size, c.d_model, list(c.conv_channels), c.conv_kernel)

    def condition(self, c_model: torch.Tensor, c_text: torch.Tensor, drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """c_model (B, Cm), c_text (B, Ct), drop_text (B,) bool -> c (B, d_model)."""
        if drop_text is not None:
            c_text = torch.where(drop_text[:, None], self.null_text.expand_as(c_text), c_text)
        return self.cond(torch.cat([c_model, c_text], dim=-1))

    def prototypes(self, positions: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """positions (B, N, 4) long, c (B, d_model) -> prototypes (B, N, d_model)."""
        return mamba_forward(self.mamba, self._mamba_input(positions, c))

    def prototype_chunks(self, positions: torch.Tensor, c: torch.Tensor, chunk: int,
                         block: int | None = None) -> Iterator[torch.Tensor]:
        """The prototypes of `prototypes`, `chunk` tokens at a time, scanned in blocks of `block` tokens
        (default `scan_block()`) with the Mamba state carried from one block to the next: memory O(block)
        instead of O(N). Yields (B, <= chunk, d_model) in order; one chunk (N <= chunk) is exactly
        `prototypes`, more agree with it to float rounding."""
        N = positions.shape[1]
        if N <= chunk:
            yield self.prototypes(positions, c)
            return
        block = min(block or self.scan_block(), chunk)
        state = None
        for start in range(0, N, chunk):
            parts = []
            for s in range(start, min(start + chunk, N), block):
                x = self._mamba_input(positions[:, s : min(s + block, start + chunk)], c, s)  # (B, n, d)
                h, state = mamba_chunk(self.mamba, x, state)
                parts.append(h)
            yield torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def scan_block(self) -> int:
        """Tokens per block of the chunked Mamba scan: a power of two (the parallel scan pads to one) whose
        scan tensors (block x ED x S values) hold about SCAN_VALUES values, at least 64 tokens."""
        c = self.config
        return max(64, 1 << (SCAN_VALUES // (c.expand * c.d_model * c.d_state)).bit_length() - 1)

    def _mamba_input(self, positions: torch.Tensor, c: torch.Tensor, start: int = 0) -> torch.Tensor:
        """positions (B, n, 4) of tokens start .. start+n, c (B, d) -> the Mamba stack's input (B, n, d)."""
        x = self.pos(positions) + c[:, None, :]  # (B, n, d)
        if self.config.max_tokens > 0:
            end = start + positions.shape[1]
            if end > self.config.max_tokens:
                raise ValueError(f"{end} weight tokens, but this generator has learned embeddings for {self.config.max_tokens}")
            x = x + self.token_emb[start:end]
        return x

    def denoise(self, u: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """u (M, D), t (M,), p (M, d_model) -> prediction (M, D)."""
        return self.denoiser(u, t, p)

    def forward(
        self,
        positions: torch.Tensor,
        c_model: torch.Tensor,
        c_text: torch.Tensor,
        drop_text: torch.Tensor,
        token_index: torch.Tensor,
        u: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """The training pass (one call, so DDP sees it): the prediction for a subset of each sample's tokens.

        positions (B, N, 4), c_model (B, Cm), c_text (B, Ct), drop_text (B,) bool,
        token_index (B, K) long, u (B*K, D) noisy tokens, t (B*K,) -> prediction (B*K, D).
        """
        p = self.prototypes(positions, self.condition(c_model, c_text, drop_text))  # (B, N, d)
        idx = token_index[..., None].expand(-1, -1, p.shape[-1])  # (B, K, d)
        p = torch.gather(p, 1, idx).reshape(-1, p.shape[-1])  # (B*K, d)
        return self.denoise(u, t, p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
