"""OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity"; reference luuyin/OWL):
a sparsity per decoder block instead of the same sparsity everywhere.

1. On the dense model, each block's outlier ratio D_b is the share of its weights whose
   Wanda score |W_ij|·sqrt(mean x_j²) exceeds M times the mean score of the block (all
   targeted matrices of the block together, as the reference concatenates the block's
   layers). `outlier_ratio` computes it.
2. Blocks with more outliers are pruned less: r_b = 2λ·(D_b − min D)/(max D − min D),
   and the block's sparsity is S + λ − r_b + c, in the band [S − λ, S + λ]. The
   reference sets c so that the *unweighted* mean of the blocks' sparsities is S (its
   LLaMA blocks all have the same size). perp chooses c so that the *parameter-weighted*
   mean is S (Σ_b n_b·s_b = S·Σ_b n_b, n_b = targeted weights of block b), clipping each
   block into [S − λ, S + λ] (the reference can leave the band when D is skewed; it
   clips only at 0). `allocate` solves for c by bisection: the weighted mean of the
   clipped sparsities grows monotonically with c. When blocks have the same size and
   no block is clipped, this is the reference's allocation exactly.

"Exactly S" holds for the targets; the masks then prune floor(s_b·n) per comparison
group, so the achieved sparsity is S up to that rounding (reported per tensor).
"""

from __future__ import annotations

import torch

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of the scores (all matrices of one block) above `m` × their mean."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores])
    threshold = flat.mean() * m
    return float((flat > threshold).sum()) / flat.numel()


def allocate(ratios: list[float], counts: list[int], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: in [S − λ, S + λ], count-weighted mean S."""
    d = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(counts, dtype=torch.float64)
    spread = float(d.max() - d.min()) if len(ratios) else 0.0
    if lam == 0 or spread == 0:
        return [float(sparsity)] * len(ratios)
    base = sparsity + lam - (d - d.min()) * (2 * lam / spread)
    low, high = sparsity - lam, sparsity + lam

    def mean_at(c: float) -> float:
        return float((base + c).clamp(low, high).mul(n).sum() / n.sum())

    lo, hi = -2 * lam, 2 * lam  # mean_at(lo) = S − λ <= S <= S + λ = mean_at(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_at(mid) < sparsity:
            lo = mid
        else:
            hi = mid
    c = (lo + hi) / 2
    return [float(x) for x in (base + c).clamp(low, high)]
