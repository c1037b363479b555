"""The attention and MLP halves of a decoder block (`perp_cli.sublayers`): found from the
module tree and one forward, equal to the residual stream the block itself computes
between them, owning disjoint parameters; parallel and post-norm blocks are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_tokens
from perp_cli import arch, engine, sublayers, tiny
from perp_cli.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (attention branch, MLP branch, the norm whose input is the stream between the halves)
SEQUENTIAL = {
    "llama": ("self_attn", "mlp", "post_attention_layernorm"),
    "opt": ("self_attn", "fc2", "final_layer_norm"),  # OPT's fc1/fc2 sit on the block itself
    "gpt2": ("attn", "mlp", "ln_2"),
    "mixtral": ("self_attn", "mlp", "post_attention_layernorm"),
}


def _block0_inputs(model: nn.Module) -> engine.BlockInputs:
    tokens = random_tokens(4, 16)
    return engine.capture_inputs(model, tokens, batch_size=2)


@pytest.mark.parametrize("family", list(SEQUENTIAL))
def test_halves_are_the_blocks_own_residual_stream(family: str) -> None:
    model = tiny.build_model(family).eval()
    inputs = _block0_inputs(model)
    block = arch.blocks(model)[0]
    x = inputs.batch(0)
    split = sublayers.split(model, 0, block, inputs.call, x)
    attention, mlp, middle_norm = SEQUENTIAL[family]
    assert (split.attention, split.mlp) == (attention, mlp)

    # independent reference: the block's own forward, the tensor entering the MLP's norm
    seen = []
    handle = block.get_submodule(middle_norm).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        full = inputs.call(block, x)
    handle.remove()
    halves = dict(split.halves(block))
    with torch.no_grad():
        h = inputs.call(halves["attention"], x)
        y = inputs.call(halves["mlp"], h)
    assert torch.equal(h.reshape(seen[0].shape), seen[0])
    assert torch.equal(y, full)

    # every block parameter belongs to exactly one half; each half's norm is its own
    params = {n for n, _ in block.named_parameters()}
    assert split.owned["attention"].isdisjoint(split.owned["mlp"])
    assert split.owned["attention"] | split.owned["mlp"] == params
    assert all(n.startswith(middle_norm) or not n.startswith(attention) or n in split.owned["attention"] for n in params)
    assert {n for n in params if n.startswith(middle_norm + ".")} <= split.owned["mlp"]


def _parallel(family: str) -> nn.Module:
    import transformers as T

    configs = {
        "gptj": T.GPTJConfig(vocab_size=tiny.VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
        "phi": T.PhiConfig(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64),
        "falcon": T.FalconConfig(vocab_size=tiny.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    }
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(configs[family]).eval()


@pytest.mark.parametrize("family", ["gptj", "phi", "falcon"])
def test_parallel_attention_and_mlp_are_refused(family: str) -> None:
    model = _parallel(family)
    inputs = _block0_inputs(model)
    with pytest.raises(UsageError, match="in parallel.*--granularity block") as err:
        sublayers.split(model, 0, arch.blocks(model)[0], inputs.call, inputs.batch(0))
    assert "\n" not in str(err.value)


def test_post_norm_block_is_refused() -> None:
    import transformers as T

    config = T.OPTConfig(vocab_size=tiny.VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=64, do_layer_norm_before=False)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    for name, p in model.named_parameters():  # trained norms: a norm of a norm is no longer the norm
        if "layer_norm" in name:
            p.data.uniform_(0.5, 1.5)
    inputs = _block0_inputs(model)
    with pytest.raises(UsageError, match="not two sequential residual halves"):
        sublayers.split(model, 0, arch.blocks(model)[0], inputs.call, inputs.batch(0))


def test_llama_halves_match_the_reference_wrappers_formula() -> None:
    """The reference's AttnWrapperLlama / MLPWrapperLlama compute x + self_attn(input_layernorm(x))
    and h + mlp(post_attention_layernorm(h)); written out here from the module tree."""
    model = tiny.build_model("llama").eval()
    inputs = _block0_inputs(model)
    block = arch.blocks(model)[0]
    x = inputs.batch(0)
    halves = dict(sublayers.split(model, 0, block, inputs.call, x).halves(block))
    attn_kwargs = {k: v for k, v in inputs.arguments.kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
    with torch.no_grad():
        h = x + block.self_attn(hidden_states=block.input_layernorm(x), **attn_kwargs)[0]
        y = h + block.mlp(block.post_attention_layernorm(h))
        assert torch.allclose(inputs.call(halves["attention"], x), h, rtol=0, atol=1e-6)
        assert torch.allclose(inputs.call(halves["mlp"], h), y, rtol=0, atol=1e-6)
