"""Heads: remove attention heads, whole key-value groups, the same number in every block.

Score of key-value group g in a block: the Frobenius norm of the group's contribution to
the attention output projection over the calibration tokens, ‖Σ_{h∈g} A_h W_o,hᵀ‖_F, with
A_h the attention output of query head h (the input columns of `o_proj` that belong to
h) and W_o,h those columns of `o_proj`: exactly what removing the group takes out of the
block's attention output (the width score, per group of heads instead of per channel).

Under grouped-query attention a group is r = heads / kv_heads query heads and their one
key-value head; removing whole groups keeps r, so transformers pairs the remaining heads
exactly as before. Blocks are pruned in order on the engine: the chosen groups' `o_proj`
columns are zeroed (the block then computes what the smaller one will) before the data
goes on to the next block.
"""

from __future__ import annotations

import torch
from torch import nn

from perp_cli import engine
from perp_cli.shrinking import layout
from perp_cli.shrinking.surgery import Surgery, new_config


def query_columns(h: layout.Heads, group: int) -> slice:
    """`o_proj` input columns (= q_proj rows) of key-value group `group`'s query heads."""
    width = h.group * h.head_dim
    return slice(group * width, (group + 1) * width)


class HeadsPass:
    def __init__(self, plan: dict[int, layout.Heads], remove_groups: int) -> None:
        self.plan = plan
        self.remove = remove_groups
        self.removed: dict[int, list[int]] = {}
        self.scores: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, s: engine.BlockStep) -> None:
        h = self.plan[s.index]
        w = h.o.weight()
        sq = torch.zeros(h.kv_heads, dtype=torch.float64, device=s.device)

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            for g in range(h.kv_heads):
                cols = query_columns(h, g)
                sq[g] += (x[:, cols].float() @ w[:, cols].float().t()).double().pow(2).sum()

        s.status(f"block {s.index}: head contributions")
        handle = h.o.owner.register_forward_pre_hook(hook)
        try:
            s.inputs.run(s.block, keep_outputs=False)
        finally:
            handle.remove()
        scores = sq.sqrt()
        gone = layout.lowest(scores, self.remove)
        for g in gone:
            w[:, query_columns(h, g)] = 0
        self.removed[s.index] = gone
        self.scores[s.index] = scores.float().cpu()


def surgery(model: nn.Module, plan: dict[int, layout.Heads], removed: dict[int, list[int]]) -> Surgery:
    first = next(iter(plan.values()))
    n_gone = len(next(iter(removed.values())))
    config, text = new_config(model)
    text.num_attention_heads = first.heads - n_gone * first.group
    if getattr(text, "num_key_value_heads", None) is not None:
        text.num_key_value_heads = first.kv_heads - n_gone
    text.head_dim = first.head_dim
    out = Surgery(config=config)
    for index, h in plan.items():
        kept_groups = [g for g in range(h.kv_heads) if g not in set(removed[index])]
        q_rows = torch.cat([torch.arange(h.head_dim * h.group * g, h.head_dim * h.group * (g + 1)) for g in kept_groups])
        kv_rows = torch.cat([torch.arange(h.head_dim * g, h.head_dim * (g + 1)) for g in kept_groups])
        q_heads = torch.cat([torch.arange(h.group * g, h.group * (g + 1)) for g in kept_groups])
        for m, rows in ((h.q, q_rows), (h.k, kv_rows), (h.v, kv_rows)):
            out.cut(m.name, 1 if m.transposed else 0, rows)
            if getattr(m.owner, "bias", None) is not None:
                out.cut(m.name[: -len("weight")] + "bias", 0, rows)
        out.cut(h.o.name, 0 if h.o.transposed else 1, q_rows)
        for name in h.per_head:
            out.cut(name, 0, q_heads)
    return out
