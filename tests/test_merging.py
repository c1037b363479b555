"""Merging: same logits as unmerged, same mask support, plain LoRA refused without the flag."""

from __future__ import annotations

import pytest
import torch

from conftest import magnitude_masks, random_tokens, trained_adapters
from perp_cli import adapters, arch, merging, tiny
from perp_cli.checkpoint import mask_problems
from perp_cli.errors import NumericalError, UsageError
from perp_cli.merging import merge_attached, merge_checkpoint, merge_matrix, probe_batch

IDS = random_tokens(2, 20, 3, high=260)


def trained(family: str, kind: str, masks_too: bool = True):
    """A pruned tiny model with adapters whose factors look trained (random, nonzero)."""
    model = tiny.build_model(family)
    masks = magnitude_masks(model, 0.6)
    return model, masks, trained_adapters(model, kind, masks)


CASES = [(f, k) for f in ("opt", "gpt2", "mixtral") for k in ("masklora", "scalelora", "lora-prune")] + [("llama", "masklora")]


@pytest.mark.parametrize("family,kind", CASES)
def test_merged_logits_equal_unmerged_and_support_is_identical(family, kind):
    model, masks, _ = trained(family, kind)
    model.eval()
    with torch.no_grad():
        unmerged = model(IDS).logits
    support = {n: (p != 0) for n, p in model.named_parameters() if n in masks}
    report = merge_attached(model, masks)
    assert adapters.attached(model) == {}
    assert report.kind == kind and report.tensors == len(arch.matrices(model))
    assert report.relative_diff <= report.tolerance and report.masks_kept
    with torch.no_grad():
        merged = model(IDS).logits
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert mask_problems(model, masks) == []
    for name, p in model.named_parameters():
        if name in masks:
            # no new nonzero; a kept weight may only become zero by exact arithmetic accident
            assert not bool(((p != 0) & ~support[name]).any()), name


def test_plain_lora_is_refused_unless_densifying_is_allowed():
    model, masks, _ = trained("opt", "lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match="--allow-densify"):
        merge_attached(model, masks)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before touching anything
    with torch.no_grad():
        unmerged = model(IDS).logits
    report = merge_attached(model, masks, allow_densify=True)
    assert not report.masks_kept
    assert report.densified_density is not None and report.densified_density > 0.99
    assert torch.allclose(model(IDS).logits, unmerged, atol=1e-5, rtol=1e-4)


def test_lora_on_unpruned_matrices_merges_without_the_flag():
    model = tiny.build_model("opt")
    ads = adapters.attach(model, "lora", rank=4, alpha=8)
    with torch.no_grad():
        for a in ads.values():
            a.lora_B.normal_()
    report = merge_attached(model, None)
    assert report.densified_density is None and not report.masks_kept


def test_a_non_finite_adapter_stops_the_merge():
    model, masks, ads = trained("opt", "masklora")
    with torch.no_grad():
        next(iter(ads.values())).lora_A.fill_(float("nan"))
    with pytest.raises(NumericalError):
        merge_attached(model, masks)


def test_merge_checkpoint_needs_adapters():
    class Bare:
        adapters_config = None
        source = "somewhere"

    with pytest.raises(UsageError, match="nothing to merge"):
        merge_checkpoint(Bare())


def test_probe_batch_is_fixed_and_within_vocab_and_positions():
    model = tiny.build_model("gpt2")
    a, b = probe_batch(model), probe_batch(model)
    assert torch.equal(a, b) and a.max() < 320 and a.shape[1] <= 256


# ----------------------------------------------------------------------------- per-matrix check


class _Unscaled(adapters.MaskLoRA):
    """A buggy variant: its merge forgets the alpha/r scale (what the per-matrix probe must catch)."""

    def combine(self, adapter, ba, weight, keep):
        if keep is not None:
            ba.mul_(keep)
        return ba.add_(weight).to(weight.dtype)


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])  # transposed layout; expert slices
def test_merge_matrix_matches_a_float64_reference_and_is_chunk_independent(family, monkeypatch):
    model, _, _ = trained(family, "masklora")
    matrix, adapter = next(iter(adapters.attached_matrices(model).values()))
    expected = matrix.weight().double() + adapter.scale * (adapter.lora_B.double() @ adapter.lora_A.double()) * adapter.mask
    before = matrix.weight().clone()
    monkeypatch.setattr(merging, "_PROBE_CHUNK", 7)  # several row chunks of one row each
    rel = merge_matrix(matrix, adapter)
    assert rel < 1e-6 and adapter.merged
    assert torch.allclose(matrix.weight().double(), expected, atol=1e-6)
    assert torch.equal(matrix.weight()[~adapter.mask], before[~adapter.mask])  # pruned weights stay exactly zero


def test_merge_matrix_catches_a_wrong_merge():
    model = tiny.build_model("opt")
    masks = magnitude_masks(model, 0.6)
    m = arch.matrices(model)[0]
    bad = adapters.Adapter("masklora", *m.shape, rank=4, alpha=8, mask=adapters.matrix_mask(m, masks))
    bad.variant = _Unscaled()
    with torch.no_grad():
        bad.lora_B.normal_(generator=torch.Generator().manual_seed(2))
    with pytest.raises(NumericalError, match="does not compute what W"):
        merge_matrix(m, bad)


def test_in_memory_report_lists_every_check():
    model, masks, _ = trained("llama", "scalelora")
    report = merge_attached(model, masks)
    assert report.checks == ("finite", "masks", "matrix_probe", "logits_probe")
    assert report.matrix_relative_diff <= report.tolerance
    assert set(report.to_json()["checks"]) <= set(merging.CHECKS)
