"""The one mask type: which weights of each pruned tensor are kept.

Masks are data, stored beside the weights (`masks.safetensors`), never re-derived from
`weight != 0`: a kept weight may legitimately be zero, and any dense update (LoRA merge,
full retraining) would silently erase a mask inferred from zeros.

A mask has its parameter's own name and layout (3-D for fused experts, `[in, out]` for
GPT-2's Conv1D). On disk it is bit-packed, 1 bit per weight, so a 7B model's masks take
about 800 MB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from perp_cli.errors import UsageError

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape) to uint8, 8 weights per byte, big-endian bits."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.bool)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes, shape {tuple(shape)} needs {(numel + 7) // 8}")
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(-1)[:numel].reshape(tuple(int(s) for s in shape))


@dataclass(frozen=True)
class Pattern:
    """`unstructured`, or N:M: at most N nonzeros in every M consecutive inputs."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.structured else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = text.strip().lower()
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise UsageError(f"pattern {text!r} is neither 'unstructured' nor N:M (for example 2:4)")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UsageError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        return cls(n, m)


@dataclass
class MaskSet:
    """Keep-masks by parameter name, plus the pattern they were chosen with.

    `permutations` (RIA's `--permute`): for some masks, the input order in which their
    N:M groups run (`order[p]` = the input at position p; groups are runs of M positions
    of that order). The weights stay in their original order on disk, so such a mask is
    N:M only in the permuted order; a runtime using N:M kernels must permute the
    weight's input columns and its input activations by `order` first.
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    pattern: Pattern = field(default_factory=Pattern)
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __len__(self) -> int:
        return len(self.masks)

    def names(self) -> list[str]:
        return list(self.masks)

    def sparsity(self) -> dict[str, float]:
        return {n: 1.0 - m.float().mean().item() for n, m in self.masks.items()}

    def total_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0


def apply(model: nn.Module, masks: MaskSet) -> None:
    """Zero every masked weight in place (exact zeros, any dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.masks.items():
            p = params[name]
            p.mul_(keep.to(device=p.device, dtype=p.dtype))


def nonzeros_outside(weight: torch.Tensor, keep: torch.Tensor) -> int:
    """How many weights are nonzero where the mask says pruned."""
    return int(((weight != 0) & ~keep.to(weight.device)).sum())


def nm_violations(keep: torch.Tensor, pattern: Pattern, transposed: bool = False, permutation: torch.Tensor | None = None) -> int:
    """Groups of M consecutive inputs holding more than N kept weights.

    The input dimension is the last one, except for GPT-2 Conv1D (`transposed`), where
    the stored weight is `[in, out]` and inputs run along dim -2. With `permutation`
    (`MaskSet.permutations`), the groups are runs of M inputs in that order.
    """
    if not pattern.structured:
        return 0
    k = keep.transpose(-1, -2) if transposed else keep
    if permutation is not None:
        if permutation.numel() != k.shape[-1]:
            return -1
        k = k[..., permutation.to(k.device).long()]
    if k.shape[-1] % pattern.m:
        return -1
    groups = k.reshape(-1, pattern.m).sum(dim=1)
    return int((groups > pattern.n).sum())
