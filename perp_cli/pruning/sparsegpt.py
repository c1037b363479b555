"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and compensate with OBS updates.

For a layer with weight W `[out, in]` and calibration inputs X `[in, tokens]`, SparseGPT
approximately solves min ‖WX − ŴX‖² over Ŵ with the chosen sparsity, column by column:

* H = 2/N · Σ XXᵀ, N = the number of calibration sequences (windows), accumulated in
  float32 as the reference's running average (`perp_cli.pruning.statistics.HessianStat`);
* dead inputs (H_ii = 0) get H_ii = 1 and their weight column is zeroed;
* H += λ·mean(diag H)·I with λ = `damp` (0.01);
* the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) gives the sequential inverse-Hessian
  rows the algorithm needs;
* columns are processed in blocks of `blocksize` (128); at the start of each block the
  mask is chosen from w²/[U]_jj² (unstructured), or every M columns (N:M); within a block
  each pruned weight's error is spread over the remaining columns of the block (OBS),
  and the accumulated error is applied lazily to all later columns once per block.

This follows Algorithm 1 of the paper and `fasterprune` of the reference code
(IST-DASLab/sparsegpt). H is the reference's: normalised per calibration sequence, N =
the number of windows, not tokens (`statistics.HessianStat`). The scale cancels in the
updates but not in the dead-input constant and so not in the damping: per token, the
masks of ReLU models drift from the reference's (docs/fidelity.md).

The block mask: `selection="reference"` (default) is the reference's rule, every weight
whose score is <= the (k+1)-th smallest of the block, k = floor(s·n): k+1 weights per
128-column block (more on ties), so a matrix ends slightly above the requested sparsity
(+1 weight per block and row group); `selection="exact"` prunes exactly k per block, so
the requested sparsity is met exactly. N:M is the same under both (M−N per group).

Speed (issue 17): the arithmetic is the reference's, float for float, but the column loop
works on each block transposed (every column a contiguous row), with preallocated
buffers and four ops per column, on one thread; the lazy GEMMs and the factorisations use
the caller's threads. `tests/test_pruning_sparsegpt.py` checks the bits against the
plain column-by-column loop.

The loss reported is the reference's: Σ (w − q)² / [U]_jj² / 2 with the H above.

A Hessian that is not positive definite after damping (too few tokens, duplicated
features) makes the Cholesky fail: damping is multiplied by 10 and retried, and the
retries are reported. Non-finite results raise instead of being written.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from perp_cli.errors import NumericalError
from perp_cli.pruning.selection import nm_prune_mask, prune_mask, threshold_prune_mask

SELECTIONS = ("reference", "exact")

MAX_DAMP_RETRIES = 6


@dataclass
class InverseHessian:
    """What every matrix of one input group shares: U with H⁻¹ = UᵀU, dead inputs, damping."""

    upper: torch.Tensor
    dead: torch.Tensor
    damp: float
    retries: int


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """U upper triangular with UᵀU = H⁻¹, or None if H is not positive definite."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    inverse = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01, where: str = "layer") -> InverseHessian:
    """Dead-input fix, damping and the Cholesky of H⁻¹, raising the damping until it works."""
    if not torch.isfinite(hessian).all():
        raise NumericalError(f"{where}: the calibration Hessian contains NaN or inf (check the model's activations)")
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(h))
    diag = torch.arange(h.shape[0], device=h.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        factor = damp * 10**retry
        damped = h.clone()
        damped[diag, diag] += factor * mean_diag  # a float32 product, as the reference rounds it
        upper = _upper_inverse_cholesky(damped)
        if upper is not None:
            return InverseHessian(upper, dead, factor, retry)
    raise NumericalError(
        f"{where}: the Hessian stays singular even with damping {damp * 10**MAX_DAMP_RETRIES:g}; "
        "use more calibration samples (--nsamples) or a larger --damp"
    )


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # the pruned, compensated weight, float32 [out, in]
    pruned: torch.Tensor  # bool [out, in], True = pruned
    loss: float  # Σ (w − q)² / [U]_jj² / 2: the OBS estimate of the added error


class PhaseClock:
    """Wall seconds per phase of the compression step, summed over calls (`bench/prune_speed.py`).

    CPU work is synchronous, so these are the phases' real times there; on a GPU they
    are launch times unless the caller synchronises.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small element-wise ops on one thread.

    The column loop is thousands of ops on ~100k floats each: splitting each over
    threads costs more in synchronisation than it saves, and on busy cores a
    descheduled worker stalls every op (2 threads were slower than 1). The GEMMs and
    factorisations around it keep the caller's threads. Results do not depend on it
    (element-wise ops round the same on any number of threads).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _column_loop(wt: torch.Tensor, prunedt: torch.Tensor, upper: torch.Tensor, n: int, m: int,
                 old: torch.Tensor | None, errt: torch.Tensor, scratch: torch.Tensor) -> None:
    """The OBS updates inside one column block, in place, on TRANSPOSED operands.

    `wt` `[count, rows]` is the block's weights with each column as a contiguous row,
    `prunedt` its mask (filled here every M columns for N:M), `upper` `[count, count]`
    the block of U; `errt` receives (w − q)/U_ii per column. For column i, with
    e = (w_i − q_i)/U_ii, every later column j of the block gets w_j ← w_j − e·U_ij:
    the product rounded, then the difference, as the reference rounds it (not a fused
    multiply-add, which rounds once and made masks drift from the reference's). The
    transposed layout makes every operand contiguous and the loop four ops per
    column, without allocations (`scratch` holds the products).
    """
    count = wt.shape[0]
    rows_w, rows_pruned, rows_err = wt.unbind(0), prunedt.unbind(0), errt.unbind(0)
    diag = torch.diagonal(upper).unbind(0)  # 0-dim tensors: divide exactly as before
    zero = torch.zeros((), dtype=wt.dtype, device=wt.device)
    for i in range(count):
        if n != 0 and i % m == 0:
            group = wt[i : i + m].t()
            scores = group**2 / torch.diagonal(upper)[i : i + m].reshape(1, -1) ** 2
            prunedt[i : i + m] = nm_prune_mask(scores, n, m, old[:, i : i + m] if old is not None else None).t()
        err = torch.where(rows_pruned[i], rows_w[i], zero, out=rows_err[i]).div_(diag[i])
        if i + 1 < count:
            later = count - i - 1
            product = torch.mul(upper[i, i + 1 :].unsqueeze(1), err, out=scratch[:later])
            wt[i + 1 :].sub_(product)


