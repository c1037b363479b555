"""DSnoT: the swaps equal a plain per-row transcription of the published algorithm
(zyxxmu/DSnoT `prune_DSnoT`, unstructured and N:M branches) written here with Python
loops; counts, N:M groups and frozen weights are kept; the engine path refines blocks."""

from __future__ import annotations

import json

import pytest
import torch

from perp_cli import arch, tiny
from perp_cli.checkpoint import Checkpoint
from perp_cli.mask import Pattern, nm_violations
from perp_cli.pruner import PruneConfig, prune
from perp_cli.pruning.dsnot import MomentStat, refine
from perp_cli.pruning.selection import nm_prune_mask, prune_mask

from conftest import random_tokens, run_cli, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _stat(x: torch.Tensor) -> MomentStat:
    stat = MomentStat(x.shape[-1], torch.device("cpu"))
    stat.add(x)
    return stat


def _reference_swaps(w, pruned, mean, var, scaler, iters, threshold, n=0, m=0):
    """The published loop, one row at a time (zyxxmu/DSnoT): a grow list of every weight
    sorted by W·E[x]/Var[x] (kept ones at 0), a pruning list of the kept weights (negative
    contributions in Wanda order, then positive ones reversed), both walked from either end
    by the sign of the error; sticky stop at the threshold. Stops where the reference
    would break the row's count (see perp_cli/pruning/dsnot.py)."""
    pruned = pruned.clone()
    rows, cols = w.shape
    contrib = (w * mean).double()
    wanda = (w.abs() * scaler.sqrt()).double()
    for i in range(rows):
        start = pruned[i].clone()
        key = [float(contrib[i, j] / var[j]) if start[j] else 0.0 for j in range(cols)]
        grow_list = sorted(range(cols), key=lambda j: (key[j], j))
        lo, hi = 0, cols - 1
        kept = sorted((j for j in range(cols) if not start[j]), key=lambda j: (float(wanda[i, j]), j))
        prune_list = [j for j in kept if contrib[i, j] < 0] + [j for j in kept if contrib[i, j] > 0][::-1]
        p_lo, p_hi = 0, len(prune_list) - 1
        error = float(contrib[i][start].sum())
        sign = (error > 0) - (error < 0)
        for _ in range(iters):
            if abs(error) <= threshold or lo > hi:
                break
            g = grow_list[hi] if error > 0 else grow_list[lo]
            hi, lo = (hi - 1, lo) if error > 0 else (hi, lo + 1)
            if not (start[g] and pruned[i, g]):
                break
            if m == 0:
                if p_lo > p_hi:
                    break
                c = prune_list[p_hi] if error < 0 else prune_list[p_lo]
                p_lo, p_hi = (p_lo, p_hi - 1) if error < 0 else (p_lo + 1, p_hi)
            else:
                group = [j for j in range(g - g % m, g - g % m + m) if not start[j] and not pruned[i, j]]
                if not group:
                    break
                c = min(group, key=lambda j: (float(wanda[i, j]), j))
                after = error + float(contrib[i, c]) - float(contrib[i, g])
                if ((after > 0) - (after < 0)) != sign:
                    break
            pruned[i, c], pruned[i, g] = True, False
            error += float(contrib[i, c]) - float(contrib[i, g])
    return pruned


@pytest.mark.parametrize("nm,one_sided", [((0, 0), False), ((2, 4), False), ((0, 0), True)])
def test_swaps_equal_the_published_algorithm(nm, one_sided) -> None:
    torch.manual_seed(0)
    n, m = nm
    w = torch.randn(24, 64, dtype=torch.float64).float()
    x = (torch.randn(3, 40, 64) * torch.rand(64) * 3 + torch.randn(64)).float()
    if one_sided:  # rows whose kept weights all contribute with one sign (seen on tiny-opt's k_proj)
        w = w.abs() * torch.sign(x.mean(dim=(0, 1))).reshape(1, -1)
    stat = _stat(x)
    scores = w.abs() * stat.norms()
    pruned = nm_prune_mask(scores, n, m) if m else prune_mask(scores, 0.6, "row")
    out = refine(w, pruned, stat, iters=50, threshold=0.1, n=n, m=m)
    expected = _reference_swaps(w, pruned, stat.sum_per_sequence(), stat.variance(), stat.mean_square(), 50, 0.1, n, m)
    assert torch.equal(out.pruned, expected)
    assert out.swaps > 0
    assert torch.equal(out.pruned.sum(dim=1), pruned.sum(dim=1))  # every row keeps its count
    if m:
        assert nm_violations(~out.pruned, Pattern(n, m)) == 0


def test_moments_match_the_reference_definitions() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 10, 6)
    stat = _stat(x)
    assert torch.allclose(stat.sum_per_sequence(), x.sum(dim=1).mean(dim=0))
    assert torch.allclose(stat.mean_square(), x.pow(2).sum(dim=1).mean(dim=0))
    # the reference averages each sequence's (biased) variance, weighted by tokens
    assert torch.allclose(stat.variance(), x.var(dim=1, unbiased=False).mean(dim=0), atol=1e-6)


