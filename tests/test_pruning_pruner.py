"""`pruner.prune`: every method x pattern reaches the requested sparsity exactly in each
comparison group on every family, masks never revive weights, results are reproducible,
and on the real tiny-opt SparseGPT beats magnitude at 70%."""

from __future__ import annotations

import copy

import pytest
import torch

from perp_cli import arch, checkpoint, data, tiny
from perp_cli.checkpoint import Checkpoint
from perp_cli.errors import UsageError
from perp_cli.mask import nm_violations
from perp_cli.pruner import PruneConfig, prune
from perp_cli.pruning.selection import prune_count

from conftest import FAMILIES, random_tokens, shared_path


pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["magnitude", "random", "wanda", "sparsegpt"]


def _ckpt(family: str = "opt", **overrides) -> Checkpoint:
    return Checkpoint(tiny.build_model(family, **overrides), None, None, {}, family)


def _matrix_pruned(masks, m: arch.Matrix) -> torch.Tensor:
    keep = masks[m.name]
    keep = keep[m.expert] if m.expert is not None else keep
    return ~(keep.t() if m.transposed else keep)


def _check_exact(model, masks, config: PruneConfig, sparsity: float, scope: str) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.masks.items():  # masked weights are exact zeros, masks in parameter layout
        assert keep.shape == params[name].shape
        assert int((params[name].detach()[~keep] != 0).sum()) == 0
    ms = arch.matrices(model)
    if scope.count(":"):
        n, m = map(int, scope.split(":"))
        for mat in ms:
            pruned = _matrix_pruned(masks, mat)
            assert ((~pruned).reshape(pruned.shape[0], -1, m).sum(-1) == n).all(), mat.key
        transposed = arch.spec_for(model).transposed
        assert all(nm_violations(k, masks.pattern, transposed and k.dim() == 2) == 0 for k in masks.masks.values())
    elif scope == "global":
        total = sum(m.shape[0] * m.shape[1] for m in ms)
        assert sum(int(_matrix_pruned(masks, m).sum()) for m in ms) == prune_count(total, sparsity)
    elif config.method == "sparsegpt":  # per column block of all rows, as published
        for mat in ms:
            pruned = _matrix_pruned(masks, mat)
            for b in range(0, mat.shape[1], config.blocksize):
                block = pruned[:, b : b + config.blocksize]
                assert int(block.sum()) == prune_count(block.numel(), sparsity), mat.key
    elif scope == "row":
        for mat in ms:
            assert (_matrix_pruned(masks, mat).sum(1) == prune_count(mat.shape[1], sparsity)).all(), mat.key
    else:
        for mat in ms:
            assert int(_matrix_pruned(masks, mat).sum()) == prune_count(mat.shape[0] * mat.shape[1], sparsity), mat.key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_and_pattern_is_exact_on_every_family(family: str, method: str, pattern: str) -> None:
    ckpt = _ckpt(family)
    config = PruneConfig(method, sparsity=None if pattern != "unstructured" else 0.6, pattern=pattern, blocksize=32,
                         sparsegpt_selection="exact")  # SparseGPT's default reference rule: test_sparsegpt_reference_rule...
    masks, results, _ = prune(ckpt, config, tokens=random_tokens(4, 32, 2))
    scope = results["scope"]
    assert scope == (pattern if pattern != "unstructured" else {"wanda": "row"}.get(method, "matrix"))
    _check_exact(ckpt.model, masks, config, 0.6 if pattern == "unstructured" else 0.5, scope)
    assert results["matrices_pruned"] == len(arch.matrices(ckpt.model))
    assert torch.isfinite(torch.cat([p.detach().reshape(-1) for p in ckpt.model.parameters()])).all()


@pytest.mark.parametrize("method,scope", [("magnitude", "row"), ("magnitude", "global"), ("random", "global"),
                                          ("wanda", "matrix"), ("wanda", "global"), ("sparsegpt", "row")])
def test_other_scopes_are_exact(method: str, scope: str) -> None:
    ckpt = _ckpt("mixtral")
    config = PruneConfig(method, sparsity=0.7, scope=scope, blocksize=32, sparsegpt_selection="exact")
    masks, results, _ = prune(ckpt, config, tokens=random_tokens(4, 32, 2))
    if method == "sparsegpt":  # row scope: every row of every column block
        for mat in arch.matrices(ckpt.model):
            pruned = _matrix_pruned(masks, mat).reshape(mat.shape[0], -1, 32)
            assert (pruned.sum(-1) == prune_count(32, 0.7)).all()
    else:
        _check_exact(ckpt.model, masks, config, 0.7, scope)


