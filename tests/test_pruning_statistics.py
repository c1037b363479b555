"""Per-group calibration statistics: one object per shared input, and Mixtral experts'
statistics from exactly the tokens the router sends them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_tokens
from perp_cli import arch, engine, tiny
from perp_cli.pruning.statistics import HessianStat, NormStat, collecting, target_groups


pytestmark = pytest.mark.usefixtures("one_thread")


def _block0_inputs(model: nn.Module, tokens: torch.Tensor) -> engine.BlockInputs:
    return engine.capture_inputs(model, tokens, batch_size=2)


def test_qkv_share_one_hessian_equal_to_the_direct_sum() -> None:
    model = tiny.build_model("llama")
    tokens = random_tokens(3, 20, 5)
    inputs = _block0_inputs(model, tokens)
    block = arch.blocks(model)[0]
    keys = {m.key for m in arch.block_matrices(model, 0)}
    groups = target_groups(model, 0, keys)
    seen: list[torch.Tensor] = []
    h = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with collecting(model, groups, HessianStat, torch.device("cpu")) as stats:
        inputs.run(block, keep_outputs=False)
    h.remove()
    assert [len(g.matrices) for g in stats] == [3, 1, 2, 1]
    x = torch.cat(seen).double()
    assert stats[0].stat.tokens == tokens.numel()
    assert stats[0].stat.sequences == tokens.shape[0]  # SparseGPT's reference normalises per sequence
    torch.testing.assert_close(stats[0].stat.hessian().double(), 2 / tokens.shape[0] * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_flattened_mlp_inputs_still_count_sequences() -> None:
    """OPT flattens [b, seqlen, hidden] to [b·seqlen, hidden] before fc1/fc2; the Hessian
    must still be normalised by the number of windows, as for q/k/v."""
    model = tiny.build_model("opt")
    tokens = random_tokens(3, 20, 5)
    inputs = _block0_inputs(model, tokens)
    block = arch.blocks(model)[0]
    keys = {m.key for m in arch.block_matrices(model, 0)}
    with collecting(model, target_groups(model, 0, keys), HessianStat, torch.device("cpu")) as stats:
        inputs.run(block, keep_outputs=False)
    assert len(stats) == 4 and any("fc2" in g.label for g in stats)  # q/k/v, out_proj, fc1, fc2
    assert [g.stat.sequences for g in stats] == [tokens.shape[0]] * 4


def test_target_groups_keep_only_chosen_members() -> None:
    model = tiny.build_model("opt")
    keys = {m.key for m in arch.matrices(model, targets=r"layers\.1\..*(k_proj|fc2)")}
    assert [[m.local for m in g] for g in target_groups(model, 1, keys)] == [["self_attn.k_proj"], ["fc2"]]
    assert target_groups(model, 0, keys) == []


def test_mixtral_expert_statistics_come_from_routed_tokens_only() -> None:
    model = tiny.build_model("mixtral")
    inputs = _block0_inputs(model, random_tokens(4, 20, 5))
    block = arch.blocks(model)[0]
    keys = {m.key for m in arch.block_matrices(model, 0)}
    groups = target_groups(model, 0, keys)
    moe_inputs: list[torch.Tensor] = []
    h = block.mlp.register_forward_pre_hook(lambda m, a: moe_inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with collecting(model, groups, NormStat, torch.device("cpu")) as stats:
        inputs.run(block, keep_outputs=False)
    h.remove()

    # the routing computed by hand from the router weights
    x = torch.cat(moe_inputs)
    probs = torch.softmax(x @ block.mlp.gate.weight.t(), dim=-1)
    chosen = torch.topk(probs, model.config.num_experts_per_tok, dim=-1).indices
    experts = block.mlp.experts
    by_key = {g.label: g for g in stats}
    total = 0
    for e in range(model.config.num_local_experts):
        routed = x[(chosen == e).any(dim=-1)]
        total += routed.shape[0]
        gate_up = by_key[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"].stat
        down = by_key[f"model.layers.0.mlp.experts.down_proj[{e}]"].stat
        assert gate_up.tokens == down.tokens == routed.shape[0]
        torch.testing.assert_close(gate_up.norms(), routed.norm(dim=0), rtol=1e-5, atol=1e-6)
        gate, up = (routed @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
        torch.testing.assert_close(down.norms(), (nn.functional.silu(gate) * up).norm(dim=0), rtol=1e-5, atol=1e-6)
    assert total == x.shape[0] * model.config.num_experts_per_tok


def test_gpt2_conv1d_inputs_are_the_in_features() -> None:
    model = tiny.build_model("gpt2")
    inputs = _block0_inputs(model, random_tokens(3, 20, 5))
    keys = {m.key for m in arch.block_matrices(model, 0)}
    with collecting(model, target_groups(model, 0, keys), NormStat, torch.device("cpu")) as stats:
        inputs.run(arch.blocks(model)[0], keep_outputs=False)
    # c_fc reads 64 features, c_proj (mlp) reads 4·64
    assert [g.stat.sq.numel() for g in stats] == [64, 64, 64, 256]
    assert [m.shape[1] for g in stats for m in g.matrices] == [64, 64, 64, 256]


class _ExpertInputs(torch.overrides.TorchFunctionMode):
    """Records, per expert, the rows each fused expert weight is really multiplied with
    (F.linear / matmul / bmm on the 3-D parameter or one of its slices), whatever the
    family's forward looks like: an independent check of the statistics hook."""

    def __init__(self, param: torch.Tensor) -> None:
        super().__init__()
        self.param, self.rows = param, {}

    def _slice(self, w: object) -> int | None:
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.untyped_storage().data_ptr() != self.param.untyped_storage().data_ptr():
            return None
        return (w.storage_offset() - self.param.storage_offset()) // self.param.stride(0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) >= 2:
            e = self._slice(args[1])
            if e is not None:
                self.rows.setdefault(e, []).append(args[0].reshape(-1, args[0].shape[-1]))
        elif func is torch.bmm and args[1] is self.param:
            for e in range(self.param.shape[0]):
                x = args[0][e]
                self.rows.setdefault(e, []).append(x[x.ne(0).any(dim=-1)])
        return func(*args, **kwargs)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text"])
