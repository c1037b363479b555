"""Structured pruning (perp_cli.shrinking): every structure cuts exactly.

The exactness tests build a model in which the parts to remove provably contribute
nothing (a block whose output projections are zero is the identity; an MLP channel or a
key-value group whose output-projection columns are zero adds nothing), check that the
score picks exactly those parts, and that the smaller model, saved and reloaded by plain
transformers, computes the same logits as the original. Families: LLaMA, Qwen3, Gemma 3
(layer_types, explicit head_dim), OPT, GPT-2 (Conv1D), Phi-3 (fused gate_up_proj),
Mixtral and Qwen3-MoE ([E, out, in] experts), gpt-oss ([E, in, out] experts, biases,
attention sinks).
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_tokens
from perp_cli import arch, tiny
from perp_cli.checkpoint import Checkpoint
from perp_cli.errors import UsageError
from perp_cli.shrinking import ShrinkConfig, check, layout, shrink, source_blocks

IDS = torch.arange(5, 45).reshape(2, 20)


def _ckpt(model: torch.nn.Module) -> Checkpoint:
    return Checkpoint(model=model, tokenizer=None, masks=None, manifest={}, source="tiny")


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits


def _reloaded(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "small")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "opt", "gpt2", "mixtral", "qwen3_moe"])
def test_depth_removes_an_identity_block_exactly(family, tmp_path, one_thread):
    model = tiny.build_model(family, num_hidden_layers=3)
    hidden = arch.hidden_size(model)
    with torch.no_grad():  # block 1 becomes the identity: every matrix writing the residual stream is zero
        for m in arch.block_matrices(model, 1):
            if m.weight().shape[0] == hidden:
                m.weight().zero_()
                bias = getattr(m.owner, f"{m.attr}_bias" if m.expert is not None else "bias", None)
                if bias is not None:
                    bias.data.zero_()
    before = _logits(model)
    types = list(getattr(model.config, "layer_types", None) or [])
    out = shrink(_ckpt(model), ShrinkConfig(structure="depth", remove_count=1, device="cpu"), tokens=random_tokens(4, 16, high=260))
    assert out.results["removed"]["blocks"] == [1]
    assert out.results["scores"][1] < 1e-6 < min(out.results["scores"][0], out.results["scores"][2])
    small = _reloaded(out.model, tmp_path)
    assert small.config.num_hidden_layers == 2 and len(arch.blocks(small)) == 2
    if types:
        assert list(small.config.layer_types) == [types[0], types[2]]
    assert _params(small) == out.results["parameters"]["after"] < out.results["parameters"]["before"]
    assert torch.equal(_logits(small), before)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "opt", "gpt2", "phi3"])
def test_width_removes_dead_channels_exactly(family, tmp_path, one_thread):
    model = tiny.build_model(family)
    size = layout.channels(model, 0).size
    dead = list(range(0, size, 2))
    with torch.no_grad():
        for i in range(len(arch.blocks(model))):
            layout.channels(model, i).consumer.weight()[:, dead] = 0
    before = _logits(model)
    # calibrated on the windows the logits are compared on: a ReLU channel that never fires there adds nothing there
    out = shrink(_ckpt(model), ShrinkConfig(structure="width", remove_ratio=0.5, device="cpu"), tokens=IDS)
    for block, removed in out.results["removed"]["channels"].items():
        margin = out.results["scores"][block]
        # the dead channels, or (ReLU: OPT) channels that never activate, which equally add nothing
        assert margin["removed_max"] == 0 < margin["kept_min"] or family == "opt"
        assert removed == dead or (family == "opt" and margin["removed_max"] == 0)
    key, (old, new) = next(iter(out.results["sizes"].items()))
    assert (old, new) == (size, size // 2)
    small = _reloaded(out.model, tmp_path)
    assert getattr(small.config, key) == size // 2
    assert layout.channels(small, 0).size == size // 2
    assert _params(small) < _params(model)
    torch.testing.assert_close(_logits(small), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "mixtral", "gpt_oss"])
def test_heads_removes_silent_key_value_groups_exactly(family, tmp_path, one_thread):
    model = tiny.build_model(family)
    h = layout.heads(model, 0)
    gone = list(range(h.kv_heads // 2))
    width = h.group * h.head_dim
    with torch.no_grad():
        for i in range(len(arch.blocks(model))):
            for g in gone:
                layout.heads(model, i).o.weight()[:, g * width:(g + 1) * width] = 0
    before = _logits(model)
    out = shrink(_ckpt(model), ShrinkConfig(structure="heads", remove_ratio=0.5, device="cpu"), tokens=random_tokens(4, 16, high=260))
    assert all(v == gone for v in out.results["removed"]["key_value_groups"].values())
    small = _reloaded(out.model, tmp_path)
    assert small.config.num_attention_heads == h.heads - len(gone) * h.group
    assert small.config.num_key_value_heads == h.kv_heads - len(gone)
    assert small.config.head_dim == h.head_dim
    torch.testing.assert_close(_logits(small), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_experts_slices_experts_and_router_exactly(family, tmp_path, one_thread):
    model = tiny.build_model(family)
    count = arch.expert_count(model)
    with torch.no_grad():  # expert 2 never contributes: REAP saliency 0, so it is the one removed
        for i in range(len(arch.blocks(model))):
            ex = layout.experts(model, i)
            for name in ex.tensors:
                if "down_proj" in name:
                    model.get_parameter(name)[2].zero_()
    old = {i: layout.experts(model, i) for i in range(len(arch.blocks(model)))}
    out = shrink(_ckpt(model), ShrinkConfig(structure="experts", remove_count=1, device="cpu"), tokens=random_tokens(4, 16, high=260))
    assert all(v == [2] for v in out.results["removed"]["experts"].values())
    small = _reloaded(out.model, tmp_path)
    assert arch.expert_count(small) == count - 1
    keep = torch.tensor([0, 1, 3])
    gen = torch.Generator().manual_seed(1)
    for i in range(len(arch.blocks(small))):
        new = layout.experts(small, i)
        assert torch.equal(small.get_parameter(new.router), model.get_parameter(old[i].router)[keep])
        x = torch.randn(6, arch.hidden_size(model), generator=gen)
        index = torch.randint(0, count - 1, (6, 2), generator=gen)
        weights = torch.rand(6, 2, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(new.module(x, index, weights), old[i].module(x, keep[index], weights), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=IDS).logits).all()


def test_depth_map_for_reconstruction():
    manifest = {"history": [{"command": "shrink", "results": {"removed": {"kept_blocks": [1, 3, 4]}, "sizes": {"num_hidden_layers": [6, 3]}}}]}
    assert source_blocks(manifest) == [[0, 1, 2], [3], [4, 5]]
    manifest["history"].append({"command": "shrink", "results": {"removed": {"kept_blocks": [0, 2]}, "sizes": {"num_hidden_layers": [3, 2]}}})
    assert source_blocks(manifest) == [[0, 1, 2, 3], [4, 5]]
    assert source_blocks({"history": [{"command": "prune"}]}) is None


@pytest.mark.parametrize(
    ("family", "cfg", "message"),
    [
        ("llama", dict(structure="depth", remove_count=2), "removes all 2"),
        ("llama", dict(structure="heads", remove_count=4), "removes all 4 attention heads"),
        ("llama", dict(structure="heads", remove_count=1), "not a multiple of 2"),
        ("llama", dict(structure="experts", remove_count=1), "dense model"),
        ("opt", dict(structure="heads", remove_ratio=0.5), "cannot be written"),
        ("gpt2", dict(structure="heads", remove_ratio=0.5), "cannot be written"),
        ("mixtral", dict(structure="width", remove_ratio=0.5), "no dense MLP"),
        ("mixtral", dict(structure="experts", remove_count=3), "fewer than the 2"),
        ("llama", dict(structure="width", remove_count=100, multiple_of=64), "leaves no channel"),
    ],
)
def test_impossible_requests_are_usage_errors(family, cfg, message):
    with pytest.raises(UsageError, match=message):
        check(tiny.build_model(family), ShrinkConfig(**cfg))


def test_head_count_the_config_refuses_is_a_usage_error():
    # LlamaConfig requires hidden_size % num_attention_heads == 0, even with an explicit head_dim
    model = tiny.build_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    with pytest.raises(UsageError, match="not a multiple of the number of attention heads"):
        check(model, ShrinkConfig(structure="heads", remove_count=2))
    check(model, ShrinkConfig(structure="heads", remove_count=4))
