"""Depth: remove whole decoder blocks by block influence (ShortGPT, Men et al. 2024).

Block influence BI_i = 1 − E_t[cos(x_t, y_t)]: one minus the cosine similarity between
the hidden state entering block i and leaving it, averaged over every calibration token.
A block that barely turns the residual stream (BI ≈ 0) is the one whose removal changes
the hidden state least; the K blocks with the lowest BI go. All blocks are scored in one
pass on the unpruned model's activations, as ShortGPT does (the engine propagates
through each block as it is).

The config follows: `num_hidden_layers`, every per-layer list (`layer_types`, ...) keeps
the kept layers' entries, and layer-index lists (`mlp_only_layers`, ...) are renumbered.
A layout rule that depends on the layer index (Qwen-MoE's `decoder_sparse_step`) is
turned into the explicit list, so each kept block keeps its kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perp_cli import arch, engine
from perp_cli.shrinking.surgery import Surgery, new_config

INDEX_LISTS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "attn_layer_indices", "no_rope_layers_idx")


class Influence:
    """The engine step that measures each block's influence."""

    def __init__(self, n_blocks: int) -> None:
        self.scores = [0.0] * n_blocks

    @torch.no_grad()
    def step(self, s: engine.BlockStep) -> engine.BlockInputs:
        s.status(f"block {s.index}: influence")
        outputs = s.inputs.new_store()
        total, count = 0.0, 0
        for x in s.inputs.batches():
            y = s.inputs.call(s.block, x)
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            total += float((1.0 - cos).double().sum())
            count += cos.numel()
            outputs.append(y)
        self.scores[s.index] = total / max(count, 1)
        return s.inputs.replaced(outputs)


def surgery(model: nn.Module, remove: list[int]) -> Surgery:
    n = len(arch.blocks(model))
    keep = [i for i in range(n) if i not in set(remove)]
    config, text = new_config(model)
    _explicit_sparse_layers(text, n)
    for key, value in list(vars(text).items()):
        if key in INDEX_LISTS and isinstance(value, list):
            setattr(text, key, [keep.index(i) for i in value if isinstance(i, int) and i in keep])
        elif isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(text, key, type(value)(value[i] for i in keep))
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            setattr(text, key, {str(keep.index(int(k))): v for k, v in value.items() if int(k) in keep})
    text.num_hidden_layers = len(keep)
    return Surgery(config=config, keep_blocks=keep)


def _explicit_sparse_layers(text, n: int) -> None:
    """Qwen-MoE picks MoE layers by `(i + 1) % decoder_sparse_step == 0`; removing a block
    would shift that pattern, so the dense layers become an explicit `mlp_only_layers`."""
    step = getattr(text, "decoder_sparse_step", None)
    experts = getattr(text, "num_experts", None)
    if not isinstance(step, int) or step <= 1 or not experts:
        return
    dense = set(getattr(text, "mlp_only_layers", None) or [])
    text.mlp_only_layers = sorted(i for i in range(n) if i in dense or (i + 1) % step != 0)
    text.decoder_sparse_step = 1
