"""Streaming `perp prune`: the same output, bit for bit, as the in-memory path; one block's
weights in memory at a time; nothing written on an interrupt or a bad tensor; the engine
hooks it relies on; the choice between the two paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perp_cli import arch, checkpoint, engine, pruner, streaming, tiny
from perp_cli.manifest import StepRecord
from perp_cli.pruner import PruneConfig
from perp_cli.shards import ShardWriter

from conftest import assert_same_tensors, read_weights, run_cli, save_tiny, shared_path


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensor ops on 2 shared cores are many times faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _calib(calib_file: Path, nsamples: int = 4, seqlen: int = 64) -> list[str]:
    return ["--calib", str(calib_file), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu"]


def _metadata(file: Path) -> dict[str, str]:
    """A safetensors header's metadata (compared as a dict: safetensors writes its keys
    in a random order, so the bytes of two equal files may differ)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


def _prune_both(src: Path, tmp_path: Path, args: list[str], shard: str = "40KB") -> tuple[Path, Path, dict, dict]:
    """Prune `src` in memory and streamed; return both outputs and their JSON summaries."""
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    a = run_cli("prune", src, "-o", memory, *args, "--streaming", "off", "--json", "-q")
    assert a.exit_code == 0, a.stderr
    b = run_cli("prune", src, "-o", streamed, *args, "--streaming", "on", "--max-shard-size", shard, "--json", "-q")
    assert b.exit_code == 0, b.stderr
    return memory, streamed, a.json(), b.json()


def _assert_same_checkpoint(memory: Path, streamed: Path, sum_a: dict, sum_b: dict) -> None:
    assert_same_tensors(read_weights(memory), read_weights(streamed))
    assert_same_tensors(load_file(memory / "masks.safetensors"), load_file(streamed / "masks.safetensors"))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (memory / name).read_text() == (streamed / name).read_text(), name
    ma, mb = (json.loads((d / "perp.json").read_text()) for d in (memory, streamed))
    assert ma["sparsity"] == mb["sparsity"] and ma["pattern"] == mb["pattern"]
    assert _metadata(memory / "masks.safetensors") == _metadata(streamed / "masks.safetensors")
    # one writer for both paths: the same bytes, so the manifests carry the same hash
    assert (memory / "masks.safetensors").read_bytes() == (streamed / "masks.safetensors").read_bytes()
    assert ma["masks_sha256"] == mb["masks_sha256"]
    assert not list(streamed.glob(".*"))  # no scratch file (the mask spool) left behind
    assert ma["history"][-1]["results"]["sparsity_achieved"] == mb["history"][-1]["results"]["sparsity_achieved"]
    assert ma["history"][-1]["data"] == mb["history"][-1]["data"]
    assert not sum_a["streaming"] and sum_b["streaming"]
    for key in ("sparsity", "sparsity_all_masked", "per_tensor", "calibration", "notes"):
        assert sum_a[key] == sum_b[key], key
    checkpoint.load(streamed)  # mask hash, exact zeros, finiteness: the reader's own checks


# Each family once, each method at least twice; sharded input everywhere.
CASES = [
    ("llama", "magnitude", []),
    ("llama", "wanda", []),
    ("llama", "sparsegpt", ["--pattern", "2:4"]),
    ("opt", "wanda", ["--sparsity", "0.6"]),  # tied embeddings, biases, LayerNorm
    ("gpt2", "sparsegpt", []),  # Conv1D, tied, no rotary
    ("mixtral", "wanda", []),  # per-expert names on disk, fused in the model
    ("qwen2", "random", []),
    ("gpt_oss", "sparsegpt", ["--pattern", "2:4"]),  # experts [E, in, out] with biases; no probe on a skeleton
    ("llama4_text", "wanda", []),  # batched experts, dense and MoE paths
    ("phi3", "sparsegpt", []),  # fused qkv
    ("bloom", "wanda", []),  # ALiBi call arguments per micro-batch size
]