def test_error_shrinks_and_frozen_weights_are_never_grown() -> None:
    torch.manual_seed(2)
    w = torch.randn(16, 32)
    x = torch.randn(2, 30, 32) + 0.5
    stat = _stat(x)
    pruned = prune_mask(w.abs() * stat.norms(), 0.5, "row")
    frozen = pruned & (torch.rand_like(w) < 0.5)
    out = refine(w, pruned, stat, frozen=frozen)
    mean = stat.sum_per_sequence()
    before = (w * mean * pruned).sum(dim=1).abs()
    after = (w * mean * out.pruned).sum(dim=1).abs()
    assert after.sum() < before.sum()
    assert out.pruned[frozen].all()


def test_refine_in_the_engine_keeps_counts_and_skips_the_mlp() -> None:
    import copy

    model = tiny.build_model("llama")
    tokens = random_tokens(2, 16, high=model.config.vocab_size, low=0)
    base = Checkpoint(model=model, tokenizer=None, masks=None, adapters=None, manifest={}, source="tiny")
    plain_masks, _, _ = prune(copy.deepcopy(base), PruneConfig("wanda", sparsity=0.6, seqlen=16), tokens=tokens)
    refined = copy.deepcopy(base)
    masks, results, _ = prune(refined, PruneConfig("wanda", sparsity=0.6, seqlen=16, refine="dsnot", refine_threshold=0.0), tokens=tokens)
    swaps = results["refine"]["swaps"]
    assert swaps and all("attn" in k for k in swaps) and sum(swaps.values()) > 0  # the reference's default skips the MLP
    for m in arch.matrices(refined.model):
        keep = masks[m.name]
        assert torch.equal(keep.sum(dim=1), plain_masks[m.name].sum(dim=1))  # every row keeps its count
        assert int(((refined.model.get_parameter(m.name) != 0) & ~keep).sum()) == 0  # masked weights exactly 0
        if m.block == 0 and not arch.is_attention(m):
            assert torch.equal(keep, plain_masks[m.name])


def test_keep_refines_a_pruned_checkpoint(tmp_path, calib_file) -> None:
    dense = save_tiny(tmp_path / "dense", "opt")
    calib = ["--calib", str(calib_file), "--calib-concat", "--nsamples", "4", "--seqlen", "32", "-q"]
    assert run_cli("prune", dense, "-o", tmp_path / "w", "--method", "wanda", "--sparsity", "0.6", *calib).exit_code == 0
    result = run_cli("prune", tmp_path / "w", "-o", tmp_path / "r", "--method", "keep", "--refine", "dsnot",
                     "--refine-skip", "none", "--refine-threshold", "0", "--json", *calib)
    assert result.exit_code == 0, result.stderr
    assert sum(result.json()["refine"]["swaps"].values()) > 0
    from safetensors.torch import load_file

    from perp_cli import checkpoint

    before = checkpoint.open(tmp_path / "w").masks
    after = checkpoint.open(tmp_path / "r").masks
    changed = 0
    for name, keep in after.masks.items():
        assert torch.equal(keep.sum(dim=1), before[name].sum(dim=1))  # row counts unchanged
        changed += int((keep != before[name]).sum())
    assert changed > 0
    grown = {n: after[n] & ~before[n] for n in after.names()}
    dense_w, out_w = load_file(str(dense / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    for name, g in grown.items():
        assert torch.equal(out_w[name][g], dense_w[name][g])  # grown weights take their dense values
    manifest = json.loads((tmp_path / "r" / "perp.json").read_text())
    assert [h["command"] for h in manifest["history"]] == ["prune", "prune"]


def test_refining_a_permuted_nm_checkpoint_stays_nm_in_its_order(tmp_path, calib_file) -> None:
    dense = save_tiny(tmp_path / "dense", "opt")
    calib = ["--calib", str(calib_file), "--calib-concat", "--nsamples", "4", "--seqlen", "32", "-q"]
    assert run_cli("prune", dense, "-o", tmp_path / "p", "--method", "ria", "--pattern", "2:4", "--permute", *calib).exit_code == 0
    result = run_cli("prune", tmp_path / "p", "-o", tmp_path / "r", "--method", "keep", "--refine", "dsnot",
                     "--refine-skip", "none", "--refine-threshold", "0", "--json", *calib)
    assert result.exit_code == 0, result.stderr
    assert sum(result.json()["refine"]["swaps"].values()) > 0
    assert run_cli("inspect", tmp_path / "r", "--expect-pattern", "2:4", "-q").exit_code == 0
    # pruning it again without --permute chooses masks in the original order: the orders are dropped
    assert run_cli("prune", tmp_path / "r", "-o", tmp_path / "w", "--method", "wanda", "--pattern", "2:4", *calib).exit_code == 0
    from perp_cli import checkpoint

    assert checkpoint.open(tmp_path / "w").masks.permutations == {}
    assert run_cli("inspect", tmp_path / "w", "--expect-pattern", "2:4", "-q").exit_code == 0
