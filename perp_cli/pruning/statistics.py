"""Calibration statistics of a block's matrix inputs, one object per input group.

Matrices that read the same input (q/k/v, gate/up, each expert's slices) share one
statistics object: the reference implementations compute the same Hessian three times
for q, k and v; here it is computed once.

Inputs are caught with forward pre-hooks on the module that owns the group's first
matrix. transformers 5 stores MoE experts fused (3-D weights in one module, e.g.
`MixtralExperts.forward(hidden, top_k_index, top_k_weights)`), so no per-expert module
exists to hook: one pre-hook on the experts module recomputes, for each expert, the
tokens the router sent to it (its first weight's input) and the gated output of that
expert's first slice (its last weight's input), as the experts' own forward does, for
either storage orientation and with expert biases.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from perp_cli import arch, engine
from perp_cli.arch import Matrix
from perp_cli.errors import ArchitectureError


_NORM_CHUNK = 1 << 20  # elements per slice of `NormStat.add`


class NormStat:
    """Σ x_j² per input feature over all tokens (Wanda's ‖X_j‖₂², float64 accumulator).

    `seconds`: time spent accumulating (reported per block by the pruner).
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.seconds = 0.0

    def add(self, x: torch.Tensor) -> None:
        start = time.perf_counter()
        x = x.reshape(-1, x.shape[-1])
        # a slice of ~1M elements at a time: the square stays in cache and is never
        # micro-batch-sized, and summing short columns is ~5x faster on the CPU than
        # one sum over every token (each slice's float32 sum is added in float64)
        rows = max(1, _NORM_CHUNK // max(1, x.shape[1]))
        for i in range(0, x.shape[0], rows):
            self.sq += x[i : i + rows].float().pow(2).sum(dim=0)
        self.tokens += x.shape[0]
        self.seconds += time.perf_counter() - start

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ as float32."""
        return self.sq.sqrt().float()


class HessianStat:
    """SparseGPT's H = 2/S · Σ_s X_s X_sᵀ, S = the number of calibration SEQUENCES (windows).

    The normalisation is the reference's (IST-DASLab/sparsegpt `add_batch`), not per
    token: a running average updated once per sequence, in the reference's order
    (H ← H·S/(S+1); S ← S+1; H += (√(2/S)·X_s)(√(2/S)·X_s)ᵀ, float32), so the result does
    not depend on the micro-batch size and rounds like the reference's one-window calls.
    The scale matters although it cancels in the OBS updates: SparseGPT sets a dead
    input's H_jj to the constant 1 and damps by 1% of the mean diagonal, and neither
    scales with H (docs/fidelity.md). A 2-D input `[tokens, features]` (MoE expert
    slices, gathered over a micro-batch) counts as one sequence, as in the reference.
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.h = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.sequences = 0
        self.tokens = 0
        self.seconds = 0.0  # time spent accumulating

    def add(self, x: torch.Tensor) -> None:
        start = time.perf_counter()
        seqs = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.unsqueeze(0)
        for seq in seqs:
            self.h *= self.sequences / (self.sequences + 1)
            self.sequences += 1
            scaled = seq.float() * math.sqrt(2 / self.sequences)
            self.h += scaled.t() @ scaled  # product, then sum: the reference's rounding (not addmm_)
            self.tokens += seq.shape[0]
        self.seconds += time.perf_counter() - start

    def hessian(self) -> torch.Tensor:
        return self.h

    def take_hessian(self) -> torch.Tensor:
        """H, handed over: the statistic no longer holds it (SparseGPT factorises it in
        place, `inverse_hessian(..., consume=True)`, so no copy is made)."""
        h, self.h = self.h, None
        return h


StatFactory = Callable[[int, torch.device], Any]


@dataclass
class Group:
    """Matrices sharing one input, and the statistics of that input."""

    matrices: list[Matrix]
    stat: Any

    @property
    def label(self) -> str:
        return ",".join(m.key for m in self.matrices)


def target_groups(model: nn.Module, index: int, keys: set[str]) -> list[list[Matrix]]:
    """`arch.input_groups` of block `index` restricted to the matrices being pruned."""
    groups = []
    for group in arch.input_groups(model, index):
        chosen = [m for m in group if m.key in keys]
        if chosen:
            groups.append(chosen)
    return groups


def _expert_hook(experts: nn.Module, by_expert: dict[tuple[str, int], Group], transposed: bool) -> Callable:
    """Per-expert inputs of a fused experts module, from the routed tokens.

    The module's 3-D weights are a chain: the first reads the tokens routed to an expert,
    the last reads the gated output of the first (`_apply_gate`, or act(gate) * up).
    Routing comes either as an index tensor (`top_k_index [T, k]`: Mixtral, Qwen-MoE,
    gpt-oss...) or already applied, one `[T, H]` slab per expert with zero rows for the
    tokens not routed there (Llama 4).
    """
    chain = [n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    first, last = chain[0], chain[-1]
    if any(local.rsplit(".", 1)[-1] not in (first, last) for local, _ in by_expert):
        raise ArchitectureError(f"{type(experts).__name__} chains {len(chain)} expert weights; perp computes per-expert statistics for a first and a last one only")
    n_experts = getattr(experts, first).shape[0]
    act = getattr(experts, "act_fn", None)

    def gate(out: torch.Tensor) -> torch.Tensor:
        if hasattr(experts, "_apply_gate") and getattr(experts, "has_gate", True):
            return experts._apply_gate(out)
        if not getattr(experts, "has_gate", True):
            return act(out)
        g, up = out.chunk(2, dim=-1)
        return act(g) * up

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        values = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        hidden = values[0]
        index = next((v for v in values[1:] if isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
        per_expert = None if index is not None else hidden.reshape(n_experts, -1, hidden.shape[-1])
        for e in range(n_experts):
            if index is not None:
                token_idx = (index == e).any(dim=-1).nonzero().reshape(-1)
                x = hidden[token_idx]
            else:
                x = per_expert[e][per_expert[e].ne(0).any(dim=-1)]
            if x.shape[0] == 0:
                continue
            group = by_expert.get((first, e))
            if group is not None:
                group.stat.add(x)
            group = by_expert.get((last, e))
            if group is not None:
                w = getattr(experts, first)[e]
                out = nn.functional.linear(x, w.t() if transposed else w)
                bias = getattr(experts, f"{first}_bias", None)
                if isinstance(bias, torch.Tensor):
                    out = out + bias[e]
                group.stat.add(gate(out))

    return hook


def _as_sequences(x: torch.Tensor, window: list[torch.Size]) -> torch.Tensor:
    """`x` as `[b, seqlen, features]` when it holds the current micro-batch's tokens."""
    if x.dim() == 2 and window and x.shape[0] == window[0][0] * window[0][1]:
        return x.reshape(window[0][0], window[0][1], x.shape[-1])
    return x


@contextlib.contextmanager
def collecting(model: nn.Module, groups: list[list[Matrix]], factory: StatFactory, device: torch.device) -> Iterator[list[Group]]:
    """Attach one statistics object per group while the block runs; yields the groups.

    Once every hook has seen the current micro-batch, the rest of the block forward is
    skipped (`engine.StopBlock`): nothing after the last statistic's input is read
    (for a decoder block, the last matrix and the residual add). This assumes each
    hooked module runs once per block forward, as in every architecture of
    `perp_cli.arch`; a second call of a module would not be seen.
    """
    out = [Group(g, factory(g[0].shape[1], device)) for g in groups]
    handles = []
    seen: set[int] = set()  # hooks fired in the current micro-batch (reset by the block's pre-hook)
    expected = len({id(g.matrices[0].owner) if g.matrices[0].expert is not None else id(g) for g in out})

    def fired(hook_id: int) -> None:
        seen.add(hook_id)
        if len(seen) == expected:
            raise engine.StopBlock
    experts: dict[int, tuple[nn.Module, dict[tuple[str, int], Group], bool]] = {}
    for group in out:
        first = group.matrices[0]
        if first.expert is not None:
            owner, table, _ = experts.setdefault(id(first.owner), (first.owner, {}, first.transposed))
            table[(first.attr, first.expert)] = group
            continue

        def hook(module: nn.Module, args: tuple, group: Group = group) -> None:
            group.stat.add(_as_sequences(args[0], window))
            fired(id(group))

        handles.append(first.owner.register_forward_pre_hook(hook))
    # the block's input shape [b, seqlen, hidden] of the current micro-batch: some blocks
    # flatten tokens before a matrix (OPT's fc1/fc2 see [b·seqlen, f]), and HessianStat
    # normalises per sequence, so the hooks restore [b, seqlen, f] from it
    window: list[torch.Size] = []

    def remember(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        window[:] = [hidden.shape] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else []
        seen.clear()

    for index in sorted({g.matrices[0].block for g in out}):
        handles.insert(0, arch.blocks(model)[index].register_forward_pre_hook(remember, with_kwargs=True))
    for owner, table, transposed in experts.values():
        collect = _expert_hook(owner, table, transposed)

        def expert_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], collect: Callable = collect) -> None:
            collect(module, args, kwargs)
            fired(id(module))

        handles.append(owner.register_forward_pre_hook(expert_hook, with_kwargs=True))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
