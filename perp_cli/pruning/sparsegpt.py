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

Speed (issue 17): the maths is the reference's, the float32 rounding is not. U comes
from one Cholesky of H with its order reversed and a GEMM-blocked triangular inverse
(2/3·d³ operations instead of 4/3·d³ in LAPACK); inside each 128-column block the OBS
updates are rank-1 only within sub-blocks of 16 columns, and one GEMM per sub-block
updates the rest of the block (the reference's lazy batch, one level down). The column
loop works on each block transposed (every column a contiguous row) on one thread; the
GEMMs and the factorisation use the caller's threads. Masks and weights agree with the
reference's arithmetic within float noise, with stated tolerances
(`tests/test_pruning_sparsegpt.py`, `tests/test_sparsegpt_fidelity.py`, docs/fidelity.md).

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

SUBBLOCK = 16  # columns per rank-1 sub-block inside a column block (`_column_block`)


@dataclass
class InverseHessian:
    """What every matrix of one input group shares: U with H⁻¹ = UᵀU, dead inputs, damping."""

    upper: torch.Tensor
    dead: torch.Tensor
    damp: float
    retries: int


def _lower_times(lower: torch.Tensor, other: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    """out = lower @ other for a lower triangular `lower`, by halves, skipping its zero quarter."""
    n = lower.shape[0]
    if n <= leaf:
        torch.mm(lower, other, out=out)
        return
    k = n // 2
    _lower_times(lower[:k, :k], other[:k], out[:k], leaf)
    _lower_times(lower[k:, k:], other[k:], out[k:], leaf)
    out[k:].addmm_(lower[k:, :k], other[:k])


def _times_lower(other: torch.Tensor, lower: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    """out = other @ lower for a lower triangular `lower`, by halves, skipping its zero quarter."""
    n = lower.shape[0]
    if n <= leaf:
        torch.mm(other, lower, out=out)
        return
    k = n // 2
    _times_lower(other[:, :k], lower[:k, :k], out[:, :k], leaf)
    _times_lower(other[:, k:], lower[k:, k:], out[:, k:], leaf)
    out[:, :k].addmm_(other[:, k:], lower[k:, :k])


def _lower_triangular_inverse(lower: torch.Tensor, out: torch.Tensor, leaf: int = 128) -> None:
    """out = L⁻¹ for a lower triangular L (`out` zero above the diagonal), by halves:
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]].

    About d³/3 operations, nearly all in GEMMs that skip the zero quarters (LAPACK's
    triangular inverse is not exposed by torch; `cholesky_inverse` does twice the work,
    at a lower rate), written in place.
    """
    n = lower.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False))
        return
    k = n // 2
    _lower_triangular_inverse(lower[:k, :k], out[:k, :k], leaf)
    _lower_triangular_inverse(lower[k:, k:], out[k:, k:], leaf)
    product = torch.empty(n - k, k, dtype=lower.dtype, device=lower.device)
    _times_lower(lower[k:, :k], out[:k, :k], product, 2 * leaf)  # B·A⁻¹
    _lower_times(out[k:, k:], product, out[k:, :k], 2 * leaf)  # C⁻¹·B·A⁻¹
    out[k:, :k].neg_()


def _flip_in_place(square: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """`square.flip(0, 1)` written into `square` itself, in its own layout (a matrix
    stored densely, by rows or by columns as LAPACK returns its factors, reversed in both
    dimensions is its storage reversed): slices of `chunk` entries from both ends are
    swapped, so the temporary is one slice, not a second matrix."""
    dense = square if square.is_contiguous() else square.t()
    if not dense.is_contiguous():  # strided views: not worth a special case
        return square.copy_(square.flip(0, 1))
    flat = dense.view(-1)
    n = flat.numel()
    for i in range(0, n // 2, chunk):
        c = min(chunk, n // 2 - i)
        front = flat[i : i + c].clone()
        flat[i : i + c] = flat[n - i - c : n - i].flip(0)
        flat[n - i - c : n - i] = front.flip(0)
    return square


def _upper_inverse_cholesky(lower: torch.Tensor) -> torch.Tensor | None:
    """U upper triangular with UᵀU = H⁻¹, from L, the Cholesky factor of JHJ (H with its
    order reversed: J), or None if U is not finite.

    With JHJ = LLᵀ (one Cholesky): H = (JLJ)(JLJ)ᵀ, so H⁻¹ = (JL⁻¹J)ᵀ(JL⁻¹J), and JL⁻¹J is
    upper triangular with a positive diagonal: it is U (the Cholesky factor is unique).
    One Cholesky and one triangular inverse, 2/3·d³ operations, instead of the
    reference's Cholesky, inverse from it and Cholesky of the inverse (4/3·d³, LAPACK at
    ~40% of the GEMM rate here). The same U up to float32 rounding (docs/fidelity.md).
    """
    inverse = torch.zeros_like(lower)
    _lower_triangular_inverse(lower, inverse)
    upper = _flip_in_place(inverse)
    # one pass without a temporary: a NaN or inf anywhere makes the sum non-finite (finite
    # entries of U are far from overflowing a float32 sum)
    if not torch.isfinite(upper.sum()):
        return None
    return upper


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01, where: str = "layer", consume: bool = False) -> InverseHessian:
    """Dead-input fix, damping and the Cholesky of H⁻¹, raising the damping until it works.

    `consume=True`: `hessian` (float32, contiguous) is the caller's to give up: it is
    reversed and damped in place and becomes the factorisation's input, so the d x d
    matrices alive at once are two (H, then the factor and the inverse) instead of
    five (H, its reversed copy, the factor, the inverse and U). Same U, bit for bit.
    Otherwise `hessian` is left as it was (its reversed copy is made)."""
    if not torch.isfinite(hessian.sum()):  # one pass: a NaN or inf anywhere makes the sum non-finite
        raise NumericalError(f"{where}: the calibration Hessian contains NaN or inf (check the model's activations)")
    h = hessian.detach()
    in_place = consume and h.dtype == torch.float32 and h.is_contiguous()
    h = h.float()
    diag = torch.diagonal(h)
    dead = diag == 0
    fixed = torch.where(dead, 1.0, diag)  # the diagonal after the dead-input fix H_ii = 1
    mean_diag = torch.mean(fixed)
    # in the order the factorisation wants; only the diagonal changes between retries
    reversed_h = _flip_in_place(h) if in_place else h.flip(0, 1)
    del h, hessian
    for retry in range(MAX_DAMP_RETRIES + 1):
        factor = damp * 10**retry
        reversed_h.diagonal().copy_((fixed + factor * mean_diag).flip(0))  # a float32 product, as the reference rounds it
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if int(info) != 0:
            continue
        del reversed_h  # the factor replaces it (the caller holds no reference when it consumed H)
        upper = _upper_inverse_cholesky(lower)
        if upper is not None:
            return InverseHessian(upper, dead, factor, retry)
        # U overflowed (a factor this close to singular is very rare): retry from LLᵀ, the
        # reversed matrix up to rounding, whose diagonal the next damping overwrites
        reversed_h = lower @ lower.t()
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

    The column loop and the mask choice are thousands of ops on ~100k floats each:
    splitting each over threads costs more in synchronisation than it saves, and on busy
    cores a descheduled worker stalls every op (2 threads were slower than 1). The GEMMs
    and the factorisation around them keep the caller's threads. Results do not depend on it
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


def _column_block(wt: torch.Tensor, prunedt: torch.Tensor, upper: torch.Tensor, diag: torch.Tensor, n: int, m: int,
                  old: torch.Tensor | None, errt: torch.Tensor, subblock: int) -> None:
    """The OBS updates inside one column block, in place, on TRANSPOSED operands.

    `wt` `[count, rows]` is the block's weights with each column as a contiguous row,
    `prunedt` its mask (filled here every M columns for N:M), `upper` `[count, count]`
    the block of U and `diag` its diagonal; `errt` receives e_i = (w_i − q_i)/U_ii per
    column. Column i must give every later column j of the block w_j ← w_j − e_i·U_ij
    before j is reached. Two levels, as the reference's lazy batches one level down:
    within a sub-block of `subblock` columns the updates are rank-1, column after column
    (three ops per column); the rest of the block gets the sub-block's updates at once,
    one GEMM [later, sub]·[sub, rows]. The same sums as column after column, in another
    order (docs/fidelity.md).
    """
    count = wt.shape[0]
    rows_w, rows_pruned, rows_err, diags = wt.unbind(0), prunedt.unbind(0), errt.unbind(0), diag.unbind(0)
    zero = torch.zeros((), dtype=wt.dtype, device=wt.device)
    if n != 0:  # an N:M group is chosen from weights that have seen every earlier column: never split it
        subblock = -(-subblock // m) * m
    for j1 in range(0, count, subblock):
        j2 = min(j1 + subblock, count)
        for i in range(j1, j2):
            if n != 0 and i % m == 0:
                scores = wt[i : i + m].t() ** 2 / diag[i : i + m].reshape(1, -1) ** 2
                prunedt[i : i + m] = nm_prune_mask(scores, n, m, old[:, i : i + m] if old is not None else None).t()
            err = torch.where(rows_pruned[i], rows_w[i], zero, out=rows_err[i]).div_(diags[i])  # 0-dim: no host round trip
            if i + 1 < j2:
                wt[i + 1 : j2].addr_(upper[i, i + 1 : j2], err, alpha=-1)
        if j2 < count:
            wt[j2:].addmm_(upper[j1:j2, j2:].t(), errt[j1:j2], alpha=-1)


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
    subblock: int = SUBBLOCK,
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
    layout_free = selection == "reference" and scope == "matrix"  # the default: one threshold for the block
    # the whole matrix transposed (a copy: the input is never modified): each column a
    # contiguous row, so every block, sub-block and lazy update is a contiguous slice
    wt_all = weight.detach().float().t().clone(memory_format=torch.contiguous_format)
    cols, rows = wt_all.shape
    hinv = inverse.upper.to(wt_all.device)
    diag_all = torch.diagonal(hinv)
    wt_all[inverse.dead.to(wt_all.device)] = 0
    old = pruned.to(wt_all.device) if pruned is not None else None
    prunedt_all = torch.zeros_like(wt_all, dtype=torch.bool)
    errt = torch.empty(min(blocksize, cols), rows, dtype=torch.float32, device=wt_all.device)
    loss = torch.zeros((), dtype=torch.float32, device=wt_all.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        diag = diag_all[i1:i2]
        old1 = old[:, i1:i2] if old is not None else None
        wt, prunedt, errt1 = wt_all[i1:i2], prunedt_all[i1:i2], errt[:count]
        with clock("mask"), _one_thread():
            if n == 0:
                scores = wt**2 / diag.reshape(-1, 1) ** 2  # [count, rows]
                if layout_free:  # the same threshold whatever the order: no transposed copy
                    prunedt.copy_(threshold_prune_mask(scores, sparsity, "matrix", old1.t() if old1 is not None else None))
                else:  # ties are broken by position in [rows, count] order
                    prunedt.copy_(choose(scores.t(), sparsity, scope, old1).t())
        with clock("columns"), _one_thread():
            _column_block(wt, prunedt, hinv[i1:i2, i1:i2], diag, n, m, old1, errt1, subblock)
            wt.masked_fill_(prunedt, 0)  # q: the weight kept, or 0; a column is final once the block has passed it
            loss += errt1.pow(2).sum() / 2  # (w − q)² / [U]_ii² summed
        with clock("lazy"):
            if i2 < cols:
                wt_all[i2:].addmm_(hinv[i1:i2, i2:].t(), errt1, alpha=-1)  # lazy batch update of later columns

    if not torch.isfinite(wt_all).all():
        raise NumericalError("SparseGPT produced non-finite weights; raise --damp or use more calibration samples")
    return SparseGPTResult(wt_all.t().contiguous(), prunedt_all.t().contiguous(), float(loss))
