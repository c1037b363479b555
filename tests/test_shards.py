"""Shard IO for streaming: sizes, the shard plan, a writer that takes tensors in any order
and produces files safetensors/transformers read, and a reader that maps checkpoint names
(including Mixtral's per-expert original format) to the model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perp_cli import tiny
from perp_cli.errors import CheckpointError, NumericalError, UsageError
from perp_cli.shards import (
    ShardReader,
    ShardWriter,
    all_finite,
    check_tensor_finite,
    parse_size,
    plan_shards,
    read_header,
    to_checkpoint_names,
    to_model_names,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5KB", 1500), ("40kb", 40_000), ("123", 123), (7, 7)],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "5 GBs", "-1GB", "0", "GB"])
def test_parse_size_rejects_nonsense(text) -> None:
    with pytest.raises(UsageError, match="--max-shard-size"):
        parse_size(text)


def test_plan_is_greedy_in_order_and_isolates_oversized_tensors() -> None:
    f32 = torch.float32
    layout = {"a": (f32, (10,)), "b": (f32, (10,)), "c": (f32, (30,)), "d": (f32, (5,)), "e": (f32, (5,))}
    # 40 + 40 = 80 fits in 100; c (120 bytes) is larger than the limit: its own shard
    assert plan_shards(layout, 100) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(layout, 10**9) == [["a", "b", "c", "d", "e"]]
    assert plan_shards(layout, 45) == [["a"], ["b"], ["c"], ["d", "e"]]


def _random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.big": torch.randn(33, 17, generator=g),
        "w.half": torch.randn(7, 3, generator=g).to(torch.bfloat16),  # odd byte count
        "w.int": torch.arange(5, dtype=torch.int64),
        "w.mask": torch.rand(9, generator=g) > 0.5,
        "w.scalar": torch.tensor(3.0),
        "w.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("limit", [10**9, 600])
def test_writer_accepts_tensors_in_any_order_and_reads_back_exactly(tmp_path: Path, limit: int) -> None:
    tensors = _random_tensors()
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    writer = ShardWriter(tmp_path, layout, limit, total_parameters=123)
    for name in reversed(list(tensors)):  # not the layout order
        writer.write(name, tensors[name])
    weight_map = writer.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if limit == 10**9:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == weight_map and set(index["weight_map"].values()) == set(files)
        assert index["metadata"] == {"total_size": writer.total_size, "total_parameters": 123}
    again = {}
    for f in files:
        again.update(load_file(tmp_path / f))
    assert again.keys() == tensors.keys()
    for name, t in tensors.items():
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name


def test_writer_refuses_wrong_shapes_missing_and_duplicate_tensors(tmp_path: Path) -> None:
    layout = {"a": (torch.float32, (2, 2)), "b": (torch.float32, (3,))}
    writer = ShardWriter(tmp_path, layout, 10**9)
    with pytest.raises(CheckpointError, match="planned"):
        writer.write("a", torch.zeros(4))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="twice"):
        writer.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="never written"):
        writer.close()


def test_header_of_a_corrupt_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_header(bad)


def test_reader_reads_sharded_mixtral_in_model_names_and_writer_names_round_trip(tmp_path: Path) -> None:
    model = tiny.build_model("mixtral")
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # transformers splits experts into w1/w2/w3
    assert (tmp_path / "model.safetensors.index.json").is_file()
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied
    reader = ShardReader(tmp_path, model, state)
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in reader.stored)
    block = reader.read(lambda n: n.startswith("model.layers.1."))
    assert set(block) == {n for n in state if n.startswith("model.layers.1.")}
    assert all(torch.equal(block[n], state[n]) for n in block)
    # and back: the names and values transformers itself wrote
    on_disk = {}
    for f in tmp_path.glob("model-*.safetensors"):
        on_disk.update(load_file(f))
    back = to_checkpoint_names(model, block)
    assert back.keys() == {k for k in on_disk if k.startswith("model.layers.1.")}
    assert all(torch.equal(back[k], on_disk[k]) for k in back)


def test_reader_accepts_legacy_names_without_the_base_prefix(tmp_path: Path) -> None:
    model = tiny.build_model("gpt2")
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_file({n.removeprefix("transformer."): t.contiguous() for n, t in state.items()}, str(tmp_path / "model.safetensors"))
    got = ShardReader(tmp_path, model, state).read(lambda n: True)
    assert got.keys() == state.keys() and all(torch.equal(got[n], state[n]) for n in state)
    assert to_model_names(model, {"h.0.ln_1.weight": state["transformer.h.0.ln_1.weight"]}).keys() == {"transformer.h.0.ln_1.weight"}


def test_reader_reports_a_missing_tensor_before_any_work(tmp_path: Path) -> None:
    model = tiny.build_model("llama")
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    partial = {n: t for n, t in state.items() if "layers.1.mlp.up_proj" not in n}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is not in the checkpoint"):
        ShardReader(tmp_path, model, state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_checks_see_every_slice(bad: float) -> None:
    t = torch.zeros(10, 7)
    assert all_finite(t, chunk=4) and all_finite(torch.ones(3, dtype=torch.int64), chunk=1)
    t[9, 6] = bad  # in the last, shorter slice
    assert not all_finite(t, chunk=4) and not all_finite(t)
    with pytest.raises(NumericalError, match="parameter w contains NaN or inf"):
        check_tensor_finite("w", t, "refusing to write", chunk=4)
