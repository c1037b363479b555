"""RIA: scores and masks equal the published formula computed here directly; the channel
permutation equals the reference's heuristic reallocation, leaves the function unchanged
and gives masks that are N:M in the permuted order (recorded and checked on read)."""

from __future__ import annotations


import pytest
import torch

from perp_cli import arch, checkpoint, tiny
from perp_cli.checkpoint import Checkpoint
from perp_cli.mask import Pattern, nm_violations
from perp_cli.pruner import PruneConfig, prune
from perp_cli.pruning.ria import channel_permutation, ria_scores

from conftest import random_tokens, run_cli, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scores_are_the_published_formula() -> None:
    torch.manual_seed(0)
    w, norms = torch.randn(12, 20), torch.rand(20) * 4
    expected = torch.empty(12, 20)
    for i in range(12):
        for j in range(20):
            row, col = sum(abs(float(w[i, k])) for k in range(20)), sum(abs(float(w[k, j])) for k in range(12))
            expected[i, j] = (abs(float(w[i, j])) / row + abs(float(w[i, j])) / col) * float(norms[j]) ** 0.5
    assert torch.allclose(ria_scores(w, norms), expected, rtol=1e-5)


def test_block0_masks_equal_a_direct_computation() -> None:
    model = tiny.build_model("opt")
    tokens = random_tokens(2, 16, high=model.config.vocab_size, low=0)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [m.owner.register_forward_pre_hook(lambda mod, a, k=m.key: inputs.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for m in arch.block_matrices(model, 0)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    dense = {m.key: m.weight().clone() for m in arch.block_matrices(model, 0)}
    ckpt = Checkpoint(model=model, tokenizer=None, masks=None, adapters=None, manifest={}, source="tiny")
    masks, _, _ = prune(ckpt, PruneConfig("ria", sparsity=0.5, seqlen=16), tokens=tokens)
    for key, w in dense.items():
        x = torch.cat(inputs[key]).double()
        score = (w.abs() / w.abs().sum(0) + w.abs() / w.abs().sum(1, keepdim=True)) * x.pow(2).sum(0).sqrt().float() ** 0.5
        k = int(w.numel() * 0.5)  # the whole matrix competes (RIA's default), exactly k pruned
        order = torch.sort(score.reshape(-1), stable=True)[1][:k]
        expected = torch.ones(w.numel(), dtype=torch.bool)
        expected[order] = False
        assert torch.equal(masks[key], expected.reshape(w.shape)), key


def test_permutation_is_the_reference_heuristic() -> None:
    torch.manual_seed(1)
    scores = torch.rand(8, 16)
    order = channel_permutation(scores, 4)
    ranked = torch.argsort(scores.sum(0))
    slices = [ranked[0:4], ranked[4:8].flip(0), ranked[8:12], ranked[12:16].flip(0)]
    expected = torch.tensor([int(slices[k][g]) for g in range(4) for k in range(4)])
    assert torch.equal(order, expected)
    assert sorted(order.tolist()) == list(range(16))


def test_permuted_masks_keep_the_function_and_are_nm_in_their_order(tmp_path, calib_file) -> None:
    dense = save_tiny(tmp_path / "dense", "opt")
    calib = ["--calib", str(calib_file), "--calib-concat", "--nsamples", "4", "--seqlen", "32", "-q"]
    result = run_cli("prune", dense, "-o", tmp_path / "p", "--method", "ria", "--pattern", "2:4", "--permute", "--json", *calib)
    assert result.exit_code == 0, result.stderr
    assert run_cli("inspect", tmp_path / "p", "--expect-pattern", "2:4", "-q").exit_code == 0
    ckpt = checkpoint.open(tmp_path / "p")
    assert set(ckpt.masks.permutations) == set(ckpt.masks.names())
    unpermuted_ok = 0
    for name, keep in ckpt.masks.masks.items():
        order = ckpt.masks.permutations[name]
        assert nm_violations(keep, Pattern(2, 4), permutation=order) == 0
        unpermuted_ok += nm_violations(keep, Pattern(2, 4)) == 0
        # a 2:4 runtime computes W[:, order] @ x[order]: the same outputs as W @ x
        w = ckpt.model.get_parameter(name).detach()
        x = torch.randn(3, w.shape[1])
        assert torch.allclose(x[:, order] @ w[:, order].t(), x @ w.t(), atol=1e-5)
    assert unpermuted_ok < len(ckpt.masks.masks)  # in the original order they are not 2:4
    # a runtime that stores every weight in its permuted order (2:4 there) and gathers its
    # inputs by the same order computes the model's function
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        expected = ckpt.model(input_ids=ids).logits
        modules = dict(ckpt.model.named_modules())
        for name, order in ckpt.masks.permutations.items():
            linear = modules[name.rsplit(".", 1)[0]]
            permuted = linear.weight[:, order].clone()
            assert nm_violations(permuted != 0, Pattern(2, 4)) == 0
            linear.forward = lambda x, w=permuted, b=linear.bias, o=order: torch.nn.functional.linear(x[..., o], w, b)
        assert torch.allclose(ckpt.model(input_ids=ids).logits, expected, atol=1e-5)