@pytest.mark.parametrize("family", ["opt", "mixtral"])
def test_sparsegpt_reference_rule_prunes_one_more_per_column_block(family: str) -> None:
    """The default `--sparsegpt-selection reference`: every score <= the (k+1)-th smallest
    of a column block goes, so each block prunes k+1 (continuous scores: no ties)."""
    ckpt = _ckpt(family)
    masks, results, _ = prune(ckpt, PruneConfig("sparsegpt", sparsity=0.6, blocksize=32), tokens=random_tokens(4, 32, 2))
    for mat in arch.matrices(ckpt.model):
        pruned = _matrix_pruned(masks, mat)
        for b in range(0, mat.shape[1], 32):
            block = pruned[:, b : b + 32]
            assert int(block.sum()) == prune_count(block.numel(), 0.6) + 1, mat.key
    assert results["sparsity_achieved"]["pruned_tensors"] > 0.6
    assert checkpoint.mask_problems(ckpt.model, masks) == []


def test_pruning_again_never_revives_weights_and_carries_other_masks() -> None:
    ckpt = _ckpt("llama")
    first, _, _ = prune(ckpt, PruneConfig("magnitude", sparsity=0.5), tokens=None)
    ckpt.masks = first
    for method in ("wanda", "sparsegpt"):
        again = copy.deepcopy(ckpt)
        masks, _, _ = prune(again, PruneConfig(method, sparsity=0.3, targets=r"layers\.0\."), tokens=random_tokens(4, 32, 2))
        assert set(masks.names()) == set(first.names())
        for name, keep in masks.masks.items():
            assert not (keep & ~first[name]).any(), name  # subset of the old mask
            if ".layers.1." in name:
                assert torch.equal(keep, first[name])  # untouched: carried over
        params = dict(again.model.named_parameters())
        assert all(int((params[n].detach()[~k] != 0).sum()) == 0 for n, k in masks.masks.items())


def test_same_seed_gives_identical_weights_and_masks() -> None:
    outs = []
    for seed in (0, 0, 1):
        ckpt = _ckpt("opt")
        masks, _, _ = prune(ckpt, PruneConfig("random", sparsity=0.5, seed=seed))
        outs.append((masks, {n: p.detach().clone() for n, p in ckpt.model.named_parameters()}))
    (m0, w0), (m1, w1), (m2, _) = outs
    assert all(torch.equal(m0[n], m1[n]) for n in m0.names()) and all(torch.equal(w0[n], w1[n]) for n in w0)
    assert not all(torch.equal(m0[n], m2[n]) for n in m0.names())


def test_indivisible_nm_is_an_error_naming_the_matrix_unless_skipped() -> None:
    with pytest.raises(UsageError, match=r"fc2.*120 inputs.*--skip-indivisible"):
        prune(_ckpt("opt", ffn_dim=120), PruneConfig("magnitude", pattern="8:16"))
    ckpt = _ckpt("opt", ffn_dim=120)
    masks, results, _ = prune(ckpt, PruneConfig("magnitude", pattern="8:16", skip_indivisible=True))
    assert results["skipped_indivisible"] == ["model.decoder.layers.0.fc2.weight", "model.decoder.layers.1.fc2.weight"]
    assert not any("fc2" in n for n in masks.names())