def prune_matrix(
    weight: torch.Tensor,
    inverse: InverseHessian,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    scope: str = "matrix",
    pruned: torch.Tensor | None = None,
    selection: str = "reference",
    clock: PhaseClock | None = None,
) -> SparseGPTResult:
    """SparseGPT on one `[out, in]` weight (not modified); `n:m` > 0 selects N:M.

    `scope` picks the mask within each column block: `matrix` (all rows of the block
    compete, as published) or `row` (each row of the block prunes the same count).
    `pruned` (already-pruned weights) are forced into every block's mask. `selection`:
    `reference` (score <= the (k+1)-th smallest, as IST-DASLab/sparsegpt) or `exact`
    (exactly floor(s·n) per block); see the module docstring. `clock` collects the
    time of the mask choice, the column loop and the lazy updates.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}")
    clock = clock or PhaseClock()
    choose = threshold_prune_mask if selection == "reference" else prune_mask
    w_all = weight.detach().clone().float()
    rows, cols = w_all.shape
    hinv = inverse.upper.to(w_all.device)
    w_all[:, inverse.dead.to(w_all.device)] = 0
    old = pruned.to(w_all.device) if pruned is not None else None
    out_mask = torch.zeros_like(w_all, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float32, device=w_all.device)
    scratch = torch.empty(min(blocksize, cols), rows, dtype=torch.float32, device=w_all.device)
    errt = torch.empty(min(blocksize, cols), rows, dtype=torch.float32, device=w_all.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        hinv1 = hinv[i1:i2, i1:i2]
        old1 = old[:, i1:i2] if old is not None else None
        with clock("mask"):
            w1 = w_all[:, i1:i2]
            if n == 0:
                mask1 = choose(w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2, sparsity, scope, old1)
                prunedt = mask1.t().contiguous()
            else:
                prunedt = torch.zeros(count, rows, dtype=torch.bool, device=w_all.device)
        with clock("columns"), _one_thread():
            wt = w1.t().contiguous()
            _column_loop(wt, prunedt, hinv1, n, m, old1, errt[:count], scratch)
            # q: the weight kept, or 0; a column is final once the loop has passed it
            w_all[:, i1:i2] = wt.t().masked_fill_(prunedt.t(), 0)
            out_mask[:, i1:i2] = prunedt.t()
            err1 = errt[:count].t().contiguous()  # [rows, count], the layout the lazy GEMM had before
            losses += err1.pow(2).sum(dim=1) / 2  # (w − q)² / [U]_ii² summed
        with clock("lazy"):
            w_all[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of later columns (product, then difference)

    if not torch.isfinite(w_all).all():
        raise NumericalError("SparseGPT produced non-finite weights; raise --damp or use more calibration samples")
    w_all[out_mask] = 0  # exact zeros, whatever rounding did
    return SparseGPTResult(w_all, out_mask, float(losses.sum()))
