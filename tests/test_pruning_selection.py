"""Masks from scores: exact counts per comparison group, stable ties, no revival."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perp_cli.pruning import selection
from perp_cli.pruning.selection import global_prune_masks, kth_smallest, nm_prune_mask, prune_count, prune_mask


def test_prune_count_is_floor_robust_to_float_representation() -> None:
    assert prune_count(100, 0.7) == 70
    assert prune_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996
    assert prune_count(7, 0.5) == 3
    assert prune_count(10, 0.0) == 0
    assert prune_count(10, 0.999) == 9


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 17), sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_row_and_matrix_scopes_prune_exact_counts_of_the_lowest(rows: int, cols: int, sparsity: float, seed: int) -> None:
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    row = prune_mask(scores, sparsity, "row")
    assert (row.sum(dim=1) == prune_count(cols, sparsity)).all()
    for r in range(rows):  # every pruned score is <= every kept score of the same row
        if row[r].any() and (~row[r]).any():
            assert scores[r][row[r]].max() <= scores[r][~row[r]].min()
    mat = prune_mask(scores, sparsity, "matrix")
    assert int(mat.sum()) == prune_count(rows * cols, sparsity)
    if mat.any() and (~mat).any():
        assert scores[mat].max() <= scores[~mat].min()


def test_ties_are_broken_by_position() -> None:
    scores = torch.zeros(2, 4)
    assert prune_mask(scores, 0.5, "row").tolist() == [[True, True, False, False]] * 2
    assert prune_mask(scores, 0.5, "matrix").tolist() == [[True, True, True, True], [False] * 4]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), extra=st.integers(1, 4), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_nm_keeps_exactly_n_best_per_group(n: int, extra: int, groups: int, seed: int) -> None:
    m = n + extra
    scores = torch.rand(3, groups * m, generator=torch.Generator().manual_seed(seed))
    pruned = nm_prune_mask(scores, n, m).reshape(3, groups, m)
    assert ((~pruned).sum(dim=-1) == n).all()
    s = scores.reshape(3, groups, m)
    kept_min = s.masked_fill(pruned, float("inf")).min(dim=-1).values
    pruned_max = s.masked_fill(~pruned, float("-inf")).max(dim=-1).values
    assert (pruned_max <= kept_min).all()


def test_global_ranks_all_matrices_together() -> None:
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[0.5, 10.0, 0.1]])}
    out = global_prune_masks(scores, 0.5)  # floor(7 * 0.5) = 3 lowest: 0.1, 0.5, 1.0
    assert out["a"].tolist() == [[True, False], [False, False]]
    assert out["b"].tolist() == [[True, False, True]]


def test_already_pruned_weights_stay_pruned_and_are_counted_first() -> None:
    scores = torch.tensor([[5.0, 1.0, 2.0, 3.0]])
    old = torch.tensor([[True, False, False, False]])  # the highest score was pruned before
    assert prune_mask(scores, 0.5, "row", old).tolist() == [[True, True, False, False]]
    # more already pruned than the new count: all stay pruned (never revived)
    old3 = torch.tensor([[True, False, True, True]])
    assert prune_mask(scores, 0.25, "matrix", old3).tolist() == [[True, False, True, True]]
    assert nm_prune_mask(scores, 2, 4, old).tolist() == [[True, True, False, False]]
    assert global_prune_masks({"x": scores}, 0.25, {"x": old3})["x"].tolist() == [[True, False, True, True]]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), levels=st.sampled_from([2, 5, 1000, 0]),
       sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_row_masks_equal_the_first_k_of_a_stable_sort(rows: int, cols: int, levels: int, sparsity: float, seed: int) -> None:
    # few distinct values (many ties, the cumsum path) and continuous ones (the fast path)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=g).float() if levels else torch.rand(rows, cols, generator=g)
    k = prune_count(cols, sparsity)
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    expected.scatter_(1, order, True)
    assert torch.equal(prune_mask(scores, sparsity, "row"), expected)


@pytest.mark.parametrize("shape", [(6, 13), (1, 40), (3, 1), (2, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_kth_smallest_is_kthvalue(shape: tuple[int, int], ties: bool) -> None:
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    if ties:
        scores = (scores * 3).round()
    scores[0, 0] = float("-inf")  # already-pruned weights are forced to -inf
    for k in range(1, shape[1] + 1):
        assert torch.equal(kth_smallest(scores, k), torch.kthvalue(scores, k, dim=-1, keepdim=True).values), k


def test_rows_with_and_without_surplus_ties_in_one_matrix() -> None:
    # the tie-breaking count runs on the tied rows only; the other rows keep their fast-path mask
    scores = torch.tensor([[0.3, 0.1, 0.4, 0.2], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.1, 0.9]])
    expected = torch.tensor([[False, True, False, True], [True, True, False, False], [True, False, True, False]])
    assert torch.equal(prune_mask(scores, 0.5, "row"), expected)


def test_nm_groups_with_surplus_ties_take_the_lowest_positions_first() -> None:
    # [rows, groups, m] scores with ties in some groups only (the path that counts ties per group)
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0, 3.0, 4.0], [3.0, 3.0, 0.1, 3.0, 9.0, 8.0, 7.0, 6.0]])
    pruned = nm_prune_mask(scores, 2, 4)
    order = torch.sort(scores.reshape(2, 2, 4), dim=-1, stable=True).indices[..., :2]
    expected = torch.zeros(2, 2, 4, dtype=torch.bool).scatter_(-1, order, True).reshape(2, 8)
    assert torch.equal(pruned, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kth_smallest_in_row_slices_is_kthvalue(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    # rows are selected a slice at a time (bounded temporaries), on the CPU by NumPy's
    # partition (the slices spread over torch's threads) and elsewhere by topk (its path is
    # run here on a float16 copy): the values of kthvalue
    monkeypatch.setattr(selection, "_TOPK_CHUNK_BYTES", 12 * 40)  # a few rows per slice
    monkeypatch.setattr(selection, "_THREADED_SELECTION_MIN", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _kth_smallest_matches_kthvalue()
    finally:
        torch.set_num_threads(before)


def _kth_smallest_matches_kthvalue() -> None:

    def same(got: torch.Tensor, expected: torch.Tensor) -> None:  # exact values, NaN where kthvalue gives NaN
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    scores = torch.rand(37, 64, generator=torch.Generator().manual_seed(3))
    scores[0, :3] = torch.tensor([float("-inf"), float("nan"), 0.0])
    scores[1] = 0.5  # one value only
    for dtype in (torch.float32, torch.float64, torch.float16):
        s = scores.to(dtype)
        if dtype == torch.float16:  # the topk path takes a NaN's max (NaN) past the middle; NumPy's counts it largest, as kthvalue
            s[0, 1] = 0.25
        for k in (1, 5, 32, 33, 63, 64):
            same(kth_smallest(s, k), torch.kthvalue(s, k, dim=-1, keepdim=True).values)
        nm = s.reshape(37, 16, 4)
        same(kth_smallest(nm, 2), torch.kthvalue(nm, 2, dim=-1, keepdim=True).values)
        one = s[2:3]
        assert torch.equal(kth_smallest(one, 20), torch.kthvalue(one, 20, dim=-1, keepdim=True).values)