@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_expert_statistics_are_the_rows_each_expert_really_sees(model_type: str, which: str) -> None:
    model = tiny.build_model(model_type)
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")  # the per-expert loop, so the reference can see each slice
    inputs = _block0_inputs(model, random_tokens(3, 20, 5))
    block = arch.blocks(model)[0]
    chosen = [m for m in arch.block_matrices(model, 0) if m.attr == which]
    with collecting(model, target_groups(model, 0, {m.key for m in chosen}), NormStat, torch.device("cpu")) as stats:
        inputs.run(block, keep_outputs=False)  # stops once the experts' inputs are seen
    with _ExpertInputs(chosen[0].parameter) as seen:
        inputs.run(block)  # the block's own forward, in full, on the same inputs
    assert len(stats) == len(chosen) and sum(g.stat.tokens for g in stats) > 0
    for group in stats:
        e = group.matrices[0].expert
        rows = torch.cat(seen.rows[e]) if e in seen.rows else torch.zeros(0, group.matrices[0].shape[1])
        assert group.stat.tokens == rows.shape[0]
        torch.testing.assert_close(group.stat.norms(), rows.double().pow(2).sum(0).sqrt().float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets,runs", [(r"fc2", {"fc1": 2, "fc2": 0}), (r"k_proj", {"k_proj": 0, "fc1": 0}),
                                          (r".*", {"fc1": 2, "fc2": 0})])
def test_statistics_pass_stops_after_the_last_input_it_needs(targets: str, runs: dict[str, int]) -> None:
    """Nothing after the last hooked input runs (engine.StopBlock), and the statistics
    equal those of a full forward: here fc2's input, seen by a plain hook."""
    model = tiny.build_model("opt")
    inputs = _block0_inputs(model, random_tokens(4, 20, 5))  # 2 micro-batches of 2
    block = arch.blocks(model)[0]
    calls = {name: 0 for name in runs}
    handles = [block.get_submodule(name if name.startswith("fc") else f"self_attn.{name}")
               .register_forward_hook(lambda m, a, y, name=name: calls.__setitem__(name, calls[name] + 1)) for name in runs]
    full: list[torch.Tensor] = []
    fc2 = block.fc2.register_forward_pre_hook(lambda m, a: full.append(a[0].reshape(-1, a[0].shape[-1])))
    inputs.run(block)  # a full pass for the reference statistics
    fc2.remove()
    keys = {m.key for m in arch.matrices(model, targets=rf"layers\.0\.(.*\.)?({targets})")}
    groups = target_groups(model, 0, keys)  # (may run a probe forward: count after it)
    calls.update({name: 0 for name in runs})
    with collecting(model, groups, NormStat, torch.device("cpu")) as stats:
        inputs.run(block, keep_outputs=False)
    for h in handles:
        h.remove()
    assert calls == runs
    if "fc2" in targets or targets == ".*":
        fc2_stat = next(g.stat for g in stats if "fc2" in g.label)
        x = torch.cat(full).double()
        assert fc2_stat.tokens == x.shape[0]
        torch.testing.assert_close(fc2_stat.sq, x.pow(2).sum(0), rtol=1e-6, atol=1e-6)
