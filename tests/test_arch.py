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
