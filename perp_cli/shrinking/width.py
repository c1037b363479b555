"""Width: remove MLP intermediate channels, the same number in every block.

Score of channel c in a block: the Frobenius norm of its contribution to the MLP's
output over the calibration tokens, ‖a_c‖₂ · ‖W_down[:, c]‖₂, where a_c is the channel's
activation (the c-th input of the output projection) on every token. The contribution of
channel c is the rank-one matrix a_c W_down[:, c]ᵀ, whose Frobenius norm is exactly that
product: this is Wanda's |W|·‖X‖ taken over the channel's whole column, i.e. how much of
the block's output the channel carries. A channel whose output column is zero, or which
never activates, scores 0 and its removal changes nothing.

Blocks are pruned in order on the shared engine: after block i's channels are chosen,
their output columns are zeroed (which computes exactly what the smaller block will), and
the calibration data goes through that block to block i+1 (Wanda/SparseGPT's sequential
order). `intermediate_size` stays one number, so every block loses the same count.
"""

from __future__ import annotations

import torch
from torch import nn

from perp_cli import engine
from perp_cli.shrinking import layout
from perp_cli.shrinking.surgery import Surgery, new_config


def channel_scores(consumer_input_sq: torch.Tensor, consumer: torch.Tensor) -> torch.Tensor:
    """‖a_c‖₂ · ‖W[:, c]‖₂ for `consumer` `[out, in]` and Σ_t a_{t,c}² per channel."""
    return consumer_input_sq.sqrt() * consumer.double().norm(dim=0)


class WidthPass:
    """The engine step: score block i's channels, choose, zero their output columns."""

    def __init__(self, plan: dict[int, layout.Channels], remove: int) -> None:
        self.plan = plan
        self.remove = remove
        self.removed: dict[int, list[int]] = {}
        self.scores: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, s: engine.BlockStep) -> None:
        ch = self.plan[s.index]
        sq = torch.zeros(ch.size, dtype=torch.float64, device=s.device)

        def hook(module: nn.Module, args: tuple) -> None:
            nonlocal sq
            x = args[0]
            sq += x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)

        s.status(f"block {s.index}: channel activations")
        handle = ch.consumer.owner.register_forward_pre_hook(hook)
        try:
            s.inputs.run(s.block, keep_outputs=False)
        finally:
            handle.remove()
        scores = channel_scores(sq, ch.consumer.weight())
        gone = layout.lowest(scores, self.remove)
        ch.consumer.weight()[:, gone] = 0  # the block now computes what the smaller one will
        self.removed[s.index] = gone
        self.scores[s.index] = scores.float().cpu()


def surgery(model: nn.Module, plan: dict[int, layout.Channels], removed: dict[int, list[int]]) -> Surgery:
    first = next(iter(plan.values()))
    size = first.size
    config, text = new_config(model)
    setattr(text, layout.intermediate_key(model, size), size - len(next(iter(removed.values()))))
    out = Surgery(config=config)
    for index, ch in plan.items():
        gone = set(removed[index])
        keep = torch.tensor([c for c in range(size) if c not in gone], dtype=torch.long)
        for m in ch.producers:
            rows = torch.cat([keep, keep + size]) if m.name in ch.fused else keep
            out.cut(m.name, 1 if m.transposed else 0, rows)
            bias = m.name[: -len("weight")] + "bias"
            if getattr(m.owner, "bias", None) is not None:
                out.cut(bias, 0, rows)
        out.cut(ch.consumer.name, 0 if ch.consumer.transposed else 1, keep)
    return out
