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
  first by Wanda's |W_ij|·sqrt(E[x_j²]) (the kept weights listed with negative
  contributions first in Wanda order, positive ones after them in reverse; ε_i > 0 takes
  from the front, ε_i < 0 from the back);
* N:M: the weight pruned is the least important kept weight of the grown weight's
  group of M, and a swap must not flip the sign of ε_i (the reference's N:M rule).

A row stops for good once |ε_i| <= the threshold (0.1, the reference's
`--update_threshold`), and every row stops after `iters` (50, `--max_cycle_time`)
iterations. Each swap prunes one and grows one weight of the same row (and of the same
N:M group), so every row's count and the N:M pattern are kept exactly.

Where perp differs from the reference (documented in docs/cli-prune.md): a row also
stops where the reference would break its count: when the next grow candidate is not a
still-pruned weight (the reference's walk reaches the kept weights, sorted in the middle
of its list with key 0, and "grows" a weight that is already kept) or the two pruning
pointers have crossed. Weights an earlier step pruned (`frozen`) are never grown. An input with zero
variance and zero mean (a ReLU channel that never fires) gets grow key 0 (the
reference's 0/0 = NaN sorts last, so it grows such useless weights first). As in
the reference, the candidates' signs are not checked: when a row has no kept weight of
the needed sign, the walk goes on into the other sign. The reference's default
`--skip_layer mlp` (refine attention matrices only) is `skip` here.

Weight values: DSnoT does not update weights. The refined mask is applied to the
weights as they were before this step pruned them (for SparseGPT: its mask choice is
refined and applied to the dense weights, its OBS update is dropped, as in the
reference's SparseGPT-initialised DSnoT).
"""

from __future__ import annotations

import time

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
        self.seconds = 0.0  # time spent accumulating both (reported per block by the pruner)

    def add(self, x: torch.Tensor) -> None:
        start = time.perf_counter()
        if self.primary is not None:
            self.primary.add(x)
        self.moments.add(x)
        self.seconds += time.perf_counter() - start

    @property
    def tokens(self) -> int:
        return self.moments.tokens

    def norms(self) -> torch.Tensor:
        return self.moments.norms()

    def hessian(self) -> torch.Tensor:
        return self.primary.hessian()  # type: ignore[union-attr]

    def take_hessian(self) -> torch.Tensor:
        return self.primary.take_hessian()  # type: ignore[union-attr]


@dataclass
class Refined:
    pruned: torch.Tensor  # bool [out, in], True = pruned
    swaps: int
    iterations: int


def _pruning_order(wanda: torch.Tensor, contribution: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per row, the kept weights as the reference walks them: Wanda-ascending, negative
    contributions first in that order, then zero ones, then positive ones in reverse
    (`return_reorder_indice` on the Wanda-sorted kept weights); the pruned weights after
    them, never reached (each row's pointers stay within its kept count)."""
    by_wanda = torch.sort(torch.where(kept, wanda, torch.full_like(wanda, float("inf"))), dim=1, stable=True)[1]
    c = contribution.gather(1, by_wanda)
    k = kept.gather(1, by_wanda)
    cols = by_wanda.shape[1]
    position = torch.arange(cols, device=wanda.device, dtype=torch.float64).expand(c.shape)
    key = torch.where(c < 0, position, torch.where(c > 0, 3.0 * cols - position, 1.5 * cols))
    key = torch.where(k, key, 4.0 * cols + position)
    return by_wanda.gather(1, torch.sort(key, dim=1, stable=True)[1])


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

    # grow candidates: every weight sorted by its key (kept ones at 0, as the reference sorts)
    grow_key = torch.where(start, contribution, torch.zeros_like(contribution))
    if var_power:
        grow_key = grow_key / stat.variance().to(device).reshape(1, -1).pow(var_power)
    grow_key = torch.nan_to_num(grow_key, nan=0.0)  # 0/0: a constant input with zero contribution
    grow_order = torch.sort(grow_key, dim=1, stable=True)[1]
    wanda = w.abs() * stat.mean_square().to(device).sqrt().reshape(1, -1)

    row = torch.arange(rows, device=device)
    lo = torch.zeros(rows, dtype=torch.long, device=device)
    hi = torch.full((rows,), cols - 1, dtype=torch.long, device=device)
    if m == 0:
        prune_order = _pruning_order(wanda, contribution, ~start)
        p_lo, p_hi = lo.clone(), (~start).sum(dim=1) - 1
    active = torch.ones(rows, dtype=torch.bool, device=device)
    swaps = 0
    iteration = 0
    while bool(active.any()) and iteration < iters:
        iteration += 1
        positive = error > 0
        # grow: from the top of the list when ε > 0, from the bottom otherwise; a candidate
        # that is not a (still) pruned weight ends the row, where the reference would
        # change the row's count
        grow = grow_order[row, torch.where(positive, hi, lo).clamp(0, cols - 1)]
        g_c = contribution[row, grow]
        ok = active & (error.abs() > threshold) & (lo <= hi) & start[row, grow] & pruned[row, grow] & ~frozen[row, grow]
        hi = hi - positive.long()
        lo = lo + (~positive).long()
        if m == 0:
            negative = error < 0  # the reference's test for the pruning side (ε = 0: front)
            cut = prune_order[row, torch.where(negative, p_hi, p_lo).clamp(0, cols - 1)]
            p_c = contribution[row, cut]
            ok &= (p_lo <= p_hi) & ~pruned[row, cut]
            p_lo = p_lo + (~negative).long()
            p_hi = p_hi - negative.long()
        else:
            base = grow - grow % m
            members = base.reshape(-1, 1) + torch.arange(m, device=device).reshape(1, -1)
            eligible = ~start.gather(1, members) & ~pruned.gather(1, members)
            score = torch.where(eligible, wanda.gather(1, members), torch.full(members.shape, float("inf"), device=device))
            best = score.argmin(dim=1)
            cut = members[row, best]
            p_c = contribution[row, cut]
            ok &= eligible[row, best] & (torch.sign(error + p_c - g_c) == first_sign)
        active &= ok
        pruned[row[ok], cut[ok]] = True
        pruned[row[ok], grow[ok]] = False
        error = error + torch.where(ok, p_c - g_c, torch.zeros_like(error))
        swaps += int(ok.sum())
    return Refined(pruned, swaps, iteration)
