"""The weight tokenizer: a LoRA state dict <-> weight tokens (N, D), positions and a padding mask.

Each tensor of the spec (A then B of each module, in spec order) is flattened row-major, cut into
chunks of D values (the last chunk zero-padded, masked out) and normalized with a per-tensor
mean and scale fitted over a set of adapters (as RPG does per layer). Every token carries an
integer position (layer, module type, A/B, chunk index within the tensor).

Exactness: scales are powers of two, so normalizing is exact in floating point; with `center=False`
(the default: LoRA tensors are zero-mean by symmetry) decode(encode(state)) returns the fp32
state bit for bit. With `center=True` it is exact up to one rounding of the mean subtraction.

Streaming: `encode` writes each tensor straight into one preallocated (N, D) buffer and `decode`
writes each tensor straight into its own output; no other full-size copy is made.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save_file

from oral.io import DamagedFileError, atomic_dir, load_safetensors, read_json
from oral.lora import AdapterError, LoraSpec
from oral.progress import progress_bar

TOKENIZER_CONFIG = "tokenizer.json"
TOKENIZER_STATS = "stats.safetensors"
TOKENIZER_FIX = "retrain the generator that holds it (`oral train`), or delete the prepared data that holds it"


@dataclass
class TokenBatch:
    """Weight tokens of one adapter: tokens (N, D) float32, positions (N, 4) long, mask (N, D) bool."""

    tokens: torch.Tensor  # (N, D) normalized values, 0 at padding
    positions: torch.Tensor  # (N, 4) long: layer, module type, A/B (0/1), chunk index in the tensor
    mask: torch.Tensor  # (N, D) bool, True where the value is real (not padding)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.positions.to(device), self.mask.to(device))


@dataclass(frozen=True)
class TensorSlot:
    """Where one state tensor lives in the token sequence."""

    key: str
    shape: tuple[int, int]
    row: int  # first token
    num_rows: int  # tokens used: ceil(numel / D)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class WeightTokenizer:
    """LoRA state <-> weight tokens for one spec and token size D; per-tensor stats from `fit`."""

    def __init__(self, spec: LoraSpec, token_size: int) -> None:
        if token_size <= 0:
            raise ValueError(f"token_size must be positive, got {token_size}")
        self.spec = spec
        self.token_size = int(token_size)
        D = self.token_size
        self.layout: list[TensorSlot] = []
        row = 0
        for m in spec.modules:
            for key, shape in ((m.key_A, m.shape_A), (m.key_B, m.shape_B)):
                n_rows = math.ceil(shape[0] * shape[1] / D)
                self.layout.append(TensorSlot(key, shape, row, n_rows))
                row += n_rows
        self.num_tokens = row
        # Identity statistics until `fit` (or `load`): encode is then a pure reshape.
        self.mean = torch.zeros(len(self.layout), dtype=torch.float32)  # (K,)
        self.scale = torch.ones(len(self.layout), dtype=torch.float32)  # (K,) powers of two
        self.center = False
        self.num_fitted = 0
        self._positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"WeightTokenizer({len(self.spec)} modules, {self.spec.num_params:,} params -> "
                f"{self.num_tokens:,} tokens x {self.token_size}, fitted on {self.num_fitted} adapters)")

    # --- positions and mask (depend on the spec only; built once, shared) -----

    @property
    def positions(self) -> torch.Tensor:
        """(N, 4) long: layer, module-type index, A/B, chunk. Shared by every encode: do not modify."""
        if self._positions is None:
            types = {t: i for i, t in enumerate(self.spec.module_types)}
            pos = torch.empty(self.num_tokens, 4, dtype=torch.long)
            for slot, m in zip(self.layout, (m for m in self.spec.modules for _ in range(2))):
                rows = slice(slot.row, slot.row + slot.num_rows)
                pos[rows, 0] = self.spec.layer_of(m.name)
                pos[rows, 1] = types[m.module_type]
                pos[rows, 2] = 0 if slot.key == m.key_A else 1
                pos[rows, 3] = torch.arange(slot.num_rows)
            self._positions = pos
        return self._positions

    @property
    def mask(self) -> torch.Tensor:
        """(N, D) bool, True at real values. Shared by every encode: do not modify."""
        if self._mask is None:
            mask = torch.ones(self.num_tokens, self.token_size, dtype=torch.bool)
            for slot in self.layout:
                tail = slot.numel - (slot.num_rows - 1) * self.token_size  # real values in the last token
                mask[slot.row + slot.num_rows - 1, tail:] = False
            self._mask = mask
        return self._mask

    # --- statistics ---------------------------------------------------------------

    def fit(self, states: Iterable[Mapping[str, torch.Tensor]], center: bool = False) -> "WeightTokenizer":
        """Per-tensor statistics over many adapters, streamed (one state in memory at a time).

        scale = the power of two nearest the tensor's std (RMS about 0 when `center=False`);
        mean = the tensor's mean when `center=True`, else 0.
        """
        K = len(self.layout)
        count = torch.zeros(K, dtype=torch.float64)
        total = torch.zeros(K, dtype=torch.float64)
        total_sq = torch.zeros(K, dtype=torch.float64)
        n = 0
        for state in progress_bar(states, desc="tokenizer stats", unit="adapter"):
            self._check_state(state)
            for i, slot in enumerate(self.layout):
                x = state[slot.key].detach().to("cpu", torch.float64)
                count[i] += x.numel()
                total[i] += x.sum()
                total_sq[i] += (x * x).sum()
            n += 1
        if n == 0:
            raise ValueError("fit needs at least one adapter state")
        mean = total / count if center else torch.zeros(K, dtype=torch.float64)
        var = (total_sq / count - mean * mean).clamp_min(0)
        std = var.sqrt()
        # Powers of two make x / scale and x * scale exact; a zero std keeps scale 1.
        scale = torch.where(std > 0, torch.exp2(torch.round(torch.log2(std.clamp_min(1e-30)))), torch.ones_like(std))
        self.mean = mean.to(torch.float32)
        self.scale = scale.to(torch.float32)
        self.center = center
        self.num_fitted = n
        return self

    # --- encode / decode ------------------------------------------------------------

    def _check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [s.key for s in self.layout if s.key not in state]
        if missing:
            raise AdapterError(f"state lacks {len(missing)} key(s) of the tokenizer's spec, e.g. {missing[:2]}; "
                               f"was it made for another spec?")
        for slot in self.layout:
            if tuple(state[slot.key].shape) != slot.shape:
                raise AdapterError(f"{slot.key}: shape {tuple(state[slot.key].shape)}, the tokenizer's spec needs {slot.shape}")

    def encode(self, state: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> TokenBatch:
        """state -> TokenBatch. Values go straight into `out` (N, D) float32 if given, else a new buffer.

        Keys of `state` beyond the spec are ignored; positions and mask are the shared ones.
        """
        self._check_state(state)
        N, D = self.num_tokens, self.token_size
        if out is None:
            out = torch.empty(N, D, dtype=torch.float32)
        elif tuple(out.shape) != (N, D) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {(N, D)}")
        flat = out.view(-1)  # (N*D,)
        for i, slot in enumerate(self.layout):
            start, n = slot.row * D, slot.numel
            dst = flat[start : start + n]
            dst.copy_(state[slot.key].detach().reshape(-1))  # a view for contiguous inputs: no copy
            if self.center:
                dst.sub_(self.mean[i])
            dst.div_(self.scale[i])
            flat[start + n : start + slot.num_rows * D].zero_()  # padding
        return TokenBatch(out, self.positions, self.mask)

    def decode(self, tokens: torch.Tensor | TokenBatch, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """tokens (N, D) -> state, the exact inverse of `encode`; padding is ignored.

        Each tensor is copied (and moved to CPU) on its own, so tokens on an accelerator never
        travel whole.
        """
        if isinstance(tokens, TokenBatch):
            tokens = tokens.tokens
        if tuple(tokens.shape) != (self.num_tokens, self.token_size):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; this tokenizer makes "
                             f"{(self.num_tokens, self.token_size)}")
        state = self.decode_rows(tokens, 0, {})
        if dtype != torch.float32:
            for key in state:
                state[key] = state[key].to(dtype)
        return state

    def decode_rows(self, tokens: torch.Tensor, start: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decode token rows start .. start+n (tokens (n, D)) into the parts of the tensors of `state` they
        hold, allocating a tensor (float32) at its first row: an adapter is decoded while its tokens are
        still being sampled, with no (N, D) buffer. Rows given in order, all of them once, make `decode`."""
        D, n = self.token_size, tokens.shape[0]
        flat = tokens.detach().contiguous().view(-1)  # (n*D,)
        for i, slot in enumerate(self.layout):
            lo, hi = max(slot.row, start), min(slot.row + slot.num_rows, start + n)  # its rows in this chunk
            if lo >= hi:
                continue
            if slot.key not in state:
                state[slot.key] = torch.empty(slot.shape, dtype=torch.float32)
            a, b = (lo - slot.row) * D, min((hi - slot.row) * D, slot.numel)  # its values in this chunk
            dst = state[slot.key].view(-1)[a:b]
            dst.copy_(flat[(lo - start) * D : (lo - start) * D + b - a])
            dst.mul_(self.scale[i])
            if self.center:
                dst.add_(self.mean[i])
        return state

    # --- persistence ------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (spec, token size) and `stats.safetensors` (mean, scale), atomically."""
        path = Path(path)
        config = {
            "token_size": self.token_size,
            "num_tokens": self.num_tokens,
            "center": self.center,
            "num_fitted": self.num_fitted,
            "keys": [s.key for s in self.layout],
            "spec": self.spec.to_dict(),
        }
        with atomic_dir(path, overwrite=True) as tmp:
            (tmp / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
            save_file({"mean": self.mean.contiguous(), "scale": self.scale.contiguous()}, str(tmp / TOKENIZER_STATS))
        return path

    @classmethod
    def load(cls, path: str | Path, fix: str = TOKENIZER_FIX) -> "WeightTokenizer":
        """Read what `save` wrote; a damaged file raises DamagedFileError naming it and `fix`."""
        path = Path(path)
        if not (path / TOKENIZER_CONFIG).exists():
            raise FileNotFoundError(f"{path} holds no weight tokenizer ({TOKENIZER_CONFIG} missing)")
        config = read_json(path / TOKENIZER_CONFIG, fix)
        try:
            tok = cls(LoraSpec.from_dict(config["spec"]), config["token_size"])
            keys, num_tokens = config["keys"], config["num_tokens"]
            tok.center, tok.num_fitted = bool(config["center"]), int(config["num_fitted"])
        except (KeyError, TypeError) as e:
            raise DamagedFileError(path / TOKENIZER_CONFIG, f"bad or missing field {e}", fix) from None
        if [s.key for s in tok.layout] != keys or tok.num_tokens != num_tokens:
            raise DamagedFileError(path / TOKENIZER_CONFIG, "its layout does not match its spec", fix)
        stats = load_safetensors(path / TOKENIZER_STATS, fix)
        K = len(tok.layout)
        if any(k not in stats or stats[k].shape != (K,) for k in ("mean", "scale")):
            raise DamagedFileError(path / TOKENIZER_STATS, f"expected tensors mean and scale of shape ({K},)", fix)
        tok.mean, tok.scale = stats["mean"], stats["scale"]
        return tok
