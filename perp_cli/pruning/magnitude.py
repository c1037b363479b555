"""Magnitude pruning (Han et al., 2015; the Wanda repository's `prune_magnitude`).

The score of a weight is |W_ij|; the smallest are pruned. The reference compares within
each matrix, so that is the default scope. No calibration data is needed.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| as float32, `[out, in]`."""
    return weight.detach().abs().float()
