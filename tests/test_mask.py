"""Mask packing round-trips for any shape; patterns parse; checks find violations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perp_cli.errors import UsageError
from perp_cli.mask import MaskSet, Pattern, apply, nm_violations, nonzeros_outside, pack_bits, unpack_bits
from perp_cli import tiny, arch


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 13), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1), p=st.floats(0, 1))
def test_pack_unpack_round_trip(shape: list[int], seed: int, p: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < p
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    numel = mask.numel()
    assert packed.numel() == (numel + 7) // 8  # 1 bit per weight
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_unpack_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (5, 5))


def test_pattern_parse() -> None:
    assert str(Pattern.parse("2:4")) == "2:4" and Pattern.parse("2:4").sparsity == 0.5
    assert not Pattern.parse("unstructured").structured
    for bad in ("4:4", "5:4", "0:4", "two:four", "2-4"):
        with pytest.raises(UsageError):
            Pattern.parse(bad)


def test_nm_violations_counts_groups_along_inputs() -> None:
    keep = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert nm_violations(keep, Pattern(2, 4)) == 1
    assert nm_violations(keep.t(), Pattern(2, 4), transposed=True) == 1
    assert nm_violations(keep[:, :6], Pattern(2, 4)) == -1  # not divisible


def test_apply_zeroes_exactly_and_counts() -> None:
    model = tiny.build_model("opt")
    m = arch.matrices(model)[0]
    keep = torch.rand(m.parameter.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    masks = MaskSet({m.name: keep})
    assert nonzeros_outside(m.parameter.detach(), keep) > 0
    apply(model, masks)
    assert nonzeros_outside(m.parameter.detach(), keep) == 0
    assert (m.parameter.detach()[~keep] == 0).all()
    assert abs(masks.total_sparsity() - (1 - keep.float().mean().item())) < 1e-9
