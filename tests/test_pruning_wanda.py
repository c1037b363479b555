"""Wanda's masks equal a straightforward computation of |W|·‖X‖₂ on the activations of
the partially pruned model, computed here without the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import random_tokens
from perp_cli import arch, tiny
from perp_cli.checkpoint import Checkpoint
from perp_cli.pruner import PruneConfig, prune
from perp_cli.pruning.wanda import wanda_scores


pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix_inputs(model: nn.Module, index: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of every matrix of block `index` in a plain full-model forward.

    Mixtral experts: the routing is recomputed by hand from the router's weights.
    """
    block = arch.blocks(model)[index]
    caught: dict[str, list[torch.Tensor]] = {}
    handles = []
    for m in arch.block_matrices(model, index):
        if m.expert is None:
            handles.append(m.owner.register_forward_pre_hook(
                lambda mod, a, key=m.key: caught.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    if hasattr(block, "mlp") and hasattr(block.mlp, "experts"):
        handles.append(block.mlp.register_forward_pre_hook(
            lambda mod, a: caught.setdefault("moe", []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    out = {k: torch.cat(v).double() for k, v in caught.items()}
    if "moe" in out:
        x = out.pop("moe").float()
        experts = block.mlp.experts
        chosen = torch.topk(torch.softmax(x @ block.mlp.gate.weight.t(), -1), model.config.num_experts_per_tok, -1).indices
        for e in range(experts.gate_up_proj.shape[0]):
            routed = x[(chosen == e).any(-1)]
            gate, up = (routed @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            out[f"{arch.spec_for(model).blocks}.{index}.mlp.experts.gate_up_proj[{e}]"] = routed.double()
            out[f"{arch.spec_for(model).blocks}.{index}.mlp.experts.down_proj[{e}]"] = (nn.functional.silu(gate) * up).double()
    return out


def _slice(keep: torch.Tensor, m: arch.Matrix) -> torch.Tensor:
    k = keep[m.expert] if m.expert is not None else keep
    return k.t() if m.transposed else k


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "mixtral"])
def test_masks_equal_the_reference_score_on_the_same_activations(family: str) -> None:
    dense = tiny.build_model(family)
    tokens = random_tokens(4, 32, 1)
    pruned = copy.deepcopy(dense)
    masks, _, _ = prune(Checkpoint(pruned, None, None, {}, "x"), PruneConfig("wanda", sparsity=0.5, batch_size=3), tokens=tokens)

    reference = copy.deepcopy(dense)  # blocks < i pruned with the final masks, as the engine sees them
    for i in range(len(arch.blocks(reference))):
        inputs = _matrix_inputs(reference, i, tokens)
        group_input = {}
        for group in arch.input_groups(reference, i):
            for m in group:  # members of a group read the first member's input
                group_input[m.key] = inputs.get(group[0].key, inputs.get(m.key))
        for m in arch.block_matrices(reference, i):
            x = group_input[m.key]
            score = m.weight().double().abs() * x.norm(dim=0).reshape(1, -1)
            k = int(m.shape[1] * 0.5)
            expected = torch.ones(m.shape, dtype=torch.bool)
            expected.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
            assert torch.equal(_slice(masks[m.name], m), expected), m.key
            # the stored score function is the same formula
            torch.testing.assert_close(wanda_scores(m.weight(), x.norm(dim=0).float()).double(), score, rtol=1e-6, atol=0)
        with torch.no_grad():
            for m in arch.block_matrices(reference, i):
                m.weight().mul_(_slice(masks[m.name], m))
    # and the pruned model holds exactly those zeros
    for name, keep in masks.masks.items():
        p = dict(pruned.named_parameters())[name]
        assert int((p[~keep] != 0).sum()) == 0


def test_scores_leave_the_weight_untouched() -> None:
    # the product is taken in place in |W|'s copy, never in the weight (float32 and bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
        before = weight.clone()
        norms = torch.rand(5, generator=torch.Generator().manual_seed(1))
        scores = wanda_scores(weight, norms)
        assert torch.equal(weight, before)
        assert scores.dtype == torch.float32
        assert torch.equal(scores, weight.abs().float() * norms.reshape(1, -1))


def test_in_memory_prune_keeps_one_copy_of_the_activations_and_zeroes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # the in-memory step propagates in place (never a second activation store), and the
    # final mask application skips the matrices `commit` already zeroed: same masks and weights
    from perp_cli import engine, mask

    model = tiny.build_model("opt")
    tokens = torch.randint(4, tiny.VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    expected_model = copy.deepcopy(model)
    expected, _, _ = prune(Checkpoint(expected_model, None, None, {}, "x"), PruneConfig("wanda", sparsity=0.5, batch_size=3), tokens=tokens)

    def no_copy(self: engine.BlockInputs, module: nn.Module) -> engine.BlockInputs:
        raise AssertionError("propagate allocated a second activation store")

    applied: list[str] = []
    real_apply = mask.apply
    monkeypatch.setattr(engine.BlockInputs, "propagate", no_copy)
    monkeypatch.setattr(mask, "apply", lambda model, masks: (applied.extend(masks.names()), real_apply(model, masks)))
    masks, _, _ = prune(Checkpoint(model, None, None, {}, "x"), PruneConfig("wanda", sparsity=0.5, batch_size=3), tokens=tokens)
    assert applied == []
    assert masks.names() == expected.names()
    for name in masks.names():
        assert torch.equal(masks.masks.packed(name), expected.masks.packed(name))
    for (name, p), q in zip(model.named_parameters(), expected_model.parameters()):
        assert torch.equal(p.view(torch.int32), q.view(torch.int32)), name
