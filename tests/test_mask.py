"""Mask packing round-trips for any shape; patterns parse; checks find violations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perp_cli.errors import UsageError
from perp_cli.mask import MaskSet, Pattern, apply, count_bits, invert_packed, nm_violations, nonzeros_outside, pack_bits, packed_stats, unpack_bits, zero_pruned_
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


def test_packed_masks_hold_one_bit_per_weight_and_read_back_exactly() -> None:
    from perp_cli.mask import PackedMasks, count_bits

    g = torch.Generator().manual_seed(0)
    keeps = {"a": torch.rand(37, 19, generator=g) > 0.5, "b": torch.rand(2, 5, 8, generator=g) > 0.3}
    held = PackedMasks(keeps)
    assert list(held) == ["a", "b"] and len(held) == 2 and "a" in held
    for name, keep in keeps.items():
        assert torch.equal(held[name], keep) and held[name].dtype == torch.bool
        assert held.packed(name).numel() == (keep.numel() + 7) // 8  # 1 bit per weight
        assert held.kept(name) == count_bits(held.packed(name)) == int(keep.sum())
    assert held.nbytes() == sum((k.numel() + 7) // 8 for k in keeps.values())
    read = held["a"]
    read[0, 0] = ~read[0, 0]  # a read is a copy: the held mask does not change
    assert torch.equal(held["a"], keeps["a"])
    part = held.select(["b"])
    assert list(part) == ["b"] and part.packed("b") is held.packed("b")  # bits shared, never unpacked


def test_a_packed_masks_slice_along_the_first_dimension_unpacks_exactly() -> None:
    from perp_cli.mask import PackedMasks

    g = torch.Generator().manual_seed(1)
    # 5 x 8 = 40 bits per expert: each slice starts on a byte; 3 x 7 = 21: it does not
    keeps = {"aligned": torch.rand(4, 5, 8, generator=g) > 0.5, "unaligned": torch.rand(4, 3, 7, generator=g) > 0.5}
    held = PackedMasks(keeps)
    for name, keep in keeps.items():
        assert torch.equal(held.part(name), keep)
        for e in range(keep.shape[0]):
            assert torch.equal(held.part(name, e), keep[e]), (name, e)
    held["a"] = torch.zeros(3, 3, dtype=torch.bool)  # setting packs the new mask
    assert held.shape("a") == (3, 3) and held.kept("a") == 0
    placeholder = torch.empty(4, 4, dtype=torch.bool, device="meta")
    held["m"] = placeholder  # streamed placeholders stay as they are
    assert held["m"] is placeholder
    with pytest.raises(ValueError):
        held.set_packed("x", torch.zeros(3, dtype=torch.uint8), (5, 5))  # 25 weights need 4 bytes


def test_mask_set_counts_sparsity_from_the_packed_bits() -> None:
    keep = torch.tensor([[True, False, False, True], [False, False, False, True]])
    masks = MaskSet({"w": keep})
    assert masks.total_sparsity() == 1 - 3 / 8
    assert masks.sparsity() == {"w": 1 - keep.float().mean().item()}


def _pack_reference(mask: torch.Tensor) -> torch.Tensor:
    """The previous packing (widening product and byte sum), for comparison."""
    flat = mask.reshape(-1)
    flat = torch.cat([flat, torch.zeros((-flat.numel()) % 8, dtype=torch.bool)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 64, 1001, 4096])
def test_word_packing_gives_the_bytes_of_the_bytewise_packing(numel: int) -> None:
    # pack_bits gathers 8 bools per int64 multiplication: every byte value, every padding
    # length, and views at odd offsets and strides give the bytes of the plain formula
    mask = torch.rand(numel + 3, generator=torch.Generator().manual_seed(numel)) < 0.5
    if numel >= 2048:
        mask[:2048] = torch.arange(256).reshape(-1, 1).bitwise_and(torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])).ne(0).reshape(-1)
    for view in (mask[:numel], mask[3:], mask[: 2 * (numel // 2)].reshape(-1, 2)[:, 1] if numel else mask[:0]):
        packed = pack_bits(view)
        assert torch.equal(packed, _pack_reference(view.contiguous()))
        assert torch.equal(unpack_bits(packed, view.shape), view)
        assert torch.equal(invert_packed(packed, view.numel()), pack_bits(~view))  # padding bits stay zero
        assert count_bits(packed) == int(view.sum()) == count_bits(packed, chunk=3)  # word popcount, any slicing
        if packed.numel() > 1:  # a view at an odd byte offset is copied into whole words
            assert count_bits(packed[1:]) == sum(bin(int(b)).count("1") for b in packed[1:])


@pytest.mark.parametrize("numel", [1, 3, 1000, 4097, 70001])
def test_kept_fraction_is_the_float_mean_of_the_mask(numel: int) -> None:
    # the manifests' sparsities come from the packed bits now: the same float as before
    from perp_cli.mask import PackedMasks

    for p in (0.0, 0.1, 0.5, 0.77, 1.0):
        keep = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < p
        masks = PackedMasks({"w": keep.reshape(1, -1)})
        assert masks.kept_fraction("w") == keep.float().mean().item()
        assert packed_stats(pack_bits(keep), (1, numel)) == (1.0 - keep.float().mean().item(), int(keep.sum()), numel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_pruned_is_masked_fill_bit_for_bit(dtype):
    """+0.0 at pruned positions whatever the weight (negative, NaN, inf), the rest untouched."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g).to(dtype)
    w[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]).to(dtype)
    pruned = torch.rand(37, 53, generator=g) < 0.5
    pruned[0, :4] = True
    pruned[1, :3] = False
    w[1, :3] = torch.tensor([float("nan"), float("-inf"), -0.0]).to(dtype)
    expected = w.clone().masked_fill_(pruned, 0)
    got = w.clone()
    zero_pruned_(got, pruned)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    assert torch.equal(got.view(bits), expected.view(bits))
    transposed = w.clone().t()  # a non-contiguous view, as GPT-2's Conv1D weights are handled
    zero_pruned_(transposed, pruned.t())
    assert torch.equal(transposed.t().contiguous().view(bits), expected.view(bits))
