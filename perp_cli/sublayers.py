"""The two residual halves of a decoder block, for sublayer reconstruction.

A sequential pre-norm block computes h = x + attn(norm1(x)), then y = h + mlp(norm2(h)).
"A Free Lunch in LLM Compression" (Wagner, Roux, Zimmer, Pokutta 2025; reference
ZIB-IOL/Free-Lunch-in-LLM-Compression, `block_size=-1`) reconstructs the two halves
separately: the attention half (its norm, the attention, the residual add) and the MLP
half (its norm, the MLP, the residual add), each its own regression problem.

The reference writes one wrapper per family (OPT, LLaMA, Qwen) that re-implements each
half's forward. perp runs the block's own forward instead and removes the other branch:
a forward hook replaces the output of the other half's branch module by zeros, and since
that output is only added to the residual stream, the block then computes exactly one
half (x + attn(norm1(x)) + 0, or h + 0 + mlp(norm2(h))). Nothing is re-implemented, so
any family whose block is two sequential residual branches works, whatever it names
its modules.

The branch modules come from the architecture map and one forward of the block
(`split`): the block's direct children that hold prunable matrices, in the order the
forward calls them; the attention branch is the first called, the MLP branch ends at
the last called (LLaMA, GPT-2: `self_attn`/`attn` then `mlp`; OPT: `self_attn`, then
`fc1`, `fc2` directly on the block, so zeroing `fc2`'s output removes its MLP).

Two checks on the real inputs refuse blocks that are not two sequential halves:

* parallel attention and MLP (GPT-J, Phi, Falcon, GPT-NeoX with `use_parallel_residual`:
  y = x + attn(ln(x)) + mlp(ln(x))): the MLP branch reads the same input whether or not
  the attention ran (compared bit for bit), so there is no "MLP half input" to fit;
* the halves must compose to the block: mlp_half(attn_half(x)) equals block(x) (up to
  rounding); post-norm blocks (OPT-350m) fail this and are refused too.

Which parameters belong to which half (for `--train` and the adapters) is found the same
way: those under the half's branch module, plus those the half's output depends on
(one backward pass on one window: the half's norm lives outside its branch module).

Cost: each half trains `steps_per_block` steps and its forward still runs the removed
branch (its output is discarded), but the backward pass covers only the half. Measured
in `bench/reproduce.py --study methods` (2 cores, 100 steps x 4 x 256 tokens): 1.05-1.25x
the time of block reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from perp_cli import arch
from perp_cli.errors import UsageError

GRANULARITIES = ("block", "sublayer")
HALVES = ("attention", "mlp")
COMPOSE_TOLERANCE = 1e-3  # relative max error of mlp_half(attn_half(x)) against block(x); sequential blocks give ~0


def _zero_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """A forward hook: the same output with its hidden states replaced by zeros."""
    if isinstance(output, torch.Tensor):
        return torch.zeros_like(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (torch.zeros_like(output[0]), *output[1:])
    raise UsageError(f"--granularity sublayer: cannot remove the branch {type(module).__name__}: its output is {type(output).__name__}")


class Half(nn.Module):
    """One residual half of a decoder block: the block's own forward with the other
    half's branch module contributing zeros. Called like the block."""

    def __init__(self, block: nn.Module, skip: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.skip = (skip,)  # a tuple: not a second registration of the block's own child

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        handle = self.skip[0].register_forward_hook(_zero_output)
        try:
            return self.block(hidden_states, *args, **kwargs)
        finally:
            handle.remove()


@dataclass
class Split:
    """Block-local paths of a block's two branch modules, and the parameters each half
    owns (by block-local parameter name)."""

    attention: str
    mlp: str
    first_mlp: str  # the first MLP child the forward calls (its input is the MLP half's input)
    owned: dict[str, set[str]] = field(default_factory=dict)

    def halves(self, block: nn.Module) -> list[tuple[str, Half]]:
        """(name, half) in forward order for `block` (the pruned or the dense one: same paths)."""
        return [
            ("attention", Half(block, block.get_submodule(self.mlp))),
            ("mlp", Half(block, block.get_submodule(self.attention))),
        ]


def branch_children(model: nn.Module, index: int) -> list[str]:
    """Direct children of block `index` that hold prunable matrices (map order)."""
    spec = arch.spec_for(model)
    out: list[str] = []
    for local in spec.matrices:
        if local in spec.present[index]:
            head = local.split(".", 1)[0]
            if head not in out:
                out.append(head)
    return out


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.detach().abs().max().double())
    return float((a.detach().double() - b.detach().double()).abs().max()) / max(scale, 1e-30)


