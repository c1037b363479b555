"""Adapters: exact no-ops at init, the published formulas in the forward pass, safe merge."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import magnitude_masks, random_tokens
from perp_cli import adapters, arch, mask, tiny
from perp_cli.errors import NumericalError, UsageError

KINDS = ("lora", "masklora", "scalelora", "lora-prune")
IDS = random_tokens(2, 24, high=260)


def pruned(family: str, seed: int = 0):
    model = tiny.build_model(family, seed=seed)
    return model, magnitude_masks(model)


def randomize(ads: dict[str, adapters.Adapter], seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ads.values():
            a.lora_A.copy_(0.1 * torch.randn(a.lora_A.shape, generator=gen))
            a.lora_B.copy_(0.1 * torch.randn(a.lora_B.shape, generator=gen))
            if a.kind == "scalelora":
                a.lora_A.add_(1 / a.rank**0.5)
                a.lora_B.add_(1 / a.rank**0.5)


def expected_weight(kind: str, w, A, B, keep, alpha, rank, training=False):
    """The formulas of the issue, written out independently of perp_cli.adapters."""
    ba = B @ A
    s = alpha / rank
    if kind == "lora" or (kind == "lora-prune" and training):
        return w + s * ba
    if kind == "masklora":
        return w + s * (keep * ba)
    if kind == "lora-prune":
        return w + keep * (s * ba)
    if kind == "scalelora":
        return w * ba
    raise AssertionError(kind)


def reference_model(model, masks, ads, training=False):
    """A copy of `model` with every adapted weight replaced by its formula."""
    ref = copy.deepcopy(model)
    adapters.detach(ref)  # the copy carries copies of the hooks
    by_key = {m.key: m for m in arch.matrices(ref)}
    with torch.no_grad():
        for key, a in ads.items():
            m = by_key[key]
            keep = adapters.matrix_mask(m, masks)
            keep = torch.ones(m.shape, dtype=torch.bool) if keep is None else keep
            m.weight().copy_(expected_weight(a.kind, m.weight().clone(), a.lora_A, a.lora_B, keep, a.alpha, a.rank, training))
    return ref


# every kind on each storage layout (Linear, Conv1D, fused experts [E, out, in] and
# [E, in, out], Llama 4's batched experts); masklora on the other families and layouts
CASES = [(f, k) for f in ("opt", "gpt2", "mixtral", "gpt_oss", "llama4_text") for k in KINDS] + [
    (f, "masklora") for f in ("llama", "mistral", "qwen2", "phi3", "qwen3_moe", "falcon", "gemma2")]


@pytest.mark.parametrize("family,kind", CASES)
def test_fresh_adapters_are_exact_noops_and_trained_ones_compute_the_formula(family, kind):
    model, masks = pruned(family)
    with torch.no_grad():
        before = model(IDS).logits
    torch.manual_seed(0)
    ads = adapters.attach(model, kind, rank=16, alpha=32, masks=masks)
    assert len(ads) == len(arch.matrices(model))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # bitwise: B = 0, or BA = 1 (rank 16)
    randomize(ads)
    ref = reference_model(model, masks, ads)
    with torch.no_grad():
        got, want = model(IDS).logits, ref(IDS).logits
    assert torch.allclose(got, want, atol=5e-5, rtol=1e-4), (got - want).abs().max()
    adapters.detach(model)
    assert adapters.attached(model) == {}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_lora_prune_is_dense_in_training_and_masked_in_eval():
    model, masks = pruned("llama")  # no dropout: train mode is deterministic
    ads = adapters.attach(model, "lora-prune", rank=4, alpha=8, masks=masks)
    randomize(ads)
    model.train()
    dense_ref = reference_model(model, masks, ads, training=True)
    assert torch.allclose(model(IDS).logits, dense_ref(IDS).logits, atol=1e-5)
    model.eval()
    masked_ref = reference_model(model, masks, ads, training=False)
    assert torch.allclose(model(IDS).logits, masked_ref(IDS).logits, atol=1e-5)
    assert not torch.allclose(dense_ref(IDS).logits, masked_ref(IDS).logits, atol=1e-3)


def test_gradients_reach_only_the_adapter_factors():
    model, masks = pruned("opt")
    model.requires_grad_(False)
    ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0 for a in ads.values())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_writes_the_formula_and_unmerge_restores(kind):
    model, masks = pruned("gpt2")  # Conv1D: transposed storage
    ads = adapters.attach(model, kind, rank=4, alpha=8, masks=masks)
    randomize(ads)
    entries = adapters.attached_matrices(model)
    key = next(iter(entries))
    m, a = entries[key]
    original = m.parameter.detach().clone()
    keep = adapters.matrix_mask(m, masks)
    want = expected_weight(kind, m.weight().clone(), a.lora_A.detach(), a.lora_B.detach(), keep, 8, 4)
    a.merge(m, allow_densify=(kind == "lora"))
    assert torch.allclose(m.weight(), want, atol=1e-6)
    if kind != "lora":
        assert mask.nonzeros_outside(m.parameter.detach(), masks[m.name]) == 0
    a.unmerge(m)
    assert torch.allclose(m.parameter, original, atol=1e-5)


def test_plain_lora_merge_refuses_to_fill_pruned_weights():
    model, masks = pruned("opt")
    ads = adapters.attach(model, "lora", rank=4, alpha=8, masks=masks)
    randomize(ads)
    m, a = next(iter(adapters.attached_matrices(model).values()))
    before = m.parameter.detach().clone()
    with pytest.raises(NumericalError, match="where the mask says pruned"):
        a.merge(m)
    assert torch.equal(m.parameter, before) and not a.merged


def test_merge_rejects_non_finite_updates_and_changes_nothing():
    model, masks = pruned("opt")
    adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks)
    m, a = next(iter(adapters.attached_matrices(model).values()))
    with torch.no_grad():
        a.lora_B.fill_(float("inf"))
    before = m.parameter.detach().clone()
    with pytest.raises(NumericalError, match="NaN or inf"):
        a.merge(m)
    assert torch.equal(m.parameter, before)


def test_mixtral_gets_one_adapter_per_expert_and_merge_touches_only_its_slice():
    model, masks = pruned("mixtral")
    ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks, targets=r"gate_up_proj\[2\]")
    assert list(ads) == [f"model.layers.{i}.mlp.experts.gate_up_proj[2]" for i in range(2)]
    randomize(ads)
    m, a = adapters.attached_matrices(model)["model.layers.0.mlp.experts.gate_up_proj[2]"]
    before = m.parameter.detach().clone()
    a.merge(m)
    after = m.parameter.detach()
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])
    assert not torch.equal(after[2], before[2])
    assert mask.nonzeros_outside(after, masks[m.name]) == 0


def test_saved_adapters_reattach_to_identical_logits():
    model, masks = pruned("qwen2")
    ads = adapters.attach(model, "scalelora", rank=4, alpha=8, masks=masks, targets="mlp")
    randomize(ads)
    with torch.no_grad():
        want = model(IDS).logits
    tensors, cfg = adapters.state_dict(ads), adapters.config(ads, "mlp")
    assert cfg["type"] == "scalelora" and cfg["rank"] == 4 and cfg["targets"] == "mlp" and "1/sqrt" in cfg["init"]
    assert set(tensors) == {f"{k}.lora_{x}" for k in ads for x in "AB"}
    adapters.detach(model)
    again = adapters.attach_saved(model, tensors, cfg, masks)
    assert list(again) == list(ads)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)


@pytest.mark.parametrize("family", ["gpt2", "mixtral", "gpt_oss", "llama4_text"])  # Conv1D; fused experts [E, out, in], [E, in, out]
def test_shared_masks_are_read_from_the_checkpoints_bits_and_merge_identically(family):
    """`share_masks`: each adapter reads its mask from the MaskSet (no copy of its own),
    the same bits as an adapter holding it, and merges to the same bytes."""
    merged = []
    for share in (False, True):
        model, masks = pruned(family)
        ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks)
        randomize(ads)
        tensors, cfg = adapters.state_dict(ads), adapters.config(ads, None)
        adapters.detach(model)
        again = adapters.attach_saved(model, tensors, cfg, masks, share_masks=share)
        for m, a in adapters.attached_matrices(model).values():
            assert torch.equal(a.mask, adapters.matrix_mask(m, masks)), m.key
            assert (a._mask is None) == share  # shared: nothing held but the reader
            a.merge(m)
        merged.append({n: p.detach().clone() for n, p in model.named_parameters()})
        assert len(again) == len(arch.matrices(model))
    assert merged[0].keys() == merged[1].keys()
    assert all(torch.equal(merged[0][n], merged[1][n]) for n in merged[0])


@pytest.mark.parametrize("family", ["opt", "gpt2", "mixtral"])
@pytest.mark.parametrize("kind", ["masklora", "scalelora", "lora-prune"])
def test_a_merge_writes_the_weight_the_unmerged_layer_computed_with(family, kind):
    """Bit for bit: merging changes no output of the model (eval mode)."""
    model, masks = pruned(family)
    ads = adapters.attach(model, kind, rank=4, alpha=8, masks=masks)
    randomize(ads)
    for m, a in adapters.attached_matrices(model).values():
        with torch.no_grad():
            effective = a.variant.forward(a, m.weight(), training=False)
        a.merge(m)
        assert torch.equal(m.weight(), effective), m.key


def test_the_finite_check_reads_every_chunk(monkeypatch):
    monkeypatch.setattr(adapters, "_CHUNK", 5)
    t = torch.zeros(7, 3)
    assert adapters._all_finite(t)
    t[-1, -1] = float("nan")
    assert not adapters._all_finite(t) and adapters._all_finite(t[:-1])


# adapters.json as perp has always written it: each variant's entries (rank 4, alpha 8)
SAVED = {
    "lora": (2.0, "A kaiming_uniform(a=sqrt(5)), B zeros", False),
    "masklora": (2.0, "A kaiming_uniform(a=sqrt(5)), B zeros", True),
    "scalelora": (None, "A = B = 1/sqrt(rank) (BA all ones)", False),
    "lora-prune": (2.0, "A kaiming_uniform(a=sqrt(5)), B zeros", True),
}


@pytest.mark.parametrize("kind", [*adapters.KINDS, "multlora"])
def test_each_variant_is_one_registry_entry_and_writes_the_same_config(kind):
    variant = adapters.variant(kind)
    assert variant is adapters.VARIANTS[adapters.canonical_kind(kind)] and variant.name in SAVED
    model, masks = pruned("opt")
    cfg = adapters.config(adapters.attach(model, kind, rank=4, alpha=8, targets="fc1", masks=masks), "fc1")
    scale, init, masked = SAVED[variant.name]
    assert cfg == {"format": 1, "type": variant.name, "rank": 4, "alpha": 8.0, "scale": scale, "targets": "fc1",
                   "init": init, "masked": masked, "matrices": [m.key for m in arch.matrices(model) if "fc1" in m.key]}
    assert (variant.name in adapters.NEEDS_MASK) == masked and variant.densifies == (variant.name == "lora")


def test_usage_errors():
    model = tiny.build_model("opt")
    with pytest.raises(UsageError, match="no masks"):
        adapters.attach(model, "masklora")
    with pytest.raises(UsageError, match="not one of"):
        adapters.canonical_kind("dora")
    assert adapters.canonical_kind("MultLoRA") == "scalelora"
    with pytest.raises(UsageError, match="regular expression"):
        adapters.attach(model, "lora", targets="(")
    with pytest.raises(UsageError, match="matches no"):
        adapters.attach(model, "lora", targets="nothing_like_this")
    adapters.attach(model, "lora", targets="fc1")
    with pytest.raises(UsageError, match="already"):
        adapters.attach(model, "lora")


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_peft_export_loads_in_peft_with_the_same_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    import json

    from safetensors.torch import save_file

    model = tiny.build_model(family)
    ads = adapters.attach(model, "lora", rank=4, alpha=8)
    randomize(ads)
    with torch.no_grad():
        want = model(IDS).logits
    cfg, tensors = adapters.peft_files(ads, model, str(tmp_path / "base"))
    adapters.detach(model)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, want, atol=1e-5)


def test_peft_export_refuses_other_kinds():
    model, masks = pruned("opt")
    ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks)
    with pytest.raises(UsageError, match="--adapter lora"):
        adapters.peft_files(ads, model, "x")


@pytest.mark.parametrize("family,kind", [("opt", "masklora"), ("gpt2", "scalelora"), ("mixtral", "masklora"), ("llama", "lora-prune"), ("gpt_oss", "scalelora"), ("llama4_text", "masklora")])
def test_gradients_match_an_independent_functional_reference(family, kind):
    """Backward through the wrapped forward (weights rebuilt, not saved) gives the true gradients."""
    from torch.func import functional_call

    model, masks = pruned(family)
    ads = adapters.attach(model, kind, rank=4, alpha=8, masks=masks)
    randomize(ads)
    model.train()
    torch.manual_seed(0)  # OPT's dropout: the same masks in both runs
    model(IDS, labels=IDS).loss.backward()
    got = {k: (a.lora_A.grad, a.lora_B.grad) for k, a in ads.items()}

    ref = copy.deepcopy(model)
    adapters.detach(ref)
    leaves = {k: (a.lora_A.detach().clone().requires_grad_(), a.lora_B.detach().clone().requires_grad_()) for k, a in ads.items()}
    slices: dict[str, dict[int, torch.Tensor]] = {}
    params = {}
    for m in arch.matrices(ref):
        A, B = leaves[m.key]
        keep = adapters.matrix_mask(m, masks)
        eff = expected_weight(kind, m.weight(), A, B, keep, 8, 4, training=True)
        if m.expert is None:
            params[m.name] = eff.t() if m.transposed else eff
        else:
            slices.setdefault(m.name, {})[m.expert] = eff.t() if m.transposed else eff
    for name, per_expert in slices.items():
        params[name] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    torch.manual_seed(0)
    functional_call(ref, params, (IDS,), {"labels": IDS}).loss.backward()
    for k, (A, B) in leaves.items():
        assert torch.allclose(got[k][0], A.grad, atol=1e-6, rtol=1e-4), k
        assert torch.allclose(got[k][1], B.grad, atol=1e-6, rtol=1e-4), k


def test_attach_to_one_block_for_reconstruction():
    model, masks = pruned("opt")
    ads = adapters.attach(model, "masklora", rank=4, alpha=8, masks=masks, block=1)
    assert len(ads) == 6 and all(".layers.1." in k for k in ads)
    adapters.detach(model)
    with pytest.raises(UsageError, match="block 2"):
        adapters.attach(model, "masklora", masks=masks, block=2)


def test_lm_head_lora_merges_densely_and_leaves_tied_embeddings_alone():
    model = tiny.build_model("opt")  # tied lm_head
    ids = random_tokens(2, 16)
    embed = model.get_input_embeddings().weight.detach().clone()
    head, handle = adapters.attach_lm_head(model, rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, copy.deepcopy(model)(input_ids=ids).logits)  # B = 0: a no-op
        head.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        trained = model(input_ids=ids).logits
    handle.remove()
    assert adapters.merge_lm_head(model, head) is True  # it was tied: untied first
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.get_input_embeddings().weight, embed)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        head.lora_B.fill_(float("nan"))
    before = model.get_output_embeddings().weight.detach().clone()
    with pytest.raises(NumericalError, match="lm_head"):
        adapters.merge_lm_head(model, head)
    assert torch.equal(model.get_output_embeddings().weight, before)
