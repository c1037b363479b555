"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models"; reference biomedical-cybernetics/Relative-importance-
and-activation-pruning).

Relative importance and activations: the score of W_ij is

    (|W_ij| / Σ_k |W_ik|  +  |W_ij| / Σ_k |W_kj|) · (‖X_j‖₂)^a,   a = 0.5,

the weight's share of its output row's and of its input column's total magnitude, times
a power of its input feature's norm. The reference's activation term is
sqrt(Σ x_j² / sequences) (its Wanda wrapper); here it is ‖X_j‖₂ = sqrt(Σ x_j²), which
differs by one constant factor per matrix and so ranks every comparison group the same.

Comparison group: the reference's unstructured default compares the whole matrix
(`--per_outneuron` switches to rows), so `matrix` is RIA's default scope here. The
reference prunes every weight whose score is <= the k-th smallest (k = floor(s·n), so
k + 1 per matrix); perp prunes exactly k (one weight per matrix fewer).

Channel permutation for N:M (`--permute`, the reference's `--reallocation`, "heuristic
channel reallocation"): every input channel j gets an importance (the column sum of the
scores), the channels are sorted by it and cut into M equal slices; the group g of the
permuted order takes the g-th channel of every slice, odd slices read backwards, so
that each group of M gets one channel of every importance level instead of several
large ones competing for N places. The N:M mask is chosen in that order. The function
of the model is unchanged: only the choice of which inputs share a group is. The
reference's optional linear-sum-assignment refinement (`--lsa`) is not implemented.
"""

from __future__ import annotations

import torch

DEFAULT_ALPHA = 0.5


def ria_scores(weight: torch.Tensor, input_norms: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """RIA scores of an `[out, in]` weight, float32; `input_norms` = ‖X_j‖₂ per input."""
    w = weight.detach().abs().float()
    relative = w / w.sum(dim=0, keepdim=True) + w / w.sum(dim=1, keepdim=True)
    # an all-zero row or column gives 0/0: such weights are zero and unimportant
    relative = torch.nan_to_num(relative, nan=0.0)
    return relative * input_norms.to(w.device).float().reshape(1, -1).pow(alpha)


def channel_permutation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The reference's heuristic channel reallocation for N:M with groups of `m`.

    Returns `order` (int64, `[in]`): position p of the permuted order holds input channel
    `order[p]`, and each run of `m` positions is one N:M group.
    """
    cols = scores.shape[1]
    ranked = torch.sort(scores.sum(dim=0))[1]  # channels by importance, ascending
    order = torch.empty_like(ranked)
    for k in range(m):
        part = ranked[cols * k // m : cols * (k + 1) // m]
        order[k::m] = part if k % 2 == 0 else part.flip(0)
    return order
