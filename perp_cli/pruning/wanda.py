"""Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for LLMs").

The score of W_ij is |W_ij| · ‖X_j‖₂, the weight's magnitude times the L2 norm of its
input feature over all calibration tokens (accumulated per input group by
`statistics.NormStat`). The paper compares weights within each output row, so `row` is
the default scope; there is no weight update.

On models with strong outlier features (billion-parameter LLMs) the activation term is
what makes Wanda beat magnitude; tiny models lack such features, so there Wanda can be
worse than magnitude. Its correctness is tested against a direct computation of the
score, not against magnitude.
"""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X‖₂ broadcast over rows, float32 `[out, in]` (one matrix-sized allocation:
    the product is taken in place in |W|'s float32 copy)."""
    scores = weight.detach().abs().float()
    if scores.data_ptr() == weight.data_ptr():  # never write into the weight (0-d or aliasing corner cases)
        scores = scores.clone()
    return scores.mul_(input_norms.to(weight.device).float().reshape(1, -1))
