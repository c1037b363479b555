"""Which parameters retrain: subsets from the arch map, --add-biases, tied lm_head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from perp_cli import arch, tiny
from perp_cli.errors import UsageError
from perp_cli.trainable import (
    add_biases,
    count_parameters,
    lm_head_is_tied,
    parse_spec,
    select_trainable,
    set_trainable,
    untie_lm_head,
)


def test_parse_spec():
    assert parse_spec(" biases, norms ,biases") == ["biases", "norms"]
    for bad in ("", ",", "bias", "norms,none"):
        with pytest.raises(UsageError):
            parse_spec(bad)


def test_biases_norms_on_opt_are_exactly_the_projection_biases_and_layernorms():
    model = tiny.build_model("opt")
    chosen = select_trainable(model, "biases,norms")
    # independently: OPT has 6 biased projections and 2 LayerNorms per block, plus the final LayerNorm
    expected = set()
    for i in range(2):
        p = f"model.decoder.layers.{i}."
        expected |= {p + f"{m}.bias" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")}
        expected |= {p + f"{n}.{w}" for n in ("self_attn_layer_norm", "final_layer_norm") for w in ("weight", "bias")}
    expected |= {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"}
    assert set(chosen) == expected
    params = dict(model.named_parameters())
    assert all(chosen[n] is params[n] for n in chosen)
    n = sum(p.numel() for p in chosen.values())
    assert n == 2 * (3 * 64 + 64 + 128 + 64 + 4 * 64) + 2 * 64


def test_all_counts_each_tied_tensor_once():
    model = tiny.build_model("opt")
    assert lm_head_is_tied(model)
    chosen = select_trainable(model, "all")
    assert "lm_head.weight" not in chosen
    assert sum(p.numel() for p in chosen.values()) == count_parameters(model)


def test_tied_lm_head_is_the_embedding_and_untie_separates_them(tmp_path):
    model = tiny.build_model("llama")
    head = select_trainable(model, "lm_head")
    assert list(head) == ["model.embed_tokens.weight"]
    assert untie_lm_head(model)
    assert not lm_head_is_tied(model)
    head = select_trainable(model, "lm_head")
    assert list(head) == ["lm_head.weight"]
    with torch.no_grad():
        head["lm_head.weight"].add_(1.0)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not lm_head_is_tied(again)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_llama_biases_need_add_biases_which_keeps_the_function_and_loads_in_transformers(tmp_path):
    model = tiny.build_model("llama")
    with pytest.raises(UsageError, match="--add-biases"):
        select_trainable(model, "biases")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    added = add_biases(model)
    assert len(added) == 2 * 7
    assert model.config.attention_bias and model.config.mlp_bias
    assert torch.equal(model(ids).logits, before)  # zero biases
    biases = select_trainable(model, "biases")
    assert set(biases) == set(added)
    with torch.no_grad():
        for p in biases.values():
            p.normal_()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, p in biases.items():
        assert torch.equal(again.get_parameter(name), p)
    assert torch.allclose(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family,flag,per_block", [("cohere", "attention_bias", 4), ("qwen3", "attention_bias", 4), ("gemma2", "attention_bias", 4)])
def test_discovered_bias_flags_add_biases_that_load_in_transformers(family, flag, per_block, tmp_path):
    model = tiny.build_model(family)
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    added = add_biases(model)
    assert len(added) == per_block * model.config.num_hidden_layers and getattr(model.config, flag)
    assert torch.equal(model(ids).logits, before)
    biases = select_trainable(model, "biases")
    with torch.no_grad():
        for p in biases.values():
            p.normal_()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(again.get_parameter(n), p) for n, p in biases.items())
    assert torch.allclose(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["mistral", "mixtral", "mpt"])
def test_families_without_bias_flags_refuse_biases_clearly(family):
    model = tiny.build_model(family)
    with pytest.raises(UsageError, match="no config flag"):
        select_trainable(model, "biases")
    with pytest.raises(UsageError, match="no config flag"):
        add_biases(model)
    assert select_trainable(model, "norms")


def test_qwen2_trains_the_biases_it_has():
    chosen = select_trainable(tiny.build_model("qwen2"), "biases")
    assert sorted({n.split(".")[-2] for n in chosen}) == ["k_proj", "q_proj", "v_proj"]


def test_gpt2_conv1d_biases_and_embeddings():
    model = tiny.build_model("gpt2")
    chosen = select_trainable(model, "biases")
    assert len(chosen) == 2 * 4 and all(n.endswith(".bias") for n in chosen)
    emb = select_trainable(model, "embeddings")
    assert set(emb) == {"transformer.wte.weight", "transformer.wpe.weight"}


def test_block_restriction_for_reconstruction():
    model = tiny.build_model("opt")
    chosen = select_trainable(model, "biases,norms", block=1)
    assert chosen and all(n.startswith("model.decoder.layers.1.") for n in chosen)
    everything = select_trainable(model, "all", block=0)
    block0 = {n for n, _ in model.named_parameters() if n.startswith("model.decoder.layers.0.")}
    assert set(everything) == block0
    with pytest.raises(UsageError):
        select_trainable(model, "lm_head", block=0)
    with pytest.raises(UsageError):
        select_trainable(model, "norms", block=2)


def test_set_trainable_freezes_everything_else():
    model = tiny.build_model("opt")
    chosen = select_trainable(model, "norms")
    set_trainable(model, chosen)
    ids = {id(p) for p in chosen.values()}
    for p in model.parameters():
        assert p.requires_grad == (id(p) in ids)
    assert select_trainable(model, "none") == {}
    # share is tiny, as PERP says
    assert sum(p.numel() for p in chosen.values()) / count_parameters(model) < 0.02
    assert arch.norm_parameters(model).keys() == chosen.keys()