@pytest.mark.parametrize("config,message", [
    (PruneConfig("obs"), "--method"),
    (PruneConfig("magnitude", sparsity=1.0), r"\[0, 1\)"),
    (PruneConfig("magnitude", pattern="2:4", sparsity=0.6), "disagree|drop one"),
    (PruneConfig("magnitude", pattern="2:4", scope="row"), "--scope applies"),
    (PruneConfig("sparsegpt", scope="global"), "not available for sparsegpt"),
    (PruneConfig("sparsegpt", pattern="2:4", blocksize=126), "multiple of M"),
    (PruneConfig("magnitude", targets="("), "regular expression"),
    (PruneConfig("magnitude", targets="no_such_matrix"), "matches no prunable matrix"),
    (PruneConfig("magnitude", exclude="."), "no matrix to prune"),
])
def test_contradictory_requests_are_usage_errors(config: PruneConfig, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        prune(_ckpt("opt"), config)


def test_bfloat16_model_keeps_its_dtype_and_exact_zeros() -> None:
    ckpt = Checkpoint(tiny.build_model("llama").to(torch.bfloat16), None, None, {}, "x")
    masks, _, _ = prune(ckpt, PruneConfig("sparsegpt", sparsity=0.5), tokens=random_tokens(4, 32, 2))
    params = dict(ckpt.model.named_parameters())
    assert all(params[n].dtype == torch.bfloat16 and int((params[n][~k] != 0).sum()) == 0 for n, k in masks.masks.items())


def _perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            nlls.append(model(input_ids=x, labels=x).loss.float())
    return float(torch.exp(torch.stack(nlls).mean()))


@pytest.mark.slow
@pytest.mark.shared
def test_real_tiny_opt_sparsegpt_beats_magnitude_at_70_percent() -> None:
    model_dir = shared_path("models", "tiny-opt")
    c4 = shared_path("data", "c4", "c4-train.00000-of-01024.first1000.jsonl")
    wiki = shared_path("data", "wikitext-2-raw", "wiki.test.raw")
    base = checkpoint.open(model_dir, need_tokenizer=True)
    text = data.load_source(str(wiki)).joined()[:200_000]  # the first 20 windows need ~6k tokens
    ids = torch.tensor(base.tokenizer(text)["input_ids"])
    ppl = {}
    for method in ("magnitude", "sparsegpt"):
        ckpt = copy.deepcopy(base)
        config = PruneConfig(method, sparsity=0.7, calib=str(c4), nsamples=32, seqlen=256)
        prune(ckpt, config, tokens=data.calibration(ckpt.tokenizer, ckpt.model, config, config.seed) if method == "sparsegpt" else None)
        ppl[method] = _perplexity(ckpt.model, ids, 256, 20)
    assert ppl["sparsegpt"] < ppl["magnitude"], ppl


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_experts_the_router_never_chose_fall_back_to_magnitude_and_say_so(method: str) -> None:
    ckpt = _ckpt("mixtral")
    one_token = torch.tensor([[7]])  # top-2 of 4 experts: two experts per block see no token
    masks, results, _ = prune(ckpt, PruneConfig(method, sparsity=0.5, sparsegpt_selection="exact"), tokens=one_token)
    notes = results["notes"]["no_calibration_tokens"]
    assert len(notes) == 2 * 2 * 2 and all("magnitude fallback" in n for n in notes)
    _check_exact(ckpt.model, masks, PruneConfig(method, sparsity=0.5), 0.5, "row" if method == "wanda" else "matrix")


def test_unknown_sparsegpt_selection_is_a_usage_error() -> None:
    from perp_cli.pruner import plan

    with pytest.raises(UsageError, match="--sparsegpt-selection 'nope' is not one of reference, exact"):
        plan(PruneConfig("sparsegpt", sparsegpt_selection="nope"))


@pytest.mark.parametrize("method,scope", [("wanda", None), ("magnitude", None), ("wanda", "global")])
def test_an_in_memory_prune_spools_each_block_as_soon_as_it_is_done(tmp_path, monkeypatch, method: str, scope: str | None) -> None:
    """With the output's spool, the run holds one block's masks: every earlier block's are
    in the spool before the next block is pruned (all at the end with --scope global,
    which ranks every block first). The spooled file equals the masks returned without
    a spool, bit for bit, and carries the input masks of the blocks not pruned now."""
    from perp_cli import shards
    from perp_cli.mask import MaskSet
    from perp_cli.pruner import _Pruner
    from perp_cli.streaming import MaskSpool

    base = _ckpt("llama", num_hidden_layers=3)
    first, _, _ = prune(base, PruneConfig("magnitude", sparsity=0.3))
    base.masks = first
    config = dict(sparsity=0.5, scope=scope, targets=r"layers\.[01]\.")
    tokens = random_tokens(4, 32, 2)
    reference = copy.deepcopy(base)
    expected, _, _ = prune(reference, PruneConfig(method, **config), tokens=tokens)

    held_at_each_block = []
    for name in ("step", "step_data_free"):
        original = getattr(_Pruner, name)

        def recording(self, s, original=original):
            held_at_each_block.append((len(self.pruned), len(spool.stored)))
            return original(self, s)

        monkeypatch.setattr(_Pruner, name, recording)
    spool = MaskSpool(tmp_path)
    ckpt = copy.deepcopy(base)
    masks, results, _ = prune(ckpt, PruneConfig(method, **config), tokens=tokens, spool=spool)
    assert masks is None
    matrices_per_block = len([m for m in arch.matrices(ckpt.model) if m.block == 0])
    spooled_before = [0, matrices_per_block, 2 * matrices_per_block] if scope is None else [0, 0, 0]
    assert held_at_each_block == [(0, n) for n in spooled_before]
    sha = spool.finish()
    written = shards.MaskReader.open(tmp_path, {"masks_sha256": sha}).mask_set()
    assert sorted(written.names()) == sorted(expected.names()) and str(written.pattern) == str(expected.pattern)
    assert all(torch.equal(written[n], expected[n]) for n in expected.names())
    assert spool.stats == MaskSet(expected.masks).stats()
    assert results["sparsity_achieved"] == prune(copy.deepcopy(base), PruneConfig(method, **config), tokens=tokens).results["sparsity_achieved"]
    assert all(torch.equal(p, q) for p, q in zip(ckpt.model.state_dict().values(), reference.model.state_dict().values()))
    assert not (tmp_path / MaskSpool.NAME).exists()
