"""Random pruning: the baseline every method must beat.

Scores are uniform random numbers from one generator seeded with `--seed` and consumed
in the architecture map's matrix order, so the same seed gives the same masks. With the
exact-count selection, each comparison group (matrix by default) still reaches exactly
the requested sparsity.
"""

from __future__ import annotations

import torch


def random_scores(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) scores of `shape` drawn on the host from `generator`."""
    return torch.rand(shape, generator=generator, dtype=torch.float32)
