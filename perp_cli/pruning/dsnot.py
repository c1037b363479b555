"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning
for Sparse LLMs"; reference zyxxmu/DSnoT): refine a pruning mask by swaps.

For output row i, the expected reconstruction error of the pruned layer is
ε_i = Σ_{j pruned} W_ij · E[x_j] (the reference's E[x_j] is the per-sequence sum of
x_j, averaged over sequences: `sum_metric_row`). Each iteration swaps one weight per row:

* grow the pruned weight whose W_ij·E[x_j] / Var[x_j] is largest with the sign of ε_i
  (taking it out of the sum pulls ε_i towards zero; the variance term prefers stable
  inputs); the candidates are walked from both ends of one sorted list, as in the
  reference;
* prune a kept weight whose contribution has the opposite sign, the least important
  first by Wanda's |W_ij|·sqrt(E[x_j²]) (negative contributions in that order when
  ε_i > 0, positive ones from the other end when ε_i < 0);
* N:M: the weight pruned is the least important kept weight of the grown weight's
  group of M, and a swap must not flip the sign of ε_i (the reference's N:M rule).

A row stops for good once |ε_i| <= the threshold (0.1, the reference's
`--update_threshold`), and every row stops after `iters` (50, `--max_cycle_time`)
iterations. Each swap prunes one and grows one weight of the same row (and of the same
N:M group), so every row's count and the N:M pattern are kept exactly.

Where perp differs from the reference (documented in docs/cli-prune.md): a row also
stops when the next candidate on either side does not exist (no pruned weight with the
needed sign left, no kept weight with the opposite sign). The reference keeps walking
its sorted lists into the kept weights then, "growing" weights that are already kept
and so changing the row's count; that happens only on rows with fewer than `iters`
right-signed candidates (small layers). Weights an earlier step pruned (`frozen`) are
never grown. The reference's default `--skip_layer mlp` (refine attention matrices
only) is `skip` here.

