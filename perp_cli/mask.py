"""The one mask type: which weights of each pruned tensor are kept.

Masks are data, stored beside the weights (`masks.safetensors`), never re-derived from
`weight != 0`: a kept weight may legitimately be zero, and any dense update (LoRA merge,
full retraining) would silently erase a mask inferred from zeros.

A mask has its parameter's own name and layout (3-D for fused experts, `[in, out]` for
GPT-2's Conv1D). On disk and in memory it is bit-packed, 1 bit per weight, so a 7B
model's masks take about 800 MB (as bool tensors they would take 7 GB, more than half of
the bf16 weights): `PackedMasks` unpacks one mask at a time, when it is read.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perp_cli import arch
from perp_cli.errors import CheckpointError, UsageError

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
# `x * _GATHER >> 56` moves the low bit of byte i of a little-endian int64 word to bit 7 − i
# of the top byte (the products' bits never overlap, so there is no carry), as int64
_GATHER = 0x8040201008040201 - 2**64
# byte value -> its 8 bits as 8 bool bytes (most significant first), read as one int64
_BYTE_BITS = torch.arange(256, dtype=torch.uint8).reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).view(torch.int64).reshape(-1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape) to uint8, 8 weights per byte, big-endian bits.

    Each 8 bools are read as one int64 word and gathered by one multiplication (a pass
    over 1/8 of the elements instead of a widening product and a sum over all of them)."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.bool)])
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if sys.byteorder != "little":
        return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)
    if flat.storage_offset() % 8 or not flat.is_contiguous():
        flat = flat.clone()  # a word view needs 8-byte aligned, contiguous bools
    words = flat.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape` (one table look-up per byte;
    `index_select` with int32 indices, where `table[index]` would widen them to int64 first:
    4x faster, and the temporaries at 1/2 instead of 1.5 bytes per weight)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes, shape {tuple(shape)} needs {(numel + 7) // 8}")
    bits = torch.index_select(_BYTE_BITS.to(packed.device), 0, packed.reshape(-1).int()).view(torch.bool)
    return bits[:numel].reshape(tuple(int(s) for s in shape))


def invert_packed(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """`pack_bits(~mask)` from `pack_bits(mask)` of `numel` bools, without unpacking
    (the padding bits of the last byte stay zero)."""
    out = packed.bitwise_not()
    tail = numel % 8
    if tail:
        out[-1] &= (0xFF << (8 - tail)) & 0xFF
    return out


def count_bits(packed: torch.Tensor, chunk: int = 1 << 22) -> int:
    """Set bits of a `pack_bits` tensor (its padding bits are zero): a bit-parallel
    popcount of 8 bytes at a time (three shift-and-mask steps leave each byte holding its
    own count, then the bytes are summed), a slice of `chunk` bytes at a time."""
    flat = packed.reshape(-1)
    total = 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i : i + chunk]
        if part.numel() % 8 or part.storage_offset() % 8:  # a word view needs whole, aligned words
            part = torch.cat([part, torch.zeros((-part.numel()) % 8, dtype=torch.uint8, device=part.device)])
        x = part.view(torch.int64)
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        total += int(x.view(torch.uint8).sum(dtype=torch.int64))
    return total


def packed_kept_fraction(packed: torch.Tensor, shape: tuple[int, ...] | list[int], kept: int | None = None) -> float:
    """`unpack_bits(packed, shape).float().mean().item()`, the same float, from the packed
    bits when the mask has fewer than 2^24 weights (every float32 partial sum of 0/1
    values is then an exact integer, so that mean is the float32 quotient kept / numel);
    larger masks are unpacked. Saves the float32 copy of the mask (4 bytes per weight).
    `kept`: the set bits when already counted."""
    numel = math.prod(shape)
    if numel == 0 or numel >= 1 << 24:
        return unpack_bits(packed, shape).float().mean().item()
    kept = count_bits(packed) if kept is None else kept
    return (torch.tensor(float(kept), dtype=torch.float32) / torch.tensor(float(numel), dtype=torch.float32)).item()


def packed_stats(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> tuple[float, int, int]:
    """A mask's sparsity (one minus `packed_kept_fraction`), kept and total counts: the
    one statistic of a mask every manifest and record is made of (`MaskStats`)."""
    kept = count_bits(packed)
    return 1.0 - packed_kept_fraction(packed, shape, kept), kept, math.prod(shape)


class PackedMasks(MutableMapping[str, torch.Tensor]):
    """Keep-masks by name, held bit-packed (1 bit per weight, as `masks.safetensors`
    stores them). Setting a mask packs it; reading one unpacks a new bool tensor (so an
    in-place change to what was read does not reach the stored mask: set it again).

    Meta-device masks (shape-only placeholders of a streamed step) are kept as they are.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        # name -> (packed uint8, or the meta placeholder itself; shape)
        self._entries: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        if masks is not None:
            self.update(masks)

    def __setitem__(self, name: str, keep: torch.Tensor) -> None:
        shape = tuple(int(d) for d in keep.shape)
        self._entries[name] = (keep if keep.is_meta else pack_bits(keep), shape)

    def set_packed(self, name: str, packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> None:
        """Store an already packed mask (`pack_bits` of a bool tensor of `shape`)."""
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
            raise ValueError(f"packed mask {name}: {packed.numel()} bytes of {packed.dtype}, shape {shape} needs {(numel + 7) // 8} of uint8")
        self._entries[name] = (packed.reshape(-1), shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        data, shape = self._entries[name]
        return data if data.is_meta else unpack_bits(data, shape)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def update(self, other: Mapping[str, torch.Tensor] = (), /, **kwargs: torch.Tensor) -> None:  # type: ignore[override]
        """As dict.update; from another PackedMasks the packed bits are copied, never unpacked."""
        if isinstance(other, PackedMasks):
            self._entries.update(other._entries)
            return
        super().update(other, **kwargs)

    def select(self, names: list[str]) -> "PackedMasks":
        """A new PackedMasks with the named masks (their bits shared, not unpacked)."""
        out = PackedMasks()
        out._entries = {n: self._entries[n] for n in names}
        return out

    def part(self, name: str, index: int | None = None) -> torch.Tensor:
        """Mask `name` unpacked, or only its slice `[index]` along the first dimension (one
        expert of a fused parameter): when the slice starts on a byte, just its bytes are
        unpacked."""
        if index is None:
            return self[name]
        data, shape = self._entries[name]
        per = 1
        for d in shape[1:]:
            per *= d
        if data.is_meta or per % 8:
            return self[name][index]
        return unpack_bits(data[index * per // 8 : (index + 1) * per // 8], shape[1:])

    def packed(self, name: str) -> torch.Tensor:
        """The stored bits of a (non-meta) mask, as `pack_bits` gives them."""
        data, _ = self._entries[name]
        if data.is_meta:
            raise ValueError(f"mask {name} is a placeholder with no values")
        return data

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def kept(self, name: str) -> int:
        """Kept weights of mask `name`, counted on the packed bits."""
        return count_bits(self.packed(name))

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def kept_fraction(self, name: str) -> float:
        """`self[name].float().mean().item()`, the same float (`packed_kept_fraction`)."""
        return packed_kept_fraction(self.packed(name), self.shape(name))

    def nbytes(self) -> int:
        """Memory held by the packed masks."""
        return sum(data.nbytes for data, _ in self._entries.values() if not data.is_meta)


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

    masks: PackedMasks = field(default_factory=PackedMasks)
    pattern: Pattern = field(default_factory=Pattern)
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.masks, PackedMasks):  # a plain dict of bool tensors: pack it
            self.masks = PackedMasks(self.masks)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __len__(self) -> int:
        return len(self.masks)

    def names(self) -> list[str]:
        return list(self.masks)

    def sparsity(self) -> dict[str, float]:
        # the float mean, as `packed_stats` (and so every manifest) computes it
        return {n: 1.0 - self.masks.kept_fraction(n) for n in self.masks}

    def total_sparsity(self) -> float:
        total = sum(self.masks.numel(n) for n in self.masks)
        kept = sum(self.masks.kept(n) for n in self.masks)
        return 1.0 - kept / total if total else 0.0

    def stats(self) -> "MaskStats":
        """`packed_stats` of every mask."""
        return {n: packed_stats(self.masks.packed(n), self.masks.shape(n)) for n in self.masks}


MaskStats = dict[str, tuple[float, int, int]]  # name -> (sparsity, kept, numel)


def sparsity_summary(stats: MaskStats) -> dict[str, Any]:
    """The manifest's `sparsity` (and a prune's per-tensor record) from masks' `packed_stats`:
    the one way perp summarises sparsity, whether the masks are in memory or were
    released block by block."""
    total = sum(v[2] for v in stats.values())
    kept = sum(v[1] for v in stats.values())
    return {"total": round(1.0 - kept / total if total else 0.0, 6), "per_tensor": {n: round(v[0], 6) for n, v in stats.items()}}


def apply(model: nn.Module, masks: MaskSet) -> None:
    """Zero every masked weight in place (exact zeros, any dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.masks.items():
            p = params[name]
            p.mul_(keep.to(device=p.device, dtype=p.dtype))


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_pruned_(weight: torch.Tensor, pruned: torch.Tensor) -> None:
    """`weight.masked_fill_(pruned, 0)`, bit for bit: +0.0 at every pruned position (NaN
    and inf included), the rest untouched. The weight's bits are multiplied, as integers
    of the same size, by the keep-mask: a vectorised multiply, 2-3x faster on the CPU than
    `masked_fill_`'s per-element branch on a random mask (a float multiply would write
    −0.0 for negative weights and NaN for inf)."""
    weight.view(_SAME_SIZE_INT[weight.element_size()]).mul_(pruned.to(weight.device).logical_not())


def nonzeros_outside(weight: torch.Tensor, keep: torch.Tensor) -> int:
    """How many weights are nonzero where the mask says pruned (counted a slice of
    ~1M weights at a time: the bool temporaries of a whole matrix set the peak of a save;
    `count_nonzero`, since a bool `sum` first widens the slice to int64)."""
    flat_w, flat_k = weight.reshape(-1), keep.reshape(-1)
    step = 1 << 20
    return sum(int(torch.count_nonzero((flat_w[i : i + step] != 0) & ~flat_k[i : i + step].to(weight.device)))
               for i in range(0, flat_w.numel(), step))


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


@contextlib.contextmanager
def resident(model: nn.Module, name: str, param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The values of parameter `name`: `param` itself, or, for a weight a device map
    offloaded, its module's weights brought to the CPU for the duration (one module at a
    time, so checking a model larger than memory stays possible)."""
    if not param.is_meta:
        yield param
        return
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(owner):
        raise CheckpointError(f"parameter {name} has no values (meta device) and no offload to read them from")
    with align_module_device(owner, torch.device("cpu")):
        yield getattr(owner, attr)


def mask_problems(model: nn.Module, masks: MaskSet) -> list[str]:
    """Everything wrong between a model and its masks, as readable lines."""
    params = dict(model.named_parameters())
    transposed = arch.transposed_names(model)
    problems = []
    for name, keep in masks.masks.items():
        if name not in params:
            problems.append(f"mask {name} names no parameter of this model")
            continue
        p = params[name]
        if tuple(p.shape) != tuple(keep.shape):
            problems.append(f"mask {name} has shape {tuple(keep.shape)}, the weight {tuple(p.shape)}")
            continue
        with resident(model, name, p) as values:
            outside = nonzeros_outside(values.detach(), keep)
        if outside:
            problems.append(f"{name} has {outside} nonzero weights where the mask says pruned")
        bad = nm_violations(keep, masks.pattern, transposed=name in transposed, permutation=masks.permutations.get(name))
        if bad:
            problems.append(f"{name} breaks the {masks.pattern} pattern in {bad if bad > 0 else 'all'} groups")
    return problems
