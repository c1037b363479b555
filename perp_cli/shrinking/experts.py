"""Experts: remove routed experts, the same number in every MoE block.

Saliency of expert e in a block, on the calibration tokens (REAP, Lasby et al. 2025,
weighted by how often the expert is used):

    S_e = (1/T) · Σ_{t routed to e} g_e(t) · ‖f_e(x_t)‖₂

T is the number of tokens, g_e(t) the router's weight for e on token t and f_e(x_t) the
expert's output. S_e = routing frequency × the mean gated output norm over the tokens
routed to e (REAP's criterion): an expert the router rarely picks, or whose gated output
is small when it is picked, contributes least to the block's output. The expert outputs
come from calling the block's own experts module on the tokens routed to e with the
router weight set to 1, so every storage orientation ([E, out, in] Mixtral/Qwen3-MoE,
[E, in, out] gpt-oss) and expert bias is handled by the family's own forward.

All blocks are scored in one pass on the unpruned model (removing an expert changes the
routing, which no zeroing reproduces); then the lowest-saliency experts go: their slices
of every tensor with a leading expert dimension, and their router rows, so the router of
the smaller model chooses among the remaining experts.
"""

from __future__ import annotations

import torch
from torch import nn

from perp_cli import arch, engine
from perp_cli.errors import ArchitectureError
from perp_cli.shrinking import layout
from perp_cli.shrinking.surgery import Surgery, new_config


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    if len(values) < 3:
        raise ArchitectureError("the experts module was not called with (hidden states, expert indices, routing weights)")
    return values[0], values[1], values[2]


class ExpertsPass:
    def __init__(self, plan: dict[int, layout.Experts]) -> None:
        self.plan = plan
        self.saliency = {i: torch.zeros(e.count, dtype=torch.float64) for i, e in plan.items()}
        self.routed = {i: torch.zeros(e.count, dtype=torch.long) for i, e in plan.items()}
        self.tokens = {i: 0 for i in plan}

    @torch.no_grad()
    def step(self, s: engine.BlockStep) -> None:
        if s.index not in self.plan:
            return None
        ex = self.plan[s.index]
        inside = [False]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if inside[0]:
                return
            hidden, index, weights = _routing_args(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            inside[0] = True
            try:
                for e in range(ex.count):
                    token, slot = torch.where(index == e)
                    if token.numel() == 0:
                        continue
                    n = token.numel()
                    one = torch.full((n, 1), e, dtype=index.dtype, device=index.device)
                    out = module(hidden[token], one, torch.ones((n, 1), dtype=weights.dtype, device=weights.device))
                    gated = weights[token, slot].double() * out.double().norm(dim=-1)
                    self.saliency[s.index][e] += float(gated.sum())
                    self.routed[s.index][e] += n
            finally:
                inside[0] = False
            self.tokens[s.index] += hidden.shape[0]

        s.status(f"block {s.index}: expert saliency")
        handle = ex.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            s.inputs.run(s.block, keep_outputs=False)
        finally:
            handle.remove()
        return None

    def scores(self, index: int) -> torch.Tensor:
        return self.saliency[index] / max(self.tokens[index], 1)

    def choose(self, remove: int) -> dict[int, list[int]]:
        return {i: layout.lowest(self.scores(i), remove) for i in self.plan}


def surgery(model: nn.Module, plan: dict[int, layout.Experts], removed: dict[int, list[int]]) -> Surgery:
    count = next(iter(plan.values())).count
    n_gone = len(next(iter(removed.values())))
    config, text = new_config(model)
    for key in arch.EXPERT_COUNT_KEYS:
        if getattr(text, key, None) == count:
            setattr(text, key, count - n_gone)
    out = Surgery(config=config)
    for index, ex in plan.items():
        keep = torch.tensor([e for e in range(count) if e not in set(removed[index])], dtype=torch.long)
        for name in ex.tensors:
            out.cut(name, 0, keep)
    return out
