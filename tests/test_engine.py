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


def test_the_last_propagation_can_be_skipped() -> None:
    """`propagate_last=False` (pruning, statistics): the last block runs only in its step,
    the returned inputs are its inputs, and every earlier block still propagates."""
    model = tiny.build_model("llama")
    tokens = random_tokens(3, 12)
    blocks = arch.blocks(model)

    def run(propagate_last: bool) -> tuple[list[int], engine.BlockInputs, list[torch.Tensor]]:
        runs = [0] * len(blocks)  # forwards of each block (the capture's stand-ins included)
        handles = [b.register_forward_hook(lambda m, a, out, i=i: runs.__setitem__(i, runs[i] + 1)) for i, b in enumerate(blocks)]
        entering_last: list[torch.Tensor] = []

        def step(s: engine.BlockStep) -> None:
            if s.index == len(blocks) - 1:
                entering_last.append(torch.cat(list(s.inputs.hidden)))

        final = engine.calibrate(model, tokens, step, batch_size=2, propagate_last=propagate_last)
        for h in handles:
            h.remove()
        return runs, final, entering_last

    runs_all, final_all, _ = run(True)
    runs, final, entering_last = run(False)
    assert runs[:-1] == runs_all[:-1] and runs[-1] == runs_all[-1] - 2  # the last block's two micro-batches
    assert torch.equal(torch.cat(list(final.hidden)), entering_last[0])
    torch.testing.assert_close(torch.cat(list(final_all.hidden)), _last_block_output(model, tokens), rtol=1e-5, atol=1e-5)


def test_capture_counts_and_call_arguments() -> None:
    model = tiny.build_model("gpt2")
    inputs = engine.capture_inputs(model, random_tokens(5, 12), batch_size=4)
    assert [inputs.hidden.shape(k)[0] for k in range(len(inputs))] == [4, 1]  # 5 windows in 2 micro-batches
    assert sum(inputs.tokens_in(k) for k in range(len(inputs))) == 60
    assert inputs.arguments.kwargs["use_cache"] is False
    # GPT-2 passes cache, mask and encoder states positionally: the cache slot stays None
    assert inputs.arguments.args[0] is None


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_eager_attention_masks_broadcast_over_micro_batches(family: str) -> None:
    model = tiny.build_model(family, attn_implementation="eager")
    tokens = random_tokens(3, 24)
    inputs = engine.capture_inputs(model, tokens, batch_size=2)
    assert tuple(inputs.arguments.kwargs["attention_mask"].shape)[0] == 1  # caught from a one-window batch
    final = engine.run_blocks(model, inputs, lambda s: None)
    torch.testing.assert_close(torch.cat(list(final.hidden)), _last_block_output(model, tokens), rtol=1e-5, atol=1e-5)


def test_call_arguments_that_fold_the_batch_are_kept_per_micro_batch_size() -> None:
    """BLOOM folds the batch into its ALiBi bias ([b * heads, 1, seq]): a one-window bias
    does not broadcast, so the engine keeps the arguments of each micro-batch size."""
    model = tiny.build_model("bloom")
    tokens = random_tokens(3, 16)
    inputs = engine.capture_inputs(model, tokens, batch_size=2)
    assert sorted(inputs.arguments.by_size) == [2]  # the last micro-batch has one window: the one-window arguments fit
    out = torch.cat(list(inputs.run(arch.blocks(model)[0])))
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True, use_cache=False).hidden_states[1]
    torch.testing.assert_close(out, expected)
    llama = engine.capture_inputs(tiny.build_model("llama"), tokens, batch_size=2)
    assert llama.arguments.by_size == {}  # masks and rotary tables broadcast: one set of arguments, as before


# ----------------------------------------------------------------------------- per-block call arguments

SLIDING, FULL, CHUNKED = "sliding_attention", "full_attention", "chunked_attention"
# Families whose decoder layers get different arguments per layer: sliding (or chunked)
# vs full attention masks, and for Gemma 3 local vs global rotary tables. The window (4)
# is shorter than the windows (16 tokens), so the masks really differ.
MIXED = {
    "gemma3_text": [SLIDING, FULL, SLIDING, SLIDING],
    "gemma2": [SLIDING, FULL, SLIDING, FULL],
    "gpt_oss": [SLIDING, FULL, SLIDING, FULL],
    "llama4_text": [CHUNKED, FULL, CHUNKED, CHUNKED],
    "qwen3": [SLIDING, FULL, SLIDING, FULL],
}


