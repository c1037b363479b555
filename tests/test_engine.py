"""The block-sequential engine: it reproduces the model's own forward, runs hooks and
other modules over the cached inputs, and propagates through the block as modified."""

from __future__ import annotations

import pytest
import torch

from perp_cli import arch, engine, tiny
from perp_cli.activations import Placement

from conftest import FAMILIES, random_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def _last_block_output(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """What the last decoder block returns inside the model's own forward."""
    seen = []
    handle = arch.blocks(model)[-1].register_forward_hook(lambda m, a, out: seen.append(engine._hidden(out)))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("offload", ["device", "host", "disk"])
def test_unmodified_pass_reproduces_the_model_forward(family: str, offload: str, tmp_path) -> None:
    model = tiny.build_model(family)
    tokens = random_tokens(5, 24)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    where = {"device": False, "host": True, "disk": Placement(torch.device("cpu"), 0, tmp_path)}[offload]
    # batch size 2 over 5 windows: the last micro-batch is smaller, kwargs must broadcast
    final = engine.calibrate(model, tokens, lambda s: None, batch_size=2, offload=where)
    assert [h.shape[0] for h in final.hidden] == [2, 2, 1]
    assert final.hidden.levels()["disk" if offload == "disk" else "device"] == 3  # on CPU the host is the device
    torch.testing.assert_close(torch.cat(list(final.hidden)), _last_block_output(model, tokens), rtol=1e-5, atol=1e-5)
    # the engine never changes the model by itself
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_callbacks_see_every_token_and_can_run_other_modules() -> None:
    model = tiny.build_model("llama")
    tokens = random_tokens(4, 16)
    counts: dict[int, int] = {}
    copies: list[torch.Tensor] = []

    def step(s: engine.BlockStep) -> None:
        assert next(s.block.parameters()).device == s.device
        handle = s.block.self_attn.q_proj.register_forward_pre_hook(
            lambda m, args: counts.__setitem__(s.index, counts.get(s.index, 0) + args[0].shape[0] * args[0].shape[1])
        )
        s.inputs.run(s.block, keep_outputs=False)
        handle.remove()
        import copy

        dense = copy.deepcopy(s.block)
        copies.append(torch.cat(list(s.inputs.run(dense))))

    engine.calibrate(model, tokens, step, batch_size=3)
    assert counts == {0: 4 * 16, 1: 4 * 16}
    # a copy of block 1 run on block 1's inputs gives what block 1 gives in the full forward
    torch.testing.assert_close(copies[1], _last_block_output(model, tokens), rtol=1e-5, atol=1e-5)


def test_next_inputs_come_from_the_modified_block() -> None:
    model = tiny.build_model("opt")
    tokens = random_tokens(3, 16)

    def zero_fc2(s: engine.BlockStep) -> None:
        with torch.no_grad():
            s.block.fc2.weight.zero_()

    final = engine.calibrate(model, tokens, zero_fc2, batch_size=2)
    # the model with the same modification, run normally, gives the same last-block output
    torch.testing.assert_close(torch.cat(list(final.hidden)), _last_block_output(model, tokens), rtol=1e-5, atol=1e-5)
    assert all(float(b.fc2.weight.detach().abs().sum()) == 0 for b in arch.blocks(model))


def test_returned_inputs_replace_the_propagation() -> None:
    model = tiny.build_model("opt")
    tokens = random_tokens(2, 8)
    calls = []

    def step(s: engine.BlockStep) -> engine.BlockInputs:
        calls.append(s.index)
        return s.inputs.replaced([torch.zeros_like(h) for h in s.inputs.hidden])

    final = engine.calibrate(model, tokens, step)
    assert calls == [0, 1]
    assert all(float(h.abs().sum()) == 0 for h in final.hidden)


def test_capture_counts_and_call_arguments() -> None:
    model = tiny.build_model("gpt2")
    inputs = engine.capture_inputs(model, random_tokens(5, 12), batch_size=4)
    assert inputs.num_windows == 5 and inputs.num_tokens == 60 and len(inputs) == 2
    assert inputs.kwargs["use_cache"] is False
    # GPT-2 passes cache, mask and encoder states positionally: the cache slot stays None
    assert inputs.args[0] is None


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_eager_attention_masks_broadcast_over_micro_batches(family: str) -> None:
    model = tiny.build_model(family, attn_implementation="eager")
    tokens = random_tokens(3, 24)
    inputs = engine.capture_inputs(model, tokens, batch_size=2)
    assert tuple(inputs.kwargs["attention_mask"].shape)[0] == 1  # caught from a one-window batch
    final = engine.run_blocks(model, inputs, lambda s: None)
    torch.testing.assert_close(torch.cat(list(final.hidden)), _last_block_output(model, tokens), rtol=1e-5, atol=1e-5)


def test_call_arguments_that_fold_the_batch_are_kept_per_micro_batch_size() -> None:
    """BLOOM folds the batch into its ALiBi bias ([b * heads, 1, seq]): a one-window bias
    does not broadcast, so the engine keeps the arguments of each micro-batch size."""
    model = tiny.build_model("bloom")
    tokens = random_tokens(3, 16)
    inputs = engine.capture_inputs(model, tokens, batch_size=2)
    assert sorted(inputs.by_size) == [2]  # the last micro-batch has one window: the one-window arguments fit
    out = torch.cat(list(inputs.run(arch.blocks(model)[0])))
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True, use_cache=False).hidden_states[1]
    torch.testing.assert_close(out, expected)
    llama = engine.capture_inputs(tiny.build_model("llama"), tokens, batch_size=2)
    assert llama.by_size == {}  # masks and rotary tables broadcast: one set of arguments, as before
