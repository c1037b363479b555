"""Layer-wise reconstruction on tiny real models: errors fall (or the block is restored),
the targets are what the paper says, masks and masked zeros never change, the dense
model is only read, and the same seed gives bit-identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, random_tokens

from perp_cli import arch, engine, tiny
from perp_cli.checkpoint import Checkpoint, mask_problems
from perp_cli.errors import UsageError
from perp_cli.manifest import empty_manifest
from perp_cli.pruner import PruneConfig, prune
from perp_cli.reconstruction import (
    ReconstructConfig,
    batch_order,
    check_compatible,
    reconstruct,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(family: str = "opt", method: str = "wanda", sparsity: float = 0.6, seed: int = 0) -> tuple[Checkpoint, torch.nn.Module]:
    """A tiny model pruned in memory, and its dense original."""
    dense = tiny.build_model(family, seed=seed)
    ckpt = Checkpoint(copy.deepcopy(dense), None, None, empty_manifest("dense"), "pruned")
    masks, _, _ = prune(ckpt, PruneConfig(method, sparsity=sparsity, seqlen=32), tokens=random_tokens(8, 32, seed + 7))
    ckpt.masks = masks
    return ckpt, dense


def _cfg(**kw) -> ReconstructConfig:
    base = {"steps_per_block": 12, "batch_size": 4, "lr": 3e-3}
    base.update(kw)
    return ReconstructConfig(**base)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _block_io(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's input and output inside the model's own forward (hooks)."""
    ins, outs = [], []
    handles = []
    for block in arch.blocks(model):
        handles.append(block.register_forward_pre_hook(lambda m, a, kw: ins.append(a[0] if a else kw["hidden_states"]), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: outs.append(engine._hidden(out))))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    return ins, outs


def test_errors_fall_masks_hold_and_only_block_parameters_change() -> None:
    ckpt, dense = _pruned()
    before, dense_before = _state(ckpt.model), _state(dense)
    masks_before = {n: k.clone() for n, k in ckpt.masks.masks.items()}
    out = reconstruct(ckpt, dense, random_tokens(8, 32), _cfg())

    assert [b.block for b in out.blocks] == [0, 1]
    for b in out.blocks:
        assert b.mse_after <= b.mse_before
        assert b.trainable_parameters > 0 and b.tokens == 12 * 4 * 32
    assert sum(b.mse_after for b in out.blocks) < sum(b.mse_before for b in out.blocks)
    assert all(torch.equal(masks_before[n], k) for n, k in ckpt.masks.masks.items())
    assert mask_problems(ckpt.model, ckpt.masks) == []  # every masked weight exactly 0
    # the dense model is only read
    assert all(torch.equal(dense_before[n], v) for n, v in dense.state_dict().items())
    after = ckpt.model.state_dict()
    block_prefix = arch.spec_for(ckpt.model).blocks + "."
    for name, value in before.items():
        if not name.startswith(block_prefix):  # embeddings, final norm, lm_head untouched
            assert torch.equal(value, after[name]), name
    # masklora merged into the kept weights, biases and norms trained
    fc1 = "model.decoder.layers.0.fc1"
    assert not torch.equal(before[f"{fc1}.weight"], after[f"{fc1}.weight"])
    assert not torch.equal(before[f"{fc1}.bias"], after[f"{fc1}.bias"])
    results = out.results()
    assert results["trainable_parameters"] == sum(b.trainable_parameters for b in out.blocks)
    assert results["blocks"][0]["mse_before"] == out.blocks[0].mse_before


@pytest.mark.parametrize("target", ["dense", "dense-stream"])
def test_errors_are_measured_against_the_published_targets(target: str) -> None:
    """mse_before of block 1, recomputed from hooks on the models' own forwards:
    `dense`: dense block 1 applied to the reconstructed stream's X_1;
    `dense-stream`: the dense model's own block-1 output."""
    ckpt, dense = _pruned()
    original = copy.deepcopy(ckpt.model)
    tokens = random_tokens(8, 32)
    out = reconstruct(ckpt, dense, tokens, _cfg(target=target))

    orig_ins, _ = _block_io(original, tokens)
    rec_ins, _ = _block_io(ckpt.model, tokens)
    _, dense_outs = _block_io(dense, tokens)
    # block 0: both targets are the dense block 0 on the embeddings
    expected0 = (_block_output(original, 0, orig_ins[0]) - dense_outs[0]).double().pow(2).mean().item()
    assert out.blocks[0].mse_before == pytest.approx(expected0, rel=1e-5)
    # block 1: the untrained pruned block on the reconstructed X_1
    x1 = rec_ins[1]
    pruned_y = _block_output(original, 1, x1)
    wanted = _block_output(dense, 1, x1) if target == "dense" else dense_outs[1]
    expected1 = (pruned_y - wanted).double().pow(2).mean().item()
    assert out.blocks[1].mse_before == pytest.approx(expected1, rel=1e-5)


