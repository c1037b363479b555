"""OWL: outlier ratios from the dense model's Wanda scores, the reference's allocation
formula (equal blocks), a parameter-weighted mean of exactly S in the band, and the
per-block targets recorded in perp.json and shown by inspect."""

from __future__ import annotations

import json

import pytest
import torch

from perp_cli.pruning.owl import allocate, outlier_ratio

from conftest import random_tokens, run_cli, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_outlier_ratio_counts_scores_above_m_times_the_mean() -> None:
    a, b = torch.tensor([[1.0, 1.0], [1.0, 20.0]]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    # mean of all 8 scores = 27/8; 5 x mean = 16.875: only the 20 is an outlier
    assert outlier_ratio([a, b], 5.0) == pytest.approx(1 / 8)


def test_equal_blocks_follow_the_reference_formula() -> None:
    ratios, s, lam = [0.010, 0.020, 0.015, 0.012, 0.018], 0.6, 0.08  # no block leaves the band
    d = torch.tensor(ratios, dtype=torch.float64)
    keep = (d - d.min()) * (1 / (d.max() - d.min()) * lam * 2)  # luuyin/OWL, keep ratios
    keep = keep - keep.mean() + (1 - s)
    assert allocate(ratios, [100] * 5, s, lam) == pytest.approx((1 - keep).tolist(), abs=1e-12)


def test_unequal_blocks_average_exactly_s_within_the_band() -> None:
    ratios, counts, s, lam = [0.02, 0.001, 0.003, 0.004], [10, 1000, 50, 300], 0.7, 0.1
    out = allocate(ratios, counts, s, lam)
    assert sum(c * x for c, x in zip(counts, out)) / sum(counts) == pytest.approx(s, abs=1e-12)
    assert all(s - lam - 1e-12 <= x <= s + lam + 1e-12 for x in out)
    assert out[0] == min(out)  # the most outliers, the least pruned
    assert allocate([0.1, 0.1], [1, 1], 0.5, 0.08) == [0.5, 0.5]


def test_owl_prunes_blocks_to_their_targets_and_inspect_shows_them(tmp_path, calib_file) -> None:
    dense = save_tiny(tmp_path / "dense", "llama")
    calib = ["--calib", str(calib_file), "--calib-concat", "--nsamples", "4", "--seqlen", "32", "-q"]
    result = run_cli("prune", dense, "-o", tmp_path / "o", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
                     "--owl-lambda", "0.1", "--json", *calib)
    assert result.exit_code == 0, result.stderr
    targets = {int(b): s for b, s in result.json()["allocation"]["block_sparsity"].items()}
    assert len(set(targets.values())) > 1
    report = run_cli("inspect", tmp_path / "o", "--json").json()
    assert {int(b): s for b, s in report["per_block_target_sparsity"].items()} == targets
    for block, achieved in report["per_block_sparsity"].items():
        assert achieved == pytest.approx(targets[int(block)], abs=0.02)  # per-row floor rounding
    manifest = json.loads((tmp_path / "o" / "perp.json").read_text())
    assert manifest["history"][-1]["results"]["allocation"]["block_sparsity"]


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "ria"])
def test_owl_works_with_every_method(method: str) -> None:
    from perp_cli import arch, tiny
    from perp_cli.checkpoint import Checkpoint
    from perp_cli.pruner import PruneConfig, prune

    model = tiny.build_model("llama")
    tokens = random_tokens(2, 16, high=model.config.vocab_size, low=0)
    ckpt = Checkpoint(model=model, tokenizer=None, masks=None, adapters=None, manifest={}, source="tiny")
    masks, results, _ = prune(ckpt, PruneConfig(method, sparsity=0.6, seqlen=16, allocation="owl", owl_lambda=0.1), tokens=tokens)
    targets = {int(b): s for b, s in results["allocation"]["block_sparsity"].items()}
    counts: dict[int, list[int]] = {}
    for m in arch.matrices(model):
        kept, total = counts.setdefault(m.block, [0, 0]), masks[m.name].numel()
        kept[0] += int(masks[m.name].sum())
        kept[1] += total
    weights = {b: c[1] for b, c in counts.items()}
    assert sum(targets[b] * weights[b] for b in targets) / sum(weights.values()) == pytest.approx(0.6, abs=1e-9)
    for b, (kept, total) in counts.items():
        assert 1 - kept / total == pytest.approx(targets[b], abs=0.03)