def mixed_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of `model_type` with `MIXED`'s layer pattern and a 4-token window."""
    from transformers import AutoModelForCausalLM

    layer_types = MIXED[model_type]
    config = tiny.shrunk_config(model_type, num_hidden_layers=len(layer_types), attention_chunk_size=4)
    config.layer_types, config.sliding_window = list(layer_types), 4
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = True  # Qwen3 honours layer_types' sliding layers only with it
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _own_hidden_states(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block in the model's own forward (`output_hidden_states`), and
    the last block's output."""
    last = []
    handle = arch.blocks(model)[-1].register_forward_hook(lambda m, a, out: last.append(engine._hidden(out)))
    with torch.no_grad():
        states = model(input_ids=tokens, use_cache=False, output_hidden_states=True).hidden_states
    handle.remove()
    return list(states[: len(arch.blocks(model))]) + last


def _engine_hidden_states(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The input of every block as the engine propagates it (a step that does nothing),
    and the last block's output."""
    seen: list[torch.Tensor] = []
    final = engine.calibrate(model, tokens, lambda s: seen.append(torch.cat(list(s.inputs.hidden))), batch_size=batch_size)
    return seen + [torch.cat(list(final.hidden))]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.mark.parametrize("family", [*MIXED, "llama", "bloom"])
def test_propagation_reproduces_the_hidden_states_of_every_layer(family: str) -> None:
    """Block i is called with block i's own arguments: through every block, the engine
    gives the model's own hidden states (5 windows in micro-batches of 2, 2, 1)."""
    model = mixed_model(family) if family in MIXED else tiny.build_model(family)
    tokens = random_tokens(5, 16)
    expected = _own_hidden_states(model, tokens)
    got = _engine_hidden_states(model, tokens, batch_size=2)
    assert len(got) == len(expected) == len(arch.blocks(model)) + 1
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"block {i} input: {m}")
    calls = engine.capture_inputs(model, tokens, batch_size=2).calls
    distinct = {tuple(id(t) for t in _tensors((c.args, c.kwargs))) for c in calls}
    if family in MIXED:  # the test is not vacuous: the layers really get different arguments
        assert len(distinct) > 1
    else:  # one mask and one rotary table (or ALiBi bias) shared by every block, as before
        assert len(distinct) == 1


def test_blocks_share_one_copy_of_equal_arguments() -> None:
    """Eight layers of two kinds: two masks and two rotary tables in all, however deep."""
    from transformers import AutoModelForCausalLM

    config = tiny.shrunk_config("gemma3_text", num_hidden_layers=8)
    config.layer_types, config.sliding_window = [SLIDING, FULL] * 4, 4
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    inputs = engine.capture_inputs(model, random_tokens(2, 16), batch_size=2)
    per_kind = {kind: {id(t) for c, k in zip(inputs.calls, config.layer_types) if k == kind for t in _tensors((c.args, c.kwargs))}
                for kind in (SLIDING, FULL)}
    everything = {id(t) for c in inputs.calls for t in _tensors((c.args, c.kwargs))}
    assert everything == per_kind[SLIDING] | per_kind[FULL]
    sliding, full = (inputs.at(i).arguments.kwargs for i in (0, 1))
    assert inputs.at(2).arguments.kwargs["attention_mask"] is sliding["attention_mask"]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # local vs global rotary


@pytest.mark.parametrize("family", ["bloom", "falcon", "gpt_neo"])
def test_layers_that_return_tuples(family: str) -> None:
    """These families' layers still return `(hidden, ...)` in transformers 5.24 and the
    model takes `[0]`; a stand-in returning a bare tensor would hand block 1 a slice."""
    model = tiny.build_model(family, **({"n_layer": 3} if family == "bloom" else {"num_hidden_layers": 3}))
    blocks = list(arch.blocks(model))
    with engine._stand_ins(blocks, "tensor", len(blocks)) as calls:
        with pytest.raises(engine._Caught):
            model(input_ids=torch.zeros(1, 16, dtype=torch.long), use_cache=False)
    assert calls[1]["hidden"].shape == (16, 64)  # the hazard: `[0]` of a one-window tensor
    tokens = random_tokens(3, 16)
    for got, expected in zip(_engine_hidden_states(model, tokens, batch_size=2), _own_hidden_states(model, tokens)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


class _PairLayer(torch.nn.Module):
    """A remote-code style decoder layer: returns (hidden states, attention weights)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.o_proj = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, scale: float) -> tuple:
        scores = self.q_proj(hidden_states) @ hidden_states.transpose(-1, -2) * scale + attention_mask
        weights = scores.softmax(-1)
        return hidden_states + self.o_proj(weights @ hidden_states), weights


class _PairModel(torch.nn.Module):
    """Layers alternate a 3-token sliding window and full causal attention (their own
    mask and scale each), and the forward unpacks two values from every layer
    (`unpack`) or takes `[0]`."""

    def __init__(self, unpack: bool, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.unpack = unpack
        self.embed_tokens = torch.nn.Embedding(tiny.VOCAB, width)
        self.layers = torch.nn.ModuleList(_PairLayer(width) for _ in range(depth))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        n = input_ids.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        blocked = {"full": j > i, "sliding": (j > i) | (j <= i - 3)}
        masks = {kind: torch.zeros(n, n).masked_fill(b, float("-inf")) for kind, b in blocked.items()}
        for k, layer in enumerate(self.layers):
            kind = "sliding" if k % 2 == 0 else "full"
            out = layer(hidden, attention_mask=masks[kind], scale=0.25 if kind == "full" else 0.5)
            if self.unpack:
                hidden, _ = out
            else:
                hidden = out[0]
        return hidden


@pytest.mark.parametrize("unpack", [True, False], ids=["unpacks-two", "takes-first"])
def test_remote_code_layers_that_return_pairs_get_their_own_arguments(unpack: bool) -> None:
    """Unpacking two values from a stand-in's bare tensor or 1-tuple fails; taking `[0]`
    of a bare tensor slices silently: the engine tries each form until every block sees a
    hidden input shaped like block 0's."""
    torch.manual_seed(0)
    model = _PairModel(unpack).eval()
    tokens = random_tokens(5, 12)
    inputs = engine.capture_inputs(model, tokens, batch_size=2)
    assert [c.kwargs["scale"] for c in inputs.calls] == [0.5, 0.25, 0.5, 0.25]
    expected = []
    handles = [b.register_forward_pre_hook(lambda m, a, kw: expected.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
               for b in model.layers]
    with torch.no_grad():
        expected.append(model(tokens))
    for h in handles:
        h.remove()
    got = _engine_hidden_states(model, tokens, batch_size=2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_streamed_prune_of_a_mixed_attention_model_matches_the_in_memory_one(tmp_path, calib_file) -> None:
    """Streaming catches the call arguments on a skeleton (no block weights): the stand-ins
    give every block its own, as in memory, so both outputs are the same bytes."""
    from conftest import assert_same_tensors, read_weights, run_cli
    from transformers import AutoConfig

    src = tmp_path / "in"
    mixed_model("gemma3_text").save_pretrained(src, max_shard_size="60KB")
    tiny.build_tokenizer().save_pretrained(src)
    saved = AutoConfig.from_pretrained(src)
    assert saved.layer_types == MIXED["gemma3_text"] and saved.sliding_window == 4
    outputs = {}
    for mode in ("off", "on"):
        outputs[mode] = tmp_path / mode
        result = run_cli(
            "prune", src, "-o", outputs[mode], "--method", "wanda", "--calib", calib_file, "--nsamples", "3",
            "--seqlen", "16", "--batch-size", "2", "--device", "cpu", "--streaming", mode, "-q",
        )
        assert result.exit_code == 0, result.stderr
    assert_same_tensors(read_weights(outputs["off"]), read_weights(outputs["on"]))
    assert (outputs["off"] / "masks.safetensors").read_bytes() == (outputs["on"] / "masks.safetensors").read_bytes()


def test_a_shrunk_blocks_dense_teachers_get_their_own_arguments() -> None:
    """Reconstructing a depth-shrunk model: kept block 0 stands for dense blocks 0 and 1
    (sliding, full); its target runs both on its inputs, each with the dense model's
    arguments for it, and is what the dense model's own forward gives after block 1."""
    import copy

    from perp_cli import reconstruction

    dense = mixed_model("gemma3_text")
    shrunk = copy.deepcopy(dense)
    del shrunk.model.layers[1]
    shrunk.config.num_hidden_layers, shrunk.config.layer_types = 3, [SLIDING, SLIDING, SLIDING]
    tokens = random_tokens(3, 16)
    cfg = reconstruction.ReconstructConfig(train="norms", device="cpu", batch_size=2, teacher_blocks=[[0, 1], [2], [3]], maskless=True)
    worker = reconstruction._Reconstructor(shrunk, dense, None, cfg, None)
    worker.teacher_calls = engine.capture_calls(dense, tokens, batch_size=2)
    inputs = engine.capture_inputs(shrunk, tokens, batch_size=2)
    step = engine.BlockStep(0, arch.blocks(shrunk)[0], inputs.at(0), torch.device("cpu"), lambda text: None)
    targets = torch.cat(list(worker.targets(step, step.inputs, "block")))
    torch.testing.assert_close(targets, _own_hidden_states(dense, tokens)[2], rtol=1e-6, atol=1e-6)