def _block_output(model: torch.nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Block `index` of `model` on `x`, with the call arguments the engine catches."""
    inputs = engine.capture_inputs(model, torch.zeros(1, x.shape[1], dtype=torch.long), batch_size=1)
    with torch.no_grad():
        return inputs.call(arch.blocks(model)[index], x)


def test_same_seed_is_bit_identical_and_the_seed_matters() -> None:
    runs = []
    for seed in (0, 0, 1):
        ckpt, dense = _pruned()
        reconstruct(ckpt, dense, random_tokens(8, 32), _cfg(seed=seed))
        runs.append(_state(ckpt.model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_a_block_made_worse_is_restored_bitwise() -> None:
    ckpt, dense = _pruned()
    before = _state(ckpt.model)
    out = reconstruct(ckpt, dense, random_tokens(8, 32), _cfg(lr=30.0, adapter="scalelora"))
    assert out.restored == [0, 1]
    assert all(b.mse_trained > b.mse_before and b.mse_after == b.mse_before for b in out.blocks)
    assert all(torch.equal(before[n], v) for n, v in ckpt.model.state_dict().items())
    assert out.results()["restored_blocks"] == [0, 1]


@pytest.mark.parametrize("adapter", ["masklora", "scalelora", "lora-prune"])
def test_the_error_after_is_the_error_of_the_merged_block_bitwise(adapter) -> None:
    """The kept block is judged with its adapters attached, then merged: the error it
    reports is exactly the error of what was merged and saved."""
    from perp_cli.reconstruction import block_error

    ckpt, dense = _pruned()
    tokens = random_tokens(8, 32)
    out = reconstruct(ckpt, dense, tokens, _cfg(adapter=adapter))
    first = out.blocks[0]
    assert not first.restored and first.mse_after < first.mse_before
    inputs = engine.capture_inputs(ckpt.model, tokens, batch_size=4)
    targets = engine.capture_inputs(dense, tokens, batch_size=4).run(arch.blocks(dense)[0])
    assert block_error(inputs, arch.blocks(ckpt.model)[0], targets)[0] == first.mse_after


def test_train_all_keeps_every_masked_weight_zero() -> None:
    ckpt, dense = _pruned(sparsity=0.7)
    before = _state(ckpt.model)
    out = reconstruct(ckpt, dense, random_tokens(8, 32), _cfg(train="all", adapter="none", lr=1e-3))
    assert not out.restored
    assert mask_problems(ckpt.model, ckpt.masks) == []
    name = "model.decoder.layers.1.self_attn.q_proj.weight"
    keep = ckpt.masks[name]
    w0, w1 = before[name], ckpt.model.state_dict()[name]
    assert torch.all(w1[~keep] == 0) and not torch.equal(w0[keep], w1[keep])
    # every block weight trains under `all` (count = all block parameters)
    block_params = sum(p.numel() for p in arch.blocks(ckpt.model)[1].parameters())
    assert out.blocks[1].trainable_parameters == block_params


@pytest.mark.parametrize("adapter", ["masklora", "scalelora", "lora-prune"])
def test_adapters_are_merged_under_the_mask(adapter: str) -> None:
    ckpt, dense = _pruned()
    out = reconstruct(ckpt, dense, random_tokens(8, 32), _cfg(train="none", adapter=adapter, adapter_targets=r"fc\d"))
    assert mask_problems(ckpt.model, ckpt.masks) == []
    assert not hasattr(arch.blocks(ckpt.model)[0].fc1, "_perp_adapted") and "forward" not in vars(arch.blocks(ckpt.model)[0].fc1)
    # two fc matrices per block, rank 16: (in + out) * 16 each
    assert out.blocks[0].trainable_parameters == 2 * (64 + 128) * 16
    assert all(b.mse_after <= b.mse_before for b in out.blocks)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "opt"])
def test_every_family_reconstructs_without_touching_its_masks(family: str) -> None:
    ckpt, dense = _pruned(family, method="magnitude", sparsity=0.5)
    train = "biases,norms" if family == "gpt2" else "norms"  # LLaMA-like families have no biases
    out = reconstruct(ckpt, dense, random_tokens(4, 32), _cfg(train=train, steps_per_block=4))
    assert mask_problems(ckpt.model, ckpt.masks) == []
    assert all(b.mse_after <= b.mse_before for b in out.blocks)


def test_add_biases_lets_llama_train_biases() -> None:
    ckpt, dense = _pruned("llama", method="magnitude", sparsity=0.5)
    with pytest.raises(UsageError, match="--add-biases"):
        reconstruct(copy.deepcopy(ckpt), dense, random_tokens(4, 32), _cfg(steps_per_block=2))
    out = reconstruct(ckpt, dense, random_tokens(4, 32), _cfg(add_biases=True, steps_per_block=4))
    assert out.added_biases and ckpt.model.config.attention_bias and ckpt.model.config.mlp_bias
    assert mask_problems(ckpt.model, ckpt.masks) == []


def test_offloaded_activations_give_the_same_result() -> None:
    a, dense = _pruned()
    b, _ = _pruned()
    reconstruct(a, dense, random_tokens(8, 32), _cfg())
    reconstruct(b, dense, random_tokens(8, 32), _cfg(offload=True))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"adapter": "lora"}, "fill the pruned weights"),
        ({"train": "none", "adapter": "none"}, "trains nothing"),
        ({"train": "lm_head"}, "outside the decoder blocks"),
        ({"target": "sideways"}, "--target"),
        ({"steps_per_block": 0}, "--steps-per-block"),
        ({"lr": -1.0}, "--lr"),
        ({"adapter_targets": "("}, "regular expression"),
        ({"granularity": "foo"}, "--granularity 'foo' is not one of block, sublayer"),
    ],
)
def test_bad_options_are_usage_errors(kw: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _cfg(**kw).validate()


def test_refuses_unpruned_input_and_a_mismatched_dense_model() -> None:
    ckpt, dense = _pruned()
    with pytest.raises(UsageError, match="no masks"):
        reconstruct(Checkpoint(dense, None, None, {}, "dense"), dense, random_tokens(8, 32), _cfg())
    with pytest.raises(UsageError, match="does not match"):
        check_compatible(ckpt.model, tiny.build_model("opt", ffn_dim=64))
    with pytest.raises(UsageError, match="llama"):
        check_compatible(ckpt.model, tiny.build_model("llama"))


def test_batch_order_visits_every_batch_each_epoch() -> None:
    order = batch_order(3, 7, torch.Generator().manual_seed(0))
    assert len(order) == 7 and sorted(order[:3]) == [0, 1, 2] and sorted(order[3:6]) == [0, 1, 2]


def test_fixed_order_cycles_in_order() -> None:
    assert batch_order(3, 7, torch.Generator().manual_seed(0), "fixed") == [0, 1, 2, 0, 1, 2, 0]


def test_without_restore_a_worse_block_is_kept() -> None:
    ckpt, dense = _pruned()
    out = reconstruct(ckpt, dense, random_tokens(8, 32), _cfg(lr=30.0, adapter="scalelora", restore=False))
    assert out.restored == []
    assert all(b.mse_after == b.mse_trained > b.mse_before for b in out.blocks)
    assert mask_problems(ckpt.model, ckpt.masks) == []


def test_paper_recipe_trains_the_block_in_train_mode() -> None:
    """`mode=train` is PERP's `layer.train()`: dropout is active while the block trains,
    so with dropout the run differs from eval mode; the block is back in eval mode after."""
    runs = {}
    for mode in ("eval", "train"):
        dense = tiny.build_model("opt", seed=0, dropout=0.3)
        ckpt = Checkpoint(copy.deepcopy(dense), None, None, empty_manifest("dense"), "pruned")
        ckpt.masks, _, _ = prune(ckpt, PruneConfig("wanda", sparsity=0.6, seqlen=32), tokens=random_tokens(8, 32, 7))
        reconstruct(ckpt, dense, random_tokens(8, 32), _cfg(mode=mode, order="fixed", restore=False))
        runs[mode] = _state(ckpt.model)
        assert not any(m.training for m in ckpt.model.modules())
    assert any(not torch.equal(runs["eval"][n], runs["train"][n]) for n in runs["eval"])


def test_interleaved_prunes_each_block_from_the_reconstructed_stream() -> None:
    """PERP's order in one pass: block 0 is pruned from the same inputs as in a split run
    (same mask), block 1 from the outputs of the RECONSTRUCTED block 0: its mask is what
    Wanda gives on a model whose block 0 is already the reconstructed one."""
    dense = tiny.build_model("opt", seed=0)
    tokens = random_tokens(8, 32)
    ckpt = Checkpoint(copy.deepcopy(dense), None, None, empty_manifest("dense"), "dense")
    out = reconstruct(ckpt, None, tokens, _cfg(), prune=PruneConfig("wanda", sparsity=0.5))
    masks = out.masks
    assert masks is not None and len(masks) == 12 and out.pruning["sparsity_achieved"]["pruned_tensors"] == 0.5
    assert mask_problems(ckpt.model, masks) == []  # exact zeros after training and merging
    assert all(b.mse_after <= b.mse_before for b in out.blocks)

    split = Checkpoint(copy.deepcopy(dense), None, None, empty_manifest("dense"), "dense")
    split_masks, _, _ = prune(split, PruneConfig("wanda", sparsity=0.5), tokens=tokens)
    block0 = [n for n in masks.names() if ".layers.0." in n]
    assert all(torch.equal(masks[n], split_masks[n]) for n in block0)
    assert any(not torch.equal(masks[n], split_masks[n]) for n in masks.names() if ".layers.1." in n)

    hybrid = copy.deepcopy(dense)
    arch.blocks(hybrid)[0].load_state_dict(arch.blocks(ckpt.model)[0].state_dict())
    hybrid_ckpt = Checkpoint(hybrid, None, None, empty_manifest("dense"), "hybrid")
    hybrid_masks, _, _ = prune(hybrid_ckpt, PruneConfig("wanda", sparsity=0.5, targets=r"layers\.1\."), tokens=tokens)
    assert all(torch.equal(masks[n], hybrid_masks[n]) for n in hybrid_masks.names())


def test_interleaved_refusals() -> None:
    dense = tiny.build_model("opt", seed=0)
    ckpt = Checkpoint(dense, None, None, empty_manifest("dense"), "dense")
    with pytest.raises(UsageError, match="global"):
        reconstruct(ckpt, None, random_tokens(8, 32), _cfg(), prune=PruneConfig("wanda", scope="global"))
    with pytest.raises(UsageError, match="--target dense"):
        reconstruct(ckpt, None, random_tokens(8, 32), _cfg(target="dense-stream"), prune=PruneConfig("wanda"))
    with pytest.raises(UsageError, match="--granularity block only"):
        reconstruct(ckpt, None, random_tokens(8, 32), _cfg(granularity="sublayer"), prune=PruneConfig("wanda"))


def _mid_stream(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """OPT: the residual stream between each block's halves (what enters its MLP's norm)."""
    seen = []
    handles = [b.final_layer_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in arch.blocks(model)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def _opt_mlp_half(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return h + block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(h))))


def test_sublayer_fits_each_half_against_the_dense_half() -> None:
    """Each half's error falls; the targets are the dense model's same half on the
    reconstructed stream (recomputed here from the models' own forwards and OPT's MLP
    formula); masks and masked zeros never change; the halves split the block's
    trainable parameters."""
    ckpt, dense = _pruned()
    original = copy.deepcopy(ckpt.model)
    masks_before = {n: k.clone() for n, k in ckpt.masks.masks.items()}
    tokens = random_tokens(8, 32)
    out = reconstruct(ckpt, dense, tokens, _cfg(granularity="sublayer"))

    assert [(b.block, b.part) for b in out.blocks] == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    for b in out.blocks:
        assert b.mse_after < b.mse_before and not b.restored and b.tokens == 12 * 4 * 32
    assert all(torch.equal(masks_before[n], k) for n, k in ckpt.masks.masks.items())
    assert mask_problems(ckpt.model, ckpt.masks) == []
    assert out.results()["granularity"] == "sublayer"

    # block 0 attention: the untrained pruned half against the dense half, both on the embeddings
    orig_mid, dense_mid, rec_mid = (_mid_stream(m, tokens) for m in (original, dense, ckpt.model))
    expected = (orig_mid[0] - dense_mid[0]).double().pow(2).mean().item()
    assert out.blocks[0].mse_before == pytest.approx(expected, rel=1e-5)
    # block 0 MLP: its inputs are the reconstructed attention half's outputs, its target the dense MLP half on them
    h = rec_mid[0]
    expected = (_opt_mlp_half(arch.blocks(original)[0], h) - _opt_mlp_half(arch.blocks(dense)[0], h)).double().pow(2).mean().item()
    assert out.blocks[1].mse_before == pytest.approx(expected, rel=1e-5)

    # the same parameters train as with --granularity block, each in exactly one half
    whole = reconstruct(_pruned()[0], dense, tokens, _cfg())
    for i in (0, 1):
        halves = [b.trainable_parameters for b in out.blocks if b.block == i]
        assert sum(halves) == whole.blocks[i].trainable_parameters and min(halves) > 0