Weight values: DSnoT does not update weights. The refined mask is applied to the
weights as they were before this step pruned them (for SparseGPT: its mask choice is
refined and applied to the dense weights, its OBS update is dropped, as in the
reference's SparseGPT-initialised DSnoT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_ITERS = 50
DEFAULT_THRESHOLD = 0.1
SKIPS = ("mlp", "attention", "none")


class MomentStat:
    """Per input feature, over the calibration sequences: Σ x², Σ x and the pooled
    within-sequence variance (the reference's statistics, float64 accumulators).

    The reference's `var` averages each forward call's variance weighted by its tokens;
    it calls one sequence at a time, so this is Σ_s Σ_t (x − mean_s)² / tokens.
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.between = torch.zeros(features, dtype=torch.float64, device=device)  # Σ_s (Σ_t x)² / T_s
        self.tokens = 0
        self.sequences = 0

    def add(self, x: torch.Tensor) -> None:
        seqs = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.unsqueeze(0)
        seqs = seqs.double()
        sums = seqs.sum(dim=1)  # [sequences, features]
        self.sq += seqs.pow(2).sum(dim=(0, 1))
        self.total += sums.sum(dim=0)
        self.between += sums.pow(2).sum(dim=0) / seqs.shape[1]
        self.tokens += seqs.shape[0] * seqs.shape[1]
        self.sequences += seqs.shape[0]

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ (as `NormStat.norms`, so Wanda and RIA can use this statistic)."""
        return self.sq.sqrt().float()

    def mean_square(self) -> torch.Tensor:
        """Σ x² / sequences: the reference's `scaler_row`."""
        return (self.sq / max(self.sequences, 1)).float()

    def sum_per_sequence(self) -> torch.Tensor:
        """Σ x / sequences: the reference's `sum_metric_row`."""
        return (self.total / max(self.sequences, 1)).float()

    def variance(self) -> torch.Tensor:
        return ((self.sq - self.between) / max(self.tokens, 1)).clamp_min(0).float()


class WithMoments:
    """A method's own statistic (NormStat, HessianStat) and DSnoT's moments of the same
    input, filled by one hook."""

    def __init__(self, primary: object | None, moments: MomentStat) -> None:
        self.primary = primary
        self.moments = moments

    def add(self, x: torch.Tensor) -> None:
        if self.primary is not None:
            self.primary.add(x)
        self.moments.add(x)

    @property
    def tokens(self) -> int:
        return self.moments.tokens

    def norms(self) -> torch.Tensor:
        return self.moments.norms()

    def hessian(self) -> torch.Tensor:
        return self.primary.hessian()  # type: ignore[union-attr]


@dataclass
class Refined:
    pruned: torch.Tensor  # bool [out, in], True = pruned
    swaps: int
    iterations: int


def _reorder_for_pruning(order: torch.Tensor, contribution: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per row: candidates with a negative contribution in `order`, then the rest, then
    candidates with a positive contribution in reverse `order` (the reference's
    `return_reorder_indice` on the Wanda-sorted kept weights)."""
    c = contribution.gather(1, order)
    ok = candidate.gather(1, order)
    cols = order.shape[1]
    position = torch.arange(cols, device=order.device, dtype=torch.float64).expand_as(c)
    key = torch.where(ok & (c < 0), position, torch.where(ok & (c > 0), 3.0 * cols - position, 1.5 * cols))
    return order.gather(1, torch.sort(key, dim=1, stable=True)[1])


def refine(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    stat: MomentStat,
    iters: int = DEFAULT_ITERS,
    threshold: float = DEFAULT_THRESHOLD,
    n: int = 0,
    m: int = 0,
    frozen: torch.Tensor | None = None,
    var_power: float = 1.0,
) -> Refined:
    """DSnoT swaps on `[out, in]` `weight` (its values before pruning) from mask `pruned`."""
    w = weight.detach().float()
    device = w.device
    rows, cols = w.shape
    pruned = pruned.to(device).clone()
    start = pruned.clone()
    frozen = torch.zeros_like(pruned) if frozen is None else frozen.to(device)
    contribution = w * stat.sum_per_sequence().to(device).reshape(1, -1)  # W_ij · E[x_j]
    error = (contribution * start).sum(dim=1)
    first_sign = torch.sign(error)

    growable = start & ~frozen
    grow_key = torch.where(start, contribution, torch.zeros_like(contribution))
    if var_power:
        grow_key = grow_key / stat.variance().to(device).reshape(1, -1).pow(var_power)
    grow_key = torch.nan_to_num(grow_key, nan=0.0)  # 0/0: a dead feature, contribution 0
    grow_order = torch.sort(grow_key, dim=1, stable=True)[1]

    wanda = w.abs() * stat.mean_square().to(device).sqrt().reshape(1, -1)
    if m == 0:
        kept_first = torch.sort(torch.where(start, torch.full_like(wanda, float("inf")), wanda), dim=1, stable=True)[1]
        prune_order = _reorder_for_pruning(kept_first, contribution, ~start)

    row = torch.arange(rows, device=device)
    lo = torch.zeros(rows, dtype=torch.long, device=device)
    hi = torch.full((rows,), cols - 1, dtype=torch.long, device=device)
    p_lo, p_hi = lo.clone(), hi.clone()
    active = torch.ones(rows, dtype=torch.bool, device=device)
    swaps = 0
    iteration = 0
    while bool(active.any()) and iteration < iters:
        iteration += 1
        positive = error > 0
        # grow: from the top of the list when ε > 0, from the bottom otherwise
        g_pos = torch.where(positive, hi, lo).clamp(0, cols - 1)
        grow = grow_order[row, g_pos]
        g_c = contribution[row, grow]
        ok = active & (error.abs() > threshold) & growable[row, grow] & pruned[row, grow]
        ok &= torch.where(positive, g_c > 0, g_c < 0) & (lo <= hi)
        hi = hi - positive.long()
        lo = lo + (~positive).long()
        if m == 0:
            p_pos = torch.where(positive, p_lo, p_hi).clamp(0, cols - 1)
            cut = prune_order[row, p_pos]
            p_c = contribution[row, cut]
            ok &= ~start[row, cut] & ~pruned[row, cut] & torch.where(positive, p_c < 0, p_c > 0) & (p_lo <= p_hi)
            p_lo = p_lo + positive.long()
            p_hi = p_hi - (~positive).long()
        else:
            base = grow - grow % m
            members = base.reshape(-1, 1) + torch.arange(m, device=device).reshape(1, -1)
            eligible = ~start.gather(1, members) & ~pruned.gather(1, members)
            score = torch.where(eligible, wanda.gather(1, members), torch.full_like(members, 0, dtype=wanda.dtype) + float("inf"))
            best = score.argmin(dim=1)
            cut = members[row, best]
            p_c = contribution[row, cut]
            ok &= eligible[row, best]
            ok &= torch.sign(error + p_c - g_c) == first_sign
        active &= ok
        pruned[row[ok], cut[ok]] = True
        pruned[row[ok], grow[ok]] = False
        error = error + torch.where(ok, p_c - g_c, torch.zeros_like(error))
        swaps += int(ok.sum())
    return Refined(pruned, swaps, iteration)