@torch.no_grad()
def split(model: nn.Module, index: int, block: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor) -> Split:
    """Find and check the two halves of `block` (block `index` of `model`) on input `x`
    (one micro-batch; `call(module, x)` runs a block-like module). Raises a one-line
    UsageError for blocks that are not two sequential residual halves."""
    what = f"--granularity sublayer: block {index} ({type(block).__name__})"
    names = branch_children(model, index)
    order: list[str] = []
    seen_inputs: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in order:
                order.append(name)
                first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                if isinstance(first, torch.Tensor):
                    seen_inputs[name] = first.detach().clone()
        return hook

    def run_recorded(module: nn.Module) -> torch.Tensor:
        order.clear()
        seen_inputs.clear()
        handles = [block.get_submodule(n).register_forward_pre_hook(recorder(n), with_kwargs=True) for n in names]
        try:
            return call(module, x)
        finally:
            for h in handles:
                h.remove()

    full = run_recorded(block)
    called = list(order)
    if len(called) < 2:
        raise UsageError(f"{what} calls {len(called)} module(s) holding matrices ({', '.join(called) or 'none'}); "
                         "it has no attention and MLP halves to fit separately: use --granularity block")
    attention, first_mlp, mlp = called[0], called[1], called[-1]
    mlp_input = seen_inputs.get(first_mlp)
    result = Split(attention=attention, mlp=mlp, first_mlp=first_mlp)
    attn_half, mlp_half = (h for _, h in result.halves(block))
    run_recorded(mlp_half)  # the attention branch contributes zeros now
    if mlp_input is not None and first_mlp in seen_inputs and torch.equal(seen_inputs[first_mlp], mlp_input):
        raise UsageError(f"{what} runs attention and MLP in parallel (both read the block's input; the MLP never sees "
                         "the attention output): its halves are not sequential, use --granularity block")
    composed = call(mlp_half, call(attn_half, x))
    error = _relative_error(composed, full)
    if not error <= COMPOSE_TOLERANCE:
        raise UsageError(f"{what} is not two sequential residual halves ({mlp} after {attention}): the halves composed "
                         f"differ from the block by {error:.2g} (relative; a post-norm block?): use --granularity block")
    result.owned = _owned_parameters(block, result, call, x)
    return result


def _owned_parameters(block: nn.Module, s: Split, call: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor) -> dict[str, set[str]]:
    """Block-local parameter names of each half: under its branch module(s), or reached
    by a backward pass from its output on one window (its norm, for instance)."""
    params = dict(block.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    owned: dict[str, set[str]] = {}
    generator = torch.Generator().manual_seed(0)
    try:
        for p in params.values():
            p.requires_grad_(True)
        for name, half in s.halves(block):
            branches = (s.attention,) if name == "attention" else (s.first_mlp, s.mlp)
            mine = {n for n in params if any(arch.under(n, b) for b in branches)}
            with torch.enable_grad():
                y = call(half, x[:1])
                weights = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
                grads = torch.autograd.grad((y * weights).sum(), list(params.values()), allow_unused=True)
            mine |= {n for n, g in zip(params, grads) if g is not None and bool(g.abs().sum() > 0)}
            owned[name] = mine
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
    other = {"attention": "mlp", "mlp": "attention"}
    for name in owned:  # a parameter under the other half's branch module is the other half's
        owned[name] = {n for n in owned[name] if not _in_branch(n, s, other[name])}
    return owned


def _in_branch(name: str, s: Split, half: str) -> bool:
    branches = (s.attention,) if half == "attention" else (s.first_mlp, s.mlp)
    return any(arch.under(name, b) for b in branches)
