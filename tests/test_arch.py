"""The architecture map finds exactly the expected matrices for every family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perp_cli import arch, tiny
from perp_cli.errors import ArchitectureError, UsageError

EXPECTED_LOCALS = {
    "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
EXPECTED_LOCALS["mistral"] = EXPECTED_LOCALS["qwen2"] = EXPECTED_LOCALS["llama"]


@pytest.mark.parametrize("family", ["opt", "llama", "mistral", "qwen2", "gpt2"])
def test_dense_families_expose_exactly_their_projections(family: str) -> None:
    model = tiny.build_model(family)
    found = arch.matrices(model)
    n_blocks = model.config.num_hidden_layers
    expected = [
        f"{arch.spec_for(model).blocks}.{i}.{local}.weight" for i in range(n_blocks) for local in EXPECTED_LOCALS[family]
    ]
    assert [m.name for m in found] == expected
    # Every prunable matrix is a 2-D parameter of the model, and nothing else 2-D in a block is missed
    params = dict(model.named_parameters())
    prefix = arch.spec_for(model).blocks + "."
    block_2d = {n for n, p in params.items() if p.dim() == 2 and n.startswith(prefix)}
    assert {m.name for m in found} == block_2d


def test_mixtral_experts_are_per_expert_slices_of_fused_parameters() -> None:
    model = tiny.build_model("mixtral")
    found = arch.matrices(model)
    experts = [m for m in found if m.expert is not None]
    n_exp = model.config.num_local_experts
    assert len(experts) == 2 * n_exp * model.config.num_hidden_layers
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    m3 = next(m for m in experts if m.key == "model.layers.0.mlp.experts.gate_up_proj[3]")
    assert m3.name == "model.layers.0.mlp.experts.gate_up_proj"
    assert m3.weight().data_ptr() == gate_up[3].data_ptr()
    assert m3.shape == (2 * model.config.intermediate_size, model.config.hidden_size)
    down = next(m for m in experts if m.key == "model.layers.1.mlp.experts.down_proj[0]")
    assert down.shape == (model.config.hidden_size, model.config.intermediate_size)
    # the router is not prunable
    assert not any("mlp.gate." in m.name or m.name.endswith("mlp.gate.weight") for m in found)


def test_gpt2_conv1d_weight_view_is_out_by_in_and_writes_through() -> None:
    model = tiny.build_model("gpt2")
    m = arch.matrices(model)[0]  # attn.c_attn: Conv1D(nx=64 -> nf=192), stored [64, 192]
    assert m.transposed and m.parameter.shape == (64, 192)
    assert m.shape == (192, 64)
    x = torch.randn(3, 64)
    # [out, in] view: output row r is (x @ W.T)[:, r], the same meaning as nn.Linear
    expected = m.owner(x) - m.owner.bias
    torch.testing.assert_close(x @ m.weight().t(), expected)
    m.weight()[5, 7] = 0.0
    assert m.parameter[7, 5] == 0.0


def test_input_groups_share_inputs() -> None:
    groups = arch.input_groups(tiny.build_model("llama"), 0)
    assert [[m.local for m in g] for g in groups] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]
    mix = arch.input_groups(tiny.build_model("mixtral"), 1)
    assert sum(1 for g in mix if g[0].expert is not None) == 2 * 4


def test_norms_and_biases() -> None:
    opt = tiny.build_model("opt")
    norms = arch.norm_parameters(opt)
    assert "model.decoder.final_layer_norm.bias" in norms and "model.decoder.layers.1.self_attn_layer_norm.weight" in norms
    assert len(norms) == 2 * (2 * 2 + 1)
    assert len(arch.bias_parameters(opt)) == 6 * 2
    assert arch.bias_parameters(tiny.build_model("llama")) == {}
    qwen = arch.bias_parameters(tiny.build_model("qwen2"))
    assert sorted(n.split(".")[-2] for n in qwen if ".0." in n) == ["k_proj", "q_proj", "v_proj"]


def test_targets_and_exclude() -> None:
    model = tiny.build_model("opt")
    assert all("fc" in m.name for m in arch.matrices(model, targets=r"\.fc\d"))
    assert not any("q_proj" in m.name for m in arch.matrices(model, exclude="q_proj"))
    with pytest.raises(UsageError, match="matches no prunable matrix"):
        arch.matrices(model, targets="nothing_like_this")


def test_unknown_architecture_is_refused_by_class_name() -> None:
    class Strange(nn.Module):
        config = type("C", (), {"model_type": "strange"})()

    with pytest.raises(ArchitectureError, match="Strange.*strange"):
        arch.matrices(Strange())


# ----------------------------------------------------------------------------- discovery

# The closed table perp shipped before discovery (perp_cli/arch.py up to issue 12), kept
# here as the reference: discovery must reproduce it exactly for these six families.
_LLAMA_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
_LLAMA = dict(blocks="model.layers", matrices=_LLAMA_ATTN + _LLAMA_MLP, norms=["input_layernorm", "post_attention_layernorm"],
              final_norm="model.norm", embeddings=["model.embed_tokens"], groups=_LLAMA_GROUPS, transposed=[], fused=[], bias_flags={})
OLD_TABLE = {
    "opt": dict(
        blocks="model.decoder.layers",
        matrices=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
        norms=["self_attn_layer_norm", "final_layer_norm"], final_norm="model.decoder.final_layer_norm",
        embeddings=["model.decoder.embed_tokens", "model.decoder.embed_positions"],
        groups=[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
        transposed=[], fused=[], bias_flags={},
    ),
    "llama": {**_LLAMA, "bias_flags": {"attention_bias": _LLAMA_ATTN, "mlp_bias": _LLAMA_MLP}},
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "mixtral": {
        **_LLAMA, "matrices": _LLAMA_ATTN + ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "groups": _LLAMA_GROUPS[:2] + [["mlp.experts.gate_up_proj"]] * 4 + [["mlp.experts.down_proj"]] * 4,
        "fused": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
    },
    "gpt2": dict(
        blocks="transformer.h", matrices=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], norms=["ln_1", "ln_2"],
        final_norm="transformer.ln_f", embeddings=["transformer.wte", "transformer.wpe"],
        groups=[["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
        transposed=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], fused=[], bias_flags={},
    ),
}


@pytest.mark.parametrize("family", sorted(OLD_TABLE))
def test_discovery_reproduces_the_old_table(family: str) -> None:
    model = tiny.build_model(family)
    spec, old = arch.spec_for(model), OLD_TABLE[family]
    assert spec.blocks == old["blocks"]
    assert list(spec.matrices) == old["matrices"]
    assert list(spec.norms) == old["norms"] and spec.final_norm == old["final_norm"]
    assert list(spec.embeddings) == old["embeddings"]
    assert sorted(spec.transposed) == old["transposed"] and sorted(spec.fused_experts) == old["fused"]
    assert {k: list(v) for k, v in arch.bias_flags(model).items()} == old["bias_flags"]
    assert arch.groups_probed(model)
    for i in range(len(arch.blocks(model))):
        assert [[m.local for m in g] for g in arch.input_groups(model, i)] == old["groups"]


def test_opt_order_override_is_the_only_difference_from_registration_order(monkeypatch) -> None:
    model = tiny.build_model("opt")
    assert list(arch.spec_for(model).matrices[:3]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    monkeypatch.setattr(arch, "OVERRIDES", {})
    plain = arch.discover(tiny.build_model("opt"))
    assert list(plain.matrices[:3]) == ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"]
    assert sorted(plain.matrices) == sorted(arch.spec_for(model).matrices)


def test_fused_qkv_and_parallel_blocks_group_by_shared_input() -> None:
    phi3 = tiny.build_model("phi3")
    assert [[m.local for m in g] for g in arch.input_groups(phi3, 0)] == [
        ["self_attn.o_proj"], ["self_attn.qkv_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]
    gptj = tiny.build_model("gptj")  # attention and MLP both read ln_1's output
    assert [[m.local for m in g] for g in arch.input_groups(gptj, 1)][0] == ["attn.k_proj", "attn.v_proj", "attn.q_proj", "mlp.fc_in"]
    neox = tiny.build_model("gpt_neox")  # parallel residual, but two norms: two inputs
    assert ["attention.query_key_value"] in [[m.local for m in g] for g in arch.input_groups(neox, 0)]


@pytest.mark.parametrize("model_type,transposed", [("qwen3_moe", False), ("gpt_oss", True), ("llama4_text", True)])
def test_fused_experts_orientation_comes_from_the_sizes(model_type: str, transposed: bool) -> None:
    model = tiny.build_model(model_type)
    hidden = model.config.hidden_size
    experts = [m for m in arch.matrices(model) if m.expert is not None]
    assert experts and all(m.transposed == transposed for m in experts)
    first = [m for m in experts if m.attr == "gate_up_proj"]
    last = [m for m in experts if m.attr == "down_proj"]
    assert all(m.shape[1] == hidden for m in first) and all(m.shape[0] == hidden for m in last)
    # the [out, in] view computes what the expert computes
    m = first[1]
    x = torch.randn(3, hidden)
    stored = m.parameter.data[m.expert]
    expected = x @ stored if transposed else x @ stored.t()
    torch.testing.assert_close(x @ m.weight().t(), expected)
    names = {m.name for m in arch.matrices(model)}
    assert not any(".router." in n or n.endswith("mlp.gate.weight") for n in names)


def test_routers_gates_and_expert_biases() -> None:
    moe = tiny.build_model("qwen2_moe")
    spec = arch.spec_for(moe)
    excluded = dict(spec.excluded)
    assert excluded["mlp.gate.weight"].startswith("router") and excluded["mlp.shared_expert_gate.weight"].startswith("gate")
    assert "mlp.shared_expert.up_proj" in spec.matrices  # a shared expert is an ordinary MLP
    oss = tiny.build_model("gpt_oss")
    biases = arch.bias_parameters(oss)
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in biases and "model.layers.1.mlp.experts.down_proj_bias" in biases


def test_every_norm_in_a_block_is_found() -> None:
    assert arch.spec_for(tiny.build_model("gemma2")).norms == (
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert arch.spec_for(tiny.build_model("qwen3")).norms[:2] == ("self_attn.q_norm", "self_attn.k_norm")


def test_a_meta_skeleton_gets_one_group_per_matrix() -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny.build_config("llama"))
    assert not arch.groups_probed(model)
    assert all(len(g) == 1 for g in arch.input_groups(model, 0))


def test_no_blocks_or_no_matrices_fail_with_one_line() -> None:
    class NoMatrix(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(type("Block", (nn.Module,), {})() for _ in range(2))

    with pytest.raises(ArchitectureError, match="NoMatrix has no prunable matrix.*nn.Linear"):
        arch.matrices(NoMatrix())
    with pytest.raises(ArchitectureError, match="cannot find the decoder blocks of Module"):
        arch.spec_for(nn.Module())


def test_map_report_lists_layouts_groups_and_exclusions() -> None:
    report = arch.map_report(tiny.build_model("gpt_oss"))
    assert report["matrices"]["mlp.experts.gate_up_proj"]["layout"] == "experts [E, in, out]"
    assert report["groups_from"] == "probe forward"
    assert report["excluded"]["mlp.router.weight"].startswith("router")
    assert report["input_groups"][0][0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