@pytest.mark.parametrize(("family", "method", "extra"), CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_streamed_output_is_bit_identical_to_the_in_memory_one(
    family: str, method: str, extra: list[str], tmp_path: Path, calib_file: Path
) -> None:
    src = tmp_path / "in"
    tiny.build_model(family).save_pretrained(src, max_shard_size="60KB")
    tiny.build_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, ["--method", method, *extra, *_calib(calib_file)])
    _assert_same_checkpoint(memory, streamed, sum_a, sum_b)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the output is sharded as asked


def test_streamed_output_loads_in_plain_transformers_with_tied_embeddings(tmp_path: Path, calib_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "in", "opt")
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, ["--method", "wanda", *_calib(calib_file)], shard="5GB")
    assert (streamed / "model.safetensors").is_file() and not (streamed / "model.safetensors.index.json").exists()
    # one file each: the same bytes as save_pretrained writes
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    a, b = AutoModelForCausalLM.from_pretrained(memory), AutoModelForCausalLM.from_pretrained(streamed)
    assert b.lm_head.weight is b.get_input_embeddings().weight
    assert "lm_head.weight" not in read_weights(streamed)
    tokens = torch.randint(4, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_pruning_a_pruned_bfloat16_checkpoint_keeps_its_masks_and_dtype(tmp_path: Path, calib_file: Path) -> None:
    src = tmp_path / "bf16"
    tiny.build_model("llama").to(torch.bfloat16).save_pretrained(src)
    tiny.build_tokenizer().save_pretrained(src)
    first = tmp_path / "m50"
    assert run_cli("prune", src, "-o", first, "--method", "magnitude", "--streaming", "on", "-q").exit_code == 0
    assert next(iter(read_weights(first).values())).dtype == torch.bfloat16
    memory, streamed, sum_a, sum_b = _prune_both(first, tmp_path, ["--method", "sparsegpt", "--sparsity", "0.7", *_calib(calib_file)])
    _assert_same_checkpoint(memory, streamed, sum_a, sum_b)
    old, new = checkpoint.load(first).masks, checkpoint.load(streamed).masks
    assert all(not (new[n] & ~old[n]).any() for n in old.names())


# ----------------------------------------------------------------------------- memory


def _materialised(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.is_meta}


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_at_most_one_block_is_in_memory_at_any_time(method: str, tmp_path: Path, monkeypatch) -> None:
    family = "llama"
    src = save_tiny(tmp_path / "in", family)
    ckpt = checkpoint.open(src, streamed=True)
    model = ckpt.model
    prefix = arch.spec_for(model).blocks
    assert not _materialised(model)  # the skeleton holds no weights
    seen: list[tuple[str, set[str]]] = []

    def check_block(index: int):
        def hook(module, args, kwargs):
            live = _materialised(model)
            if not any(n.startswith(f"{prefix}.{index}.") for n in live):
                # the engine catching block 0's inputs: only the embeddings are in memory
                assert index == 0 and live and not any(n.startswith(prefix + ".") for n in live), live
                seen.append(("capture", live))
                return
            assert all(n.startswith(f"{prefix}.{index}.") for n in live), live
            seen.append((f"block {index}", live))
        return hook

    def check_embedding(module, args):
        live = _materialised(model)
        assert live and not any(n.startswith(prefix + ".") for n in live), live
        seen.append(("embedding", live))

    for i, block in enumerate(arch.blocks(model)):
        block.register_forward_pre_hook(check_block(i), with_kwargs=True)
    model.get_input_embeddings().register_forward_pre_hook(check_embedding)

    writes: list[str] = []
    real_write = ShardWriter.write

    def observed_write(self, name, tensor):  # the real write, after checking what is in memory
        live = _materialised(model)  # outside tensors are copied without entering the model
        block_ids = {n[len(prefix) + 1 :].split(".")[0] for n in live if n.startswith(prefix + ".")}
        assert len(block_ids) <= 1 and all(n.startswith(prefix + ".") for n in live), live
        writes.append(name)
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", observed_write)
    real_write_rows = ShardWriter.write_rows

    def observed_write_rows(self, name, start, rows):  # the embeddings and head, a slice of rows at a time
        assert not any(n.startswith(prefix + ".") for n in _materialised(model))
        if start == 0:
            writes.append(name)
        real_write_rows(self, name, start, rows)

    monkeypatch.setattr(ShardWriter, "write_rows", observed_write_rows)
    tokens = torch.randint(4, tiny.VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(method=method, device="cpu", quiet=True)
    with checkpoint.writing(ckpt, tmp_path / "out", StepRecord("prune", {}, str(src))) as sink:
        sink.finish(pruner.prune(ckpt, config, tokens=tokens, blocks=sink.blocks).masks)
    n_blocks = len(arch.blocks(model))
    if method == "wanda":  # each block runs twice per micro-batch: statistics, propagation
        assert [s for s, _ in seen if s.startswith("block")] == [f"block {i}" for i in range(n_blocks) for _ in range(2)]
        # the one-window call and one micro-batch: embeddings run, block 0 is caught before it runs
        assert [s for s, _ in seen].count("embedding") == [s for s, _ in seen].count("capture") == 2
    # every weight, then every mask (assembled from the spool at the end), written once
    assert len(writes) == len(read_weights(tmp_path / "out")) + len(load_file(tmp_path / "out" / "masks.safetensors"))
    assert not _materialised(model)  # every weight went back to meta


# ----------------------------------------------------------------------------- failures


def test_an_interrupt_during_the_streamed_write_leaves_no_output(tmp_path: Path, calib_file: Path, monkeypatch) -> None:
    src = save_tiny(tmp_path / "in", "llama")
    out = tmp_path / "out"
    real_write, calls = ShardWriter.write, []

    def interrupted(self, name, tensor):
        calls.append(name)
        if len(calls) > 9:  # block 0 (9 tensors) is on disk, block 1 is being written
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    result = run_cli("prune", src, "-o", out, "--method", "wanda", "--streaming", "on", *_calib(calib_file), "-q")
    assert result.exit_code == 130 and "no output was written" in result.stderr
    assert len(calls) == 10
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_non_finite_weight_in_a_later_block_aborts_without_output(tmp_path: Path, calib_file: Path) -> None:
    src = save_tiny(tmp_path / "in", "llama")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run_cli("prune", src, "-o", out, "--method", "wanda", "--streaming", "on", *_calib(calib_file), "-q")
    assert result.exit_code == 1
    assert "model.layers.1.mlp.up_proj.weight contains NaN or inf" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--streaming", "maybe"], "--streaming 'maybe' is not one of"),
        (["--streaming", "on", "--scope", "global"], "--scope global"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    ],
)
def test_usage_errors(args: list[str], message: str, tiny_dir: Path, tmp_path: Path) -> None:
    result = run_cli("prune", tiny_dir, "-o", tmp_path / "out", "--method", "magnitude", *args, "-q")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_streaming_on_needs_local_safetensors(tmp_path: Path) -> None:
    result = run_cli("prune", "org/some-model", "-o", tmp_path / "out", "--method", "magnitude", "--streaming", "on", "-q")
    assert result.exit_code == 2 and "not a local directory" in result.stderr
    pickled = tmp_path / "pickled"
    tiny.build_model("opt").save_pretrained(pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    result = run_cli("prune", pickled, "-o", tmp_path / "out", "--method", "magnitude", "--streaming", "on", "-q")
    assert result.exit_code == 2 and "no safetensors weights" in result.stderr


def test_auto_streams_only_when_the_weights_would_not_fit(tiny_dir: Path, monkeypatch) -> None:
    config = PruneConfig(method="wanda")
    size = streaming.weights_bytes(tiny_dir, "auto")
    assert size == sum(t.numel() * t.element_size() for t in load_file(tiny_dir / "model.safetensors").values())
    assert streaming.weights_bytes(tiny_dir, "bfloat16") == size // 2
    monkeypatch.setattr(streaming, "available_memory", lambda: 100 * size)
    assert not streaming.decide("auto", tiny_dir, refusal=pruner.streaming_refusal(config)).stream
    monkeypatch.setattr(streaming, "available_memory", lambda: size)
    assert streaming.decide("auto", tiny_dir, refusal=pruner.streaming_refusal(config)).stream
    assert not streaming.decide("auto", tiny_dir, refusal=pruner.streaming_refusal(PruneConfig(method="wanda", scope="global"))).stream
    assert not streaming.decide("auto", "org/hub-id", refusal=pruner.streaming_refusal(config)).stream
    assert not streaming.decide("off", tiny_dir, refusal=pruner.streaming_refusal(config)).stream


# ----------------------------------------------------------------------------- engine hooks


def test_in_place_propagation_gives_the_same_activations() -> None:
    model = tiny.build_model("llama")
    tokens = torch.randint(4, tiny.VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    a = engine.calibrate(model, tokens, lambda s: None, batch_size=2)
    b = engine.calibrate(model, tokens, lambda s: None, batch_size=2, in_place=True)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden))


def test_data_free_pass_visits_each_block_once_with_its_residency() -> None:
    model = tiny.build_model("opt")
    events: list[str] = []
    residency = engine.Residency(load=lambda i, b: events.append(f"load {i}"), release=lambda i, b: events.append(f"release {i}"))
    engine.run_blocks(model, None, lambda s: events.append(f"step {s.index} {s.inputs}"), residency=residency)
    assert events == ["load 0", "step 0 None", "release 0", "load 1", "step 1 None", "release 1"]


# ----------------------------------------------------------------------------- real checkpoints


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize(
    ("model", "method", "calib"),
    [
        ("stories260K", "sparsegpt", ("wikitext-2-raw", "wiki.valid.raw")),
        ("tiny-opt", "wanda", ("c4", "c4-train.00000-of-01024.first1000.jsonl")),
    ],
)
def test_real_checkpoints_stream_bit_identically(model: str, method: str, calib: tuple[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = shared_path("models", model)
    data = shared_path("data", *calib)
    args = ["--method", method, "--calib", str(data), "--nsamples", "8", "--seqlen", "128", "--device", "cpu"]
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, args, shard="2MB")
    _assert_same_checkpoint(memory, streamed, sum_a, sum_b)
    plain = AutoModelForCausalLM.from_pretrained(streamed)  # both tie lm_head to the embeddings
    assert plain.lm_head.weight is plain.get_input_embeddings().weight


def test_embeddings_and_head_are_copied_in_row_slices_with_the_bytes_of_a_whole_copy(tmp_path: Path, calib_file: Path, monkeypatch) -> None:
    """A large vocabulary (untied head) streams a slice of rows at a time: no read of the
    embedding or the head is larger than the slice, the embedding pass reads only the
    rows of the calibration tokens, and the output is byte for byte the in-memory one."""
    from perp_cli.shards import ShardReader

    vocab, hidden = 4096, tiny.build_config("llama").hidden_size
    src = save_tiny(tmp_path / "in", "llama", vocab_size=vocab, tie_word_embeddings=False)
    row_bytes = hidden * 4
    monkeypatch.setattr(streaming, "TAIL_CHUNK_BYTES", 100 * row_bytes)  # 41 slices of <= 100 rows
    largest: dict[str, int] = {}
    real_read, real_rows = ShardReader.read, ShardReader.read_rows

    def read(self, wanted):
        out = real_read(self, wanted)
        for name, t in out.items():
            largest[name] = max(largest.get(name, 0), t.nbytes)
        return out

    def read_rows(self, name, start, stop):
        t = real_rows(self, name, start, stop)
        largest[name] = max(largest.get(name, 0), t.nbytes)
        return t

    monkeypatch.setattr(ShardReader, "read", read)
    monkeypatch.setattr(ShardReader, "read_rows", read_rows)
    memory, streamed, sum_a, sum_b = _prune_both(src, tmp_path, ["--method", "wanda", *_calib(calib_file, 2, 32)], shard="5GB")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert 0 < largest[name] <= 100 * row_bytes < vocab * row_bytes, (name, largest[name])
    # one file each: the same bytes as save_pretrained of the in-memory model
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    assert sum_a["per_tensor"] == sum_b["per_tensor"]
