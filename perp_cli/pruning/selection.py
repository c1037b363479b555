"""Masks from scores: which weights to prune, given a score per weight (low = prune).

Every method reduces to a score; the comparison group decides what competes with what:

* `row`: each output row prunes the same number of weights (Wanda's default),
* `matrix`: the whole matrix competes (magnitude's and random's default),
* `global`: every prunable weight of the model competes,
* N:M: every group of M consecutive inputs keeps its N best.

Counts are exact (except `threshold_prune_mask`, SparseGPT's reference rule): a group of n weights at sparsity s prunes `prune_count(n, s)` weights,
ties broken by position (stable sort), so the same scores always give the same mask. A
weight already pruned by an earlier step (`pruned`) is pruned again first and stays
pruned even if the group then exceeds its count: masks never revive weights.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_EPS = 1e-9
_TOPK_CHUNK_BYTES = 32 << 20
_THREADED_SELECTION_MIN = 1 << 16  # below, starting the threads costs more than they save


def prune_count(n: int, sparsity: float) -> int:
    """floor(n·s), robust to float representation (0.7·100 is 70, 0.29·100 is 29)."""
    return min(n, int(math.floor(n * sparsity + _EPS * max(1, n))))


def _forced(scores: torch.Tensor, pruned: torch.Tensor | None) -> torch.Tensor:
    """Scores with already-pruned weights moved to the very bottom."""
    scores = scores.float()
    if pruned is None:
        return scores
    return scores.masked_fill(pruned.to(scores.device), float("-inf"))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries along the last dim (ties: lowest position first).

    Equal to taking the first k of a stable sort, in O(n): everything below the k-th
    value, plus the first of the entries equal to it until k are taken.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = kth_smallest(scores, k)
    at_most = scores <= kth
    if bool((at_most.sum(dim=-1, keepdim=True, dtype=torch.int32) == k).all()):
        # no surplus ties (the usual case with continuous scores): every tie is taken, and
        # the tie count below is skipped
        return at_most
    # only the rows with surplus ties take the first ties by position; the running count
    # is over those rows alone (int32: a row has fewer than 2^31 entries), not the int64
    # cumsum of the whole matrix (8 bytes per weight, ~90 MiB for a 5632x2048 matrix).
    # N:M scores come as [rows, groups, m]: every group is a row here.
    below = (scores < kth).reshape(-1, scores.shape[-1])
    equal = (scores == kth).reshape(-1, scores.shape[-1])
    need = k - below.sum(dim=-1, keepdim=True)
    rows = (equal.sum(dim=-1, keepdim=True) != need).reshape(-1).nonzero().reshape(-1)
    out = below | equal
    ties = equal[rows]
    out[rows] = below[rows] | (ties & (ties.cumsum(dim=-1, dtype=torch.int32) <= need[rows]))
    return out.reshape(scores.shape)


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value along the last dim (keepdim), 1 <= k <= n.

    The same value as `torch.kthvalue` (an element of the row, NaN counted as largest).
    On the CPU it comes from NumPy's `partition` (a SIMD selection on the values alone,
    5-10x faster than `torch.topk`/`kthvalue`, which carry an index with every value);
    elsewhere from `topk` (the largest of the k smallest, or the smallest of the n−k+1
    largest), or `kthvalue` for one long row. Rows are independent, so they are taken a
    slice at a time: the temporaries stay under `_TOPK_CHUNK_BYTES`, not matrix-sized.
    `partition` releases the GIL and runs on one core, so on the CPU the slices are spread
    over torch's intra-op thread count (the threads every other op of the run uses)."""
    n = scores.shape[-1]
    flat = scores.detach().reshape(-1, n)
    out = torch.empty(flat.shape[0], 1, dtype=scores.dtype, device=scores.device)
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        values = flat.numpy()
        threads = torch.get_num_threads()
        step = max(1, _TOPK_CHUNK_BYTES // (values.itemsize * n))  # np.partition copies its slice
        if threads > 1:
            step = min(step, -(-flat.shape[0] // threads))
        starts = range(0, flat.shape[0], step)

        def take(i: int) -> None:
            out[i : i + step, 0] = torch.from_numpy(np.partition(values[i : i + step], k - 1, axis=1)[:, k - 1])

        if threads > 1 and len(starts) > 1 and flat.numel() >= _THREADED_SELECTION_MIN:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                list(pool.map(take, starts))
        else:
            for i in starts:
                take(i)
        return out.reshape(*scores.shape[:-1], 1)
    if flat.shape[0] == 1:
        return torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    taken = min(k, n - k + 1)
    step = max(1, _TOPK_CHUNK_BYTES // (12 * taken))  # topk's values and int64 indices
    for i in range(0, flat.shape[0], step):
        rows = flat[i : i + step]
        if k <= n // 2:
            out[i : i + step] = torch.topk(rows, k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
        else:
            out[i : i + step] = torch.topk(rows, n - k + 1, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
    return out.reshape(*scores.shape[:-1], 1)


def prune_mask(
    scores: torch.Tensor, sparsity: float, scope: str, pruned: torch.Tensor | None = None
) -> torch.Tensor:
    """Pruned-weight mask (True = prune) of a 2-D `[out, in]` score tensor.

    `scope` is `row` (each row prunes floor(in·s)) or `matrix` (floor(out·in·s) overall).
    """
    s = _forced(scores, pruned)
    if scope == "row":
        out = _lowest(s, prune_count(s.shape[1], sparsity))
    elif scope == "matrix":
        out = _lowest(s.reshape(1, -1), prune_count(s.numel(), sparsity)).reshape(s.shape)
    else:
        raise ValueError(f"unknown scope {scope!r}")
    return out if pruned is None else out | pruned.to(out.device)


def threshold_prune_mask(
    scores: torch.Tensor, sparsity: float, scope: str, pruned: torch.Tensor | None = None
) -> torch.Tensor:
    """The SparseGPT reference's block rule: prune every score <= the (k+1)-th smallest.

    k = floor(n·s) for each group of n scores (`row` or `matrix`, as in `prune_mask`);
    the reference (IST-DASLab/sparsegpt `fasterprune`) takes `sort(scores)[k]` as the
    threshold and prunes `scores <= threshold`, i.e. k+1 weights per group, more on ties
    (all of them at s such that k = n). Already-pruned weights count among the lowest.
    """
    s = _forced(scores, pruned)
    groups = s if scope == "row" else s.reshape(1, -1)
    if scope not in ("row", "matrix"):
        raise ValueError(f"unknown scope {scope!r}")
    k = prune_count(groups.shape[1], sparsity)
    if k >= groups.shape[1]:
        out = torch.ones_like(s, dtype=torch.bool)
    else:
        kth = kth_smallest(groups, k + 1)
        out = (groups <= kth).reshape(s.shape)
    return out if pruned is None else out | pruned.to(out.device)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Pruned-weight mask keeping the n highest scores in every m consecutive inputs.

    The input dimension (last) must be a multiple of m; callers check and report.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not a multiple of {m}")
    s = _forced(scores, pruned).reshape(rows, cols // m, m)
    out = _lowest(s, m - n).reshape(rows, cols)
    return out if pruned is None else out | pruned.to(out.device)


def global_prune_masks(
    scores: dict[str, torch.Tensor], sparsity: float, pruned: dict[str, torch.Tensor | None] | None = None
) -> dict[str, torch.Tensor]:
    """Pruned-weight masks when all matrices compete: floor(total·s) lowest scores overall.

    The scores are concatenated once (4 bytes per weight on the host); ties are broken by
    the order of `scores`, then position.
    """
    pruned = pruned or {}
    keys = list(scores)
    flat = torch.cat([_forced(scores[k], pruned.get(k)).reshape(-1).cpu() for k in keys])
    chosen = _lowest(flat.reshape(1, -1), prune_count(flat.numel(), sparsity)).reshape(-1)
    out, offset = {}, 0
    for k in keys:
        n = scores[k].numel()
        mask = chosen[offset : offset + n].reshape(scores[k].shape)
        old = pruned.get(k)
        out[k] = mask if old is None else mask | old.cpu()
        offset += n
    return out
